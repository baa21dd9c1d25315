"""The hashed lock (requirements/): complete, consistent with pyproject.toml, used by every install, and what this
environment runs. A new release of anything cannot slip in unnoticed: the venv comes from the lock, and a venv
that drifted from it fails `test_this_environment_is_the_lock` (`make install` after `make lock` repairs it)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from stream import pins

ROOT = Path(__file__).parents[1]
REQ = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """{name: (version, hashes)} of a `uv pip compile --generate-hashes` file."""
    locked: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", path.read_text()):
        if match := re.match(r"([A-Za-z0-9._-]+)==(\S+)", block):
            name, version = canonicalize_name(match[1]), match[2]
            locked[name] = (version, re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return locked


DEV, WORKER = read_lock(REQ / "dev.txt"), read_lock(REQ / "worker.txt")
LEARNER = read_lock(REQ / "learner.txt")  # the learner image's, besides torch (deploy/Dockerfile, target learner)
(TORCH,) = [Requirement(line) for line in (REQ / "torch.txt").read_text().splitlines() if line[:1].isalpha()]
TORCH_VERSION = next(iter(TORCH.specifier)).version  # torch.txt holds one exact pin


def requirements(*extras: str) -> list[Requirement]:
    project = PYPROJECT["project"]
    specs = [*project["dependencies"], *(s for e in extras for s in project["optional-dependencies"][e])]
    return [Requirement(s) for s in specs]


def test_every_locked_package_is_pinned_with_hashes() -> None:
    assert len(DEV) > 90 and len(WORKER) > 40 and len(LEARNER) > len(WORKER)
    for lock in (DEV, WORKER, LEARNER):
        assert all(hashes for _, hashes in lock.values()), [n for n, (_, h) in lock.items() if not h]
        assert all(re.fullmatch(r"[0-9][0-9a-z.+!-]*", v) for v, _ in lock.values())


def test_the_worker_lock_is_the_dev_lock_less_the_tools_and_never_torch() -> None:
    assert {n: v for n, (v, _) in WORKER.items()} == {n: DEV[n][0] for n in WORKER}, "same versions as dev.txt"
    assert not {"torch", "onnx", "onnxruntime", "pytest", "matplotlib"} & set(WORKER)
    assert "torch" not in DEV, "torch is outside the hashed lock (requirements/torch.txt)"
    assert not [n for n in DEV if re.match(r"nvidia-(cu|nccl|nvjitlink)", n)], "a CUDA torch's dependencies"


def test_the_learner_lock_is_the_dev_lock_for_the_train_extra_less_torch_itself() -> None:
    """The learner image installs requirements/learner.txt with hashes and then torch by its exact pin: the lock
    holds the train extra and torch's own dependencies, at dev.txt's versions, and neither torch nor the tools."""
    assert {n: v for n, (v, _) in LEARNER.items()} == {n: DEV[n][0] for n in LEARNER}, "same versions as dev.txt"
    assert set(WORKER) <= set(LEARNER) and {"onnx", "onnxruntime", "onnxscript", "matplotlib"} <= set(LEARNER)
    assert not {"torch", "pytest", "noida-db", "nvidia-pytriton", "atheris"} & set(LEARNER)
    assert not [n for n in LEARNER if re.match(r"nvidia-|triton$", n)], "a CUDA torch's dependencies"
    torch_deps = [Requirement(r) for r in metadata.requires("torch") or []]
    needed = {canonicalize_name(r.name) for r in torch_deps if r.marker is None or r.marker.evaluate({"extra": ""})}
    assert needed - {"setuptools"} and needed <= set(LEARNER), needed - set(LEARNER)


def test_the_locks_satisfy_pyproject() -> None:
    """Edited pyproject.toml without `make lock`: a dependency missing from the lock, or a pin it no longer allows."""
    for lock, reqs in ((WORKER, requirements()), (DEV, requirements("train", "local", "dev")),
                       (LEARNER, requirements("train"))):  # fmt: skip
        for req in reqs:
            name = canonicalize_name(req.name)
            if name == "torch":
                assert req.specifier.contains(TORCH_VERSION), req
                continue
            assert name in lock, f"{req} is not in the lock: run make lock"
            assert req.specifier.contains(lock[name][0], prereleases=True), f"{req}: locked {lock[name][0]}"
    (build,) = [Requirement(line) for line in (REQ / "build.in").read_text().splitlines() if line[:1].isalpha()]
    assert [str(build)] == PYPROJECT["build-system"]["requires"] and "setuptools" in DEV and "setuptools" in WORKER


def test_the_lock_holds_the_pinned_releases() -> None:
    for pin in pins.PINS.values():
        name = canonicalize_name(pin.distribution)
        assert DEV[name][0] == WORKER[name][0] == pin.version, (pin, DEV[name][0])


def test_this_environment_is_the_lock() -> None:
    drifted = {}
    for name, (version, _) in DEV.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "missing"
        if installed != version:
            drifted[name] = f"{installed} installed, {version} locked"
    assert drifted == {}, "reinstall from the lock: make install (scripts/setup.sh)"
    assert Version(metadata.version("torch")).public == TORCH_VERSION, "requirements/torch.txt"


def test_every_install_uses_the_lock() -> None:
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "--require-hashes -r requirements/dev.txt" in setup and "--no-deps -r requirements/torch.txt" in setup
    assert "--no-deps --no-build-isolation -e ." in setup
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "--require-hashes -r requirements/worker.txt" in dockerfile
    assert "--require-hashes -r requirements/learner.txt" in dockerfile
    (torch,) = re.findall(r"pip install ([^\n]*)-r requirements/torch\.txt", dockerfile)
    assert "--no-deps" in torch, "torch's dependencies come hashed, from requirements/learner.txt"
    assert re.findall(r"pip install ([^\n]*) \.", dockerfile) == ["--no-deps --no-build-isolation"] * 2
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^lock:\n\t.*scripts/lock\.sh", makefile, re.M) and "requirements/dev.txt" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
