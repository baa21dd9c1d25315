"""The checkpoint on disk: `checkpoint.pt` (weights, configs, vocabulary, genres, metadata) with vocab.json,
categories.json, metrics.json and the training curve beside it; `models.train` writes it, everything else loads it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.encoding import EncoderConfig, Vocabulary
from models.model import InterestTransformer, ModelConfig


@dataclass
class Checkpoint:
    model: InterestTransformer  # eval mode
    model_config: ModelConfig
    encoder_config: EncoderConfig
    vocab: Vocabulary
    categories: list[str]
    item_categories: torch.Tensor | None
    metadata: dict = field(default_factory=dict)


def save(ckpt: Checkpoint, out: Path, history: dict[str, list[float]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": {k: v.cpu() for k, v in ckpt.model.state_dict().items()},
            "model_config": ckpt.model_config.to_dict(),
            "encoder_config": ckpt.encoder_config.to_dict(),
            "vocab": ckpt.vocab.items,
            "categories": ckpt.categories,
            "item_categories": None if ckpt.item_categories is None else ckpt.item_categories.cpu(),
            "metadata": ckpt.metadata,
        },
        out / "checkpoint.pt",
    )
    (out / "vocab.json").write_text(ckpt.vocab.to_json())
    (out / "categories.json").write_text(json.dumps(ckpt.categories))
    (out / "metrics.json").write_text(json.dumps({**ckpt.metadata, "history": history}, indent=2))
    plot_curve(history, out / "train_curve.png")


#: Parameters added after checkpoints were first saved; their zero init is exactly the model without them.
NEWER_PARAMETERS = {"scenario_emb.weight", "target_emb.weight", "item_item_short_weight"}

#: Old name -> new name of the item-item scorer's buffers (state dict) and of its rank (ModelConfig, TrainConfig).
#: They were called knn_* while they held EASE's factors by default (issue 27); checkpoints saved before load as is.
RENAMED_PARAMETERS = {
    "knn_factors": "item_item_factors",
    "knn_decay": "item_item_decay",
    "knn_weight": "item_item_weight",
    "knn_short_weight": "item_item_short_weight",
}
RENAMED_CONFIG = {"knn_rank": "item_item_rank"}
RENAMED_METADATA = {"knn": "item_item"}  # the scorer's fit (val_ndcg10, weight, decay, lam, short_weight)


def renamed(d: dict, names: dict[str, str]) -> dict:
    """`d` with its keys renamed by `names` (old -> new), order kept; a key already under its new name wins."""
    return {names.get(k, k): v for k, v in d.items() if not (k in names and names[k] in d)}


def upgrade(blob: dict) -> dict:
    """A checkpoint blob saved under older names, in today's names (a copy; today's blobs come back equal)."""
    meta = renamed(blob.get("metadata") or {}, RENAMED_METADATA)
    if "train_config" in meta:
        meta["train_config"] = renamed(meta["train_config"], RENAMED_CONFIG)
    return blob | {
        "state_dict": renamed(blob["state_dict"], RENAMED_PARAMETERS),
        "model_config": renamed(blob["model_config"], RENAMED_CONFIG),
        "metadata": meta,
    }


def load_checkpoint(path: str | Path, device: str = "cpu") -> Checkpoint:
    """A checkpoint directory (or its checkpoint.pt) -> the model in eval mode with everything to encode inputs."""
    path = Path(path)
    blob = torch.load(path / "checkpoint.pt" if path.is_dir() else path, map_location=device, weights_only=True)
    blob = upgrade(blob)
    mcfg = ModelConfig(**blob["model_config"])
    model = InterestTransformer(mcfg)
    missing, unexpected = model.load_state_dict(blob["state_dict"], strict=False)
    if unexpected or set(missing) - NEWER_PARAMETERS:
        raise RuntimeError(f"checkpoint {path} does not fit the model: missing {missing}, unexpected {unexpected}")
    return Checkpoint(
        model.to(device).eval(),
        mcfg,
        EncoderConfig.from_dict(blob["encoder_config"]),
        Vocabulary(blob["vocab"]),
        list(blob["categories"]),
        blob["item_categories"],
        blob["metadata"],
    )


def plot_curve(history: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history["loss"], color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(history["val_ndcg10"], color="tab:orange", label="val NDCG@10")
    ax2.set_ylabel("validation NDCG@10", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
