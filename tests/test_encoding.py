"""The feature encoding: worker/offline parity on real events, padding, truncation, OOV, cold start (no servers)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from core.encoding import (
    EVENT_TYPE_IDS,
    INPUT_NAMES,
    OOV,
    PAD,
    EncoderConfig,
    Vocabulary,
    encode_batch,
    encode_history,
)
from core.schema import Event
from core.sessions import SessionConfig, UserState, apply_events, state_from_events
from models.datasets import by_user, movielens_events, otto_events

MIN = 60_000
T0 = 1_600_000_000_000
SERVING = SessionConfig()  # the worker's bounds (200 events, 20 closed sessions)


def ev(t: int, item: str, etype: str = "click") -> Event:
    return Event(user_id="u", item_id=item, event_type=etype, timestamp=t)


def replay(events: list[Event], cfg: SessionConfig, seed: int) -> UserState:
    """As the worker sees them: one at a time, shuffled by arrival jitter smaller than the allowed lateness."""
    rng = random.Random(seed)
    arrival = sorted(events, key=lambda e: e.timestamp + rng.randrange(cfg.lateness_ms))
    state = UserState()
    for e in arrival:
        state, applied = apply_events(state, [e], cfg)
        assert applied.outcomes[0].value != "late"
    return state


@pytest.fixture(scope="module")
def real_users() -> list[list[Event]]:
    otto = [es for _, es in by_user(otto_events())]
    ml = [es for _, es in by_user(movielens_events())]
    return otto + ml[:25] + sorted(ml, key=len)[-3:]  # incl. the longest histories (truncation, eviction)


@pytest.mark.parametrize("cfg", [SERVING, SessionConfig(max_events=40, max_sessions=3)], ids=["serving", "tight"])
def test_worker_replay_encodes_like_offline(real_users, cfg):
    vocab = Vocabulary(e.item_id for es in real_users[::2] for e in es)  # half the items unknown -> OOV too
    enc = EncoderConfig(max_len=64, max_session_pos=5)
    offline = [state_from_events(es, cfg) for es in real_users]
    online = [replay(es, cfg, seed) for seed, es in enumerate(real_users)]
    assert [s.ts for s in online] == [s.ts for s in offline]
    a, b = encode_batch(offline, vocab, enc), encode_batch(online, vocab, enc)
    for name in INPUT_NAMES:
        assert a[name].shape == (len(real_users), 64) and a[name].dtype == np.int64
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # the batch path equals the one-sequence path
    for i in (0, 7, len(offline) - 1):
        one = encode_history(offline[i], vocab, enc)
        for name in INPUT_NAMES:
            np.testing.assert_array_equal(one[name], a[name][i])
    assert (a["item_ids"] == OOV).any() and (a["session_pos"] > 0).any()


def test_known_history_left_padded_with_sessions_and_gaps():
    events = [
        ev(T0, "a", "view"),
        ev(T0 + 5_000, "b", "purchase"),  # 5 s later
        ev(T0 + 120 * MIN, "c", "weird_type"),  # new session, 2 h later
        ev(T0 + 121 * MIN, "zzz"),  # unknown item, 1 min later
    ]
    state = state_from_events(events, SERVING)
    vocab = Vocabulary(["a", "b", "c"])
    x = encode_history(state, vocab, EncoderConfig(max_len=6))
    np.testing.assert_array_equal(x["item_ids"], [PAD, PAD, 2, 3, 4, OOV])
    view, purchase, click = EVENT_TYPE_IDS["view"], EVENT_TYPE_IDS["purchase"], EVENT_TYPE_IDS["click"]
    np.testing.assert_array_equal(x["event_types"], [0, 0, view, purchase, 1, click])
    np.testing.assert_array_equal(x["session_pos"], [0, 0, 1, 1, 0, 0])
    # gaps: window start 1; 5 s passes {1 s} -> 3; 2 h - 5 s passes 1 s..30 min -> 7; 1 min passes 1 s..60 s -> 5
    np.testing.assert_array_equal(x["time_gaps"], [0, 0, 1, 3, 7, 5])


def test_overlong_history_keeps_most_recent_and_caps_session_pos():
    events = [ev(T0 + k * 60 * MIN, f"i{k}") for k in range(30)]  # 30 one-event sessions
    state = state_from_events(events, SessionConfig(max_events=1000, max_sessions=1000))
    vocab = Vocabulary(f"i{k}" for k in range(30))
    x = encode_history(state, vocab, EncoderConfig(max_len=10, max_session_pos=4))
    assert (x["item_ids"] != PAD).all()
    np.testing.assert_array_equal(x["item_ids"], [vocab.index(f"i{k}") for k in range(20, 30)])
    np.testing.assert_array_equal(x["session_pos"], [4, 4, 4, 4, 4, 4, 3, 2, 1, 0])
    assert x["time_gaps"][0] == 1  # the window's first event, although older events exist


def test_empty_history_is_all_padding_and_mixed_batch():
    vocab = Vocabulary(["a"])
    empty = encode_history(UserState(), vocab, EncoderConfig(max_len=8))
    assert all((empty[name] == 0).all() and empty[name].shape == (8,) for name in INPUT_NAMES)
    one = state_from_events([ev(T0, "a")], SERVING)
    x = encode_batch([UserState(), one, UserState()], vocab, EncoderConfig(max_len=4))
    np.testing.assert_array_equal(x["item_ids"], [[0, 0, 0, 0], [0, 0, 0, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(x["time_gaps"][1], [0, 0, 0, 1])
    assert encode_batch([], vocab, EncoderConfig(max_len=4))["item_ids"].shape == (0, 4)


def test_vocabulary_roundtrip(tmp_path):
    vocab = Vocabulary(["x", "y", "x", "z"])
    assert len(vocab) == 5 and vocab.index("x") == 2 and vocab.index("z") == 4 and vocab.index("nope") == OOV
    assert vocab.item(3) == "y" and vocab.item(PAD) is None and vocab.item(OOV) is None and vocab.item(99) is None
    (tmp_path / "vocab.json").write_text(vocab.to_json())
    loaded = Vocabulary.from_json((tmp_path / "vocab.json").read_text())
    assert loaded.items == vocab.items and len(loaded) == len(vocab)
    np.testing.assert_array_equal(loaded.indices(["z", "q"]), [4, OOV])


def test_encoder_config_roundtrip():
    cfg = EncoderConfig(max_len=50, max_session_pos=7)
    assert EncoderConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.n_time_gaps == 2 + len(cfg.gap_edges_ms) + 1
