# prostlab: the two commands a newcomer needs are `make demo` and `make test`.
# Each sets up a local virtual environment (.venv) first, so a fresh clone needs nothing else.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; set TORCH_SPEC=torch to take your platform's default (CUDA) build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/prostlab render --pose 0 0 0 0 0 0 --pose 0 0 90 0 0 0 --pose 20 0 0 0 0 0 \
		--colorbar --out results/demo
	@echo "DRRs of the bundled chest CT are in results/demo/"

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests bench

bench: setup
	$(BIN)/python bench/projector.py

gpu-check: setup
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) results .pytest_cache
