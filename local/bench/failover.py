"""Failover benchmark: how long the users of a killed worker's partitions wait, with and without standby replicas.

    interest-stream bench failover --users 100000 --workers 2

One run per standby setting (1, then 0), each on a fresh local broker and the CPU Triton twin:

1. **load**: `users` users, one event each, ingested by the workers without inference (TRITON_URL empty: loading
   is not what is measured) until the group committed the whole topic;
2. **serve**: the workers restart with Triton on the same broker and state directories; live traffic at `rate`
   events/s for random users; the benchmark reads the output topic as a downstream consumer would;
3. **kill**: one worker is SIGKILLed. noida-db never evicts a killed group member, so the broker is restarted
   cleanly right after, the survivors frozen meanwhile (`local.broker.restart_quietly`; included in the time;
   with Apache Kafka the session timeout takes its place);
4. **takeover**: for every events partition the victim held, the first output record published after the kill;
   `takeover_s` is the latest of those, minus the kill time.

Then the changelog restore rate: a worker with an empty state directory restores the whole table alone;
`restore_users_per_s` is the users over the time from its start to Ready (docs/operations.md sizes restores by it).
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.partitioner import murmur2

from core.schema import Event, encode_event
from local.broker import restart_quietly, run_sync
from local.pipeline import LocalPipeline
from local.replay import publish
from stream.settings import Settings

START_MS = 1_735_689_600_000  # 2025-01-01: event times of the loaded history


@dataclass
class FailoverRun:
    standby: int
    users: int
    workers: int
    load_s: float
    takeover_s: float
    moved: list[int]
    per_partition_s: dict[int, float] = field(default_factory=dict)


@dataclass
class FailoverResult:
    runs: list[FailoverRun]
    restore_s: float
    restore_users: int

    @property
    def restore_users_per_s(self) -> float:
        return self.restore_users / self.restore_s if self.restore_s else 0.0


def partition_of(key: bytes, partitions: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def assigned(log: str, topic: str) -> set[int]:
    """The events partitions of the last assignment Faust logged ("Setting newly assigned partitions" table)."""
    tables = log.split("Setting newly assigned partitions")[1:]
    if not tables:
        return set()
    match = re.search(rf"^\|\s*{re.escape(topic)}\s*\|\s*\{{([^}}]*)\}}\s*\|", tables[-1], re.MULTILINE)
    out: set[int] = set()
    for part in (match.group(1) if match else "").split(","):
        if part.strip():
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def history(users: int) -> list[tuple[bytes, bytes]]:
    return [
        (f"u{k}".encode(), encode_event(Event(f"u{k}", f"i{k % 5000}", "view", START_MS + k, event_id=f"load-{k}")))
        for k in range(users)
    ]


class OutputWatch:
    """A downstream consumer of the output topic: the publish time (record timestamp) of every record, with the
    events partition of its key."""

    def __init__(self, settings: Settings) -> None:
        self.settings, self.times = settings, []  # type: list[tuple[float, int]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: run_sync(self._run()), daemon=True)

    def start(self) -> OutputWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _run(self) -> None:
        from aiokafka import AIOKafkaConsumer

        parts = self.settings.topic_partitions
        consumer = AIOKafkaConsumer(
            self.settings.topic_output, **self.settings.kafka_client_kwargs(), group_id=None,
            auto_offset_reset="latest", enable_auto_commit=False,
        )  # fmt: skip
        await consumer.start()
        try:
            while not self._stop.is_set():
                try:
                    batches = await consumer.getmany(timeout_ms=200)
                except Exception:  # the broker restarting under us: try again
                    await asyncio.sleep(0.2)
                    continue
                for records in batches.values():
                    self.times += [(r.timestamp / 1000, partition_of(r.key, parts)) for r in records]
                if not batches:
                    await asyncio.sleep(0.05)
        finally:
            await consumer.stop()


def _traffic(settings: Settings, users: int, rate: float, stop: threading.Event, seed: int) -> None:
    """Live events for random users at `rate`/s from one producer, until `stop`; sends that fail while the broker
    restarts are dropped (the measurement needs traffic, not these events)."""
    from aiokafka import AIOKafkaProducer

    async def send() -> None:
        producer = AIOKafkaProducer(**settings.kafka_client_kwargs(), acks="all", linger_ms=5)
        await producer.start()
        rng, k = random.Random(seed), 0
        try:
            while not stop.is_set():
                tick = time.monotonic()
                for _ in range(max(1, int(rate / 10))):
                    user = f"u{rng.randrange(users)}"
                    event = Event(user, f"i{k % 5000}", "click", int(time.time() * 1000))
                    try:
                        await producer.send(settings.topic_events, encode_event(event), key=user.encode())
                    except Exception:
                        await asyncio.sleep(0.1)
                    k += 1
                await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
        finally:
            await producer.stop()

    run_sync(send())


def run_one(
    repo: Path, work_dir: Path, *, users: int, workers: int, partitions: int, standby: int, rate: float,
    settle_s: float, seed: int, log: Callable[[str], None],
) -> FailoverRun:  # fmt: skip
    overrides = {"worker_standby_replicas": standby, "app_id": "failover"}
    loader = LocalPipeline(work_dir, repo=None, partitions=partitions, workers=workers, overrides=overrides,
                           start_workers=False)  # fmt: skip
    with loader:
        run_sync(publish(loader.settings, history(users), progress=False))
        started = time.monotonic()
        loader.start_workers()
        _wait_committed(loader.settings, timeout_s=3600)
        load_s = time.monotonic() - started
    log(f"standby {standby}: {users:,} users loaded by {workers} workers in {load_s:.1f} s")

    with LocalPipeline(work_dir, repo=repo, partitions=partitions, workers=workers, overrides=overrides,
                       fresh=False) as pipeline:  # fmt: skip
        settings = pipeline.settings
        watch = OutputWatch(settings).start()
        stop = threading.Event()
        sender = threading.Thread(target=_traffic, args=(settings, users, rate, stop, seed), daemon=True)
        sender.start()
        try:
            deadline = time.monotonic() + 120
            while not _split(pipeline, settings) or len({p for _, p in watch.times}) < partitions:
                if time.monotonic() > deadline:
                    raise RuntimeError("the workers did not split the partitions and publish on each within 120 s")
                time.sleep(0.5)  # every worker owns partitions, and every partition publishes, before the kill
            time.sleep(settle_s)
            victim = pipeline.workers[0]
            moved = sorted(_owned(victim, settings))
            killed_at = time.time()
            victim.process.kill()  # type: ignore[union-attr]
            assert pipeline.broker is not None
            survivors = [w.pid for w in pipeline.workers[1:] if w.pid is not None]
            pipeline.broker = restart_quietly(pipeline.broker, survivors)
            deadline = time.monotonic() + 300
            first: dict[int, float] = {}
            while set(first) < set(moved) and time.monotonic() < deadline:
                for t, p in list(watch.times):
                    if t > killed_at and p in moved:
                        first[p] = min(first.get(p, t), t)
                time.sleep(0.2)
        finally:
            stop.set()
            sender.join(10)
            watch.stop()
        if set(first) < set(moved):
            raise RuntimeError(f"partitions {sorted(set(moved) - set(first))} published nothing within 300 s")
        per_partition = {p: t - killed_at for p, t in sorted(first.items())}
        takeover = max(per_partition.values())
        log(f"standby {standby}: worker0 held {moved}; takeover {takeover:.2f} s (per partition: "
            + ", ".join(f"{p}: {s:.2f}" for p, s in per_partition.items()) + ")")  # fmt: skip
        return FailoverRun(standby, users, workers, load_s, takeover, moved, per_partition)


def measure_restore(work_dir: Path, *, partitions: int, users: int, log: Callable[[str], None]) -> float:
    """A worker with an empty state directory, alone in the group of the last run: seconds from start to Ready."""
    import shutil

    shutil.rmtree(work_dir / "state", ignore_errors=True)
    overrides = {"worker_standby_replicas": 0, "app_id": "failover"}
    with LocalPipeline(work_dir, repo=None, partitions=partitions, workers=1, overrides=overrides, fresh=False,
                       start_workers=False) as pipeline:  # fmt: skip
        started = time.monotonic()
        pipeline.start_workers()
        restore_s = time.monotonic() - started
    log(f"restore: {users:,} users from the changelog alone in {restore_s:.1f} s (start to Ready)")
    return restore_s


def _owned(worker: Any, settings: Settings) -> set[int]:
    """The events partitions of the worker's last assignment in its current run (the log file is appended to)."""
    return assigned(worker.process.log_text(this_run=True) if worker.process else "", settings.topic_events)


