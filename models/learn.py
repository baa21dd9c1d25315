"""The learning core of the continuous trainer (issue 27): pure functions from a serving checkpoint and the
histories seen so far to a validated candidate. No I/O: `interest-stream learn` (local/learner.py) feeds it from
the events topic and exports what it promotes; `interest-stream eval-stream` (models/stream_eval.py) replays
MovieLens through it.

One step, at the trainer's cadence:

1. **grow** the item vocabulary by the items first seen since the serving version (appended: every old index
   keeps its meaning, so the worker's old inputs stay valid). A new item's embedding and bias start as the mean of
   the known items it shares sessions with in the histories (what it is watched with is the best guess of what it
   is), else the mean over known items; its item-item (EASE) rows start empty, so right after growth every old
   item scores exactly as before.
2. **refit** the in-graph item-item scorer on all histories so far (with the lambda picked at training): this is
   what makes a new item recommendable from its co-occurrences.
3. **fine-tune** the Transformer on the recent users' windows for a bounded number of steps (the training loss).
4. **refit the fusion** (how much the Transformer's logits lean on the item-item evidence, and its recency decay)
   on the older part of the held-out slice: events the candidate never trained on, unlike the validation
   histories training picked them on, which the Transformer had learnt (it was over-trusted on a time-ordered
   stream: docs/model-results.md). A new pair must win there beyond the noise and not lose on the newer part.
5. **validate** candidate and serving version on the newer part of the held-out slice (events neither the
   weights nor the fusion saw): promote only if the candidate's NDCG@10 is not worse, i.e. not lower by more than
   `z` standard errors of the per-event paired difference (a few hundred events cannot tell 0.01 apart).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.encoding import OOV, PAD, Vocabulary
from core.sessions import UserState
from models.checkpoint import Checkpoint
from models.data import prefix
from models.model import InterestTransformer
from models.ranking import event_ndcg, seen_mask, target_ranks

#: State-dict entries with one row per vocabulary item (grown together; the neighbour rows are EASE's sparse form).
ITEM_ROWS = (
    "item_emb.weight", "item_bias", "item_categories", "item_item_factors", "ease_out", "ease_self", "neighbour_items",
    "neighbour_weights",
)  # fmt: skip


@dataclass
class LearnConfig:
    steps: int = 100  # fine-tuning optimizer steps per interval: the trainer's cost is bounded by it
    cpu_budget_s: float = 0.0  # > 0: fine-tuning also stops once it has used this many CPU seconds
    batch_size: int = 16
    lr: float = 5e-4  # a quarter of training's: small corrections to a trained model, not a new one
    max_windows: int = 2000  # recent training windows kept for fine-tuning (newest first)
    tolerance: float = 0.0  # a candidate this much worse (NDCG@10) than the serving version is still promoted
    # "Worse" = worse by more than z standard errors of the per-event paired difference (0: any drop). The held-out
    # slice is a few hundred events, where NDCG@10 moves by ~0.01 between equally good models (docs/model-results.md).
    z: float = 1.64
    # The oldest share of the held-out events refits the fusion (step 4); the rest validates. 0: the fusion picked
    # at training is kept and every held-out event validates.
    fusion_share: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fusion_share < 1.0:  # 1 would leave nothing to validate: every step refused
            raise ValueError(f"fusion_share must be in [0, 1), got {self.fusion_share}")


@dataclass
class Validation:
    candidate_ndcg10: float
    serving_ndcg10: float
    events: int  # held-out events scored
    promote: bool
    reason: str  # "better", "equal", "within_noise", or why not: "worse", "no_holdout", "diverged"


def unseen_items(vocab: Vocabulary, histories: Sequence[UserState]) -> list[str]:
    """Items of `histories` the vocabulary lacks, in order of first appearance (event time, then id)."""
    first: dict[str, int] = {}
    for s in histories:
        for ts, item in zip(s.ts, s.items, strict=True):
            if item not in vocab and ts < first.get(item, math.inf):
                first[item] = ts
    return sorted(first, key=lambda i: (first[i], i))


def cooccurring(vocab: Vocabulary, histories: Sequence[UserState], items: Sequence[str]) -> dict[str, Counter]:
    """For each of `items`: how often each known item index shares a session with it in `histories`."""
    wanted, out = set(items), defaultdict(Counter)
    for s in histories:
        bounds = (*s.starts, len(s))
        for a, b in itertools.pairwise(bounds):
            session = s.items[a:b]
            new = [i for i in session if i in wanted]
            if not new:
                continue
            known = [k for k in vocab.indices(session).tolist() if k > OOV]
            for i in new:
                out[i].update(known)
    return out


def grow(
    ckpt: Checkpoint,
    histories: Sequence[UserState],
    categories_of: Callable[[str], np.ndarray] | None = None,
) -> Checkpoint:
    """A copy of `ckpt` whose vocabulary also holds the items of `histories` it lacks (appended). New embedding and
    bias rows: the co-occurrence-weighted mean of the known items' rows, or the mean of all known rows. Item-item
    rows are zero until `refit_item_item`. `categories_of(item)` gives a new item's multi-hot genres (else none)."""
    new = unseen_items(ckpt.vocab, histories)
    if not new:
        return ckpt
    old_n, n = len(ckpt.vocab), len(ckpt.vocab) + len(new)
    state = ckpt.model.state_dict()
    mix = torch.zeros(len(new), old_n)  # row r: the weights of the known items that initialise new item r
    co = cooccurring(ckpt.vocab, histories, new)
    for r, item in enumerate(new):
        if co[item]:
            idx, w = zip(*co[item].items(), strict=True)
            mix[r, list(idx)] = torch.tensor(w, dtype=torch.float32)
        else:
            mix[r, 2:] = 1.0  # never seen with a known item: the mean over the known items
    mix = mix / mix.sum(1, keepdim=True)
    grown = {}
    for name, t in state.items():
        if name not in ITEM_ROWS:
            grown[name] = t
            continue
        rows = torch.zeros((len(new), *t.shape[1:]), dtype=t.dtype)
        if name in ("item_emb.weight", "item_bias"):
            rows = (mix @ t.float().reshape(old_n, -1)).reshape(rows.shape).to(t.dtype)
        elif name == "item_categories" and categories_of is not None:
            rows = torch.as_tensor(np.stack([categories_of(i) for i in new]), dtype=t.dtype)
        grown[name] = torch.cat([t, rows.to(t.device)])
    mcfg = dataclasses.replace(ckpt.model_config, n_items=n)
    model = InterestTransformer(mcfg).to(state["item_emb.weight"].device)
    model.load_state_dict(grown)
    model.eval()
    vocab = Vocabulary([*ckpt.vocab.items, *new])
    cats = grown.get("item_categories") if ckpt.item_categories is not None else None
    meta = ckpt.metadata | {"grown_items": len(new)}
    return Checkpoint(model, mcfg, ckpt.encoder_config, vocab, ckpt.categories, cats, meta)


