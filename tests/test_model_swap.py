"""Model swap without stopping the stream (issue 13, item 4).

A new version is exported into a numbered directory of the served model and loaded into the running tritonserver
(explicit model control); the worker moves to it between two batches, names the version in every record, and
refuses a version whose inputs/outputs do not match its encoder. Unit tests of the version logic first, then the
real tritonserver without a worker, then a worker consuming a steady stream while versions are loaded.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import onnxruntime as ort
import pytest

from core.encoding import INPUT_NAMES, EncoderConfig, Vocabulary, encode_batch
from core.schema import Event, InterestRecord, decode_record
from core.sessions import UserState, state_from_events
from local.synthetic import synthetic_events
from local.triton import LocalTriton
from stream import metrics
from stream.inference import OUTPUT_NAMES, InterestModel, ModelBundle, interface_problems
from stream.settings import Settings
from stream.versions import Pinned, VersionTracker, newest_first
from tests.fixtures.triton import TINY_ITEMS, make_tiny_checkpoint
from tests.fixtures.worker import Worker, read_topic, wait_caught_up, wait_for

MODEL = "interest_transformer"


# --- Unit: version order, interface check, the tracker on fakes ----------------------------------------------


def fake_bundle(max_len: int = 200, tag: str = "v") -> ModelBundle:
    dims = {"interest": [16], "top_items": [20], "top_scores": [20], "category_scores": [5], "event_weights": [max_len]}
    outputs = [{"name": n, "datatype": "TYPE_INT64" if n == "top_items" else "TYPE_FP32", "dims": dims[n]}
               for n in OUTPUT_NAMES]  # fmt: skip
    meta = {"model_name": MODEL, "model_version": tag, "outputs": outputs, "encoder_config": {"max_len": max_len}}
    return ModelBundle(MODEL, tag, Vocabulary(["a"]), ["c"] * 5, EncoderConfig(max_len=max_len), meta)


def served_metadata(bundle: ModelBundle, max_len: int | None = None, drop: str = "") -> dict[str, Any]:
    """What Triton's get_model_metadata returns for a model built like `bundle` (with changes)."""
    n = bundle.encoder.max_len if max_len is None else max_len
    inputs = [{"name": i, "datatype": "INT64", "shape": ["-1", str(n)]} for i in INPUT_NAMES]
    outputs = [
        {"name": o["name"], "datatype": o["datatype"].removeprefix("TYPE_"), "shape": ["-1", *map(str, o["dims"])]}
        for o in bundle.metadata["outputs"]
        if o["name"] != drop
    ]
    return {"name": MODEL, "versions": ["1"], "inputs": inputs, "outputs": outputs}


def test_versions_are_ordered_as_numbers_and_a_pin_keeps_one() -> None:
    assert newest_first(["1", "10", "2", "2"]) == ["10", "2", "1"]
    assert newest_first(["1", "10", "2"], only="2") == ["2"] and newest_first(["1"], only="2") == []


def test_the_interface_check_refuses_other_dims_and_a_missing_output() -> None:
    bundle = fake_bundle()
    assert interface_problems(served_metadata(bundle), bundle) == []
    assert interface_problems(served_metadata(bundle, max_len=100), bundle)[0].startswith("input item_ids: INT64")
    assert interface_problems(served_metadata(bundle, drop="category_scores"), bundle) == [
        "output category_scores missing"
    ]
    other = fake_bundle(max_len=100)  # a version whose encoder differs from what Triton serves
    assert len(interface_problems(served_metadata(bundle), other)) == len(INPUT_NAMES) + 1  # + event_weights


class FakeTriton:
    """Ready versions and the check's verdict per version, changed by the test between polls."""

    def __init__(self) -> None:
        self.polls = 0
        self.ready: list[str] = []
        self.bad: dict[str, list[str]] = {}
        self.bundles: dict[str, ModelBundle] = {}
        self.max_batch_size = 1024

    async def list_ready(self) -> list[str]:
        self.polls += 1
        return list(self.ready)

    async def check(self, version: str) -> Pinned | list[str]:
        if version in self.bad:
            return self.bad[version]
        bundle = self.bundles.setdefault(version, fake_bundle(tag=f"tag{version}"))
        return Pinned(version, bundle, self.max_batch_size)


