"""The agent's batches: Faust's `Stream.take_events`, changed in three places: an idle worker sleeps, the agent
acknowledges a batch itself, and a busy agent's next batch does not open a new window.

Faust's `take_events(max_, within)` acknowledges a batch's events as soon as the agent asks for the next one; here
the agent acknowledges them once the batch is durable (`Stream.ack`), because stream/overlap.py keeps a batch in
flight after the agent moved on. And Faust's version waits up to `within` for its buffer to fill, in a loop,
whether or not any event came: an idle agent wakes 1/within times a second, 0.3-0.4 ms of CPU each on the
reference machine: 0.006 of a core at a 50 ms window, 0.021 at 20 ms, against an idle budget of 0.02
(docs/benchmarks.md). Here the window opens at the first buffered event: with nothing buffered the loop waits for
an event (or the stop) with no timer. The window can then be short without an idle cost. And Faust's version
opens the window when the agent asks for the next batch: at high load, when events arrived while the agent
handled the previous batch, every batch waited a fresh `within` (20 of ~160 ms per batch at 1,000 events/s).
Here the window opened when the batch's first event arrived; once it is over, the batch is what is queued.
Everything else (the
buffer, the stop) is Faust's own code, copied from faust-streaming 0.15.3 (`faust/streams.py`). Pinned
(stream/pins.py): on any other release `take_batches` raises `UnsupportedRelease` rather than run a copy of code
that may have changed under it, and the worker refuses to start before that. Re-read that method before moving the pin.
"""

from __future__ import annotations

import asyncio
from asyncio import CancelledError
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from faust.types import EventT, StreamT
from mode import want_seconds
from mode.utils.aiter import aiter
from mode.utils.futures import notify

from stream import pins


def take_batches(stream: StreamT, max_: int, within: float) -> AsyncGenerator[Sequence[EventT], None]:
    """Batches of at most `max_` events, each yielded `within` seconds after its first event (or when full).
    Raises `pins.UnsupportedRelease` on a Faust other than the one `_take_events` was copied from."""
    pins.require("faust")
    agen = _take_events(stream, max_, within)
    stream._active_agens.add(agen)  # type: ignore[attr-defined]  # as Faust's @_tracks_buffer_agen does: closed on stop
    return agen


async def _take_events(self: Any, max_: int, within: float) -> AsyncGenerator[Sequence[EventT], None]:
    """faust.Stream.take_events of 0.15.3 with `started`: the lines marked CHANGED are the whole difference."""
    buffer: list[Any] = []
    events: list[EventT] = []
    buffer_full = asyncio.Event()
    buffer_consumed = asyncio.Event()
    started = asyncio.Event()  # CHANGED: set by the first event of a batch
    first_at = 0.0  # CHANGED: when the batch's first event reached the buffer (loop time)
    timeout = want_seconds(within)
    stream_enable_acks: bool = self.enable_acks
    buffer_consuming: asyncio.Future[None] | None = None
    channel_it = aiter(self.channel)

    async def add_to_buffer(value: Any) -> Any:
        nonlocal buffer_consuming, first_at
        arrived = self.loop.time()  # CHANGED: before any wait for the agent to take the previous batch
        try:
            if buffer_consuming is not None:  # set while the agent handles a batch
                try:
                    await buffer_consuming
                finally:
                    buffer_consuming = None
            buffer.append(value)
            event = self.current_event
            if event is None:
                raise RuntimeError("Take buffer found current_event is None")
            events.append(event)
            if len(buffer) == 1:  # CHANGED: the batch's window opened when its first event arrived
                first_at = arrived
            started.set()  # CHANGED
            if len(buffer) >= max_:
                buffer_full.set()
                buffer_consumed.clear()
                await self.wait(buffer_consumed)  # never more than max_ events in a batch
        except CancelledError:  # pragma: no cover
            raise
        except Exception as exc:
            self.log.exception("Error adding to take buffer: %r", exc)
            await self.crash(exc)
        return value

    self.enable_acks = False  # the agent acks the events (`Stream.ack`) once their batch is durable
    self.add_processor(add_to_buffer)
    self._enable_passive(channel_it)
    try:
        while not self.should_stop:
            if not buffer:  # CHANGED: idle, no timer: wait for the first event (or the stop)
                await self.wait_for_stopped(started)
            left = timeout - (self.loop.time() - first_at)  # CHANGED: the window's rest, not a new window
            if left > 0:
                await self.wait_for_stopped(buffer_full, timeout=left)
            else:  # CHANGED: the window passed while the agent was busy: take what is queued, wait for no more
                await _take_queued(self, buffer_full, timeout)
            if buffer:
                buffer_consuming = self.loop.create_future()  # no new events into the buffer meanwhile
                try:
                    yield list(events)
                finally:
                    buffer.clear()  # CHANGED: no acks here: the agent acknowledges a batch once it is durable
                    events.clear()
                    notify(buffer_consuming)  # the held add_to_buffer runs on the loop's next turn, not before:
                    buffer_full.clear()
                    started.clear()  # CHANGED: so clearing here cannot lose its set()
                    buffer_consumed.set()
    finally:
        self.enable_acks = stream_enable_acks
        self._processors.remove(add_to_buffer)


async def _take_queued(stream: Any, buffer_full: asyncio.Event, timeout: float) -> None:
    """Let the stream move the events already in its channel's queue into the buffer (until full), one loop turn
    at a time, for at most `timeout`: a busy agent's next batch holds what arrived meanwhile, with no new window."""
    queue, deadline = stream.channel.queue, stream.loop.time() + timeout
    while queue.qsize() and not buffer_full.is_set() and not stream.should_stop and stream.loop.time() < deadline:
        await asyncio.sleep(0)
