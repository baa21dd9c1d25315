"""Stream/batch parity and no lost updates: real broker, real RocksDB, real Triton (issue 4).

The model is the real `InterestTransformer` code at a tiny size with the MovieLens vocabulary and genres, so the
items of the replayed ratings are real vocabulary entries. "Offline" means: the same events sessionized by
`state_from_events`, encoded by `encode_batch` and run through the exported `model.onnx` in-process with
onnxruntime. The worker's last published record of every user must equal that within 1e-4.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.schema import Event, decode_record
from core.sessions import state_from_events
from local.broker import LocalBroker, ensure_topics
from local.replay import replay
from local.triton import LocalTriton
from models.datasets import by_user, movielens_events
from stream.settings import Settings
from tests.fixtures.worker import READY_LINE, Worker, read_topic, state_of, wait_caught_up, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.triton]
TABLES = ("user_state",)  # the one user table (stream/tables.py)


@pytest.fixture(scope="module")
def ml_triton(ml_export: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    with LocalTriton(ml_export.twin, log_file=tmp_path_factory.mktemp("ml-triton") / "triton.log") as server:
        yield server


def pipeline_settings(make: Callable[..., Settings], export: Any, triton_url: str, **overrides: Any) -> Settings:
    return make(
        tables=TABLES,
        triton_url=triton_url,
        model_dir=export.twin / "interest_transformer",
        **overrides,
    )


def assert_parity(settings: Settings, export: Any, events: list[Event]) -> dict[str, list[int]]:
    """Last record per user == offline model output, counts included (also after a crash: replays are
    recognised by their input offset); per-user seq never goes back and skips none."""
    import onnxruntime as ort

    from core.encoding import encode_batch, explain_sessions
    from stream.inference import EXPLAINED_SESSIONS, ModelBundle

    records = read_topic(settings, settings.topic_output)
    seqs: dict[str, list[int]] = {}
    last: dict[str, Any] = {}
    for r in records:  # offsets are in order within a partition, and a user lives in one partition
        rec = decode_record(r.value)
        assert r.key == rec.user_id.encode()
        seqs.setdefault(rec.user_id, []).append(rec.seq)
        last[rec.user_id] = rec
    histories = dict(by_user(events))
    missing, extra = sorted(set(histories) - set(last)), sorted(set(last) - set(histories))
    assert not missing and not extra, f"users without a published interest: {missing}; unexpected: {extra}"
    for user, seq in seqs.items():
        steps = np.diff([0, *seq])
        assert set(steps.tolist()) <= {0, 1}, f"user {user}: seq {seq} goes back or skips"

    bundle = ModelBundle.load(export.twin / "interest_transformer")
    users = sorted(histories)
    states = [state_from_events(histories[u], settings.session_config()) for u in users]
    session = ort.InferenceSession(str(export.onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    want = dict(zip(names, session.run(names, encode_batch(states, bundle.vocab, bundle.encoder)), strict=True))
    for i, user in enumerate(users):
        rec, state = last[user], states[i]
        assert rec.last_event_ms == state.ts[-1] and rec.sessions == len(state.starts)
        counts, want_counts = (rec.events_seen, rec.sessions_seen), (state.events_seen, state.sessions_seen)
        assert counts == want_counts, f"user {user}: (events_seen, sessions_seen) {counts}, offline {want_counts}"
        np.testing.assert_allclose(rec.interest, want["interest"][i], atol=1e-4, err_msg=f"user {user}")
        got_scores = np.array([s.score for s in rec.top_items])
        np.testing.assert_allclose(got_scores, want["top_scores"][i], atol=1e-4, err_msg=f"user {user}")
        ref_ids = [bundle.vocab.item(ix) for ix in want["top_items"][i]]
        for k, (got, ref) in enumerate(zip([s.id for s in rec.top_items], ref_ids, strict=True)):
            neighbours = want["top_scores"][i][max(0, k - 1) : k + 2]
            if np.min(np.abs(np.delete(neighbours, min(k, 1)) - want["top_scores"][i][k]), initial=1.0) > 1e-4:
                assert got == ref, f"user {user}: top item {k} is {got}, offline {ref}"
        cats = dict((s.id, s.score) for s in rec.top_categories)
        ref_cats = dict(zip(bundle.categories, want["category_scores"][i].tolist(), strict=True))
        assert all(abs(cats[c] - ref_cats[c]) < 1e-4 for c in cats)
        assert min(cats.values()) >= sorted(ref_cats.values())[-len(cats)] - 1e-4, "top categories are the best"
        explained = explain_sessions(state, want["event_weights"][i], bundle.encoder, EXPLAINED_SESSIONS)
        assert [(e.session_start_ms, e.session_end_ms, e.events) for e in rec.explanation] == [
            x[:3] for x in explained
        ], f"user {user}: explanation"
        np.testing.assert_allclose([e.weight for e in rec.explanation], [x[3] for x in explained], atol=1e-3)
    return seqs


def test_movielens_replay_matches_offline_model(
    make_settings: Callable[..., Settings], start_worker: Callable[..., Worker], ml_export: Any, ml_triton: LocalTriton
) -> None:
    settings = pipeline_settings(make_settings, ml_export, ml_triton.grpc_url)
    worker = start_worker(settings)
    result = replay(settings, "movielens", progress=False)
    assert result.sent == 100_836
    wait_caught_up(settings, [worker], timeout_s=600)
    seqs = assert_parity(settings, ml_export, movielens_events())
    assert worker.metric("interest_outputs_published_total") == sum(len(s) for s in seqs.values())
    assert not worker.crash_lines()


def test_triton_outage_mid_replay_loses_nothing(
    make_settings: Callable[..., Settings],
    start_worker: Callable[..., Worker],
    ml_export: Any,
    tmp_path: Path,
) -> None:
    """Triton stops for ~20 s while events flow; the worker waits (no crash), then catches up with parity."""
    events = [e for e in movielens_events() if int(e.user_id) <= 120]
    with LocalTriton(ml_export.twin, log_file=tmp_path / "triton1.log") as triton:
        grpc_port = int(triton.grpc_url.rsplit(":", 1)[1])
        settings = pipeline_settings(make_settings, ml_export, triton.grpc_url, triton_circuit_failures=3)
        worker = start_worker(settings)
        sender = threading.Thread(target=replay_events, args=(settings, events, 2_000.0))
        sender.start()
        wait_for(lambda: worker.metric("interest_outputs_published_total") > 0, 60, "first outputs")
    # Triton is down now (SIGTERM), mid-replay.
    down_at = time.monotonic()
    wait_for(lambda: worker.metric("interest_triton_circuit_open") == 1, 30, "the circuit to open")
    time.sleep(max(0.0, 20 - (time.monotonic() - down_at)))
    worker.check_alive()
    published_while_down = worker.metric("interest_outputs_published_total")
    with LocalTriton(ml_export.twin, grpc_port=grpc_port, log_file=tmp_path / "triton2.log"):
        sender.join()
        wait_caught_up(settings, [worker], timeout_s=300)
        assert worker.metric("interest_outputs_published_total") > published_while_down
        assert worker.metric("interest_triton_circuit_open") == 0
    assert worker.metric("interest_triton_errors_total", code="UNAVAILABLE") > 0
    assert_parity(settings, ml_export, events)
    assert not worker.crash_lines()


def replay_events(settings: Settings, events: list[Event], rate: float | None) -> None:
    from core.schema import encode_event
    from local.broker import run_sync
    from local.replay import publish

    run_sync(publish(settings, [(e.user_id.encode(), encode_event(e)) for e in events], rate=rate, progress=False))


def assert_one_content_per_seq(settings: Settings) -> dict[tuple[str, int], int]:
    """Every record published twice for a `(user, seq)` (a replay after a crash) has identical bytes."""
    first: dict[tuple[str, int], bytes] = {}
    copies: dict[tuple[str, int], int] = {}
    for r in read_topic(settings, settings.topic_output):
        if r.value is None:  # a forgotten user's tombstone (docs/output.md)
            continue
        rec = decode_record(r.value)
        where = (rec.user_id, rec.seq)
        if first.setdefault(where, r.value) != r.value:
            raise AssertionError(f"{where} was published with two contents:\n{first[where]!r}\n{r.value!r}")
        copies[where] = copies.get(where, 0) + 1
    return copies


class KillRig:
    """A private broker for kill tests: noida-db never evicts a SIGKILLed group member, so (as an operator would
    restart a wedged broker) the broker is stopped cleanly after each kill and started on the same dir and port."""

    def __init__(self, root: Path, triton: LocalTriton, export: Any, **overrides: Any) -> None:
        self.root = root
        self.broker = LocalBroker(root / "broker").start()
        self.settings = Settings(
            kafka_bootstrap_servers=self.broker.bootstrap,
            app_id="kill-test",
            state_dir=root / "state",
            triton_url=triton.grpc_url,
            model_dir=export.twin / "interest_transformer",
            worker_web_port=0,
            _env_file=None,
            **overrides,
        )
        ensure_topics(self.settings, tables=TABLES)

    def restart_broker(self) -> None:
        port = self.broker.port
        self.broker.stop()
        self.broker = LocalBroker(self.root / "broker", port=port).start()

    def crash(self, start_worker: Callable[..., Worker], name: str, point: str, after: int) -> bool:
        """Run a worker that SIGKILLs itself at `point` after `after` outputs; False when it caught up first."""
        env = {"FAULT_KILL_AT": point, "FAULT_KILL_AFTER_OUTPUTS": str(after)}
        faulty = start_worker(self.settings, name=name, env=env, ready_timeout_s=None)  # it may die at once

        def dead_or_done() -> bool:
            if not faulty.alive:
                return True
            return READY_LINE in faulty.log_text() and caught_up(self.settings)

        wait_for(dead_or_done, 120, f"{name}: the injected SIGKILL or the end of the input")
        if faulty.alive:
            faulty.stop()
            return False
        faulty.killed = True
        assert "fault injection: SIGKILL" in faulty.log_text()
        self.restart_broker()
        return True


def caught_up(settings: Settings) -> bool:
    from local.broker import run_sync
    from tests.fixtures.worker import _offsets

    ends, committed = run_sync(_offsets(settings, settings.topic_events, settings.app_id))
    return all(committed.get(p, 0) >= end for p, end in ends.items())


def test_a_record_republished_after_a_crash_is_the_same_record(
    start_worker: Callable[..., Worker], ml_export: Any, ml_triton: LocalTriton, tmp_path: Path
) -> None:
    """The issue's repro: SIGKILL after publishing seq 1 and before the input offset is committed; 5 more events
    arrive while the worker is down. The restarted worker must publish seq 1 again with the same content, then
    seq 2 with all 6 events, and dead-letter nothing."""
    events = sorted((e for e in movielens_events() if e.user_id == "1"), key=lambda e: e.timestamp)[:6]
    rig = KillRig(tmp_path, ml_triton, ml_export)
    try:
        replay_events(rig.settings, events[:1], rate=None)
        assert rig.crash(start_worker, "faulty", "after_publish", 1), "the worker was killed after its publish"
        replay_events(rig.settings, events[1:], rate=None)
        worker = start_worker(rig.settings, name="restarted")
        wait_caught_up(rig.settings, [worker], timeout_s=120)
        copies = assert_one_content_per_seq(rig.settings)
        records = [decode_record(r.value) for r in read_topic(rig.settings, rig.settings.topic_output)]
        assert [r.seq for r in records] == [1, 1, 2] and copies == {("1", 1): 2, ("1", 2): 1}
        assert [r.events_seen for r in records] == [1, 1, 6]
        assert read_topic(rig.settings, rig.settings.topic_dlq) == []
        assert worker.metric("interest_events_replayed_total") == 1
        worker.stop()
    finally:
        rig.broker.stop()


def test_a_kill_between_the_changelog_ack_and_rocksdb_then_a_new_pod_loses_nothing(
    start_worker: Callable[..., Worker], ml_export: Any, ml_triton: LocalTriton, tmp_path: Path
) -> None:
    """Issue 25's repro, on the new write order: SIGKILL once the changelog acknowledged seq 1 and before RocksDB
    (and the output) got it; the state directory is deleted (a new pod); 5 more events. The restored worker holds
    seq 1 from the changelog alone, publishes it (its first publication), then seq 2 with all 6 events."""
    events = sorted((e for e in movielens_events() if e.user_id == "1"), key=lambda e: e.timestamp)[:6]
    rig = KillRig(tmp_path, ml_triton, ml_export)
    try:
        replay_events(rig.settings, events[:1], rate=None)
        assert rig.crash(start_worker, "faulty", "after_changelog", 0), "killed between the changelog ack and RocksDB"
        assert read_topic(rig.settings, rig.settings.topic_output) == [], "killed before any publish"
        shutil.rmtree(rig.settings.state_dir)
        replay_events(rig.settings, events[1:], rate=None)
        worker = start_worker(rig.settings, name="new-pod")
        wait_caught_up(rig.settings, [worker], timeout_s=120)
        assert_one_content_per_seq(rig.settings)
        records = [decode_record(r.value) for r in read_topic(rig.settings, rig.settings.topic_output)]
        assert [(r.seq, r.events_seen) for r in records] == [(1, 1), (2, 6)], "no event lost, no seq reused"
        assert read_topic(rig.settings, rig.settings.topic_dlq) == []
        worker.stop()
    finally:
        rig.broker.stop()


@pytest.mark.parametrize("keep_state", [True, False], ids=["state-dir-kept", "state-dir-lost"])
def test_a_crash_loop_loses_nothing_and_publishes_one_content_per_seq(
    keep_state: bool, start_worker: Callable[..., Worker], ml_export: Any, ml_triton: LocalTriton, tmp_path: Path
) -> None:
    """Events arrive in four chunks; after each, a worker is SIGKILLed at a random stage of the write path after a
    random number of outputs (seeded); with `state-dir-lost` its state directory is deleted before the next start
    (a rescheduled pod restores from the changelog alone). Then a clean worker catches up: every user's last
    record equals the offline model with exact counts, every repeated `(user, seq)` has one content, no seq is
    skipped, a record is republished at most once per restart, and no valid event was dead-lettered."""
    import random

    rng = random.Random(11 if keep_state else 12)
    events = [e for e in movielens_events() if int(e.user_id) <= 60]
    by_time = sorted(events, key=lambda e: e.timestamp)
    chunks = [by_time[i * len(by_time) // 4 : (i + 1) * len(by_time) // 4] for i in range(4)]  # no event late
    rig = KillRig(tmp_path, ml_triton, ml_export, worker_batch_max=50, state_max_events=50)
    try:
        kills = 0
        for i, chunk in enumerate(chunks):
            replay_events(rig.settings, chunk, rate=None)
            point = rng.choice(("after_changelog", "before_publish", "after_publish"))
            kills += rig.crash(start_worker, f"faulty{i}", point, rng.randint(1, 10))
            if not keep_state:
                shutil.rmtree(rig.settings.state_dir, ignore_errors=True)
        assert kills >= 3
        worker = start_worker(rig.settings, name="clean")
        wait_caught_up(rig.settings, [worker], timeout_s=300)
        assert_parity(rig.settings, ml_export, events)  # also: no user's seq goes back or skips
        copies = assert_one_content_per_seq(rig.settings)
        assert max(copies.values()) <= len(chunks) + 1, "published once, then at most once more per worker started"
        assert read_topic(rig.settings, rig.settings.topic_dlq) == []
        worker.stop()
    finally:
        rig.broker.stop()


def test_a_triton_hang_longer_than_the_poll_interval_degrades_health_and_regresses_nothing(
    make_settings: Callable[..., Settings], start_worker: Callable[..., Worker], ml_export: Any, tmp_path: Path
) -> None:
    """Triton freezes (SIGSTOP: connections accepted, no answers) for 15 s, three times WORKER_MAX_POLL_INTERVAL_S,
    while events flow. `/health` must say "degraded" within 5 s of the first event that waits: here, that it says
    so because the batch has been in flight past HEALTH_STALL_S (3 s, the stall check of
    tests/test_batch_step.py), not how many seconds that took on this box (printed, not bounded). The worker must
    not write a state it no longer owns (per key, the changelog's `events_seen` never goes back), and after Triton
    resumes every user is exact again."""
    import json
    import signal
    import urllib.request

    from local.process import free_port
    from tests.fixtures.worker import read_changelog

    def health() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.worker_web_port}/health", timeout=5) as r:
            return json.loads(r.read())

    events = [e for e in movielens_events() if int(e.user_id) <= 40]
    by_time = sorted(events, key=lambda e: e.timestamp)
    before, during = by_time[: len(by_time) // 2], by_time[len(by_time) // 2 :]
    with LocalTriton(ml_export.twin, log_file=tmp_path / "triton.log") as triton:
        settings = pipeline_settings(
            make_settings, ml_export, triton.grpc_url, worker_web_port=free_port(), worker_max_poll_interval_s=5.0
        )
        worker = start_worker(settings)
        replay_events(settings, before, rate=None)
        wait_caught_up(settings, [worker], timeout_s=120)
        assert health()["status"] == "ok"
        assert triton.pid is not None
        os.kill(triton.pid, signal.SIGSTOP)
        try:
            replay_events(settings, during[:1], rate=None)
            sent_at = time.monotonic()
            first = wait_for(lambda: (h := health())["status"] == "degraded" and h, 60, "degraded", interval_s=0.1)
            degraded_after_s = time.monotonic() - sent_at
            replay_events(settings, during[1:], rate=None)
            time.sleep(max(0.0, 15 - (time.monotonic() - sent_at)))
            worker.check_alive()
            assert health()["status"] == "degraded"
        finally:
            os.kill(triton.pid, signal.SIGCONT)
        wait_caught_up(settings, [worker], timeout_s=300)
        wait_for(lambda: health()["status"] == "ok", 30, "/health to recover")
        print(f"degraded {degraded_after_s:.2f} s after the first waiting event: {first}")
        assert settings.health_stall_s < 5 and any(p.startswith("a batch in flight for ") for p in first["problems"])
        assert first["oldest_batch_s"] >= settings.health_stall_s, "the stall check, not a failure, said degraded"
        assert_parity(settings, ml_export, events)
        seen: dict[bytes, int] = {}
        for _partition, _offset, key, value in read_changelog(settings).records:
            assert value is not None
            now = state_of(value).events_seen
            assert now >= seen.get(key, 0), f"user {key!r}: the changelog went back from {seen[key]} to {now}"
            seen[key] = now
        assert worker.metric("interest_worker_degraded") == 0
        assert not [line for line in worker.crash_lines() if "Traceback" in line or "[CRITICAL]" in line]
