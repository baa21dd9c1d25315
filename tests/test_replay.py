"""Producers' side and broker lifecycle against the real local broker (started once by tests/fixtures/broker.py)."""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from local.broker import BrokerError, LocalBroker, changelog_topic, ensure_topics, kafka_answers, run_sync
from local.replay import TokenBucket, load_messages, publish, replay
from local.synthetic import generate, marker_of
from local.tail import tail
from stream.settings import Settings

pytestmark = pytest.mark.broker


async def _partition_counts(settings: Settings) -> dict[str, int]:
    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
    await admin.start()
    try:
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics()}
    finally:
        await admin.close()


async def _read_all(settings: Settings, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    """Every record of `topic` from the beginning, once `expected` have arrived (or the timeout)."""
    consumer = AIOKafkaConsumer(**settings.kafka_client_kwargs(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        records: list = []
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records += batch
        return records
    finally:
        await consumer.stop()


def test_ensure_topics_creates_configured_partitions_idempotently(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(topic_partitions=6, tables=("user_state",))
    changelog = changelog_topic(settings.app_id, "user_state")
    wanted = {settings.topic_events: 6, settings.topic_dlq: 6, settings.topic_output: 6, changelog: 6}
    counts = run_sync(_partition_counts(settings))
    assert {name: counts.get(name) for name in wanted} == wanted
    assert ensure_topics(settings, tables=("user_state",)) == wanted  # again: no error, nothing changes


def test_ensure_topics_refuses_a_wrong_existing_partition_count(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(topic_partitions=3)
    with pytest.raises(BrokerError, match=r"partition count mismatch: .*has 3 \(settings want 4\)"):
        ensure_topics(settings.model_copy(update={"topic_partitions": 4}))


def test_replay_lands_every_message_in_its_key_partition(settings: Settings) -> None:
    messages = generate(300, 4_000, seed=11, malformed_share=0.02)
    # small steps: several batches of each partition in flight at once, which must still arrive in order
    result = run_sync(publish(settings, messages, progress=False, chunk=300))
    assert (result.sent, result.malformed) == (4_000, 80)

    records = run_sync(_read_all(settings, settings.topic_events, result.sent))
    assert len(records) == result.sent
    partitions = list(range(settings.topic_partitions))
    assert all(r.partition == DefaultPartitioner()(r.key, partitions, partitions) for r in records)
    assert len({r.partition for r in records}) == settings.topic_partitions  # keys spread over all partitions

    # Per key, the broker holds exactly what was sent, in order, byte for byte (malformed ones included).
    sent: dict[bytes, list[bytes]] = defaultdict(list)
    for key, value in messages.records:
        sent[key].append(value)
    got: dict[bytes, list[bytes]] = defaultdict(list)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        got[r.key].append(r.value)
    assert got == sent
    assert sum(marker_of(r.value) is not None for r in records) == 80


def test_rate_is_respected(settings: Settings) -> None:
    messages = generate(20, 600, seed=1)
    result = run_sync(publish(settings, messages, rate=1_000, progress=False))
    assert result.sent == 600
    assert result.seconds >= 0.45  # 600 at 1,000/s is 0.6 s; the bucket starts empty (one ~50 ms step of slack)
    assert result.events_per_s <= 1_400


def test_token_bucket_paces_and_caps_bursts() -> None:
    now = [0.0]
    bucket = TokenBucket(100.0, clock=lambda: now[0])
    assert bucket.delay(10) == pytest.approx(0.1)  # starts empty: 10 tokens take 0.1 s
    now[0] = 0.1
    assert bucket.delay(10) == pytest.approx(0.1)  # the debt is carried, not forgiven
    now[0] = 60.0  # idle for a minute: at most one second's burst is saved up
    assert bucket.delay(100) == 0.0
    assert bucket.delay(10) == pytest.approx(0.1)


def test_replay_movielens_subset_with_malformed(settings: Settings) -> None:
    result = replay(settings, "movielens", users=5, malformed_share=0.1, progress=False)
    records = run_sync(_read_all(settings, settings.topic_events, result.sent))
    assert len(records) == result.sent and result.malformed == round(result.sent * 0.1)
    assert len({r.key for r in records if marker_of(r.value) is None}) == 5


def test_replay_creates_a_missing_topic_with_the_configured_partitions(settings: Settings) -> None:
    topic = f"{settings.topic_events}-other"
    result = replay(settings, "synthetic", events=500, users=50, topic=topic, progress=False)
    assert result.topic == topic and result.sent == 500
    assert run_sync(_partition_counts(settings))[topic] == settings.topic_partitions  # not auto-created with 1


def test_load_messages_rejects_unknown_source() -> None:
    with pytest.raises(ValueError, match="unknown source"):
        load_messages("nope")  # type: ignore[arg-type]


def test_local_broker_starts_answers_and_stops_by_pid(tmp_path) -> None:
    broker = LocalBroker(tmp_path / "b").start()
    pid, bootstrap = broker.pid, broker.bootstrap
    assert pid is not None and run_sync(kafka_answers(bootstrap))
    with pytest.raises(BrokerError, match="already in use"):
        LocalBroker(tmp_path / "c", port=broker.port).start(timeout_s=5)
    assert broker.stop() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not run_sync(kafka_answers(bootstrap, timeout_s=0.5))
    assert "kafka" in broker.log_path.read_text()


def test_tail_shows_dlq_headers_and_values(settings: Settings) -> None:
    async def scenario() -> list[str]:
        producer = AIOKafkaProducer(**settings.kafka_client_kwargs())
        await producer.start()
        try:
            await producer.send_and_wait(
                settings.topic_dlq, b'{"user_id": "u1"', key=b"u1", headers=[("reason", b"invalid_json")]
            )
            await producer.send_and_wait(settings.topic_dlq, b'{"a": 1}', key=b"u2", headers=[("reason", b"schema")])
        finally:
            await producer.stop()
        lines: list[str] = []
        count = await tail(settings, settings.topic_dlq, from_beginning=True, max_records=2, emit=lines.append)
        assert count == 2
        return lines

    lines = asyncio.run(scenario())
    text = "\n".join(lines)
    assert "reason: invalid_json" in text and "reason: schema" in text
    assert 'b\'{"user_id": "u1"\'' in text  # broken bytes shown as-is
    assert '"a": 1' in text  # JSON pretty-printed
