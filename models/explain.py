"""Do the explanation's session weights mean anything? A masking check on real users.

The served explanation is the readout's attention (the last block, the last position, mean over heads) summed per
session (`core.encoding.explain_sessions`): free at serving time, one pass. Attention is not attribution by
definition, so we check it against what it claims: removing the session it weighs most should move the interest
vector more than removing the one it weighs least. Leave-one-session-out (LOSO: re-run the model without each
session) measures that directly; it costs one pass per session, which is why it is the check and not the output.

    interest-stream explain-check --checkpoint artifacts/model
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
import torch

from core.encoding import EncoderConfig, Vocabulary, window_start
from core.sessions import UserState, session_starts
from models.data import HISTORY, load, split
from models.train import load_checkpoint, to_tensors


def drop_session(state: UserState, k: int) -> UserState:
    """`state` without its k-th session (sessions elsewhere keep their boundaries: the gaps around a removed
    session were longer than the session gap, so the neighbours stay apart)."""
    sl = state.session_slices()[k]
    keep = [i for i in range(len(state)) if not sl.start <= i < sl.stop]
    ts = [state.ts[i] for i in keep]
    starts = session_starts(ts, HISTORY.gap_ms)
    pick = lambda col: tuple(col[i] for i in keep) if col else ()  # noqa: E731
    return replace(
        state,
        ts=tuple(ts),
        items=pick(state.items),
        types=pick(state.types),
        values=pick(state.values),
        fps=pick(state.fps),
        scenarios=pick(state.scenarios),
        starts=tuple(starts),
    )


@torch.no_grad()
def serve_batch(model, states: list[UserState], vocab: Vocabulary, enc: EncoderConfig) -> tuple[np.ndarray, ...]:
    """(interest [B, d], event weights [B, max_len]) as the served graph computes them, in chunks."""
    interests, weights = [], []
    for a in range(0, len(states), 256):
        x = to_tensors(states[a : a + 256], vocab, enc, "cpu")
        h, w, _ = model.serve(**x)
        interests.append(h.numpy())
        weights.append(w.numpy())
    return np.concatenate(interests), np.concatenate(weights)


@dataclass
class MaskingReport:
    users: int  # users with >= `min_sessions` sessions in the encoded window
    mean_sessions: float
    shift_top: float  # mean 1 - cos(interest, interest without the highest-weighted session)
    shift_low: float  # ... without the lowest-weighted session
    shift_random: float  # ... without a random session (seeded)
    top_beats_low: float  # share of users where removing the top session moves the vector more
    top_is_latest: float  # share of users whose top-weighted session is the most recent one
    spearman_vs_loso: float  # mean per-user rank correlation of session weight with its LOSO shift
    top_is_loso_top: float  # share of users whose top-weighted session is also LOSO's most influential


def session_weights(state: UserState, weights: np.ndarray, enc: EncoderConfig) -> list[tuple[int, float]]:
    """(session index, weight) for the sessions with events inside the window."""
    lo = window_start(state, enc)
    w = weights[enc.max_len - (len(state) - lo) :]
    out = []
    for k, sl in enumerate(state.session_slices()):
        if sl.stop > lo:
            out.append((k, float(w[max(sl.start, lo) - lo : sl.stop - lo].sum())))
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = a.argsort().argsort().astype(float), b.argsort().argsort().astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def masking_check(checkpoint: str = "artifacts/model", min_sessions: int = 3, seed: int = 0) -> MaskingReport:
    """On the test inputs of ml-latest-small (the held-out evaluation histories): weights vs LOSO shifts."""
    ckpt = load_checkpoint(checkpoint)
    model, enc, vocab = ckpt.model.eval(), ckpt.encoder_config, ckpt.vocab
    ds = load(ckpt.metadata.get("train_config", {}).get("dataset", "movielens"))
    states = split(ds).test_inputs
    interest, weights = serve_batch(model, states, vocab, enc)
    rng = random.Random(seed)
    rows = []  # (user row, [(session, weight)])
    for i, s in enumerate(states):
        sw = session_weights(s, weights[i], enc)
        if len(sw) >= min_sessions:
            rows.append((i, sw))
    masked = [drop_session(states[i], k) for i, sw in rows for k, _ in sw]
    shifted, _ = serve_batch(model, masked, vocab, enc)
    at, top, low, rand, beats, latest, rho, agree = 0, [], [], [], [], [], [], []
    for i, sw in rows:
        shift = 1.0 - shifted[at : at + len(sw)] @ interest[i]  # LOSO: one per session
        at += len(sw)
        w = np.array([x for _, x in sw])
        hi, lo_ = int(w.argmax()), int(w.argmin())
        top.append(shift[hi])
        low.append(shift[lo_])
        rand.append(shift[rng.randrange(len(sw))])
        beats.append(shift[hi] > shift[lo_])
        latest.append(hi == len(sw) - 1)
        rho.append(_spearman(w, shift))
        agree.append(hi == int(shift.argmax()))
    return MaskingReport(
        users=len(rows),
        mean_sessions=float(np.mean([len(sw) for _, sw in rows])),
        shift_top=float(np.mean(top)),
        shift_low=float(np.mean(low)),
        shift_random=float(np.mean(rand)),
        top_beats_low=float(np.mean(beats)),
        top_is_latest=float(np.mean(latest)),
        spearman_vs_loso=float(np.mean(rho)),
        top_is_loso_top=float(np.mean(agree)),
    )
