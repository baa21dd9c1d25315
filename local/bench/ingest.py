"""Ingest benchmark: how close the worker gets to the speed at which Kafka can hand it the input.

One run, one local broker, one input topic of N synthetic events (published before anything reads):
1. a bare aiokafka consumer (fresh group, raw bytes, getmany loop, no processing) reads the whole topic;
2. a real `interest-stream worker` subprocess (fresh group) ingests the same topic into its state table.
Both rates are measured from the first event seen to the last, so start-up and group joins are excluded:
the bare consumer times its own loop, the worker is timed by polling its `interest_events_consumed_total`
counter on /metrics. The ratio worker/bare is the figure of merit; state bytes per user is the mean
serialized size of the final states in the changelog (what RocksDB and the changelog hold per user).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

TABLE = "user_state"

#: Runs the worker in-process under cProfile (main thread: agent, conductor, tables) and dumps the stats on exit.
_PROFILED_WORKER = """
import cProfile, sys
from stream.worker import run_worker
from stream.settings import Settings
profile = cProfile.Profile()
try:
    profile.runcall(run_worker, Settings(), hard_exit=False)
except SystemExit:
    pass
finally:
    profile.dump_stats(sys.argv[1])
"""


@dataclass(frozen=True)
class IngestResult:
    events: int
    users: int
    partitions: int
    publish_eps: float
    bare_eps: float
    bare_s: float
    worker_eps: float
    worker_s: float
    worker_cpu_s: float  # user+system CPU of the worker process while it ingested
    state_bytes_per_user: float
    state_bytes_max: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]

    @property
    def ratio(self) -> float:
        return self.worker_eps / self.bare_eps if self.bare_eps else 0.0

    def result_line(self) -> str:
        return (
            f"RESULT ingest_ratio={self.ratio:.3f} worker_eps={self.worker_eps:.0f} bare_eps={self.bare_eps:.0f} "
            f"state_bytes_per_user={self.state_bytes_per_user:.0f}"
        )


def run(
    events: int,
    users: int,
    partitions: int = 8,
    seed: int = 0,
    workdir: Path | None = None,
    profile: Path | None = None,
) -> IngestResult:
    """Start a broker, publish, measure the bare consumer, then the worker; everything stopped after.

    `profile`: run the worker under cProfile and write its stats there (slows the worker: not for the figures).
    """
    from local.broker import LocalBroker, ensure_topics, run_sync
    from local.process import free_port
    from local.replay import publish
    from local.synthetic import generate
    from stream.settings import Settings

    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=workdir) as tmp:
        root = Path(tmp)
        load_before = os.getloadavg()
        with LocalBroker(root / "broker") as broker:
            tag = uuid.uuid4().hex[:8]
            settings = Settings(
                _env_file=None,
                kafka_bootstrap_servers=broker.bootstrap,
                app_id=f"bench-{tag}",
                topic_events=f"bench-events-{tag}",
                topic_output=f"bench-out-{tag}",
                topic_partitions=partitions,
                state_dir=root / "state",
                worker_web_port=0,
                metrics_port=free_port(),
            )
            ensure_topics(settings, tables=(TABLE,))
            messages = generate(users, events, seed=seed)
            published = run_sync(publish(settings, messages, progress=False))
            bare_eps, bare_s = run_sync(_bare_consumer(settings, events))
            worker_eps, worker_s, worker_cpu_s, sizes = _worker(settings, events, root / "worker.log", profile)
        return IngestResult(
            events=events,
            users=len(sizes),
            partitions=partitions,
            publish_eps=published.events_per_s,
            bare_eps=bare_eps,
            bare_s=bare_s,
            worker_eps=worker_eps,
            worker_s=worker_s,
            worker_cpu_s=worker_cpu_s,
            state_bytes_per_user=sum(sizes) / len(sizes) if sizes else 0.0,
            state_bytes_max=max(sizes, default=0),
            load_before=load_before,
            load_after=os.getloadavg(),
        )


async def _bare_consumer(settings, total: int, timeout_s: float = 600.0) -> tuple[float, float]:
    """Events/s of a plain consumer group member reading raw bytes; from the first batch to the last."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        settings.topic_events,
        **settings.kafka_client_kwargs(),
        group_id=f"{settings.app_id}-bare",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        seen, t_first = 0, 0.0
        deadline = time.monotonic() + timeout_s
        while seen < total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"bare consumer read {seen} of {total} events in {timeout_s:.0f} s")
            before = time.perf_counter()
            batches = await consumer.getmany(timeout_ms=500)
            n = sum(len(b) for b in batches.values())
            if n and not seen:
                t_first = before  # the clock starts with the fetch that brought the first events
            seen += n
        elapsed = time.perf_counter() - t_first
        return (seen / elapsed if elapsed > 0 else 0.0), elapsed
    finally:
        await consumer.stop()


