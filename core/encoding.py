"""The one feature encoding: a user's retained history (`core.sessions.UserState`) -> fixed-length model inputs.

Torch-free (numpy only): training, offline evaluation and the worker (`stream/`) all call `encode_batch`, so the
model sees the same tensors offline and online. Every input is int64 of shape [max_len] per sequence, LEFT-padded:
the most recent retained event sits at index max_len-1 and an overlong history keeps its most recent max_len events.

| input         | values                                                                                     |
|---------------|--------------------------------------------------------------------------------------------|
| `item_ids`    | 0 pad, 1 out-of-vocabulary, 2.. items of the `Vocabulary`                                  |
| `event_types` | 0 pad, 1 other/unknown, 2.. `core.schema.KNOWN_EVENT_TYPES` in order                     |
| `session_pos` | sessions after this event's: 0 = current (last) session, 1 = the one before, ... capped at  |
|               | `max_session_pos`; 0 on padding (padding is identified by `item_ids == PAD`)               |
| `time_gaps`   | 0 pad, 1 first event of the encoded window (no previous event), else 2 + the number of     |
|               | `gap_edges_ms` that the gap to the previous event is >= (log-spaced: 1 s .. 1 year)        |
| `scenarios`   | 0 pad, 1 none or unknown, 2.. `EncoderConfig.scenarios` in order (`core.schema.scenario_of`)|

The first event of the window always gets bucket 1, even when older events exist in the state: the encoding then
depends only on the window, so a long offline history and the worker's bounded state encode alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Final

import numpy as np

from core.schema import KNOWN_EVENT_TYPES
from core.sessions import UserState

PAD: Final = 0
OOV: Final = 1

EVENT_TYPE_IDS: Final = {name: i + 2 for i, name in enumerate(KNOWN_EVENT_TYPES)}
N_EVENT_TYPES: Final = 2 + len(KNOWN_EVENT_TYPES)

INPUT_NAMES: Final = ("item_ids", "event_types", "session_pos", "time_gaps", "scenarios")

_S = 1000
#: Log-spaced gap edges (ms): 1 s, 10 s, 1 min, 5 min, 30 min (the session gap), 2 h, 1 day, 1 week, 30 days, 1 year.
DEFAULT_GAP_EDGES_MS: Final = (_S, 10 * _S, 60 * _S, 300 * _S, 1800 * _S, 7200 * _S, 86400 * _S, 604800 * _S,
                               2_592_000 * _S, 31_536_000 * _S)  # fmt: skip


@dataclass(frozen=True)
class EncoderConfig:
    max_len: int = 200
    max_session_pos: int = 63  # older sessions share the capped position
    gap_edges_ms: tuple[int, ...] = DEFAULT_GAP_EDGES_MS
    scenarios: tuple[str, ...] = ()  # the scenarios the model knows (from its training data); others encode as 1

    @property
    def n_session_pos(self) -> int:
        return self.max_session_pos + 1

    @property
    def n_time_gaps(self) -> int:
        return 2 + len(self.gap_edges_ms) + 1

    def to_dict(self) -> dict:
        return {
            "max_len": self.max_len,
            "max_session_pos": self.max_session_pos,
            "gap_edges_ms": list(self.gap_edges_ms),
            "scenarios": list(self.scenarios),
        }

    @classmethod
    def from_dict(cls, d: dict) -> EncoderConfig:
        return cls(
            int(d["max_len"]),
            int(d["max_session_pos"]),
            tuple(int(x) for x in d["gap_edges_ms"]),
            tuple(str(x) for x in d.get("scenarios", ())),  # absent in exports made before scenarios
        )

    def scenario_ids(self) -> dict[str, int]:
        return {name: i + 2 for i, name in enumerate(self.scenarios)}


class Vocabulary:
    """Item id <-> index; indices 0 (PAD) and 1 (OOV) are reserved, so `len` counts them."""

    def __init__(self, items: Iterable[str]) -> None:
        self._items: list[str] = []
        self._index: dict[str, int] = {}
        for item in items:
            if item not in self._index:
                self._index[item] = len(self._items) + 2
                self._items.append(item)

    def __len__(self) -> int:
        return len(self._items) + 2

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._index

    def index(self, item_id: str) -> int:
        return self._index.get(item_id, OOV)

    def item(self, index: int) -> str | None:
        """The item id at `index`, None for PAD/OOV/out of range."""
        return self._items[index - 2] if 2 <= index < len(self) else None

    @property
    def items(self) -> list[str]:
        return list(self._items)

    def indices(self, item_ids: Iterable[str]) -> np.ndarray:
        return np.fromiter(map(self._index.get, item_ids, repeat(OOV)), dtype=np.int64)

    def to_json(self) -> str:
        """The `vocab.json` the model repository carries (callers do the file I/O: the core does none)."""
        return json.dumps({"pad": PAD, "oov": OOV, "items": self._items})

    @classmethod
    def from_json(cls, text: str | bytes) -> Vocabulary:
        return cls(json.loads(text)["items"])


def encode_history(state: UserState, vocab: Vocabulary, cfg: EncoderConfig) -> dict[str, np.ndarray]:
    """One sequence: each input of shape [max_len]."""
    return {k: v[0] for k, v in encode_batch([state], vocab, cfg).items()}


def encode_batch(states: Sequence[UserState], vocab: Vocabulary, cfg: EncoderConfig) -> dict[str, np.ndarray]:
    """A batch: each input of shape [B, max_len], int64. Vectorized over the flattened windows of all states."""
    B, L = len(states), cfg.max_len
    out = {name: np.zeros((B, L), dtype=np.int64) for name in INPUT_NAMES}
    ns = np.fromiter((min(len(s), L) for s in states), dtype=np.int64, count=B)
    total = int(ns.sum())
    if total == 0:
        return out
    lo = [len(s) - n for s, n in zip(states, ns.tolist(), strict=True)]  # first retained index in the window
    items = vocab.indices(chain.from_iterable(s.items[a:] for s, a in zip(states, lo, strict=True)))
    types = np.fromiter(
        map(EVENT_TYPE_IDS.get, chain.from_iterable(s.types[a:] for s, a in zip(states, lo, strict=True)), repeat(1)),
        dtype=np.int64,
        count=total,
    )
    ts = np.fromiter(chain.from_iterable(s.ts[a:] for s, a in zip(states, lo, strict=True)), np.int64, total)
    names = chain.from_iterable(_scenarios(s, a) for s, a in zip(states, lo, strict=True))
    scenarios = np.fromiter(
        map(cfg.scenario_ids().get, names, repeat(1)),
        dtype=np.int64,
        count=total,
    )

    offsets = np.zeros(B, dtype=np.int64)
    np.cumsum(ns[:-1], out=offsets[1:])
    seq_first = offsets[ns > 0]
    # Session boundaries inside each window, as flat indices; sessions after an event = boundaries after it.
    flags = np.zeros(total, dtype=np.int64)
    bounds = [o + b - a for s, a, o in zip(states, lo, offsets.tolist(), strict=True) for b in s.starts if b > a]
    flags[np.asarray(bounds, dtype=np.int64)] = 1
    csum = np.cumsum(flags)
    seq_end = np.repeat(offsets + ns - 1, ns)
    session_pos = np.minimum(csum[seq_end] - csum, cfg.max_session_pos)

    gaps = np.empty(total, dtype=np.int64)
    gaps[1:] = 2 + np.searchsorted(np.asarray(cfg.gap_edges_ms, dtype=np.int64), np.diff(ts), side="right")
    gaps[seq_first] = 1

    rows = np.repeat(np.arange(B), ns)
    cols = np.arange(total) - np.repeat(offsets, ns) + np.repeat(L - ns, ns)
    for name, values in zip(INPUT_NAMES, (items, types, session_pos, gaps, scenarios), strict=True):
        out[name][rows, cols] = values
    return out


def _scenarios(state: UserState, lo: int) -> Iterable[str]:
    """The scenario of each event from `lo` on ("" = none; a state with no scenario at all stores none)."""
    return state.scenarios[lo:] if state.scenarios else repeat("", len(state) - lo)


def window_start(state: UserState, cfg: EncoderConfig) -> int:
    """Index of the state's first event inside the encoded window (position `max_len - n` of the inputs)."""
    return max(0, len(state) - cfg.max_len)


