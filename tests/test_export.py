"""ONNX export: the graph equals PyTorch eager, and both Triton repositories declare the same model."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from core.encoding import INPUT_NAMES, OOV, PAD
from models.export import OUTPUT_NAMES, SCENARIO_OUTPUTS, ServingModel, read_config, run_eager
from tests.fixtures.triton import TINY_ITEMS

TOL = 1e-5


def every_length(max_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Row n holds a random left-padded history of length n, for n = 0 (empty) .. max_len."""
    rng = np.random.default_rng(seed)
    rows = max_len + 1
    x = {n: np.zeros((rows, max_len), dtype=np.int64) for n in INPUT_NAMES}
    for n in range(1, rows):
        cuts = np.sort(rng.choice(np.arange(1, n + 1), size=min(n, rng.integers(1, 6)), replace=False))
        x["item_ids"][n, -n:] = rng.integers(OOV, TINY_ITEMS, n)  # OOV included
        x["event_types"][n, -n:] = rng.integers(1, 6, n)
        x["session_pos"][n, -n:] = np.minimum((np.arange(n)[:, None] < cuts[None, :]).sum(1), 63)
        x["time_gaps"][n, -n:] = np.r_[1, rng.integers(2, 13, n - 1)]
        x["scenarios"][n, -n:] = rng.integers(1, 4, n)  # none, app, tv (the tiny model knows two)
    return x


@pytest.fixture(scope="module")
def session(tiny_export) -> ort.InferenceSession:
    return ort.InferenceSession(str(tiny_export.onnx_path), providers=["CPUExecutionProvider"])


