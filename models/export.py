"""Export a checkpoint to Triton: one `model.onnx`, a production GPU repository and a local CPU twin.

The graph computes everything the worker needs (interest, top-k items with scores, category scores), so the
worker only moves tensors. Both repositories get their inputs, outputs, dims, max_batch_size and dynamic batching
from one `ServingSpec`, so the twin cannot drift from production; they differ only in how the model runs:

    DIR/interest_transformer/            platform onnxruntime_onnx, KIND_GPU          (production)
    DIR-twin/interest_transformer/       backend python: onnxruntime on CPU            (local tritonserver)
        config.pbtxt  vocab.json  categories.json  metadata.json     (the newest version's bundle, as before)
        <N>/model.onnx  [<N>/model.py]  <N>/vocab.json  <N>/categories.json  <N>/metadata.json

Versions are numbered directories of one Triton model (`export_repository(..., version=N)`): the worker reads the
bundle of the version it uses from `<N>/`, so a new version may bring a new vocabulary. Adding a version keeps the
others and the config (a different interface is a new model, not a new version: refused).

Exporter: the TorchScript ("legacy") exporter. With torch 2.13 the dynamo exporter fails while decomposing the
attention (`Cannot view a tensor with shape [s, 200, 2, 8] and strides (3200, 8, 1600, 1)`: the decomposed
scaled_dot_product_attention reports strides its `.reshape` cannot view); the legacy graph matches eager to ~1e-6.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from google.protobuf import text_format
from torch import Tensor, nn
from tritonclient.grpc import model_config_pb2 as mc

from core.bundle import bundle_hash
from core.encoding import INPUT_NAMES, PAD, EncoderConfig, Vocabulary, example_inputs

MODEL_NAME = "interest_transformer"
OUTPUT_NAMES = ("interest", "top_items", "top_scores", "category_scores", "event_weights")
#: Only for a model that knows scenarios (`EncoderConfig.scenarios`): the same per scenario, [S, ...] per row.
SCENARIO_OUTPUTS = ("scenario_interest", "scenario_top_items", "scenario_top_scores")
OPSET = 17
_SEEN_PENALTY = 1e4  # logits are bounded by the clamped logit scale (<= 100), so seen items rank below all unseen


class ServingModel(nn.Module):
    """What Triton serves: the model plus its heads and top-k, in one graph.

    `top_items` are vocabulary indices, best first; PAD/OOV are never returned (k <= n_items - 2). With
    `filter_seen` (the evaluation protocol) items in the history rank after every unseen item, not removed, so
    the output shape stays [k] even for a history that covers the catalogue. `top_scores` are the item logits.
    """

    def __init__(self, model: nn.Module, k: int = 20, filter_seen: bool = True) -> None:
        super().__init__()
        n_items = model.item_emb.num_embeddings
        if not 1 <= k <= n_items - 2:
            raise ValueError(f"k={k} must be in [1, {n_items - 2}] (items without PAD/OOV)")
        self.model, self.k, self.filter_seen = model, k, filter_seen

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES + (SCENARIO_OUTPUTS if self.model.cfg.n_scenarios else ())

    def forward(
        self, item_ids: Tensor, event_types: Tensor, session_pos: Tensor, time_gaps: Tensor, scenarios: Tensor
    ) -> tuple[Tensor, ...]:
        interest, weights, per_scenario = self.model.serve(item_ids, event_types, session_pos, time_gaps, scenarios)
        history = self.model.history_scores(item_ids)  # the item-item evidence: once, whatever the scenarios
        seen = torch.zeros_like(history).scatter(1, item_ids, _SEEN_PENALTY) if self.filter_seen else None
        top_items, top_scores = self.top(interest, history, seen)
        out = (interest, top_items, top_scores, self.model.category_scores(interest, item_ids), weights)
        if not per_scenario:
            return out
        tops = [self.top(h, history, seen) for h in per_scenario]
        stack = lambda ts: torch.stack(ts, 1)  # noqa: E731
        return *out, stack(per_scenario), stack([t[0] for t in tops]), stack([t[1] for t in tops])

    def top(self, interest: Tensor, history: Tensor, seen: Tensor | None) -> tuple[Tensor, Tensor]:
        """The k best items for one interest (seen ones ranked last with `filter_seen`) and their scores."""
        scores = self.model.item_logits(interest) + history
        rank = scores if seen is None else scores - seen
        top_items = torch.topk(rank, self.k, dim=1).indices
        return top_items, scores.gather(1, top_items)


@dataclass(frozen=True)
class ServingSpec:
    """Everything both Triton configs must agree on."""

    max_len: int
    d_model: int
    k: int
    n_categories: int
    n_scenarios: int = 0
    name: str = MODEL_NAME
    max_batch_size: int = 1024
    preferred_batch_sizes: tuple[int, ...] = (128, 512, 1024)
    max_queue_delay_us: int = 2000
    # Versions Triton keeps loaded (the newest N): 2, so a worker that refuses a new version keeps the one it uses
    # until the operator unloads it (docs/operations.md, "Rolling out a new model version").
    versions_served: int = 2

    def inputs(self) -> list[tuple[str, str, list[int]]]:
        return [(n, "TYPE_INT64", [self.max_len]) for n in INPUT_NAMES]

    def outputs(self) -> list[tuple[str, str, list[int]]]:
        s = self.n_scenarios
        dims = {
            "interest": [self.d_model],
            "top_items": [self.k],
            "top_scores": [self.k],
            "category_scores": [self.n_categories],
            "event_weights": [self.max_len],
            "scenario_interest": [s, self.d_model],
            "scenario_top_items": [s, self.k],
            "scenario_top_scores": [s, self.k],
        }
        types = {"top_items": "TYPE_INT64", "scenario_top_items": "TYPE_INT64"}
        names = OUTPUT_NAMES + (SCENARIO_OUTPUTS if s else ())
        return [(n, types.get(n, "TYPE_FP32"), dims[n]) for n in names]

    def config(self, kind: Literal["production", "twin"], twin_threads: int = 0) -> mc.ModelConfig:
        """The config.pbtxt message: production runs the ONNX on GPUs, the twin runs our python model on CPU."""
        c = mc.ModelConfig(name=self.name, max_batch_size=self.max_batch_size)
        for name, dtype, dims in self.inputs():
            c.input.add(name=name, data_type=mc.DataType.Value(dtype), dims=dims)
        for name, dtype, dims in self.outputs():
            c.output.add(name=name, data_type=mc.DataType.Value(dtype), dims=dims)
        c.dynamic_batching.preferred_batch_size.extend(self.preferred_batch_sizes)
        c.dynamic_batching.max_queue_delay_microseconds = self.max_queue_delay_us
        c.version_policy.latest.num_versions = self.versions_served
        if kind == "production":
            c.platform = "onnxruntime_onnx"
            c.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1)
        else:
            c.backend = "python"
            c.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
            c.parameters["intra_op_threads"].string_value = str(twin_threads)  # 0: min(4, cores)
        return c


def export_onnx(serving: ServingModel, path: Path | str, max_len: int, opset: int = OPSET) -> Path:
    """Trace `serving` (eval mode) to ONNX with a dynamic batch dim; the graph is checked before it is returned."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    serving = serving.eval()
    n_items, n_scenarios = serving.model.item_emb.num_embeddings, serving.model.cfg.n_scenarios
    args = tuple(torch.from_numpy(v) for v in example_inputs(2, max_len, n_items, n_scenarios=n_scenarios).values())
    batch = {0: "batch"}
    outputs = serving.output_names
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(
            serving,
            args,
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=list(outputs),
            dynamic_axes={n: batch for n in (*INPUT_NAMES, *outputs)},
            opset_version=opset,
            dynamo=False,
        )
    onnx.checker.check_model(str(path), full_check=True)
    return path


