#!/usr/bin/env bash
# Creates the project's virtualenv from the hashed lock: every clone and CI test the same versions.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q)
# Every dependency, with its hash (requirements/dev.txt; `make lock` refreshes it): pip refuses a file whose hash
# differs and any dependency the lock does not list.
"${pip[@]}" --require-hashes -r requirements/dev.txt
# torch, by exact version and without dependencies (they came with the lock): requirements/torch.txt says why it is
# not hashed. That exact pin is a CPU build on local disk; a looser spec would download a multi-GB CUDA build.
"${pip[@]}" --no-deps -r requirements/torch.txt
# The project itself, editable, resolving nothing more (its build backend is in the lock too).
"${pip[@]}" --no-deps --no-build-isolation -e .
"$venv/bin/python" -m pip check

# ---------------------------------------------------------------------------------------------------------
# Deployment checks (tests/test_deploy.py): promtool (Debian package prometheus) and docker-compose v1.
# Idempotent: installs only what is missing; apt-get needs root, otherwise say what to install.
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing Debian packages: ${missing[*]}"
        apt-get update -qq
        # Only the binaries are needed: no recommends (node exporter, web assets); no service is started.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "setup: the deployment tests need Debian packages: ${missing[*]}" >&2
        echo "setup: run as root: apt-get install --no-install-recommends ${missing[*]}" >&2
    fi
fi
