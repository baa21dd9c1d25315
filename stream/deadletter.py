"""The dead-letter topic: one record per rejected message (or rejected event of a batch envelope), once.

The record is the original key and bytes, cut to DLQ_MAX_VALUE_BYTES so a message too large to forward cannot
fail its batch, with the reason and the original's identity in headers (docs/events.md, "Dead-letter topic").
A batch that is retried never dead-letters a message twice: `seen` holds what this batch already delivered.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import traceback
from collections.abc import Awaitable
from typing import Any, Protocol

from faust.types import EventT

from core.schema import Rejection
from stream import metrics

Where = tuple[int, int, int]  # (partition, offset, index in its batch envelope; -1 for a plain message)


class Sendable(Protocol):
    """What is needed of a topic (a Faust `Topic`, or a fake in unit tests)."""

    async def send(self, *, key: bytes, value: bytes | None, headers: Any = None) -> Awaitable[Any]: ...


class Internal(Rejection, frozen=True):
    """Reason `internal`: the step failed on this message by itself (stream/isolation.py); `error` is the
    exception with its traceback, for the `dlq.exception` header."""

    error: str = ""


def internal(error: Exception) -> Internal:
    trace = "".join(traceback.format_exception(error))
    return Internal("internal", f"the worker failed on this message: {type(error).__name__}: {error}", trace[-4096:])


class DeadLetters:
    """The DLQ sends of one batch (all its attempts): `send` queues one, `flush` awaits this attempt's sends and
    remembers which were delivered, so a retry skips exactly those."""

    def __init__(self, topic: Sendable, max_value_bytes: int) -> None:
        self.topic, self.max_value_bytes = topic, max_value_bytes
        self.seen: set[Where] = set()  # delivered by an earlier attempt (or executed, for a forget)
        self._pending: list[tuple[Where, Awaitable[Any]]] = []

    async def send(self, ev: EventT, rejection: Rejection, index: int = -1, raw: bytes | None = None) -> None:
        msg = ev.message
        where = (msg.partition, msg.offset, index)
        if where in self.seen:
            return
        value, key = (msg.value or b"") if raw is None else raw, msg.key or b""
        headers = [
            ("dlq.reason", rejection.reason.encode()),
            *([("dlq.exception", rejection.error.encode()[:4096])] if isinstance(rejection, Internal) else []),
            ("dlq.detail", rejection.detail.encode()[:1024]),
            ("dlq.topic", msg.topic.encode()),
            ("dlq.partition", str(msg.partition).encode()),
            ("dlq.offset", str(msg.offset).encode()),
            *([("dlq.index", str(index).encode())] if index >= 0 else []),
            ("dlq.time_ms", str(int(time.time() * 1000)).encode()),
            ("dlq.original_bytes", str(len(value)).encode()),
            ("dlq.sha256", hashlib.sha256(value).hexdigest().encode()),
        ]
        if len(value) > self.max_value_bytes or len(key) > 1024:
            headers.append(("dlq.truncated", b"1"))
        sent = await self.topic.send(key=key[:1024], value=value[: self.max_value_bytes], headers=headers)
        self._pending.append((where, sent))
        metrics.EVENTS_REJECTED.labels(rejection.reason).inc()

    async def flush(self) -> None:
        """Await this attempt's sends (also when the attempt failed); raise the first failure."""
        pending, self._pending = self._pending, []
        results = await asyncio.gather(*(sent for _, sent in pending), return_exceptions=True)
        self.seen.update(
            where for (where, _), r in zip(pending, results, strict=True) if not isinstance(r, BaseException)
        )
        if failed := next((r for r in results if isinstance(r, BaseException)), None):
            raise failed
