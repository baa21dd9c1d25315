"""Publish a data set to the events topic, keyed by user, at a given rate or at full speed.

The producer is what a well-behaved upstream service would run: key = `user_id` (so the default partitioner
sends all of a user's events to one partition, in order), `acks=all`, batches filled for `linger_ms`, no
compression unless asked. Malformed messages are published byte for byte, like a broken producer would.
The pacing is a token bucket on the monotonic clock: it sleeps whenever it is ahead of schedule (never
spins), and after a stall it catches up with at most one second's burst.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from stream.synthetic import Messages, generate, mix_malformed

if TYPE_CHECKING:
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


async def publish(
    settings: Settings,
    messages: Messages | Sequence[tuple[bytes, bytes]],
    *,
    topic: str | None = None,
    rate: float | None = None,
    progress: bool = True,
    linger_ms: int = 20,
    max_batch_bytes: int = 512 * 1024,
    compression: str | None = None,
    chunk: int = 500,
) -> ReplayResult:
    """Publish `(key, value)` messages in order; `rate` in messages/s (None: full speed). Waits for every ack."""
    from aiokafka import AIOKafkaProducer

    records = messages.records if isinstance(messages, Messages) else list(messages)
    malformed = messages.malformed if isinstance(messages, Messages) else 0
    topic = topic or settings.topic_events
    chunk = max(1, min(chunk, int(rate / 20) or 1)) if rate else chunk  # pace in steps of ~50 ms at most
    bucket = TokenBucket(rate) if rate else None
    producer = AIOKafkaProducer(
        **settings.kafka_client_kwargs(),
        acks="all",
        linger_ms=linger_ms,
        max_batch_size=max_batch_bytes,
        compression_type=compression,
    )
    await producer.start()
    bar = _progress(len(records), topic, rate) if progress else None
    start = time.monotonic()
    try:
        pending: list[asyncio.Future] = []
        for i in range(0, len(records), chunk):
            part = records[i : i + chunk]
            if bucket is not None and (wait := bucket.delay(len(part))) > 0:
                await asyncio.sleep(wait)
            for key, value in part:
                pending.append(await producer.send(topic, value=value, key=key))
            if len(pending) >= 20_000:  # bound memory; acks of earlier batches have mostly arrived
                await asyncio.gather(*pending)
                pending.clear()
            if bar is not None:
                bar[0].update(bar[1], advance=len(part))
        await producer.flush()
        await asyncio.gather(*pending)
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
) -> ReplayResult:
    """Load a source and publish it (sync entry point for the CLI, scripts and fixtures)."""
    from stream.local.broker import run_sync

    messages = load_messages(
        source,
        events=events,
        users=users,
        malformed_share=malformed_share,
        seed=seed,
        max_bytes=settings.event_max_bytes,
    )
    return run_sync(publish(settings, messages, topic=topic, rate=rate, progress=progress))
