"""`interest-stream bench model`: two exported graphs of one model side by side (tiny sizes, seconds)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from local.bench.model import Graph, agreement, run
from tests.fixtures.triton import TinyCheckpoint

CAP = 20


@pytest.fixture(scope="module")
def two_graphs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One tiny model over the MovieLens vocabulary exported twice: as is (the previous graph) and reading only its
    newest CAP events (the new one): equal on short histories, different on long ones."""
    import torch

    from core.encoding import EncoderConfig, Vocabulary
    from models.datasets import movielens_movies
    from models.export import export_repository
    from models.model import InterestTransformer, ModelConfig

    torch.manual_seed(2)
    movies = movielens_movies()
    genres = sorted({g for m in movies.values() for g in m.genres})
    vocab, enc = Vocabulary(sorted(movies)), EncoderConfig()
    cfg = ModelConfig.for_encoder(enc, len(vocab), n_categories=len(genres), d_model=16, n_heads=2)
    model = InterestTransformer(cfg).eval()
    root = tmp_path_factory.mktemp("bench-model")
    repos = []
    for name, c in (("previous", cfg), ("new", dataclasses.replace(cfg, serve_len=CAP))):
        m = InterestTransformer(c).eval()
        m.load_state_dict(model.state_dict())
        ckpt: Any = TinyCheckpoint(m, c, enc, vocab, genres, {"model_version": name})
        repos.append(export_repository(ckpt, root / name / "model_repository", twin_threads=1).twin)
    return repos[0], repos[1]


def test_graphs_agree_where_the_cap_cannot_matter(two_graphs) -> None:
    previous, new = Graph.open(two_graphs[0]), Graph.open(two_graphs[1])
    assert (previous.serve_len, new.serve_len) == (200, CAP)
    full, short = agreement(previous, new)
    for name in ("interest", "top_scores", "category_scores", "event_weights"):
        assert short[name] < 1e-5, (name, short)
    assert short["top_items"] < 0.02  # share of rows whose top items differ (float ties only)
    assert full["interest"] > 1e-3 and full["top_items"] > 0.5  # long histories: the cap reads fewer events


def test_cli_prints_the_result_line(two_graphs) -> None:
    from local.cli import app

    args = ["bench", "model", "--repo", str(two_graphs[1]), "--previous", str(two_graphs[0]), "--threads", "1"]
    args += ["--batches", "1,32", "--twin-batches", "", "--seconds", "0.2", "--rounds", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    keys = dict(kv.split("=") for kv in line.removeprefix("RESULT ").split())
    assert line.startswith("RESULT ") and {"cpu_ms_per_seq_batch32", "speedup_vs_previous", "ndcg10"} <= set(keys)
    assert float(keys["cpu_ms_per_seq_batch32"]) > 0 and 0 <= float(keys["ndcg10"]) <= 1
    assert "| onnxruntime | 1 | 32 |" in result.output


@pytest.mark.triton
def test_through_the_twin(two_graphs) -> None:
    r = run(two_graphs[1], two_graphs[0], threads=(1,), batches=(8,), twin_batches=(8,), seconds=0.2, rounds=1,
            dataset=None, log=lambda _: None)  # fmt: skip
    twin = r.cost("twin", 1, 8)
    assert twin is not None and twin.previous_ms > 0 and twin.new_ms > 0
    assert r.ndcg10 is None
