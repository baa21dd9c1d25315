"""Pipeline benchmark: events -> worker -> Triton -> interest records, against what Kafka alone can do.

One run, one local broker and one local Triton (the CPU twin of the exported model), five measurements:

1. **bare**: an aiokafka consume -> produce passthrough of the N events (no processing), events/s;
2. **pipeline**: a real worker ingests the same N events from a full topic (saturation), events/s, inference
   sequences per event, mean inference batch, and CPU seconds per event of the worker and of Triton;
3. **latency**: fresh events stamped with the send time, published at half the pipeline's rate for a while;
   event -> output latency = the output record's Kafka timestamp minus the newest event's timestamp;
4. **naive**: the same worker with `WORKER_BATCH_MAX=1` (one Triton request per event) on a smaller topic;
5. **serving**: the twin through Triton vs in-process onnxruntime at the mean batch size of step 2.

    interest-stream bench pipeline --events 1000000
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from local.pipeline import LocalPipeline
from local.scrape import Snapshot
from stream.settings import Settings


@dataclass(frozen=True)
class Saturation:
    events: int
    seconds: float
    outputs: float
    batches: float
    worker_cpu_s: float
    triton_cpu_s: float
    worker_rss_mb: float
    triton_rss_mb: float

    @property
    def eps(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def seq_per_event(self) -> float:
        return self.outputs / self.events if self.events else 0.0

    @property
    def mean_batch(self) -> float:
        return self.outputs / self.batches if self.batches else 0.0


@dataclass(frozen=True)
class PipelineResult:
    events: int
    users: int
    batch_max: int
    batch_wait_s: float
    bare_eps: float
    pipeline: Saturation
    naive: Saturation
    latency_rate: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_samples: int
    serving_batch: int
    triton_seq_s: float
    inprocess_seq_s: float

    @property
    def ratio(self) -> float:
        return self.pipeline.eps / self.bare_eps if self.bare_eps else 0.0

    @property
    def speedup(self) -> float:
        return self.pipeline.eps / self.naive.eps if self.naive.eps else 0.0

    @property
    def triton_vs_inprocess(self) -> float:
        return self.triton_seq_s / self.inprocess_seq_s if self.inprocess_seq_s else 0.0

    def result_line(self) -> str:
        return (
            f"RESULT pipeline_ratio={self.ratio:.3f} eps={self.pipeline.eps:.0f} "
            f"seq_per_event={self.pipeline.seq_per_event:.3f} speedup_vs_naive={self.speedup:.1f} "
            f"p50_ms={self.latency_p50_ms:.1f} p99_ms={self.latency_p99_ms:.1f} "
            f"triton_vs_inprocess={self.triton_vs_inprocess:.3f}"
        )


def run(
    events: int,
    users: int,
    repo: Path,
    *,
    batch_max: int | None = None,
    batch_wait_s: float | None = None,
    naive_events: int = 3_000,
    latency_s: float = 30.0,
    partitions: int = 8,
    seed: int = 0,
    log=print,
) -> PipelineResult:
    from local.bench.serving import bench_serving
    from local.broker import ensure_topics, run_sync
    from local.replay import publish
    from local.synthetic import generate

    defaults = Settings(_env_file=None)
    batch_max = batch_max or defaults.worker_batch_max
    batch_wait_s = batch_wait_s or defaults.worker_batch_wait_s
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        messages = generate(users, events, seed=seed)
        with LocalPipeline(
            root / "main", repo=repo, partitions=partitions, batch_max=batch_max, batch_wait_s=batch_wait_s,
            start_workers=False,
        ) as pipe:  # fmt: skip
            settings = pipe.settings
            log(f"publishing {events:,} synthetic events of {users:,} users ...")
            run_sync(publish(settings, messages, progress=False))
            passthrough = settings.model_copy(update={"topic_events": f"passthrough-{uuid.uuid4().hex[:6]}"})
            ensure_topics(passthrough, {passthrough.topic_events: partitions})
            bare_eps = run_sync(_passthrough(settings, passthrough.topic_events, events))
            log(f"bare consume->produce: {bare_eps:,.0f} ev/s; starting the worker ...")
            pipe.start_workers()
            sat = _saturate(pipe, events)
            log(f"pipeline: {sat.eps:,.0f} ev/s, {sat.seq_per_event:.3f} seq/event, mean batch {sat.mean_batch:.0f}")
            rate = max(1.0, sat.eps / 2)
            p50, p99, samples = run_sync(_latency(pipe.settings, rate, latency_s, users, seed))
            log(f"latency at {rate:,.0f} ev/s: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({samples:,} outputs)")
        with LocalPipeline(
            root / "naive", repo=repo, partitions=partitions, batch_max=1, batch_wait_s=batch_wait_s,
            start_workers=False,
        ) as pipe:  # fmt: skip
            n = min(naive_events, events)
            run_sync(publish(pipe.settings, messages.records[:n], progress=False))
            pipe.start_workers()
            naive = _saturate(pipe, n)
            log(f"naive (one request per event): {naive.eps:,.0f} ev/s")
        serving_batch = max(1, round(sat.mean_batch))
        served = bench_serving(repo, batch_sizes=(serving_batch,), seconds=3.0, rounds=3)[0]
    return PipelineResult(
        events=events,
        users=users,
        batch_max=batch_max,
        batch_wait_s=batch_wait_s,
        bare_eps=bare_eps,
        pipeline=sat,
        naive=naive,
        latency_rate=rate,
        latency_p50_ms=p50,
        latency_p99_ms=p99,
        latency_samples=samples,
        serving_batch=serving_batch,
        triton_seq_s=served.triton_seq_s,
        inprocess_seq_s=served.onnxruntime_seq_s,
    )


def _saturate(pipe: LocalPipeline, total: int, timeout_s: float = 3600.0) -> Saturation:
    """Time the worker from its first handled event until all `total` are handled and published."""
    from local.process import process_tree_cpu_s, process_tree_rss_mib

    worker, triton_pid = pipe.workers[0], pipe.pids["triton"]
    url = pipe.metrics_url
    deadline = time.monotonic() + timeout_s
    idle = Snapshot.scrape(url)
    cpu_idle = (process_tree_cpu_s(worker.pid), process_tree_cpu_s(triton_pid))
    first: Snapshot | None = None
    cpu_first = cpu_idle
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker did not handle {total} events in {timeout_s:.0f} s ({worker.log_path})")
        now = Snapshot.scrape(url)
        if now.handled == 0:  # the clock starts at the last poll that saw nothing handled (0.05 s resolution)
            idle, cpu_idle = now, (process_tree_cpu_s(worker.pid), process_tree_cpu_s(triton_pid))
        elif first is None:
            first, cpu_first = idle, cpu_idle
        if now.handled >= total and now.pending == 0:
            break
        time.sleep(0.05)
    cpu_end = (process_tree_cpu_s(worker.pid), process_tree_cpu_s(triton_pid))
    assert first is not None
    return Saturation(
        events=total,
        seconds=now.at - first.at,
        outputs=now.outputs - first.outputs,
        batches=now.batches - first.batches,
        worker_cpu_s=cpu_end[0] - cpu_first[0],
        triton_cpu_s=cpu_end[1] - cpu_first[1],
        worker_rss_mb=process_tree_rss_mib(worker.pid),
        triton_rss_mb=process_tree_rss_mib(triton_pid),
    )


async def _passthrough(settings: Settings, target: str, total: int) -> float:
    """A fresh-group aiokafka consumer forwarding every record to `target`; events/s from first to last."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    consumer = AIOKafkaConsumer(
        settings.topic_events, **settings.kafka_client_kwargs(), group_id=f"bare-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest", enable_auto_commit=False, max_partition_fetch_bytes=4 << 20,
    )  # fmt: skip
    producer = AIOKafkaProducer(**settings.kafka_client_kwargs(), acks="all", linger_ms=5, max_batch_size=1 << 20)
    await consumer.start()
    await producer.start()
    try:
        seen, t0 = 0, None
        while seen < total:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            t0 = t0 or time.perf_counter()
            sends = [
                await producer.send(target, key=r.key, value=r.value) for records in batches.values() for r in records
            ]
            await asyncio.gather(*sends)
            await consumer.commit()
            seen += len(sends)
        return total / (time.perf_counter() - t0) if t0 else 0.0
    finally:
        await consumer.stop()
        await producer.stop()


