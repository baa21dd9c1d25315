"""The Faust worker: app, topics, tables and the agent, declared plainly; then the batch step it runs.

One event, input topic to output record (docs/architecture.md): the `ingest` agent takes a batch ->
`BatchStep.process` validates it (`core.schema.parse_message`) and folds each user's events into the stored state
(`core.sessions.apply_events`) -> `stream.inference.InterestModel` encodes the changed users (`core.encoding`),
asks Triton once for the batch and builds the records (`core.schema.InterestRecord`) -> the new state and record
go to the tables (RocksDB + changelogs, awaited) -> the record goes to the output topic. Bad input goes to
`<events>-dlq` with the reason in headers: the worker never stops on input. A `forget` control message erases
its user (tables and changelogs, then a tombstone on the output topic; docs/events.md).

Nothing lost, nothing conflicting (docs/output.md): a batch's offsets are committed only after the step finished;
a crash anywhere in between re-reads the events, which the stored state recognises as replays by their offset,
and the stored record is published again, byte for byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import traceback
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

import faust
from faust.streams import _current_event, current_event
from faust.types import EventT

from core.schema import Event, Forget, Rejection, decode_record, encode_record, in_scenario, parse_message
from core.sessions import Applied, Outcome, UserState, apply_events, decode_state, encode_state, forget_is_replay
from stream import metrics
from stream.batching import take_batches
from stream.inference import InterestModel
from stream.isolation import Retrier
from stream.settings import Settings

log = logging.getLogger(__name__)

STATE_TABLE = "user_state"
INTEREST_TABLE = "user_interest"


def create_app(settings: Settings, *, on_stage: Callable[[str, int], None] | None = None) -> faust.App:
    """The worker's Faust app. `on_stage(point, published)` is called at points of the publish path (tests'
    fault injection: see local/faults.py); production passes nothing."""
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{server}" for server in settings.kafka_bootstrap_servers.split(",")],
        broker_credentials=settings.faust_credentials(),
        store="rocksdb://",
        datadir=str(settings.state_dir),
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        table_standby_replicas=settings.worker_standby_replicas,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger=settings.worker_producer_linger_ms / 1000,
        # Faust's default max_poll_records is unbounded: one poll hands the whole prefetched backlog over, and a
        # worker that takes longer than max_poll_interval to work through it is dropped from the group by aiokafka
        # (found at 1M events: it left after 1000 s and never rejoined). Bounded polls keep it polling.
        broker_max_poll_records=settings.worker_max_poll_records,
        broker_max_poll_interval=settings.worker_max_poll_interval_s,
        web_host=settings.worker_web_host,
        web_port=settings.worker_web_port or 6066,  # Faust validates the port even when the server is off
        web_enabled=settings.worker_web_port != 0,
        stream_buffer_maxsize=max(4096, 2 * settings.worker_batch_max),
        consumer_max_fetch_size=settings.worker_max_partition_fetch_bytes,
    )
    # bytes keys and values make Faust use its "raw" codec: our own msgpack / JSON formats are the values.
    raw = {"key_serializer": "raw", "value_serializer": "raw", "partitions": settings.topic_partitions}
    events_topic = app.topic(settings.topic_events, **raw)
    dlq_topic = app.topic(settings.topic_dlq, **raw)
    output_topic = app.topic(settings.topic_output, **raw)
    user_state = app.Table(STATE_TABLE, partitions=settings.topic_partitions, key_type=bytes, value_type=bytes)
    user_interest = app.Table(INTEREST_TABLE, partitions=settings.topic_partitions, key_type=bytes, value_type=bytes)

    model = InterestModel(settings) if settings.triton_url else None
    if model is None:
        log.warning("TRITON_URL is empty: ingest only (state is kept, no interest is published)")
    tables = FaustTables(user_state, user_interest)
    step = BatchStep(settings, tables, dlq_topic, output_topic, model, on_stage=on_stage)

    # One actor for all partitions. Faust's isolated_partitions (one actor per partition) lost updates in our crash
    # loop (tests/test_pipeline.py): after a restart a partition's events reached its actor out of offset order.
    # Head-of-line blocking is bounded instead by small per-partition fetches, which Faust hands over round-robin
    # across partitions: a user sending 100k events delays another partition by one fetch of the hot one.
    @app.agent(events_topic)
    async def ingest(stream: faust.StreamT) -> None:
        async for batch in take_batches(stream, settings.worker_batch_max, within=settings.worker_batch_wait_s):
            await step.process_until_done(batch)

    @app.timer(interval=5.0)
    async def update_lag() -> None:
        """Consumer lag of this worker's events partitions: end offset minus the last committed offset."""
        tps = [tp for tp in app.consumer.assignment() if tp.topic == settings.topic_events]
        ends = await app.consumer.highwaters(*tps) if tps else {}
        committed = app.monitor.tp_committed_offsets  # Faust's sensor API (updated on every commit)
        for tp in tps:
            metrics.CONSUMER_LAG.labels(str(tp.partition)).set(max(0, ends[tp] - (committed.get(tp) or 0)))

    if model is not None:

        @app.timer(interval=settings.model_poll_s)
        async def poll_model_versions() -> None:
            """Switch to a newly loaded model version (or refuse it) even while no events arrive."""
            await model.versions.refresh()

    @app.timer(interval=30.0)
    async def count_users() -> None:
        metrics.USERS_IN_STATE.set(len(user_state))  # keys of the active partitions (not standbys)

    @app.page("/users/{user_id}/interest")
    @app.table_route(table=user_interest, match_info="user_id")
    async def interest_view(web: faust.web.View, request: faust.web.Request, user_id: str) -> faust.web.Response:
        """The latest record; `?scenario=app`: the interest and top items asked about that scenario."""
        value = user_interest.get(user_id.encode())
        if value is None:
            return web.json({"error": f"unknown user {user_id!r}"}, status=404)
        if not (scenario := request.query.get("scenario")):
            return web.bytes(value, content_type="application/json")
        record = decode_record(value)
        if scenario not in record.scenarios:
            known = sorted(record.scenarios)
            return web.json({"error": f"the model knows no scenario {scenario!r}", "scenarios": known}, status=404)
        return web.bytes(encode_record(in_scenario(record, scenario)), content_type="application/json")

    @app.timer(interval=1.0)
    async def update_health() -> None:
        metrics.WORKER_DEGRADED.set(step.health()["status"] != "ok")

    @app.page("/health")
    async def health_view(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return web.json(step.health())

    return app


class Sendable(Protocol):
    """What the step needs of a topic (a Faust `Topic`, or a fake in unit tests)."""

    async def send(self, *, key: bytes, value: bytes | None, headers: Any = None) -> Awaitable[Any]: ...


class Tables(Protocol):
    """The two tables: the user's state and its latest record. `put` and `delete` return what to await for
    durability."""

    def get_state(self, key: bytes) -> bytes | None: ...
    def get_record(self, key: bytes) -> bytes | None: ...
    def put(self, key: bytes, state: bytes, record: bytes | None) -> list[Awaitable[Any]]: ...
    def delete(self, key: bytes) -> list[Awaitable[Any]]: ...


class FaustTables:
    """`user_state` and `user_interest`. A write goes to RocksDB and to the table's changelog, and the changelog
    send is handed back to be awaited (a plain `table[key] = v` gives no way to wait for the changelog)."""

    def __init__(self, states: faust.Table, interests: faust.Table) -> None:
        self.states, self.interests = states, interests

    def get_state(self, key: bytes) -> bytes | None:
        return self.states.get(key)

    def get_record(self, key: bytes) -> bytes | None:
        return self.interests.get(key)

    def put(self, key: bytes, state: bytes, record: bytes | None) -> list[Awaitable[Any]]:
        partition = current_event().message.partition  # type: ignore[union-attr]  # set by _as_current
        sent = []
        for table, value in ((self.states, state), (self.interests, record)):
            if value is not None:
                table.data[key] = value  # RocksDB, in the partition of the current event
                sent.append(table.send_changelog(partition, key, value))
        return sent

    def delete(self, key: bytes) -> list[Awaitable[Any]]:
        """The key out of both tables: RocksDB, and a tombstone (null value) on each changelog, sent even when
        RocksDB had no key (a crash may have come between the two), so a restore cannot bring the user back."""
        partition = current_event().message.partition  # type: ignore[union-attr]  # set by _as_current
        sent = []
        for table in (self.states, self.interests):
            del table.data[key]  # RocksDB (a missing key is no error)
            sent.append(table.send_changelog(partition, key, None, value_serializer="raw"))  # raw: None stays None
        return sent


Pairs = Sequence[tuple[Event, EventT]]
Where = tuple[int, int, int]  # (partition, offset, index in its batch envelope; -1 for a plain message)
Seen = set[Where]  # what this batch already dead-lettered or executed
DeadLetters = list[tuple[Where, Awaitable[Any]]]  # this attempt's DLQ sends, awaited at its end
Elements = dict[int, tuple[int, bytes]]  # id(event) -> (index, own bytes), for the events of batch envelopes


class BatchStep:
    """Validate, fold per user, infer, store, publish: one `take()` batch. Dependencies are passed in, so the step
    runs in unit tests on fakes.

    Effectively once, per user: the new state and its record are written (RocksDB + changelogs, awaited) before
    the record is published, and the state remembers the highest input offset it holds. After a crash the
    uncommitted input is read again; those events are replays (`Outcome.REPLAY`), which change nothing, and the
    user's stored record is published again byte for byte. So a `(user, seq)` has exactly one content, a valid
    event is never dead-lettered because of a crash, and `events_seen` / `sessions_seen` stay exact.
    """

    def __init__(
        self,
        settings: Settings,
        tables: Tables,
        dlq: Sendable,
        output: Sendable,
        model: InterestModel | None,
        *,
        on_stage: Callable[[str, int], None] | None = None,
    ) -> None:
        self.tables, self.dlq, self.output, self.model = tables, dlq, output, model
        self.session_cfg = settings.session_config()
        self.limits = {
            "max_bytes": settings.event_max_bytes,
            "max_envelope_bytes": settings.event_envelope_max_bytes,
            "max_future_ms": round(settings.event_max_future_s * 1000),
        }
        self.dlq_max_bytes, self.stall_s = settings.dlq_max_value_bytes, settings.health_stall_s
        self.on_stage = on_stage or (lambda point, published: None)
        self.published = 0
        self.sleep = asyncio.sleep  # the retry back-off (tests pass a fake)
        self.started: dict[int, float] = {}  # batches in flight: id -> monotonic start
        self.failing: set[int] = set()  # batches whose last attempt failed (being retried)

    async def process_until_done(self, batch: list[EventT]) -> None:
        """Faust acks a take() batch even when the agent raises, so a failed batch is retried here, never left
        (stream/isolation.py): an outage stalls its partitions loudly (lag alert, /health degraded, ERROR logs)
        instead of committing lost updates, and a message that fails the step by itself is dead-lettered alone
        (reason `internal`) while the rest is applied. A retried batch never dead-letters a message twice."""
        seen, me = Seen(), id(batch)
        self.started[me] = time.monotonic()
        metrics.MESSAGES_READ.inc(len(batch))

        def failed(error: BaseException, size: int) -> None:
            self.failing.add(me)
            metrics.BATCH_FAILURES.inc()

        try:
            culprits = await Retrier(lambda part: self.process(part, seen), on_failure=failed, sleep=self.sleep).run(
                batch
            )
            if culprits:
                dead = DeadLetters()
                for culprit in culprits:
                    await self.dead_letter(culprit.message, _internal(culprit.error), seen, dead)  # type: ignore[arg-type]
                await asyncio.gather(*(sent for _, sent in dead))
                metrics.MESSAGES_ISOLATED.inc(len(culprits))
        finally:
            self.started.pop(me, None)
            self.failing.discard(me)

    async def process(self, batch: list[EventT], seen: Seen | None = None) -> None:
        seen, dead = (Seen() if seen is None else seen), DeadLetters()
        try:
            await self._process(batch, seen, dead)
        finally:  # also when the attempt fails: a retry must know exactly which DLQ records were delivered
            results = await asyncio.gather(*(sent for _, sent in dead), return_exceptions=True)
            seen.update(where for (where, _), r in zip(dead, results, strict=True) if not isinstance(r, BaseException))
            if failed := next((r for r in results if isinstance(r, BaseException)), None):
                raise failed

    async def _process(self, batch: list[EventT], seen: Seen, dead: DeadLetters) -> None:
        by_user: dict[bytes, list[tuple[Event | Forget, EventT]]] = {}
        elements: Elements = {}
        forgets = False
        for ev in batch:
            msg = ev.message
            for part in parse_message(msg.value, msg.key or b"", **self.limits):
                if isinstance(parsed := part.parsed, Rejection):
                    await self.dead_letter(ev, parsed, seen, dead, part.index, part.raw)
                    continue
                by_user.setdefault(msg.key, []).append((parsed, ev))
                forgets = forgets or isinstance(parsed, Forget)
                if part.raw is not None:  # an event of an envelope: late, it is dead-lettered alone
                    elements[id(parsed)] = (part.index, part.raw)
        if forgets:  # rare: the common batch skips this pass
            by_user = await self.forget(by_user, seen)  # type: ignore[assignment]  # events only from here on
        to_publish: list[tuple[bytes, UserState, Pairs]] = []
        republish: list[tuple[bytes, bytes]] = []
        for key, pairs in by_user.items():
            old, state, report = await self.fold(key, pairs, seen, dead, elements)
            if Outcome.REPLAY in report.outcomes and (stored := self.tables.get_record(key)) is not None:
                republish.append((key, stored))  # it may not have reached the output before the crash
            if self.model is not None and state.dirty:  # changed now, or stored while inference was off
                to_publish.append((key, state, pairs))
            elif state is not old:  # ingest only, or identities' bookkeeping: store, nothing to publish
                await asyncio.gather(*self.store(key, state, pairs, None))
        if republish:  # before any newer record of the same users, so a consumer sees seq in order
            await asyncio.gather(*[await self.output.send(key=key, value=rec) for key, rec in republish])
            metrics.OUTPUTS_REPUBLISHED.inc(len(republish))
        if to_publish:
            await self.publish(to_publish)

    async def forget(
        self, by_user: dict[bytes, list[tuple[Event | Forget, EventT]]], seen: Seen
    ) -> dict[bytes, list[tuple[Event, EventT]]]:
        """Execute each user's last forget of the batch: the tables (RocksDB + changelog tombstones, awaited), then a
        tombstone on the output topic (awaited). Hands back the events after it, which fold into an empty state (a
        fresh history, seq restarts at 1); those before it are never folded. A forget read again after a crash is
        skipped when a newer state exists (`forget_is_replay`: that is the fresh history), else it runs again."""
        events: dict[bytes, list[tuple[Event, EventT]]] = {}
        erase: list[tuple[bytes, EventT]] = []
        for key, pairs in by_user.items():
            last = max((i for i, (m, _) in enumerate(pairs) if isinstance(m, Forget)), default=-1)
            if after := [(e, ev) for e, ev in pairs[last + 1 :] if isinstance(e, Event)]:
                events[key] = after
            if last >= 0:
                ev = pairs[last][1]
                _as_current(ev)  # the table read is in the partition of the user's own message
                done = (ev.message.partition, ev.message.offset, -1) in seen  # by an earlier attempt at this batch
                if not done and not forget_is_replay(decode_state(self.tables.get_state(key)), ev.message.offset):
                    erase.append((key, ev))
        if erase:
            deleted: list[Awaitable[Any]] = []
            for key, ev in erase:
                _as_current(ev)  # the changelog tombstones go to the partition of the user's key
                deleted += self.tables.delete(key)
            await asyncio.gather(*deleted)
            self.on_stage("after_forget_tables", self.published)
            await asyncio.gather(*[await self.output.send(key=key, value=None) for key, _ in erase])
            seen.update((ev.message.partition, ev.message.offset, -1) for _, ev in erase)
            metrics.USERS_FORGOTTEN.inc(len(erase))
        return events

    async def fold(
        self, key: bytes, pairs: Pairs, seen: Seen, dead: DeadLetters, elements: Elements | None = None
    ) -> tuple[UserState, UserState, Applied]:
        """Fold one user's events into its stored state: (stored state, new state, what each event did)."""
        _as_current(pairs[-1][1])
        state = decode_state(self.tables.get_state(key))
        offsets = [ev.message.offset for _, ev in pairs]
        new_state, report = apply_events(state, [e for e, _ in pairs], self.session_cfg, offsets)
        for outcome, (event, ev) in zip(report.outcomes, pairs, strict=True):
            if outcome is Outcome.APPLIED:
                metrics.EVENTS_CONSUMED.labels(metrics.event_type_label(event.event_type)).inc()
            elif outcome is Outcome.DUPLICATE:
                metrics.DUPLICATES_IGNORED.inc()
            elif outcome is Outcome.REPLAY:
                metrics.EVENTS_REPLAYED.inc()
            else:
                lag_s = (new_state.ts[-1] - event.timestamp) / 1000
                reason = Rejection("late", f"event time is {lag_s:.0f} s behind the user's latest")
                index, raw = (elements or {}).get(id(event), (-1, None))
                await self.dead_letter(ev, reason, seen, dead, index, raw)
        metrics.SESSIONS_STARTED.inc(report.new_sessions)
        return state, new_state, report

    async def publish(self, updates: list[tuple[bytes, UserState, Pairs]]) -> None:
        """Infer; store the new states with their records and wait for the changelogs; then publish."""
        assert self.model is not None
        metrics.USERS_PENDING.set(len(updates))
        states = [replace(state, seq=state.seq + 1, dirty=False) for _, state, _ in updates]
        records = await self.model.records([key.decode() for key, _, _ in updates], states)
        durable = [
            sent
            for (key, _, pairs), state, rec in zip(updates, states, records, strict=True)
            for sent in self.store(key, state, pairs, rec)
        ]
        await asyncio.gather(*durable)
        self.on_stage("before_publish", self.published)
        delivered = [
            await self.output.send(key=key, value=rec) for (key, _, _), rec in zip(updates, records, strict=True)
        ]
        await asyncio.gather(*delivered)
        published_at = time.time()
        metrics.OUTPUTS_PUBLISHED.inc(len(records))
        self.published += len(records)
        self.on_stage("after_publish", self.published)
        for _, _, pairs in updates:
            for event, ev in pairs:
                metrics.EVENT_TO_OUTPUT_SECONDS.observe(max(0.0, published_at - ev.message.timestamp))
                metrics.EVENT_TIME_LAG_SECONDS.observe(max(0.0, published_at - event.timestamp / 1000))
        metrics.USERS_PENDING.set(0)

    def store(self, key: bytes, state: UserState, pairs: Pairs, record: bytes | None) -> list[Awaitable[Any]]:
        _as_current(pairs[-1][1])
        data = encode_state(state)
        metrics.STATE_BYTES.observe(len(data))
        return self.tables.put(key, data, record)

    async def dead_letter(
        self,
        ev: EventT,
        rejection: Rejection,
        seen: Seen,
        pending: DeadLetters,
        index: int = -1,
        raw: bytes | None = None,
    ) -> None:
        """One DLQ record per rejected message, or per rejected event of a batch envelope (`index`, its own bytes
        `raw`): the original bytes (truncated to DLQ_MAX_VALUE_BYTES, so a message too large to forward cannot
        block its partition) with the reason and the original's identity in headers."""
        msg = ev.message
        where = (msg.partition, msg.offset, index)
        if where in seen:
            return  # already dead-lettered by an earlier attempt at this batch
        value, key = (msg.value or b"") if raw is None else raw, msg.key or b""
        headers = [
            ("dlq.reason", rejection.reason.encode()),
            *([("dlq.exception", rejection.error.encode()[:4096])] if isinstance(rejection, Internal) else []),
            ("dlq.detail", rejection.detail.encode()[:1024]),
            ("dlq.topic", msg.topic.encode()),
            ("dlq.partition", str(msg.partition).encode()),
            ("dlq.offset", str(msg.offset).encode()),
            *([("dlq.index", str(index).encode())] if index >= 0 else []),
            ("dlq.time_ms", str(int(time.time() * 1000)).encode()),
            ("dlq.original_bytes", str(len(value)).encode()),
            ("dlq.sha256", hashlib.sha256(value).hexdigest().encode()),
        ]
        if len(value) > self.dlq_max_bytes or len(key) > 1024:
            headers.append(("dlq.truncated", b"1"))
        sent = await self.dlq.send(key=key[:1024], value=value[: self.dlq_max_bytes], headers=headers)
        pending.append((where, sent))
        metrics.EVENTS_REJECTED.labels(rejection.reason).inc()

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


class Internal(Rejection, frozen=True):
    """Reason `internal`: the step failed on this message by itself (stream/isolation.py); `error` is the
    exception with its traceback, for the `dlq.exception` header."""

    error: str = ""


def _internal(error: Exception) -> Internal:
    trace = "".join(traceback.format_exception(error))
    return Internal("internal", f"the worker failed on this message: {type(error).__name__}: {error}", trace[-4096:])


def _as_current(event: EventT) -> None:
    """Faust picks the RocksDB partition of a table read, and the changelog partition of a write, from the
    *current* event, which inside take_events() is the batch's last one. Make it this user's own event."""
    _current_event.set(weakref.ref(event))