def _split(pipeline: LocalPipeline, settings: Settings) -> bool:
    """Every worker owns events partitions, and together they own each one once."""
    owned = [_owned(w, settings) for w in pipeline.workers]
    return all(owned) and sorted(p for o in owned for p in o) == list(range(settings.topic_partitions))


def _wait_committed(settings: Settings, timeout_s: float) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    async def lagging() -> int:
        consumer = AIOKafkaConsumer(**settings.kafka_client_kwargs(), group_id=None)
        admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
        await consumer.start()
        await admin.start()
        try:
            parts = [TopicPartition(settings.topic_events, p) for p in range(settings.topic_partitions)]
            ends = await consumer.end_offsets(parts)
            committed = await admin.list_consumer_group_offsets(settings.app_id)
            return sum(max(0, ends[tp] - (committed[tp].offset if tp in committed else 0)) for tp in parts)
        finally:
            await consumer.stop()
            await admin.close()

    deadline = time.monotonic() + timeout_s
    while run_sync(lagging()) > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the group did not commit the loaded topic within {timeout_s:.0f} s")
        time.sleep(1.0)


def run(
    repo: Path, work_dir: Path, *, users: int = 100_000, workers: int = 2, partitions: int = 8, rate: float = 100.0,
    settle_s: float = 5.0, seed: int = 0, log: Callable[[str], None] = print,
) -> FailoverResult:  # fmt: skip
    if workers < 2:
        raise ValueError("a failover needs at least 2 workers")
    runs = [
        run_one(
            repo,
            work_dir,
            users=users,
            workers=workers,
            partitions=partitions,
            standby=standby,
            rate=rate,
            settle_s=settle_s,
            seed=seed,
            log=log,
        )
        for standby in (1, 0)
    ]
    restore_s = measure_restore(work_dir, partitions=partitions, users=users, log=log)
    return FailoverResult(runs, restore_s, users)


def print_result(result: FailoverResult) -> None:
    by_standby = {r.standby: r for r in result.runs}
    print(
        f"RESULT takeover_s_standby={by_standby[1].takeover_s:.2f} takeover_s_no_standby={by_standby[0].takeover_s:.2f}"
        f" restore_users_per_s={result.restore_users_per_s:.0f} users={result.restore_users}"
        f" workers={by_standby[1].workers}"
    )
