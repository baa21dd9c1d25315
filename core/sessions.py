"""Per-user cross-session state and its pure update `(state, events) -> state`.

One implementation serves the worker (one user's events at a time, as they arrive) and the offline
pipeline (`state_from_events`, used by training, evaluation and the parity tests).

Rules, in event time (`Event.timestamp`, ms):

* Events are kept sorted by `(timestamp, fingerprint)`; a session ends where two neighbours are more than
  `gap_ms` apart, so sessions are a function of the retained events and nothing else.
* The user's watermark is the latest event time seen. An event up to `lateness_ms` behind it slots into
  place (it may extend, start, or merge sessions). An event further behind is **late**: not applied, and
  the worker routes it to the dead-letter topic with reason `late`, so nothing is silently dropped.
* A **replay** is recognised by its input offset: a user's events all come from one partition of the events
  topic, so an event whose offset is at most `UserState.input_offset` was already folded in (a crash or a
  rebalance re-reads uncommitted input). Replays change nothing, whatever the bounds evicted since. An offset
  at most `input_offset` whose event is newer than the watermark, with an identity not seen, cannot have been
  folded: the input topic was recreated (or mirrored) and its offsets started again. That event is applied and
  `input_offset` restarts from its offset (`Applied.new_incarnation`), so the new topic's events are not
  swallowed as replays. (A recreated topic's events older than the watermark still read as replays.)
* Identity: `event_id` identifies one event of a user (without one, `(item_id, event_type, timestamp, value)`
  does); the fingerprint is a 64-bit hash of it. A message is a **duplicate**, and ignored, when an event with
  its identity was seen within the lateness horizon (its latest copy's time >= watermark - `lateness_ms`).
  The identities of events the bounds evicted inside the horizon are remembered (`id_ts`/`id_fps`, up to
  `max_ids`), so idempotence reaches exactly the lateness horizon, independent of the bounds. Beyond the
  horizon a copy is late (above), and an id may be reused by a new event.
* Bounds: the newest `max_events` events; and of the sessions that can no longer change (their last
  event is more than `lateness_ms + gap_ms` behind the watermark, so no acceptable late event can reach
  them) only the newest `max_sessions` are kept. Sessions that a late event could still merge are never
  evicted: that is what makes the result independent of arrival order within the lateness.
* A **forget** (`core.schema.Forget`) deletes the state; the user's later events fold into an empty state, a fresh
  history. Whether a forget read again was already executed is decided by offset too (`forget_is_replay`).
"""

from __future__ import annotations

import enum
import hashlib
import struct
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate, pairwise
from typing import TYPE_CHECKING

import msgspec

from core.schema import KNOWN_EVENT_TYPES, scenario_of

if TYPE_CHECKING:
    from core.schema import Event


@dataclass(frozen=True, slots=True)
class SessionConfig:
    gap_ms: int = 30 * 60 * 1000
    lateness_ms: int = 60 * 60 * 1000
    max_events: int = 200
    max_sessions: int = 20
    max_ids: int = 2000  # evicted identities remembered for de-duplication (only for > max_events per horizon)


