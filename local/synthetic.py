"""A seeded, deterministic event generator for load tests, and the malformed messages a real stream carries.

`generate(users, events, seed=...)` returns raw `(key, value)` messages in publish order, so malformed ones
are published byte for byte as they would arrive from a broken producer. The same arguments always give the
same bytes: timestamps start at a fixed date and all randomness comes from one `numpy` generator.

Shape of the data (what the worker's state and the model see):
* item popularity follows a bounded Zipf law (rank r has weight 1/r**zipf_a), so a few items are hot;
* user activity is skewed (log-normal weights), every user has at least one event;
* each user has several sessions: in-session gaps of seconds to minutes, inter-session gaps of hours to days;
* event types mix like a shop: mostly views, some clicks, few carts, fewer purchases;
* messages are ordered by event time globally, each user's events in their own order.

Every malformed message carries a marker `bad-<kind>-<n>` in its bytes (see `marker_of`), so a test can
match each one to its dead-letter record, and `MALFORMED_KINDS` says which rejection reason to expect.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import msgspec
import numpy as np

from core.schema import Event, encode_envelope, encode_event

START_MS: Final = 1_704_067_200_000  # 2024-01-01T00:00:00Z: fixed, so replays are deterministic
EVENT_TYPES: Final = ("view", "click", "cart", "purchase")
EVENT_TYPE_SHARES: Final = (0.70, 0.20, 0.07, 0.03)

#: Malformed kinds and the `core.schema.parse_event` rejection reason each must get.
MALFORMED_KINDS: Final = {
    "invalid_json": "invalid_json",
    "missing_field": "schema",
    "unknown_field": "schema",
    "bad_type": "schema",
    "long_id": "schema",
    "seconds_timestamp": "timestamp_range",
    "oversized": "too_large",
    "key_mismatch": "key_mismatch",
    "too_deep": "too_deep",  # about 2 KB of nested arrays: the poison pill of issue 24
}

_MARKER = re.compile(rb"bad-([a-z_]+)-(\d+)")
_json = msgspec.json.Encoder()


@dataclass(frozen=True)
class Messages:
    """Raw messages in publish order; `kinds[i]` is None for a valid event, else its malformed kind."""

    records: list[tuple[bytes, bytes]]
    kinds: list[str | None]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def malformed(self) -> int:
        return sum(k is not None for k in self.kinds)


def marker_of(value: bytes) -> str | None:
    """The `bad-<kind>-<n>` marker in a malformed message's bytes (None for a valid event)."""
    match = _MARKER.search(value)
    return match.group(0).decode() if match else None


