"""The gap check in front of the batch step (stream/continuity.py), on a fake broker."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from stream.continuity import Continuity, Refetched


@dataclass
class FakeBroker:
    """Partition -> offsets that hold a record; `committed_at` per partition; every read recorded."""

    records: dict[int, list[int]]
    committed_at: dict[int, int] = field(default_factory=dict)
    reads: list[tuple[int, int, int]] = field(default_factory=list)

    async def committed(self, partition: int) -> int:
        return self.committed_at.get(partition, 0)

    async def read(self, partition: int, start: int, end: int) -> list[Any]:
        self.reads.append((partition, start, end))
        return [record(partition, o) for o in self.records[partition] if start <= o < end]


def record(partition: int, offset: int) -> Any:
    return SimpleNamespace(
        partition=partition, offset=offset, timestamp=0, timestamp_type=0, headers=[], key=b"k", value=b"v"
    )


def event(partition: int, offset: int, generation: int = 1) -> Any:
    return SimpleNamespace(message=SimpleNamespace(partition=partition, offset=offset, generation_id=generation))


def where(events: list[Any]) -> list[tuple[int, int, bool]]:
    return [(e.message.partition, e.message.offset, isinstance(e, Refetched)) for e in events]


def test_a_batch_without_gaps_passes_as_it_is_and_reads_nothing() -> None:
    broker = FakeBroker({0: list(range(10)), 1: list(range(10))}, committed_at={1: 4})
    check = Continuity(broker, "events", lambda: 1)
    batch = [event(0, 0), event(1, 4), event(0, 1), event(1, 5)]
    events, filled = asyncio.run(check.fill(batch))
    assert events == batch and filled == [] and broker.reads == []


def test_skipped_offsets_are_read_from_the_broker_and_put_in_their_place() -> None:
    broker = FakeBroker({0: list(range(10))}, committed_at={0: 2})
    check = Continuity(broker, "events", lambda: 1)
    events, filled = asyncio.run(check.fill([event(0, 2), event(0, 5), event(0, 6)]))
    assert where(events) == [(0, 2, False), (0, 3, True), (0, 4, True), (0, 5, False), (0, 6, False)]
    assert [f.message.offset for f in filled] == [3, 4] and broker.reads == [(0, 3, 5)]
    assert filled[0].message.topic == "events" and filled[0].message.tp.partition == 0
    assert filled[0].message.generation_id == 1, "the generation of the batch it fills (the fence compares it)"
    events, _ = asyncio.run(check.fill([event(0, 9)]))  # across batches too
    assert where(events) == [(0, 7, True), (0, 8, True), (0, 9, False)]


def test_a_gap_at_the_start_of_a_generation_is_filled_from_the_committed_offset() -> None:
    """The post-restore case of issue 25: the first events handed over are past the committed offset."""
    broker = FakeBroker({3: list(range(20))})  # nothing committed: the log starts at 0
    generation = {"id": 1}
    check = Continuity(broker, "events", lambda: generation["id"])
    events, _ = asyncio.run(check.fill([event(3, 4)]))
    assert [e.message.offset for e in events] == [0, 1, 2, 3, 4]
    generation["id"] = 2  # a rebalance: the consumer starts again at the committed offset
    broker.committed_at[3] = 5
    events, filled = asyncio.run(check.fill([event(3, 5), event(3, 6)]))
    assert filled == [] and [e.message.offset for e in events] == [5, 6]


def test_offsets_without_records_are_passed_and_repeats_are_left_to_the_replay_check() -> None:
    broker = FakeBroker({0: [0, 1, 5, 6]})  # 2-4: transaction markers
    check = Continuity(broker, "events", lambda: 1)
    events, filled = asyncio.run(check.fill([event(0, 0), event(0, 1), event(0, 5), event(0, 1), event(0, 6)]))
    assert filled == [] and [e.message.offset for e in events] == [0, 1, 5, 1, 6]
    assert broker.reads == [(0, 2, 5)]
