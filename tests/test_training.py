"""Data split, ranking metrics, baselines and a few training steps on a real MovieLens subset (CPU, seconds)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from core.encoding import OOV, PAD, encode_batch
from core.sessions import fingerprint, state_from_events
from models.baselines import Ease, ItemKNN, KnnPopularity, Popularity, interactions, recency_weighted
from models.data import HISTORY, load_movielens, load_otto, prefix, session_validation, split
from models.datasets import by_user, otto_events
from models.ranking import (
    category_ndcg,
    category_overlap,
    category_relevance,
    next_item_metrics,
    next_session_metrics,
    seen_mask,
)


@pytest.fixture(scope="module")
def movielens():
    return load_movielens()


def test_split_holds_out_unseen_targets(movielens):
    ds = movielens
    sp = split(ds)
    assert len(sp.test_inputs) == len(ds.states) == 610 and len(sp.ns_inputs) > 250
    assert len(ds.categories) >= 19 and ds.item_categories.shape == (len(ds.vocab), len(ds.categories))
    by_first = {s.ts[0]: s for s in ds.states}
    for tr, val_in, t in zip(sp.train[:100], sp.val_inputs, sp.val_targets, strict=False):
        full = by_first[tr.ts[0]]
        assert tr.items == val_in.items and ds.vocab.index(full.items[len(tr)]) == t  # next event is the target
    for inp, targets in zip(sp.ns_inputs, sp.ns_targets, strict=True):
        full = by_first[inp.ts[0]]
        assert len(inp) == full.starts[-1] and len(targets) > 0  # the input stops where the last session starts
    assert split(ds).test_targets.tolist() == sp.test_targets.tolist()  # deterministic


def test_session_validation_holds_out_the_penultimate_session(movielens):
    """Nothing fitted on `val.train` has seen a target session, and none of the test part is in it."""
    ds = movielens
    val, sp = session_validation(ds), split(ds)
    assert len(val.inputs) == len(val.targets) > 150 and len(val.train) == len(sp.train)
    by_first = {s.ts[0]: s for s in ds.states}
    fitted = {s.ts[0]: s for s in val.train}
    for inp, targets in zip(val.inputs, val.targets, strict=True):
        full = by_first[inp.ts[0]]
        assert len(inp) == full.starts[-2] and len(fitted[inp.ts[0]]) == len(inp)  # stops where it starts
        want = np.unique(ds.vocab.indices(full.items[full.starts[-2] : full.starts[-1]]))
        assert targets.tolist() == want.tolist()
    for tr, full_tr in zip(val.train, sp.train, strict=True):
        assert len(tr) <= len(full_tr) and tr.items == full_tr.items[: len(tr)]  # never beyond `split`'s training


def test_prefix_equals_offline_sessionization():
    otto = load_otto()
    for (_, events), s in zip(sorted(by_user(otto_events())), otto.states, strict=True):
        ordered = sorted(events, key=lambda e: (e.timestamp, fingerprint(e)))  # the fold's order
        for n in (1, len(s) // 2, len(s)):
            want = state_from_events(ordered[:n], HISTORY)
            got = prefix(s, n)
            assert (got.ts, got.items, got.types, got.starts) == (want.ts, want.items, want.types, want.starts)


def test_ranking_metrics_by_hand():
    scores = np.array([[0, 0, 5.0, 4.0, 3.0, 2.0], [0, 0, 1.0, 1.0, 1.0, -np.inf]])
    scores[:, [PAD, OOV]] = -np.inf
    m = next_item_metrics(scores, np.array([3, 4]), k=2)
    # row 0: rank 1 -> ndcg 1/log2(3), hit; row 1: three-way tie -> rank 1 -> same
    assert m["ndcg2"] == pytest.approx(1 / np.log2(3)) and m["recall2"] == 1.0 and m["mrr"] == pytest.approx(0.5)
    assert next_item_metrics(scores, np.array([2, 5]), k=1)["recall1"] == 0.5  # a filtered target misses
    ns = next_session_metrics(scores[:1], [np.array([2, 5, 3])], k=2)
    assert ns["recall2"] == 1.0 and ns["ndcg2"] == pytest.approx(1.0)


def test_category_ndcg_by_hand():
    cats = np.array([[0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=np.float32)
    rel = category_relevance(cats, [np.array([2, 3]), np.array([0])])  # the second row has no genre: skipped
    assert rel[0].tolist() == [1.0, 0.5, 0.0]
    assert category_ndcg(np.array([[3.0, 2.0, 1.0], [0, 0, 0]]), rel, k=2) == pytest.approx(1.0)
    got = category_ndcg(np.array([[2.0, 3.0, 1.0], [0, 0, 0]]), rel, k=2)
    assert got == pytest.approx((0.5 + 1 / np.log2(3)) / (1 + 0.5 / np.log2(3)))


def test_category_overlap_by_hand():
    same = np.tile([3.0, 2.0, 1.0, 0.0], (3, 1))
    assert category_overlap(same, k=2) == 1.0  # everyone gets the same top 2 (a global ranking)
    assert category_overlap(np.array([[3.0, 2.0, 0, 0], [0, 0, 3.0, 2.0]]), k=2) == 0.0
    # pairs: {0,1}-{0,2}: 1/3; {0,1}-{0,1}: 1; {0,2}-{0,1}: 1/3 -> mean 5/9
    rows = np.array([[3.0, 2.0, 1.0, 0], [3.0, 1.0, 2.0, 0], [3.0, 2.0, 1.0, 0]])
    assert category_overlap(rows, k=2) == pytest.approx(5 / 9)


@pytest.mark.parametrize("scorer", ["knn", "ease"])
def test_in_graph_scorer_ranks_like_its_baseline(movielens, scorer):
    """With exact factors (rank >= training users), the model's in-graph evidence is ItemKNN's / Ease's score."""
    from core.encoding import EncoderConfig, Vocabulary
    from models.baselines import ease_factors, knn_factors
    from models.model import InterestTransformer, ModelConfig

    states = movielens.states[:12]
    vocab = Vocabulary(sorted({i for s in states for i in s.items}))
    enc = EncoderConfig(max_len=200)
    cfg = ModelConfig.for_encoder(enc, len(vocab), n_categories=2, item_item_rank=16, d_model=8, history_scorer=scorer)
    model = InterestTransformer(cfg).eval()
    with torch.no_grad():
        if scorer == "knn":
            model.item_item_factors.copy_(torch.from_numpy(knn_factors(states, vocab, 16)))
        else:
            for name, v in zip(
                ("item_item_factors", "ease_out", "ease_self"), ease_factors(states, vocab, 5.0, 16), strict=True
            ):
                getattr(model, name).copy_(torch.from_numpy(v))
        model.item_item_decay.fill_(0.9)
    inputs = [prefix(s, min(len(s), 150)) for s in states]  # within the window: the same events as ItemKNN sees
    x = torch.from_numpy(encode_batch(inputs, vocab, enc)["item_ids"])
    with torch.no_grad():
        got = model.item_item_scores(x).numpy()
    if scorer == "knn":
        want = ItemKNN(states, vocab, decay=0.9).scores(inputs, vocab)
    else:
        want = Ease(states, vocab, lam=5.0, decay=0.9).scores(inputs, vocab)
    unseen = ~seen_mask(inputs, vocab)
    for g, w, m in zip(got, want, unseen, strict=True):
        np.testing.assert_allclose(g[m] / g[m].max(), w[m] / w[m].max(), atol=1e-4)
    if scorer == "ease":  # seen items too: EASE's B has a zero diagonal, the graph the same cancellation
        np.testing.assert_allclose(
            got * np.abs(want).max(1, keepdims=True), want * np.abs(got).max(1, keepdims=True), atol=1e-4
        )