async def _latency(settings: Settings, rate: float, seconds: float, users: int, seed: int) -> tuple[float, float, int]:
    """Publish live events at `rate` for `seconds`; (p50 ms, p99 ms, samples) of their outputs' latency."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from core.schema import Event, decode_record, encode_event

    rng = random.Random(seed)
    consumer = AIOKafkaConsumer(**settings.kafka_client_kwargs(), group_id=None, enable_auto_commit=False)
    producer = AIOKafkaProducer(**settings.kafka_client_kwargs(), acks="all", linger_ms=1)
    await consumer.start()
    await producer.start()
    try:
        parts = [TopicPartition(settings.topic_output, p) for p in range(settings.topic_partitions)]
        consumer.assign(parts)
        await consumer.seek_to_end(*parts)
        for tp in parts:  # resolve the end offsets now: only outputs of the live events are read
            await consumer.position(tp)
        latencies: list[float] = []
        live_users = [f"live-{i}" for i in range(max(1, users // 10))]

        async def read_outputs(until: float) -> None:
            while time.monotonic() < until:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for r in records:
                        rec = decode_record(r.value)
                        if rec.user_id.startswith("live-"):
                            latencies.append(r.timestamp - rec.last_event_ms)

        reader = asyncio.create_task(read_outputs(time.monotonic() + seconds + 10.0))
        start, sent = time.monotonic(), 0
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * rate) - sent
            for _ in range(due):
                user = rng.choice(live_users)
                now_ms = int(time.time() * 1000)
                event = Event(user, f"i{rng.randrange(1000)}", "click", now_ms, event_id=f"{user}-{sent}")
                await producer.send(settings.topic_events, key=user.encode(), value=encode_event(event))
                sent += 1
            await asyncio.sleep(0.002)
        await producer.flush()
        await reader
    finally:
        await consumer.stop()
        await producer.stop()
    if not latencies:
        raise RuntimeError("no outputs for the live events")
    latencies.sort()
    pick = lambda q: float(latencies[min(len(latencies) - 1, int(q * len(latencies)))])  # noqa: E731
    return pick(0.50), pick(0.99), len(latencies)


def print_result(result: PipelineResult) -> None:
    from rich.console import Console
    from rich.table import Table

    p, n = result.pipeline, result.naive
    cpu_triton = p.triton_cpu_s / p.events * 1e6
    latency = f"p50 {result.latency_p50_ms:.1f} ms, p99 {result.latency_p99_ms:.1f} ms ({result.latency_samples:,})"
    serving = f"{result.triton_seq_s:,.0f} / {result.inprocess_seq_s:,.0f} seq/s = {result.triton_vs_inprocess:.3f}"
    table = Table(
        title=f"pipeline: {result.events:,} events, {result.users:,} users, "
        f"WORKER_BATCH_MAX={result.batch_max}, WORKER_BATCH_WAIT_S={result.batch_wait_s}, {os.cpu_count()} cores"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("bare aiokafka consume->produce", f"{result.bare_eps:,.0f} ev/s"),
        ("pipeline (worker + Triton, saturated)", f"{p.eps:,.0f} ev/s ({p.seconds:.1f} s)"),
        ("ratio pipeline / bare", f"{result.ratio:.3f}"),
        ("inference sequences per event", f"{p.seq_per_event:.3f} (mean batch {p.mean_batch:.0f})"),
        ("CPU µs per event: worker / Triton", f"{p.worker_cpu_s / p.events * 1e6:,.0f} / {cpu_triton:,.0f}"),
        ("RSS after the run: worker / Triton", f"{p.worker_rss_mb:,.0f} / {p.triton_rss_mb:,.0f} MiB"),
        ("naive: one request per event", f"{n.eps:,.0f} ev/s ({n.events:,} events)"),
        ("speed-up vs naive", f"{result.speedup:.1f}×"),
        (f"latency at {result.latency_rate:,.0f} ev/s (half rate)", latency),
        (f"Triton / in-process at batch {result.serving_batch}", serving),
    ]
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    print(result.result_line(), flush=True)