def refit_item_item(ckpt: Checkpoint, histories: Sequence[UserState]) -> Checkpoint:
    """Refit the in-graph item-item scorer on `histories` with the lambda picked at training. EASE is exact up to
    `item_item_rank` users (a truncated SVD beyond), so the rank grows with the users, up to training's cap of 1024:
    a copy with wider factor buffers (they are refilled here; nothing else changes). Returns the refitted one."""
    from models.train import TrainConfig, fill_item_item

    cfg = ckpt.model_config
    if cfg.item_item_rank <= 0:
        return ckpt
    rank = min(TrainConfig.item_item_rank, len(histories))
    if rank > cfg.item_item_rank:
        mcfg = dataclasses.replace(cfg, item_item_rank=rank)
        model = InterestTransformer(mcfg).to(next(ckpt.model.parameters()).device)
        kept = {k: v for k, v in ckpt.model.state_dict().items() if k not in ("item_item_factors", "ease_out")}
        model.load_state_dict(kept, strict=False)
        ckpt = dataclasses.replace(ckpt, model=model.eval(), model_config=mcfg)
    lam = float(ckpt.metadata.get("item_item", {}).get("lam", 300.0))
    fill_item_item(ckpt.model, list(histories), ckpt.vocab, lam)
    return ckpt


