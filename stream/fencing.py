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

**The lease.** A coordinator round trip per check cost 3-9 ms at 500-1,000 events/s, about a fifth of the
worker's time (`interest-stream bench live`, docs/benchmarks.md). A clean answer (no error: a stable member) is
therefore trusted for `lease_s`, counted from before the request was sent: Kafka can give this member's partitions
to another one without it only by evicting it, and it evicts no sooner than the session timeout after the last
heartbeat it answered, or the rebalance timeout after a rebalance that starts later. So the lease is a tenth of
the smaller of the two (6 s with Faust's defaults). Within it, the local checks above still run on every check,
plus aiokafka's own view: still in Faust's generation and no rejoin pending (a rebalance the consumer already
knows of ends the lease at once). A `REBALANCE_IN_PROGRESS` answer passes but grants no lease (the rebalance may
have started long ago). A process frozen past the lease (SIGSTOP, a long GC: the monotonic clock runs on) asks
the coordinator again before its next write. The lease leans on the coordinator keeping group state across its
own restarts, as Kafka does (it lives in `__consumer_offsets`); noida-db loses it when restarted, which the
fencing test allows for.

A fenced batch is abandoned (stream/step.py): nothing of it is written or published, and its messages are marked
acknowledged without being recorded, so Faust never commits past them; whoever owns the partitions now reads them
again from the committed offset.

What remains (docs/output.md): the check and the write are not one atomic step. A worker frozen in the
microseconds between a successful check and its sends still sends; closing that window needs Kafka transactions
with producer-epoch fencing (one transactional producer per input partition; docs/output.md says why Faust's
exactly-once mode is not used, and why the local broker cannot test it yet: tests/test_broker_transactions.py).
Cost: local checks per check, and one Heartbeat round trip to the coordinator per lease
(`interest_fence_check_seconds`, `interest_fence_round_trips_total`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from enum import Enum
from typing import Any

from faust.types import TP

from stream import metrics

log = logging.getLogger(__name__)


class Membership(Enum):
    """What the group coordinator says of this member."""

    MEMBER = "member"  # no error: a stable member of this generation
    REBALANCING = "rebalancing"  # a rebalance waits for us to rejoin: still ours, for a time nobody told us
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
        lease_s: float = 0.0,
        settled: Callable[[int], bool] = lambda generation: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.assignment, self.generation, self.ask_coordinator = assignment, generation, ask_coordinator
        self.retry_s = retry_s
        self.lease_s, self.settled, self.clock = lease_s, settled, clock  # see "The lease" above
        self._lease: tuple[int, float] | None = None  # (generation, monotonic end) of the last clean answer
        self._announced = False

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
        if self._leased(current):
            return
        asked = self.clock()
        while (answer := await self.ask_coordinator()) is Membership.UNKNOWN:
            await asyncio.sleep(self.retry_s)
        metrics.FENCE_ROUND_TRIPS.inc()
        if answer is Membership.GONE:
            self._lease = None
            raise self._fenced(f"the group coordinator no longer knows this member in generation {current}")
        clean = answer is Membership.MEMBER and self.lease_s > 0
        if clean and not self._announced:  # once, for the operator (and the fencing test)
            log.info("fence: a clean answer of the group coordinator is trusted for %.1f s", self.lease_s)
            self._announced = True
        self._lease = (current, asked + self.lease_s) if clean else None

    def _leased(self, current: int) -> bool:
        lease = self._lease
        return lease is not None and lease[0] == current and self.clock() < lease[1] and self.settled(current)

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
    """The fence of a Faust app whose consumer thread is `stream.consumer.ConsumerThread`; its lease is a tenth
    of the smaller of the group's session and rebalance timeouts."""

    async def ask_coordinator() -> Membership:
        return await app.consumer._thread.membership(app.consumer_generation_id)

    def settled(generation: int) -> bool:
        return bool(app.consumer._thread.settled(generation))

    lease_s = min(app.conf.broker_session_timeout, app.conf.broker_rebalance_timeout) / 10
    return Fence(
        lambda: app.consumer.assignment(),
        lambda: app.consumer_generation_id,
        ask_coordinator,
        lease_s=lease_s,
        settled=settled,
    )


async def allow(messages: Iterable[Any]) -> None:
    """No fencing (unit tests, and the step without a group)."""