def gauge(version: str) -> float | None:
    from prometheus_client import REGISTRY

    labels = {"version": version, "model_version": f"tag{version}"}
    return REGISTRY.get_sample_value("interest_model_version_info", labels)


def refused(version: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("interest_model_versions_refused_total", {"version": version}) or 0.0


def test_the_tracker_switches_to_the_newest_good_version_and_waits_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("stream.versions.STALL_RETRY_S", 0.01)  # while waiting, it looks again this often
    triton, now = FakeTriton(), [0.0]
    tracker = VersionTracker(MODEL, triton.list_ready, triton.check, poll_s=5.0, clock=lambda: now[0])
    metrics.MODEL_VERSIONS_REFUSED.clear()

    async def run() -> None:
        triton.ready = ["1"]
        assert (await tracker.for_batch()).version == "1" and gauge("1") == 1
        triton.ready = ["1", "2"]
        assert (await tracker.for_batch()).version == "1", "polled at most once per MODEL_POLL_S"
        now[0] += 5
        assert (await tracker.for_batch()).version == "2" and gauge("2") == 1 and gauge("1") is None
        triton.ready, triton.bad["3"] = ["2", "3"], ["input item_ids: INT64[-1, 100] != INT64[-1, 200]"]
        for _ in range(3):
            assert (await tracker.refresh(force=True)).version == "2", "a refused version changes nothing"
        assert refused("3") == 1 and "3" in tracker.refusals, "refused once (logged and counted), not per poll"
        triton.ready, now[0] = ["3"], now[0] + 5  # only the refused version is served: wait, never use it
        polls, waiting = triton.polls, asyncio.ensure_future(tracker.for_batch())
        while triton.polls < polls + 3:  # it looked, found only the refused version, and looked again twice
            assert not waiting.done(), "a batch must not get the refused version"
            await asyncio.sleep(0.005)
        assert not waiting.done() and tracker.current is None and "is refused (3)" in tracker.problem
        triton.ready = ["3", "4"]
        pinned = await asyncio.wait_for(waiting, 5)
        assert pinned.version == "4" and tracker.problem == ""
        tracker.drop("4")  # the pinned version vanished mid-batch: resolved again at once, not after poll_s
        triton.ready = ["3", "5"]
        assert (await tracker.for_batch()).version == "5"

    asyncio.run(run())


def test_a_pinned_triton_model_version_is_the_only_candidate() -> None:
    triton = FakeTriton()
    triton.ready = ["1", "2"]
    tracker = VersionTracker(MODEL, triton.list_ready, triton.check, poll_s=5.0, only="1")
    assert asyncio.run(tracker.refresh()).version == "1"  # type: ignore[union-attr]


def test_a_version_gone_mid_batch_redoes_the_whole_batch_on_the_next_one() -> None:
    """A batch above max_batch_size is split; when the second request finds its version unloaded, the chunk that
    version 1 already answered is dropped and the whole batch is sent again to version 2: no record from a mix."""
    from stream.inference import InterestClient, VersionGone

    triton, calls = FakeTriton(), []
    triton.ready, triton.max_batch_size = ["1"], 3  # five users are two requests
    settings = Settings(_env_file=None, triton_url="127.0.0.1:1", model_poll_s=60)
    users = [f"u{i}" for i in range(5)]
    states = [UserState()] * 5

    async def infer_once(inputs: dict[str, np.ndarray], pinned: Pinned) -> dict[str, np.ndarray]:
        n, version = len(inputs["item_ids"]), pinned.version
        calls.append((version, n))
        if version == "1" and len(calls) == 2:
            triton.ready = ["2"]  # unloaded between the two requests of the batch
            raise VersionGone("version 1: not at ready state")
        shapes = {o["name"]: (n, *o["dims"]) for o in pinned.bundle.metadata["outputs"]}
        return {k: np.zeros(v, np.int64 if k.endswith("top_items") else np.float32) for k, v in shapes.items()}

    async def run() -> list[InterestRecord]:
        model = InterestModel(settings)
        model.versions = VersionTracker(MODEL, triton.list_ready, triton.check, poll_s=60)
        model.client = InterestClient(settings)
        model.client._infer_once = infer_once  # type: ignore[method-assign]
        try:
            return [decode_record(r) for r in await model.records(users, states)]
        finally:
            await model.close()

    records = asyncio.run(run())
    assert calls == [("1", 3), ("1", 2), ("2", 3), ("2", 2)]
    assert {r.model.triton_version for r in records} == {"2"} and len(records) == 5


# --- Export: versions side by side ---------------------------------------------------------------------------


def tiny(seed: int, name: str, *, max_len: int = 200, reverse_vocab: bool = False) -> Any:
    ckpt = make_tiny_checkpoint(max_len=max_len, seed=seed)
    ckpt.metadata["model_version"] = name
    if reverse_vocab:  # a new vocabulary (same size): records must be built with the version's own bundle
        ckpt.vocab = Vocabulary(reversed(ckpt.vocab.items))
    return ckpt


def test_export_adds_a_version_beside_the_others_with_its_own_bundle(tmp_path: Path) -> None:
    from models.export import export_repository, read_config

    repo = tmp_path / "repo"
    export_repository(tiny(0, "tiny-v1"), repo, version=1, twin_threads=1)
    config = (repo / MODEL / "config.pbtxt").read_text()
    assert read_config(repo / MODEL / "config.pbtxt").version_policy.latest.num_versions == 2
    export_repository(tiny(1, "tiny-v2", reverse_vocab=True), repo, version=2, twin_threads=1)
    for root in (repo, tmp_path / "repo-twin"):
        model = root / MODEL
        assert sorted(p.name for p in model.iterdir() if p.is_dir()) == ["1", "2"]
        v1, v2 = ModelBundle.load(model, "1"), ModelBundle.load(model, "2")
        assert (v1.version, v2.version) == ("tiny-v1", "tiny-v2") and v2.vocab.items == v1.vocab.items[::-1]
        assert ModelBundle.load(model).version == "tiny-v2", "the top-level copies follow the newest version"
    assert (repo / MODEL / "config.pbtxt").read_text() == config, "adding a version keeps the shared config"
    with pytest.raises(ValueError, match="versions of one model share its interface"):
        export_repository(tiny(2, "tiny-v3", max_len=100), repo, version=3, twin_threads=1)
    assert not (repo / MODEL / "3").exists()
    (repo / MODEL / "2" / "metadata.json").unlink()  # no bundle of its own: the model dir's, if it is version 2's
    assert ModelBundle.load(repo / MODEL, "2").version == "tiny-v2"
    with pytest.raises(ValueError, match="written for version 2, not 1"):
        shutil.rmtree(repo / MODEL / "1")
        (repo / MODEL / "1").mkdir()
        ModelBundle.load(repo / MODEL, "1")


# --- The real tritonserver, explicit model control -----------------------------------------------------------


def user_states(events: list[Event], settings: Settings) -> tuple[list[str], list[UserState]]:
    by_user: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        by_user[e.user_id].append(e)
    users = sorted(by_user)
    return users, [state_from_events(by_user[u], settings.session_config()) for u in users]


def tiny_events(users: int, events: int, seed: int = 0) -> list[Event]:
    """Synthetic events whose items are in the tiny vocabulary (`item<k>`)."""
    out = synthetic_events(users, events, seed=seed, items=TINY_ITEMS - 2)
    return [msgspec.structs.replace(e, item_id=f"item{e.item_id[1:]}") for e in out]


def expected(version_dir: Path, states: list[UserState]) -> dict[str, np.ndarray]:
    """What the ONNX of one version directory computes for `states`, encoded with that version's bundle."""
    bundle = ModelBundle.load(version_dir.parent, version_dir.name)
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    x = encode_batch(states, bundle.vocab, bundle.encoder)
    return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), x), strict=True))


