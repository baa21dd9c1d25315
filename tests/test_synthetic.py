"""The synthetic load generator: deterministic, realistically shaped, and malformed where asked (no servers)."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict

import numpy as np
import pytest

from core.schema import Event, Rejection, parse_event
from core.sessions import SessionConfig, state_from_events
from local.synthetic import (
    EVENT_TYPE_SHARES,
    EVENT_TYPES,
    MALFORMED_KINDS,
    START_MS,
    generate,
    marker_of,
    mix_malformed,
    synthetic_events,
)

NOW_MS = START_MS + 365 * 86_400_000  # fixed clock for parse_event: the synthetic year is never "future"
UNBOUNDED = SessionConfig(max_events=10**9, max_sessions=10**9)


@pytest.fixture(scope="module")
def sample() -> list[Event]:
    return synthetic_events(300, 30_000, seed=3, items=1_000, zipf_a=1.1)


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    a = generate(200, 5_000, seed=7, malformed_share=0.02)
    b = generate(200, 5_000, seed=7, malformed_share=0.02)
    c = generate(200, 5_000, seed=8, malformed_share=0.02)
    assert a.records == b.records and a.kinds == b.kinds
    assert a.records != c.records


def test_counts_and_malformed_share() -> None:
    messages = generate(500, 10_000, seed=1, malformed_share=0.036)
    assert len(messages) == 10_000
    assert messages.malformed == 360 == 40 * len(MALFORMED_KINDS)
    assert Counter(k for k in messages.kinds if k) == dict.fromkeys(MALFORMED_KINDS, 40)


def test_valid_events_parse_and_are_keyed_by_user_in_time_order() -> None:
    messages = generate(100, 3_000, seed=2)
    parsed = [parse_event(value, key, now_ms=NOW_MS) for key, value in messages.records]
    assert all(isinstance(e, Event) for e in parsed), [e for e in parsed if isinstance(e, Rejection)][:3]
    assert [key for key, _ in messages.records] == [e.user_id.encode() for e in parsed]
    times = [e.timestamp for e in parsed]
    assert times == sorted(times) and times[0] >= START_MS
    assert len({e.event_id for e in parsed}) == len(parsed)
    per_user: dict[str, list[int]] = defaultdict(list)
    for e in parsed:
        per_user[e.user_id].append(int(e.event_id.rsplit("-", 1)[1]))
    assert len(per_user) == 100
    assert all(ks == list(range(len(ks))) for ks in per_user.values())  # each user's own order kept


def test_every_malformed_kind_is_rejected_with_its_reason_and_marked() -> None:
    messages = generate(50, 4_000, seed=4, malformed_share=0.05)
    markers = set()
    for (key, value), kind in zip(messages.records, messages.kinds, strict=True):
        marker = marker_of(value)
        if kind is None:
            assert marker is None
            continue
        result = parse_event(value, key, now_ms=NOW_MS)
        assert isinstance(result, Rejection), (kind, value[:200])
        assert result.reason == MALFORMED_KINDS[kind], (kind, result)
        assert marker is not None and marker.startswith(f"bad-{kind}-")
        markers.add(marker)
    assert len(markers) == messages.malformed == 200  # unique: each can be matched to its DLQ record


def test_mix_malformed_keeps_every_source_event_in_order(sample: list[Event]) -> None:
    events = sample[:2_000]
    messages = mix_malformed(events, 0.2, seed=5)
    assert messages.malformed == 500  # a fifth of 2,500
    valid = [v for (_, v), k in zip(messages.records, messages.kinds, strict=True) if k is None]
    assert [parse_event(v, now_ms=NOW_MS) for v in valid] == events


def test_item_popularity_follows_zipf(sample: list[Event]) -> None:
    counts = np.array(sorted(Counter(e.item_id for e in sample).values(), reverse=True))
    weights = 1.0 / np.arange(1, 1_001) ** 1.1
    expected_top10 = weights[:10].sum() / weights.sum()  # ~0.39 of all events on 1% of the items
    observed_top10 = counts[:10].sum() / len(sample)
    assert abs(observed_top10 - expected_top10) < 0.03
    assert counts[0] > 50 * np.median(counts)  # heavy head, long tail


def test_event_type_mix(sample: list[Event]) -> None:
    shares = Counter(e.event_type for e in sample)
    for etype, share in zip(EVENT_TYPES, EVENT_TYPE_SHARES, strict=True):
        assert abs(shares[etype] / len(sample) - share) < 0.02, etype


def test_several_sessions_per_user_with_realistic_gaps(sample: list[Event]) -> None:
    by_user: dict[str, list[Event]] = defaultdict(list)
    for e in sample:
        by_user[e.user_id].append(e)
    sessions = []
    in_gaps: list[int] = []
    between_gaps: list[int] = []
    for events in by_user.values():
        state = state_from_events(events, UNBOUNDED)
        sessions.append(len(state.starts))
        for sl in state.session_slices():
            in_gaps += [b - a for a, b in zip(state.ts[sl], state.ts[sl][1:], strict=False)]
        between_gaps += [state.ts[s] - state.ts[s - 1] for s in state.starts[1:]]
    assert statistics.median(sessions) >= 5  # ~100 events a user, ~8 per session
    assert sum(n >= 2 for n in sessions) / len(sessions) > 0.8
    assert 5_000 <= statistics.median(in_gaps) <= 5 * 60_000  # seconds to minutes
    assert 3_600_000 <= statistics.median(between_gaps) <= 2 * 86_400_000  # hours to days
