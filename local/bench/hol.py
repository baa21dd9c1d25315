"""Head-of-line benchmark: does one user's huge backlog delay everyone else?

One run, a local broker, the CPU Triton twin and one worker:

1. one *hot* user's `hot_events` events (default 100,000) fill its partition before the worker starts;
2. the worker starts and drains them; meanwhile `probes` other users (half on the hot user's partition, half on
   the others) each send one live event per second;
3. a downstream consumer of the output topic takes each probe's latency as the output record's Kafka timestamp
   minus the probe's event time (its send time), i.e. as a consumer of `user-interests` meets it.

Only probes sent while the hot backlog was still draining count. Users on the hot partition wait behind it by
design (a Kafka partition is one ordered log); users on other partitions must not (target: p99 <= 1 s).

    interest-stream bench hol --hot-events 100000
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aiokafka.partitioner import murmur2

from core.schema import Event, decode_record, encode_event
from local.pipeline import LocalPipeline
from stream.settings import Settings


@dataclass(frozen=True)
class HolResult:
    hot_events: int
    drain_s: float
    other_ms: list[float]  # probe latencies, users on other partitions than the hot user
    same_ms: list[float]  # probe latencies, users on the hot user's partition

    def result_line(self) -> str:
        return (
            f"RESULT hol_other_partitions_p50_ms={pct(self.other_ms, 0.5):.0f} "
            f"hol_other_partitions_p99_ms={pct(self.other_ms, 0.99):.0f} "
            f"hol_same_partition_p99_ms={pct(self.same_ms, 0.99):.0f} hot_events={self.hot_events} "
            f"drain_s={self.drain_s:.1f} probes={len(self.other_ms) + len(self.same_ms)}"
        )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else float("nan")


def partition_of(key: bytes, partitions: int) -> int:
    """The Java client's (and aiokafka's) default partitioner."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def pick_probes(hot: bytes, partitions: int, count: int) -> tuple[list[str], list[str]]:
    """`count // 2` user ids on the hot user's partition and `count - count // 2` on the others."""
    target = partition_of(hot, partitions)

    def first(n: int, on_hot: bool) -> list[str]:
        ids = (f"probe-{i}" for i in itertools.count())
        return list(itertools.islice((u for u in ids if (partition_of(u.encode(), partitions) == target) == on_hot), n))

    return first(count // 2, True), first(count - count // 2, False)


def run(
    repo: Path, *, hot_events: int = 100_000, probes: int = 50, seconds: float = 20.0, partitions: int = 8, log=print
) -> HolResult:
    from local.broker import run_sync
    from local.replay import publish

    hot = "hot-user"
    start_ms = int(time.time() * 1000) - hot_events - 3_600_000
    backlog = [
        (hot.encode(), encode_event(Event(hot, f"i{i % 997}", "view", start_ms + i, event_id=f"hot-{i}")))
        for i in range(hot_events)
    ]
    same, other = pick_probes(hot.encode(), partitions, probes)
    with (
        tempfile.TemporaryDirectory(prefix="bench-hol-") as tmp,
        LocalPipeline(Path(tmp), repo=repo, partitions=partitions, start_workers=False) as pipe,
    ):
        settings = pipe.settings
        log(f"publishing {hot_events:,} events of one user ...")
        run_sync(publish(settings, backlog, progress=False))
        log("starting the worker; probes send one event per user per second ...")
        pipe.start_workers()
        last_hot_ms = start_ms + hot_events - 1
        lat, drained_at = run_sync(_probe(settings, same + other, seconds, hot, last_hot_ms))
    keep = lambda users: [ms for u, sent, ms in lat if u in users and sent < drained_at]  # noqa: E731
    drain_s = (drained_at - min((s for _, s, _ in lat), default=drained_at)) / 1000
    return HolResult(hot_events, drain_s, keep(set(other)), keep(set(same)))


async def _probe(
    settings: Settings, users: list[str], seconds: float, hot: str, last_hot_ms: int
) -> tuple[list[tuple[str, int, float]], float]:
    """Send one event per probe user per second for `seconds` (or until the hot backlog is drained, whichever is
    later, capped at 5 min); return (user, send ms, latency ms) per probe output and when the backlog drained."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    consumer = AIOKafkaConsumer(**settings.kafka_client_kwargs(), group_id=None, enable_auto_commit=False)
    producer = AIOKafkaProducer(**settings.kafka_client_kwargs(), acks="all", linger_ms=1)
    await consumer.start()
    await producer.start()
    out: list[tuple[str, int, float]] = []
    drained_at = float("inf")
    try:
        parts = [TopicPartition(settings.topic_output, p) for p in range(settings.topic_partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)

        async def read(until: list[float]) -> None:
            nonlocal drained_at
            while time.monotonic() < until[0]:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for r in records:
                        rec = decode_record(r.value)
                        if rec.user_id == hot and rec.last_event_ms == last_hot_ms:
                            drained_at = min(drained_at, r.timestamp)
                        elif rec.user_id.startswith("probe-"):
                            out.append((rec.user_id, rec.last_event_ms, r.timestamp - rec.last_event_ms))

        until = [time.monotonic() + 330.0]
        reader = asyncio.create_task(read(until))
        begin, n = time.monotonic(), 0
        while (elapsed := time.monotonic() - begin) < 300.0 and (elapsed < seconds or drained_at == float("inf")):
            for user in users:
                now_ms = int(time.time() * 1000)
                event = Event(user, f"i{n % 997}", "click", now_ms, event_id=f"{user}-{n}")
                await producer.send(settings.topic_events, key=user.encode(), value=encode_event(event))
            n += 1
            await asyncio.sleep(max(0.0, begin + n - time.monotonic()))
        await producer.flush()
        until[0] = time.monotonic() + 10.0  # the last probes' outputs
        await reader
    finally:
        await consumer.stop()
        await producer.stop()
    return out, drained_at


def print_result(result: HolResult) -> None:
    print(f"hot user: {result.hot_events:,} events drained in {result.drain_s:.1f} s")
    for name, values in (("other partitions", result.other_ms), ("hot user's partition", result.same_ms)):
        print(f"{name:>22}: {len(values)} probes, p50 {pct(values, 0.5):.0f} ms, p99 {pct(values, 0.99):.0f} ms")
    print(result.result_line())
