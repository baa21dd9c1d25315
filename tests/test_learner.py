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


SASL_ENV = {
    "KAFKA_BOOTSTRAP_SERVERS": "kafka-kafka-bootstrap.kafka.svc:9093",
    "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "KAFKA_SASL_USERNAME": "interest-learner",
    "KAFKA_SASL_PASSWORD": "s3cret",
    "TOPIC_EVENTS": "events-prod",
}


def invoke_learn(monkeypatch, tmp_path: Path, env: dict[str, str]) -> tuple[object, dict]:
    """`interest-stream learn` with `env`, up to the moment its consumer would start: what it was built with."""
    import aiokafka
    import prometheus_client
    from typer.testing import CliRunner

    import local.learner as learner_module
    from local.cli import app

    seen: dict = {}

    class Started(Exception):
        pass

    class Consumer:
        def __init__(self, **kwargs) -> None:
            seen.update(kwargs)

        def subscribe(self, topics, listener) -> None:
            seen["topics"] = topics

        async def start(self) -> None:
            raise Started

    class Checkpoint:
        vocab = range(12)

    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    monkeypatch.setattr(aiokafka, "AIOKafkaConsumer", Consumer)
    monkeypatch.setattr(prometheus_client, "start_http_server", lambda port: None)
    monkeypatch.setattr(learner_module, "bound_cost", lambda cfg: None)
    monkeypatch.setattr(learner_module, "resume", lambda cfg: (Checkpoint(), 1))
    monkeypatch.setattr(learner_module, "genres_of", lambda ckpt: None)
    result = CliRunner().invoke(app, ["learn", "--repo", str(tmp_path / "repo")], env=env)
    return result, seen


def test_the_trainers_consumer_carries_the_kafka_security_settings_of_the_environment(monkeypatch, tmp_path):
    """The prod overlay gives the trainer the worker's SASL_SSL variables (deploy/k8s/overlays/prod/learner.yaml):
    its consumer is built with them, in its own group, on the events topic they name."""
    import ssl

    result, seen = invoke_learn(monkeypatch, tmp_path, SASL_ENV)
    assert type(result.exception).__name__ == "Started", result.output  # it got as far as starting the consumer
    assert seen["bootstrap_servers"] == SASL_ENV["KAFKA_BOOTSTRAP_SERVERS"]
    assert seen["security_protocol"] == "SASL_SSL" and seen["sasl_mechanism"] == "SCRAM-SHA-512"
    assert seen["sasl_plain_username"] == "interest-learner" and seen["sasl_plain_password"] == "s3cret"
    assert isinstance(seen["ssl_context"], ssl.SSLContext)
    assert seen["group_id"] == LearnerConfig().group_id and seen["topics"] == ["events-prod"]


def test_the_trainer_refuses_a_misspelt_setting(monkeypatch, tmp_path):
    env = dict(SASL_ENV)
    env["KAFKA_SASL_PASWORD"] = env.pop("KAFKA_SASL_PASSWORD")
    result, seen = invoke_learn(monkeypatch, tmp_path, env)
    assert result.exit_code == 2 and not seen
    assert "KAFKA_SASL_PASWORD is not a setting (did you mean KAFKA_SASL_PASSWORD?)" in result.output


def test_a_trainer_killed_during_a_promotion_resumes_from_a_version_it_can_serve(trainer, monkeypatch):
    """The checkpoint is written before the export, each whole or not at all. Killed in the export: version 2
    does not exist and the trainer resumes from version 1 (its checkpoint, not the orphan); the next promotion
    writes version 2 over the orphan. And a newest version whose checkpoint is not the one given is refused,
    rather than resumed with another vocabulary (which would drop the items that version learned)."""
    from models import export

    ml, cfg = trainer
    cfg.tolerance = 1.0
    serving, version = resume(cfg)
    learner = Learner(cfg, serving, version)
    learner.observe(events_of(ml, range(0, 80)))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed in the export")

    with monkeypatch.context() as m:
        m.setattr(export, "export_onnx", killed)
        with pytest.raises(KeyboardInterrupt):
            learner.step()
    assert (cfg.state_dir / "v2" / "checkpoint.pt").exists() and not (cfg.repo / MODEL / "2").exists()
    again, version = resume(cfg)
    assert version == 1 and again.vocab.items == serving.vocab.items
    learner = Learner(cfg, again, version)
    learner.observe(events_of(ml, range(0, 80)))
    assert learner.step().promote and learner.version == 2
    v2 = ModelBundle.load(cfg.repo / MODEL, "2")
    assert resume(cfg)[0].vocab.items == v2.vocab.items != serving.vocab.items

    import shutil

    shutil.rmtree(cfg.state_dir / "v2")  # what the old order (export, then checkpoint) could leave
    with pytest.raises(ValueError, match="is not the checkpoint of version 2"):
        resume(cfg)