def explain_sessions(
    state: UserState, event_weights: np.ndarray, cfg: EncoderConfig, top_sessions: int = 3, top_items: int = 3
) -> list[tuple[int, int, int, float, list[str]]]:
    """Per-position weights of one encoded history (`[max_len]`, left-padded like the inputs) summed per retained
    session: `(start_ms, end_ms, events, weight, top items)` for the `top_sessions` heaviest, heaviest first.
    Sessions wholly before the window get no weight and are not listed."""
    lo, end = window_start(state, cfg), len(state)
    n = end - lo
    if n == 0:
        return []
    # Plain lists: a history has tens of events in about ten sessions, too few for numpy's per-call cost to pay
    # (this was half of building a record). Sorts are stable: ties keep time order.
    w = np.asarray(event_weights)[cfg.max_len - n :].tolist()  # w[j] belongs to event lo + j
    starts = state.starts
    first = len(starts) - 1
    while first > 0 and starts[first] > lo:  # the oldest session with an event in the window
        first -= 1
    spans = [(max(s, lo), e, s) for s, e in zip(starts[first:], [*starts[first + 1 :], end], strict=True)]
    sums = [sum(w[a - lo : b - lo]) for a, b, _ in spans]
    heaviest = sorted(range(len(spans)), key=sums.__getitem__, reverse=True)[:top_sessions]
    items, ts, out = state.items, state.ts, []
    for k in heaviest:
        a, b, start = spans[k]
        order = sorted(range(a - lo, b - lo), key=w.__getitem__, reverse=True)
        picked = list(dict.fromkeys([items[lo + j] for j in order]))[:top_items]
        out.append((ts[start], ts[b - 1], b - start, sums[k], picked))
    return out


def example_inputs(
    batch: int, max_len: int, n_items: int, seed: int = 0, n_scenarios: int = 0
) -> dict[str, np.ndarray]:
    """Random left-padded histories of random lengths (valid index ranges), for export, tests and benchmarks."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len + 1, batch)
    valid = np.arange(max_len)[None, :] >= (max_len - lengths)[:, None]
    x = {
        "item_ids": rng.integers(1, n_items, (batch, max_len)),
        "event_types": rng.integers(1, 4, (batch, max_len)),
        "session_pos": np.sort(rng.integers(0, 8, (batch, max_len)), axis=1)[:, ::-1],
        "time_gaps": rng.integers(1, 13, (batch, max_len)),
        "scenarios": rng.integers(1, 2 + n_scenarios, (batch, max_len)),
    }
    return {n: np.ascontiguousarray(np.where(valid, v, PAD), dtype=np.int64) for n, v in x.items()}
