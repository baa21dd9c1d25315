"""Training: every position predicts the next item (full softmax cross-entropy over the vocabulary; sampled softmax
optional) plus the genres of the next items (BCE, small weight); the first event of each window is predicted by
the cold vector. Early stopping on validation NDCG@10 (full ranking), best weights kept, then the in-graph item-item
scorer (EASE by default, item-kNN optional) is fitted on validation; CUDA when present.

    interest-stream train --out artifacts/model
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.encoding import PAD, EncoderConfig, Vocabulary, encode_batch
from core.sessions import UserState
from models.checkpoint import Checkpoint, load_checkpoint, save
from models.coldstart import fit_short_weight, ndcg_by_length
from models.data import Dataset, Split, load, prefix, split
from models.model import InterestTransformer, ModelConfig
from models.ranking import (
    category_ndcg,
    category_overlap,
    category_relevance,
    next_item_metrics,
    next_session_metrics,
    seen_mask,
)


@dataclass
class TrainConfig:
    dataset: str = "movielens"
    seed: int = 0
    max_len: int = 200
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    use_session_pos: bool = True
    use_time_gaps: bool = True
    use_fusion: bool = False
    item_bias: bool = True
    category_history: bool = True
    category_share_mix: float = 0.6  # picked on held-out penultimate sessions (docs/model.md)
    item_item_rank: int = 1024  # in-graph item-item factor columns (exact up to this many training users); 0 = none
    history_scorer: str = "ease"  # in-graph item-item scorer fused with the Transformer: "ease" or "knn"
    ease_neighbours: int = 100  # EASE served as each item's top-N neighbours (0 = dense factors; docs/model.md)
    serve_len: int = 50  # inference reads the newest N events (0 = max_len; training always max_len)
    batch_size: int = 16  # small data: many small steps beat few large ones on CPU
    lr: float = 2e-3
    weight_decay: float = 0.0
    n_negatives: int = 0  # 0 = full softmax over the vocabulary; > 0 = sampled softmax (shared uniform negatives)
    label_smoothing: float = 0.0
    future_weight: float = 0.0  # > 0: each position also predicts the items 2..future_window events ahead
    future_window: int = 10
    category_weight: float = 0.1
    # Short histories (issue 27): + crop_weight x the next-item loss of crop_count histories of 1..crop_len events
    # cut out of the batch's windows at random targets (`crop_loss`). Without them a window shows a 1-3 event
    # context only at its start (a user's first events), never as it is served: the newest event in the last column.
    crop_weight: float = 0.0
    crop_count: int = 64
    crop_len: int = 3
    category_window: int = 10  # the category head predicts the genre shares of this many next items
    scenario_ask: float = 0.5  # data with scenarios: share of positions asked about their next event's scenario
    max_epochs: int = 200
    max_minutes: float = 8.0
    patience: int = 8  # epochs without a better validation NDCG@10
    device: str = "auto"


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def windows(states: list[UserState], max_len: int) -> list[UserState]:
    """Long histories become several training windows (ending at n, n - max_len, ...)."""
    out = []
    for s in states:
        for end in range(len(s), 1, -max_len):
            out.append(prefix(s, end))
    return out


def batches(lengths: torch.Tensor, size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffled batches of similar lengths (attention cost grows with the square of the padded width)."""
    noisy = lengths.float() + torch.rand(len(lengths), generator=gen) * 20
    chunks = noisy.argsort().split(size)
    return [chunks[i] for i in torch.randperm(len(chunks), generator=gen).tolist()]


def to_tensors(states: list[UserState], vocab: Vocabulary, enc: EncoderConfig, device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in encode_batch(states, vocab, enc).items()}


