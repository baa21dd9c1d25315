"""The continuous learner's core (issue 27, item 2): vocabulary growth, item-item refit, fine-tuning, validation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from core.encoding import encode_batch
from models.data import load_movielens
from models.learn import (
    LearnConfig,
    confirm_fusion,
    cooccurring,
    copy_checkpoint,
    grow,
    holdout,
    learn_step,
    ndcg10,
    refit_fusion,
    refit_item_item,
    unseen_items,
    validate,
)
from models.train import ITEM_ITEM_WEIGHTS
from tests.fixtures.small_model import small_checkpoint


@pytest.fixture(scope="module")
def setup():
    """A small untrained Transformer with EASE filled on 40 MovieLens users; users 40..79 bring items it has never
    seen."""
    ml = load_movielens()
    known, later = ml.states[:40], ml.states[40:80]
    return small_checkpoint(known, ml.categories), known, later


def scores(ckpt, states):
    from models.train import score

    return score(ckpt.model, states, ckpt.vocab, ckpt.encoder_config)


def test_growth_appends_new_items_and_leaves_every_old_score_unchanged(setup):
    ckpt, known, later = setup
    new = unseen_items(ckpt.vocab, later)
    assert new and not any(i in ckpt.vocab for i in new)
    grown = grow(ckpt, later)
    assert grown.vocab.items == ckpt.vocab.items + new and len(grown.vocab) == len(ckpt.vocab) + len(new)
    assert grown.model.item_emb.weight.shape[0] == len(grown.vocab) == grown.model_config.n_items
    before, after = scores(ckpt, known[:10]), scores(grown, known[:10])
    np.testing.assert_allclose(after[:, : len(ckpt.vocab)], before, rtol=1e-5, atol=1e-5)  # old items: as before
    assert np.isfinite(after[:, len(ckpt.vocab) :]).all()  # and the new ones are scored
    assert grown.model is not ckpt.model and len(ckpt.vocab) == ckpt.model_config.n_items  # the original is kept


def test_a_new_item_starts_as_the_mean_of_the_known_items_it_shares_sessions_with(setup):
    ckpt, _, later = setup
    new = unseen_items(ckpt.vocab, later)
    co = cooccurring(ckpt.vocab, later, new)
    item = next(i for i in new if co[i])
    grown = grow(ckpt, later)
    idx, w = zip(*co[item].items(), strict=True)
    w = torch.tensor(w, dtype=torch.float32)
    emb = ckpt.model.item_emb.weight.detach()
    want = (w[:, None] * emb[list(idx)]).sum(0) / w.sum()
    torch.testing.assert_close(grown.model.item_emb.weight[grown.vocab.index(item)].detach(), want)


def test_after_the_refit_a_new_item_is_recommended_from_its_co_occurrences(setup):
    """The frozen model cannot name a new item at all; the grown and refitted one ranks it for a history made of
    the known items that were watched with it, far above the middle of the catalogue."""
    ckpt, known, later = setup
    grown = grow(ckpt, later)
    rank = grown.model_config.item_item_rank
    grown = refit_item_item(grown, known + later)
    assert grown.model_config.item_item_rank == len(known + later) > rank  # exact EASE for every user seen so far
    assert grown.model.item_item_factors.shape == (len(grown.vocab), len(known + later))
    new = unseen_items(ckpt.vocab, later)
    co = cooccurring(ckpt.vocab, later, new)
    item = max(new, key=lambda i: sum(co[i].values()))
    partners = [ckpt.vocab.item(k) for k, _ in co[item].most_common(5)]
    hist = replace(known[0], items=tuple(partners), ts=known[0].ts[:5], types=known[0].types[:5],
                   values=known[0].values[:5], fps=known[0].fps[:5], starts=(0,))  # fmt: skip
    ids = torch.from_numpy(encode_batch([hist], grown.vocab, grown.encoder_config)["item_ids"])
    with torch.no_grad():
        evidence = grown.model.item_item_scores(ids)[0].numpy()  # the EASE part (the Transformer is untrained)
    evidence[grown.vocab.indices(partners)] = -np.inf  # seen
    rank = int((evidence > evidence[grown.vocab.index(item)]).sum())
    assert rank < len(grown.vocab) // 20
    assert np.isfinite(scores(grown, [hist])[0][grown.vocab.index(item)])  # and the served score includes it


def test_validation_refuses_a_worse_candidate_and_accepts_an_equal_one(setup):
    ckpt, known, _ = setup
    _, inputs, targets = holdout(known, int(np.quantile([ts for s in known for ts in s.ts], 0.9)))
    assert inputs and len(inputs) == len(targets)
    same = validate(copy_checkpoint(ckpt), ckpt, inputs, targets, tolerance=0.0)
    assert same.promote and same.reason == "equal" and same.candidate_ndcg10 == same.serving_ndcg10 > 0
    worse = copy_checkpoint(ckpt)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        worse.model.item_emb.weight.copy_(torch.randn(worse.model.item_emb.weight.shape, generator=g))
        worse.model.item_item_weight.fill_(0.0)
        worse.model.item_item_short_weight.fill_(0.0)
    v = validate(worse, ckpt, inputs, targets, tolerance=0.0)
    assert not v.promote and v.reason == "worse" and v.candidate_ndcg10 < v.serving_ndcg10
    assert validate(worse, ckpt, inputs, targets, tolerance=0.0, z=1.64).reason == "worse"  # far beyond the noise
    assert validate(worse, ckpt, [], [], 0.0).reason == "no_holdout"


def test_holdout_splits_each_history_at_the_time_and_never_trains_on_the_held_out_events(setup):
    _, known, _ = setup
    t = int(np.median([s.ts[-1] for s in known]))
    fit, inputs, targets = holdout(known, t)
    assert all(s.ts[-1] < t for s in fit)
    assert all(len(inp) >= 1 for inp in inputs)
    total_after = sum(sum(ts >= t for ts in s.ts[1:]) for s in known)
    assert len(targets) == total_after


def test_learn_step_grows_fine_tunes_validates_and_leaves_the_serving_version_alone(setup):
    ckpt, known, later = setup
    histories = known + later
    t_hold = int(np.quantile([ts for s in histories for ts in s.ts], 0.95))
    t_recent = int(np.quantile([ts for s in histories for ts in s.ts], 0.8))
    before = {k: v.clone() for k, v in ckpt.model.state_dict().items()}
    candidate, verdict, facts = learn_step(ckpt, histories, t_recent, t_hold, LearnConfig(steps=3))
    for k, v in ckpt.model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert facts["new_items"] > 0 and len(facts["losses"]) == 3 and facts["recent_users"] > 0
    assert len(candidate.vocab) == len(ckpt.vocab) + facts["new_items"]
    assert verdict.events > 0 and verdict.reason in ("better", "equal", "within_noise", "worse")
    assert verdict.promote == (verdict.reason != "worse")
    if verdict.reason in ("better", "equal"):
        assert verdict.candidate_ndcg10 >= verdict.serving_ndcg10
    _, inputs, targets = holdout(histories, t_hold)
    tuned = len(inputs) // 2  # the older half refitted the fusion; the newer validated
    assert verdict.events == len(inputs) - tuned and facts["fusion"]["weight"] in ITEM_ITEM_WEIGHTS
    assert np.isclose(verdict.serving_ndcg10, ndcg10(ckpt, inputs[tuned:], targets[tuned:]))
    x = encode_batch(later[:3], candidate.vocab, candidate.encoder_config)
    assert (x["item_ids"] > 1).sum() > (encode_batch(later[:3], ckpt.vocab, ckpt.encoder_config)["item_ids"] > 1).sum()


def test_the_fusion_is_refitted_on_held_out_events_and_kept_when_nothing_beats_it(setup):
    ckpt, known, _ = setup
    _, inputs, targets = holdout(known, int(np.quantile([ts for s in known for ts in s.ts], 0.8)))
    alone = copy_checkpoint(ckpt)
    alone.model.item_item_weight.fill_(0.0)  # the untrained Transformer alone: the item-item evidence must win
    unmoved = refit_fusion(alone, inputs, targets, z=1e9)  # unless the gain is beyond z standard errors
    assert not unmoved["changed"] and alone.model.item_item_weight.item() == 0.0
    assert unmoved["best_ndcg10"] > unmoved["ndcg10"] == unmoved["ndcg10_before"]
    out = refit_fusion(alone, inputs, targets)
    assert out["changed"] and out["weight"] > 0 and out["ndcg10"] > out["ndcg10_before"]
    assert alone.model.item_item_weight.item() == out["weight"] and alone.model.item_item_decay.item() == out["decay"]
    assert np.isclose(ndcg10(alone, inputs, targets), out["ndcg10"])  # what was measured is what is served
    assert alone.metadata["item_item"]["weight"] == out["weight"]
    again = refit_fusion(alone, inputs, targets)  # already the best pair: kept, not swapped for a tie
    assert (again["weight"], again["decay"]) == (out["weight"], out["decay"]) and not again["changed"]
    assert again["ndcg10"] == again["ndcg10_before"] == out["ndcg10"]


def test_a_changed_fusion_is_put_back_when_the_newer_events_disagree(setup):
    ckpt, known, _ = setup
    _, inputs, targets = holdout(known, int(np.quantile([ts for s in known for ts in s.ts], 0.8)))
    half = len(inputs) // 2
    alone = copy_checkpoint(ckpt)
    alone.model.item_item_weight.fill_(0.0)
    fusion = refit_fusion(alone, inputs[:half], targets[:half])
    assert fusion["changed"]
    kept = confirm_fusion(alone, fusion, inputs[half:], targets[half:])  # EASE beats an untrained Transformer here too
    assert kept["confirmed"] and kept["validation_ndcg10"] > kept["validation_ndcg10_before"]
    assert alone.model.item_item_weight.item() == fusion["weight"] > 0
    # The same check against a change that made it worse (to the Transformer alone): the old pair is put back.
    worse = {**fusion, "weight": 0.0, "weight_before": fusion["weight"], "decay_before": fusion["decay"]}
    alone.model.item_item_weight.fill_(0.0)
    back = confirm_fusion(alone, worse, inputs[half:], targets[half:])
    assert not back["confirmed"] and back["weight"] == fusion["weight"] == alone.model.item_item_weight.item()
    assert alone.metadata["item_item"]["weight"] == fusion["weight"]


def test_decide_refuses_a_drop_beyond_the_noise_and_accepts_one_within_it():
    from models.learn import decide

    rng = np.random.default_rng(0)
    noisy = rng.normal(-0.005, 0.2, 200)  # 200 events, a mean drop of ~0.005 with a standard error of ~0.014
    assert decide(noisy, 0.0, 0.0) == (False, "worse")  # any drop
    assert decide(noisy, 0.0, 1.64) == (True, "within_noise")
    clear = rng.normal(-0.1, 0.2, 200)
    assert decide(clear, 0.0, 1.64) == (False, "worse")
    assert decide(np.zeros(5), 0.0, 1.64) == (True, "equal")
    assert decide(np.array([0.1, 0.2]), 0.0, 1.64) == (True, "better")
    assert decide(np.array([np.nan, 0.2]), 0.0, 1.64) == (False, "diverged")


@pytest.mark.parametrize("share", [1.0, -0.1])
def test_a_fusion_share_that_leaves_nothing_to_validate_is_refused_at_configuration(share):
    with pytest.raises(ValueError, match="fusion_share"):
        LearnConfig(fusion_share=share)
    assert LearnConfig(fusion_share=0.0).fusion_share == 0.0  # 0: training's fusion kept, all events validate


def test_event_ndcg_is_one_over_log2_rank_plus_two_inside_the_top_k():
    from models.ranking import event_ndcg

    ranks = np.array([0.0, 1.0, 0.5, 9.0, 10.0, np.inf])
    expected = [1.0, 1 / np.log2(3), 1 / np.log2(2.5), 1 / np.log2(11), 0.0, 0.0]
    np.testing.assert_allclose(event_ndcg(ranks), expected)
