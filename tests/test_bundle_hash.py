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


@pytest.mark.parametrize("dies_in", ["export_onnx", "bundle_hash"])
def test_an_export_killed_mid_way_leaves_no_version_and_the_next_one_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies_in: str
):
    """A trainer killed while writing version 2 (here: the ONNX export, or after it, before the bundle is hashed)
    leaves version 1 alone and no directory named 2 that Triton would try to load or the trainer resume from."""
    from models import export
    from models.export import STAGING_PREFIX, export_repository, version_dirs

    repo, twin = tmp_path / "repo", tmp_path / "repo-twin"
    export_repository(make_tiny_checkpoint(seed=0), repo, version=1, twin_threads=1, overwrite=False)
    real = getattr(export, dies_in)

    def killed(*args, **kwargs):
        real(*args, **kwargs)  # the work half done: files are on disk
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as m:
        m.setattr(export, dies_in, killed)
        with pytest.raises(KeyboardInterrupt):
            export_repository(make_tiny_checkpoint(seed=1), repo, version=2, twin_threads=1, overwrite=False)
    for root in (repo, twin):
        assert version_dirs(root / MODEL) == [1]
        assert list((root / MODEL).glob(f"{STAGING_PREFIX}*")), "the half-written version stayed aside"
        assert json.loads((root / MODEL / "metadata.json").read_text())["triton_version"] == 1
    export_repository(make_tiny_checkpoint(seed=1), repo, version=2, twin_threads=1, overwrite=False)
    for root in (repo, twin):
        assert version_dirs(root / MODEL) == [1, 2] and not list((root / MODEL).glob(f"{STAGING_PREFIX}*"))
        assert ModelBundle.load(root / MODEL, "2").vocab.items