def assert_computed_by(records: list[InterestRecord], want: dict[str, np.ndarray], bundle: ModelBundle) -> None:
    for i, rec in enumerate(records):
        np.testing.assert_allclose(rec.interest, want["interest"][i], atol=1e-4, err_msg=rec.user_id)
        np.testing.assert_allclose([s.score for s in rec.top_items], want["top_scores"][i], atol=1e-4)
        assert (
            rec.top_items[0].id == bundle.vocab.item(int(want["top_items"][i][0]))
            or abs(want["top_scores"][i][0] - want["top_scores"][i][1]) < 1e-4
        )


@pytest.mark.triton
def test_a_new_version_loaded_into_the_running_triton_is_used_from_the_next_batch(tmp_path: Path) -> None:
    """Explicit model control: version 2 is exported beside version 1 and loaded while 1 serves; Triton answers
    with the version that computed each response; the worker's model moves from 1 to 2 at a batch boundary, and
    a batch pinned to a version that is unloaded meanwhile is redone, whole, on the version served next."""
    import tritonclient.grpc as grpcclient

    from models.export import export_repository

    repo = tmp_path / "repo"
    export_repository(tiny(0, "tiny-v1"), repo, version=1, twin_threads=1)
    twin = tmp_path / "repo-twin" / MODEL
    with LocalTriton(twin.parent, model_control="explicit", log_file=tmp_path / "triton.log") as triton:
        settings = Settings(_env_file=None, triton_url=triton.grpc_url, model_dir=twin, model_poll_s=60)
        users, states = user_states(tiny_events(12, 300), settings)
        raw = grpcclient.InferenceServerClient(triton.grpc_url)

        def served_by(version: str = "") -> str:
            x = encode_batch(states[:2], ModelBundle.load(twin, "1").vocab, EncoderConfig())
            request = []
            for name, value in x.items():
                request.append(grpcclient.InferInput(name, list(value.shape), "INT64"))
                request[-1].set_data_from_numpy(value)
            return raw.infer(MODEL, request, model_version=version).get_response().model_version

        async def scenario() -> None:
            model = InterestModel(settings)
            try:
                assert (await model.start()).version == "1"
                first = [decode_record(r) for r in await model.records(users, states)]
                assert {(r.model.version, r.model.triton_version) for r in first} == {("tiny-v1", "1")}
                assert_computed_by(first, expected(twin / "1", states), ModelBundle.load(twin, "1"))

                await asyncio.to_thread(export_repository, tiny(1, "tiny-v2", reverse_vocab=True), repo,
                                        version=2, twin_threads=1)  # fmt: skip
                assert served_by() == "1", "explicit control: a new directory changes nothing until it is loaded"
                await asyncio.to_thread(triton.load_model, MODEL)
                assert served_by() == "2" and served_by("1") == "1", "both loaded (latest 2), the newest by default"
                mid = [decode_record(r) for r in await model.records(users, states)]
                assert {r.model.triton_version for r in mid} == {"1"}, "no switch before MODEL_POLL_S passed"
                assert (await model.versions.refresh(force=True)).version == "2"  # type: ignore[union-attr]
                second = [decode_record(r) for r in await model.records(users, states)]
                assert {(r.model.version, r.model.triton_version) for r in second} == {("tiny-v2", "2")}
                assert_computed_by(second, expected(twin / "2", states), ModelBundle.load(twin, "2"))

                await asyncio.to_thread(export_repository, tiny(2, "tiny-v3"), repo, version=3, twin_threads=1)
                await asyncio.to_thread(triton.load_model, MODEL)  # latest 2: versions 2 and 3, 1 unloaded
                assert served_by() == "3"
                model.versions.current = Pinned("1", ModelBundle.load(twin, "1"), 1024)  # pinned before the load
                third = [decode_record(r) for r in await model.records(users, states)]
                assert {(r.model.version, r.model.triton_version) for r in third} == {("tiny-v3", "3")}
                assert_computed_by(third, expected(twin / "3", states), ModelBundle.load(twin, "3"))
            finally:
                await model.close()

        asyncio.run(scenario())
        log = triton.logs()
        assert "successfully unloaded 'interest_transformer' version 1" in log


