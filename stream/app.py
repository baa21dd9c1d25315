"""The Faust worker: app, topics, tables and the agent, declared plainly; then the batch step it runs.

One event, input topic to output record (docs/architecture.md): the `ingest` agent takes a batch ->
`BatchStep.process` validates it (`core.schema.parse_event`) and folds each user's events into the stored state
(`core.sessions.apply_events`) -> `stream.inference.InterestModel` encodes the changed users (`core.encoding`),
asks Triton once for the batch and builds the records (`core.schema.InterestRecord`) -> the output topic; then
the new states go to the `user_state` table (RocksDB + changelog). Bad input goes to `<events>-dlq` with the
reason in headers: the worker never stops on input.

No lost updates: a batch's events are acknowledged only after the agent finishes the batch, and a user's new
state is written only after its interest record was delivered. A crash anywhere in between leaves the events
uncommitted and the stored state as it was, so after a restart the same events are applied again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import faust
from faust.streams import _current_event
from faust.types import EventT

from core.schema import Event, Rejection, parse_event
from core.sessions import Outcome, UserState, apply_events, decode_state, encode_state
from stream import metrics
from stream.inference import InterestModel
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
    )
    # bytes keys and values make Faust use its "raw" codec: our own msgpack / JSON formats are the values.
    raw = {"key_serializer": "raw", "value_serializer": "raw", "partitions": settings.topic_partitions}
    events_topic = app.topic(settings.topic_events, **raw)
    dlq_topic = app.topic(settings.topic_dlq, **raw)
    output_topic = app.topic(settings.topic_output, **raw)
    user_state = app.Table(STATE_TABLE, partitions=settings.topic_partitions, key_type=bytes, value_type=bytes)
    user_interest = app.Table(INTEREST_TABLE, partitions=settings.topic_partitions, key_type=bytes, value_type=bytes)

    model = InterestModel.load(settings) if settings.triton_url else None
    if model is None:
        log.warning("TRITON_URL is empty: ingest only (state is kept, no interest is published)")
    step = BatchStep(settings, user_state, user_interest, dlq_topic, output_topic, model, on_stage=on_stage)

    @app.agent(events_topic)
    async def ingest(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(settings.worker_batch_max, within=settings.worker_batch_wait_s):
            await step.process_until_done(batch)

    @app.timer(interval=5.0)
    async def update_lag() -> None:
        """Consumer lag of this worker's events partitions: end offset minus the last committed offset."""
        tps = [tp for tp in app.consumer.assignment() if tp.topic == settings.topic_events]
        ends = await app.consumer.highwaters(*tps) if tps else {}
        committed = app.monitor.tp_committed_offsets  # Faust's sensor API (updated on every commit)
        for tp in tps:
            metrics.CONSUMER_LAG.labels(str(tp.partition)).set(max(0, ends[tp] - (committed.get(tp) or 0)))

    @app.timer(interval=30.0)
    async def count_users() -> None:
        metrics.USERS_IN_STATE.set(len(user_state))  # keys of the active partitions (not standbys)

    @app.page("/users/{user_id}/interest")
    @app.table_route(table=user_interest, match_info="user_id")
    async def interest_view(web: faust.web.View, request: faust.web.Request, user_id: str) -> faust.web.Response:
        value = user_interest.get(user_id.encode())
        if value is None:
            return web.json({"error": f"unknown user {user_id!r}"}, status=404)
        return web.bytes(value, content_type="application/json")

    @app.page("/health")
    async def health_view(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        circuit_open = model is not None and model.breaker_open
        body = {"status": "degraded" if circuit_open else "ok", "inference": model is not None}
        return web.json(body | {"triton_circuit_open": circuit_open})

    return app


class Sendable(Protocol):
    """What the step needs of a topic (a Faust `Topic`, or a fake in unit tests)."""

    async def send(self, *, key: bytes, value: bytes, headers: Any = None) -> Awaitable[Any]: ...


Pairs = Sequence[tuple[Event, EventT]]


class BatchStep:
    """Validate, fold per user, infer, publish, store: one `take()` batch. Dependencies are passed in, so the step
    runs in unit tests on plain dicts and fake topics. Safe to repeat: stored states only move forward."""

    def __init__(
        self,
        settings: Settings,
        states: MutableMapping[bytes, bytes],
        interests: MutableMapping[bytes, bytes],
        dlq: Sendable,
        output: Sendable,
        model: InterestModel | None,
        *,
        on_stage: Callable[[str, int], None] | None = None,
    ) -> None:
        self.states, self.interests, self.dlq, self.output, self.model = states, interests, dlq, output, model
        self.session_cfg = settings.session_config()
        self.max_bytes, self.max_future_ms = settings.event_max_bytes, round(settings.event_max_future_s * 1000)
        self.on_stage = on_stage or (lambda point, published: None)
        self.published = 0

    async def process_until_done(self, batch: list[EventT]) -> None:
        """Faust acks a take() batch even when the agent raises, so a failed batch is retried here, never left:
        a stuck batch stalls the partition loudly (lag alert, ERROR logs) instead of committing lost updates."""
        delay_s = 0.5
        while True:
            try:
                return await self.process(batch)
            except Exception:
                metrics.BATCH_FAILURES.inc()
                log.exception("batch of %d events failed; retrying in %.1f s (offsets stay uncommitted)",
                              len(batch), delay_s)  # fmt: skip
                await asyncio.sleep(delay_s)
                delay_s = min(2 * delay_s, 30.0)

    async def process(self, batch: list[EventT]) -> None:
        by_user: dict[bytes, list[tuple[Event, EventT]]] = {}
        for ev in batch:
            msg = ev.message
            parsed = parse_event(msg.value, msg.key or b"", max_bytes=self.max_bytes, max_future_ms=self.max_future_ms)
            if isinstance(parsed, Rejection):
                await self.dead_letter(ev, parsed)
            else:
                by_user.setdefault(msg.key, []).append((parsed, ev))
        to_publish: list[tuple[bytes, UserState, Pairs]] = []
        for key, pairs in by_user.items():
            state, changed = await self.fold(key, pairs)
            if self.model is None:
                if changed:
                    self.store(key, state, pairs, None)
            elif state.dirty:  # changed now, or stored unpublished (written while inference was off)
                to_publish.append((key, state, pairs))
        if to_publish:
            await self.publish(to_publish)

    async def fold(self, key: bytes, pairs: Pairs) -> tuple[UserState, bool]:
        """Fold one user's events into its stored state; the new state and whether it changed."""
        _as_current(pairs[-1][1])
        state = decode_state(self.states.get(key))
        new_state, report = apply_events(state, [e for e, _ in pairs], self.session_cfg)
        for outcome, (event, ev) in zip(report.outcomes, pairs, strict=True):
            if outcome is Outcome.APPLIED:
                metrics.EVENTS_CONSUMED.labels(metrics.event_type_label(event.event_type)).inc()
            elif outcome is Outcome.DUPLICATE:
                metrics.DUPLICATES_IGNORED.inc()
            else:
                lag_s = (new_state.ts[-1] - event.timestamp) / 1000
                await self.dead_letter(ev, Rejection("late", f"event time is {lag_s:.0f} s behind the user's latest"))
        metrics.SESSIONS_STARTED.inc(report.new_sessions)
        return new_state, report.changed

    async def publish(self, updates: list[tuple[bytes, UserState, Pairs]]) -> None:
        """Infer, publish and wait for delivery, and only then store the new states (see the module docstring)."""
        assert self.model is not None
        metrics.USERS_PENDING.set(len(updates))
        states = [replace(state, seq=state.seq + 1, dirty=False) for _, state, _ in updates]
        self.on_stage("before_publish", self.published)
        records = await self.model.records([key.decode() for key, _, _ in updates], states)
        delivered = [
            await self.output.send(key=key, value=rec) for (key, _, _), rec in zip(updates, records, strict=True)
        ]
        await asyncio.gather(*delivered)
        published_at = time.time()
        metrics.OUTPUTS_PUBLISHED.inc(len(records))
        self.published += len(records)
        self.on_stage("after_publish", self.published)
        for (key, _, pairs), state, rec in zip(updates, states, records, strict=True):
            self.store(key, state, pairs, rec)
            for event, ev in pairs:
                metrics.EVENT_TO_OUTPUT_SECONDS.observe(max(0.0, published_at - ev.message.timestamp))
                metrics.EVENT_TIME_LAG_SECONDS.observe(max(0.0, published_at - event.timestamp / 1000))
        metrics.USERS_PENDING.set(0)

    def store(self, key: bytes, state: UserState, pairs: Pairs, record: bytes | None) -> None:
        _as_current(pairs[-1][1])
        data = encode_state(state)
        metrics.STATE_BYTES.observe(len(data))
        self.states[key] = data
        if record is not None:
            self.interests[key] = record

    async def dead_letter(self, ev: EventT, rejection: Rejection) -> None:
        msg = ev.message
        metrics.EVENTS_REJECTED.labels(rejection.reason).inc()
        headers = [
            ("dlq.reason", rejection.reason.encode()),
            ("dlq.detail", rejection.detail.encode()[:1024]),
            ("dlq.topic", msg.topic.encode()),
            ("dlq.partition", str(msg.partition).encode()),
            ("dlq.offset", str(msg.offset).encode()),
            ("dlq.time_ms", str(int(time.time() * 1000)).encode()),
        ]
        await self.dlq.send(key=msg.key, value=msg.value, headers=headers)


def _as_current(event: EventT) -> None:
    """Faust picks the RocksDB partition of a table read, and the changelog partition of a write, from the
    *current* event, which inside take_events() is the batch's last one. Make it this user's own event."""
    _current_event.set(weakref.ref(event))
