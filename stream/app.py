"""The Faust worker: app, topics, the user table, the agent and the timers, declared plainly.

One event, input topic to output record (docs/architecture.md): the `ingest` agent takes a batch ->
`stream.step.BatchStep` validates it (`core.schema.parse_message`) and folds each user's events into the stored
state (`core.sessions.apply_events`) -> `stream.inference.InterestModel` encodes the changed users
(`core.encoding`), asks Triton once for the batch and builds the records (`core.schema.InterestRecord`) -> the new
state and record go to the user table (stream/tables.py: changelog acknowledged, then RocksDB) -> the record goes
to the output topic. Bad input goes to `<events>-dlq` with the reason in headers (stream/deadletter.py): the worker
never stops on input. A `forget` control message erases its user (stream/erasure.py; docs/events.md).

Batches overlap (stream/overlap.py): the next one is folded while one waits for Triton and the acks, a user's
writes and records staying in order. Nothing lost, nothing conflicting (docs/output.md): a batch's offsets are
committed only after its step finished (the agent acknowledges it then); a crash anywhere in between re-reads the
events, which the stored state recognises as replays by their offset, and the stored record is published again,
byte for byte.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import faust
import mode

from core.schema import decode_record, encode_record, in_scenario
from stream import consumer, metrics
from stream.batching import take_batches
from stream.continuity import BrokerReader, Continuity
from stream.fencing import for_app
from stream.inference import InterestModel
from stream.overlap import Overlap
from stream.sending import DirectTopic
from stream.settings import Settings
from stream.step import BatchStep
from stream.tables import TABLE, UserTable

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, on_stage: Callable[[str, int], None] | None = None) -> faust.App:
    """The worker's Faust app. `on_stage(point, published)` is called at points of the write and publish path
    (tests' fault injection: see local/faults.py); production passes nothing."""
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
    consumer.install(app, [settings.topic_events])  # dropped messages are read again, also without a commit
    # bytes keys and values make Faust use its "raw" codec: our own msgpack / JSON formats are the values.
    raw = {"key_serializer": "raw", "value_serializer": "raw", "partitions": settings.topic_partitions}
    events_topic = app.topic(settings.topic_events, **raw)
    dlq_topic = app.topic(settings.topic_dlq, **raw)
    output_topic = app.topic(settings.topic_output, **raw)
    users = app.Table(TABLE, partitions=settings.topic_partitions, key_type=bytes, value_type=bytes)

    model = InterestModel(settings) if settings.triton_url else None
    if model is None:
        log.warning("TRITON_URL is empty: ingest only (state is kept, no interest is published)")
    table = UserTable(users, DirectTopic(users.changelog_topic), on_stage=lambda point: step.stage(point))
    output = DirectTopic(output_topic)
    step = BatchStep(settings, table, dlq_topic, output, model, on_stage=on_stage, fence=for_app(app).check)

    # One actor for all partitions. Faust's isolated_partitions (one actor per partition) lost updates in our crash
    # loop (tests/test_pipeline.py): after a restart a partition's events reached its actor out of offset order.
    # Head-of-line blocking is bounded instead by small per-partition fetches, which Faust hands over round-robin
    # across partitions: a user sending 100k events delays another partition by one fetch of the hot one.
    reader = BrokerReader(settings.kafka_client_kwargs(), settings.app_id, settings.topic_events)
    continuity = Continuity(reader, settings.topic_events, lambda: app.consumer_generation_id)

    @app.agent(events_topic)
    async def ingest(stream: faust.StreamT) -> None:
        overlap = Overlap(step, depth=settings.worker_batches_in_flight)
        try:
            async for batch in take_batches(stream, settings.worker_batch_max, within=settings.worker_batch_wait_s):
                events, filled = await gap_free(batch)
                await overlap.submit(events, partial(acknowledge, stream, batch, filled))
        finally:
            await overlap.close()

    async def acknowledge(stream: faust.StreamT, batch: list[Any], filled: list[Any]) -> None:
        """A finished batch's messages are done: Faust commits up to the contiguous acknowledged offsets."""
        for ev in batch:
            await stream.ack(ev)
        for ev in filled:  # Faust never saw them: acknowledged here, so its commit covers them
            app.consumer.ack(ev.message)

    async def gap_free(batch: list[Any]) -> tuple[list[Any], list[Any]]:
        """The batch with its gaps filled (stream/continuity.py); a broker error is waited out, never raised:
        the agent must not fail a batch that Faust acknowledges anyway."""
        delay_s = 0.5
        while True:
            try:
                return await continuity.fill(batch)
            except Exception:
                log.exception("checking the batch's offsets failed; retrying in %.1f s", delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(2 * delay_s, 30.0)

    @app.service
    class CloseReader(mode.Service):
        async def on_stop(self) -> None:
            await reader.close()

    def active_partitions() -> list[int]:
        return sorted(tp.partition for tp in app.consumer.assignment() if tp.topic == settings.topic_events)

    @app.timer(interval=5.0)
    async def update_lag() -> None:
        """Consumer lag of this worker's events partitions: end offset minus the last committed offset."""
        tps = [tp for tp in app.consumer.assignment() if tp.topic == settings.topic_events]
        ends = await app.consumer.highwaters(*tps) if tps else {}
        committed = app.monitor.tp_committed_offsets  # Faust's sensor API (updated on every commit)
        metrics.set_consumer_lag({tp.partition: max(0, ends[tp] - (committed.get(tp) or 0)) for tp in tps})

    if model is not None:

        @app.timer(interval=settings.model_poll_s)
        async def poll_model_versions() -> None:
            """Switch to a newly loaded model version (or refuse it) even while no events arrive."""
            await model.versions.refresh()

    @app.timer(interval=30.0)
    async def count_users() -> None:
        metrics.USERS_IN_STATE.set(table.estimated_users(active_partitions()))  # O(1) per partition

    @app.page("/users/{user_id}/interest")
    @app.table_route(table=users, match_info="user_id")
    async def interest_view(web: faust.web.View, request: faust.web.Request, user_id: str) -> faust.web.Response:
        """The latest record; `?scenario=app`: the interest and top items asked about that scenario."""
        value = table.get_any(user_id.encode())
        if value is None or value.record is None:
            return web.json({"error": f"unknown user {user_id!r}"}, status=404)
        if not (scenario := request.query.get("scenario")):
            return web.bytes(value.record, content_type="application/json")
        record = decode_record(value.record)
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
