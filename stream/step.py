"""The batch step: one `take()` batch of the events topic, from messages to published interest records.

The step is the ordering of named stages; each lives where its name says:

1. `validate`: parse every message (`core.schema.parse_message`); rejects go to the DLQ (stream/deadletter.py).
2. `forget`: erase users asked to be forgotten (stream/erasure.py).
3. `fold`: each user's events into its stored state (`core.sessions.apply_events`), by the user's partition.
4. `republish`: a user whose events were read again after a crash gets its stored record once more.
5. `publish`: infer the changed users (stream/inference.py), write state + record (stream/tables.py: changelog
   acknowledged, then RocksDB), then send the records to the output topic.

Every write and every send is preceded by the fence (stream/fencing.py): a worker that may have lost the batch's
partitions in a rebalance abandons the batch instead.

Stages 1-3 (`prepare`) and 4-5 (`finish`) are separate methods so that stream/overlap.py can fold the next batch
while this one waits for Triton and the acks; `process` runs them back to back.

Effectively once, per user: the new value is durable before its record is published, and the state remembers
the highest input offset it folded. After a crash the uncommitted input is read again; those events are replays
(`Outcome.REPLAY`), which change nothing, and the user's stored record is published again, byte for byte, once.
So a `(user, seq)` has exactly one content, a valid event is never dead-lettered because of a crash, and
`events_seen` / `sessions_seen` stay exact. Dependencies are passed in, so the step runs in unit tests on fakes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from faust.types import EventT

from core.schema import Event, Forget, Rejection, parse_message
from core.sessions import Applied, Outcome, UserState, apply_events, decode_state, encode_state
from stream import metrics
from stream.deadletter import DeadLetters, Sendable, internal
from stream.erasure import forget
from stream.fencing import Fenced, abandon, allow
from stream.inference import InterestModel
from stream.isolation import Retrier
from stream.settings import Settings
from stream.tables import Tables, UserValue, Write

log = logging.getLogger(__name__)

# The users whose encoded state `read` recognises without decoding it (the most recently written): a cache, never
# the truth (a hit needs the stored bytes to equal the ones it encoded). ~30 µs saved per update of an active user;
# at most ~70 MB (a decoded state of 200 events is ~33 KiB; typical states are a third of that).
DECODED_STATES = 2048

Pairs = list[tuple[Event, EventT]]
Elements = dict[int, tuple[int, bytes]]  # id(event) -> (index, own bytes), for the events of batch envelopes
Inferred = tuple[list[UserState], list[bytes]]  # the users' next states and their records


class HasForget(Exception):
    """`prepare(forgets=False)` met a forget: the caller runs the batch with nothing else in flight."""


@dataclass
class Folded:
    """One user after `fold`: where it lives, what was stored, the new state and its events."""

    key: bytes
    partition: int
    stored: UserValue | None
    state: UserState
    pairs: Pairs
    report: Applied
    changed: bool  # the state differs from the stored one
    stored_seq: int  # the seq of the stored state (and of its record, when it has one)


@dataclass
class Prepared:
    """A batch after `prepare` (validated, forgets executed, folded): what `finish` republishes, writes, sends."""

    batch: list[EventT]
    users: list[Folded]

    @property
    def owned(self) -> list[Any]:
        return [ev.message for ev in self.batch]


Stored = tuple[UserValue | None, UserState]  # a user's stored value and its decoded state
Read = Callable[[int, bytes], Stored]  # (partition, key) -> what `fold` starts from


class BatchStep:
    """Validate, forget, fold, republish, publish: one batch (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        tables: Tables,
        dlq: Sendable,
        output: Sendable,
        model: InterestModel | None,
        *,
        on_stage: Callable[[str, int], None] | None = None,
        fence: Callable[[list[Any]], Awaitable[None]] = allow,
    ) -> None:
        self.tables, self.dlq, self.output, self.model = tables, dlq, output, model
        self.fence = fence  # stream/fencing.py: raises Fenced when the batch's partitions may have a new owner
        self.session_cfg = settings.session_config()
        self.limits = {
            "max_bytes": settings.event_max_bytes,
            "max_envelope_bytes": settings.event_envelope_max_bytes,
            "max_future_ms": round(settings.event_max_future_s * 1000),
        }
        self.dlq_max_bytes, self.stall_s = settings.dlq_max_value_bytes, settings.health_stall_s
        self.on_stage = on_stage or (lambda point, published: None)
        self.published = 0
        self.republished: dict[bytes, int] = {}  # user -> seq of the stored record this process last sent again
        self.sleep = asyncio.sleep  # the retry back-off (tests pass a fake)
        self.started: dict[int, float] = {}  # batches in flight: id -> monotonic start
        self.failing: set[int] = set()  # batches whose last attempt failed (being retried)
        self.decoded: OrderedDict[bytes, tuple[bytes, UserState]] = OrderedDict()  # user -> (state bytes, state)

    def stage(self, point: str) -> None:
        self.on_stage(point, self.published)

    async def process_until_done(self, batch: list[EventT], dead: DeadLetters | None = None) -> None:
        """Faust acks a take() batch even when the agent raises, so a failed batch is retried here, never left
        (stream/isolation.py): an outage stalls its partitions loudly (lag alert, /health degraded, ERROR logs)
        instead of committing lost updates, and a message that fails the step by itself is dead-lettered alone
        (reason `internal`) while the rest is applied. A retried batch never dead-letters a message twice."""
        dead = self.dead_letters() if dead is None else dead  # a caller's: what it already dead-lettered stays done
        me = id(batch)
        self.started.setdefault(me, time.monotonic())

        def failed(error: BaseException, size: int) -> None:
            self.failing.add(me)
            metrics.BATCH_FAILURES.inc()

        try:
            retrier = Retrier(lambda part: self.process(part, dead), on_failure=failed, sleep=self.sleep)
            try:
                culprits = await retrier.run(batch)
            except Fenced:
                abandon(ev.message for ev in batch)
                return
            if culprits:
                for culprit in culprits:
                    await dead.send(culprit.message, internal(culprit.error))  # type: ignore[arg-type]
                await dead.flush()
                metrics.MESSAGES_ISOLATED.inc(len(culprits))
        finally:
            self.started.pop(me, None)
            self.failing.discard(me)

    def dead_letters(self) -> DeadLetters:
        return DeadLetters(self.dlq, self.dlq_max_bytes)

    async def process(self, batch: list[EventT], dead: DeadLetters | None = None) -> None:
        """One attempt at `batch`. The DLQ sends are awaited at its end, also when it fails, so a retry knows
        exactly which were delivered."""
        dead = self.dead_letters() if dead is None else dead
        try:
            prepared = await self.prepare(batch, dead)
            await self.finish(prepared)
            self.count(prepared.users)
        finally:
            await dead.flush()

    async def prepare(
        self, batch: list[EventT], dead: DeadLetters, read: Read | None = None, *, forgets: bool = True
    ) -> Prepared:
        """Validate, forget, fold: each user's new state, nothing written yet except forgets and DLQ sends.
        `read`: where a user's state comes from (the table; stream/overlap.py passes states still in flight).
        `forgets=False`: raise `HasForget` instead of executing one (erasure writes at once)."""
        by_user, elements = await self.validate(batch, dead)
        if any(isinstance(m, Forget) for pairs in by_user.values() for m, _ in pairs):
            if not forgets:
                raise HasForget()
            await self.fence([ev.message for ev in batch])
            by_user = await forget(by_user, self.tables, self.output, dead, self.stage)  # type: ignore[arg-type]
        read = read or self.read
        users = [await self.fold(key, pairs, dead, elements, read) for key, pairs in by_user.items()]  # type: ignore[arg-type]
        return Prepared(batch, users)

    def to_infer(self, users: list[Folded]) -> list[Folded]:
        """With inference on, a dirty state (changed now, or stored while inference was off) gets a new record."""
        return [u for u in users if u.state.dirty] if self.model is not None else []

    def split(self, users: list[Folded]) -> tuple[list[Folded], list[Write]]:
        """`to_infer`'s users, and the writes of any other change (ingest only, identities' bookkeeping): stored
        with the record it had."""
        to_infer = self.to_infer(users)
        inferred = {id(u) for u in to_infer}
        return to_infer, [self._keep_record(u) for u in users if u.changed and id(u) not in inferred]

    async def finish(self, prepared: Prepared, inferred: Inferred | None = None) -> None:
        """Republish, infer (unless `inferred` was computed already for `split`'s users), write, publish."""
        users, owned = prepared.users, prepared.owned
        await self.republish([u for u in users if Outcome.REPLAY in u.report.outcomes], owned)
        to_infer, keep = self.split(users)
        if to_infer:
            await self.publish(to_infer, inferred or await self.infer(to_infer), keep, owned)
        elif keep:
            await self.fence(owned)
            await self.tables.write(keep)

    async def validate(
        self, batch: list[EventT], dead: DeadLetters
    ) -> tuple[dict[bytes, list[tuple[Event | Forget, EventT]]], Elements]:
        """Each user's valid events and forgets, in arrival order; every reject dead-lettered."""
        by_user: dict[bytes, list[tuple[Event | Forget, EventT]]] = {}
        elements: Elements = {}
        for ev in batch:
            msg = ev.message
            for part in parse_message(msg.value, msg.key or b"", **self.limits):
                if isinstance(parsed := part.parsed, Rejection):
                    await dead.send(ev, parsed, part.index, part.raw)
                    continue
                by_user.setdefault(msg.key, []).append((parsed, ev))
                if part.raw is not None:  # an event of an envelope: if late, it is dead-lettered alone
                    elements[id(parsed)] = (part.index, part.raw)
        return by_user, elements

    def read(self, partition: int, key: bytes) -> Stored:
        """The stored value and its state; the state is decoded only when its bytes are not the ones this process
        last encoded for the user (`decoded`: active users skip the decode)."""
        stored = self.tables.get(partition, key)
        if stored is None:
            return None, decode_state(None)
        known = self.decoded.get(key)
        if known is not None and known[0] == stored.state:
            return stored, known[1]
        return stored, decode_state(stored.state)

    async def fold(self, key: bytes, pairs: Pairs, dead: DeadLetters, elements: Elements, read: Read) -> Folded:
        """Fold one user's events into its stored state; late events go to the DLQ."""
        partition = pairs[-1][1].message.partition  # a user's events all come from its key's partition
        stored, state = read(partition, key)
        offsets = [ev.message.offset for _, ev in pairs]
        new_state, report = apply_events(state, [e for e, _ in pairs], self.session_cfg, offsets)
        for outcome, (event, ev) in zip(report.outcomes, pairs, strict=True):
            if outcome is Outcome.LATE:
                lag_s = (new_state.ts[-1] - event.timestamp) / 1000
                index, raw = elements.get(id(event), (-1, None))
                await dead.send(
                    ev, Rejection("late", f"event time is {lag_s:.0f} s behind the user's latest"), index, raw
                )
        return Folded(key, partition, stored, new_state, pairs, report, new_state is not state, state.seq)

    def count(self, users: list[Folded]) -> None:
        """The metrics of folded users, once their batch is done (a retried or redone batch folds again)."""
        for user in users:
            report = user.report
            for outcome, (event, _) in zip(report.outcomes, user.pairs, strict=True):
                if outcome is Outcome.APPLIED:
                    metrics.EVENTS_CONSUMED.labels(metrics.event_type_label(event.event_type)).inc()
                elif outcome is Outcome.DUPLICATE:
                    metrics.DUPLICATES_IGNORED.inc()
                elif outcome is Outcome.REPLAY:
                    metrics.EVENTS_REPLAYED.inc()
            metrics.SESSIONS_STARTED.inc(report.new_sessions)
            if report.new_incarnation:
                metrics.INPUT_OFFSETS_RESTARTED.inc()
                log.warning("user %r: input offsets went back to %d with new events (events topic recreated?): "
                            "applied", user.key, user.pairs[0][1].message.offset)  # fmt: skip

    async def republish(self, replayed: list[Folded], owned: list[Any]) -> None:
        """A user whose input is read again (a crash came after its value was stored) may not have reached the
        output: its stored record goes out again, before any newer record (so a consumer sees seqs in order), and
        once per record and process, however many batches the re-read input spans. Per record, not per user: a
        partition that comes back after another worker crashed past a newer record needs that one sent too."""
        again = [u for u in replayed if u.stored and u.stored.record and self.republished.get(u.key, -1) < u.stored_seq]
        if again:
            await self.fence(owned)
            sends = [await self.output.send(key=u.key, value=u.stored.record) for u in again]  # type: ignore[union-attr]
            await asyncio.gather(*sends)
            self.republished.update((u.key, u.stored_seq) for u in again)
            metrics.OUTPUTS_REPUBLISHED.inc(len(again))

    async def infer(self, users: list[Folded]) -> Inferred:
        """The users' next states (seq + 1, clean) and their records, from one inference call."""
        assert self.model is not None
        states = [replace(u.state, seq=u.state.seq + 1, dirty=False) for u in users]
        return states, await self.model.records([u.key.decode() for u in users], states)

    async def publish(self, users: list[Folded], inferred: Inferred, keep: list[Write], owned: list[Any]) -> None:
        """Write the new states with their records, and `keep` (changelog acknowledged, then RocksDB); then
        publish. Both the write and the sends happen only while this worker owns `owned`'s partitions."""
        metrics.USERS_PENDING.set(len(users))
        states, records = inferred
        values = [self._value(u.key, s, r) for u, s, r in zip(users, states, records, strict=True)]
        updates = [Write(u.partition, u.key, v) for u, v in zip(users, values, strict=True)]
        self.stage("before_changelog")
        await self.fence(owned)
        await self.tables.write([*keep, *updates])
        self.stage("before_publish")
        await self.fence(owned)
        delivered = [await self.output.send(key=u.key, value=r) for u, r in zip(users, records, strict=True)]
        await asyncio.gather(*delivered)
        published_at = time.time()
        metrics.OUTPUTS_PUBLISHED.inc(len(records))
        self.published += len(records)
        self.stage("after_publish")
        for user in users:
            for event, ev in user.pairs:
                metrics.EVENT_TO_OUTPUT_SECONDS.observe(max(0.0, published_at - ev.message.timestamp))
                metrics.EVENT_TIME_LAG_SECONDS.observe(max(0.0, published_at - event.timestamp / 1000))
        metrics.USERS_PENDING.set(0)

    def _keep_record(self, user: Folded) -> Write:
        """The user's new state with the record it already had (ingest only, or identities' bookkeeping)."""
        record = user.stored.record if user.stored else None
        return Write(user.partition, user.key, self._value(user.key, user.state, record))

    def _value(self, key: bytes, state: UserState, record: bytes | None) -> UserValue:
        data = encode_state(state)
        self.decoded[key] = (data, state)
        self.decoded.move_to_end(key)
        if len(self.decoded) > DECODED_STATES:
            self.decoded.popitem(last=False)
        metrics.STATE_BYTES.observe(len(data))
        return UserValue(data, record)

    def health(self) -> dict[str, Any]:
        """ "degraded" while inference fails (circuit open, a batch being retried, no usable model version) or a
        batch has been in flight longer than HEALTH_STALL_S (Triton hanging, or events waiting with no output)."""
        now = time.monotonic()
        oldest_s = max((now - t for t in self.started.values()), default=0.0)
        circuit_open = self.model is not None and self.model.breaker_open
        model_problem = self.model.problem if self.model is not None else ""
        problems = [
            *(["triton circuit open"] if circuit_open else []),
            *([model_problem] if model_problem else []),
            *([f"{len(self.failing)} batch(es) failing, retried"] if self.failing else []),
            *([f"a batch in flight for {oldest_s:.1f} s"] if oldest_s > self.stall_s else []),
        ]
        return {
            "status": "degraded" if problems else "ok",
            "problems": problems,
            "inference": self.model is not None,
            "triton_circuit_open": circuit_open,
            "oldest_batch_s": round(oldest_s, 3),
        }
