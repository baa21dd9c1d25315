"""`interest-stream eval-stream`: MovieLens replayed in time order through the continuous learner (issue 27).

The model is trained on the events before a cut time T (the first `cut` share of all events by time); the rest
is the stream. It is cut into `updates` intervals of equal event counts; at the end of each interval the trainer
runs one `models.learn.learn_step` (its last `holdout` share held out: fusion refit, then validation) and the
candidate serves the next interval if it was promoted. Every streamed event is a test case: rank all items for
the user's history up to then (seen items filtered) and look for the event's item. Variants, each refreshed at
the same cadence:

* `frozen`: the model trained before T, never updated (an item first seen after T is OOV: never recommended);
* `continuous`: the model as the learner keeps it (vocabulary grown, EASE refitted, fine-tuned, validated);
* `refit_baseline`: EASE refitted on all histories so far (lambda and decay tuned on the data before T);
* `popularity`: the items most rated in the last `popularity_days` before the interval.

Reported: NDCG@10 and Recall@20 over the stream, Recall@20 on targets first seen after T, NDCG@10 per interval.
"""

from __future__ import annotations

import bisect
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from core.encoding import Vocabulary
from core.sessions import UserState
from models.baselines import Ease
from models.data import Dataset, load_movielens, prefix, split, vocabulary_of
from models.learn import LearnConfig, learn_step
from models.ranking import event_ndcg, seen_mask, target_ranks

VARIANTS = ("continuous", "frozen", "refit_baseline", "popularity")


@dataclass
class StreamEvalConfig:
    cut: float = 0.8  # share of events (by time) before T: the model trains on those
    updates: int = 10  # trainer intervals over the stream (equal event counts)
    holdout: float = 0.2  # each interval's newest share: its older half refits the fusion, the newer validates
    fusion_share: float = 0.5  # LearnConfig.fusion_share (0: training's fusion kept, the whole holdout validates)
    popularity_days: float = 30.0
    max_eval_events: int = 0  # > 0: score an evenly spaced subsample of the streamed events (bounded run time)
    steps: int = 100  # fine-tuning steps per update (LearnConfig.steps)
    max_epochs: int = 40  # training before T
    max_minutes: float = 8.0
    seed: int = 0


@dataclass
class Case:
    """One streamed event: the user's history before it and the item it names."""

    user: int
    index: int  # position of the event in the user's full history
    ts: int
    item: str


def time_of_cut(states: list[UserState], share: float) -> int:
    """T: the event time below which `share` of all events lie."""
    ts = np.sort(np.fromiter((t for s in states for t in s.ts), dtype=np.int64))
    return int(ts[int(share * len(ts))])


def before(states: list[UserState], t: int) -> list[UserState]:
    """Every user's history of the events before `t` (users with none are left out)."""
    out = []
    for s in states:
        n = bisect.bisect_left(s.ts, t)
        if n:
            out.append(prefix(s, n))
    return out


def stream_cases(states: list[UserState], t: int) -> list[Case]:
    """The events at or after `t`, in time order (then user, then position)."""
    cases = [
        Case(u, j, s.ts[j], s.items[j])
        for u, s in enumerate(states)
        for j in range(bisect.bisect_left(s.ts, t), len(s))
    ]
    return sorted(cases, key=lambda c: (c.ts, c.user, c.index))


def dataset_before(ml: Dataset, t: int) -> Dataset:
    """The data set as it was at `t`: histories, vocabulary and item genres of the events before it."""
    states = before(ml.states, t)
    vocab = vocabulary_of(states)
    cats = ml.item_categories[ml.vocab.indices(vocab.items)] if ml.item_categories is not None else None
    if cats is not None:
        cats = np.concatenate([np.zeros((2, cats.shape[1]), cats.dtype), cats])
    return replace(ml, states=states, users=[str(i) for i in range(len(states))], vocab=vocab, item_categories=cats)


class PopularityWindow:
    """Items by how often they were rated in a recent window (a freshness baseline), over the items seen so far."""

    def __init__(self, vocab: Vocabulary, histories: list[UserState], lo: int, hi: int) -> None:
        counts = Counter(i for s in histories for ts, i in zip(s.ts, s.items, strict=True) if lo <= ts < hi)
        self.counts = np.zeros(len(vocab), np.float32)
        for item, c in counts.items():
            self.counts[vocab.index(item)] = c

    def scores(self, states, vocab) -> np.ndarray:
        return np.tile(self.counts, (len(states), 1))


