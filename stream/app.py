"""The Faust worker: app, topics, the state table and the ingest agent, declared in one place.

Path of one event: events topic -> `ingest` (validate with stream.events, fold with stream.sessions) ->
`user_state` table (RocksDB + changelog topic). Invalid and late events go to `<events>-dlq` with their
original bytes and the reason in headers, so the worker never stops on input and loses nothing.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Sequence

import faust
from faust.streams import _current_event
from faust.types import EventT

from stream import metrics
from stream.events import Event, Rejection, parse_event
from stream.sessions import Outcome, apply_events, decode_state, encode_state
from stream.settings import Settings

log = logging.getLogger(__name__)

TABLE_NAME = "user_state"


def changelog_topic_name(settings: Settings) -> str:
    return f"{settings.app_id}-{TABLE_NAME}-changelog"


def create_app(settings: Settings) -> faust.App:
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{server}" for server in settings.kafka_bootstrap_servers.split(",")],
        broker_credentials=_credentials(settings),
        store="rocksdb://",
        datadir=str(settings.state_dir),
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        web_host=settings.worker_web_host,
        web_port=settings.worker_web_port or 6066,  # Faust validates the port even when the server is off
        web_enabled=settings.worker_web_port != 0,
        stream_buffer_maxsize=max(4096, 2 * settings.worker_batch_max),
    )
    events_topic = app.topic(
        settings.topic_events, key_serializer="raw", value_serializer="raw", partitions=settings.topic_partitions
    )
    dlq_topic = app.topic(
        settings.topic_dlq, key_serializer="raw", value_serializer="raw", partitions=settings.topic_partitions
    )
    # bytes keys and values make Faust use its "raw" codec: the state's own msgpack format is the value.
    user_state = app.Table(TABLE_NAME, partitions=settings.topic_partitions, key_type=bytes, value_type=bytes)
    session_cfg = settings.session_config()
    max_bytes = settings.event_max_bytes
    max_future_ms = round(settings.event_max_future_s * 1000)

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
            by_user: dict[bytes, list[tuple[Event, EventT]]] = {}
            for ev in batch:
                parsed = parse_event(
                    ev.message.value, ev.message.key or b"", max_bytes=max_bytes, max_future_ms=max_future_ms
                )
                if isinstance(parsed, Rejection):
                    await dead_letter(ev, parsed)
                else:
                    by_user.setdefault(ev.message.key, []).append((parsed, ev))
            for key, pairs in by_user.items():
                await _apply_user(key, pairs)

    async def _apply_user(key: bytes, pairs: Sequence[tuple[Event, EventT]]) -> None:
        # Faust picks the RocksDB partition for a table read, and the changelog partition for a write, from
        # the *current* event, which inside take_events() is the batch's last one. Make it this user's own.
        _current_event.set(weakref.ref(pairs[-1][1]))
        state = decode_state(user_state.get(key))
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
        if report.changed:
            data = encode_state(new_state)
            metrics.STATE_BYTES.observe(len(data))
            user_state[key] = data

    return app


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


def run_worker(settings: Settings) -> None:
    """Run one worker until SIGTERM/SIGINT; a clean stop leaves the consumer group at once."""
    from prometheus_client import start_http_server

    app = create_app(settings)
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    worker = faust.Worker(app, loglevel=settings.worker_log_level.upper(), override_logging=True)
    worker.execute_from_commandline()