def fine_tune(ckpt: Checkpoint, histories: Sequence[UserState], cfg: LearnConfig) -> list[float]:
    """`cfg.steps` AdamW steps of the training loss on the newest windows of `histories` (in place; the model is
    left in eval mode), fewer if `cfg.cpu_budget_s` runs out. Returns the losses (empty: nothing to learn from)."""
    from models.train import TrainConfig, loss_fn, to_tensors, windows

    wins = [w for w in windows(list(histories), ckpt.encoder_config.max_len) if len(w) >= 2][: cfg.max_windows]
    if not wins or cfg.steps <= 0:
        return []
    model = ckpt.model
    device = next(model.parameters()).device
    data = to_tensors(wins, ckpt.vocab, ckpt.encoder_config, device)
    lengths = (data["item_ids"] != PAD).sum(1)
    tcfg = TrainConfig(**{k: v for k, v in ckpt.metadata.get("train_config", {}).items() if k != "device"})
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=tcfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses, t0 = [], time.process_time()
    model.train()
    for _ in range(cfg.steps):
        if cfg.cpu_budget_s > 0 and time.process_time() - t0 >= cfg.cpu_budget_s:
            break
        idx = torch.randint(len(wins), (min(cfg.batch_size, len(wins)),), generator=gen).to(device)
        width = int(lengths[idx].max())
        loss = loss_fn(model, {k: v[idx, -width:] for k, v in data.items()}, tcfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def holdout(histories: Sequence[UserState], since_ts: int) -> tuple[list[UserState], list[UserState], list[str]]:
    """Split the histories at `since_ts`: (what may be trained on: each history before it; the held-out inputs,
    one per event at or after it, its history before it; their target items), the held-out events oldest first."""
    fit, held = [], []
    for s in histories:
        cut = int(np.searchsorted(np.asarray(s.ts), since_ts, side="left"))
        if cut > 0:
            fit.append(prefix(s, cut))
        for j in range(max(cut, 1), len(s)):  # an event with no history before it says nothing about either model
            held.append((s.ts[j], len(held), prefix(s, j), s.items[j]))
    held.sort(key=lambda h: h[:2])
    return fit, [h[2] for h in held], [h[3] for h in held]


def as_buffer(v: float) -> float:
    """`v` as a float32 buffer holds it (0.9 is stored as 0.89999998), so that a grid value and the value read
    back from the model compare equal."""
    return float(np.float32(v))


@torch.no_grad()
def refit_fusion(
    ckpt: Checkpoint, inputs: Sequence[UserState], targets: Sequence[str], z: float = 1.64
) -> dict[str, float]:
    """Pick the item-item weight and recency decay (training's grids) that rank `targets` best, in place. The
    current pair is kept unless the best one beats it by more than `z` standard errors of the per-event paired
    gain: on a couple of hundred events the best of 66 pairs wins by noise alone, and chasing it swung the pair
    from interval to interval and lost NDCG (eval-stream, docs/model-results.md). Returns the pair kept, the best
    pair's NDCG@10 and the old one's."""
    from models.train import ITEM_ITEM_DECAYS, ITEM_ITEM_WEIGHTS, to_tensors

    model = ckpt.model
    if model.cfg.item_item_rank <= 0 or not inputs:
        return {}
    old = (model.item_item_weight.item(), model.item_item_decay.item())
    device = next(model.parameters()).device
    target_idx = ckpt.vocab.indices(list(targets))
    per_event: dict[tuple[float, float], list[np.ndarray]] = {}
    for a in range(0, len(inputs), 256):  # bounded memory: a [chunk, n_items] score matrix per pair
        chunk = list(inputs[a : a + 256])
        x = to_tensors(chunk, ckpt.vocab, ckpt.encoder_config, device)
        seen = torch.from_numpy(seen_mask(chunk, ckpt.vocab)).to(device)
        base = model.item_logits(model(**x)).masked_fill(seen, float("-inf")) + model.item_mask
        n = (model.window(x["item_ids"])[0] != PAD).sum(1, keepdim=True).clamp(min=1)
        short = model.item_item_short_weight / n
        for decay in {old[1], *map(as_buffer, ITEM_ITEM_DECAYS)}:
            model.item_item_decay.fill_(decay)
            evidence = model.item_item_scores(x["item_ids"])
            for w in {old[0], *map(as_buffer, ITEM_ITEM_WEIGHTS)}:
                r = target_ranks((base + (w + short) * evidence).cpu().numpy(), target_idx[a : a + 256])
                per_event.setdefault((w, decay), []).append(event_ndcg(r))
    ndcg = {pair: np.concatenate(gains) for pair, gains in per_event.items()}
    best = max(ndcg, key=lambda k: (ndcg[k].mean(), k == old))
    diff = ndcg[best] - ndcg[old]
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    kept = best if diff.mean() > z * se else old
    model.item_item_weight.fill_(kept[0])
    model.item_item_decay.fill_(kept[1])
    ckpt.metadata["item_item"] = ckpt.metadata.get("item_item", {}) | {"weight": kept[0], "decay": kept[1]}
    return {
        "weight": kept[0], "decay": kept[1], "changed": kept != old, "ndcg10": float(ndcg[kept].mean()),
        "ndcg10_before": float(ndcg[old].mean()), "best_ndcg10": float(ndcg[best].mean()), "weight_before": old[0],
        "decay_before": old[1],
    }  # fmt: skip


def confirm_fusion(
    ckpt: Checkpoint, fusion: dict, inputs: Sequence[UserState], targets: Sequence[str]
) -> dict[str, float]:
    """A fusion `refit_fusion` changed is kept only if it does not rank the events `inputs` (newer, unseen by the
    refit) lower than the old pair did; else the old pair is put back. Why: the best of 66 pairs on a couple of
    hundred events can pass the refit's test by luck; a second slice agreeing is the cheap check (an eval-stream
    seed lost 5 % to a pair the next events disagreed with, docs/model-results.md). Returns `fusion`, updated."""
    if not fusion.get("changed") or not inputs:
        return fusion
    model = ckpt.model
    new = event_ndcg10(ckpt, inputs, targets).mean()
    model.item_item_weight.fill_(fusion["weight_before"])
    model.item_item_decay.fill_(fusion["decay_before"])
    old = event_ndcg10(ckpt, inputs, targets).mean()
    confirmed = new >= old
    if confirmed:
        model.item_item_weight.fill_(fusion["weight"])
        model.item_item_decay.fill_(fusion["decay"])
    kept = {"weight": model.item_item_weight.item(), "decay": model.item_item_decay.item()}
    ckpt.metadata["item_item"] = ckpt.metadata.get("item_item", {}) | kept
    return (
        fusion
        | kept
        | {"confirmed": bool(confirmed), "validation_ndcg10": float(new), "validation_ndcg10_before": float(old)}
    )


def event_ndcg10(ckpt: Checkpoint, inputs: Sequence[UserState], targets: Sequence[str]) -> np.ndarray:
    """NDCG@10 per held-out event, full ranking with seen items filtered; a target the vocabulary lacks misses."""
    from models.train import score

    r = target_ranks(score(ckpt.model, list(inputs), ckpt.vocab, ckpt.encoder_config), ckpt.vocab.indices(targets))
    return event_ndcg(r)


def ndcg10(ckpt: Checkpoint, inputs: Sequence[UserState], targets: Sequence[str]) -> float:
    return float(event_ndcg10(ckpt, inputs, targets).mean())


def decide(diff: np.ndarray, tolerance: float, z: float) -> tuple[bool, str]:
    """Promote unless the candidate is worse: its mean per-event gain `diff` below -tolerance by more than `z`
    standard errors (z = 0: any drop below -tolerance)."""
    if not np.isfinite(diff).all():
        return False, "diverged"
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    mean = float(diff.mean())
    if mean < -tolerance - z * se:
        return False, "worse"
    return True, "better" if mean > 0 else ("equal" if mean == 0 else "within_noise")


def validate(
    candidate: Checkpoint,
    serving: Checkpoint,
    inputs: Sequence[UserState],
    targets: Sequence[str],
    tolerance: float,
    z: float = 0.0,
) -> Validation:
    """Promote the candidate only if it is not worse than the serving version on the held-out events."""
    if not inputs:
        return Validation(math.nan, math.nan, 0, False, "no_holdout")
    cand, serv = event_ndcg10(candidate, inputs, targets), event_ndcg10(serving, inputs, targets)
    promote, reason = decide(cand - serv, tolerance, z)
    return Validation(float(cand.mean()), float(serv.mean()), len(inputs), promote, reason)


def learn_step(
    serving: Checkpoint,
    histories: Sequence[UserState],
    recent_from_ts: int,
    holdout_from_ts: int,
    cfg: LearnConfig,
    categories_of: Callable[[str], np.ndarray] | None = None,
) -> tuple[Checkpoint, Validation, dict]:
    """One interval: grow, refit the item-item scorer and fine-tune on what precedes `holdout_from_ts` (the
    fine-tuning on the users active since `recent_from_ts`), refit the fusion on the older `cfg.fusion_share` of
    the rest and validate on the newer. Returns (candidate, validation, facts: new items, losses, fusion). The
    serving checkpoint is never modified."""
    fit, inputs, targets = holdout(histories, holdout_from_ts)
    tuned = int(len(inputs) * cfg.fusion_share) if len(inputs) > 1 else 0
    candidate = grow(copy_checkpoint(serving), fit, categories_of)
    candidate = refit_item_item(candidate, fit)
    recent = [s for s in fit if s.ts and s.ts[-1] >= recent_from_ts]
    recent.sort(key=lambda s: -s.ts[-1])
    losses = fine_tune(candidate, recent, cfg)
    if losses and not all(math.isfinite(x) for x in losses):
        return candidate, Validation(math.nan, math.nan, len(inputs), False, "diverged"), {"losses": losses}
    fusion = refit_fusion(candidate, inputs[:tuned], targets[:tuned], cfg.z)
    fusion = confirm_fusion(candidate, fusion, inputs[tuned:], targets[tuned:])
    verdict = validate(candidate, serving, inputs[tuned:], targets[tuned:], cfg.tolerance, cfg.z)
    facts = {"new_items": len(candidate.vocab) - len(serving.vocab), "losses": losses, "recent_users": len(recent)}
    facts["fusion"] = fusion
    return candidate, verdict, facts


def copy_checkpoint(ckpt: Checkpoint) -> Checkpoint:
    """An independent copy (weights cloned), so that learning never touches the version being served."""
    model = InterestTransformer(ckpt.model_config).to(next(ckpt.model.parameters()).device)
    model.load_state_dict({k: v.clone() for k, v in ckpt.model.state_dict().items()})
    model.eval()
    return dataclasses.replace(ckpt, model=model, metadata=dict(ckpt.metadata))