def run_eager(serving: ServingModel, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The PyTorch reference for the ONNX graph (same input dict, same output order)."""
    with torch.no_grad():
        return [t.numpy() for t in serving.eval()(*(torch.from_numpy(inputs[n]) for n in INPUT_NAMES))]


def verify_onnx(
    model: nn.Module, onnx_path: Path | str, k: int, filter_seen: bool = True, batch: int = 64, tol: float = 1e-5
) -> dict[str, float]:
    """Largest ONNX-vs-eager difference per float output on random histories (and an empty one); raises above tol.

    Interests, weights and `category_scores` are compared absolutely; top scores relative to max(1, |logit|),
    because trained logits reach ~100 where one float32 step is already ~1e-5.
    """
    import onnxruntime as ort

    model = model.eval().cpu()
    serving = ServingModel(model, k, filter_seen)
    x = example_inputs(batch, model.cfg.max_len, model.item_emb.num_embeddings, 1, model.cfg.n_scenarios)
    x["item_ids"][0] = PAD  # cold start
    names = serving.output_names
    ref = dict(zip(names, run_eager(serving, x), strict=True))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = dict(zip(names, session.run(list(names), x), strict=True))
    err = {n: float(np.abs(ref[n] - got[n]).max()) for n in names if "top_" not in n}
    for n in (n for n in names if n.endswith("top_scores")):
        err[n] = float((np.abs(ref[n] - got[n]) / np.maximum(1.0, np.abs(ref[n]))).max())
    bad = {n: e for n, e in err.items() if not e <= tol}
    if bad:
        raise RuntimeError(f"ONNX output differs from eager beyond {tol}: {bad}")
    return err


class CheckpointLike(Protocol):
    """What `models.train.load_checkpoint` returns (only these attributes are used)."""

    model: nn.Module
    encoder_config: EncoderConfig
    vocab: Vocabulary
    categories: list[str]
    metadata: dict[str, Any]


@dataclass
class ExportResult:
    production: Path  # DIR (the repository; the model is DIR/interest_transformer)
    twin: Path
    onnx_path: Path
    metadata: dict[str, Any] = field(default_factory=dict)


def twin_dir_for(out: Path | str) -> Path:
    """The default twin repository: a sibling `<DIR>-twin`."""
    out = Path(out)
    return out.with_name(out.name + "-twin")


def export_repository(
    ckpt: CheckpointLike,
    out: Path | str,
    twin: Path | str | None = None,
    *,
    version: int = 1,
    k: int = 20,
    filter_seen: bool = True,
    max_batch_size: int = 1024,
    preferred_batch_sizes: tuple[int, ...] = (128, 512, 1024),
    max_queue_delay_us: int = 2000,
    twin_threads: int = 0,
    overwrite: bool = True,
) -> ExportResult:
    """Write version `version` of the model into the production repository at `out` and the CPU twin at `twin`
    (default `<out>-twin`).

    Other version directories are kept, so a new version can be rolled out next to the one being served; the
    version's own directory is replaced. A model directory without other versions is written afresh (config
    included); with other versions the new one must declare the same interface as the config they share, which
    is kept (ValueError otherwise). The top-level vocab/categories/metadata copies follow the newest version.
    `overwrite=False` (the continuous trainer, `interest-stream learn`): a version directory that exists already
    is never rewritten (FileExistsError), as a worker may be serving it.
    """
    if version < 1:
        raise ValueError(f"version {version}: Triton versions are positive integers")
    out, twin = Path(out), Path(twin) if twin else twin_dir_for(out)
    model = ckpt.model.eval().cpu()
    spec = ServingSpec(
        max_len=ckpt.encoder_config.max_len,
        d_model=model.item_emb.embedding_dim,
        k=min(k, model.item_emb.num_embeddings - 2),
        n_categories=len(ckpt.categories),
        n_scenarios=len(ckpt.encoder_config.scenarios),
        max_batch_size=max_batch_size,
        preferred_batch_sizes=tuple(b for b in preferred_batch_sizes if b <= max_batch_size),
        max_queue_delay_us=max_queue_delay_us,
    )
    if spec.n_categories != model.category_head.out_features or spec.n_categories == 0:
        raise ValueError(f"{len(ckpt.categories)} category names for a head of {model.category_head.out_features}")
    prod_model, twin_model = out / spec.name, twin / spec.name
    configs = {prod_model: spec.config("production"), twin_model: spec.config("twin", twin_threads)}
    others = {d: [v for v in version_dirs(d) if v != version] for d in configs}
    if not overwrite and any(version in version_dirs(d) for d in configs):
        raise FileExistsError(f"version {version} exists in {prod_model} or {twin_model}: versions are immutable")
    for d, config in configs.items():
        if others[d]:
            _check_same_interface(read_config(d / "config.pbtxt"), config, d, version)
    # Each version is written into a hidden staging directory (Triton loads only numbered ones) and renamed into
    # place once complete, so a process killed mid-export (the learner stopped, a pod evicted) never leaves a
    # half-written version for Triton to load or for the learner to resume from (`abandoned_staging` cleans up).
    staged = {d: d / f"{STAGING_PREFIX}{version}-{os.getpid()}" for d in configs}
    for d, stage in staged.items():
        if not others[d]:
            shutil.rmtree(d, ignore_errors=True)
        abandoned_staging(d)
        stage.mkdir(parents=True)
    prod_stage, twin_stage = staged[prod_model], staged[twin_model]
    onnx_path = export_onnx(ServingModel(model, spec.k, filter_seen), prod_stage / "model.onnx", spec.max_len)
    shutil.copy2(onnx_path, twin_stage / "model.onnx")
    (twin_stage / "model.py").write_text(resources.files("models").joinpath("triton_twin.py").read_text())

    meta = _metadata(ckpt, spec, onnx_path, filter_seen, version)
    vocab_json, categories_json = ckpt.vocab.to_json(), json.dumps(list(ckpt.categories))
    meta["bundle_sha256"] = bundle_hash(vocab_json.encode(), categories_json.encode(), meta["onnx_sha256"])
    bundles = {}
    for d, kind in ((prod_model, "production"), (twin_model, "twin")):
        bundles[d] = {
            "vocab.json": vocab_json,
            "categories.json": categories_json,
            "metadata.json": json.dumps({**meta, "repository": kind}, indent=2, default=str),
        }
        for name, text in bundles[d].items():
            (staged[d] / name).write_text(text)
    vdir = str(version)
    for d, stage in staged.items():  # complete: into place (the config first, for a model directory made now)
        if not others[d]:
            (d / "config.pbtxt").write_text(text_format.MessageToString(configs[d]))
        shutil.rmtree(d / vdir, ignore_errors=True)  # overwrite=True only: an immutable version was refused above
        stage.rename(d / vdir)
        if version >= max(others[d], default=0):  # the top-level copies follow the newest version
            for name, text in bundles[d].items():
                (d / name).write_text(text)
    return ExportResult(out, twin, prod_model / vdir / "model.onnx", meta)


STAGING_PREFIX = ".staging-"


def abandoned_staging(model_dir: Path) -> list[Path]:
    """Remove the staging directories an export killed mid-way left behind (returned); no export may be running
    on `model_dir` at the same time (one trainer per repository)."""
    gone = [p for p in model_dir.glob(f"{STAGING_PREFIX}*") if p.is_dir()] if model_dir.is_dir() else []
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def version_dirs(model_dir: Path) -> list[int]:
    """The numbered version directories of a Triton model directory, ascending ([] when there is none)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _check_same_interface(existing: mc.ModelConfig, new: mc.ModelConfig, model_dir: Path, version: int) -> None:
    """Versions of one Triton model share its config.pbtxt: a version with other inputs/outputs is a new model."""
    for part in ("name", "input", "output", "max_batch_size"):
        if getattr(existing, part) != getattr(new, part):
            raise ValueError(
                f"version {version} does not fit {model_dir / 'config.pbtxt'} ({part} differs): versions of one "
                "model share its interface; export a different interface as a new model or into a new repository"
            )