def _worker(
    settings, total: int, log_path: Path, profile: Path | None = None, timeout_s: float = 900.0
) -> tuple[float, float, float, list[int]]:
    """Run the worker until its consumed counter reaches `total` and the changelog holds every final state.

    Returns (events/s, seconds, worker CPU seconds, serialized sizes of the final states).
    """
    from local.process import process_tree_cpu_s
    from local.scrape import Snapshot
    from local.worker import settings_env, spawn_worker

    command = None if profile is None else [sys.executable, "-c", _PROFILED_WORKER, str(Path(profile).absolute())]
    proc = spawn_worker(settings_env(settings), log_path, command=command)
    try:
        url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
        deadline = time.monotonic() + timeout_s
        t_first = cpu_first = None
        last_idle, cpu_idle = time.perf_counter(), process_tree_cpu_s(proc.pid)
        while True:
            proc.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not ingest {total} events in {timeout_s:.0f} s; log {log_path}")
            count = Snapshot.scrape(url).consumed
            now = time.perf_counter()
            if not count:  # the clock starts at the last poll that saw nothing consumed (0.1 s resolution)
                last_idle, cpu_idle = now, process_tree_cpu_s(proc.pid)
            elif t_first is None:
                t_first, cpu_first = last_idle, cpu_idle
            if count >= total:
                break
            time.sleep(0.1)
        elapsed = now - t_first
        cpu = process_tree_cpu_s(proc.pid) - cpu_first
        sizes = _final_state_sizes(settings, total, deadline)
    finally:
        proc.stop(60)  # SIGTERM: a clean stop leaves the group (never SIGKILL a member on noida-db)
    return (total / elapsed if elapsed > 0 else 0.0), elapsed, cpu, sizes


def _final_state_sizes(settings, total: int, deadline: float) -> list[int]:
    """Serialized sizes of the latest state of every user in the changelog, once all events are in them."""
    from core.sessions import decode_state
    from local.broker import changelog_topic, run_sync
    from stream.tables import decode_value

    topic = changelog_topic(settings.app_id, TABLE)
    while True:
        latest: dict[bytes, bytes] = {}
        for key, value in run_sync(_read_to_end(settings, topic)):
            latest[key] = decode_value(value).state  # ingest only: the value holds no record
        if sum(decode_state(v).events_seen for v in latest.values()) >= total or time.monotonic() > deadline:
            return [len(v) for v in latest.values()]
        time.sleep(0.5)


async def _read_to_end(settings, topic: str) -> list[tuple[bytes, bytes]]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**settings.kafka_client_kwargs(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        todo = {tp for tp in parts if ends[tp] > 0}
        out: list[tuple[bytes, bytes]] = []
        while todo:
            for tp, batch in (await consumer.getmany(*todo, timeout_ms=500)).items():
                out += [(r.key, r.value) for r in batch if r.offset < ends[tp] and r.value is not None]
                if batch and batch[-1].offset >= ends[tp] - 1:
                    todo.discard(tp)
        return out
    finally:
        await consumer.stop()


def print_result(result: IngestResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ingest: {result.events:,} events, {result.users:,} users, {result.partitions} partitions")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("publish (replay producer)", f"{result.publish_eps:,.0f} ev/s"),
        ("bare aiokafka consumer", f"{result.bare_eps:,.0f} ev/s ({result.bare_s:.2f} s)"),
        ("worker (state updates)", f"{result.worker_eps:,.0f} ev/s ({result.worker_s:.2f} s)"),
        (
            "worker CPU while ingesting",
            f"{result.worker_cpu_s:.1f} s ({result.worker_cpu_s / max(result.worker_s, 1e-9):.0%} of a core)",
        ),
        ("ratio worker / bare", f"{result.ratio:.3f}"),
        ("state bytes per user (mean / max)", f"{result.state_bytes_per_user:,.0f} / {result.state_bytes_max:,}"),
        ("load average before / after", f"{result.load_before[0]:.2f} / {result.load_after[0]:.2f}"),
    ]
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    print(result.result_line(), flush=True)
