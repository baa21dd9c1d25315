"""Per-user cross-session state and its pure update `(state, events) -> state`.

One implementation serves the worker (one user's events at a time, as they arrive) and the offline
pipeline (`state_from_events`, used by training, evaluation and the parity tests).

Rules, in event time (`Event.timestamp`, ms):

* Events are kept sorted by `(timestamp, fingerprint)`; a session ends where two neighbours are more than
  `gap_ms` apart, so sessions are a function of the retained events and nothing else.
* The user's watermark is the latest event time seen. An event up to `lateness_ms` behind it slots into
  place (it may extend, start, or merge sessions). An event further behind is **late**: not applied, and
  the worker routes it to the dead-letter topic with reason `late`, so nothing is silently dropped.
* A duplicate (same fingerprint as a retained event) is ignored. The fingerprint is a 64-bit hash of
  `event_id`, or of `(item_id, event_type, timestamp, value)` when there is no id.
* Bounds: the newest `max_events` events; and of the sessions that can no longer change (their last
  event is more than `lateness_ms + gap_ms` behind the watermark, so no acceptable late event can reach
  them) only the newest `max_sessions` are kept. Sessions that a late event could still merge are never
  evicted: that is what makes the result independent of arrival order within the lateness.
"""

from __future__ import annotations

import enum
import hashlib
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate, pairwise
from typing import TYPE_CHECKING

import msgspec

from core.schema import KNOWN_EVENT_TYPES

if TYPE_CHECKING:
    from core.schema import Event


@dataclass(frozen=True, slots=True)
class SessionConfig:
    gap_ms: int = 30 * 60 * 1000
    lateness_ms: int = 60 * 60 * 1000
    max_events: int = 200
    max_sessions: int = 20