def malformed_record(event: Event, kind: str, n: int, *, max_bytes: int = 16 * 1024) -> tuple[bytes, bytes]:
    """A broken variant of `event`, of the given kind, marked `bad-<kind>-<n>`; returns (key, value)."""
    marker = f"bad-{kind}-{n}"
    key = event.user_id.encode()
    fields = msgspec.structs.asdict(msgspec.structs.replace(event, event_id=marker))
    fields = {k: v for k, v in fields.items() if v is not None}
    if kind == "invalid_json":
        value = _json.encode(fields)[:-2]  # cut inside the last string (the marker), as by a broken writer
    elif kind == "missing_field":
        del fields["item_id"]
        value = _json.encode(fields)
    elif kind == "unknown_field":
        value = _json.encode({**fields, "marker": marker})
    elif kind == "bad_type":
        value = _json.encode({**fields, "timestamp": str(event.timestamp)})
    elif kind == "long_id":
        value = _json.encode({**fields, "item_id": "i" * 200})
    elif kind == "seconds_timestamp":
        value = _json.encode({**fields, "timestamp": event.timestamp // 1000})
    elif kind == "oversized":
        value = _json.encode({**fields, "context": {"note": "x" * (max_bytes + 512)}})
    elif kind == "key_mismatch":
        key = b"not-" + key
        value = _json.encode(fields)
    elif kind == "too_deep":
        value = _json.encode({**fields, "context": {"note": "@"}}).replace(b'"@"', b"[" * 1000 + b"]" * 1000)
    else:
        raise ValueError(f"unknown malformed kind {kind!r}; known: {', '.join(MALFORMED_KINDS)}")
    return key, value


def in_envelopes(events: Sequence[Event], size: int) -> list[tuple[bytes, bytes]]:
    """The events as batch envelopes of `size` events of one user (docs/events.md), as an SDK that flushes every
    `size` events would send them: each user's events stay in order; a user's last envelope may be shorter.
    Size 1: one plain event per message, no envelope."""
    if size <= 1:
        return [(event.user_id.encode(), encode_event(event)) for event in events]
    messages: list[tuple[bytes, bytes]] = []
    pending: dict[str, list[Event]] = {}
    for event in events:
        group = pending.setdefault(event.user_id, [])
        group.append(event)
        if len(group) >= size:
            messages.append((event.user_id.encode(), encode_envelope(pending.pop(event.user_id))))
    return messages + [(user.encode(), encode_envelope(group)) for user, group in pending.items()]


def malformed_count(valid: int, share: float) -> int:
    """How many malformed messages make them `share` of all messages when mixed with `valid` ones."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"malformed share must be in [0, 1), got {share}")
    return round(valid * share / (1.0 - share))


def mix_malformed(
    events: Sequence[Event],
    share: float = 0.0,
    *,
    count: int | None = None,
    seed: int = 0,
    max_bytes: int = 16 * 1024,
) -> Messages:
    """Every event of `events` encoded as-is, plus malformed messages mixed in: `count` of them, or `share`
    of all messages.

    Each malformed message copies a random event and follows it directly, so it arrives near its event time.
    Kinds rotate through `MALFORMED_KINDS`, so every kind appears once there are as many as kinds.
    """
    m = malformed_count(len(events), share) if count is None else count
    after: dict[int, list[int]] = {}
    if m and events:
        for n, i in enumerate(np.random.default_rng(seed).integers(0, len(events), m).tolist()):
            after.setdefault(i, []).append(n)
    kinds_cycle = list(MALFORMED_KINDS)
    records: list[tuple[bytes, bytes]] = []
    kinds: list[str | None] = []
    for i, event in enumerate(events):
        records.append((event.user_id.encode(), encode_event(event)))
        kinds.append(None)
        for n in after.get(i, ()):
            kind = kinds_cycle[n % len(kinds_cycle)]
            records.append(malformed_record(event, kind, n, max_bytes=max_bytes))
            kinds.append(kind)
    return Messages(records, kinds)


def synthetic_events(
    users: int,
    events: int,
    *,
    seed: int = 0,
    items: int | None = None,
    zipf_a: float = 1.1,
    mean_session_events: float = 8.0,
    start_ms: int = START_MS,
) -> list[Event]:
    """`events` valid events of `users` users (ids `u<k>`), sorted by event time; event ids `syn-<user>-<k>`."""
    if users < 1 or events < 0:
        raise ValueError("need users >= 1 and events >= 0")
    if events == 0:
        return []
    rng = np.random.default_rng(seed)
    items = items or max(100, events // 10)
    users = min(users, events)  # every user gets at least one event

    # Events per user: 1 each, the rest by skewed activity weights.
    weights = rng.lognormal(0.0, 1.0, users)
    per_user = 1 + rng.multinomial(events - users, weights / weights.sum())
    user = np.repeat(np.arange(users), per_user)
    first = np.concatenate(([0], np.cumsum(per_user)[:-1]))  # index of each user's first event
    k = np.arange(events) - np.repeat(first, per_user)  # event number within its user

    # Gaps (ms) before each event: a user's first event starts within the first two days; a new session
    # (probability 1/mean_session_events) comes hours to days later; otherwise seconds to minutes later.
    new_session = rng.random(events) < 1.0 / mean_session_events
    in_session = np.clip(rng.lognormal(np.log(30.0), 1.0, events), 1.0, 20 * 60.0)
    between = np.clip(rng.lognormal(np.log(8 * 3600.0), 1.0, events), 45 * 60.0, 14 * 86400.0)
    gap_ms = (np.where(new_session, between, in_session) * 1000).astype(np.int64)
    gap_ms[first] = rng.integers(0, 2 * 86_400_000, users)
    total = np.cumsum(gap_ms)
    ts = start_ms + total - np.repeat(total[first] - gap_ms[first], per_user)

    # Zipf-popular items (rank 1 is the hottest; ids are shuffled so popularity is not visible in the id).
    p = 1.0 / np.arange(1, items + 1) ** zipf_a
    rank = np.minimum(np.searchsorted(np.cumsum(p / p.sum()), rng.random(events)), items - 1)
    item_ids = rng.permutation(items)[rank]
    etype = np.searchsorted(np.cumsum(EVENT_TYPE_SHARES), rng.random(events) * 0.999999)

    order = np.lexsort((k, user, ts))  # event time, then user, then the user's own order
    uids = [f"u{u}" for u in range(users)]
    return [
        Event(
            user_id=uids[u],
            item_id=f"i{it}",
            event_type=EVENT_TYPES[et],
            timestamp=t,
            event_id=f"syn-{u}-{kk}",
        )
        for u, it, et, t, kk in zip(
            user[order].tolist(),
            item_ids[order].tolist(),
            etype[order].tolist(),
            ts[order].tolist(),
            k[order].tolist(),
            strict=True,
        )
    ]


def generate(
    users: int,
    events: int,
    *,
    seed: int = 0,
    malformed_share: float = 0.0,
    items: int | None = None,
    zipf_a: float = 1.1,
    mean_session_events: float = 8.0,
    start_ms: int = START_MS,
    max_bytes: int = 16 * 1024,
) -> Messages:
    """`events` messages in all, `malformed_share` of them malformed (the rest valid), in publish order."""
    if not 0.0 <= malformed_share < 1.0:
        raise ValueError(f"malformed share must be in [0, 1), got {malformed_share}")
    m = round(events * malformed_share)
    valid = synthetic_events(
        users,
        events - m,
        seed=seed,
        items=items,
        zipf_a=zipf_a,
        mean_session_events=mean_session_events,
        start_ms=start_ms,
    )
    return mix_malformed(valid, count=m, seed=seed + 1, max_bytes=max_bytes)
