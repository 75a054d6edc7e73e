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

# A short registration benchmark with the shipped network on the bundled chest CT (CPU, 10 cases
# per method, iterations capped at 60), then DRRs of it at three poses. Each run writes a new
# folder results/demo/<date_time>/ (earlier runs are kept); results/demo/latest links to it.
demo: setup
	$(BIN)/prostlab test --config configs/cpu.yaml --ckpt_path checkpoints/prost_cpu_chest.ckpt \
		--data.test_samples 10 --data.batch_size 10 --model.benchmark.max_iterations 60 \
		--model.benchmark.output_dir results/demo --trainer.logger.init_args.save_dir runs/demo
	$(BIN)/prostlab render --pose 0 0 0 0 0 0 --pose 0 0 90 0 0 0 --pose 20 0 0 0 0 0 \
		--colorbar --out results/demo/latest/drr
	@echo "benchmark tables, figures and DRRs: results/demo/latest/"

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests bench

bench: setup
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python -m pip install --quiet --no-deps diffdrr==0.6.1
	$(BIN)/python bench/projector.py --threads 1

gpu-check: setup
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) results .pytest_cache
