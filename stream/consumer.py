"""Faust's Kafka consumer, with two fixes: after every rebalance each events partition is read again from the
group's committed offset, also when that offset is 0 or there is none yet; and an events partition whose log went
back under the running worker (the topic recreated) is read again from its start, not silently skipped
(`Consumer`, below).

Why (issue 25, the post-restore stall and the events lost after it): at a rebalance, and while a restore runs,
Faust drops the messages it has fetched but not yet handed to the agent (`Stream` skips a message whose
generation is old or that arrives while flow control is suspended), counting on `perform_seek` to read them
again from the committed offsets. aiokafka's `seek_to_committed` seeks only where the committed offset is
above 0 (`if offset and offset > 0`), so a partition that had committed nothing yet (a new group, a worker
killed before its first commit) kept its fetch position past the dropped messages. They were never handed to the
agent: never acknowledged, so the committed offset stopped there (lag frozen, nothing logged), and the later
events the agent did fold carried the users' `input_offset` past them, so when a restart read them again they
were taken for replays and lost. Seeking such partitions to offset 0, or to the log start when nothing is
committed (`consumer_auto_offset_reset="earliest"`), makes every dropped message come again.

It also answers the fence's question (stream/fencing.py): is this member still in its generation? A Heartbeat
request sent from the consumer's own thread with aiokafka's generation and member id.

Built on faust-streaming 0.15.3's aiokafka driver (`Consumer._new_consumer_thread`,
`AIOKafkaConsumerThread.seek_to_committed`) and aiokafka 0.14.0's `seek_to_committed` and coordinator
(`_coordinator`, `_send_req`); `install` refuses other releases (stream/pins.py). `Transport.Consumer` is the
documented place for a consumer class.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import aiokafka.errors as kafka_errors
import faust
from aiokafka.protocol.group import HeartbeatRequest
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from stream import pins
from stream.fencing import Membership

log = logging.getLogger(__name__)


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """The aiokafka consumer thread; `input_topics` are the topics whose partitions are sought (not changelogs,
    whose positions the recovery owns)."""

    input_topics: frozenset[str] = frozenset()

    async def seek_to_committed(self) -> Mapping[TP, int]:
        return await self.call_thread(self._seek_to_committed)

    async def _seek_to_committed(self) -> Mapping[TP, int]:
        consumer = self._ensure_consumer()
        committed = await consumer.seek_to_committed()  # seeks only where the committed offset is > 0
        unsought = [tp for tp, offset in committed.items() if tp.topic in self.input_topics and not offset]
        for tp in unsought:
            if committed[tp] == 0:
                consumer.seek(tp, 0)
        if nothing := [tp for tp in unsought if committed[tp] is None]:
            await consumer.seek_to_beginning(*nothing)
        if unsought:
            log.info("input partitions read from their start (committed 0 or nothing): %s",
                     sorted(tp.partition for tp in unsought))  # fmt: skip
        return {**committed, **await self._restart_beyond_the_end(consumer, committed)}

    async def _restart_beyond_the_end(self, consumer: Any, committed: Mapping[TP, int | None]) -> dict[TP, int]:
        """Input partitions whose committed offset lies past their end (the topic was recreated, or mirrored to
        a new cluster, under the group's old offsets): read from their start, and reported to Faust as committed
        at 0. aiokafka alone would reset the position to the start, but Faust drops every message below the
        committed offset it was told (`Consumer._drain_messages`), so the new events were never handed to the
        agent until their offsets passed the old ones (tests/test_worker.py::test_j). A broker that lost the tail
        of its log (the local one, killed) lands here too: the partition is read again from its start, and the
        events already folded are recognised as replays by the users' states."""
        held = [tp for tp, offset in committed.items() if tp.topic in self.input_topics and offset]
        if not held:
            return {}
        ends = await consumer.end_offsets(held)
        beyond = [tp for tp in held if committed[tp] > ends[tp]]  # type: ignore[operator]
        if not beyond:
            return {}
        log.warning("input partitions %s: committed offsets %s lie past their end %s (topic recreated?); read from "
                    "their start", sorted(tp.partition for tp in beyond), [committed[tp] for tp in beyond],
                    [ends[tp] for tp in beyond])  # fmt: skip
        await consumer.seek_to_beginning(*beyond)
        return dict.fromkeys(beyond, 0)

    async def end_offset(self, tp: TP) -> int:
        """The partition's end offset (the next offset to be written), asked of the broker."""
        return await self.call_thread(self._end_offset, tp)

    async def _end_offset(self, tp: TP) -> int:
        aiokafka_tp = faust_aiokafka.ensure_aiokafka_TP(tp)
        return (await self._ensure_consumer().end_offsets([aiokafka_tp]))[aiokafka_tp]

    def settled(self, generation: int) -> bool:
        """aiokafka is in Faust's `generation` and knows of no rebalance to rejoin (read from the caller's thread:
        plain attribute reads, no I/O). The fence's lease ends when this turns False."""
        consumer = self._ensure_consumer()
        coordinator, subscription = consumer._coordinator, consumer._subscription.subscription
        if subscription is None:
            return False
        return coordinator.generation == generation and not coordinator.need_rejoin(subscription)

    async def membership(self, generation: int) -> Membership:
        """What the group coordinator says of this member in Faust's `generation` (stream/fencing.py)."""
        return await self.call_thread(self._membership, generation)

    async def _membership(self, generation: int) -> Membership:
        coordinator = self._ensure_consumer()._coordinator
        if coordinator.generation != generation:  # aiokafka left or rejoined since Faust's last assignment
            return Membership.GONE
        request = HeartbeatRequest(coordinator.group_id, coordinator.generation, coordinator.member_id)
        try:
            response = await coordinator._send_req(request)
        except kafka_errors.KafkaError:
            return Membership.UNKNOWN
        error = kafka_errors.for_code(response.error_code)
        if error is kafka_errors.NoError:
            return Membership.MEMBER
        if error is kafka_errors.RebalanceInProgressError:
            return Membership.REBALANCING
        if error in (kafka_errors.IllegalGenerationError, kafka_errors.UnknownMemberIdError):
            return Membership.GONE
        return Membership.UNKNOWN  # coordinator moving or not ready: aiokafka's heartbeat finds it again


class InputWentBack(RuntimeError):
    """An events partition's log went back under the running worker: it restarts to read it from the start."""


class Consumer(faust_aiokafka.Consumer):
    """Faust's consumer with `ConsumerThread`, and one more check on the messages it fetches.

    A message of an events partition below the offset Faust already read there means the log went back under
    the running worker: the topic was deleted and recreated (or its log truncated), and aiokafka, finding its
    position out of range, reset it to the start. Faust would drop every such message (`_drain_messages` hands
    out only offsets at or above the read offset) until the new offsets passed the old ones: events lost with
    nothing said (found by the test of a topic recreated under a running worker, tests/test_worker.py). Reset
    in place, Faust's commit bookkeeping would mix the two logs' offsets, so the worker instead commits the
    partition at 0, refuses any later commit of it in this process, logs an error and stops with a crash. Its
    supervisor (the StatefulSet, or an operator) starts it again, and the new start reads the partition from 0:
    the new log's events are applied (their users' offset witnesses restart: core/sessions.py), the old log's
    already folded ones never come again. Nothing of the partition was committed past what was folded."""

    input_topics: frozenset[str] = frozenset()
    _went_back_checked: dict[TP, int]  # per partition, the read offset last checked against the log's end

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._went_back_checked = {}

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        thread = type("ConsumerThread", (ConsumerThread,), {"input_topics": self.input_topics})
        return thread(self, loop=self.loop, beacon=self.beacon)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Any]]:
        read_offsets = self._read_offset
        async for tp, message in super().getmany(timeout):
            if tp.topic in self.input_topics and (read := read_offsets.get(tp)) is not None and message.offset < read:
                await self._maybe_went_back(tp, message.offset, read)
            yield tp, message  # below the read offset Faust drops it, as it always did

    async def _maybe_went_back(self, tp: TP, offset: int, read: int) -> None:
        """A message below the read offset is also what a rebalance race delivers (fetched after the seek to the
        committed offset, before Faust moved its read offset back there; stream/continuity.py fills what Faust
        drops then). Only a log that now ends below what was read has gone back: asked once per read offset."""
        if self._went_back_checked.get(tp) == read:
            return
        self._went_back_checked[tp] = read
        end = await self._thread.end_offset(tp)
        if end < read:
            await self._went_back(tp, offset, read, end)

    async def _went_back(self, tp: TP, offset: int, read: int, end: int) -> None:
        self._committed_offset[tp] = _NEVER  # Faust commits only offsets above it: nothing more of tp here
        why = (
            f"events partition {tp.partition}: offset {offset} fetched after offset {read} was read, and the log "
            f"now ends at {end} (the topic was recreated or its log truncated); committed at 0, the worker "
            "restarts to read it from the start"
        )
        log.error(why)
        await self._thread.commit({tp: 0})
        await self.crash(InputWentBack(why))


_NEVER = sys.maxsize  # a committed offset no real one exceeds


def install(app: faust.App, input_topics: Iterable[str]) -> None:
    """Make `app` use this consumer for `input_topics` (before its consumer is created); `pins.UnsupportedRelease`
    on a Faust or aiokafka this was not written for."""
    pins.require("faust", "aiokafka")
    app.transport.Consumer = type("Consumer", (Consumer,), {"input_topics": frozenset(input_topics)})  # type: ignore[misc]