class Outcome(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    LATE = "late"
    REPLAY = "replay"  # offset already folded in (crash or rebalance re-read)


@dataclass(frozen=True, slots=True)
class UserState:
    """Retained events as parallel columns, oldest first; `starts` indexes each session's first event."""

    ts: tuple[int, ...] = ()
    items: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    values: tuple[float | None, ...] = ()
    fps: tuple[int, ...] = ()
    starts: tuple[int, ...] = ()
    scenarios: tuple[str, ...] = ()  # per event, "" = none; () = none for every event (states before scenarios)
    events_seen: int = 0  # applied events ever, retained or not
    sessions_evicted: int = 0  # whole sessions dropped by the bounds
    # Output bookkeeping, owned by the inference path: the sequence number of the last published update
    # and whether the state changed since (a persisted mark, so a crash cannot lose an update).
    seq: int = 0
    dirty: bool = False
    input_offset: int = -1  # highest events-topic offset folded in (-1: none, or offsets not given)
    # Identities not covered by a retained event inside the lateness horizon: evicted ones, and later copies.
    id_ts: tuple[int, ...] = ()  # latest event time seen with the identity, ascending
    id_fps: tuple[int, ...] = ()

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
    new_incarnation: bool = False  # offsets went back: the input topic was recreated (module docstring)

    @property
    def changed(self) -> bool:
        return any(o is Outcome.APPLIED for o in self.outcomes)


def fingerprint(event: Event) -> int:
    if event.event_id is not None:
        data = event.event_id.encode()
    else:
        data = f"{event.item_id}\x1f{event.event_type}\x1f{event.timestamp}\x1f{event.value!r}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def apply_events(
    state: UserState, events: Iterable[Event], cfg: SessionConfig, offsets: Sequence[int] | None = None
) -> tuple[UserState, Applied]:
    """Fold `events` (in arrival order; `offsets`: their input offsets, if known) into `state`. Pure."""
    ts, items, types = list(state.ts), list(state.items), list(state.types)
    values, fps = list(state.values), list(state.fps)
    scenarios = list(state.scenarios) or [""] * len(ts)
    last_seen = dict(zip(state.id_fps, state.id_ts, strict=True))  # identity -> latest time, beyond retention
    for t, fp in zip(ts, fps, strict=True):
        last_seen[fp] = max(last_seen.get(fp, t), t)
    input_offset = state.input_offset
    report = Applied()
    replay_below = state.input_offset
    for k, event in enumerate(events):
        fp, t = fingerprint(event), event.timestamp
        if offsets is not None:
            if offsets[k] <= replay_below:
                if not (ts and t > ts[-1] and fp not in last_seen):
                    report.outcomes.append(Outcome.REPLAY)
                    continue
                report.new_incarnation = True  # cannot have been folded: the offsets started again
                replay_below = input_offset = offsets[k] - 1
            input_offset = max(input_offset, offsets[k])
        horizon = ts[-1] - cfg.lateness_ms if ts else t
        if t < horizon:  # never applied; a copy of an event we still know is a duplicate (re-sent data), not late
            report.outcomes.append(Outcome.DUPLICATE if fp in last_seen else Outcome.LATE)
            continue
        if last_seen.get(fp, horizon - 1) >= horizon:
            report.outcomes.append(Outcome.DUPLICATE)
            last_seen[fp] = max(last_seen[fp], t)  # a later copy keeps the identity alive longer
            continue
        last_seen[fp] = t
        i = bisect_right(ts, t)
        while i > 0 and ts[i - 1] == t and fps[i - 1] > fp:
            i -= 1
        ts.insert(i, t)
        items.insert(i, event.item_id)
        types.insert(i, event.event_type)
        values.insert(i, event.value)
        fps.insert(i, fp)
        scenarios.insert(i, scenario_of(event))
        isolated_before = i == 0 or t - ts[i - 1] > cfg.gap_ms
        isolated_after = i == len(ts) - 1 or ts[i + 1] - t > cfg.gap_ms
        report.new_sessions += isolated_before and isolated_after
        report.outcomes.append(Outcome.APPLIED)
    if not ts or all(o in (Outcome.REPLAY, Outcome.LATE) for o in report.outcomes):
        return state, report  # (a new incarnation always applies its first event, so it never returns here)

    drop = max(0, len(ts) - cfg.max_events)
    starts = session_starts(ts, cfg.gap_ms)
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
    id_ts, id_fps = _remembered_ids(last_seen, ts[drop:], fps[drop:], ts[-1] - cfg.lateness_ms, cfg.max_ids)
    new_state = replace(
        state,
        ts=tuple(ts[drop:]),
        items=tuple(items[drop:]),
        types=tuple(types[drop:]),
        values=tuple(values[drop:]),
        fps=tuple(fps[drop:]),
        starts=tuple(starts),
        scenarios=tuple(scenarios[drop:]) if any(scenarios[drop:]) else (),
        events_seen=state.events_seen + applied,
        sessions_evicted=state.sessions_evicted + evicted,
        dirty=state.dirty or applied > 0,
        input_offset=input_offset,
        id_ts=id_ts,
        id_fps=id_fps,
    )
    if not report.changed and new_state == replace(state, input_offset=input_offset):
        return state, report  # only duplicates, and no identity's life was extended
    return new_state, report