def assert_onnx_matches_eager(serving: ServingModel, path: Any, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ONNX file at `path` gives eager's outputs on `x` (top items up to ties); returns ONNX's outputs."""
    ref = dict(zip(OUTPUT_NAMES, run_eager(serving, x), strict=True))
    got = dict(zip(OUTPUT_NAMES, ort.InferenceSession(str(path)).run(list(OUTPUT_NAMES), x), strict=True))
    for name in ("interest", "category_scores", "event_weights"):
        np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=TOL, err_msg=name)
    np.testing.assert_allclose(got["top_scores"], ref["top_scores"], rtol=TOL, atol=TOL)
    assert (got["top_items"] == ref["top_items"]).all(1).mean() > 0.95
    return got


def test_onnx_equals_eager_for_every_length_and_empty(tiny_checkpoint, tiny_export, session) -> None:
    k = tiny_export.metadata["top_k"]
    x = every_length(tiny_checkpoint.encoder_config.max_len)
    serving = ServingModel(tiny_checkpoint.model, k, filter_seen=True)
    names = serving.output_names
    assert names == (*OUTPUT_NAMES, *SCENARIO_OUTPUTS)
    ref = dict(zip(names, run_eager(serving, x), strict=True))
    got = dict(zip(names, session.run(list(names), x), strict=True))

    for name in ("interest", "category_scores", "event_weights", "scenario_interest"):
        assert got[name].dtype == np.float32 and np.isfinite(got[name]).all(), name
        np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=TOL, err_msg=name)
    for name in ("top_scores", "scenario_top_scores"):  # logits reach ~30: one float32 step is ~2e-6 there
        np.testing.assert_allclose(got[name], ref[name], rtol=TOL, atol=TOL, err_msg=name)
    np.testing.assert_array_equal(got["scenario_top_items"].shape, (len(x["item_ids"]), 2, k))
    # Top-k: equal indices, up to order among scores tied within TOL (ranked by eager's own scores).
    args = [torch.from_numpy(x[n]) for n in INPUT_NAMES]
    full = serving.model.item_scores(serving.model(*args), args[0]).detach().numpy()
    np.testing.assert_allclose(np.take_along_axis(full, got["top_items"], 1), got["top_scores"], atol=TOL)
    same = (got["top_items"] == ref["top_items"]).all(1)
    assert same.mean() > 0.95, f"top_items differ beyond ties in {np.flatnonzero(~same)}"

    items = got["top_items"]
    assert got["top_items"].dtype == np.int64 and items.shape == (len(x["item_ids"]), k)
    assert not np.isin(items, [PAD, OOV]).any()
    for row in range(len(items)):  # filter_seen: fewer than 300 - 200 items are ever seen, so none come back
        assert not np.isin(items[row], x["item_ids"][row]).any()
    assert (np.diff(got["top_scores"], axis=1) <= TOL).all(), "scores are sorted best first"
    np.testing.assert_allclose(np.linalg.norm(got["interest"], axis=1), 1.0, atol=1e-5)
    # The empty history is the model's cold vector, the same for any padding content.
    cold = serving.model.cold_interest().detach().numpy()
    np.testing.assert_allclose(got["interest"][0], cold, atol=TOL)


def test_onnx_batch_dim_is_dynamic(tiny_checkpoint, session) -> None:
    x = every_length(tiny_checkpoint.encoder_config.max_len, seed=1)
    full = session.run(["interest"], x)[0]
    for rows in (slice(0, 1), slice(5, 8), slice(100, 164)):
        part = session.run(["interest"], {n: v[rows] for n, v in x.items()})[0]
        np.testing.assert_allclose(part, full[rows], atol=TOL)


def test_production_and_twin_configs_declare_the_same_model(tiny_export) -> None:
    prod = read_config(tiny_export.production / "interest_transformer" / "config.pbtxt")
    twin = read_config(tiny_export.twin / "interest_transformer" / "config.pbtxt")
    for field in ("name", "input", "output", "max_batch_size", "dynamic_batching"):
        assert getattr(prod, field) == getattr(twin, field), field
    assert prod.name == "interest_transformer" and prod.max_batch_size == 1024
    assert prod.platform == "onnxruntime_onnx" and not prod.backend
    assert [g.kind for g in prod.instance_group] == [prod.instance_group[0].KIND_GPU]
    assert twin.backend == "python" and [g.kind for g in twin.instance_group] == [twin.instance_group[0].KIND_CPU]
    assert list(prod.dynamic_batching.preferred_batch_size) and prod.dynamic_batching.max_queue_delay_microseconds > 0
    assert [i.name for i in prod.input] == list(INPUT_NAMES)
    assert [o.name for o in prod.output] == [*OUTPUT_NAMES, *SCENARIO_OUTPUTS]


def test_config_dims_match_the_onnx_graph(tiny_export, session) -> None:
    prod = read_config(tiny_export.production / "interest_transformer" / "config.pbtxt")
    declared = {t.name: list(t.dims) for t in (*prod.input, *prod.output)}
    for t in (*session.get_inputs(), *session.get_outputs()):
        assert isinstance(t.shape[0], str), f"{t.name}: batch dim must be dynamic"
        assert t.shape[1:] == declared[t.name], t.name


def test_repositories_carry_vocab_categories_and_metadata(tiny_checkpoint, tiny_export) -> None:
    for repo in (tiny_export.production, tiny_export.twin):
        model_dir = repo / "interest_transformer"
        assert (model_dir / "1" / "model.onnx").read_bytes() == tiny_export.onnx_path.read_bytes()
        assert json.loads((model_dir / "vocab.json").read_text())["items"] == tiny_checkpoint.vocab.items
        assert json.loads((model_dir / "categories.json").read_text()) == tiny_checkpoint.categories
        meta = json.loads((model_dir / "metadata.json").read_text())
        assert meta["model_version"] == "tiny-test" and meta["data_hash"] == "none"
        assert meta["eval_metrics"] == {"ndcg10": 0.0}
        assert [i["name"] for i in meta["inputs"]] == list(INPUT_NAMES)
        assert [o["dims"] for o in meta["outputs"]] == [[16], [20], [20], [5], [200], [2, 16], [2, 20], [2, 20]]
        assert meta["encoder_config"]["scenarios"] == ["app", "tv"]
    assert (tiny_export.twin / "interest_transformer" / "1" / "model.py").exists()
    assert not (tiny_export.production / "interest_transformer" / "1" / "model.py").exists()


def test_k_beyond_the_catalogue_is_refused(tiny_checkpoint) -> None:
    with pytest.raises(ValueError, match="k="):
        ServingModel(tiny_checkpoint.model, k=TINY_ITEMS - 1)


def test_export_command_from_a_saved_checkpoint(tiny_checkpoint, tmp_path) -> None:
    """`interest-stream export --checkpoint DIR --out OUT` on what `train` saves: both repositories, verified."""
    from typer.testing import CliRunner

    from local.cli import app
    from models.train import Checkpoint, save

    ck = tiny_checkpoint
    meta = {"dataset": "tiny", "data_hash": "abc", "test_metrics": {"ndcg10": 0.1}}
    save(
        Checkpoint(ck.model, ck.model_config, ck.encoder_config, ck.vocab, ck.categories, None, meta),
        tmp_path / "ck",
        {
            "loss": [1.0],
            "val_ndcg10": [0.1],
        },
    )
    out = tmp_path / "repo"
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path / "ck"), "--out", str(out), "--k", "5"])
    assert result.exit_code == 0, result.output
    assert "onnx vs eager: interest" in result.output
    twin = tmp_path / "repo-twin" / "interest_transformer"
    assert read_config(twin / "config.pbtxt").output[1].dims == [5]
    meta_out = json.loads((out / "interest_transformer" / "metadata.json").read_text())
    assert meta_out["data_hash"] == "abc" and meta_out["eval_metrics"] == {"ndcg10": 0.1}
    assert meta_out["model_version"].startswith("tiny-")


@pytest.mark.parametrize("scorer", ["knn", "ease"])
def test_onnx_equals_eager_with_item_scorer_item_bias_and_genre_shares(tmp_path, scorer) -> None:
    """The in-graph scorers (factored kNN or EASE, item bias, history genre shares) export like the rest, each
    factor matrix stored once."""
    import onnx

    from core.encoding import EncoderConfig
    from models.export import export_onnx
    from models.model import InterestTransformer, ModelConfig

    torch.manual_seed(0)
    enc = EncoderConfig(max_len=200)
    mcfg = ModelConfig.for_encoder(
        enc, TINY_ITEMS, n_categories=5, d_model=16, item_item_rank=8, category_share_mix=0.6, history_scorer=scorer
    )
    model = InterestTransformer(mcfg).eval()
    with torch.no_grad():
        model.item_item_factors.copy_(torch.rand(model.item_item_factors.shape))
        if scorer == "ease":
            model.ease_out.copy_(torch.rand(model.ease_out.shape))
            model.ease_self.copy_(torch.rand(model.ease_self.shape))
        model.item_item_decay.fill_(0.8)
        model.item_item_weight.fill_(5.0)
        model.item_bias.normal_()
        model.category_hist_weight.normal_()
        model.item_categories.copy_((torch.rand(model.item_categories.shape) < 0.3).float())
    serving = ServingModel(model, 20)
    path = export_onnx(serving, tmp_path / "model.onnx", enc.max_len)
    big = [t.dims for t in onnx.load(str(path)).graph.initializer if np.prod(t.dims) == TINY_ITEMS * 8]
    assert big == [[TINY_ITEMS, 8]] * (2 if scorer == "ease" else 1), big  # no folded transposed or squared copy
    x = every_length(enc.max_len, seed=2)
    x["scenarios"] = np.minimum(x["scenarios"], 1)  # this model knows no scenario: all encode as none
    assert serving.output_names == OUTPUT_NAMES
    assert_onnx_matches_eager(serving, path, x)
    args = [torch.from_numpy(x[n]) for n in INPUT_NAMES]
    with torch.no_grad():
        evidence = model.item_item_scores(args[0])
    assert evidence[0].abs().max() == 0  # empty: no NaN
    assert torch.allclose(evidence[1:].amax(1), torch.ones(len(evidence) - 1))


def test_onnx_equals_eager_with_sparse_ease_and_a_serving_length(tmp_path) -> None:
    """The served levers (issue 26): EASE as top-N neighbour rows and a serving length cap export like the rest;
    the dense factors stay out of the graph, and the explanation is 0 on the events beyond the cap."""
    import onnx

    from core.encoding import EncoderConfig
    from models.export import export_onnx
    from models.model import InterestTransformer, ModelConfig

    torch.manual_seed(0)
    enc = EncoderConfig(max_len=200)
    mcfg = ModelConfig.for_encoder(
        enc, TINY_ITEMS, n_categories=5, d_model=16, item_item_rank=8, history_scorer="ease", ease_neighbours=6,
        serve_len=50,
    )  # fmt: skip
    model = InterestTransformer(mcfg).eval()
    with torch.no_grad():
        model.neighbour_items.copy_(torch.randint(2, TINY_ITEMS, model.neighbour_items.shape, dtype=torch.int32))
        model.neighbour_weights.normal_()
        model.item_item_decay.fill_(0.8)
        model.item_item_weight.fill_(5.0)
        model.item_bias.normal_()
    serving = ServingModel(model, 20)
    path = export_onnx(serving, tmp_path / "model.onnx", enc.max_len)
    dims = [list(t.dims) for t in onnx.load(str(path)).graph.initializer]
    assert [TINY_ITEMS, 8] not in dims and [TINY_ITEMS, 6] in dims, dims
    x = every_length(enc.max_len, seed=3)
    x["scenarios"] = np.minimum(x["scenarios"], 1)
    got = assert_onnx_matches_eager(serving, path, x)
    assert got["event_weights"].shape == (201, 200) and (got["event_weights"][:, :-50] == 0).all()


def test_a_checkpoint_saved_under_the_old_knn_names_loads_with_equal_outputs(tmp_path) -> None:
    """The item-item buffers and rank were called knn_* while they held EASE's factors by default (renamed in issue
    27); a checkpoint saved before (artifacts/model, every learner version) loads into today's model unchanged."""
    from models.checkpoint import RENAMED_CONFIG, RENAMED_PARAMETERS, Checkpoint, load_checkpoint, save
    from tests.fixtures.triton import make_tiny_checkpoint

    tiny = make_tiny_checkpoint(max_len=20)
    meta = {"item_item": {"lam": 30.0, "short_weight": 4.0}, "train_config": {"item_item_rank": 1024, "seed": 0}}
    save(Checkpoint(tiny.model, tiny.model_config, tiny.encoder_config, tiny.vocab, tiny.categories, None, meta),
         tmp_path, {"loss": [], "val_ndcg10": []})  # fmt: skip
    blob = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    to_old = lambda d, names: {({v: k for k, v in names.items()}).get(k, k): v for k, v in d.items()}  # noqa: E731
    blob["state_dict"] = to_old(blob["state_dict"], RENAMED_PARAMETERS)
    blob["model_config"] = to_old(blob["model_config"], RENAMED_CONFIG)
    blob["metadata"] = {"knn": meta["item_item"], "train_config": to_old(meta["train_config"], RENAMED_CONFIG)}
    assert {"knn_factors", "knn_decay", "knn_weight", "knn_short_weight"} <= set(blob["state_dict"])
    assert not any(k.startswith("item_item") for k in blob["state_dict"]) and "knn_rank" in blob["model_config"]
    torch.save(blob, tmp_path / "checkpoint.pt")

    loaded = load_checkpoint(tmp_path)
    assert loaded.model_config == tiny.model_config and loaded.metadata == meta
    assert loaded.model.item_item_short_weight.item() == 4.0  # loaded, not left at its zero default
    for name, want in tiny.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], want, rtol=0, atol=0, msg=name)
    x = every_length(20, seed=4)
    for got, want in zip(run_eager(ServingModel(loaded.model, 10), x), run_eager(ServingModel(tiny.model, 10), x),
                         strict=True):  # fmt: skip
        np.testing.assert_array_equal(got, want)
