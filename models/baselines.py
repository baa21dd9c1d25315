"""Non-neural baselines in the same harness (numpy): they return unfiltered [B, n_items] scores like the model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.encoding import Vocabulary
from core.sessions import UserState


def interactions(states: Sequence[UserState], vocab: Vocabulary) -> np.ndarray:
    """[users, n_items] binary user-item matrix of the training histories."""
    x = np.zeros((len(states), len(vocab)), dtype=np.float32)
    for u, s in enumerate(states):
        x[u, vocab.indices(s.items)] = 1.0
    return x


class Popularity:
    """Items by how many training users interacted with them."""

    def __init__(self, train: Sequence[UserState], vocab: Vocabulary) -> None:
        self.counts = interactions(train, vocab).sum(0)

    def scores(self, states: Sequence[UserState], vocab: Vocabulary) -> np.ndarray:
        return np.tile(self.counts, (len(states), 1))


class ItemKNN:
    """Cosine item-item similarity over training users; a history scores sum_j w_j * sim(j, .), where w decays
    with recency (`decay` per event back from the most recent; 1.0 = no recency)."""

    def __init__(self, train: Sequence[UserState], vocab: Vocabulary, decay: float = 1.0) -> None:
        x = interactions(train, vocab)
        norms = np.sqrt(x.sum(0))
        self.xn = x / np.where(norms > 0, norms, 1.0)  # column-normalized: S = xn.T @ xn (never materialized)
        self.decay = decay

    def scores(self, states: Sequence[UserState], vocab: Vocabulary) -> np.ndarray:
        return (recency_weighted(states, vocab, self.decay) @ self.xn.T) @ self.xn


def recency_weighted(states: Sequence[UserState], vocab: Vocabulary, decay: float) -> np.ndarray:
    """[B, n_items] each history as decay^(events back from its most recent) summed per item (1.0 = counts)."""
    h = np.zeros((len(states), len(vocab)), dtype=np.float32)
    for u, s in enumerate(states):
        idx = vocab.indices(s.items)
        w = decay ** np.arange(len(idx) - 1, -1, -1, dtype=np.float64)
        np.add.at(h[u], idx, w.astype(np.float32))
    return h


class Ease:
    """EASE (Steck 2019), the strongest simple top-N recommender on MovieLens in most comparisons: item weights
    B = I - P diag(1/diag P), P = (X^T X + lam I)^-1, diagonal of B forced to 0; a history h scores h B. Computed
    in the model's in-graph form (`ease_factors`), so the baseline and the served scorer are one implementation.
    The history is recency-weighted like ItemKNN's (`decay`; 1.0 = the published, order-free EASE)."""

    def __init__(self, train: Sequence[UserState], vocab: Vocabulary, lam: float, decay: float = 1.0) -> None:
        self.a, self.g, self.e = ease_factors(train, vocab, lam, rank=min(len(train), len(vocab)))  # exact
        self.decay = decay

    def scores(self, states: Sequence[UserState], vocab: Vocabulary) -> np.ndarray:
        h = recency_weighted(states, vocab, self.decay).astype(np.float64)
        return ((h @ self.a) @ self.g.T + h * self.e).astype(np.float32)


