"""Overlapping batches (stream/overlap.py) on the fakes of test_batch_step: the next batch is folded while one
waits for inference, and whatever the interleaving, failures and forgets, the outcome is the serial step's: the
same table, the same records per user in the same order, each bad message dead-lettered once, every batch
acknowledged once, in order, after its writes."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from unittest.mock import AsyncMock

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from core.sessions import UserState, decode_state
from stream.fencing import Fenced
from stream.overlap import Overlap
from stream.step import BatchStep
from tests.test_batch_step import WRITES, FakeEvent, FakeModel, Message, forget, make_step, message


class GatedModel(FakeModel):
    """Inference that yields to the loop `turns` times (so other batches get folded meanwhile), and whose first
    call waits for `gate` when one is given."""

    def __init__(self, turns: int = 3, gate: asyncio.Event | None = None, fail_calls: frozenset[int] = frozenset()):
        super().__init__()
        self.turns, self.gate, self.fail_calls, self.n = turns, gate, fail_calls, 0

    async def records(self, users: list[str], states: list[UserState]) -> list[bytes]:
        self.n += 1
        if self.gate is not None and self.n == 1:
            await self.gate.wait()
        for _ in range(self.turns):
            await asyncio.sleep(0)
        if self.n in self.fail_calls:
            self.calls.append(users)
            from stream.inference import TritonUnavailable

            raise TritonUnavailable("UNAVAILABLE: Triton down")
        return await super().records(users, states)


def acker(log: list[int], index: int) -> Any:
    async def acknowledge() -> None:
        log.append(index)

    return acknowledge


def test_the_next_batch_is_folded_while_one_waits_for_inference_and_writes_stay_in_order() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        model = GatedModel(turns=0, gate=gate)
        step, tables, _, output = make_step(model)
        overlap, acks = Overlap(step, depth=2), []
        WRITES.clear()
        await overlap.submit([message("a", 1, 0), message("b", 1, 1)], acker(acks, 1))
        await overlap.submit([message("a", 2, 2), message("c", 1, 3)], acker(acks, 2))
        for _ in range(5):
            await asyncio.sleep(0)
        assert model.calls == [["a", "c"]], "batch 2 folded (a on top of batch 1's state) and inferred meanwhile"
        assert WRITES == [] and acks == [], "nothing written or acknowledged while batch 1 waits"
        gate.set()
        await overlap.drain()
        assert acks == [1, 2]
        assert WRITES == [("table", b"a"), ("table", b"b"), ("topic", b"a"), ("topic", b"b"),
                          ("table", b"a"), ("table", b"c"), ("topic", b"a"), ("topic", b"c")]  # fmt: skip
        a = [json.loads(v) for k, v, _ in output.sent if k == b"a"]
        assert a == [{"user": "a", "seq": 1, "events": 1}, {"user": "a", "seq": 2, "events": 2}]
        assert decode_state(tables.states[b"a"]).seq == 2 and overlap.in_flight == {}

    asyncio.run(main())


def test_a_batch_with_a_forget_waits_for_the_batches_in_flight() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        step, tables, _, output = make_step(GatedModel(turns=0, gate=gate))
        overlap, acks = Overlap(step, depth=3), []
        await overlap.submit([message("a", 1, 0)], acker(acks, 1))
        forgetting = asyncio.create_task(overlap.submit([forget("a", 1)], acker(acks, 2)))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not forgetting.done() and b"a" not in tables.values, "the forget waits for batch 1"
        gate.set()
        await forgetting
        assert acks == [1, 2] and b"a" not in tables.values and output.sent[-1][1] is None, "erased after batch 1"

    asyncio.run(main())


def test_a_fenced_batch_is_abandoned_and_the_batch_folded_on_it_is_redone_without_it() -> None:
    async def main() -> None:
        fenced = {"on": False}

        async def fence(messages: list[Any]) -> None:
            if fenced["on"] and any(m.offset == 0 for m in messages):
                raise Fenced("the partition moved")

        gate = asyncio.Event()
        model = GatedModel(turns=0, gate=gate)
        step, tables, _, output = make_step(model)
        step.fence = fence
        overlap, acks = Overlap(step, depth=2), []
        first = [message("a", 1, 0)]
        await overlap.submit(first, acker(acks, 1))
        await overlap.submit([message("a", 2, 1)], acker(acks, 2))
        fenced["on"] = True
        gate.set()
        await overlap.drain()
        assert acks == [2] and first[0].message.acked, "batch 1 abandoned: marked acked, never acknowledged"
        state = decode_state(tables.states[b"a"])
        assert (state.events_seen, state.seq) == (1, 1), "batch 2 redone from the table: a's event 2 alone"
        assert [json.loads(v)["events"] for _, v, _ in output.sent] == [1]

    asyncio.run(main())


# Random batches: users a-d on two partitions, some bad messages, some forgets, inference failing at random calls.
USERS = "abcd"
batch_specs = st.lists(
    st.lists(
        st.tuples(st.sampled_from(USERS), st.sampled_from(["ok", "ok", "ok", "ok", "bad", "forget"])),
        min_size=1,
        max_size=6,
    ),
    min_size=1,
    max_size=6,
)


def build(specs: list[list[tuple[str, str]]]) -> list[list[FakeEvent]]:
    batches, offset, count = [], 0, dict.fromkeys(USERS, 0)
    for spec in specs:
        batch = []
        for user, kind in spec:
            partition = USERS.index(user) % 2
            if kind == "forget":
                ev = forget(user, offset)
                ev.message.partition = partition
            elif kind == "bad":
                ev = FakeEvent(Message(user.encode(), b"{not json", partition=partition, offset=offset))
            else:
                count[user] += 1
                ev = message(user, count[user], offset, partition=partition)
            batch.append(ev)
            offset += 1
        batches.append(batch)
    return batches


def outcome(step: BatchStep, dlq: Any, output: Any, tables: Any) -> tuple[Any, ...]:
    per_user: dict[bytes, list[bytes | None]] = {}
    for key, value, _ in output.sent:
        per_user.setdefault(key, []).append(value)
    dead = sorted((h["dlq.partition"], h["dlq.offset"]) for _, _, h in dlq.sent)
    return dict(tables.values), per_user, dead


def consumed() -> float:
    """Events counted as applied so far (every label), from the worker's Prometheus registry."""
    return sum(s.value for m in REGISTRY.collect() if m.name == "interest_events_consumed" for s in m.samples
               if s.name.endswith("_total"))  # fmt: skip