def test_ease_neighbours_are_the_largest_weights_of_each_row(movielens):
    """Sparse EASE: with every item as a neighbour the in-graph scores are the dense factors' scores; with N, each
    item keeps the N largest weights of its row of B."""
    from core.encoding import EncoderConfig, Vocabulary
    from models.baselines import ease_factors, ease_neighbours
    from models.model import InterestTransformer, ModelConfig

    states = movielens.states[:12]
    vocab = Vocabulary(sorted({i for s in states for i in s.items}))
    factors = ease_factors(states, vocab, 5.0, 16)
    models = []
    for n in (0, len(vocab)):
        cfg = ModelConfig.for_encoder(EncoderConfig(), len(vocab), n_categories=2, item_item_rank=16, d_model=8,
                                      history_scorer="ease", ease_neighbours=n)  # fmt: skip
        model = InterestTransformer(cfg).eval()
        with torch.no_grad():
            for name, v in zip(("item_item_factors", "ease_out", "ease_self"), factors, strict=True):
                getattr(model, name).copy_(torch.from_numpy(v))
            if n:
                cols, vals = ease_neighbours(*factors, n)
                model.neighbour_items.copy_(torch.from_numpy(cols))
                model.neighbour_weights.copy_(torch.from_numpy(vals))
            model.item_item_decay.fill_(0.9)
        models.append(model)
    x = torch.from_numpy(encode_batch(states, vocab, EncoderConfig())["item_ids"])
    with torch.no_grad():
        torch.testing.assert_close(models[1].item_item_scores(x), models[0].item_item_scores(x), atol=1e-5, rtol=1e-5)
    a, g, e = factors
    b = a @ g.T + np.diag(e)
    cols, vals = ease_neighbours(*factors, 5)
    np.testing.assert_allclose(np.sort(vals, 1), np.sort(b, 1)[:, -5:], atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(b, cols.astype(np.int64), 1), vals, atol=1e-6)


