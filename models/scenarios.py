"""Scenario-aware interest on data with a planted scenario effect (no shipped data set names a platform).

MovieLens has no platform or scenario at all, and the OTTO sample's clicks/carts/orders are event types, which the
model already reads as `event_types`. So the mechanics are tested where the truth is known: synthetic users who
like one category on "app" and another on "tv" (`planted_dataset`). The model reads each event's scenario
(`scenario_emb`) and is asked about the next event's scenario at half of the training positions (`target_emb`).
Asked about the held-out session's scenario, it must rank that session's items better than the general interest,
and better than when asked about the wrong scenario.

    interest-stream eval-scenarios
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from core.encoding import EncoderConfig
from core.schema import Event
from core.sessions import UserState
from models.data import HISTORY, Dataset, prefix, split, vocabulary_of
from models.ranking import next_session_metrics, seen_mask
from models.train import Checkpoint, TrainConfig, to_tensors, train

SCENARIOS = ("app", "tv")


def planted_dataset(n_users: int = 400, n_items: int = 300, n_categories: int = 6, seed: int = 0) -> Dataset:
    """Each user likes one category on "app" and another on "tv"; a session happens on one platform and 80 % of
    its items come from the category the user likes there (the rest uniformly from the catalogue)."""
    from core.sessions import state_from_events

    rng = random.Random(seed)
    by_category = [[f"i{j}" for j in range(n_items) if j % n_categories == c] for c in range(n_categories)]
    users, states = [], []
    for u in range(n_users):
        likes = dict(zip(SCENARIOS, rng.sample(range(n_categories), 2), strict=True))
        t = 1_600_000_000_000 + rng.randrange(10**9)
        events = []
        for _ in range(rng.randint(6, 12)):
            scenario = rng.choice(SCENARIOS)
            for _ in range(rng.randint(3, 8)):
                pool = by_category[likes[scenario]] if rng.random() < 0.8 else by_category[rng.randrange(n_categories)]
                item = rng.choice(pool)
                events.append(Event(f"u{u}", item, "view", t, context={"scenario": scenario}))
                t += rng.randint(10, 300) * 1000
            t += rng.randint(1, 3) * 86_400_000
        users.append(f"u{u}")
        states.append(state_from_events(events, HISTORY))
    vocab = vocabulary_of(states)
    categories = [f"c{c}" for c in range(n_categories)]
    item_categories = np.zeros((len(vocab), n_categories), dtype=np.float32)
    for idx in range(2, len(vocab)):
        item_categories[idx, int(str(vocab.item(idx))[1:]) % n_categories] = 1.0
    name, tag = "planted-scenarios", f"seed{seed}"
    return Dataset(name, users, states, vocab, categories, item_categories, tag, list(SCENARIOS))


@dataclass
class ScenarioReport:
    users: int
    recall20_general: float  # next session, the general interest
    recall20_asked: float  # asked about the next session's own scenario
    recall20_wrong: float  # asked about the other scenario
    planted_share_asked: float  # share of the top-20 items in the category the user likes in that scenario
    planted_share_general: float


def next_sessions(ds: Dataset) -> tuple[list[UserState], list[np.ndarray], list[str]]:
    """The split's next-session protocol (all sessions but the last -> the last one's items), with the scenario of
    the held-out session, which a consumer asking for "the interest on tv" would name."""
    inputs, targets, scenarios = [], [], []
    for s in ds.states:
        if len(s) >= 3 and len(s.starts) >= 2:
            cut = s.starts[-1]
            inputs.append(prefix(s, cut))
            targets.append(np.unique(ds.vocab.indices(s.items[cut:])))
            scenarios.append(s.scenarios[cut])
    return inputs, targets, scenarios


@torch.no_grad()
def _scores(ckpt: Checkpoint, states: list[UserState], ask: list[str] | None) -> np.ndarray:
    model, enc = ckpt.model.eval(), ckpt.encoder_config
    x = to_tensors(states, ckpt.vocab, enc, "cpu")
    target = None if ask is None else torch.tensor([enc.scenario_ids()[a] for a in ask])
    scores = model.item_scores(model(**x, target_scenario=target), x["item_ids"]).numpy()
    scores[seen_mask(states, ckpt.vocab)] = -np.inf
    return scores


def evaluate(ckpt: Checkpoint, ds: Dataset, liked: dict[str, dict[str, int]] | None = None) -> ScenarioReport:
    inputs, targets, scenarios = next_sessions(ds)
    other = [SCENARIOS[1 - SCENARIOS.index(s)] for s in scenarios]
    general, asked, wrong = (_scores(ckpt, inputs, a) for a in (None, scenarios, other))
    recall = lambda s: next_session_metrics(s, targets, 20)["recall20"]  # noqa: E731
    # The category the user liked in the held-out scenario = the majority category of that session's items.
    cats = ds.item_categories.argmax(1)  # type: ignore[union-attr]
    planted = [np.bincount(cats[t]).argmax() for t in targets]

    def share(scores: np.ndarray) -> float:
        return float(np.mean([(cats[np.argsort(-r)[:20]] == p).mean() for r, p in zip(scores, planted, strict=True)]))

    return ScenarioReport(len(inputs), recall(general), recall(asked), recall(wrong), share(asked), share(general))


def run(n_users: int = 400, seed: int = 0, max_epochs: int = 40, d_model: int = 32) -> ScenarioReport:
    """Train on the planted data (the training histories of the usual split) and evaluate the next sessions."""
    ds = planted_dataset(n_users, seed=seed)
    cfg = TrainConfig(dataset=ds.name, seed=seed, max_len=EncoderConfig().max_len, d_model=d_model, item_item_rank=0)
    # No early stopping: validation asks about no scenario, and the scenarios are picked up only after ~10 epochs.
    cfg.max_epochs, cfg.patience, cfg.max_minutes = max_epochs, max_epochs, 8.0
    ckpt, _ = train(cfg, ds, split(ds), quiet=True)
    return evaluate(ckpt, ds)
