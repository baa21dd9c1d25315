"""Fencing without a broker: the ownership checks, and a fenced batch abandoned by the step (stream/fencing.py).
The frozen worker against the real broker is tests/test_scaleout.py::test_d."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from faust.types import TP
from prometheus_client import REGISTRY

from stream.fencing import Fence, Fenced, Membership
from tests.test_batch_step import WRITES, FakeModel, make_step, message


@dataclass
class Msg:
    topic: str
    partition: int
    generation_id: int
    acked: bool = False


def fence(answers: list[Membership], *, assigned: set[int] = {0, 1}, generation: int = 3) -> Fence:  # noqa: B006
    replies: Iterator[Membership] = iter(answers)

    async def ask() -> Membership:
        return next(replies)

    return Fence(lambda: {TP("events", p) for p in assigned}, lambda: generation, ask, retry_s=0)


def check(f: Fence, *messages: Msg) -> None:
    asyncio.run(f.check(list(messages)))


def test_a_member_of_the_current_generation_owning_the_partitions_passes() -> None:
    check(fence([Membership.MEMBER]), Msg("events", 0, 3), Msg("events", 1, 3))


def test_every_check_is_timed_passed_or_fenced_and_an_empty_batch_asks_nothing() -> None:
    def checks() -> float:
        return REGISTRY.get_sample_value("interest_fence_check_seconds_count") or 0.0

    before = checks()
    check(fence([Membership.MEMBER]), Msg("events", 0, 3))
    with pytest.raises(Fenced):
        check(fence([Membership.GONE]), Msg("events", 0, 3))
    check(fence([]), *[])  # no message: no coordinator round trip (the fence would raise StopIteration)
    assert checks() - before == 2


def test_a_rebalance_waiting_for_this_member_is_still_ownership_and_no_answer_is_asked_again() -> None:
    check(fence([Membership.REBALANCING]), Msg("events", 0, 3))
    check(fence([Membership.UNKNOWN, Membership.UNKNOWN, Membership.MEMBER]), Msg("events", 0, 3))


class Leased:
    """A fence with a 6 s lease on a fake clock, counting the coordinator's answers it used."""

    def __init__(self, answers: list[Membership]) -> None:
        self.now, self.asked, self.generation, self.is_settled = 100.0, 0, 3, True
        replies = iter(answers)

        async def ask() -> Membership:
            self.asked += 1
            return next(replies)

        self.fence = Fence(
            lambda: {TP("events", 0)}, lambda: self.generation, ask, retry_s=0, lease_s=6.0,
            settled=lambda generation: self.is_settled, clock=lambda: self.now,
        )  # fmt: skip

    def check(self, generation: int = 3) -> None:
        check(self.fence, Msg("events", 0, generation))


def test_a_clean_answer_is_trusted_for_the_lease_and_asked_again_after_it() -> None:
    f = Leased([Membership.MEMBER, Membership.MEMBER, Membership.GONE])
    f.check()
    f.now += 5.9
    f.check()  # within the lease: no round trip
    assert f.asked == 1
    f.now += 0.2  # 6.1 s after the question was sent: asked again
    f.check()
    assert f.asked == 2
    f.now += 60.0  # frozen past the lease (SIGSTOP): asked again, and the coordinator has let us go
    with pytest.raises(Fenced, match="no longer knows"):
        f.check()


@pytest.mark.parametrize("ends_it", ["rebalancing-answer", "aiokafka-rejoining", "new-generation"])
def test_what_ends_a_lease_at_once(ends_it: str) -> None:
    """A REBALANCE_IN_PROGRESS answer grants none; a rejoin aiokafka already knows of, or a new generation, ends
    it: the next check asks the coordinator (or fails locally) instead of trusting the old answer."""
    first = Membership.REBALANCING if ends_it == "rebalancing-answer" else Membership.MEMBER
    f = Leased([first, Membership.MEMBER])
    f.check()
    f.now += 1.0
    if ends_it == "aiokafka-rejoining":
        f.is_settled = False
    if ends_it == "new-generation":
        f.generation = 4
        with pytest.raises(Fenced, match="read in generation"):
            f.check(generation=3)  # the batch was read before the rebalance
        f.check(generation=4)
    else:
        f.check()
    assert f.asked == 2


@pytest.mark.parametrize(
    ("f", "msg", "why"),
    [
        (fence([Membership.MEMBER]), Msg("events", 0, 2), "read in generation"),
        (fence([Membership.MEMBER], assigned={1}), Msg("events", 0, 3), "no longer assigned"),
        (fence([Membership.UNKNOWN, Membership.GONE]), Msg("events", 0, 3), "no longer knows this member"),
    ],
    ids=["old-generation", "partition-moved", "coordinator-forgot-us"],
)
def test_a_worker_that_may_have_lost_a_partition_is_fenced(f: Fence, msg: Msg, why: str) -> None:
    with pytest.raises(Fenced, match=why):
        check(f, msg)


def test_a_fenced_batch_writes_nothing_publishes_nothing_and_is_not_acknowledged() -> None:
    """The fence answers yes at the changelog write and no at the publish: the batch stops there, is not retried
    (the Retrier lets Fenced through), and its messages are marked acked without Faust recording them."""
    answers = iter([None, Fenced("moved")])

    async def fence_check(messages: list[object]) -> None:
        if (answer := next(answers)) is not None:
            raise answer

    step, _, dlq, output = make_step(FakeModel())
    step.fence = fence_check
    WRITES.clear()
    batch = [message("a", 1, 0), message("b", 1, 1)]
    asyncio.run(step.process_until_done(batch))  # type: ignore[arg-type]
    assert WRITES == [("table", b"a"), ("table", b"b")], "written while owned, never published"
    assert output.sent == [] and dlq.sent == []
    assert all(getattr(ev.message, "acked", False) for ev in batch)
    assert step.failing == set() and not step.started


def test_the_fence_is_asked_before_the_changelog_write_and_before_the_sends() -> None:
    asked: list[int] = []

    async def fence_check(messages: list[object]) -> None:
        asked.append(len(messages))

    step, *_ = make_step(FakeModel())
    step.fence = fence_check
    asyncio.run(step.process([message("a", 1, 0)]))  # type: ignore[arg-type]
    assert asked == [1, 1], "once before the changelog write, once before the output sends"
