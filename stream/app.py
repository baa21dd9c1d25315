"""The Faust worker: app, topics, tables, the agent and the web views, declared in one place.

Path of one event: events topic -> `ingest` (validate with stream.events, fold with stream.sessions) ->
model inputs (models.encoding) -> Triton (stream.inference) -> interest record (stream.output) on the output
topic -> `user_state` and `user_interest` tables (RocksDB + changelogs). Invalid and late events go to
`<events>-dlq` with their original bytes and the reason in headers: the worker never stops on input.

No lost updates: a batch's events are acknowledged only after the agent finishes the batch, and a user's new
state is written only after its interest record was delivered. A crash anywhere in between leaves the events
uncommitted and the stored state as it was, so after a restart the same events are applied again and the user
is inferred and published again (the same `seq`: consumers drop the repeat).
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import replace

import faust
from faust.streams import _current_event
from faust.types import EventT

from stream import metrics
from stream.events import Event, Rejection, parse_event
from stream.sessions import Outcome, UserState, apply_events, decode_state, encode_state
from stream.settings import Settings

log = logging.getLogger(__name__)

STATE_TABLE = "user_state"
INTEREST_TABLE = "user_interest"
Pairs = Sequence[tuple[Event, EventT]]


def changelog_topic_name(settings: Settings, table: str = STATE_TABLE) -> str:
    return f"{settings.app_id}-{table}-changelog"


def _as_current(event: EventT) -> None:
    """Faust picks the RocksDB partition of a table read, and the changelog partition of a write, from the
    *current* event, which inside take_events() is the batch's last one. Make it this user's own event."""
    _current_event.set(weakref.ref(event))


def create_app(settings: Settings) -> faust.App:
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{server}" for server in settings.kafka_bootstrap_servers.split(",")],
        broker_credentials=_credentials(settings),
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
    partitions = settings.topic_partitions
    events_topic = app.topic(settings.topic_events, key_serializer="raw", value_serializer="raw", partitions=partitions)
    dlq_topic = app.topic(settings.topic_dlq, key_serializer="raw", value_serializer="raw", partitions=partitions)
    output_topic = app.topic(settings.topic_output, key_serializer="raw", value_serializer="raw", partitions=partitions)
    # bytes keys and values make Faust use its "raw" codec: our own msgpack / JSON formats are the values.
    user_state = app.Table(STATE_TABLE, partitions=partitions, key_type=bytes, value_type=bytes)
    user_interest = app.Table(INTEREST_TABLE, partitions=partitions, key_type=bytes, value_type=bytes)

    session_cfg = settings.session_config()
    max_bytes, max_future_ms = settings.event_max_bytes, round(settings.event_max_future_s * 1000)
    publisher = Publisher(settings) if settings.triton_url else None
    if publisher is None:
        log.warning("TRITON_URL is empty: ingest only (state is kept, no interest is published)")

    async def dead_letter(event: EventT, rejection: Rejection) -> None:
        msg = event.message
        metrics.EVENTS_REJECTED.labels(rejection.reason).inc()
        headers = [
            ("dlq.reason", rejection.reason.encode()),
            ("dlq.detail", rejection.detail.encode()[:1024]),
            ("dlq.topic", msg.topic.encode()),
            ("dlq.partition", str(msg.partition).encode()),
            ("dlq.offset", str(msg.offset).encode()),
            ("dlq.time_ms", str(int(time.time() * 1000)).encode()),
        ]
        await dlq_topic.send(key=msg.key, value=msg.value, headers=headers)

    @app.agent(events_topic)
    async def ingest(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(settings.worker_batch_max, within=settings.worker_batch_wait_s):
            await process_until_done(batch)

    async def process_until_done(batch: list[EventT]) -> None:
        """Faust acks a take() batch even when the agent raises, so a failed batch is retried here, never left:
        a stuck batch stalls the partition loudly (lag alert, ERROR logs) instead of committing lost updates."""
        delay_s = 0.5
        while True:
            try:
                return await process(batch)
            except Exception:
                metrics.BATCH_FAILURES.inc()
                log.exception("batch of %d events failed; retrying in %.1f s (offsets stay uncommitted)",
                              len(batch), delay_s)  # fmt: skip
                await asyncio.sleep(delay_s)
                delay_s = min(2 * delay_s, 30.0)

    async def process(batch: list[EventT]) -> None:
        """Validate, fold per user, infer and publish. Safe to repeat: stored states only move forward."""
        by_user: dict[bytes, list[tuple[Event, EventT]]] = {}
        for ev in batch:
            parsed = parse_event(
                ev.message.value, ev.message.key or b"", max_bytes=max_bytes, max_future_ms=max_future_ms
            )
            if isinstance(parsed, Rejection):
                await dead_letter(ev, parsed)
            else:
                by_user.setdefault(ev.message.key, []).append((parsed, ev))
        to_publish: list[tuple[bytes, UserState, Pairs]] = []
        for key, pairs in by_user.items():
            state, changed = await apply_user(pairs)
            if publisher is None:
                if changed:
                    write_state(key, state, pairs)
            elif state.dirty:  # changed now, or stored unpublished (written while inference was off)
                to_publish.append((key, state, pairs))
        if to_publish:
            await publish(to_publish)

    async def apply_user(pairs: Pairs) -> tuple[UserState, bool]:
        """Fold one user's events into its stored state; the new state and whether it changed."""
        _as_current(pairs[-1][1])
        state = decode_state(user_state.get(pairs[-1][1].message.key))
        new_state, report = apply_events(state, [e for e, _ in pairs], session_cfg)
        for outcome, (event, ev) in zip(report.outcomes, pairs, strict=True):
            if outcome is Outcome.APPLIED:
                metrics.EVENTS_CONSUMED.labels(metrics.event_type_label(event.event_type)).inc()
            elif outcome is Outcome.DUPLICATE:
                metrics.DUPLICATES_IGNORED.inc()
            else:
                lag_s = (new_state.ts[-1] - event.timestamp) / 1000
                await dead_letter(ev, Rejection("late", f"event time is {lag_s:.0f} s behind the user's latest"))
        metrics.SESSIONS_STARTED.inc(report.new_sessions)
        return new_state, report.changed

    def write_state(key: bytes, state: UserState, pairs: Pairs) -> None:
        _as_current(pairs[-1][1])
        data = encode_state(state)
        metrics.STATE_BYTES.observe(len(data))
        user_state[key] = data

    async def publish(updates: list[tuple[bytes, UserState, Pairs]]) -> None:
        """Infer, publish and wait for delivery, and only then store the new states (see the module docstring)."""
        assert publisher is not None
        metrics.USERS_PENDING.set(len(updates))
        states = [replace(state, seq=state.seq + 1, dirty=False) for _, state, _ in updates]
        publisher.maybe_fault("before_publish")
        records = await publisher.records([key.decode() for key, _, _ in updates], states)
        delivered = [
            await output_topic.send(key=key, value=rec) for (key, _, _), rec in zip(updates, records, strict=True)
        ]
        await asyncio.gather(*delivered)
        published_at = time.time()
        metrics.OUTPUTS_PUBLISHED.inc(len(records))
        publisher.published += len(records)
        publisher.maybe_fault("after_publish")
        for (key, _, pairs), state, rec in zip(updates, states, records, strict=True):
            write_state(key, state, pairs)
            user_interest[key] = rec
            for event, ev in pairs:
                metrics.EVENT_TO_OUTPUT_SECONDS.observe(max(0.0, published_at - ev.message.timestamp))
                metrics.EVENT_TIME_LAG_SECONDS.observe(max(0.0, published_at - event.timestamp / 1000))
        metrics.USERS_PENDING.set(0)

    @app.timer(interval=5.0)
    async def update_lag() -> None:
        """Consumer lag of this worker's events partitions: end offset minus committed offset."""
        tps = [tp for tp in app.consumer.assignment() if tp.topic == settings.topic_events]
        ends = await app.consumer.highwaters(*tps) if tps else {}
        for tp in tps:
            committed = app.consumer._committed_offset.get(tp) or 0  # Faust keeps no public accessor
            metrics.CONSUMER_LAG.labels(str(tp.partition)).set(max(0, ends[tp] - committed))

    @app.timer(interval=30.0)
    async def count_users() -> None:
        """Users in this worker's state: an exact key count (RocksDB's estimate counts overwrites too)."""
        dbs = getattr(user_state.data, "_dbs", {})  # the store's open partition DBs; no public accessor
        metrics.USERS_IN_STATE.set(sum(sum(1 for _ in db.keys()) for db in list(dbs.values())))  # noqa: SIM118

    @app.page("/users/{user_id}/interest")
    @app.table_route(table=user_interest, match_info="user_id")
    async def interest_view(web: faust.web.View, request: faust.web.Request, user_id: str) -> faust.web.Response:
        value = user_interest.get(user_id.encode())
        if value is None:
            return web.json({"error": f"unknown user {user_id!r}"}, status=404)
        return web.bytes(value, content_type="application/json")

    @app.page("/health")
    async def health_view(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        circuit_open = publisher is not None and publisher.breaker_open
        body = {"status": "degraded" if circuit_open else "ok", "inference": publisher is not None}
        return web.json(body | {"triton_circuit_open": circuit_open})

    return app


class Publisher:
    """The inference side of the agent: model bundle, Triton client (created on the worker's loop) and faults."""

    def __init__(self, settings: Settings) -> None:
        from stream.inference import ModelBundle

        self.settings = settings
        self.bundle = ModelBundle.load(settings.model_dir)
        self.client = None
        self.published = 0

    @property
    def breaker_open(self) -> bool:
        return self.client is not None and self.client.breaker.is_open

    async def records(self, users: list[str], states: list[UserState]) -> list[bytes]:
        from models.encoding import encode_batch
        from stream.inference import InterestClient
        from stream.output import build_records, encode_record

        if self.client is None:
            self.client = InterestClient(self.settings, self.bundle)
        outputs = await self.client.infer(encode_batch(states, self.bundle.vocab, self.bundle.encoder))
        return [encode_record(r) for r in build_records(users, states, outputs, self.bundle)]

    def maybe_fault(self, point: str) -> None:
        if self.settings.fault_kill_at == point and self.published >= self.settings.fault_kill_after_outputs:
            log.error("fault injection: SIGKILL %s after %d outputs", point, self.published)
            os.kill(os.getpid(), signal.SIGKILL)


def _credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    kwargs = settings.kafka_client_kwargs()
    ssl_context = kwargs.get("ssl_context")
    if settings.kafka_sasl_mechanism:
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=kwargs["sasl_plain_password"],
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=ssl_context,
        )
    if ssl_context is not None:
        return faust.SSLCredentials(ssl_context)
    return None