async def run(
    batches: list[list[FakeEvent]], depth: int, fail_calls: frozenset[int], infer: bool
) -> tuple[Any, list[int], float]:
    model = GatedModel(turns=2, fail_calls=fail_calls) if infer else None
    step, tables, dlq, output = make_step(model)
    step.sleep = AsyncMock()
    overlap, acks, before = Overlap(step, depth=depth), [], consumed()
    for i, batch in enumerate(batches):
        await overlap.submit(batch, acker(acks, i))
    await overlap.drain()
    return outcome(step, dlq, output, tables), acks, consumed() - before


@settings(max_examples=150, deadline=None, derandomize=True)
@given(batch_specs, st.sampled_from([2, 3]), st.frozensets(st.integers(1, 8), max_size=3), st.booleans())
def test_overlapped_batches_end_exactly_as_the_serial_step(
    specs: Any, depth: int, fail_calls: frozenset[int], infer: bool
) -> None:
    """With inference (failing at random calls) or ingest only: the same table, records, DLQ and metrics."""
    batches = build(specs)
    serial, serial_acks, serial_count = asyncio.run(run(build(specs), 1, frozenset(), infer))
    overlapped, acks, count = asyncio.run(run(batches, depth, fail_calls, infer))
    assert overlapped == serial
    assert acks == serial_acks == list(range(len(batches))), "every batch acknowledged once, in order"
    assert count == serial_count, "events counted once, also when a batch is redone"
