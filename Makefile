# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
LOCK   := requirements.lock

.PHONY: run test lint typecheck install lock clean-data

TORCH  := torch==2.13.0

# torch first and alone: a range it satisfies then installs nothing more (see README).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Start the API, workers and the embedded stack (PostgreSQL, Redis, Qdrant) in one process.
run: install
	$(BIN)/tenantrag dev

## Lint, type-check and run the whole suite (real PostgreSQL/Redis: from the env or embedded).
test: lint typecheck
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

typecheck: install
	$(BIN)/mypy

## Re-pin every dependency after changing pyproject.toml.
lock: install
	$(BIN)/python -m pip freeze --exclude-editable \
		| grep -v -E '^(-e |torch==|nvidia-|triton==)' > $(LOCK)

## Install the local vLLM CPU server's own venv and convert its model (once; VLLM_CACHE_DIR).
.PHONY: vllm
vllm: install
	$(BIN)/python -m app.devstack.local_vllm prepare

clean-data:
	rm -rf .data
