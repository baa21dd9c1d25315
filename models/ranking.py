"""Full-ranking metrics shared by validation, evaluation and the baselines (numpy, no torch).

Every protocol ranks ALL vocabulary items (PAD/OOV excluded), after removing the items already in the input
history. Ties count half (rank = #higher + #tied/2), which keeps score-flat baselines (popularity, kNN) honest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.encoding import OOV, PAD, Vocabulary
from core.sessions import UserState


def seen_mask(states: Sequence[UserState], vocab: Vocabulary) -> np.ndarray:
    """[B, n_items] bool: the item is in the user's input history, or is PAD/OOV (never recommended)."""
    mask = np.zeros((len(states), len(vocab)), dtype=bool)
    rows = np.repeat(np.arange(len(states)), [len(s) for s in states])
    cols = vocab.indices(i for s in states for i in s.items)
    mask[rows, cols] = True
    mask[:, [PAD, OOV]] = True
    return mask


def _ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target among the row's finite scores (-inf = filtered; a filtered target misses)."""
    t = scores[np.arange(len(targets)), targets][:, None]
    higher = (scores > t).sum(1)
    tied = (scores == t).sum(1) - 1
    rank = higher + tied / 2.0
    return np.where(np.isfinite(t[:, 0]), rank, np.inf)


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each row's 0-based target rank (ties half, inf when filtered): per-event metrics (models.stream_eval)."""
    return _ranks(scores, targets)


def event_ndcg(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Per event: NDCG@k of one target at 0-based `ranks` (1 / log2(rank + 2) inside the top k, else 0)."""
    hit = ranks < k
    return np.where(hit, 1.0 / np.log2(np.where(hit, ranks, 0) + 2.0), 0.0)


def next_item_metrics(scores: np.ndarray, targets: np.ndarray, k: int = 10) -> dict[str, float]:
    """NDCG@k, Recall@k (= HR@k, one target) and MRR; `scores` already filtered (-inf)."""
    r = _ranks(scores, targets)
    hit = r < k
    return {
        f"ndcg{k}": float(np.mean(event_ndcg(r, k))),
        f"recall{k}": float(np.mean(hit)),
        "mrr": float(np.mean(1.0 / (r + 1.0))),
    }


def next_session_metrics(scores: np.ndarray, targets: Sequence[np.ndarray], k: int = 20) -> dict[str, float]:
    """Recall@k = hits in the top k / min(k, |targets|); NDCG@k with the ideal DCG of min(k, |targets|) hits."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    recall, ndcg = [], []
    for row, tgt in zip(top, targets, strict=True):
        hits = np.isin(row, tgt)
        m = min(k, len(tgt))
        recall.append(hits.sum() / m)
        ndcg.append((hits * discounts).sum() / discounts[:m].sum())
    return {f"recall{k}": float(np.mean(recall)), f"ndcg{k}": float(np.mean(ndcg))}


def category_relevance(item_categories: np.ndarray, targets: Sequence[np.ndarray]) -> np.ndarray:
    """[B, C] graded relevance of each category: the share of the target items (a session) that carry it."""
    return np.stack([item_categories[t].mean(0) for t in targets]).astype(np.float64)


def category_ndcg(scores: np.ndarray, relevance: np.ndarray, k: int = 5) -> float:
    """Mean NDCG@k of category `scores` [B, C] against graded `relevance` [B, C]; rows without any relevant
    category are skipped. Ties in `scores` break by column order (give scores without ties)."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (np.take_along_axis(relevance, top, 1) * discounts).sum(1)
    ideal = (-np.sort(-relevance, axis=1)[:, :k] * discounts).sum(1)
    keep = ideal > 0
    return float(np.mean(dcg[keep] / ideal[keep]))


def category_overlap(scores: np.ndarray, k: int = 3) -> float:
    """Mean Jaccard overlap of the top-k categories of every pair of rows: 1 = everyone gets the same top k
    (global popularity), lower = more personal. Ties break by column order, as in `category_ndcg`."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    x = np.zeros(scores.shape, dtype=np.float64)
    np.put_along_axis(x, top, 1.0, axis=1)
    inter = (x @ x.T)[np.triu_indices(len(x), 1)]
    return float(np.mean(inter / (2 * k - inter)))
