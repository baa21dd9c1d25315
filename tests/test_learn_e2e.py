"""End to end through the real broker, tritonserver and a worker (issue 27, item 4): items unknown to version 1
appear in the stream, the trainer (`local.learner.run`, its own consumer group) promotes version 2 and loads it,
the worker moves to it, and its records start naming those items; no event is lost and every record names, and
equals the output of, the version that computed it."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from core.schema import Event
from local.learner import MODEL, LearnerConfig, run
from local.triton import LocalTriton
from models.data import load_movielens
from stream.inference import ModelBundle
from stream.settings import Settings
from tests.fixtures.small_model import small_checkpoint
from tests.fixtures.worker import Worker, wait_caught_up, wait_for
from tests.test_model_swap import (
    assert_each_record_computed_by_its_version,
    assert_one_switch_per_partition,
    published,
    send,
)


def movielens_events(ml, users: range, per_user: int) -> list[Event]:
    """The first `per_user` ratings of each user, in time order (a user's events in order, no duplicates)."""
    out = [
        Event(ml.users[u], item, "rating", ts, event_id=f"ml-{ml.users[u]}-{item}")
        for u in users
        for ts, item in list(zip(ml.states[u].ts, ml.states[u].items, strict=True))[:per_user]
    ]
    return sorted(out, key=lambda e: (e.timestamp, e.user_id))


@pytest.mark.broker
@pytest.mark.triton
@pytest.mark.slow  # a learning step, an ONNX export and a Triton load while a worker serves: about a minute
def test_the_trainer_promotes_new_items_and_the_worker_starts_naming_them(
    make_settings: Callable[..., Settings], start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    from models.checkpoint import save
    from models.export import export_repository

    ml = load_movielens()
    v1 = small_checkpoint(ml.states[:20], ml.categories)  # version 1 knows the items of 20 users
    v1.metadata["model_version"] = "small-v1"
    save(v1, tmp_path / "model", {"loss": [], "val_ndcg10": []})
    repo = tmp_path / "repo"
    export_repository(v1, repo, version=1, twin_threads=1)
    twin = tmp_path / "repo-twin" / MODEL
    events = movielens_events(ml, range(40), per_user=60)
    new_items = {e.item_id for e in events} - set(v1.vocab.items)
    first, rest = events[: len(events) * 6 // 10], events[len(events) * 6 // 10 :]
    assert new_items & {e.item_id for e in first} and new_items & {e.item_id for e in rest}
    stop, learned = threading.Event(), []
    with LocalTriton(twin.parent, model_control="explicit", log_file=tmp_path / "triton.log") as triton:
        settings = make_settings(
            tables=("user_state",), triton_url=triton.grpc_url, model_dir=twin, model_poll_s=0.5,
            worker_batch_wait_s=0.02,
        )  # fmt: skip
        cfg = LearnerConfig(checkpoint=tmp_path / "model", repo=repo, state_dir=tmp_path / "learner",
                            interval_events=len(first), interval_s=0, steps=2, tolerance=1.0, threads=0, nice=0,
                            group_id=f"{settings.app_id}-learner", triton_http=triton.http_url)  # fmt: skip
        trainer = threading.Thread(target=lambda: learned.append(asyncio.run(run(settings, cfg, stop))))
        worker = start_worker(settings)
        trainer.start()
        try:
            send(settings, first, rate=None)
            wait_for(lambda: worker.metric("interest_model_version_info", version="2") == 1, 180, "the switch to 2")
            send(settings, rest, rate=None)
            wait_caught_up(settings, [worker], timeout_s=180)
        finally:
            stop.set()
            trainer.join(60)
    assert learned and learned[0].version == 2, "the trainer promoted exactly one version"
    v2 = ModelBundle.load(twin, "2")
    ts = sorted(e.timestamp for e in first)  # the interval; its newest share is held out (fusion, validation)
    seen_before_holdout = {e.item_id for e in first if e.timestamp < ts[int(len(ts) * (1 - cfg.holdout))]}
    learned_new = set(v2.vocab.items) - set(v1.vocab.items)
    assert learned_new <= new_items & seen_before_holdout  # nothing from the held-out slice or elsewhere
    assert len(learned_new) >= 0.9 * len(new_items & seen_before_holdout)  # (the fold keeps 20 sessions a user)
    records = published(settings)
    last = {}
    for _p, _o, rec in sorted(records, key=lambda x: (x[0], x[1])):
        last[rec.user_id] = rec
    sent: dict[str, int] = defaultdict(int)
    for e in events:
        sent[e.user_id] += 1
    assert {u: r.events_seen for u, r in last.items()} == dict(sent), "every event applied, none lost"
    versions = {(r.model.version, r.model.triton_version) for _p, _o, r in records}
    assert versions == {("small-v1", "1"), ("learned-v2", "2")}, versions
    assert_one_switch_per_partition(records, ["1", "2"])
    assert_each_record_computed_by_its_version(records, events, settings, twin)
    named = {i.id for _p, _o, r in records if r.model.triton_version == "2" for i in r.top_items}
    assert named & new_items, "version 2's records name items version 1 never knew"
    assert not {i.id for _p, _o, r in records if r.model.triton_version == "1" for i in r.top_items} & new_items
