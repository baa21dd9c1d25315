"""The Transformer's forward contract and the training loop on tiny real data (CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.encoding import OOV, PAD, EncoderConfig, Vocabulary, encode_batch
from core.schema import Event
from core.sessions import SessionConfig, UserState, state_from_events
from models.model import InterestTransformer, ModelConfig

ENC = EncoderConfig(max_len=24, max_session_pos=31)
T0 = 1_600_000_000_000


def tiny(**kw) -> InterestTransformer:
    torch.manual_seed(0)
    return InterestTransformer(ModelConfig.for_encoder(ENC, 30, n_categories=4, d_model=16, **kw)).eval()


def histories(n: int = 6, seed: int = 0) -> list[UserState]:
    rng = np.random.default_rng(seed)
    out = [UserState()]
    for _ in range(n - 1):
        k = int(rng.integers(1, 40))  # some longer than max_len
        ts = T0 + np.cumsum(rng.choice([5_000, 60_000, 4 * 3_600_000], size=k))
        events = [
            Event(user_id="u", item_id=f"i{rng.integers(0, 32)}", event_type="click", timestamp=int(t)) for t in ts
        ]
        out.append(state_from_events(events, SessionConfig(max_events=1000, max_sessions=1000)))
    return out


def inputs(states: list[UserState]) -> dict[str, torch.Tensor]:
    vocab = Vocabulary(f"i{k}" for k in range(28))  # i28..i31 are unknown -> OOV
    return {k: torch.from_numpy(v) for k, v in encode_batch(states, vocab, ENC).items()}


SASREC = {"use_fusion": False, "use_session_pos": False, "use_time_gaps": False}


@pytest.mark.parametrize("flags", [{}, {"use_fusion": True}, SASREC])
def test_forward_contract(flags):
    model = tiny(**flags)
    x = inputs(histories())
    with torch.no_grad():
        interest = model(**x)
        scores = model.item_scores(interest, x["item_ids"])
        cats = model.category_scores(interest, x["item_ids"])
    assert interest.shape == (6, 16) and interest.dtype == torch.float32
    assert torch.isfinite(interest).all()
    torch.testing.assert_close(interest.norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(interest[0], model.cold_interest())  # cold start: the defined cold vector
    assert scores.shape == (6, 30) and torch.isinf(scores[:, [PAD, OOV]]).all() and torch.isfinite(scores[:, 2:]).all()
    assert cats.shape == (6, 4) and ((cats >= 0) & (cats <= 1)).all()


def test_category_scores_mix_the_head_with_the_history_shares():
    """The served genre score is (1 - mix) x the head's probability + mix x the history's own genre shares; without
    `category_history` (SASRec) or with mix 0 it is the head alone."""
    model = tiny(category_share_mix=0.6)
    with torch.no_grad():
        model.item_categories.copy_((torch.rand(model.item_categories.shape) < 0.4).float())
        x = inputs(histories())
        interest = model(**x)
        shares = model.history_genre_shares(x["item_ids"])[:, -1]
        head = torch.sigmoid(model.category_logits(interest, shares))
        torch.testing.assert_close(model.category_scores(interest, x["item_ids"]), 0.4 * head + 0.6 * shares)
        assert shares[1:].sum() > 0  # the histories do carry genres
        model.cfg.category_share_mix = 0.0
        torch.testing.assert_close(model.category_scores(interest, x["item_ids"]), head)
        model.cfg.category_share_mix, model.cfg.category_history = 0.6, False
        no_history = torch.sigmoid(model.category_head(interest))
        torch.testing.assert_close(model.category_scores(interest, x["item_ids"]), no_history)


@pytest.mark.parametrize("fusion", [False, True])
def test_all_padding_batch_and_forward_equals_sequence_readout(fusion: bool):
    model = tiny(use_fusion=fusion)
    x = inputs(histories())
    with torch.no_grad():
        full = model.sequence_interests(**x)[:, -1]
        fast = model(**x)
        empty = model(**inputs([UserState(), UserState()]))
    torch.testing.assert_close(fast[1:], full[1:], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(empty).all() and torch.allclose(empty, model.cold_interest().expand(2, -1))


@pytest.mark.parametrize("fusion", [False, True])
def test_causal_and_blind_to_how_many_sessions_follow(fusion: bool):
    """Outputs at t ignore inputs after t; adding a session later (all session_pos + 1) changes nothing."""
    model = tiny(use_fusion=fusion)
    x = inputs(histories(4, seed=3))
    t = ENC.max_len - 6
    with torch.no_grad():
        a = model.sequence_interests(**x)
        future = {k: v.clone() for k, v in x.items()}
        future["item_ids"][:, t + 1 :] = torch.randint(2, 30, (4, ENC.max_len - t - 1))
        future["time_gaps"][:, t + 1 :] = 2
        b = model.sequence_interests(**future)
        shifted = dict(x, session_pos=torch.where(x["item_ids"] != PAD, x["session_pos"] + 1, 0))
        assert shifted["session_pos"].max() <= ENC.max_session_pos
        c = model.sequence_interests(**shifted)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_serve_len_reads_only_the_newest_events():
    """Inference with `serve_len` n is the uncapped model on the newest n events (the same weights: recency
    positions count back from the newest event); the explanation is 0 on the events it did not read."""
    capped, full = tiny(serve_len=10), tiny()
    x = inputs(histories())
    with torch.no_grad():
        interest, weights, _ = capped.serve(**x)
        torch.testing.assert_close(interest, full(**{k: v[:, -10:] for k, v in x.items()}))
        torch.testing.assert_close(capped(**x), interest)
        assert weights.shape == x["item_ids"].shape and (weights[:, :-10] == 0).all()
        torch.testing.assert_close(weights[1:, -10:].sum(1), torch.ones(5))
        assert not torch.allclose(full(**x)[1:], interest[1:])  # some histories are longer than 10
