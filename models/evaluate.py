"""`interest-stream eval`: both protocols on real MovieLens, baselines and ablations in one harness.

Protocols (split in `models.data.split`, metrics in `models.ranking`; all items ranked, seen items filtered):
(i) next item: input = all events but the last; NDCG@10, Recall@10, MRR over all users.
(ii) next session: input = all sessions but the last (users with >= 2 sessions); the last session's items are the
     targets; Recall@20 (hits / min(20, |session|)) and NDCG@20.
Neural variants are trained per seed with early stopping on the validation event; baselines are deterministic.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from models.baselines import Ease, ItemKNN, KnnPopularity, Popularity, genre_baselines
from models.coldstart import LENGTHS, bucket_name, ndcg_by_length
from models.data import Dataset, Split, load, session_validation, split
from models.ranking import (
    category_ndcg,
    category_overlap,
    category_relevance,
    next_item_metrics,
    next_session_metrics,
    seen_mask,
)

#: Our model and its ablations, as TrainConfig overrides. SASRec = the same Transformer with everything of ours off
#: (session bias, time gaps, item bias, in-graph kNN, history genre shares): the published recipe, same training.
VARIANTS: dict[str, dict] = {
    "model": {},
    "sasrec": {
        "use_session_pos": False, "use_time_gaps": False, "use_fusion": False, "item_bias": False, "item_item_rank": 0,
        "category_history": False, "serve_len": 0,  # the published recipe reads all 200 events
    },
    # SASRec's Transformer with the in-graph item-kNN scorer (the model's until EASE replaced it, docs/model.md)
    "sasrec_knn": {
        "use_session_pos": False, "use_time_gaps": False, "use_fusion": False, "item_bias": False,
        "category_history": False, "history_scorer": "knn",
    },
    "sasrec_ease": {  # the same with the model's EASE scorer: what the session/time/bias features add to it
        "use_session_pos": False, "use_time_gaps": False, "use_fusion": False, "item_bias": False,
        "category_history": False,
    },
    "knn_scorer": {"history_scorer": "knn"},  # the model with the item-kNN scorer it served before EASE
    "no_session_pos": {"use_session_pos": False},
    "no_time_gaps": {"use_time_gaps": False},
    "with_fusion": {"use_fusion": True},  # fusion is off by default, so its ablation adds it
}  # fmt: skip
#: What `interest-stream eval` trains by default: our model, the SASRec baseline and SASRec + EASE, 3 seeds each
#: (about an hour on 2 cores); the other ablations run with `--variant` (their last numbers: docs/model.md).
DEFAULT_VARIANTS = ("model", "sasrec", "sasrec_ease")
#: Rows derived without training: a variant's own runs scored with the item-item weight set to 0 (sasrec_ease's is
#: the sasrec row itself: same Transformer, the item-item scorer is fitted after training).
ALONE = {"model": "transformer_only"}
#: The RESULT line's best baseline is the best of these, per metric.
BASELINES = ("popularity", "item_knn", "ease", "knn_popularity", "sasrec")
CATEGORY_BASELINES = ("history_genres", "global_genres")
METRICS = ("ndcg10", "recall10", "mrr", "ns_recall20", "ns_ndcg20", "cat_ndcg5", "cat_overlap3")
ITEM_ITEM_DECAYS = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)
EASE_LAMBDAS = (30.0, 100.0, 300.0, 1000.0)
POPULARITY_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)


def _filtered(model, ds: Dataset):
    """A baseline's scores with the seen items at -inf, as a function of the input states."""

    def filtered(states):
        s = model.scores(states, ds.vocab)
        s[seen_mask(states, ds.vocab)] = -np.inf
        return s

    return filtered


def baseline_metrics(model, ds: Dataset, sp: Split) -> dict[str, float]:
    filtered = _filtered(model, ds)
    m = next_item_metrics(filtered(sp.test_inputs), sp.test_targets, 10)
    ns = next_session_metrics(filtered(sp.ns_inputs), sp.ns_targets, 20)
    return {**m, "ns_recall20": ns["recall20"], "ns_ndcg20": ns["ndcg20"]}


def baseline_by_length(model, ds: Dataset, sp: Split) -> dict[str, float]:
    """NDCG@10 per history length (models.coldstart) for a baseline."""
    return ndcg_by_length(_filtered(model, ds), sp.test_inputs, sp.test_targets)


