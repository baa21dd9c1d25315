"""Cold start, measured: next-item NDCG@10 by history length (issue 27, item 3).

Every MovieLens user has at least 20 ratings, so short histories are simulated: each test user's input is cut to
its newest k events (a user who has only just arrived and done k things) and the target stays the held-out last
event, which no model trained on. The seen-item filter covers only those k events, as it would for a new user.
The "20+" bucket is the full test input of the users who have at least 20 events before the target.

Cutting the *newest* k keeps the target unseen; cutting the *first* k would make the target an event inside the
training data. The cost: a user's older events are still in the item-item statistics (EASE, popularity, the
model's training windows), for every scorer alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from core.sessions import UserState
from models.ranking import next_item_metrics, seen_mask

#: History lengths reported; the last one means "that many or more" (the full history).
LENGTHS = (1, 2, 3, 5, 10, 20)


def newest(state: UserState, k: int) -> UserState:
    """The newest `k` events as a state of their own (sessions re-indexed, the first event opens one)."""
    lo = max(0, len(state) - k)
    starts = (0, *(s - lo for s in state.starts if s > lo))
    return UserState(
        ts=state.ts[lo:],
        items=state.items[lo:],
        types=state.types[lo:],
        values=state.values[lo:],
        fps=state.fps[lo:],
        starts=starts,
        scenarios=state.scenarios[lo:] if any(state.scenarios[lo:]) else (),
        events_seen=len(state) - lo,
    )


def bucket_name(k: int) -> str:
    return f"{k}+" if k == LENGTHS[-1] else str(k)


def length_buckets(inputs: Sequence[UserState], targets: np.ndarray) -> dict[str, tuple[list[UserState], np.ndarray]]:
    """Bucket name -> (inputs, targets): the newest k events of every input that has k, or the full inputs of
    those with at least LENGTHS[-1] events."""
    out = {}
    for k in LENGTHS:
        keep = [u for u, s in enumerate(inputs) if len(s) >= k]
        states = [inputs[u] if k == LENGTHS[-1] else newest(inputs[u], k) for u in keep]
        out[bucket_name(k)] = (states, targets[keep])
    return out


def ndcg_by_length(
    filtered_scores: Callable[[list[UserState]], np.ndarray], inputs: Sequence[UserState], targets: np.ndarray
) -> dict[str, float]:
    """Bucket name -> NDCG@10; `filtered_scores(states)` returns [B, n_items] with seen items at -inf."""
    return {
        name: next_item_metrics(filtered_scores(states), tgt, 10)["ndcg10"]
        for name, (states, tgt) in length_buckets(inputs, targets).items()
    }


#: item_item_short_weight candidates (the item-item weight of an n-event history is item_item_weight + this / n).
SHORT_WEIGHTS = (0.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def fit_short_weight(model, ds, sp, enc) -> dict[str, float]:
    """Pick the model's `item_item_short_weight` on the VALIDATION targets with the inputs cut like the test buckets:
    the best mean NDCG@10 over every length (0 is a candidate, so validation cannot get worse at the mean). Why:
    with one or two events the Transformer has little to read, while one item's EASE neighbours are already good
    evidence (EASE beat the model at 1 and 2 events, docs/model-results.md)."""
    import torch

    from models.train import to_tensors

    parts = []  # per bucket: (Transformer logits, item-item evidence, 1 / events read, targets)
    with torch.no_grad():
        for states, targets in length_buckets(sp.val_inputs, sp.val_targets).values():
            x = to_tensors(states, ds.vocab, enc, next(model.parameters()).device)
            seen = torch.from_numpy(seen_mask(states, ds.vocab))
            base = model.item_logits(model(**x)).masked_fill(seen, float("-inf")) + model.item_mask
            n = (model.window(x["item_ids"])[0] != 0).sum(1, keepdim=True).clamp(min=1)
            parts.append((base, model.item_item_scores(x["item_ids"]), 1.0 / n, targets))
    w = model.item_item_weight.item()
    mean = {
        short: float(np.mean([next_item_metrics((b + (w + short * inv) * k).numpy(), t, 10)["ndcg10"]
                              for b, k, inv, t in parts]))
        for short in SHORT_WEIGHTS
    }  # fmt: skip
    best = max(mean, key=mean.get)
    model.item_item_short_weight.fill_(best)
    return {"short_weight": best, "val_mean_ndcg10": mean[best], "val_mean_ndcg10_without": mean[0.0]}