@torch.no_grad()
def score(
    model: InterestTransformer, states: list[UserState], vocab: Vocabulary, enc: EncoderConfig, categories: bool = False
) -> np.ndarray:
    """[B, n_items] filtered next-item scores (-inf for seen/PAD/OOV), in batches; [B, C] category scores instead
    with `categories`."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for a in range(0, len(states), 256):
        x = to_tensors(states[a : a + 256], vocab, enc, device)
        interest = model(**x)
        s = model.category_scores(interest, x["item_ids"]) if categories else model.item_scores(interest, x["item_ids"])
        out.append(s.float().cpu().numpy())
    if categories:
        return np.concatenate(out)
    scores = np.concatenate(out) if out else np.zeros((0, len(vocab)), np.float32)
    scores[seen_mask(states, vocab)] = -np.inf
    return scores


def evaluate_model(model, ds: Dataset, sp: Split, enc: EncoderConfig) -> dict[str, float]:
    """Test metrics: next item (NDCG@10, Recall@10, MRR), next session (Recall@20, NDCG@20) and the category
    NDCG@5 against the genre shares of the next session, and how alike users' top 3 genres are."""
    m = next_item_metrics(score(model, sp.test_inputs, ds.vocab, enc), sp.test_targets, 10)
    ns = next_session_metrics(score(model, sp.ns_inputs, ds.vocab, enc), sp.ns_targets, 20)
    out = {**m, "ns_recall20": ns["recall20"], "ns_ndcg20": ns["ndcg20"]}
    if ds.item_categories is not None and len(ds.categories):
        rel = category_relevance(ds.item_categories, sp.ns_targets)
        cats = score(model, sp.ns_inputs, ds.vocab, enc, categories=True)
        out["cat_ndcg5"], out["cat_overlap3"] = category_ndcg(cats, rel, 5), category_overlap(cats)
    return out