def run_baselines(ds: Dataset, sp: Split) -> dict[str, dict]:
    pop = Popularity(sp.train, ds.vocab)
    out = {"popularity": {"metrics": baseline_metrics(pop, ds, sp), "by_length": baseline_by_length(pop, ds, sp)}}
    best = max(ITEM_ITEM_DECAYS, key=lambda d: _val_ndcg(ItemKNN(sp.train, ds.vocab, d), ds, sp))  # tuned on validation
    knn = ItemKNN(sp.train, ds.vocab, best)
    out["item_knn"] = {"metrics": baseline_metrics(knn, ds, sp), "decay": best}
    out["item_knn"]["by_length"] = baseline_by_length(knn, ds, sp)
    lam, decay = tune_ease(ds, sp)
    ease = Ease(sp.train, ds.vocab, lam, decay)
    out["ease"] = {"metrics": baseline_metrics(ease, ds, sp), "lam": lam, "decay": decay}
    out["ease"]["by_length"] = baseline_by_length(ease, ds, sp)
    decay, weight = tune_knn_popularity(ds)
    hybrid = KnnPopularity(sp.train, ds.vocab, decay, weight)
    out["knn_popularity"] = {"metrics": baseline_metrics(hybrid, ds, sp), "decay": decay, "weight": weight}
    out["knn_popularity"]["by_length"] = baseline_by_length(hybrid, ds, sp)
    rel = category_relevance(ds.item_categories, sp.ns_targets)
    for name, scores in genre_baselines(sp.train, sp.ns_inputs, ds.vocab, ds.item_categories).items():
        out[name] = {"metrics": {"cat_ndcg5": category_ndcg(scores, rel, 5), "cat_overlap3": category_overlap(scores)}}
    return out


def tune_ease(ds: Dataset, sp: Split) -> tuple[float, float]:
    """EASE's regularization and history recency decay by validation NDCG@10 (as item-kNN's decay)."""
    ndcg = {}
    for lam in EASE_LAMBDAS:
        ease = Ease(sp.train, ds.vocab, lam)  # the solve once per lam; the decay only weights the history
        for decay in ITEM_ITEM_DECAYS:
            ease.decay = decay
            ndcg[lam, decay] = _val_ndcg(ease, ds, sp)
    return max(ndcg, key=ndcg.get)


def tune_knn_popularity(ds: Dataset) -> tuple[float, float]:
    """The hybrid's recency decay and popularity weight by next-session Recall@20 on the held-out penultimate
    sessions (`models.data.session_validation`): fitted on histories that stop before them."""
    val = session_validation(ds)
    seen = seen_mask(val.inputs, ds.vocab)
    recall = {}
    for decay in ITEM_ITEM_DECAYS:
        hybrid = KnnPopularity(val.train, ds.vocab, decay, weight=0.0)
        knn = hybrid.scores(val.inputs, ds.vocab)  # the kNN part once per decay; the weights only add popularity
        for weight in POPULARITY_WEIGHTS:
            s = np.where(seen, -np.inf, knn + weight * hybrid.popularity)
            recall[decay, weight] = next_session_metrics(s, val.targets, 20)["recall20"]
    return max(recall, key=recall.get)


def model_scorer(ckpt):
    """A checkpoint's filtered next-item scores as a function of the input states (as `_filtered` for baselines)."""
    from models.train import score

    return lambda states: score(ckpt.model, states, ckpt.vocab, ckpt.encoder_config)


def _val_ndcg(model, ds: Dataset, sp: Split) -> float:
    s = model.scores(sp.val_inputs, ds.vocab)
    s[seen_mask(sp.val_inputs, ds.vocab)] = -np.inf
    return next_item_metrics(s, sp.val_targets, 10)["ndcg10"]


def run(
    seeds: int = 3,
    max_epochs: int = 40,
    max_minutes: float = 8.0,
    variants: tuple[str, ...] = DEFAULT_VARIANTS,
    out: Path = Path("artifacts/eval"),
    report: Path = Path("docs/model-results.md"),
    log=print,
) -> dict:
    from models.train import TrainConfig, train

    out.mkdir(parents=True, exist_ok=True)
    ds = load("movielens")
    sp = split(ds)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if not all("by_length" in results.get("baselines", {}).get(b, {}) for b in ("popularity", "ease")):
        results["baselines"] = run_baselines(ds, sp)  # results of before the length buckets: recomputed
    runs = results.setdefault("runs", {})
    base = TrainConfig(max_epochs=max_epochs, max_minutes=max_minutes)
    for seed in range(seeds):
        for name in variants:
            key = f"{name}/{seed}"
            if key in runs:  # resumable: finished runs are kept
                continue
            t0 = time.monotonic()
            cfg = replace(base, seed=seed, **VARIANTS[name])
            ckpt, _ = train(cfg, ds, sp, out=out / f"{name}-{seed}", quiet=True)  # kept for post-hoc analyses
            meta = ckpt.metadata
            runs[key] = {"metrics": meta["test_metrics"], "epochs": meta["epochs"], "item_item": meta.get("item_item")}
            if "test_metrics_alone" in meta:
                runs[key]["alone"] = meta["test_metrics_alone"]
            runs[key]["by_length"] = ndcg_by_length(model_scorer(ckpt), sp.test_inputs, sp.test_targets)
            runs[key]["seconds"] = round(time.monotonic() - t0, 1)
            results_path.write_text(json.dumps(results, indent=2))
            log(f"{key}: {json.dumps(runs[key])}")
    results["meta"] = {"data_hash": ds.data_hash, "users": len(sp.test_inputs), "ns_users": len(sp.ns_inputs)}
    results["meta"] |= {"train_config": {**base.__dict__, "seed": list(range(seeds))}, "n_items": len(ds.vocab) - 2}
    results_path.write_text(json.dumps(results, indent=2))
    summary, lengths = summarize(results, variants), length_summary(results, variants)
    write_report(summary, results, report, lengths)
    if "model" in lengths:
        log(length_result_line(lengths))
    return summary


