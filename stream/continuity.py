"""Each events partition reaches the batch step without a gap: the replay witness's assumption, checked.

A user's state remembers the highest input offset it folded (`UserState.input_offset`) and takes every offset at or
below it for one it already folded (a replay). That is sound only if the step sees each partition's offsets from
where the group committed, without leaving one out: were an event skipped and a later one folded, the skipped one
would pass for a replay when read again, and be lost. Faust drops fetched messages at a rebalance and relies on a
seek to read them again (stream/consumer.py fixes the case where that seek did not happen); anything else that
ever skips a message (a driver bug, a future version) must not cost an event either.

So, per partition, the step's next offset is kept, starting at each new consumer generation from the group's
committed offset. When a batch would jump past it, the records in between are read from the broker and put in
their place, in offset order, before the batch is folded; offsets that hold no record (transaction markers,
compaction) are simply passed. The records read so are acknowledged to Faust once their batch is done, so its
commit covers them (Faust never saw them). `interest_input_gaps_total` counts the gaps, alert `InterestInputGap`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from faust.types import TP, Message

from stream import metrics

log = logging.getLogger(__name__)


class PartitionReader(Protocol):
    """The broker, as the check needs it (`BrokerReader`, or a fake in unit tests)."""

    async def committed(self, partition: int) -> int: ...

    async def read(self, partition: int, start: int, end: int) -> Sequence[Any]: ...


@dataclass(frozen=True)
class Refetched:
    """A record read from the broker to fill a gap, shaped like the Faust event the step expects."""

    message: Message


class Continuity:
    """Fills the gaps of one input topic's partitions (see the module docstring)."""

    def __init__(self, reader: PartitionReader, topic: str, generation: Callable[[], int]) -> None:
        self.reader, self.topic, self.generation = reader, topic, generation
        self.next: dict[int, int] = {}  # partition -> the offset the step must see next
        self._generation: int | None = None

    async def fill(self, batch: Sequence[Any]) -> tuple[list[Any], list[Refetched]]:
        """The batch with every gap filled (in offset order per partition), and the records read to fill them."""
        if (generation := self.generation()) != self._generation:
            self.next.clear()  # a rebalance: the consumer starts again from the committed offsets
            self._generation = generation
        events: list[Any] = []
        filled: list[Refetched] = []
        for ev in batch:
            partition, offset = ev.message.partition, ev.message.offset
            if partition not in self.next:
                self.next[partition] = await self.reader.committed(partition)
            expected = self.next[partition]
            if offset > expected:
                records = [r for r in await self.reader.read(partition, expected, offset) if r.offset < offset]
                if records:
                    log.warning("partition %d: offsets %d-%d never reached the worker; %d records read from the "
                                "broker in their place", partition, expected, offset - 1, len(records))  # fmt: skip
                    metrics.INPUT_GAPS.inc()
                    generation = getattr(ev.message, "generation_id", None)  # the fence compares it (fencing.py)
                    gap = [Refetched(_message(self.topic, r, generation)) for r in records]
                    events += gap
                    filled += gap
            events.append(ev)
            self.next[partition] = max(expected, offset + 1)
        return events, filled


def _message(topic: str, record: Any, generation: int | None) -> Message:
    return Message(
        topic,
        record.partition,
        record.offset,
        record.timestamp / 1000,
        record.timestamp_type,
        record.headers,
        record.key,
        record.value,
        None,
        tp=TP(topic, record.partition),
        generation_id=generation,
    )


class BrokerReader:
    """Committed offsets and record ranges of the input topic, read with a consumer of its own that never joins
    the group (it only asks for the group's committed offsets)."""

    def __init__(self, kafka_kwargs: dict[str, Any], group: str, topic: str) -> None:
        self.kafka_kwargs, self.group, self.topic = kafka_kwargs, group, topic
        self._consumer: Any = None

    async def _client(self) -> Any:
        if self._consumer is None:
            from aiokafka import AIOKafkaConsumer

            consumer = AIOKafkaConsumer(
                **self.kafka_kwargs, group_id=self.group, enable_auto_commit=False, auto_offset_reset="earliest"
            )
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def committed(self, partition: int) -> int:
        """The group's committed offset; the log start when it committed nothing (auto_offset_reset=earliest)."""
        from aiokafka import TopicPartition

        consumer, tp = await self._client(), TopicPartition(self.topic, partition)
        offset = await consumer.committed(tp)
        if offset is None or offset < 0:
            offset = (await consumer.beginning_offsets([tp]))[tp]
        return offset

    async def read(self, partition: int, start: int, end: int, timeout_s: float = 30.0) -> list[Any]:
        """The records with offsets in [start, end). A record at `end` exists (the event that showed the gap),
        so the position reaches `end`; TimeoutError if the broker does not deliver (the batch is retried)."""
        import time

        from aiokafka import TopicPartition

        consumer, tp = await self._client(), TopicPartition(self.topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        deadline, records = time.monotonic() + timeout_s, []
        while await consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"reading {self.topic}[{partition}] offsets {start}-{end - 1} took over {timeout_s} s"
                )
            records += (await consumer.getmany(tp, timeout_ms=200, max_records=1000)).get(tp, [])
        return [r for r in records if start <= r.offset < end]

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
