# Two commands on a fresh machine with Python 3.11: `make quickstart` and `make test`.
# Both set up .venv first (idempotent: seconds when nothing changed).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install quickstart lifecycle test lint format bench-setup

install:
	@bash cluster/install.sh $(VENV)

# The quick start: the whole lifecycle (data, train, publish, eval, serve) at its defaults.
quickstart: lifecycle

lifecycle: install
	$(BIN)/rayllm lifecycle $(ARGS)

test: install
	$(BIN)/ruff check rayllm jobs tests
	$(BIN)/ruff format --check rayllm jobs tests
	$(BIN)/python -m pytest -q --durations=15 $(ARGS)

# The datatrove baseline of `rayllm bench data`, in its own environment under $RAYLLM_CACHE.
bench-setup: install
	$(BIN)/python -c "from rayllm.bench.data import build_datatrove_env; build_datatrove_env()"

lint: install
	$(BIN)/ruff check rayllm jobs tests

format: install
	$(BIN)/ruff format rayllm jobs tests
	$(BIN)/ruff check --fix rayllm jobs tests