def loss_fn(model: InterestTransformer, x: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    """Next-item cross-entropy at every position (full softmax over the vocabulary, or sampled) plus
    `category_weight` x BCE of the category head against the genre shares of the next `category_window` items."""
    items = x["item_ids"]
    ask, targets = None, items  # prev[:, t] (= h[:, t - 1]) predicts targets[:, t]
    if model.cfg.n_scenarios:
        ask, targets = scenario_targets(x["scenarios"], items, model.cfg.n_scenarios, cfg.scenario_ask)
    h = model.sequence_interests(**x, target_scenarios=ask)  # h[:, t] has read events <= t, predicts event t + 1
    cold = model.cold_interest().expand(items.shape[0], 1, -1)
    prev = torch.cat([cold, h[:, :-1]], 1)
    first = F.pad(items[:, :-1], (1, 0), value=PAD) == PAD  # the window's first event: predicted by `cold`
    prev = torch.where(first.unsqueeze(-1), cold, prev)
    valid = targets > 1
    u, tgt = prev[valid], targets[valid]
    if cfg.n_negatives <= 0:  # full softmax: 9.7k items is cheap
        logits = model.item_logits(u) + model.item_mask
        loss = F.cross_entropy(logits, tgt, label_smoothing=cfg.label_smoothing)
        if cfg.future_weight > 0:
            loss = loss + cfg.future_weight * future_loss(logits, items, valid, cfg.future_window)
    else:
        neg = torch.randint(2, model.cfg.n_items, (cfg.n_negatives,), device=items.device)
        pos_logits = (u * model.item_emb(tgt)).sum(-1, keepdim=True)
        logits = model.scale() * torch.cat([pos_logits, u @ model.item_emb(neg).T], -1)
        if model.item_bias is not None:
            logits = logits + torch.cat(
                [model.item_bias[tgt].unsqueeze(-1), model.item_bias[neg].expand(len(tgt), -1)], -1
            )
        hit = F.pad(neg.unsqueeze(0) == tgt.unsqueeze(1), (1, 0), value=False)  # accidental hits are not negatives
        logits = logits.masked_fill(hit, float("-inf"))  # after scaling: 0 * inf would poison the scale's gradient
        loss = F.cross_entropy(logits, torch.zeros_like(tgt))
    if cfg.category_weight > 0 and model.cfg.n_categories > 0:
        loss = loss + cfg.category_weight * category_loss(model, h, items, cfg.category_window)
    if cfg.crop_weight > 0 and cfg.crop_count > 0:
        loss = loss + cfg.crop_weight * crop_loss(model, x, cfg.crop_count, cfg.crop_len)
    return loss


def crops(x: dict[str, torch.Tensor], rows: torch.Tensor, ends: torch.Tensor, keep: torch.Tensor, width: int):
    """The `keep[i]` events before column `ends[i]` of row `rows[i]` of the encoded windows `x`, encoded as histories
    of their own, left-padded to `width` columns: what `encode_batch` gives for those events alone (the first one
    opens the history, time-gap bucket 1; sessions counted back from the newest; tests/test_coldstart.py)."""
    cols = ends.unsqueeze(1) - width + torch.arange(width, device=ends.device)  # the `width` columns before the end
    kept = (cols >= (ends - keep).unsqueeze(1)) & (cols >= 0)
    out = {name: v[rows.unsqueeze(1), cols.clamp(min=0)] for name, v in x.items()}
    kept &= out["item_ids"] != PAD
    out = {name: v.masked_fill(~kept, 0) for name, v in out.items()}
    first = kept & ~F.pad(kept[:, :-1], (1, 0), value=False)
    out["time_gaps"] = out["time_gaps"].masked_fill(first, 1)
    newest = out["session_pos"][:, -1:]
    out["session_pos"] = (out["session_pos"] - newest).clamp(min=0).masked_fill(~kept, 0)
    return out


def crop_loss(model: InterestTransformer, x: dict[str, torch.Tensor], count: int, max_len: int) -> torch.Tensor:
    """Next-item cross-entropy of `count` short histories: for a random target event of the batch (one with an
    event before it), its 1..`max_len` preceding events (uniform) as a history of their own, read out where serving
    reads: the newest event in the last column."""
    items = x["item_ids"]
    candidates = ((items > 1) & F.pad(items[:, :-1] != PAD, (1, 0), value=False)).nonzero()  # [N, 2]: row, column
    if len(candidates) == 0:
        return items.new_zeros((), dtype=torch.float32)
    rows, ends = candidates[torch.randint(len(candidates), (count,), device=items.device)].unbind(1)
    keep = torch.randint(1, max_len + 1, (count,), device=items.device)
    h = model.sequence_interests(**crops(x, rows, ends, keep, max_len))[:, -1]
    return F.cross_entropy(model.item_logits(h) + model.item_mask, items[rows, ends])


def scenario_targets(
    scenarios: torch.Tensor, items: torch.Tensor, n_scenarios: int, p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asking about a scenario: with probability `p` position t is asked about a random known scenario s and must
    predict the user's next event *in s* (later than t, within the window); otherwise, or when there is none, it
    is asked about any scenario (0) and predicts the next event. Returns (ask [B, L] for the positions, targets
    [B, L] aligned like `items`: column t + 1 holds position t's target; column 0 is the cold start's)."""
    B, L = items.shape
    pos = torch.arange(L, device=items.device).expand(B, L)
    pick = torch.randint(2, 2 + n_scenarios, (B, L), device=items.device)
    after = torch.full_like(items, L)  # the first index j > t whose scenario is pick[t]
    for s in range(2, 2 + n_scenarios):
        at_or_after = torch.where(scenarios == s, pos, L).flip(1).cummin(1).values.flip(1)
        after = torch.where(pick == s, F.pad(at_or_after[:, 1:], (0, 1), value=L), after)
    asked = (torch.rand(B, L, device=items.device) < p) & (after < L) & (items != PAD)
    j = torch.where(asked, after, (pos + 1).clamp(max=L - 1))
    target = items.gather(1, j).masked_fill((pos == L - 1) & ~asked, PAD)
    return torch.where(asked, pick, 0), torch.cat([items[:, :1], target[:, :-1]], 1)


def future_loss(logits: torch.Tensor, items: torch.Tensor, valid: torch.Tensor, window: int) -> torch.Tensor:
    """Mean NLL of the items 2..`window` events after each target under the same softmax (the next session is
    several items, not one): `logits` [N, V] are the rows of the positions where `valid` [B, L] is set."""
    L = items.shape[1]
    ahead = torch.arange(L, device=items.device).unsqueeze(1) + torch.arange(1, window, device=items.device)
    fut = F.pad(items, (0, window))[:, ahead]  # [B, L, window - 1]: items t+1 .. t+window-1 (0 past the end)
    fut = fut[valid]
    keep = (fut > 1).float()
    logp = logits.log_softmax(-1).gather(1, fut)
    return -(logp.masked_fill(keep == 0, 0.0) * keep).sum() / keep.sum().clamp(min=1.0)


def category_loss(model: InterestTransformer, h: torch.Tensor, items: torch.Tensor, window: int) -> torch.Tensor:
    """BCE of the category head at position t against the share of items t+1..t+window carrying each genre."""
    known = (items > 1).float()
    n, c = known.cumsum(1), (model.item_categories[items] * known.unsqueeze(-1)).cumsum(1)
    ahead = (torch.arange(items.shape[1], device=items.device) + window).clamp(max=items.shape[1] - 1)
    future_n, future_c = n[:, ahead] - n, c[:, ahead] - c  # counts over t+1 .. t+window
    keep = (items != PAD) & (future_n > 0)
    if not keep.any():
        return h.sum() * 0.0
    target = future_c[keep] / future_n[keep].unsqueeze(-1)
    shares = model.history_genre_shares(items)
    return F.binary_cross_entropy_with_logits(model.category_logits(h[keep], shares[keep]), target)


def train(
    cfg: TrainConfig, ds: Dataset | None = None, sp: Split | None = None, out: Path | None = None, quiet: bool = False
) -> tuple[Checkpoint, dict]:
    """Train with early stopping; returns the best checkpoint (eval mode) and its history/metrics."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    seed_all(cfg.seed)
    device = pick_device(cfg.device)
    ds = ds or load(cfg.dataset)
    sp = sp or split(ds)
    enc = EncoderConfig(max_len=cfg.max_len, scenarios=tuple(ds.scenarios))
    flags = {k: getattr(cfg, k) for k in ("d_model", "n_layers", "n_heads", "dropout")}
    flags |= {k: getattr(cfg, k) for k in ("use_session_pos", "use_time_gaps", "use_fusion", "item_bias")}
    flags |= {"item_item_rank": min(cfg.item_item_rank, len(sp.train)), "category_history": cfg.category_history}
    flags |= {"category_share_mix": cfg.category_share_mix, "history_scorer": cfg.history_scorer}
    neighbours = min(cfg.ease_neighbours, len(ds.vocab)) if cfg.history_scorer == "ease" and cfg.item_item_rank else 0
    flags |= {"serve_len": cfg.serve_len, "ease_neighbours": neighbours}
    mcfg = ModelConfig.for_encoder(enc, len(ds.vocab), n_categories=len(ds.categories), **flags)
    model = InterestTransformer(mcfg).to(device)
    item_cats = torch.from_numpy(ds.item_categories).to(device) if ds.item_categories is not None else None
    if item_cats is not None:
        model.item_categories.copy_(item_cats)
    data = to_tensors(windows(sp.train, cfg.max_len), ds.vocab, enc, device)
    n = len(data["item_ids"])
    lengths = (data["item_ids"] != PAD).sum(1).cpu()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: dict[str, list[float]] = {"loss": [], "val_ndcg10": [], "seconds": [], "val_seconds": []}
    best, best_state, bad, t0 = -1.0, None, 0, time.monotonic()
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = math.ceil(n / cfg.batch_size)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
        disable=quiet,
    ) as bar:  # fmt: skip
        task = bar.add_task("train", total=cfg.max_epochs * steps, info="")
        for epoch in range(cfg.max_epochs):
            model.train()
            total = 0.0
            for idx in batches(lengths, cfg.batch_size, gen):
                width = int(lengths[idx].max())  # left-padded: drop the all-padding columns
                batch = {k: v[idx.to(device), -width:] for k, v in data.items()}
                loss = loss_fn(model, batch, cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                total += loss.item() * len(idx)
                bar.advance(task)
            t_val = time.monotonic()
            val = next_item_metrics(score(model, sp.val_inputs, ds.vocab, enc), sp.val_targets, 10)["ndcg10"]
            history["loss"].append(total / n)
            history["val_ndcg10"].append(val)
            history["seconds"].append(round(time.monotonic() - t0, 1))
            history["val_seconds"].append(round(time.monotonic() - t_val, 1))
            bar.update(
                task, info=f"epoch {epoch} loss {total / n:.3f} val ndcg@10 {val:.4f} (best {max(best, val):.4f})"
            )
            if val > best:
                best, bad = val, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
            if bad >= cfg.patience or time.monotonic() - t0 > cfg.max_minutes * 60:
                break
    model.load_state_dict(best_state)
    model.eval()
    scorer = fit_item_item(model, ds, sp, enc) if cfg.item_item_rank > 0 else {}
    if scorer:  # short histories: more weight on the item-item evidence, picked on validation (models.coldstart)
        scorer["short_weight"] = fit_short_weight(model, ds, sp, enc)["short_weight"]
    metrics = evaluate_model(model, ds, sp, enc)
    alone = {}
    if cfg.item_item_rank > 0:  # the ablation without the item-item scorer, from the same weights
        w, short = model.item_item_weight.item(), model.item_item_short_weight.item()
        model.item_item_weight.fill_(0.0)
        model.item_item_short_weight.fill_(0.0)
        alone = {"test_metrics_alone": evaluate_model(model, ds, sp, enc)}
        model.item_item_weight.fill_(w)
        model.item_item_short_weight.fill_(short)
    meta = {
        "dataset": ds.name,
        "data_hash": ds.data_hash,
        "train_config": asdict(cfg),
        "epochs": len(history["loss"]),
        "best_val_ndcg10": best,
        "item_item": scorer,
        "train_seconds": round(time.monotonic() - t0, 1),
        "device": str(device),
        "test_metrics": metrics,
        **alone,
        "torch_version": str(torch.__version__),
    }
    ckpt = Checkpoint(model, mcfg, enc, ds.vocab, ds.categories, item_cats, meta)
    if out is not None:
        save(ckpt, Path(out), history)
    return ckpt, history


ITEM_ITEM_DECAYS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
ITEM_ITEM_WEIGHTS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
EASE_LAMBDAS = (100.0, 300.0, 1000.0)


@torch.no_grad()
def fill_item_item(model: InterestTransformer, histories: list[UserState], vocab: Vocabulary, lam: float) -> None:
    """The in-graph item-item scorer's buffers from `histories` (kNN factors, or EASE's with regularization `lam`
    and, when served sparse, its top-N neighbour rows); decay and weight are left as they are. Also how the
    continuous learner (models.learn) refits EASE on the stream with the lambda picked at training."""
    from models.baselines import ease_factors, ease_neighbours, knn_factors

    if model.cfg.history_scorer != "ease":
        model.item_item_factors.copy_(torch.from_numpy(knn_factors(histories, vocab, model.cfg.item_item_rank)))
        return
    factors = ease_factors(histories, vocab, lam, model.cfg.item_item_rank)
    for buf, v in zip(("item_item_factors", "ease_out", "ease_self"), factors, strict=True):
        getattr(model, buf).copy_(torch.from_numpy(v))
    if n := model.cfg.ease_neighbours:  # what is served: validation grids score with these
        cols, weights = ease_neighbours(*factors, n)
        model.neighbour_items.copy_(torch.from_numpy(cols))
        model.neighbour_weights.copy_(torch.from_numpy(weights))


@torch.no_grad()
def fit_item_item(model: InterestTransformer, ds: Dataset, sp: Split, enc: EncoderConfig) -> dict[str, float]:
    """Fill the in-graph item-item scorer from the training histories (kNN similarity factors, or EASE's for each
    of EASE_LAMBDAS), then pick its recency decay, mixing weight (and EASE's lambda) by grid search on the
    VALIDATION targets (NDCG@10). Weight 0 = the Transformer alone."""
    device = next(model.parameters()).device
    x = to_tensors(sp.val_inputs, ds.vocab, enc, device)
    seen = torch.from_numpy(seen_mask(sp.val_inputs, ds.vocab)).to(device)
    base = model.item_logits(model(**x)).masked_fill(seen, float("-inf"))
    ease = model.cfg.history_scorer == "ease"
    best = (-1.0, 0.0, 1.0, 0.0)
    for lam in EASE_LAMBDAS if ease else (0.0,):
        fill_item_item(model, sp.train, ds.vocab, lam)
        for decay in ITEM_ITEM_DECAYS:
            model.item_item_decay.fill_(decay)
            evidence = model.item_item_scores(x["item_ids"])
            for w in ITEM_ITEM_WEIGHTS:
                v = next_item_metrics((base + w * evidence).cpu().numpy(), sp.val_targets, 10)["ndcg10"]
                best = max(best, (v, w, decay, lam))
    if ease:  # the last lambda tried is not necessarily the best; kNN factors do not depend on it
        fill_item_item(model, sp.train, ds.vocab, best[3])
    model.item_item_weight.fill_(best[1])
    model.item_item_decay.fill_(best[2])
    return {"val_ndcg10": best[0], "weight": best[1], "decay": best[2]} | ({"lam": best[3]} if ease else {})


def refit(path: str | Path, out: str | Path, ds: Dataset | None = None, **model_flags) -> Checkpoint:
    """A trained checkpoint with other serving flags (`ModelConfig` fields such as serve_len, ease_neighbours):
    the same Transformer weights, the item-item scorer fitted again on validation for them, test metrics again."""
    import dataclasses

    ckpt = load_checkpoint(path)
    mcfg = dataclasses.replace(ckpt.model_config, **model_flags)
    model = InterestTransformer(mcfg)
    weights = {k: v for k, v in ckpt.model.state_dict().items() if not k.startswith("neighbour_")}
    model.load_state_dict(weights, strict=False)  # the neighbour rows: filled by fit_item_item
    model.eval()
    ds = ds or load(ckpt.metadata.get("train_config", {}).get("dataset", "movielens"))
    sp = split(ds)
    scorer = fit_item_item(model, ds, sp, ckpt.encoder_config) if mcfg.item_item_rank > 0 else {}
    if scorer:
        scorer["short_weight"] = fit_short_weight(model, ds, sp, ckpt.encoder_config)["short_weight"]
    meta = ckpt.metadata | {"item_item": scorer, "test_metrics": evaluate_model(model, ds, sp, ckpt.encoder_config)}
    scores = lambda states: score(model, states, ds.vocab, ckpt.encoder_config)  # noqa: E731
    meta["test_by_length"] = ndcg_by_length(scores, sp.test_inputs, sp.test_targets)
    meta["refit_from"], meta["model_version"] = str(path), None
    new = Checkpoint(model, mcfg, ckpt.encoder_config, ckpt.vocab, ckpt.categories, ckpt.item_categories, meta)
    save(new, Path(out), {"loss": [], "val_ndcg10": []})
    return new