def ease_factors(
    train: Sequence[UserState], vocab: Vocabulary, lam: float, rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EASE as h B = (h A) G^T + h * e with A = X^T, G = X^T K / (lam P_jj) and e = 1 - 1 / (lam P_jj) ([n_items,
    rank] twice, [n_items]; float64), K = (X X^T + lam I)^-1: only a users x users system is solved (Woodbury:
    P = (I - X^T K X) / lam), never the items x items inverse. EASE depends on X only through X^T X, so with more
    training users than `rank`, X is replaced by its rank-`rank` truncated SVD (Sigma V^T), exact up to rank(X)."""
    x = interactions(train, vocab).astype(np.float64)
    if len(x) > rank:
        _, sv, vt = np.linalg.svd(x, full_matrices=False)
        x = sv[:rank, None] * vt[:rank]
    xk = np.linalg.solve(x @ x.T + lam * np.eye(len(x)), x)  # K X
    c = 1.0 / (1.0 - np.einsum("ui,ui->i", x, xk))  # 1 / (lam P_jj): P_jj = (1 - (X^T K X)_jj) / lam
    pad = ((0, 0), (0, rank - len(x)))
    return np.pad(x.T, pad), np.pad(xk.T * c[:, None], pad), 1.0 - c


def ease_neighbours(
    a: np.ndarray, g: np.ndarray, e: np.ndarray, n: int, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Each item's `n` largest EASE weights: row j of B = A G^T + diag(e) (what item j in a history adds to every
    item), from `ease_factors`' output, as (columns [n_items, n] int32, weights [n_items, n] float32). A history
    then scores the sum of its items' rows: a scatter of L x n weights instead of two [n_items x rank] products."""
    cols = np.empty((len(a), n), dtype=np.int32)
    vals = np.empty((len(a), n), dtype=np.float32)
    for lo in range(0, len(a), chunk):
        rows = np.arange(lo, min(lo + chunk, len(a)))
        b = a[rows] @ g.T
        b[np.arange(len(rows)), rows] += e[rows]
        top = np.argpartition(-b, n - 1, axis=1)[:, :n]
        cols[rows], vals[rows] = top, np.take_along_axis(b, top, 1)
    return cols, vals


class KnnPopularity:
    """Item-kNN evidence scaled to [0, 1] per user (as the model's in-graph scorer) + `weight` x popularity scaled
    to [0, 1]: a hybrid for the *next session*, whose first items lean on what is popular (docs/model.md)."""

    def __init__(self, train: Sequence[UserState], vocab: Vocabulary, decay: float, weight: float) -> None:
        self.knn = ItemKNN(train, vocab, decay)
        counts = Popularity(train, vocab).counts
        self.popularity = counts / max(float(counts.max()), 1.0)
        self.weight = weight

    def scores(self, states: Sequence[UserState], vocab: Vocabulary) -> np.ndarray:
        knn = self.knn.scores(states, vocab)
        return knn / np.maximum(knn.max(1, keepdims=True), 1e-6) + self.weight * self.popularity


def knn_factors(train: Sequence[UserState], vocab: Vocabulary, rank: int) -> np.ndarray:
    """F [n_items, rank] with F F^T = ItemKNN's cosine similarity: the transposed column-normalized user x item
    matrix itself when there are at most `rank` training users (exact), else its rank-`rank` truncated SVD
    (V Sigma). Exact on ml-latest-small; a dense F beats a top-k neighbour table there (docs/model.md)."""
    xn = ItemKNN(train, vocab).xn
    if len(xn) <= rank:
        return np.ascontiguousarray(np.pad(xn, ((0, rank - len(xn)), (0, 0))).T)
    _, sv, vt = np.linalg.svd(xn, full_matrices=False)
    return np.ascontiguousarray((sv[:rank, None] * vt[:rank]).T, dtype=np.float32)


def genre_baselines(
    train: Sequence[UserState], inputs: Sequence[UserState], vocab: Vocabulary, item_categories: np.ndarray
) -> dict[str, np.ndarray]:
    """[B, C] category scores for `inputs`: the history's own genre shares (ties broken by global popularity) and
    the global genre popularity over all training events."""
    counts = np.zeros(item_categories.shape[1])
    for s in train:
        counts += item_categories[vocab.indices(s.items)].sum(0)
    glob = counts / counts.sum()
    hist = np.stack(
        [item_categories[vocab.indices(s.items)].mean(0) if len(s) else np.zeros_like(glob) for s in inputs]
    )
    return {"history_genres": hist + 1e-6 * glob, "global_genres": np.tile(glob, (len(inputs), 1))}
