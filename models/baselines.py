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
        h = np.zeros((len(states), self.xn.shape[1]), dtype=np.float32)
        for u, s in enumerate(states):
            idx = vocab.indices(s.items)
            w = self.decay ** np.arange(len(idx) - 1, -1, -1, dtype=np.float64)
            np.add.at(h[u], idx, w.astype(np.float32))
        return (h @ self.xn.T) @ self.xn


def neighbour_table(train: Sequence[UserState], vocab: Vocabulary, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The item-kNN similarity as a sparse table for the model's graph: for every item its `k` most similar other
    items ([n_items, k] int64 indices, best first) and their cosine similarities ([n_items, k] float32). Unused
    slots (PAD/OOV rows, items with fewer than k co-rated items) point at PAD with similarity 0."""
    xn = ItemKNN(train, vocab).xn
    n = xn.shape[1]
    k = min(k, n)
    index, sim = np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)
    for a in range(0, n, 1024):
        s = xn[:, a : a + 1024].T @ xn  # [chunk, n] cosine similarities
        s[np.arange(len(s)), np.arange(a, a + len(s))] = 0.0  # an item is not its own neighbour
        s[:, :2] = 0.0  # never PAD/OOV
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        top_sim = np.take_along_axis(s, top, 1)
        order = np.argsort(-top_sim, axis=1, kind="stable")
        top, top_sim = np.take_along_axis(top, order, 1), np.take_along_axis(top_sim, order, 1)
        index[a : a + len(s)] = np.where(top_sim > 0, top, 0)
        sim[a : a + len(s)] = np.maximum(top_sim, 0.0)
    return index, sim


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
