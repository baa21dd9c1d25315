"""Print a topic's records as a downstream consumer sees them: key, partition, offset, headers, value.

Values that parse as JSON are pretty-printed; anything else is shown as a Python bytes literal, so a
dead-letter record's original (possibly broken) bytes are visible exactly. The consumer joins no group
and commits nothing: tailing never moves anyone's offsets.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from stream.settings import Settings


def format_record(record: Any, *, show_headers: bool) -> str:
    """One record as text: a `key partition/offset` line, headers if asked, then the value."""
    key = record.key.decode(errors="replace") if record.key is not None else "(no key)"
    lines = [f"{key}  p{record.partition}@{record.offset}"]
    if show_headers:
        for name, value in record.headers or ():
            lines.append(f"  {name}: {value.decode(errors='replace') if value is not None else None}")
    if record.value is None:
        lines.append("  (tombstone)")
    else:
        try:
            lines.append(json.dumps(msgspec.json.decode(record.value), indent=2, ensure_ascii=False))
        except (msgspec.DecodeError, UnicodeDecodeError):
            lines.append(repr(record.value[:2000]) + (" ..." if len(record.value) > 2000 else ""))
    return "\n".join(lines)


async def tail(
    settings: Settings,
    topic: str | None = None,
    *,
    from_beginning: bool = False,
    max_records: int | None = None,
    idle_timeout_s: float | None = None,
    emit: Callable[[str], None] = print,
) -> int:
    """Print records of `topic` (default: the events topic) until `max_records` or `idle_timeout_s` of
    silence; without either it follows forever. Headers are shown for `-dlq` topics. Returns the count."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    topic = topic or settings.topic_events
    consumer = AIOKafkaConsumer(
        **settings.kafka_client_kwargs(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
    )
    await consumer.start()
    count = 0
    try:
        # All-topics metadata: naming the topic in a request could auto-create it on some brokers.
        partitions = consumer.partitions_for_topic(topic) if topic in await consumer.topics() else None
        if not partitions:
            raise ValueError(f"topic {topic!r} does not exist on {settings.kafka_bootstrap_servers}")
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        if from_beginning:
            await consumer.seek_to_beginning(*assigned)
        else:
            await consumer.seek_to_end(*assigned)
        show_headers = topic.endswith("-dlq")
        timeout_ms = int(idle_timeout_s * 1000) if idle_timeout_s is not None else 1000
        while max_records is None or count < max_records:
            batch = await consumer.getmany(timeout_ms=timeout_ms, max_records=500)
            if not batch:
                if idle_timeout_s is not None:
                    break
                continue
            for tp in sorted(batch, key=lambda tp: tp.partition):
                for record in batch[tp]:
                    if max_records is not None and count >= max_records:
                        break
                    emit(format_record(record, show_headers=show_headers))
                    count += 1
    finally:
        await consumer.stop()
    return count