def _metadata(
    ckpt: CheckpointLike, spec: ServingSpec, onnx_path: Path, filter_seen: bool, version: int
) -> dict[str, Any]:
    md = dict(ckpt.metadata or {})
    sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    model_cfg = getattr(ckpt, "model_config", None)
    return {
        "model_name": spec.name,
        "model_version": md.get("model_version") or f"{md.get('dataset', 'model')}-{sha[:12]}",
        "triton_version": version,  # the version directory this bundle was written for
        "data_hash": md.get("data_hash"),
        "eval_metrics": md.get("eval_metrics") or md.get("test_metrics") or md.get("metrics"),
        "onnx_sha256": sha,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "exporter": f"torch.onnx legacy (TorchScript), opset {OPSET}, torch {torch.__version__}",
        "inputs": [{"name": n, "datatype": t, "dims": d} for n, t, d in spec.inputs()],
        "outputs": [{"name": n, "datatype": t, "dims": d} for n, t, d in spec.outputs()],
        "top_k": spec.k,
        "filter_seen": filter_seen,
        "top_scores": "item logits (scaled dot products)",
        "category_scores": "per genre, the estimated share of the coming items that carry it (0..1, multi-label)",
        "max_batch_size": spec.max_batch_size,
        "encoder_config": ckpt.encoder_config.to_dict(),
        "model_config": model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else None,
        "n_items": len(ckpt.vocab),
        "checkpoint_metadata": md,
    }


def read_config(path: Path | str) -> mc.ModelConfig:
    """Parse a config.pbtxt (tests compare the production and twin configs with it)."""
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
