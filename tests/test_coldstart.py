"""Cold start measured (issue 27, item 3): the history-length buckets of `interest-stream eval`."""

from __future__ import annotations

import numpy as np
import pytest

from core.sessions import fingerprint, state_from_events
from models.coldstart import LENGTHS, length_buckets, ndcg_by_length, newest
from models.data import HISTORY, load_otto
from models.datasets import by_user, otto_events


def test_newest_k_events_sessionize_like_the_fold_on_those_events_alone():
    """A user who has done only their newest k things: the same state the worker's fold builds from them."""
    otto = load_otto()
    for (_, events), s in zip(sorted(by_user(otto_events())), otto.states, strict=True):
        distinct = {fingerprint(e): e for e in events}.values()  # the fold drops duplicates
        ordered = sorted(distinct, key=lambda e: (e.timestamp, fingerprint(e)))
        for k in (1, 2, 5, len(s) // 2, len(s)):
            want = state_from_events(ordered[max(0, len(ordered) - k) :], HISTORY)
            got = newest(s, k)
            assert (got.ts, got.items, got.types, got.starts) == (want.ts, want.items, want.types, want.starts)


def test_buckets_cut_the_inputs_and_keep_the_targets():
    otto = load_otto()
    inputs = [s for s in otto.states if len(s) >= 2]
    targets = np.arange(len(inputs))
    buckets = length_buckets(inputs, targets)
    assert list(buckets) == ["1", "2", "3", "5", "10", "20+"]
    for k in LENGTHS[:-1]:
        states, tgt = buckets[str(k)]
        assert all(len(s) == k for s in states) and len(states) == len(tgt) == sum(len(s) >= k for s in inputs)
    full, tgt = buckets["20+"]
    assert all(len(s) >= 20 for s in full) and tgt.tolist() == [
        t for t, s in zip(targets, inputs, strict=True) if len(s) >= 20
    ]


def test_ndcg_by_length_scores_each_bucket_with_its_own_histories():
    """A scorer that ranks the target first only for 1-event histories: NDCG 1 there, 0 everywhere else."""
    otto = load_otto()
    inputs = [s for s in otto.states if len(s) >= 20]
    targets = np.full(len(inputs), 5)

    def scores(states):
        s = np.zeros((len(states), 100))
        s[:, 5] = [1.0 if len(st) == 1 else -1.0 for st in states]
        return s

    got = ndcg_by_length(scores, inputs, targets)
    assert got["1"] == 1.0 and all(got[b] == 0.0 for b in ("2", "3", "5", "10", "20+"))


def test_length_result_line_compares_the_model_with_the_best_named_baseline_per_length():
    from models.evaluate import length_result_line, length_summary, length_table

    def row(v: float) -> dict:
        return {"by_length": {b: v for b in ("1", "2", "3", "5", "10", "20+")}}

    pop, ease = row(0.02), row(0.05)
    pop["by_length"]["1"] = 0.03  # popularity beats EASE on one event
    results = {"baselines": {"popularity": pop, "ease": ease}, "runs": {"model/0": row(0.04), "model/1": row(0.06)}}
    lengths = length_summary(results, ("model",))
    assert lengths["model"]["1"] == pytest.approx((0.05, 0.01))
    line = length_result_line(lengths)
    assert line.startswith("RESULT ndcg10_len1=0.0500 best_baseline_len1=0.0500 ndcg10_len2=0.0500")
    assert line.endswith("ndcg10_len20plus=0.0500 best_baseline_len20plus=0.0500")
    pop["by_length"]["1"] = 0.07
    assert "best_baseline_len1=0.0700" in length_result_line(length_summary(results, ("model",)))
    assert length_table(lengths)[-1].startswith("| model | 0.0500 ± 0.0100 |")


def test_the_short_history_weight_scales_the_item_item_evidence_by_one_over_the_events_read():
    import torch

    from core.encoding import encode_batch
    from core.sessions import UserState
    from tests.fixtures.triton import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(max_len=20)
    model = ckpt.model
    items = tuple(f"item{i}" for i in range(5))
    states = [UserState(ts=tuple(range(1, n + 1)), items=items[:n], types=("view",) * n, values=(None,) * n,
                        fps=tuple(range(n)), starts=(0,)) for n in (1, 5)]  # fmt: skip
    ids = torch.from_numpy(encode_batch(states, ckpt.vocab, ckpt.encoder_config)["item_ids"])
    with torch.no_grad():
        evidence = model.item_item_scores(ids)[:, 2:]
        got = model.history_scores(ids)[:, 2:]
    w, s = model.item_item_weight.item(), model.item_item_short_weight.item()
    assert s > 0
    torch.testing.assert_close(got, torch.stack([(w + s / 1) * evidence[0], (w + s / 5) * evidence[1]]))
    with torch.no_grad():
        model.item_item_short_weight.fill_(0.0)
        torch.testing.assert_close(model.history_scores(ids)[:, 2:], w * evidence)  # 0: the model before issue 27


def test_fit_short_weight_never_lowers_the_validation_mean():
    from dataclasses import replace

    import torch

    from models.coldstart import SHORT_WEIGHTS, fit_short_weight
    from models.data import load_movielens, split
    from models.train import fill_item_item
    from tests.fixtures.small_model import small_checkpoint

    ml = load_movielens()
    ds = replace(ml, states=ml.states[:60], users=ml.users[:60])
    ckpt = small_checkpoint(ds.states, ml.categories)
    ds.vocab = ckpt.vocab
    sp = split(ds)
    fill_item_item(ckpt.model, sp.train, ckpt.vocab, 30.0)
    fit = fit_short_weight(ckpt.model, ds, sp, ckpt.encoder_config)
    assert fit["short_weight"] in SHORT_WEIGHTS and fit["val_mean_ndcg10"] >= fit["val_mean_ndcg10_without"]
    short = ckpt.model.item_item_short_weight
    assert short.item() == fit["short_weight"] and torch.isfinite(short)


def test_training_crops_encode_like_the_short_histories_they_stand_for():
    """`models.train.crops` cuts short histories out of encoded training windows; each must be exactly what the
    encoder gives for those events alone (a user whose newest k events are all there is), as served."""
    import torch

    from core.encoding import EncoderConfig, encode_batch
    from models.data import prefix
    from models.train import crops

    otto = load_otto()
    states = [s for s in otto.states if 2 <= len(s) <= 60 and len(s.starts) < 60][:40]
    enc, width = EncoderConfig(max_len=64), 3
    x = {k: torch.from_numpy(v) for k, v in encode_batch(states, otto.vocab, enc).items()}
    rows, ends, keep, want = [], [], [], []
    for r, s in enumerate(states):
        for j in range(1, len(s)):  # the target is event j; the crop holds up to k of the events before it
            for k in (1, 2, 3):
                rows.append(r)
                ends.append(enc.max_len - len(s) + j)  # left-padded: event j's column
                keep.append(k)
                want.append(newest(prefix(s, j), k))
    got = crops(x, torch.tensor(rows), torch.tensor(ends), torch.tensor(keep), width)
    expected = encode_batch(want, otto.vocab, EncoderConfig(max_len=width))
    assert len(want) > 300 and any(len(w.starts) > 1 for w in want)  # crops across a session boundary too
    for name, v in expected.items():
        np.testing.assert_array_equal(got[name].numpy(), v, err_msg=name)


def test_the_short_history_loss_trains_the_position_serving_reads_out():
    """With crop_weight > 0 the loss also covers short histories read out at the newest column, as served; the
    windows alone never train that position's embedding (their newest event has no target)."""
    import torch

    from core.encoding import EncoderConfig, encode_batch
    from models.model import InterestTransformer, ModelConfig
    from models.train import TrainConfig, loss_fn

    otto = load_otto()
    states = [s for s in otto.states if len(s) >= 4][:16]
    enc = EncoderConfig(max_len=32)
    x = {k: torch.from_numpy(v) for k, v in encode_batch(states, otto.vocab, enc).items()}
    torch.manual_seed(0)
    model = InterestTransformer(ModelConfig.for_encoder(enc, len(otto.vocab), n_categories=2, d_model=16)).train()
    grads = {}
    for weight in (0.0, 0.5):
        model.zero_grad()
        loss = loss_fn(model, x, TrainConfig(crop_weight=weight, category_weight=0.0))
        loss.backward()
        assert torch.isfinite(loss)
        grads[weight] = model.pos_emb.weight.grad[-1].abs().sum().item()
    assert grads[0.0] == 0.0 and grads[0.5] > 0.0
