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

from models.baselines import ItemKNN, Popularity
from models.data import Dataset, Split, load, split
from models.ranking import next_item_metrics, next_session_metrics, seen_mask

#: Our model and its ablations, as TrainConfig flag overrides. SASRec = the same Transformer, features off.
VARIANTS: dict[str, dict[str, bool]] = {
    "model": {},
    "sasrec": {"use_session_pos": False, "use_time_gaps": False, "use_fusion": False},
    "no_session_pos": {"use_session_pos": False},
    "no_time_gaps": {"use_time_gaps": False},
    "with_fusion": {"use_fusion": True},  # fusion is off by default, so its ablation adds it
}
METRICS = ("ndcg10", "recall10", "mrr", "ns_recall20", "ns_ndcg20")
KNN_DECAYS = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)


def baseline_metrics(model, ds: Dataset, sp: Split) -> dict[str, float]:
    def filtered(states):
        s = model.scores(states, ds.vocab)
        s[seen_mask(states, ds.vocab)] = -np.inf
        return s

    m = next_item_metrics(filtered(sp.test_inputs), sp.test_targets, 10)
    ns = next_session_metrics(filtered(sp.ns_inputs), sp.ns_targets, 20)
    return {**m, "ns_recall20": ns["recall20"], "ns_ndcg20": ns["ndcg20"]}


def run_baselines(ds: Dataset, sp: Split) -> dict[str, dict]:
    out = {"popularity": {"metrics": baseline_metrics(Popularity(sp.train, ds.vocab), ds, sp)}}
    best = max(KNN_DECAYS, key=lambda d: _val_ndcg(ItemKNN(sp.train, ds.vocab, d), ds, sp))  # tuned on validation
    out["item_knn"] = {"metrics": baseline_metrics(ItemKNN(sp.train, ds.vocab, best), ds, sp), "decay": best}
    return out


def _val_ndcg(model, ds: Dataset, sp: Split) -> float:
    s = model.scores(sp.val_inputs, ds.vocab)
    s[seen_mask(sp.val_inputs, ds.vocab)] = -np.inf
    return next_item_metrics(s, sp.val_targets, 10)["ndcg10"]


def run(
    seeds: int = 3,
    max_epochs: int = 25,
    max_minutes: float = 3.0,
    variants: tuple[str, ...] = tuple(VARIANTS),
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
    results.setdefault("baselines", run_baselines(ds, sp))
    runs = results.setdefault("runs", {})
    base = TrainConfig(max_epochs=max_epochs, max_minutes=max_minutes)
    for seed in range(seeds):
        for name in variants:
            key = f"{name}/{seed}"
            if key in runs:  # resumable: finished runs are kept
                continue
            t0 = time.monotonic()
            ckpt, _ = train(replace(base, seed=seed, **VARIANTS[name]), ds, sp, quiet=True)
            runs[key] = {"metrics": ckpt.metadata["test_metrics"], "epochs": ckpt.metadata["epochs"]}
            runs[key]["seconds"] = round(time.monotonic() - t0, 1)
            results_path.write_text(json.dumps(results, indent=2))
            log(f"{key}: {json.dumps(runs[key])}")
    results["meta"] = {"data_hash": ds.data_hash, "users": len(sp.test_inputs), "ns_users": len(sp.ns_inputs)}
    results["meta"] |= {"train_config": {**base.__dict__, "seed": list(range(seeds))}, "n_items": len(ds.vocab) - 2}
    results_path.write_text(json.dumps(results, indent=2))
    summary = summarize(results, variants)
    write_report(summary, results, report)
    return summary


def summarize(results: dict, variants) -> dict[str, dict[str, tuple[float, float]]]:
    """name -> metric -> (mean, std over seeds; std 0 for deterministic baselines)."""
    summary = {name: {m: (v, 0.0) for m, v in b["metrics"].items()} for name, b in results["baselines"].items()}
    for name in variants:
        rows = [r["metrics"] for k, r in results["runs"].items() if k.split("/")[0] == name]
        if rows:
            summary[name] = {
                m: (float(np.mean([r[m] for r in rows])), float(np.std([r[m] for r in rows]))) for m in METRICS
            }
            summary[name]["n"] = (len(rows), 0.0)
    return summary


def result_line(summary) -> str:
    s = {k: {m: v[0] for m, v in d.items()} for k, d in summary.items()}
    return (
        f"RESULT ndcg10={s['model']['ndcg10']:.4f} sasrec_ndcg10={s['sasrec']['ndcg10']:.4f} "
        f"pop_ndcg10={s['popularity']['ndcg10']:.4f} recall20_next_session={s['model']['ns_recall20']:.4f} "
        f"sasrec_recall20_next_session={s['sasrec']['ns_recall20']:.4f}"
    )


def write_report(summary, results: dict, report: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report.parent.mkdir(parents=True, exist_ok=True)
    names = list(summary)
    lines = [
        "# Evaluation results (generated by `interest-stream eval`)",
        "",
        f"MovieLens ml-latest-small (data hash `{results['meta']['data_hash']}`), {results['meta']['users']} users "
        f"for next item, {results['meta']['ns_users']} for next session, {results['meta']['n_items']} items ranked. "
        "Neural rows: mean ± std over seeds; baselines are deterministic. See docs/model.md for the protocols.",
        "",
        "| variant | NDCG@10 | Recall@10 | MRR | next-session Recall@20 | next-session NDCG@20 |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        cells = [f"{summary[name][m][0]:.4f} ± {summary[name][m][1]:.4f}" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    s = {k: {m: v[0] for m, v in d.items()} for k, d in summary.items()}
    if "model" in s and "sasrec" in s:
        lines += [
            "",
            f"Ratios: NDCG@10 model/SASRec = {s['model']['ndcg10'] / s['sasrec']['ndcg10']:.3f} (target ≥ 1.05), "
            f"model/popularity = {s['model']['ndcg10'] / s['popularity']['ndcg10']:.2f} (target ≥ 2); "
            f"next-session Recall@20 model/SASRec = {s['model']['ns_recall20'] / s['sasrec']['ns_recall20']:.3f} "
            "(target ≥ 1.10).",
            "",
            result_line(summary),
        ]
    lines += ["", f"![results]({report.with_suffix('.png').name})", ""]
    report.write_text("\n".join(lines))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, title in zip(
        axes, ("ndcg10", "ns_recall20"), ("next item NDCG@10", "next session Recall@20"), strict=True
    ):
        means = [summary[n][metric][0] for n in names]
        stds = [summary[n][metric][1] for n in names]
        ax.bar(names, means, yerr=stds, color=["tab:gray" if n in results["baselines"] else "tab:blue" for n in names])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=35)
    fig.tight_layout()
    fig.savefig(report.with_suffix(".png"), dpi=110)
    plt.close(fig)
