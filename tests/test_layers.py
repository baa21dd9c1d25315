"""One-way layers: the import-linter contracts in pyproject.toml hold, can fail, and the worker never loads torch."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path, config: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(cwd), "PATH": str(LINT.parent)}
    return subprocess.run(
        [str(LINT), "--config", str(config), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_import_contracts_are_kept() -> None:
    result = _lint(ROOT, ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_import_contracts_catch_a_wrong_import(tmp_path: Path) -> None:
    """The same contracts on a tiny tree with one import against the layers, and one of torch in the worker."""
    for package in ("core", "stream", "models", "local"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")
    (tmp_path / "models" / "train.py").write_text("import stream.app\n")  # models -> worker: forbidden
    (tmp_path / "stream" / "app.py").write_text("import torch\n")  # torch in the worker
    (tmp_path / "core" / "schema.py").write_text("")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    lines = ["[tool.importlinter]", 'root_packages = ["core", "stream", "models", "local"]',
             "include_external_packages = true"]  # fmt: skip
    for contract in config["contracts"]:
        lines.append("[[tool.importlinter.contracts]]")
        lines += [f"{k} = {v!r}".replace("'", '"') for k, v in contract.items()]
    (tmp_path / "pyproject.toml").write_text("\n".join(lines) + "\n")
    result = _lint(tmp_path, tmp_path / "pyproject.toml")
    assert result.returncode != 0
    assert "local tooling > worker | models > core BROKEN" in result.stdout
    assert "never import torch or onnx BROKEN" in result.stdout


def test_worker_import_closure_has_no_torch() -> None:
    """Everything the worker process imports at start (Faust, Triton client, ...) leaves torch unloaded."""
    code = (
        "import sys, stream.worker, stream.app, stream.inference, stream.settings, stream.metrics;"
        "top = {m.split('.')[0] for m in sys.modules};"
        "bad = sorted(top & {'torch', 'onnx', 'onnxruntime', 'models', 'local'});"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"the worker imports {result.stdout.strip()} {result.stderr[-2000:]}"
