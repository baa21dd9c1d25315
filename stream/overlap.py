"""Overlapping batches: batch k+1 is read, validated and folded while batch k waits for Triton and the acks.

The serial step (stream/step.py) leaves the worker idle while Triton computes and while the broker acknowledges
the changelog and output sends, and leaves Triton and the broker idle while the worker folds. `Overlap` runs each
batch in two parts, with at most `depth` batches in flight:

* `prepare` (validate, fold) runs in the agent, batch after batch. A user still in flight in an earlier batch is
  folded on top of that batch's new state (`in_flight`), never on the table's older one;
* `finish` (infer, then — once the previous batch has finished — fence, write, send, acknowledge) runs as a task.
  Inference starts at once, so it overlaps the previous batch's writes; every write and send waits for the
  previous batch, so a user's states, records and seqs stay in order, as do the acknowledgements.

Offsets are committed only behind what is durable: a batch's messages are acknowledged (Faust commits contiguous
acknowledged offsets) when its `finish` is done, in batch order; `stream.batching` no longer acknowledges a batch
when the agent moves on.

Anything irregular — a forget in the batch (erasure writes at once), a fold that needs the record of a user still
in flight (a replay, or a change without a new record), a failed, isolated or fenced batch — falls back to the
serial path: the batches in flight are drained first, and a batch whose predecessor did not finish as prepared
is redone serially from the table (its inference is discarded), as is every batch prepared while that happens.
The serial path is `BatchStep.process_until_done`, with its retries, isolation and fencing, unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from faust.types import EventT

from core.sessions import Outcome, UserState
from stream import metrics
from stream.deadletter import DeadLetters
from stream.fencing import Fenced, abandon
from stream.step import BatchStep, Folded, HasForget, Inferred, Prepared, Stored
from stream.tables import UserValue

log = logging.getLogger(__name__)

Acknowledge = Callable[[], Awaitable[None]]  # marks one batch's messages done (Faust commits behind them)


class NeedsSerial(Exception):
    """The prepared batch cannot finish while an earlier one is in flight: drain, then run it serially."""


class Overlap:
    """Runs the agent's batches through `step` with up to `depth` in flight (1: the serial step). Each batch comes
    with its `acknowledge`, called once it is finished, in batch order."""

    def __init__(self, step: BatchStep, depth: int = 2) -> None:
        self.step, self.depth = step, depth
        self.tasks: list[asyncio.Task[bool]] = []  # finishing batches, oldest first; True: finished as prepared
        # user -> (batch id, its state after that batch, its value's record: None when being inferred)
        self.in_flight: dict[bytes, tuple[int, UserState, UserValue | None]] = {}
        self.draining = False  # a batch finished irregularly: nothing new is prepared until all in flight ended

    async def submit(self, batch: list[EventT], acknowledge: Acknowledge) -> None:
        """Take one batch (in the order read). Returns once it is folded and its finish is under way, or done."""
        while self.tasks and (len(self.tasks) >= self.depth or self.draining):
            await asyncio.wait([self.tasks[0]])
            self.tasks.pop(0)
        self.draining = False
        metrics.MESSAGES_READ.inc(len(batch))
        dead = self.step.dead_letters()
        if self.depth <= 1:
            return await self.serially(batch, dead, acknowledge)
        self.step.started.setdefault(id(batch), time.monotonic())
        try:
            prepared = await self.step.prepare(batch, dead, self.read, forgets=False)
            to_infer = self.step.to_infer(prepared.users)
            self.check(prepared, {id(u) for u in to_infer})
        except Exception as exc:  # HasForget, NeedsSerial, or a failure the serial path retries or isolates
            if not isinstance(exc, HasForget | NeedsSerial):
                log.debug("preparing a batch failed (%r): drained and run serially", exc)
            await settle(dead)
            await self.drain()
            return await self.serially(batch, dead, acknowledge)
        inferred = {id(u) for u in to_infer}
        for user in prepared.users:
            if id(user) in inferred:
                self.in_flight[user.key] = (id(batch), replace(user.state, seq=user.state.seq + 1, dirty=False), None)
            else:  # stored as it is, with the record it had
                record = UserValue(b"", user.stored.record if user.stored else None)
                self.in_flight[user.key] = (id(batch), user.state, record)
        previous = self.tasks[-1] if self.tasks else None
        self.tasks.append(asyncio.create_task(self.finish(prepared, to_infer, dead, acknowledge, previous)))

    def read(self, partition: int, key: bytes) -> Stored:
        """A user's state: the newest one in flight, else the table's."""
        if (pending := self.in_flight.get(key)) is not None:
            _, state, stored = pending
            return stored, state
        return self.step.read(partition, key)

    def check(self, prepared: Prepared, inferred: set[int]) -> None:
        """A user folded on a state whose record is still being inferred has no stored record to keep or send
        again: it must get a new one (be in `inferred`, ids of `to_infer`'s users), and have no replays (a replay
        republishes the stored record)."""
        for user in prepared.users:
            pending = self.in_flight.get(user.key)
            if (
                pending is not None
                and pending[2] is None
                and (Outcome.REPLAY in user.report.outcomes or (user.changed and id(user) not in inferred))
            ):
                raise NeedsSerial()

    async def finish(
        self,
        prepared: Prepared,
        to_infer: list[Folded],
        dead: DeadLetters,
        acknowledge: Acknowledge,
        previous: asyncio.Task[bool] | None,
    ) -> bool:
        """Infer `to_infer` now; write, send and acknowledge once `previous` finished. Returns whether it finished
        as prepared (False: redone serially, or abandoned, so batches folded on top of it are redone too)."""
        batch, me = prepared.batch, id(prepared.batch)
        inference: asyncio.Task[Inferred] | None = None
        as_prepared = False
        try:
            if to_infer:
                inference = asyncio.create_task(self.step.infer(to_infer))
            if previous is not None and not await previous:
                raise NeedsSerial()
            await self.step.finish(prepared, await inference if inference else None)
            await dead.flush()
            self.step.count(prepared.users)
            as_prepared = True
        except Fenced:
            await discard(inference)
            abandon(ev.message for ev in batch)
            self.draining = True
            return False
        except Exception as exc:
            await discard(inference)
            if not isinstance(exc, NeedsSerial):
                log.warning("a batch failed in flight (%r): redone serially", exc)
            self.draining = True
            await settle(dead)
            await self.step.process_until_done(batch, dead)
        finally:
            for user in prepared.users:
                if self.in_flight.get(user.key, (None,))[0] == me:
                    del self.in_flight[user.key]
            self.step.started.pop(me, None)
        await acknowledge()
        return as_prepared

    async def serially(self, batch: list[EventT], dead: DeadLetters, acknowledge: Acknowledge) -> None:
        await self.step.process_until_done(batch, dead)
        await acknowledge()

    async def drain(self) -> None:
        """Wait until every batch in flight has finished (redone, abandoned or done)."""
        while self.tasks:
            await asyncio.wait([self.tasks[0]])
            self.tasks.pop(0)

    async def close(self) -> None:
        """Stop: batches still in flight are cancelled, unacknowledged, as by a crash (read again later)."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        self.in_flight.clear()


async def settle(dead: DeadLetters) -> None:
    """Await the DLQ sends made so far, so the serial run skips those delivered (and sends again the others)."""
    try:
        await dead.flush()
    except Exception:
        log.warning("a dead-letter send failed; the serial run sends it again", exc_info=True)


async def discard(inference: asyncio.Task[Inferred] | None) -> None:
    """An inference whose result (or failure) is of no use now: cancelled, and its outcome collected."""
    if inference is not None:
        inference.cancel()
        await asyncio.gather(inference, return_exceptions=True)
