"""Properties of the pure session/state update (no servers)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from core.schema import Event
from core.sessions import (
    Outcome,
    SessionConfig,
    UserState,
    apply_events,
    decode_state,
    encode_state,
    state_from_events,
)

T0 = 1_600_000_000_000
MIN = 60_000
SMALL = SessionConfig(gap_ms=30 * MIN, lateness_ms=90 * MIN, max_events=12, max_sessions=3)


def ev(t: int, item: str = "i1", etype: str = "click", eid: str | None = None, value: float | None = None):
    return Event(user_id="u", item_id=item, event_type=etype, timestamp=t, event_id=eid, value=value)


events_st = st.lists(
    st.builds(
        ev,
        t=st.integers(T0, T0 + 600 * MIN),
        item=st.sampled_from(["i1", "i2", "i3", "x"]),
        etype=st.sampled_from(["click", "view", "cart", "custom_type"]),
        eid=st.one_of(st.none(), st.text("abc", min_size=1, max_size=3)),
        value=st.one_of(st.none(), st.sampled_from([1.0, 3.5, -2.0])),
    ),
    max_size=60,
)


def fold_one_by_one(events, cfg=SMALL) -> UserState:
    state = UserState()
    for e in events:
        state, _ = apply_events(state, [e], cfg)
    return state


def check_invariants(state: UserState, cfg: SessionConfig) -> None:
    assert len(state) <= cfg.max_events
    assert list(state.ts) == sorted(state.ts)
    assert len(set(state.fps)) == len(state.fps)
    if state.ts:
        assert state.starts[0] == 0
        for s in state.session_slices():
            seg = state.ts[s]
            assert all(b - a <= cfg.gap_ms for a, b in itertools.pairwise(seg))
        for _a, b in zip(state.starts, state.starts[1:], strict=False):
            assert state.ts[b] - state.ts[b - 1] > cfg.gap_ms
        horizon = state.ts[-1] - cfg.lateness_ms - cfg.gap_ms
        closed = [s for s in state.session_slices() if state.ts[s.stop - 1] < horizon]
        assert len(closed) <= cfg.max_sessions


@given(events_st)
@settings(max_examples=300, deadline=None)
def test_bounded_and_well_formed(events):
    state = fold_one_by_one(events)
    check_invariants(state, SMALL)


@given(events_st)
@settings(max_examples=300, deadline=None)
def test_idempotent_on_duplicates(events):
    once = fold_one_by_one(events)
    twice, report = apply_events(once, events, SMALL)
    assert twice == once
    assert Outcome.APPLIED not in report.outcomes


@given(st.lists(st.integers(0, 80 * MIN), max_size=40), st.randoms(use_true_random=False))
@settings(max_examples=300, deadline=None)
def test_any_arrival_order_within_lateness_gives_same_state(offsets, rnd):
    # All event times lie within the lateness of each other, so no arrival order makes one late.
    events = [ev(T0 + o, item=f"i{k % 5}", eid=f"e{k}") for k, o in enumerate(offsets)]
    shuffled = events[:]
    rnd.shuffle(shuffled)
    assert fold_one_by_one(shuffled) == state_from_events(events, SMALL)
    assert apply_events(UserState(), shuffled, SMALL)[0] == state_from_events(events, SMALL)


@given(st.lists(st.integers(0, 3000 * MIN), max_size=80), st.randoms(use_true_random=False))
@settings(max_examples=300, deadline=None)
def test_local_disorder_over_long_histories(offsets, rnd):
    # Long histories that span many sessions and hit both bounds, each event displaced at most
    # `lateness` from its sorted position in arrival order.
    events = sorted((ev(T0 + o, eid=f"e{k}") for k, o in enumerate(offsets)), key=lambda e: e.timestamp)
    keyed = [(e.timestamp + rnd.uniform(0, SMALL.lateness_ms), e) for e in events]
    arrival = [e for _, e in sorted(keyed, key=lambda p: p[0])]
    state = fold_one_by_one(arrival)
    check_invariants(state, SMALL)
    assert state == state_from_events(events, SMALL)


def test_late_event_is_not_applied():
    state = state_from_events([ev(T0 + 500 * MIN, eid="a")], SMALL)
    new, report = apply_events(state, [ev(T0, eid="b")], SMALL)
    assert report.outcomes == [Outcome.LATE]
    assert new == state


def test_late_event_within_lateness_merges_sessions():
    a, b = ev(T0, eid="a"), ev(T0 + 50 * MIN, eid="b")
    state = state_from_events([a, b], SMALL)
    assert len(state.starts) == 2
    merged, report = apply_events(state, [ev(T0 + 25 * MIN, eid="c")], SMALL)
    assert report.outcomes == [Outcome.APPLIED]
    assert merged.starts == (0,)


@given(events_st)
@settings(max_examples=200, deadline=None)
def test_serialization_round_trip(events):
    state = fold_one_by_one(events)
    assert decode_state(encode_state(state)) == state


def test_default_bounds_keep_last_200_events():
    cfg = SessionConfig()
    events = [ev(T0 + k * MIN, item=f"i{k}", eid=str(k)) for k in range(500)]
    state = state_from_events(events, cfg)
    assert len(state) == 200
    assert state.ts[-1] == T0 + 499 * MIN
    assert state.events_seen == 500