def _mean_std(rows: list[dict]) -> dict[str, tuple[float, float]]:
    out = {
        m: (float(np.mean([r[m] for r in rows])), float(np.std([r[m] for r in rows]))) for m in METRICS if m in rows[0]
    }
    return out | {"n": (len(rows), 0.0)}


def summarize(results: dict, variants) -> dict[str, dict[str, tuple[float, float]]]:
    """name -> metric -> (mean, std over seeds; std 0 for deterministic baselines)."""
    summary = {name: {m: (v, 0.0) for m, v in b["metrics"].items()} for name, b in results["baselines"].items()}
    for name in variants:
        runs = [r for k, r in results["runs"].items() if k.split("/")[0] == name]
        if runs:
            summary[name] = _mean_std([r["metrics"] for r in runs])
            if name in ALONE and all("alone" in r for r in runs):
                summary[ALONE[name]] = _mean_std([r["alone"] for r in runs])
    return summary


#: The cold-start target compares the model with these, per history length (the issue names popularity and EASE).
LENGTH_BASELINES = ("popularity", "ease")


def length_summary(results: dict, variants) -> dict[str, dict[str, tuple[float, float]]]:
    """name -> history-length bucket -> (mean, std over seeds) of NDCG@10, for every row that has buckets."""
    out = {name: {k: (v, 0.0) for k, v in b["by_length"].items()} for name, b in results["baselines"].items()
           if "by_length" in b}  # fmt: skip
    for name in variants:
        runs = [r["by_length"] for k, r in results["runs"].items() if k.split("/")[0] == name and "by_length" in r]
        if runs:
            out[name] = {b: (float(np.mean([r[b] for r in runs])), float(np.std([r[b] for r in runs])))
                         for b in runs[0]}  # fmt: skip
    return out


def length_result_line(lengths: dict) -> str:
    """RESULT with the model's NDCG@10 and the best of LENGTH_BASELINES' at every history length."""
    parts = []
    for k in LENGTHS:
        b = bucket_name(k)
        best = max(LENGTH_BASELINES, key=lambda n: lengths[n][b][0])
        key = b.replace("+", "plus")
        parts += [f"ndcg10_len{key}={lengths['model'][b][0]:.4f}", f"best_baseline_len{key}={lengths[best][b][0]:.4f}"]
    return "RESULT " + " ".join(parts)


def summary_lines(summary) -> list[str]:
    """One line per row of the report (every baseline and variant): mean ± std of each metric it has."""
    return [
        f"{name}: " + " ".join(f"{m}={v[0]:.4f}±{v[1]:.4f}" for m, v in row.items() if m in METRICS)
        for name, row in summary.items()
    ]


def best_of(summary, names, metric: str) -> tuple[str, float]:
    have = [n for n in names if n in summary and metric in summary[n]]
    name = max(have, key=lambda n: summary[n][metric][0])
    return name, summary[name][metric][0]


def result_line(summary) -> str:
    m = {k: v[0] for k, v in summary["model"].items()}
    ni, ni_v = best_of(summary, BASELINES, "ndcg10")
    ns, ns_v = best_of(summary, BASELINES, "ns_recall20")
    line = (
        f"RESULT ndcg10={m['ndcg10']:.4f} best_baseline={ni} best_baseline_ndcg10={ni_v:.4f} "
        f"recall20_next_session={m['ns_recall20']:.4f} best_baseline_next_session={ns} "
        f"best_baseline_recall20_next_session={ns_v:.4f}"
    )
    if "cat_ndcg5" in m:
        cat, cat_v = best_of(summary, CATEGORY_BASELINES, "cat_ndcg5")
        line += f" genre_ndcg5={m['cat_ndcg5']:.4f} best_genre_baseline={cat} best_genre_baseline_ndcg5={cat_v:.4f}"
    return line