async def check_inference(settings: Settings) -> None:
    """Refuse to start, with a clear message, if Triton serves a model that differs from what we encode."""
    from stream.inference import InterestClient, ModelBundle

    client = InterestClient(settings, ModelBundle.load(settings.model_dir))
    try:
        await client.check_model()
    finally:
        await client.close()


def run_worker(settings: Settings, *, hard_exit: bool = True) -> None:
    """Run one worker until SIGTERM/SIGINT; a clean stop leaves the consumer group at once.

    `hard_exit`: end the process with `os._exit` once Faust's shutdown is done (tables closed, producer flushed,
    group left). A worker in a benchmark stayed alive after Faust logged "Closing event loop", so the SIGTERM
    never finished; `Worker` also puts a deadline on the shutdown itself and dumps every thread's stack if it
    is missed, so the next such hang says where it is.
    """
    from prometheus_client import start_http_server

    if settings.triton_url:
        asyncio.run(check_inference(settings))
    app = create_app(settings)
    metrics.BUILD_INFO.info({"worker_version": _version(), **_model_info(settings)})
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    worker = Worker(app, loglevel=settings.worker_log_level.upper(), override_logging=True)
    if not hard_exit:
        worker.execute_from_commandline()  # ends in SystemExit
        return
    code = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        log.exception("worker crashed")
        code = 1
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


class Worker(faust.Worker):
    """Faust's worker with a deadline on its shutdown (see `run_worker`). Named `Worker` because mode logs the
    class name and readiness checks look for "[^Worker]: Ready"."""

    shutdown_deadline_s = 30.0

    def on_worker_shutdown(self) -> None:
        super().on_worker_shutdown()
        threading.Thread(target=self._exit_if_still_here, name="shutdown-deadline", daemon=True).start()

    def _exit_if_still_here(self) -> None:
        time.sleep(self.shutdown_deadline_s)
        closed = self.loop.is_closed()  # after "Closing event loop" every service has stopped cleanly
        sys.stderr.write(f"worker shutdown still running after {self.shutdown_deadline_s:.0f} s (event loop "
                         f"closed: {closed}); thread stacks follow, then exit\n")  # fmt: skip
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(0 if closed else 1)


def _version() -> str:
    from importlib.metadata import version

    return version("interest-stream")


def _model_info(settings: Settings) -> dict[str, str]:
    if not settings.triton_url:
        return {"model_name": "", "model_version": ""}
    from stream.inference import ModelBundle

    bundle = ModelBundle.load(settings.model_dir)
    return {"model_name": bundle.name, "model_version": bundle.version}
