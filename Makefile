# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
# `make install` is the shared, idempotent step (re-runs only when the metadata changes).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test lint format protos clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	@touch $(STAMP)

# `make serve MODEL=runs/har/model` serves a trained model instead of the built-in default.
serve: install
	$(PY) scripts/serve_all.py $(if $(MODEL),--model $(MODEL))

# Two pytest workers (pytest-xdist), one test file each at a time, the slowest files first
# (tests/conftest.py): most of the suite waits on XLA compiling, one core's work. On a 2-core
# machine, from a clean checkout: 860-1,181 s of pytest, 15-21 min with the install, in four
# runs on 2026-11-27 (670 tests at the last); the same machine has taken 1,316 s at times.
# `make test TEST_WORKERS=0` runs it in one process; plain `pytest` does too.
TEST_WORKERS ?= 2

test: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

protos: install
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
