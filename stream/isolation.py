"""No message can fail its batch: retry what is not a message's fault, isolate the message that is.

A batch step that raises is retried: Faust acks a `take()` batch even when the agent raises, so leaving it would
commit lost updates. Two kinds of failure need opposite answers:

* **Not a message's fault** (`NOT_A_MESSAGE_FAULT`: Triton down or overloaded, a version unloaded mid-batch,
  broker or network errors): the same batch is retried with back-off for as long as it takes. The partition
  stalls loudly (lag alert, /health degraded) and nothing is dead-lettered.
* **Anything else** (a bug that one message triggers: an exception we did not foresee, from our code or a
  library's): after the batch failed twice, it is bisected. Each half runs as a batch of its own, first half
  first (so a user's events keep their order), down to single messages; a message that fails twice on its own
  is the culprit. The caller dead-letters it once (reason `internal`, the exception in a header) and the rest
  of the batch is applied. A half that succeeds is done: the step is idempotent for its input (a state knows
  the offsets it folded), so a half that failed midway is simply run again.

A `Fenced` batch (its partitions may have a new owner: stream/fencing.py) ends the run at once.

If every message of a batch of two or more fails on its own, the messages are not the cause (the model returns
garbage for everyone, say): that is retried like an outage, never dead-lettered wholesale.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from aiokafka.errors import KafkaError

from stream.fencing import Fenced
from stream.inference import ModelMismatch, TritonUnavailable, VersionGone

log = logging.getLogger(__name__)

#: Failures that say nothing about the messages of the batch: retried as they are, never isolated.
NOT_A_MESSAGE_FAULT: tuple[type[BaseException], ...] = (
    TritonUnavailable,
    VersionGone,
    ModelMismatch,
    KafkaError,
    OSError,  # ConnectionError and friends
    TimeoutError,  # asyncio.TimeoutError is TimeoutError
)

M = TypeVar("M")


@dataclass(frozen=True)
class Culprit:
    """A message that failed on its own, twice, and the exception of its last try."""

    message: object
    error: Exception


class Retrier:
    """Runs `attempt(messages)` until every message is applied or isolated (see the module docstring).

    `on_failure(error, size)` is told about every failed attempt (metrics, logs, health); `sleep` is
    `asyncio.sleep` (tests pass a fake)."""

    def __init__(
        self,
        attempt: Callable[[list[M]], Awaitable[None]],
        *,
        on_failure: Callable[[BaseException, int], None] = lambda error, size: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        first_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
    ) -> None:
        self.attempt, self.on_failure, self.sleep = attempt, on_failure, sleep
        self.first_delay_s, self.max_delay_s = first_delay_s, max_delay_s

    async def run(self, messages: Sequence[M]) -> list[Culprit]:
        """The culprits, in input order; every other message has been applied when this returns."""
        delay_s = self.first_delay_s
        while True:
            culprits = await self._isolate(list(messages))
            if len(messages) < 2 or len(culprits) < len(messages):
                return culprits
            log.error("each of the %d messages of a batch fails on its own: not their fault; retrying in %.1f s",
                      len(messages), delay_s)  # fmt: skip
            await self.sleep(delay_s)
            delay_s = min(2 * delay_s, self.max_delay_s)

    async def _isolate(self, messages: list[M]) -> list[Culprit]:
        error = await self._try_twice(messages)
        if error is None:
            return []
        if len(messages) == 1:
            return [Culprit(messages[0], error)]
        half = len(messages) // 2
        log.warning("isolating the message that fails a batch of %d: %s", len(messages), error)
        return [*await self._isolate(messages[:half]), *await self._isolate(messages[half:])]

    async def _try_twice(self, messages: list[M]) -> Exception | None:
        """None once `attempt` succeeded; the error when it failed twice for a reason that may be a message's.
        Failures that are not a message's fault are retried with back-off, without counting."""
        delay_s, tries = self.first_delay_s, 0
        while True:
            try:
                await self.attempt(messages)
                return None
            except Fenced:  # the batch is no longer ours: nothing to retry or isolate (stream/fencing.py)
                raise
            except Exception as exc:
                self.on_failure(exc, len(messages))
                if isinstance(exc, NOT_A_MESSAGE_FAULT):
                    log.exception("batch of %d messages failed; retrying in %.1f s (offsets stay uncommitted)",
                                  len(messages), delay_s)  # fmt: skip
                else:
                    tries += 1
                    log.exception("batch of %d messages failed (try %d of 2 before isolating)", len(messages), tries)
                    if tries == 2:
                        return exc
                await self.sleep(delay_s)
                delay_s = min(2 * delay_s, self.max_delay_s)