def rank_metrics(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: NDCG@10 and Recall@20 hit (0/1) of the target; `scores` filtered, a target at -inf misses."""
    r = target_ranks(scores, targets)
    return event_ndcg(r), (r < 20).astype(np.float64)


def score_cases(
    scorer, vocab: Vocabulary, inputs: list[UserState], targets: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """NDCG@10 and Recall@20 per case for a scorer with `.scores(states, vocab)` (unfiltered), in chunks."""
    nd, hit = [], []
    for a in range(0, len(inputs), 512):
        chunk = inputs[a : a + 512]
        s = scorer.scores(chunk, vocab)
        s[seen_mask(chunk, vocab)] = -np.inf
        n, h = rank_metrics(s, vocab.indices(targets[a : a + 512]))
        nd.append(n)
        hit.append(h)
    return (np.concatenate(nd), np.concatenate(hit)) if nd else (np.zeros(0), np.zeros(0))


class ModelScorer:
    """A checkpoint behind the baselines' `.scores(states, vocab)` interface (its own vocabulary)."""

    def __init__(self, ckpt) -> None:
        self.ckpt = ckpt

    def scores(self, states, vocab) -> np.ndarray:
        from models.train import score

        return score(self.ckpt.model, list(states), self.ckpt.vocab, self.ckpt.encoder_config)  # filtered already


def train_before(ds: Dataset, cfg: StreamEvalConfig, out: Path):
    """The model of the data before T (kept in `out`: a second run reuses it)."""
    from models.checkpoint import load_checkpoint
    from models.train import TrainConfig, train

    if (out / "checkpoint.pt").exists():
        return load_checkpoint(out)
    tcfg = TrainConfig(seed=cfg.seed, max_epochs=cfg.max_epochs, max_minutes=cfg.max_minutes)
    return train(tcfg, ds, split(ds), out=out, quiet=True)[0]


def run(cfg: StreamEvalConfig, out: Path, log=print) -> dict:
    from models.evaluate import tune_ease

    out.mkdir(parents=True, exist_ok=True)
    ml = load_movielens()
    t_cut = time_of_cut(ml.states, cfg.cut)
    ds_t = dataset_before(ml, t_cut)
    frozen = train_before(ds_t, cfg, out / "model-before-T")
    lam, decay = tune_ease(ds_t, split(ds_t))
    log(
        f"T = {t_cut}: {sum(len(s) for s in ds_t.states)} events before, {len(ds_t.vocab) - 2} items; "
        f"EASE lam {lam} decay {decay}"
    )
    cases = stream_cases(ml.states, t_cut)
    bounds = [cases[len(cases) * k // cfg.updates].ts for k in range(cfg.updates)] + [cases[-1].ts + 1]
    bounds[0] = t_cut
    keep = set(range(len(cases)))
    if 0 < cfg.max_eval_events < len(cases):
        keep = set(np.linspace(0, len(cases) - 1, cfg.max_eval_events).astype(int).tolist())
    categories_of = lambda item: ml.item_categories[ml.vocab.index(item)]  # noqa: E731
    serving, lcfg = frozen, LearnConfig(steps=cfg.steps, seed=cfg.seed, fusion_share=cfg.fusion_share)
    per_case = {v: {"ndcg10": [], "hit20": []} for v in VARIANTS}
    new_item, interval, updates = [], [], []
    for k in range(cfg.updates):
        lo, hi = bounds[k], bounds[k + 1]
        histories = before(ml.states, lo)
        if k > 0:  # the trainer's step at the end of the previous interval
            t0 = time.process_time()
            hold_from = _holdout_start(cases, bounds[k - 1], lo, cfg.holdout)
            candidate, verdict, facts = learn_step(serving, histories, bounds[k - 1], hold_from, lcfg, categories_of)
            cpu = round(time.process_time() - t0, 1)
            updates.append({"at": lo, "cpu_seconds": cpu, **asdict(verdict), "new_items": facts.get("new_items", 0)})
            updates[-1]["fusion"] = facts.get("fusion", {})
            log(f"update {k}: {json.dumps(updates[-1])}")
            if verdict.promote:
                serving = candidate
        vocab_now = vocabulary_of(histories)
        scorers = {
            "continuous": (ModelScorer(serving), serving.vocab),
            "frozen": (ModelScorer(frozen), frozen.vocab),
            "refit_baseline": (Ease(histories, vocab_now, lam, decay), vocab_now),
            "popularity": (
                PopularityWindow(vocab_now, histories, lo - int(cfg.popularity_days * 86_400_000), lo),
                vocab_now,
            ),
        }
        chosen = [c for i, c in enumerate(cases) if lo <= c.ts < hi and i in keep]
        inputs = [prefix(ml.states[c.user], c.index) for c in chosen]
        targets = [c.item for c in chosen]
        row = {"from": lo, "to": hi, "events": len(chosen)}
        for name, (scorer, vocab) in scorers.items():
            nd, hit = score_cases(scorer, vocab, inputs, targets)
            per_case[name]["ndcg10"].append(nd)
            per_case[name]["hit20"].append(hit)
            row[name] = float(nd.mean()) if len(nd) else float("nan")
        new_item.append(np.array([t not in frozen.vocab for t in targets], dtype=bool))
        interval.append(row)
        log(f"interval {k}: {json.dumps(row)}")
    new = np.concatenate(new_item)
    summary = {"t_cut": t_cut, "cases": len(new), "new_item_cases": int(new.sum()), "config": asdict(cfg)}
    for name in VARIANTS:
        nd, hit = np.concatenate(per_case[name]["ndcg10"]), np.concatenate(per_case[name]["hit20"])
        summary[name] = {
            "ndcg10": float(nd.mean()),
            "recall20": float(hit.mean()),
            "new_item_recall20": float(hit[new].mean()) if new.any() else 0.0,
        }
    summary["updates"], summary["intervals"] = updates, interval
    summary["promotions"] = sum(u["promote"] for u in updates)
    summary["vocab"] = {"before": len(frozen.vocab) - 2, "after": len(serving.vocab) - 2}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "ndcg_over_time.png")
    return summary


def _holdout_start(cases: list[Case], lo: int, hi: int, share: float) -> int:
    """The event time from which the newest `share` of the interval's events lie (the validation slice)."""
    ts = [c.ts for c in cases if lo <= c.ts < hi]
    return ts[min(len(ts) - 1, int(len(ts) * (1 - share)))] if ts else hi


def result_line(s: dict) -> str:
    c, f, r, p = (s[v] for v in VARIANTS)
    cpu = [u["cpu_seconds"] for u in s["updates"]]
    return (
        f"RESULT ndcg10_continuous={c['ndcg10']:.4f} ndcg10_frozen={f['ndcg10']:.4f} "
        f"ndcg10_refit_baseline={r['ndcg10']:.4f} ndcg10_popularity={p['ndcg10']:.4f} "
        f"new_item_recall20={c['new_item_recall20']:.4f} new_item_recall20_frozen={f['new_item_recall20']:.4f} "
        f"new_item_recall20_refit_baseline={r['new_item_recall20']:.4f} "
        f"recall20_continuous={c['recall20']:.4f} recall20_frozen={f['recall20']:.4f} "
        f"recall20_refit_baseline={r['recall20']:.4f} recall20_popularity={p['recall20']:.4f} "
        f"continuous_vs_frozen={c['ndcg10'] / f['ndcg10']:.3f} continuous_vs_refit={c['ndcg10'] / r['ndcg10']:.3f} "
        f"promotions={s['promotions']}/{len(s['updates'])} cpu_s_per_update={np.mean(cpu) if cpu else 0:.1f} "
        f"cases={s['cases']} new_item_cases={s['new_item_cases']}"
    )


def plot(s: dict, path: Path) -> None:
    import datetime as dt

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [dt.datetime.fromtimestamp(r["from"] / 1000, dt.UTC) for r in s["intervals"]]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for name in VARIANTS:
        ax.plot(x, [r[name] for r in s["intervals"]], marker="o", label=name)
    ax.set_ylabel("NDCG@10 of the interval's events")
    ax.set_title("MovieLens after T, replayed in time order (one point per trainer interval)")
    ax.legend()
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
