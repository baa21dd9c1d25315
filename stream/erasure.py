"""Forgetting a user (right to erasure): a `forget` message on the events topic, ordered with the user's events.

Per user, the batch's last forget runs: the user's value is deleted (a changelog tombstone, acknowledged, then
RocksDB: stream/tables.py), then a tombstone goes to the output topic. The events after it fold into an empty
state (a fresh history, seq restarts at 1); those before it are never folded. A forget read again after a crash
is skipped when a newer state exists (`forget_is_replay`: that is the fresh history), else it runs again, which is
harmless (docs/events.md, "Forgetting a user").
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from faust.types import EventT

from core.schema import Event, Forget
from core.sessions import decode_state, forget_is_replay
from stream import metrics
from stream.deadletter import DeadLetters, Sendable
from stream.tables import Tables, Write

Pairs = list[tuple[Event | Forget, EventT]]


async def forget(
    by_user: dict[bytes, Pairs],
    tables: Tables,
    output: Sendable,
    dead: DeadLetters,
    on_stage: Callable[[str], None],
) -> dict[bytes, list[tuple[Event, EventT]]]:
    """Execute each user's last forget of the batch; hand back the events after it."""
    events: dict[bytes, list[tuple[Event, EventT]]] = {}
    erase: list[tuple[bytes, EventT]] = []
    for key, pairs in by_user.items():
        last = max((i for i, (m, _) in enumerate(pairs) if isinstance(m, Forget)), default=-1)
        if after := [(e, ev) for e, ev in pairs[last + 1 :] if isinstance(e, Event)]:
            events[key] = after
        if last >= 0:
            ev = pairs[last][1]
            done = (ev.message.partition, ev.message.offset, -1) in dead.seen  # by an earlier attempt at this batch
            stored = tables.get(ev.message.partition, key)
            if not done and not forget_is_replay(decode_state(stored and stored.state), ev.message.offset):
                erase.append((key, ev))
    if erase:
        await tables.write([Write(ev.message.partition, key, None) for key, ev in erase])
        on_stage("after_forget_tables")
        tombstones: list[Awaitable[Any]] = [await output.send(key=key, value=None) for key, _ in erase]
        await asyncio.gather(*tombstones)
        dead.seen.update((ev.message.partition, ev.message.offset, -1) for _, ev in erase)
        metrics.USERS_FORGOTTEN.inc(len(erase))
    return events
