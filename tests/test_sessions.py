"""Properties of the pure session/state update (no servers)."""

from __future__ import annotations

import itertools
from dataclasses import replace

from hypothesis import example, given, settings
from hypothesis import strategies as st

from core.schema import Event
from core.sessions import (
    Outcome,
    SessionConfig,
    UserState,
    apply_events,
    decode_state,
    encode_state,
    forget_is_replay,
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
    if state.ts:  # an identity is unique within the lateness horizon (beyond it an id may be reused)
        recent = [fp for t, fp in zip(state.ts, state.fps, strict=True) if t >= state.ts[-1] - cfg.lateness_ms]
        assert len(set(recent)) == len(recent)
        assert all(t >= state.ts[-1] - cfg.lateness_ms for t in state.id_ts)
    assert len(state.id_ts) <= cfg.max_ids
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


# Found by hypothesis: an id reused beyond the lateness horizon is a new event (two retained events share it).
REUSED_ID = [ev(T0), ev(T0, eid="a"), ev(T0 + 90 * MIN + 1), ev(T0 + 1, eid="a")]
# Found by hypothesis on a fresh clone: the second "a" was a duplicate while the first was retained, and was
# applied on a replay once the bounds had evicted the first (idempotence reached only as far as the bounds).
EVICTED_ID = [
    *[ev(T0)] * 7,
    ev(T0, eid="a"),
    *[ev(T0 + k * (30 * MIN + 1)) for k in (1, 2, 3)],
    ev(T0 + 4 * (30 * MIN + 1), eid="a"),
    ev(T0 + 210 * MIN + 4),
]


@given(events_st)
@example(REUSED_ID)
@example(EVICTED_ID)
@settings(max_examples=300, deadline=None)
def test_bounded_and_well_formed(events):
    state = fold_one_by_one(events)
    check_invariants(state, SMALL)


@given(events_st)
@example(EVICTED_ID)
@example(REUSED_ID)
@settings(max_examples=300, deadline=None)
def test_idempotent_on_duplicates(events):
    """Every message delivered again (a producer retry, no offsets) changes nothing, whatever the bounds evicted."""
    once = fold_one_by_one(events)
    twice, report = apply_events(once, events, SMALL)
    assert twice == once
    assert Outcome.APPLIED not in report.outcomes


def fold_with_offsets(events, cfg=SMALL, outcomes=None):
    state = UserState()
    for k, e in enumerate(events):
        state, report = apply_events(state, [e], cfg, offsets=[k])
        if outcomes is not None:
            outcomes += report.outcomes
    return state


@given(events_st, st.integers(0, 60))
@example(EVICTED_ID, 5)
@settings(max_examples=300, deadline=None)
def test_a_crash_replay_changes_nothing(events, committed):
    """After a crash the input is re-read from the last committed offset: those events are replays (never late,
    never applied twice), so the state and its counters are exactly those of a run without the crash."""
    first: list[Outcome] = []
    state = fold_with_offsets(events, outcomes=first)
    committed = min(committed, len(events))
    replayed, report = apply_events(state, events[committed:], SMALL, offsets=list(range(committed, len(events))))
    assert replayed == state and not report.new_incarnation
    for before, after in zip(first[committed:], report.outcomes, strict=True):
        # applied -> replay; duplicate or late (whose offsets the state does not store) -> the same again
        assert after is Outcome.REPLAY or after is before is not Outcome.APPLIED, (before, after)
    assert state.events_seen == fold_one_by_one(events).events_seen


@given(events_st, st.integers(1, 8))
@example(EVICTED_ID, 3)
@settings(max_examples=300, deadline=None)
def test_batch_envelopes_fold_like_single_messages(events, size):
    """Events of one batch envelope share its offset: folded they give the state of the same events sent one
    message each, and a replay of any envelope changes nothing (none of its events is applied twice)."""
    envelopes = [events[k : k + size] for k in range(0, len(events), size)]
    state = UserState()
    for offset, envelope in enumerate(envelopes):
        state, _ = apply_events(state, envelope, SMALL, offsets=[offset] * len(envelope))
    single = fold_with_offsets(events)
    assert replace(state, input_offset=-1) == replace(single, input_offset=-1)
    for offset, envelope in enumerate(envelopes):
        again, report = apply_events(state, envelope, SMALL, offsets=[offset] * len(envelope))
        assert again == state and Outcome.APPLIED not in report.outcomes


def test_replay_recognised_by_offset_after_eviction():
    """The crash case of issue 11: events applied, then evicted by the bounds, then re-read after a crash were
    dead-lettered as late. By offset they are replays."""
    events = [ev(T0 + k * 40 * MIN, item=f"i{k}", eid=str(k)) for k in range(30)]
    state = fold_with_offsets(events)
    assert len(state) < len(events)  # the bounds evicted the oldest
    again, report = apply_events(state, events, SMALL, offsets=list(range(len(events))))
    assert report.outcomes == [Outcome.REPLAY] * len(events) and again == state
    assert state.events_seen == 30 and state.input_offset == 29


def test_a_recreated_topic_is_detected_and_its_events_applied_not_swallowed_as_replays():
    """Issue 25: the events topic is recreated (offsets start again at 0) while the changelogs are kept. Its new
    events sit at offsets the state already passed, but they are newer than anything folded, with identities
    never seen: applied, and the offset witness restarts from the new topic's offsets, so a crash replay of the
    new topic is still recognised."""
    old = [ev(T0 + k * MIN, item=f"i{k}", eid=f"old{k}") for k in range(30)]
    state = fold_with_offsets(old)
    assert state.input_offset == 29
    new = [ev(T0 + (60 + k) * MIN, item=f"n{k}", eid=f"new{k}") for k in range(5)]
    after, report = apply_events(state, new, SMALL, offsets=list(range(5)))
    assert report.outcomes == [Outcome.APPLIED] * 5 and report.new_incarnation
    assert after.events_seen == 35 and after.input_offset == 4
    again, report = apply_events(after, new, SMALL, offsets=list(range(5)))
    assert report.outcomes == [Outcome.REPLAY] * 5 and again == after and not report.new_incarnation
    # a replay of the old topic's own events (offsets the state passed, times it has seen) stays a replay
    _, report = apply_events(state, old[25:], SMALL, offsets=list(range(25, 30)))
    assert report.outcomes == [Outcome.REPLAY] * 5 and not report.new_incarnation


def test_a_forget_is_a_replay_only_when_a_newer_state_exists():
    """forget at offset 5: executed when nothing (or only older input) is stored; a state holding offset 6 was built
    after the forget ran (it deleted everything older), so reading the forget again must leave it alone."""
    older = apply_events(UserState(), [ev(T0)], SMALL, offsets=[4])[0]
    fresh = apply_events(UserState(), [ev(T0)], SMALL, offsets=[6])[0]
    assert not forget_is_replay(UserState(), 5) and not forget_is_replay(decode_state(None), 5)
    assert not forget_is_replay(older, 5)
    assert forget_is_replay(fresh, 5)


def test_event_id_contract():
    a = ev(T0, item="i1", eid="a")
    state = state_from_events([a], SMALL)
    same_id = ev(T0 + 10 * MIN, item="i2", eid="a")  # another event claiming id "a" inside the horizon
    state2, report = apply_events(state, [same_id], SMALL)
    assert report.outcomes == [Outcome.DUPLICATE] and state2.id_ts == (T0 + 10 * MIN,)
    # The later copy keeps the identity alive: its copies stay duplicates after the first one leaves the horizon.
    later = ev(T0 + 95 * MIN, eid="b")
    state3, _ = apply_events(state2, [later], SMALL)
    assert apply_events(state3, [same_id], SMALL)[1].outcomes == [Outcome.DUPLICATE]
    # Beyond the horizon the id may be reused by a new event.
    far = apply_events(state3, [ev(T0 + 300 * MIN, eid="z")], SMALL)[0]
    reused = ev(T0 + 290 * MIN, item="i9", eid="a")
    assert apply_events(far, [reused], SMALL)[1].outcomes == [Outcome.APPLIED]


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
