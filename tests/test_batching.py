"""`stream.batching.take_batches` on a stand-in for a Faust stream (the parts of `faust.Stream` it uses): the window
opens at a batch's first event, a batch never exceeds `max_`, events are never acked by it (the agent acks a batch
once it is durable: stream/overlap.py), and an idle agent does not wake. No clock: the stand-in records every wait
with its timeout, and the test closes a timed window itself, so the checks are about which waits happen, never
about how long they took on a busy box. The worker tests run it inside real Faust against the real broker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from stream.batching import take_batches


@dataclass
class Event:
    value: int


class FakeLoop:
    """The running loop with a clock that moves only when the test moves it (`now`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.real, self.now = loop, 0.0

    def time(self) -> float:
        return self.now

    def create_future(self) -> asyncio.Future[Any]:
        return self.real.create_future()


@dataclass
class FakeStream:
    """What take_events touches of faust.Stream: processors fed from a queue by a passive reader, acks, waits.
    `waits` holds the timeout of every wait (None: no timer); `close_window()` ends the timed wait in progress."""

    queue: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    enable_acks: bool = True
    should_stop: bool = False
    current_event: Event | None = None
    acked: list[int] = field(default_factory=list)
    fed: int = 0  # values handed to the processors
    waits: list[float | None] = field(default_factory=list)
    waiting: bool = False
    _processors: list[Any] = field(default_factory=list)
    _active_agens: set[Any] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.channel, self.loop, self.log = self, FakeLoop(asyncio.get_running_loop()), self

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
                self.fed += 1

        self.reader = asyncio.create_task(read())

    async def wait_for_stopped(self, event: asyncio.Event, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        self.window = asyncio.Event()
        waits = [asyncio.ensure_future(event.wait())]
        if timeout is not None:  # as if `timeout` passed, when the test says so
            waits.append(asyncio.ensure_future(self.window.wait()))
        self.waiting = True
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.waiting = False
            for w in waits:
                w.cancel()
        return True

    def close_window(self) -> None:
        assert self.waiting and self.waits[-1] is not None, "no timed wait in progress"
        self.window.set()

    async def wait(self, event: asyncio.Event) -> None:
        await event.wait()

    async def ack(self, event: Event) -> None:
        self.acked.append(event.value)

    def exception(self, *args: Any) -> None:  # self.log.exception
        raise AssertionError(args)

    async def crash(self, exc: BaseException) -> None:
        raise AssertionError(exc)


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until `condition` holds; everything here runs on the loop, so a bounded number of turns
    suffices (a count, not a time)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def test_batches_open_at_the_first_event_hold_at_most_max_and_are_left_to_the_agent_to_ack() -> None:
    async def main() -> None:
        stream = FakeStream()
        batches = take_batches(stream, 4, within=0.5)  # type: ignore[arg-type]
        assert batches in stream._active_agens, "closed by Faust when the stream stops"
        first = asyncio.ensure_future(anext(batches))
        await until(lambda: stream.waiting)
        assert stream.waits == [None], "idle: one wait for the first event, with no timer"
        for value in range(6):
            stream.queue.put_nowait(value)
        assert [e.value for e in await first] == [0, 1, 2, 3], "full: yielded without the window closing"
        assert stream.waits == [None, 0.5], "the window opened at the first event"
        assert stream.acked == [] and not stream.enable_acks, "Faust's own per-event acks are off"

        second = asyncio.ensure_future(anext(batches))  # the last two: when the window, opened at event 4, closes
        await until(lambda: stream.fed == 6 and stream.waiting and stream.waits[-1] == 0.5)
        assert not second.done() and stream.acked == [], "moving on acks nothing: the agent acks when durable"
        stream.close_window()
        assert [e.value for e in await second] == [4, 5]

        third = asyncio.ensure_future(anext(batches))
        await until(lambda: stream.waiting)
        waits = len(stream.waits)
        assert stream.waits[-1] is None and stream.acked == [], "idle again: no timer"
        stream.queue.put_nowait(6)
        await until(lambda: stream.fed == 7 and stream.waiting and stream.waits[-1] == 0.5)
        assert stream.waits[waits:] == [0.5], "the idle wait ended at the event, the window opened there"
        stream.close_window()
        assert [e.value for e in await third] == [6]

        stream.should_stop = True
        await batches.aclose()
        assert stream._processors == [] and stream.enable_acks, "Faust's stream restored"
        stream.reader.cancel()

    asyncio.run(main())


def test_a_batch_whose_window_passed_while_the_agent_was_busy_takes_what_is_queued_without_a_new_window() -> None:
    """At high load the agent comes back for the next batch long after its first event arrived: the window is over,
    so the batch is what arrived meanwhile, handed over with no timed wait (a new window was ~12 % of a batch
    cycle at 1,000 ev/s). A window still open is waited out only for its rest."""

    async def main() -> None:
        stream = FakeStream()
        batches = take_batches(stream, 10, within=0.5)  # type: ignore[arg-type]
        first = asyncio.ensure_future(anext(batches))
        await until(lambda: stream.waiting)
        stream.queue.put_nowait(0)
        await until(lambda: stream.waiting and stream.waits[-1] == 0.5)
        stream.close_window()
        assert [e.value for e in await first] == [0]

        for value in (1, 2, 3):  # arrive while the agent handles batch [0]
            stream.queue.put_nowait(value)
        await until(lambda: stream.queue.qsize() == 2)  # 1 is held until the agent asks for the next batch
        stream.loop.now += 2.0  # the agent was busy for 2 s
        waits = len(stream.waits)
        second = asyncio.ensure_future(anext(batches))
        await until(second.done)  # with a new window it would wait for the test to close it
        assert [e.value for e in second.result()] == [1, 2, 3], "what was queued, in one batch"
        assert [w for w in stream.waits[waits:] if w is not None] == [], "no timed wait: no new window"

        stream.queue.put_nowait(4)  # arrives while the agent handles batch [1, 2, 3]; the agent is back 0.2 s later
        await until(lambda: stream.queue.qsize() == 0)
        stream.loop.now += 0.2
        third = asyncio.ensure_future(anext(batches))
        await until(lambda: stream.waiting and stream.waits[-1] is not None)
        assert stream.waits[-1] == pytest.approx(0.3), "the rest of the window opened when event 4 arrived"
        stream.close_window()
        assert [e.value for e in await third] == [4]

        stream.should_stop = True
        await batches.aclose()
        stream.reader.cancel()

    asyncio.run(main())
