#!/usr/bin/env bash
# Creates the project's virtualenv. torch==2.13.0 is installed first: that exact pin is a CPU build on
# local disk, while any looser spec (pulled in by another package) downloads a multi-GB CUDA build.
set -euo pipefail
venv=${1:-.venv}
python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q -e '.[train,local,dev]'
