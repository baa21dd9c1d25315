"""Immutable model versions (issue 27, item 1): the trainer never rewrites a version directory, and the worker
refuses a version whose bundle does not hash to what its metadata.json says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.bundle import bundle_hash
from stream.inference import ModelBundle
from tests.fixtures.triton import make_tiny_checkpoint

MODEL = "interest_transformer"


def test_bundle_hash_covers_every_part():
    base = bundle_hash(b'{"items": ["a"]}', b'["x"]', "00ff")
    assert len(base) == 64 and base == bundle_hash(b'{"items": ["a"]}', b'["x"]', "00ff")
    assert base != bundle_hash(b'{"items": ["b"]}', b'["x"]', "00ff")
    assert base != bundle_hash(b'{"items": ["a"]}', b'["y"]', "00ff")
    assert base != bundle_hash(b'{"items": ["a"]}', b'["x"]', "00fe")
    assert bundle_hash(b"ab", b"c", "") != bundle_hash(b"a", b"bc", "")  # parts cannot shift into each other


def test_a_version_is_never_rewritten_and_a_tampered_bundle_is_refused(tmp_path: Path):
    from models.export import export_repository

    repo = tmp_path / "repo"
    export_repository(make_tiny_checkpoint(seed=0), repo, version=1, twin_threads=1, overwrite=False)
    onnx = (repo / MODEL / "1" / "model.onnx").read_bytes()
    with pytest.raises(FileExistsError, match="immutable"):
        export_repository(make_tiny_checkpoint(seed=1), repo, version=1, twin_threads=1, overwrite=False)
    assert (repo / MODEL / "1" / "model.onnx").read_bytes() == onnx
    export_repository(make_tiny_checkpoint(seed=1), repo, version=2, twin_threads=1, overwrite=False)
    for root in (repo, tmp_path / "repo-twin"):
        v1 = root / MODEL / "1"
        md = json.loads((v1 / "metadata.json").read_text())
        assert md["bundle_sha256"] == bundle_hash(
            (v1 / "vocab.json").read_bytes(), (v1 / "categories.json").read_bytes(), md["onnx_sha256"]
        )
        assert ModelBundle.load(root / MODEL, "1").vocab.items  # loads as written
        vocab = json.loads((v1 / "vocab.json").read_text())
        vocab["items"] = vocab["items"][::-1]  # another version's vocabulary, say: the wrong items would be named
        (v1 / "vocab.json").write_text(json.dumps(vocab))
        with pytest.raises(ValueError, match="bundle_sha256"):
            ModelBundle.load(root / MODEL, "1")
        assert ModelBundle.load(root / MODEL, "2").vocab.items  # the other version is untouched
