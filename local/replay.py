"""Publish a data set to the events topic, keyed by user, at a given rate or at full speed.

The producer is what a well-behaved upstream service would run: key = `user_id` (partitioned with the
default murmur2 partitioner, so all of a user's events go to one partition, in order), `acks=all`, batched,
no compression unless asked. Malformed messages are published byte for byte, like a broken producer would.
The pacing is a token bucket on the monotonic clock: it sleeps whenever it is ahead of schedule (never
spins), and after a stall it catches up with at most one second's burst.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from aiokafka.partitioner import murmur2

from local.synthetic import Messages, generate, mix_malformed

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer
    from aiokafka.producer.message_accumulator import BatchBuilder

    from stream.settings import Settings

Source = Literal["movielens", "otto", "synthetic"]
SOURCES: tuple[Source, ...] = ("movielens", "otto", "synthetic")


@dataclass(frozen=True)
class ReplayResult:
    sent: int
    malformed: int
    seconds: float
    topic: str

    @property
    def events_per_s(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def load_messages(
    source: Source,
    *,
    events: int | None = None,
    users: int | None = None,
    malformed_share: float = 0.0,
    seed: int = 0,
    max_bytes: int = 16 * 1024,
) -> Messages:
    """The messages of a source, in publish (event-time) order, with `malformed_share` of them malformed.

    For the real data sets `events` keeps the first N events and `users` the first N users to appear;
    for `synthetic` they size the generated data (defaults: 100,000 events of 1,000 users).
    """
    if source == "synthetic":
        return generate(
            users or 1_000, events or 100_000, seed=seed, malformed_share=malformed_share, max_bytes=max_bytes
        )
    from models.datasets import movielens_events, otto_events

    if source == "movielens":
        loaded = movielens_events()
    elif source == "otto":
        loaded = otto_events()
    else:
        raise ValueError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if users is not None:
        keep: set[str] = set()
        for e in loaded:
            if len(keep) >= users:
                break
            keep.add(e.user_id)
        loaded = [e for e in loaded if e.user_id in keep]
    if events is not None:
        loaded = loaded[:events]
    return mix_malformed(loaded, malformed_share, seed=seed, max_bytes=max_bytes)


class TokenBucket:
    """Allows `rate` messages per second on average, bursts of at most `burst` messages."""

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)  # one second's worth
        self.clock = clock
        self.tokens = 0.0
        self.last = clock()

    def delay(self, n: int = 1) -> float:
        """Take `n` tokens; return how long to sleep before sending them (0 when they were there)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate) - n
        self.last = now
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


class KeyedBatches:
    """Record batches per partition, partitioned like Kafka's default partitioner (murmur2 of the key).

    Building batches ourselves instead of one `send()` per message is ~3x faster in aiokafka, and choosing
    the partition with the same murmur2 hash as the Java client (and Faust) keeps every key where a
    consumer expects it. Batches of one partition are delivered in order, so each user's order holds.
    """

    def __init__(self, producer: AIOKafkaProducer, topic: str, partitions: Sequence[int]) -> None:
        self.producer = producer
        self.topic = topic
        self.partitions = sorted(partitions)
        self.open: dict[int, BatchBuilder] = {}
        self.sent: list[asyncio.Future] = []

    def partition(self, key: bytes) -> int:
        return self.partitions[(murmur2(key) & 0x7FFFFFFF) % len(self.partitions)]

    async def add(self, key: bytes, value: bytes) -> None:
        if key is None:
            raise ValueError("replayed messages must have a key (the user id)")
        p = self.partition(key)
        batch = self.open.get(p)
        if batch is None:
            batch = self.open[p] = self.producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:  # full: ship it, start another
            self.sent.append(await self.producer.send_batch(batch, self.topic, partition=p))
            batch = self.open[p] = self.producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                raise ValueError(f"a message of {len(value)} bytes does not fit in an empty batch")

    async def ship(self) -> None:
        """Send every open batch now (each pacing step ends with this, so nothing lingers)."""
        for p, batch in self.open.items():
            self.sent.append(await self.producer.send_batch(batch, self.topic, partition=p))
        self.open.clear()

    async def acked(self) -> None:
        await asyncio.gather(*self.sent)
        self.sent.clear()


async def publish(
    settings: Settings,
    messages: Messages | Sequence[tuple[bytes, bytes]],
    *,
    topic: str | None = None,
    rate: float | None = None,
    progress: bool = True,
    max_batch_bytes: int = 512 * 1024,
    compression: str | None = None,
    chunk: int = 5_000,
) -> ReplayResult:
    """Publish `(key, value)` messages in order to an existing topic; `rate` in messages/s (None: full speed).

    Messages go out in steps of `chunk` (at a rate: at most ~50 ms worth); returns once every one is acked.
    """
    from aiokafka import AIOKafkaProducer

    records = messages.records if isinstance(messages, Messages) else list(messages)
    malformed = messages.malformed if isinstance(messages, Messages) else 0
    topic = topic or settings.topic_events
    chunk = max(1, min(chunk, int(rate / 20) or 1)) if rate else chunk
    producer = AIOKafkaProducer(
        **settings.kafka_client_kwargs(), acks="all", max_batch_size=max_batch_bytes, compression_type=compression
    )
    await producer.start()
    # The bucket starts once the producer is up: made before, it filled while the producer connected (up to one
    # second's worth), and the first messages went out as a burst above the rate (a flaky test_rate_is_respected).
    bucket = TokenBucket(rate) if rate else None
    bar = _progress(len(records), topic, rate) if progress else None
    start = time.monotonic()
    try:
        batches = KeyedBatches(producer, topic, await producer.partitions_for(topic))
        for i in range(0, len(records), chunk):
            part = records[i : i + chunk]
            if bucket is not None and (wait := bucket.delay(len(part))) > 0:
                await asyncio.sleep(wait)
            for key, value in part:
                await batches.add(key, value)
            await batches.ship()
            if len(batches.sent) >= 1_000:  # bound what is in flight
                await batches.acked()
            if bar is not None:
                bar[0].update(bar[1], advance=len(part))
        await batches.acked()
    finally:
        await producer.stop()
        if bar is not None:
            bar[0].stop()
    return ReplayResult(len(records), malformed, time.monotonic() - start, topic)


def _progress(total: int, topic: str, rate: float | None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn(f"replay -> {topic}" + (f" @ {rate:,.0f}/s" if rate else "")),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    task = progress.add_task("replay", total=total)
    progress.start()
    return progress, task


def replay(
    settings: Settings,
    source: Source,
    *,
    events: int | None = None,
    users: int | None = None,
    malformed_share: float = 0.0,
    seed: int = 0,
    rate: float | None = None,
    topic: str | None = None,
    progress: bool = True,
    ensure: bool = True,
) -> ReplayResult:
    """Load a source and publish it (sync entry point for the CLI, scripts and fixtures).

    With `ensure`, the target topic (default: input, DLQ and output) is first created if missing, with
    `settings.topic_partitions` partitions; a wrong existing count is an error.
    """
    from local.broker import ensure_topics, run_sync

    if ensure:  # never let a broker auto-create it with 1 partition
        ensure_topics(settings, {topic: settings.topic_partitions} if topic else None)
    messages = load_messages(
        source,
        events=events,
        users=users,
        malformed_share=malformed_share,
        seed=seed,
        max_bytes=settings.event_max_bytes,
    )
    return run_sync(publish(settings, messages, topic=topic, rate=rate, progress=progress))