def forget_is_replay(stored: UserState, offset: int) -> bool:
    """Was the forget at input `offset` already executed? It deleted the state, so a stored state that holds
    `offset` or a later one was built after it: a fresh history, which a replayed forget must not erase. Without
    such a state (none, or only older input) it must run (again): a crash may have come before the deletion or
    before the output tombstone, and running it twice is harmless."""
    return stored.input_offset >= offset


def _remembered_ids(
    last_seen: dict[int, int], ts: Sequence[int], fps: Sequence[int], horizon: int, max_ids: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Identities inside the horizon that the retained events do not already vouch for, newest `max_ids`."""
    for t, fp in zip(ts, fps, strict=True):
        if last_seen.get(fp) == t:
            del last_seen[fp]
    kept = sorted((t, fp) for fp, t in last_seen.items() if t >= horizon)[-max_ids:]
    return tuple(t for t, _ in kept), tuple(fp for _, fp in kept)


def session_starts(ts: Sequence[int], gap_ms: int) -> list[int]:
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
    input_offset: int = -1
    id_ts: list[int] = []
    id_fps: bytes = b""
    # Per event, an index into `scenario_names` (one byte: a state holds at most 256 distinct scenarios; max_events is
    # far below); both empty when no event names a scenario (and in states stored before scenarios existed).
    scenario_names: list[str] = []
    scenario_codes: bytes = b""


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
            fps=_pack(state.fps),
            starts=list(state.starts),
            events_seen=state.events_seen,
            sessions_evicted=state.sessions_evicted,
            seq=state.seq,
            dirty=state.dirty,
            input_offset=state.input_offset,
            id_ts=list(state.id_ts),
            id_fps=_pack(state.id_fps),
            **_pack_scenarios(state.scenarios),
        )
    )


def _pack(fps: Sequence[int]) -> bytes:
    """64-bit fingerprints as 8 big-endian bytes each (msgpack would spend 9 per int and a list header)."""
    return struct.pack(f">{len(fps)}Q", *fps)


def _pack_scenarios(scenarios: Sequence[str]) -> dict[str, list[str] | bytes]:
    """Scenario names once per state, one byte per event (the names repeated per event cost ~4x as much)."""
    names = list(dict.fromkeys(scenarios))
    if len(names) > 256:
        raise ValueError(f"{len(names)} distinct scenarios in one state; at most 256 are stored")
    index = {name: i for i, name in enumerate(names)}
    return {"scenario_names": names, "scenario_codes": bytes(index[x] for x in scenarios)}


def _unpack(data: bytes) -> tuple[int, ...]:
    if len(data) % 8:
        raise ValueError(f"fingerprints of {len(data)} bytes: not a multiple of 8")
    return struct.unpack(f">{len(data) // 8}Q", data)


def decode_state(data: bytes | None) -> UserState:
    if not data:
        return UserState()
    s = _dec.decode(data)
    if s.format != STATE_FORMAT:
        raise ValueError(f"unknown state format {s.format}")
    n = len(s.items)
    ts = tuple(accumulate(s.dts, initial=s.t0)) if n else ()
    return UserState(
        ts=ts,
        items=tuple(s.items),
        types=tuple(KNOWN_EVENT_TYPES[t] if isinstance(t, int) else t for t in s.types),
        values=tuple(float(v) if v is not None else None for v in s.values),
        fps=_unpack(s.fps),
        starts=tuple(s.starts),
        events_seen=s.events_seen,
        sessions_evicted=s.sessions_evicted,
        seq=s.seq,
        dirty=s.dirty,
        input_offset=s.input_offset,
        id_ts=tuple(s.id_ts),
        id_fps=_unpack(s.id_fps),
        scenarios=tuple(s.scenario_names[c] for c in s.scenario_codes),
    )
