"""Explanations and scenarios: the pure pieces (state column, encoding, per-session weights), the model's readout,
and the planted-scenario training run (CPU, under a minute)."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.encoding import EncoderConfig, Vocabulary, encode_batch, encode_history, explain_sessions
from core.schema import Event, InterestRecord, ModelRef, ScenarioInterest, Scored, in_scenario, scenario_of
from core.sessions import SessionConfig, UserState, apply_events, decode_state, encode_state, state_from_events
from models.model import InterestTransformer, ModelConfig

T0 = 1_700_000_000_000
MIN = 60_000
CFG = SessionConfig(max_events=1000, max_sessions=1000)


def ev(item: str, t: int, **context: str) -> Event:
    return Event("u", item, "view", t, context=context or None)


def test_scenario_is_context_scenario_else_platform() -> None:
    assert scenario_of(ev("a", T0, scenario="tv", platform="app")) == "tv"
    assert scenario_of(ev("a", T0, platform="app")) == "app"
    assert scenario_of(ev("a", T0)) == "" and scenario_of(Event("u", "a", "view", T0, context={"scenario": 3})) == ""


def test_state_keeps_a_scenario_per_event_in_time_order_and_round_trips() -> None:
    s, _ = apply_events(UserState(), [ev("b", T0 + MIN, platform="tv"), ev("a", T0)], CFG)
    assert s.items == ("a", "b") and s.scenarios == ("", "tv")
    assert decode_state(encode_state(s)) == s
    plain = state_from_events([ev("a", T0), ev("b", T0 + MIN)], CFG)
    assert plain.scenarios == ()  # nothing named: stored as before scenarios existed
    later, _ = apply_events(plain, [ev("c", T0 + 2 * MIN, scenario="app")], CFG)
    assert later.scenarios == ("", "", "app")


def test_a_stored_scenario_costs_one_byte_per_event() -> None:
    plain = [ev(f"i{k}", T0 + k * MIN) for k in range(200)]
    named = [ev(f"i{k}", T0 + k * MIN, platform=("app", "web", "tv")[k % 3]) for k in range(200)]
    a, b = (state_from_events(es, SessionConfig()) for es in (plain, named))
    assert decode_state(encode_state(b)) == b and decode_state(encode_state(a)) == a
    assert len(encode_state(b)) - len(encode_state(a)) <= 200 + 16  # the codes, and each name once


def test_scenarios_encode_as_known_ids_and_none() -> None:
    enc = EncoderConfig(max_len=6, scenarios=("app", "tv"))
    s = state_from_events([ev("a", T0, scenario="tv"), ev("b", T0 + MIN), ev("c", T0 + 2 * MIN, scenario="web")], CFG)
    x = encode_history(s, Vocabulary("abc"), enc)
    np.testing.assert_array_equal(x["scenarios"], [0, 0, 0, 3, 1, 1])  # pad, tv, none, unknown
    assert EncoderConfig.from_dict(enc.to_dict()) == enc
    old = {k: v for k, v in enc.to_dict().items() if k != "scenarios"}
    assert EncoderConfig.from_dict(old).scenarios == ()  # an export made before scenarios


def test_explain_sessions_sums_weights_per_session_inside_the_window() -> None:
    # three sessions: [a b] [c] [d e f]; the window (max_len 5) holds b..f
    ts = [T0, T0 + MIN, T0 + 3_600_000, T0 + 7_200_000, T0 + 7_200_000 + MIN, T0 + 7_200_000 + 2 * MIN]
    s = state_from_events([ev(i, t) for i, t in zip("abcdef", ts, strict=True)], CFG)
    enc = EncoderConfig(max_len=5)
    w = np.array([0.1, 0.2, 0.05, 0.6, 0.05])  # b, c, d, e, f
    got = explain_sessions(s, w, enc, top_sessions=3, top_items=2)
    assert [(a, b, n) for a, b, n, _, _ in got] == [(ts[3], ts[5], 3), (ts[2], ts[2], 1), (ts[0], ts[1], 2)]
    np.testing.assert_allclose([x[3] for x in got], [0.7, 0.2, 0.1])
    assert [x[4] for x in got] == [["e", "d"], ["c"], ["b"]]  # a is outside the window: not a top item
    assert explain_sessions(UserState(), np.zeros(5), enc) == []
    assert len(explain_sessions(s, w, enc, top_sessions=1)) == 1


def test_in_scenario_view_replaces_the_interest() -> None:
    view = ScenarioInterest([0.0, 1.0], [Scored("x", 2.0)])
    rec = InterestRecord("u", 1, [1.0, 0.0], [], [Scored("y", 1.0)], 1, 1, 1, T0, ModelRef("m", "1"), T0,
                         scenarios={"tv": view, "app": ScenarioInterest([1.0, 0.0], [])})  # fmt: skip
    got = in_scenario(rec, "tv")
    assert got.interest == [0.0, 1.0] and got.top_items == [Scored("x", 2.0)] and list(got.scenarios) == ["tv"]
    with pytest.raises(KeyError):
        in_scenario(rec, "web")


def tiny_model(n_scenarios: int = 2) -> tuple[InterestTransformer, EncoderConfig]:
    torch.manual_seed(0)
    enc = EncoderConfig(max_len=24, scenarios=("app", "tv")[:n_scenarios])
    model = InterestTransformer(ModelConfig.for_encoder(enc, 30, n_categories=3, d_model=16, n_heads=2)).eval()
    with torch.no_grad():
        model.scenario_emb.weight[1:].normal_()
        model.target_emb.weight.normal_()
        model.session_bias.weight.normal_()
    return model, enc


def histories(enc: EncoderConfig) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    states = [UserState()]
    for n in (1, 5, 40):
        ts = T0 + np.cumsum(rng.choice([MIN, 5 * 3_600_000], size=n))
        names = ["", *enc.scenarios]
        states.append(
            state_from_events(
                [ev(f"i{rng.integers(0, 28)}", int(t), scenario=names[rng.integers(0, 3)]) for t in ts], CFG
            )
        )
    vocab = Vocabulary(f"i{k}" for k in range(28))
    return {k: torch.from_numpy(v) for k, v in encode_batch(states, vocab, enc).items()}


def test_readout_matches_the_training_path_and_weights_are_shares() -> None:
    model, enc = tiny_model()
    x = histories(enc)
    with torch.no_grad():
        interest, weights, per_scenario = model.serve(**x)
        trained = model.sequence_interests(**x)[:, -1]
        asked = model.sequence_interests(**x, target_scenarios=torch.full_like(x["item_ids"], 3))[:, -1]
    torch.testing.assert_close(interest[1:], trained[1:], atol=1e-5, rtol=0)  # explicit attention == SDPA
    torch.testing.assert_close(per_scenario[1][1:], asked[1:], atol=1e-5, rtol=0)  # "tv" = target id 3
    assert not torch.allclose(per_scenario[0], per_scenario[1])
    torch.testing.assert_close(weights.sum(1), torch.tensor([0.0, 1.0, 1.0, 1.0]))  # empty history: no weight
    assert (weights[x["item_ids"] == 0] == 0).all()
    torch.testing.assert_close(per_scenario[0][0], model.cold_interest())  # cold start whatever is asked


def test_zero_scenario_parameters_are_the_model_without_scenarios() -> None:
    """Checkpoints saved before scenarios load with zero scenario embeddings: exactly the old model."""
    model, enc = tiny_model()
    with torch.no_grad():
        model.scenario_emb.weight.zero_()
        model.target_emb.weight.zero_()
        x = histories(enc)
        plain = model(**{**x, "scenarios": torch.clamp(x["scenarios"], max=1)})
        torch.testing.assert_close(model(**x), plain)
        torch.testing.assert_close(model(**x, target_scenario=torch.full_like(x["item_ids"][:, 0], 2)), plain)


@pytest.mark.slow  # trains a model: minutes
def test_a_planted_scenario_effect_is_recovered() -> None:
    """Users like one category on "app" and another on "tv": asked about the held-out session's scenario, the
    model must rank its items far better than the general interest, and asked about the wrong one far worse."""
    from models.scenarios import run

    r = run(n_users=400, seed=0, max_epochs=40)  # `interest-stream eval-scenarios` (docs/model.md)
    assert r.recall20_asked > 1.3 * r.recall20_general, r
    assert r.recall20_wrong < 0.7 * r.recall20_general, r
    assert r.planted_share_asked > 0.8 > r.planted_share_general, r


def _explain_by_brute_force(
    state: UserState, w: np.ndarray, enc: EncoderConfig, top_sessions: int, top_items: int
) -> list[tuple[int, int, int, float, list[str]]]:
    """The definition, spelled out event by event: a session's weight is the sum of its events' weights inside
    the window; heaviest first, ties in time order; a session's top items by weight, ties in time order."""
    n = min(len(state), enc.max_len)
    lo = len(state) - n
    weight = {lo + j: float(w[enc.max_len - n + j]) for j in range(n)}
    bounds = [*state.starts, len(state)]
    sessions = []
    for first, end in pairwise(bounds):
        inside = [i for i in range(first, end) if i in weight]
        if inside:
            sessions.append((first, end, inside, sum(weight[i] for i in inside)))
    sessions.sort(key=lambda s: -s[3])  # stable
    out = []
    for first, end, inside, total in sessions[:top_sessions]:
        ranked = sorted(inside, key=lambda i: -weight[i])
        items = list(dict.fromkeys(state.items[i] for i in ranked))[:top_items]
        out.append((state.ts[first], state.ts[end - 1], end - first, total, items))
    return out


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.sampled_from([MIN, 2 * MIN, 3_600_000]), min_size=0, max_size=40),
    items=st.lists(st.sampled_from("abcde"), min_size=41, max_size=41),
    weights=st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5]), min_size=12, max_size=12),
    max_len=st.integers(1, 12),
    top=st.tuples(st.integers(1, 4), st.integers(1, 4)),
)
def test_explain_sessions_is_the_per_event_definition(
    gaps: list[int], items: list[str], weights: list[float], max_len: int, top: tuple[int, int]
) -> None:
    """The list-based explain_sessions (the worker's hot path) against the definition, with ties (repeated
    weights and items), windows that cut a session, and histories shorter and longer than the window."""
    ts = [T0 + sum(gaps[:k]) for k in range(len(gaps) + 1)]
    s = state_from_events([ev(i, t) for i, t in zip(items, ts, strict=False)], CFG)
    enc, w = EncoderConfig(max_len=max_len), np.array(weights[:max_len], dtype=np.float32)
    got = explain_sessions(s, w, enc, *top)
    want = _explain_by_brute_force(s, w, enc, *top)
    assert [(*x[:3], x[4]) for x in got] == [(*x[:3], x[4]) for x in want]
    np.testing.assert_allclose([x[3] for x in got], [x[3] for x in want], rtol=1e-12)