def test_baselines_rank_sensibly(movielens):
    ds = movielens
    sp = split(ds)
    pop = Popularity(sp.train, ds.vocab).scores(sp.test_inputs[:3], ds.vocab)
    assert pop.shape == (3, len(ds.vocab)) and pop[0].argmax() == 2  # the vocabulary is most-popular first
    knn = ItemKNN(sp.train, ds.vocab, decay=0.8).scores(sp.test_inputs[:3], ds.vocab)
    assert knn.shape == pop.shape and np.isfinite(knn).all()
    hybrid = KnnPopularity(sp.train, ds.vocab, decay=0.8, weight=0.5).scores(sp.test_inputs[:3], ds.vocab)
    unit = knn / knn.max(1, keepdims=True)
    np.testing.assert_allclose(hybrid, unit + 0.5 * pop / pop.max(), rtol=1e-5, atol=1e-6)  # the two scaled to [0, 1]
    mask = seen_mask(sp.test_inputs[:3], ds.vocab)
    assert mask[:, [PAD, OOV]].all() and mask[0].sum() == len(sp.test_inputs[0]) + 2


def test_an_unknown_item_scorer_is_refused() -> None:
    from models.model import ModelConfig

    with pytest.raises(ValueError, match="history_scorer"):
        ModelConfig(n_items=10, item_item_rank=4, history_scorer="cosine")


@pytest.mark.parametrize("n_items", [None, 20])  # all items (users < items), 20 + OOV (more users: the SVD reduction)
def test_ease_is_the_closed_form(movielens, n_items):
    """EASE's scores are h B with B = I - P diag(1/diag P), diag(B) = 0, P = (X^T X + lam I)^-1, with fewer users
    than items and with more (X reduced by its SVD first)."""
    from core.encoding import Vocabulary

    states = movielens.states[:30]
    items = sorted({i for s in states for i in s.items})
    vocab = Vocabulary(items[:n_items] if n_items else items)
    x = interactions(states, vocab).astype(np.float64)
    assert (len(x) < x.shape[1]) == (n_items is None)
    p = np.linalg.inv(x.T @ x + 5.0 * np.eye(x.shape[1]))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    want = recency_weighted(states[:5], vocab, 0.9) @ b
    np.testing.assert_allclose(Ease(states, vocab, lam=5.0, decay=0.9).scores(states[:5], vocab), want, atol=1e-6)


