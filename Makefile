# bomstream: `make run` starts the gateway on the embedded broker, `make demo`
# adds simulated enrichment jobs to watch in a browser, `make test` sets
# everything up and runs every check, `make bench` measures.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck pytest bench demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/bomstream serve $(ARGS)

demo: $(STAMP)
	$(BIN)/bomstream demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

typecheck: $(STAMP)
	$(BIN)/mypy --strict src

pytest: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

# Minutes, not seconds: the gateway pinned to core 0, Redis and the load
# client on core 1, every scenario three times. Rewrites the README table.
bench: $(STAMP)
	$(BIN)/python bench/run.py --readme $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
