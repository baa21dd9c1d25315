#!/usr/bin/env bash
# Creates the project's virtualenv. torch==2.13.0 is installed first: that exact pin is a CPU build on
# local disk, while any looser spec (pulled in by another package) downloads a multi-GB CUDA build.
set -euo pipefail
venv=${1:-.venv}
python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q -e '.[train,local,dev]'

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