# --- End to end: a worker consuming a steady stream while versions are loaded --------------------------------


def published(settings: Settings) -> list[tuple[int, int, InterestRecord]]:
    """(partition, offset, record) of the output topic, in offset order per partition."""
    return [(r.partition, r.offset, decode_record(r.value)) for r in read_topic(settings, settings.topic_output)]


def assert_one_switch_per_partition(records: list[tuple[int, int, InterestRecord]], order: list[str]) -> None:
    """In every output partition the served versions appear in `order`, each in one run (one switch point)."""
    by_partition: dict[int, list[str]] = defaultdict(list)
    for partition, _offset, rec in sorted(records, key=lambda x: (x[0], x[1])):
        runs = by_partition[partition]
        if not runs or runs[-1] != rec.model.triton_version:
            runs.append(rec.model.triton_version)
    for partition, runs in by_partition.items():
        assert runs == [v for v in order if v in runs], f"partition {partition}: versions ran {runs}"


def assert_each_record_computed_by_its_version(
    records: list[tuple[int, int, InterestRecord]], events: list[Event], settings: Settings, model_dir: Path
) -> None:
    """Every record equals what its own version's ONNX computes for the user's history at its events_seen (the
    events of a user are published in order without duplicates, so that history is a prefix)."""
    by_user: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        by_user[e.user_id].append(e)
    by_version: dict[str, list[InterestRecord]] = defaultdict(list)
    for _p, _o, rec in records:
        by_version[rec.model.triton_version].append(rec)
    for version, recs in by_version.items():
        states = [state_from_events(by_user[r.user_id][: r.events_seen], settings.session_config()) for r in recs]
        assert [s.events_seen for s in states] == [r.events_seen for r in recs]
        assert_computed_by(recs, expected(model_dir / version, states), ModelBundle.load(model_dir, version))


