"""Per-user sessionized histories from the real data sets, and the deterministic evaluation split.

Sessions come from `core.sessions.state_from_events` (the worker's own fold) with bounds large enough to keep
every event: offline we keep the full history and the encoder keeps the most recent `max_len` events.

Split (one per data set, no randomness): for a user with two or more sessions the *last session* is held out,
otherwise the *last event*. Training sees only events before the held-out part minus one more event, which is the
validation target (early stopping). Both test protocols rank targets the model never trained on:

* next item: input = all events but the last, target = the last event;
* next session (users with >= 2 sessions): input = all sessions but the last, targets = the last session's items.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.encoding import Vocabulary
from core.sessions import SessionConfig, UserState, state_from_events
from models.datasets import by_user, data_dir, movielens_dir, movielens_events, movielens_movies, otto_events

#: Keep everything offline (the worker's bounds are far smaller; the encoder's window is what the model sees).
HISTORY = SessionConfig(max_events=10**9, max_sessions=10**9)


@dataclass
class Dataset:
    name: str
    users: list[str]
    states: list[UserState]  # full histories, oldest event first
    vocab: Vocabulary
    categories: list[str] = field(default_factory=list)
    item_categories: np.ndarray | None = None  # [len(vocab), len(categories)] float32 multi-hot
    data_hash: str = ""
    scenarios: list[str] = field(default_factory=list)  # the scenarios events name (none in the shipped data)


@dataclass
class Split:
    train: list[UserState]  # training histories (every position is a target)
    val_inputs: list[UserState]
    val_targets: np.ndarray  # item index per user
    test_inputs: list[UserState]  # next item: all events but the last
    test_targets: np.ndarray
    ns_inputs: list[UserState]  # next session: all sessions but the last
    ns_targets: list[np.ndarray]  # distinct item indices of the last session


def prefix(state: UserState, n: int) -> UserState:
    """The first `n` events as a state: what `state_from_events` gives for them (sessions depend only on gaps)."""
    return UserState(
        ts=state.ts[:n],
        items=state.items[:n],
        types=state.types[:n],
        values=state.values[:n],
        fps=state.fps[:n],
        starts=tuple(s for s in state.starts if s < n),
        scenarios=state.scenarios[:n] if any(state.scenarios[:n]) else (),
        events_seen=n,
    )


def _hash(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def vocabulary_of(states: list[UserState]) -> Vocabulary:
    """Every item in the data, most popular first (ties by id): deterministic."""
    counts = Counter(i for s in states for i in s.items)
    return Vocabulary(sorted(counts, key=lambda i: (-counts[i], i)))


def load_movielens() -> Dataset:
    groups = list(by_user(movielens_events()))
    groups.sort(key=lambda g: int(g[0]))
    states = [state_from_events(es, HISTORY) for _, es in groups]
    vocab = vocabulary_of(states)
    movies = movielens_movies()
    categories = sorted({g for m in movies.values() for g in m.genres})
    col = {g: k for k, g in enumerate(categories)}
    item_categories = np.zeros((len(vocab), len(categories)), dtype=np.float32)
    for idx in range(2, len(vocab)):
        movie = movies.get(vocab.item(idx))
        for g in movie.genres if movie else ():
            item_categories[idx, col[g]] = 1.0
    d = movielens_dir()
    return Dataset(
        "movielens-latest-small",
        [u for u, _ in groups],
        states,
        vocab,
        categories,
        item_categories,
        _hash(d / "ratings.csv", d / "movies.csv"),
    )


def load_otto() -> Dataset:
    groups = sorted(by_user(otto_events()), key=lambda g: g[0])
    states = [state_from_events(es, HISTORY) for _, es in groups]
    path = data_dir() / "otto-sample" / "train.jsonl"
    return Dataset("otto-sample", [u for u, _ in groups], states, vocabulary_of(states), data_hash=_hash(path))


def load(name: str) -> Dataset:
    return {"movielens": load_movielens, "otto": load_otto}[name]()


def split(ds: Dataset) -> Split:
    train, val_in, val_t, test_in, test_t, ns_in, ns_t = [], [], [], [], [], [], []
    for s in ds.states:
        n = len(s)
        if n < 3:
            continue
        multi = len(s.starts) >= 2
        cut = s.starts[-1] if multi else n - 1  # first held-out event
        if cut >= 2:
            train.append(prefix(s, cut - 1))
            val_in.append(prefix(s, cut - 1))
            val_t.append(ds.vocab.index(s.items[cut - 1]))
        test_in.append(prefix(s, n - 1))
        test_t.append(ds.vocab.index(s.items[n - 1]))
        if multi:
            ns_in.append(prefix(s, cut))
            ns_t.append(np.unique(ds.vocab.indices(s.items[cut:])))
    return Split(train, val_in, np.asarray(val_t, np.int64), test_in, np.asarray(test_t, np.int64), ns_in, ns_t)


@dataclass
class SessionValidation:
    """A next-session validation set that no fitted part has seen: users with >= 3 sessions hold out their
    *penultimate* session as well (inputs = the sessions before it), the others keep their training history."""

    train: list[UserState]
    inputs: list[UserState]
    targets: list[np.ndarray]  # distinct item indices of the penultimate session


def session_validation(ds: Dataset) -> SessionValidation:
    """For tuning scorers meant for the next session. The shared validation event is mid-history (the last event
    before the test part); a session start behaves differently (docs/model.md: popularity matters far more), and
    the penultimate session is in `split`'s training data, so it is held out here instead."""
    train, inputs, targets = [], [], []
    for s in ds.states:
        if len(s) < 3:
            continue
        if len(s.starts) >= 3 and s.starts[-2] >= 2:
            a, b = s.starts[-2], s.starts[-1]
            train.append(prefix(s, a))
            inputs.append(prefix(s, a))
            targets.append(np.unique(ds.vocab.indices(s.items[a:b])))
        else:
            cut = s.starts[-1] if len(s.starts) >= 2 else len(s) - 1  # as in `split`
            if cut >= 2:
                train.append(prefix(s, cut - 1))
    return SessionValidation(train, inputs, targets)
