"""`stream.batching.take_batches` on a stand-in for a Faust stream (the parts of `faust.Stream` it uses): the window
opens at a batch's first event, a batch never exceeds `max_`, events are acked once their batch was handled, and an
idle agent does not wake. The worker tests run it inside real Faust against the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from stream.batching import take_batches


@dataclass
class Event:
    value: int


@dataclass
class FakeStream:
    """What take_events touches of faust.Stream: processors fed from a queue by a passive reader, acks, waits."""

    queue: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    enable_acks: bool = True
    should_stop: bool = False
    current_event: Event | None = None
    acked: list[int] = field(default_factory=list)
    waits: int = 0
    _processors: list[Any] = field(default_factory=list)
    _active_agens: set[Any] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.channel, self.loop, self.log = self, asyncio.get_running_loop(), self

    def __aiter__(self) -> FakeStream:
        return self

    def add_processor(self, processor: Any) -> None:
        self._processors.append(processor)

    def _enable_passive(self, channel_it: Any) -> None:
        async def read() -> None:
            while True:
                value = await self.queue.get()
                self.current_event = Event(value)
                for processor in self._processors:
                    await processor(value)

        self.reader = asyncio.create_task(read())

    async def wait_for_stopped(self, event: asyncio.Event, timeout: float | None = None) -> bool:
        self.waits += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        return True

    async def wait(self, event: asyncio.Event) -> None:
        await event.wait()

    async def ack(self, event: Event) -> None:
        self.acked.append(event.value)

    def exception(self, *args: Any) -> None:  # self.log.exception
        raise AssertionError(args)

    async def crash(self, exc: BaseException) -> None:
        raise AssertionError(exc)


def test_batches_open_at_the_first_event_hold_at_most_max_and_are_acked_after_handling() -> None:
    async def main() -> None:
        stream = FakeStream()
        batches = take_batches(stream, 4, within=0.5)  # type: ignore[arg-type]
        assert batches in stream._active_agens, "closed by Faust when the stream stops"
        await asyncio.sleep(0.6)  # idle: longer than the window, yet nothing may be yielded and no timer runs
        assert stream.waits <= 1
        t0 = time.monotonic()
        for value in range(6):
            stream.queue.put_nowait(value)
        first = await anext(batches)
        assert [e.value for e in first] == [0, 1, 2, 3] and time.monotonic() - t0 < 0.4, "full: at once"
        assert stream.acked == [] and not stream.enable_acks, "acked only after the agent handled the batch"
        second = await anext(batches)  # the last two: when the window, opened at event 4, closes
        assert [e.value for e in second] == [4, 5] and stream.acked == [0, 1, 2, 3]
        assert time.monotonic() - t0 >= 0.5
        waits = stream.waits
        await asyncio.sleep(0.6)  # idle again: the generator sits in one wait, it does not loop on the window
        stream.queue.put_nowait(6)
        t1 = time.monotonic()
        third = await anext(batches)
        assert [e.value for e in third] == [6] and 0.5 <= time.monotonic() - t1 < 2.0
        assert stream.waits - waits <= 3 and stream.acked == [0, 1, 2, 3, 4, 5]
        stream.should_stop = True
        await batches.aclose()
        assert stream._processors == [] and stream.enable_acks, "Faust's stream restored"
        stream.reader.cancel()

    asyncio.run(main())
