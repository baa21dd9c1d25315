#!/usr/bin/env bash
# Refreshes the hashed lock from pyproject.toml: `make lock` (`make lock UPGRADE=1`: every pin moves to the newest
# release pyproject.toml allows; without it, pins stay unless pyproject.toml no longer allows them). Writes
#   requirements/dev.txt     what scripts/setup.sh, so every clone and CI, installs: the worker's dependencies, the
#                            extras train (less torch: requirements/torch.txt), local and dev, the build backend
#   requirements/worker.txt  what the worker image installs (deploy/Dockerfile): a subset, at dev.txt's versions
#   requirements/learner.txt what the learner image installs besides torch (deploy/Dockerfile, target learner): the
#                            package's dependencies and the train extra's (torch's own included), at dev.txt's versions
# Then run `make test`: it installs the new lock, and tests/test_pins.py fails if Faust or aiokafka moved.
set -euo pipefail
cd "$(dirname "$0")/.."

# The resolver (uv), at a hashed release, in its own venv: the project's venv is only ever installed from the lock.
tool=${LOCK_VENV:-.lock-venv}
if [ ! -x "$tool/bin/uv" ]; then
    python3.11 -m venv "$tool" 2>/dev/null || python3 -m venv "$tool"
    "$tool/bin/python" -m pip install -q --require-hashes -r requirements/lock-tool.txt
fi
compile=("$tool/bin/uv" pip compile --quiet --python-version 3.11 --generate-hashes --custom-compile-command "make lock")
if [ -n "${UPGRADE:-}" ]; then
    compile+=(--upgrade)
fi

# torch is not in the lock, but its dependencies are: they are resolved from the same CPU wheel setup.sh installs,
# found where pip finds it (TORCH_FIND_LINKS, else pip's find-links: /opt/wheels here), never from PyPI's CUDA build.
links=()
for dir in ${TORCH_FIND_LINKS:-${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}}; do
    links+=(--find-links "$dir")
done

# Each file is written beside the lock (the old pins are the resolver's preferences) and replaces it only once
# it is complete and checked, so a failed run leaves the lock as it was.
new=$(mktemp -d)
trap 'rm -rf "$new"' EXIT
cp requirements/dev.txt requirements/worker.txt requirements/learner.txt "$new/" 2>/dev/null || true
"${compile[@]}" pyproject.toml requirements/build.in --extra train --extra local --extra dev \
    -c requirements/torch.txt --no-emit-package torch "${links[@]}" -o "$new/dev.txt"
if grep -qE '^(triton|nvidia-(cu|nccl|nvjitlink|nvtx|nvshmem)[a-z0-9-]*)==' "$new/dev.txt"; then
    echo "lock: torch was resolved as a CUDA build (its nvidia-*/triton dependencies came with it); set" \
        "TORCH_FIND_LINKS to the directory holding the torch CPU wheel and run it again" >&2
    exit 1
fi
mv "$new/dev.txt" requirements/dev.txt
"${compile[@]}" pyproject.toml requirements/build.in -c requirements/dev.txt -o "$new/worker.txt"
mv "$new/worker.txt" requirements/worker.txt
"${compile[@]}" pyproject.toml requirements/build.in --extra train -c requirements/dev.txt -c requirements/torch.txt \
    --no-emit-package torch "${links[@]}" -o "$new/learner.txt"
mv "$new/learner.txt" requirements/learner.txt
echo "lock: requirements/dev.txt $(grep -c '^[a-z0-9].*==' requirements/dev.txt) packages," \
    "requirements/worker.txt $(grep -c '^[a-z0-9].*==' requirements/worker.txt)," \
    "requirements/learner.txt $(grep -c '^[a-z0-9].*==' requirements/learner.txt)"