@pytest.mark.broker
@pytest.mark.triton
def test_versions_loaded_while_events_flow_switch_once_lose_nothing_and_a_mismatch_is_refused(
    make_settings: Callable[..., Settings], start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    """Version 2 (new weights, new vocabulary) is loaded mid-stream: every event is applied, every record names
    version 1 or 2 and equals that version's output, and each partition switches once. Then a version 3 built
    for another encoder (max_len 100) is loaded: the worker refuses it and goes on with version 2."""
    from models.export import export_repository

    repo, staging = tmp_path / "repo", tmp_path / "staging"
    export_repository(tiny(0, "tiny-v1"), repo, version=1, twin_threads=1)
    export_repository(tiny(2, "tiny-v3-short", max_len=100), staging, version=3, twin_threads=1)
    twin = tmp_path / "repo-twin" / MODEL
    events = tiny_events(30, 1_200, seed=3)
    with LocalTriton(twin.parent, model_control="explicit", log_file=tmp_path / "triton.log") as triton:
        settings = make_settings(
            tables=("user_state",), triton_url=triton.grpc_url, model_dir=twin, model_poll_s=0.5,
            worker_batch_wait_s=0.02,
        )  # fmt: skip
        worker = start_worker(settings)
        sender = threading.Thread(target=send, args=(settings, events, 80.0))
        sender.start()
        outputs = lambda: worker.metric("interest_outputs_published_total")  # noqa: E731
        wait_for(lambda: outputs() >= 50, 60, "outputs of version 1")
        export_repository(tiny(1, "tiny-v2", reverse_vocab=True), repo, version=2, twin_threads=1)
        triton.load_model(MODEL)
        wait_for(lambda: worker.metric("interest_model_version_info", version="2") == 1, 30, "the switch to 2")
        at_switch = outputs()
        wait_for(lambda: outputs() >= at_switch + 50, 60, "outputs of version 2")
        shutil.copytree(tmp_path / "staging-twin" / MODEL / "3", twin / "3")  # a wrong build, copied by hand
        triton.load_model(MODEL)  # Triton loads it (the python twin does not check dims); versions 2 and 3 served
        wait_for(lambda: worker.metric("interest_model_versions_refused_total", version="3") == 1, 30, "refusal")
        sender.join()
        wait_caught_up(settings, [worker], timeout_s=120)
        assert worker.metric("interest_model_version_info", version="2") == 1
        assert worker.metric("interest_model_version_info", version="3") == 0

    records = published(settings)
    last: dict[str, InterestRecord] = {}
    for _p, _o, rec in sorted(records, key=lambda x: (x[0], x[1])):
        last[rec.user_id] = rec
    sent = defaultdict(int)
    for e in events:
        sent[e.user_id] += 1
    assert {u: r.events_seen for u, r in last.items()} == dict(sent), "every event applied, none lost"
    versions = {(r.model.version, r.model.triton_version) for _p, _o, r in records}
    assert versions == {("tiny-v1", "1"), ("tiny-v2", "2")}, versions
    assert_one_switch_per_partition(records, ["1", "2"])
    v1_last = max(r.computed_at_ms for _p, _o, r in records if r.model.triton_version == "1")
    v2_first = min(r.computed_at_ms for _p, _o, r in records if r.model.triton_version == "2")
    assert v1_last <= v2_first, "the worker switched at one point: no version-1 record after a version-2 one"
    assert_each_record_computed_by_its_version(records, events, settings, twin)
    log = worker.log_text()
    assert "refusing interest_transformer version 3: input item_ids: INT64[-1, 200] != INT64[-1, 100];" in log
    unexpected = [line for line in worker.crash_lines() if "refusing interest_transformer version 3" not in line]
    assert not unexpected, "\n".join(unexpected)


def send(settings: Settings, events: list[Event], rate: float) -> None:
    from core.schema import encode_event
    from local.broker import run_sync
    from local.replay import publish

    run_sync(publish(settings, [(e.user_id.encode(), encode_event(e)) for e in events], rate=rate, progress=False))


@pytest.mark.broker
@pytest.mark.triton
def test_with_only_a_refused_version_served_the_worker_waits_and_publishes_nothing_wrong(
    make_settings: Callable[..., Settings], start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    """The operator replaces version 1 by a wrong build (3) alone: the worker refuses 3 and, with nothing else
    served, stalls (/health degraded, no record) instead of publishing records of a mismatching model; a good
    version 4 loaded later takes over the held events, none lost."""
    import urllib.request

    from local.process import free_port
    from models.export import export_repository

    repo, staging = tmp_path / "repo", tmp_path / "staging"
    export_repository(tiny(0, "tiny-v1"), repo, version=1, twin_threads=1)
    export_repository(tiny(2, "tiny-v3-short", max_len=100), staging, version=3, twin_threads=1)
    twin = tmp_path / "repo-twin" / MODEL
    events = tiny_events(20, 400, seed=4)
    before, during = events[:200], events[200:]

    def health() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.worker_web_port}/health", timeout=5) as r:
            return json.loads(r.read())

    with LocalTriton(twin.parent, model_control="explicit", log_file=tmp_path / "triton.log") as triton:
        settings = make_settings(
            tables=("user_state",), triton_url=triton.grpc_url, model_dir=twin, model_poll_s=0.5,
            worker_web_port=free_port(), health_stall_s=1.0,
        )  # fmt: skip
        worker = start_worker(settings)
        send(settings, before, rate=None)
        wait_caught_up(settings, [worker], timeout_s=60)
        shutil.copytree(tmp_path / "staging-twin" / MODEL / "3", twin / "3")
        shutil.rmtree(twin / "1")  # the operator removes the old version: Triton will serve 3 alone
        triton.load_model(MODEL)
        wait_for(lambda: "is refused (3)" in " ".join(health()["problems"]), 30, "/health to name the refusal")
        assert health()["status"] == "degraded"
        held = worker.metric("interest_outputs_published_total")
        read = worker.metric("interest_messages_read_total")
        send(settings, during, rate=None)

        def stalled_at_inference() -> bool:
            """What would have come with a record: a batch of the new events read by the step (events are counted
            as consumed only once their batch is done) and in flight longer than HEALTH_STALL_S (1 s), where
            inference takes milliseconds."""
            in_flight = any(p.startswith("a batch in flight") for p in health()["problems"])
            return in_flight and worker.metric("interest_messages_read_total") > read

        wait_for(stalled_at_inference, 60, "a batch of the new events to stall at inference")
        assert worker.metric("interest_outputs_published_total") == held, "no record without a usable version"
        assert worker.metric("interest_model_version_info") == 0
        export_repository(tiny(3, "tiny-v4"), repo, version=4, twin_threads=1)
        triton.load_model(MODEL)
        wait_caught_up(settings, [worker], timeout_s=60)
        wait_for(lambda: health()["status"] == "ok", 30, "/health to recover")
        assert worker.metric("interest_model_version_info", version="4") == 1

    records = published(settings)
    assert {(r.model.version, r.model.triton_version) for _p, _o, r in records} == {("tiny-v1", "1"), ("tiny-v4", "4")}
    last = {rec.user_id: rec for _p, _o, rec in sorted(records, key=lambda x: (x[0], x[1]))}
    sent: dict[str, int] = defaultdict(int)
    for e in events:
        sent[e.user_id] += 1
    assert {u: r.events_seen for u, r in last.items()} == dict(sent), "every held event applied once version 4 came"
    assert_each_record_computed_by_its_version(
        [x for x in records if x[2].model.triton_version == "4"], events, settings, twin
    )
    assert "every served version of interest_transformer is refused (3)" in worker.log_text()