def length_table(lengths: dict) -> list[str]:
    """The cold-start section of the report: NDCG@10 by history length, one row per scorer."""
    buckets = [bucket_name(k) for k in LENGTHS]
    lines = [
        "## Cold start: next-item NDCG@10 by history length",
        "",
        "Each test user's input cut to its newest k events (the target unchanged, the seen filter over those k "
        "only); `20+` = the full input of users with at least 20 events before the target (models/coldstart.py).",
        "",
        "| variant | " + " | ".join(f"{b} events" for b in buckets) + " |",
        "|---|" + "---|" * len(buckets),
    ]
    for name, row in lengths.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[b][0]:.4f} ± {row[b][1]:.4f}" for b in buckets) + " |")
    return lines


def write_report(summary, results: dict, report: Path, lengths: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report.parent.mkdir(parents=True, exist_ok=True)
    names = list(summary)
    cfg = results["meta"]["train_config"]
    lines = [
        "# Evaluation results (generated by `interest-stream eval`)",
        "",
        f"MovieLens ml-latest-small (data hash `{results['meta']['data_hash']}`), {results['meta']['users']} users "
        f"for next item, {results['meta']['ns_users']} for next session, {results['meta']['n_items']} items ranked "
        "(all of them, seen items filtered). Neural rows: mean ± std over seeds "
        f"({len(cfg['seed'])} seeds, at most {cfg['max_epochs']} epochs or {cfg['max_minutes']:g} minutes each, early "
        "stopping on validation); "
        "baselines are deterministic. `transformer_only` = the `model` runs scored with the item-item scorer's weight "
        "set to 0. `ease` = EASE (Steck 2019) on recency-weighted histories, regularization and decay tuned on "
        "validation. `knn_popularity` = item-kNN + popularity, both scaled to [0, 1], decay and weight tuned on "
        "held-out penultimate sessions (a next-session baseline). Genre NDCG@5: category scores against the genre "
        "shares of the next session. Genre overlap: mean Jaccard overlap of two users' top 3 genres (1 = everyone "
        "gets the same; lower = more personal; the users' true next sessions: about 0.31). See docs/model.md.",
        "",
        "| variant | NDCG@10 | Recall@10 | MRR | next-session Recall@20 | next-session NDCG@20 | genre NDCG@5 "
        "| genre overlap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        cells = [
            f"{summary[name][m][0]:.4f} ± {summary[name][m][1]:.4f}" if m in summary[name] else "—" for m in METRICS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    runs = [f"{k} {r['epochs']} epochs / {r['seconds']:.0f} s" for k, r in results["runs"].items()]
    timing = "2 CPU cores; time includes fitting the item-item scorer and testing"
    lines += ["", f"Training runs ({timing}): {'; '.join(runs)}."]
    if "model" in summary:
        m = {k: v[0] for k, v in summary["model"].items()}
        ni, ni_v = best_of(summary, BASELINES, "ndcg10")
        ns, ns_v = best_of(summary, BASELINES, "ns_recall20")
        ratios = [
            f"NDCG@10 model / best baseline ({ni}) = {m['ndcg10'] / ni_v:.3f} (target ≥ 1.05)",
            f"next-session Recall@20 model / best baseline ({ns}) = {m['ns_recall20'] / ns_v:.3f} (target ≥ 1.10)",
        ]
        if "cat_ndcg5" in m:
            cat, cat_v = best_of(summary, CATEGORY_BASELINES, "cat_ndcg5")
            ratios.append(f"genre NDCG@5 model / best ({cat}) = {m['cat_ndcg5'] / cat_v:.3f} (target ≥ 1.2)")
        if "sasrec" in summary:
            ratios.append(f"NDCG@10 model / SASRec = {m['ndcg10'] / summary['sasrec']['ndcg10'][0]:.2f}")
        lines += ["", "Ratios: " + "; ".join(ratios) + ".", "", "Closing note, the RESULT line of this run:", ""]
        lines += ["    " + result_line(summary)]
    if lengths and "model" in lengths:
        lines += ["", *length_table(lengths), "", "    " + length_result_line(lengths)]
    lines += ["", f"![results]({report.with_suffix('.png').name})", ""]
    report.write_text("\n".join(lines))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, metric, title in zip(
        axes,
        ("ndcg10", "ns_recall20", "cat_ndcg5"),
        ("next item NDCG@10", "next session Recall@20", "next-session genres NDCG@5"),
        strict=True,
    ):
        shown = [n for n in names if metric in summary[n]]
        means = [summary[n][metric][0] for n in shown]
        stds = [summary[n][metric][1] for n in shown]
        ax.bar(
            shown,
            means,
            yerr=stds,
            color=["tab:gray" if n in results["baselines"] or n in BASELINES else "tab:blue" for n in shown],
        )
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=35)
    fig.tight_layout()
    fig.savefig(report.with_suffix(".png"), dpi=110)
    plt.close(fig)
