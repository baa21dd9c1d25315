# Two commands do all set-up on a fresh clone:
#   make demo        runs the embedded local pipeline
#   make test        runs the tests: all of them (what CI runs, .ci/run)
#   make test-fast   runs the unit tier: no broker, no tritonserver, nothing slow
# The venv is installed from the hashed lock in requirements/; `make lock` refreshes it from pyproject.toml.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint lock bench-ingest

$(STAMP): pyproject.toml Makefile scripts/setup.sh requirements/dev.txt requirements/torch.txt
	bash scripts/setup.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/interest-stream demo

# --durations: the slowest tests in every run's output, so the suite's cost stays visible.
test: install
	$(VENV)/bin/ruff check core stream models local tests
	$(PY) -m pytest --durations=15

# The unit tier for the inner loop (markers in pyproject.toml, assigned by tests/conftest.py): about a minute.
test-fast: install
	$(VENV)/bin/ruff check core stream models local tests
	$(PY) -m pytest -m "not broker and not triton and not slow" --durations=15

lint: install
	$(VENV)/bin/ruff check core stream models local tests
	$(VENV)/bin/ruff format --check core stream models local tests

# Refresh the hashed lock (requirements/dev.txt, requirements/worker.txt) from pyproject.toml; UPGRADE=1 moves
# every pin to the newest allowed release. Then `make test` (it reinstalls the venv from the new lock).
lock:
	UPGRADE=$(UPGRADE) bash scripts/lock.sh
