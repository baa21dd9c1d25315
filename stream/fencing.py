"""Fencing: a worker that lost a partition never writes state or publishes for it afterwards.

A worker whose batch stalls past the rebalance timeout (Triton frozen, a long GC, SIGSTOP) is dropped from the
group and its partitions go to another worker. When it wakes up it is still in the middle of that batch; if it
went on, it would write states and publish records for partitions it no longer owns, racing the new owner: two
contents for one `(user, seq)`. So right before the changelog write and right before the output sends, the batch
step asks `Fence.check(batch)`, which raises `Fenced` unless

1. Faust has seen no rebalance since the batch was read (every message's generation is the current one) and the
   batch's partitions are still assigned to this worker, and
2. the group coordinator still knows this member in this generation: a Heartbeat request with the consumer's
   generation and member id (it changes nothing on the broker, unlike an offset commit) answers no error, or
   `REBALANCE_IN_PROGRESS` (the group waits for us to rejoin before any new owner starts: still ours). A
   request that fails (the broker restarting, say) proves nothing and is repeated until the coordinator answers.

A fenced batch is abandoned (stream/step.py): nothing of it is written or published, and its messages are marked
acknowledged without being recorded, so Faust never commits past them; whoever owns the partitions now reads them
again from the committed offset.

What remains (docs/output.md): the check and the write are not one atomic step. A worker frozen in the
microseconds between a successful check and its sends still sends; closing that window needs Kafka transactions
with producer-epoch fencing (one transactional producer per input partition; docs/output.md says why Faust's
exactly-once mode is not used, and why the local broker cannot test it yet: tests/test_broker_transactions.py).
Cost: one Heartbeat round trip to the coordinator per check, two per batch (`interest_fence_check_seconds`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from enum import Enum
from typing import Any

from faust.types import TP

from stream import metrics

log = logging.getLogger(__name__)


class Membership(Enum):
    """What the group coordinator says of this member."""

    MEMBER = "member"  # no error, or a rebalance waiting for us
    GONE = "gone"  # unknown member id or an old generation: our partitions may have a new owner
    UNKNOWN = "unknown"  # no answer (connection lost, coordinator moving): ask again


class Fenced(Exception):
    """This worker may no longer own the batch's partitions: nothing of the batch is written or published."""


class Fence:
    """Checks a batch's ownership; its dependencies are passed in (the Faust consumer's, see `for_app`)."""

    def __init__(
        self,
        assignment: Callable[[], set[TP]],
        generation: Callable[[], int],
        ask_coordinator: Callable[[], Awaitable[Membership]],
        *,
        retry_s: float = 0.5,
    ) -> None:
        self.assignment, self.generation, self.ask_coordinator = assignment, generation, ask_coordinator
        self.retry_s = retry_s

    async def check(self, messages: Iterable[Any]) -> None:
        """Raise `Fenced` unless this worker still owns every partition of `messages` (Faust `Message`s)."""
        messages = list(messages)
        if not messages:
            return
        with metrics.FENCE_CHECK_SECONDS.time():
            await self._check(messages)

    async def _check(self, messages: list[Any]) -> None:
        current = self.generation()
        if stale := {m.generation_id for m in messages} - {current}:
            raise self._fenced(f"the batch was read in generation {sorted(stale)}, the group is at {current}")
        if lost := {TP(m.topic, m.partition) for m in messages} - self.assignment():
            raise self._fenced(f"partitions {sorted(tp.partition for tp in lost)} are no longer assigned here")
        while (answer := await self.ask_coordinator()) is Membership.UNKNOWN:
            await asyncio.sleep(self.retry_s)
        if answer is Membership.GONE:
            raise self._fenced(f"the group coordinator no longer knows this member in generation {current}")

    def _fenced(self, why: str) -> Fenced:
        metrics.BATCHES_FENCED.inc()
        log.warning("fenced: %s; the batch is abandoned, its partitions' new owner reads it again", why)
        return Fenced(why)


def abandon(messages: Iterable[Any]) -> None:
    """Mark a fenced batch's messages acknowledged without recording their offsets: Faust stops waiting for them
    (a rebalance would otherwise wait out its timeout) but never commits past them."""
    for message in messages:
        message.acked = True


def for_app(app: Any) -> Fence:
    """The fence of a Faust app whose consumer thread is `stream.consumer.ConsumerThread`."""

    async def ask_coordinator() -> Membership:
        return await app.consumer._thread.membership(app.consumer_generation_id)

    return Fence(lambda: app.consumer.assignment(), lambda: app.consumer_generation_id, ask_coordinator)


async def allow(messages: Iterable[Any]) -> None:
    """No fencing (unit tests, and the step without a group)."""
