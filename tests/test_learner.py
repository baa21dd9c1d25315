"""`interest-stream learn` without Kafka (issue 27, item 1): the trainer folds events, steps when an interval is
due, exports a promoted candidate as the next immutable version and says so in its metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from core.schema import Event, Forget
from local.learner import MODEL, Learner, LearnerConfig, resume
from models.data import load_movielens
from stream.inference import ModelBundle
from tests.fixtures.small_model import small_checkpoint


def events_of(ml, users: range) -> list[Event]:
    out = [
        Event(ml.users[u], item, "rating", ts, event_id=f"ml-{ml.users[u]}-{item}")
        for u in users
        for ts, item in zip(ml.states[u].ts, ml.states[u].items, strict=True)
    ]
    return sorted(out, key=lambda e: e.timestamp)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture()
def trainer(tmp_path: Path):
    from models.checkpoint import save
    from models.export import export_repository

    ml = load_movielens()
    ckpt = small_checkpoint(ml.states[:40], ml.categories)
    save(ckpt, tmp_path / "model", {"loss": [], "val_ndcg10": []})
    export_repository(ckpt, tmp_path / "repo", version=1, twin_threads=1)
    cfg = LearnerConfig(checkpoint=tmp_path / "model", repo=tmp_path / "repo", state_dir=tmp_path / "learner",
                        interval_events=3000, interval_s=0, steps=2)  # fmt: skip
    return ml, cfg


def test_a_due_interval_promotes_version_2_with_the_new_items_and_the_metrics_say_so(trainer):
    ml, cfg = trainer
    cfg.tolerance = 1.0  # any candidate that is a number: this test is about what promotion does
    serving, version = resume(cfg)
    loaded: list[int] = []
    learner = Learner(cfg, serving, version, load=loaded.append)
    exported_v1 = (cfg.repo / MODEL / "1").stat().st_mtime
    assert metric("interest_learner_last_promotion_timestamp_seconds") == exported_v1  # not 0: no false alert
    before = metric("interest_learner_promotions_total")
    events = events_of(ml, range(0, 80))
    learner.observe(events[:2000])
    assert not learner.due()
    learner.observe(events[2000:])
    assert learner.due()
    verdict = learner.step()
    assert verdict.promote and loaded == [2] and learner.version == 2 and not learner.due()
    v2 = ModelBundle.load(cfg.repo / MODEL, "2")
    new = [i for i in v2.vocab.items if i not in serving.vocab]
    assert new and v2.vocab.items[: len(serving.vocab) - 2] == serving.vocab.items  # old indices keep their items
    assert ModelBundle.load(cfg.repo.with_name("repo-twin") / MODEL, "2").metadata["bundle_sha256"]
    assert metric("interest_learner_promotions_total") == before + 1
    assert metric("interest_learner_vocabulary_size") == len(v2.vocab) - 2
    assert metric("interest_learner_served_version") == 2
    assert metric("interest_learner_last_promotion_timestamp_seconds") >= exported_v1
    again, version = resume(cfg)  # a restarted trainer goes on from its own newest version
    assert version == 2 and again.vocab.items == v2.vocab.items


def test_a_worse_candidate_is_refused_and_no_version_is_written(trainer):
    ml, cfg = trainer
    cfg.tolerance = -1.0  # the candidate would have to beat the served version by 1.0 NDCG@10: never
    serving, version = resume(cfg)
    learner = Learner(cfg, serving, version)
    refused = metric("interest_learner_candidates_refused_total", reason="worse")
    learner.observe(events_of(ml, range(0, 80)))
    verdict = learner.step()
    assert not verdict.promote and verdict.reason == "worse" and learner.version == 1
    assert not (cfg.repo / MODEL / "2").exists() and learner.serving is serving
    assert metric("interest_learner_candidates_refused_total", reason="worse") == refused + 1


def test_forget_erases_the_users_history(trainer):
    ml, cfg = trainer
    learner = Learner(cfg, *resume(cfg))
    learner.observe(events_of(ml, range(0, 3)))
    assert set(learner.histories) == set(ml.users[:3])
    learner.observe([Forget(ml.users[1], "forget", 1)])
    assert set(learner.histories) == {ml.users[0], ml.users[2]}