@pytest.mark.slow  # trains for a few epochs
def test_train_save_load_roundtrip(movielens, tmp_path):
    from models.train import TrainConfig, load_checkpoint, refit, train

    ds = replace(movielens, states=movielens.states[:40], users=movielens.users[:40])
    cfg = TrainConfig(max_len=20, d_model=16, max_epochs=2, batch_size=16, device="cpu")
    ckpt, history = train(cfg, ds, out=tmp_path, quiet=True)
    assert len(history["loss"]) == 2 and all(np.isfinite(history["loss"]))
    for name in ("checkpoint.pt", "vocab.json", "categories.json", "metrics.json", "train_curve.png"):
        assert (tmp_path / name).stat().st_size > 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["data_hash"] == ds.data_hash
    assert set(metrics["item_item"]) == {"val_ndcg10", "weight", "decay", "lam", "short_weight"}
    assert 0 <= metrics["test_metrics"]["cat_ndcg5"] <= 1 and "test_metrics_alone" in metrics
    assert ckpt.model.item_item_factors.max() > 0 and ckpt.model.item_categories.sum() > 0  # filled, and saved with it
    loaded = load_checkpoint(tmp_path)
    assert not loaded.model.training and loaded.vocab.items == ds.vocab.items and loaded.categories == ds.categories
    assert (
        loaded.encoder_config == ckpt.encoder_config
        and loaded.metadata["test_metrics"] == ckpt.metadata["test_metrics"]
    )
    x = {k: torch.from_numpy(v) for k, v in encode_batch(ds.states[:5], loaded.vocab, loaded.encoder_config).items()}
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**x), ckpt.model(**x))
        assert torch.isfinite(loaded.model.item_scores(loaded.model(**x), x["item_ids"])[:, 2:]).all()
    refit(tmp_path, tmp_path / "refit", ds, serve_len=8, ease_neighbours=5)  # the same weights, other serving flags
    again = load_checkpoint(tmp_path / "refit")
    assert (again.model_config.serve_len, again.model_config.ease_neighbours) == (8, 5)
    assert again.model.neighbour_weights.abs().sum() > 0 and "ndcg10" in again.metadata["test_metrics"]
    assert set(again.metadata["test_by_length"]) == {"1", "2", "3", "5", "10", "20+"}
    torch.testing.assert_close(again.model.item_emb.weight, ckpt.model.item_emb.weight)


def test_result_line_names_the_best_baseline_per_metric():
    from models.evaluate import result_line, summarize

    def row(ndcg: float, ns: float) -> dict:
        return {"metrics": {"ndcg10": ndcg, "recall10": 0.0, "mrr": 0.0, "ns_recall20": ns, "ns_ndcg20": 0.0}}

    results = {
        "baselines": {"popularity": row(0.01, 0.09), "item_knn": row(0.05, 0.08), "knn_popularity": row(0.03, 0.12)},
        "runs": {"model/0": row(0.06, 0.10), "model/1": row(0.08, 0.10), "sasrec/0": row(0.04, 0.11)},
    }
    line = result_line(summarize(results, ("model", "sasrec")))
    assert line == (
        "RESULT ndcg10=0.0700 best_baseline=item_knn best_baseline_ndcg10=0.0500 recall20_next_session=0.1000 "
        "best_baseline_next_session=knn_popularity best_baseline_recall20_next_session=0.1200"
    )


def test_train_command_passes_only_the_tuning_options_given(monkeypatch, tmp_path):
    """`interest-stream train --dropout 0.3` changes dropout alone; the rest stay TrainConfig's defaults."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    import models.train
    from local.cli import app
    from models.train import TrainConfig

    seen: list[TrainConfig] = []

    def fake_train(cfg, out=None):
        seen.append(cfg)
        meta = {"epochs": 1, "train_seconds": 0.0, "device": "cpu", "best_val_ndcg10": 0.05, "item_item": {}}
        return SimpleNamespace(metadata=meta | {"test_metrics": {"ndcg10": 0.04}}), {}

    monkeypatch.setattr(models.train, "train", fake_train)
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path), "--dropout", "0.3", "--weight-decay", "0.05"])
    assert result.exit_code == 0, result.output
    assert "validation NDCG@10: 0.0500 served, 0.0500 Transformer alone" in result.output
    defaults = TrainConfig()
    assert (seen[0].dropout, seen[0].weight_decay) == (0.3, 0.05)
    assert (seen[0].d_model, seen[0].future_weight, seen[0].future_window) == (
        defaults.d_model,
        defaults.future_weight,
        defaults.future_window,
    )
