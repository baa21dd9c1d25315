# Two commands do all set-up on a fresh clone:
#   make demo   runs the embedded local pipeline
#   make test   runs the tests
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench-ingest

$(STAMP): pyproject.toml Makefile scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/interest-stream demo

test: install
	$(VENV)/bin/ruff check core stream models local tests
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check core stream models local tests
	$(VENV)/bin/ruff format --check core stream models local tests