class Outcome(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    LATE = "late"


@dataclass(frozen=True, slots=True)
class UserState:
    """Retained events as parallel columns, oldest first; `starts` indexes each session's first event."""

    ts: tuple[int, ...] = ()
    items: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    values: tuple[float | None, ...] = ()
    fps: tuple[int, ...] = ()
    starts: tuple[int, ...] = ()
    events_seen: int = 0  # applied events ever, retained or not
    sessions_evicted: int = 0  # whole sessions dropped by the bounds
    # Output bookkeeping, owned by the inference path: the sequence number of the last published update
    # and whether the state changed since (a persisted mark, so a crash cannot lose an update).
    seq: int = 0
    dirty: bool = False

    def __len__(self) -> int:
        return len(self.ts)

    @property
    def sessions_seen(self) -> int:
        return self.sessions_evicted + len(self.starts)

    @property
    def watermark(self) -> int | None:
        return self.ts[-1] if self.ts else None

    def session_slices(self) -> list[slice]:
        ends = [*self.starts[1:], len(self.ts)]
        return [slice(a, b) for a, b in zip(self.starts, ends, strict=True)]


@dataclass(slots=True)
class Applied:
    """What an update did, for metrics and the dead-letter path (one outcome per input event)."""

    outcomes: list[Outcome] = field(default_factory=list)
    new_sessions: int = 0

    @property
    def changed(self) -> bool:
        return any(o is Outcome.APPLIED for o in self.outcomes)


def fingerprint(event: Event) -> int:
    if event.event_id is not None:
        data = event.event_id.encode()
    else:
        data = f"{event.item_id}\x1f{event.event_type}\x1f{event.timestamp}\x1f{event.value!r}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def apply_events(state: UserState, events: Iterable[Event], cfg: SessionConfig) -> tuple[UserState, Applied]:
    """Fold `events` (in arrival order) into `state`. Pure: `state` is not modified."""
    ts, items, types = list(state.ts), list(state.items), list(state.types)
    values, fps = list(state.values), list(state.fps)
    seen = set(fps)
    report = Applied()
    for event in events:
        fp = fingerprint(event)
        t = event.timestamp
        if fp in seen:
            report.outcomes.append(Outcome.DUPLICATE)
            continue
        if ts and t < ts[-1] - cfg.lateness_ms:
            report.outcomes.append(Outcome.LATE)
            continue
        i = bisect_right(ts, t)
        while i > 0 and ts[i - 1] == t and fps[i - 1] > fp:
            i -= 1
        ts.insert(i, t)
        items.insert(i, event.item_id)
        types.insert(i, event.event_type)
        values.insert(i, event.value)
        fps.insert(i, fp)
        seen.add(fp)
        isolated_before = i == 0 or t - ts[i - 1] > cfg.gap_ms
        isolated_after = i == len(ts) - 1 or ts[i + 1] - t > cfg.gap_ms
        report.new_sessions += isolated_before and isolated_after
        report.outcomes.append(Outcome.APPLIED)
    if not report.changed:
        return state, report

    drop = max(0, len(ts) - cfg.max_events)
    starts = _session_starts(ts, cfg.gap_ms)
    kept = [s for s in starts if s > drop]
    if drop < len(ts):
        kept.insert(0, drop)  # the oldest retained session may have lost its first events
    horizon = ts[-1] - cfg.lateness_ms - cfg.gap_ms
    ends = [*kept[1:], len(ts)]
    closed = sum(1 for e in ends if ts[e - 1] < horizon)
    if closed > cfg.max_sessions:
        drop = kept[closed - cfg.max_sessions]
    # A session counts as evicted once none of its events is retained (boundaries at or before `drop`).
    evicted = sum(1 for s in starts if 0 < s <= drop)
    starts = [s - drop for s in kept if s >= drop]
    applied = sum(o is Outcome.APPLIED for o in report.outcomes)
    new_state = replace(
        state,
        ts=tuple(ts[drop:]),
        items=tuple(items[drop:]),
        types=tuple(types[drop:]),
        values=tuple(values[drop:]),
        fps=tuple(fps[drop:]),
        starts=tuple(starts),
        events_seen=state.events_seen + applied,
        sessions_evicted=state.sessions_evicted + evicted,
        dirty=True,
    )
    return new_state, report


def _session_starts(ts: Sequence[int], gap_ms: int) -> list[int]:
    """Indices where a session begins."""
    if not ts:
        return []
    return [0] + [i for i in range(1, len(ts)) if ts[i] - ts[i - 1] > gap_ms]


def state_from_events(events: Iterable[Event], cfg: SessionConfig) -> UserState:
    """Offline sessionization of one user's full history: the same fold, in event-time order."""
    ordered = sorted(events, key=lambda e: (e.timestamp, fingerprint(e)))
    return apply_events(UserState(), ordered, cfg)[0]


# --- Compact serialization (msgpack; timestamps delta-encoded, fingerprints packed 8 bytes each).

STATE_FORMAT = 1
_TYPE_CODES = {name: code for code, name in enumerate(KNOWN_EVENT_TYPES)}


class _Stored(msgspec.Struct, array_like=True):
    format: int
    t0: int
    dts: list[int]
    items: list[str]
    types: list[int | str]  # known event types as their index in KNOWN_EVENT_TYPES (append-only list)
    values: list[float | None]
    fps: bytes
    starts: list[int]
    events_seen: int
    sessions_evicted: int
    seq: int = 0
    dirty: bool = False


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(_Stored)


def encode_state(state: UserState) -> bytes:
    ts = state.ts
    return _enc.encode(
        _Stored(
            format=STATE_FORMAT,
            t0=ts[0] if ts else 0,
            dts=[b - a for a, b in pairwise(ts)],
            items=list(state.items),
            types=[_TYPE_CODES.get(t, t) for t in state.types],
            values=[int(v) if v is not None and v.is_integer() else v for v in state.values],
            fps=b"".join(fp.to_bytes(8, "big") for fp in state.fps),
            starts=list(state.starts),
            events_seen=state.events_seen,
            sessions_evicted=state.sessions_evicted,
            seq=state.seq,
            dirty=state.dirty,
        )
    )


def decode_state(data: bytes | None) -> UserState:
    if not data:
        return UserState()
    s = _dec.decode(data)
    if s.format != STATE_FORMAT:
        raise ValueError(f"unknown state format {s.format}")
    n = len(s.items)
    ts = tuple(accumulate(s.dts, initial=s.t0)) if n else ()
    fp = s.fps
    return UserState(
        ts=ts,
        items=tuple(s.items),
        types=tuple(KNOWN_EVENT_TYPES[t] if isinstance(t, int) else t for t in s.types),
        values=tuple(float(v) if v is not None else None for v in s.values),
        fps=tuple(int.from_bytes(fp[i : i + 8], "big") for i in range(0, 8 * n, 8)),
        starts=tuple(s.starts),
        events_seen=s.events_seen,
        sessions_evicted=s.sessions_evicted,
        seq=s.seq,
        dirty=s.dirty,
    )
