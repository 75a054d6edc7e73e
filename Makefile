# prostlab: the two commands a newcomer needs are `make demo` and `make test`.
# Each sets up a local virtual environment (.venv) first, so a fresh clone needs nothing else.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; set TORCH_SPEC=torch to take your platform's default (CUDA) build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo xray-demo test lint bench gpu-check heldout patients clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# The capture-range benchmark in small, on a patient the network never saw: the shipped network
# (checkpoints/prost_cpu_patients.ckpt) was trained on three other patients and chosen on a
# fourth, and registers 16 wide-offset cases (20 deg and 50 mm per axis) of the bundled chest
# with realistic targets, beside NCC and multiscale NCC with SGD and with Adam (configs/cpu.yaml;
# the 500-iteration `net` alone is left out); then DRRs of the CT at three poses.
DEMO_METHODS := {"ncc": "ncc", "mncc": "mncc", "mncc_adam": "mncc_adam", \
	"net_gradncc": "net_gradncc_adam", "net_ncc": "net_ncc"}
demo: setup
	$(BIN)/prostlab test --config configs/cpu.yaml --ckpt_path checkpoints/prost_cpu_patients.ckpt \
		--data.test_samples 16 --data.batch_size 16 --model.benchmark.methods '$(DEMO_METHODS)' \
		--model.benchmark.output_dir results/demo --trainer.logger.init_args.save_dir runs/demo
	$(BIN)/prostlab render --pose 0 0 0 0 0 0 --pose 0 0 90 0 0 0 --pose 20 0 0 0 0 0 \
		--colorbar --out results/demo/latest/drr
	@echo "benchmark tables, figures and DRRs: results/demo/latest/ (start with summary.md)"

# prostlab register on a synthetic DICOM X-ray of the bundled CT (docs/xray.md): the truth is
# rotation (3, -5, 6) deg, translation (8, -12, 15) mm; the registration starts from the AP view
# with the coarse search. docs/figures/register_overlay.png is its overlay.png.
xray-demo: setup
	$(BIN)/python scripts/synthetic_xray.py --pose 3 -5 6 8 -12 15 --out results/xray_demo/chest.dcm
	$(BIN)/prostlab register --xray results/xray_demo/chest.dcm --ct data/chest_ct_128 \
		--init-view ap --search --out results/xray_demo/reg --overwrite
	@echo "pose.json, overlay.png, registration.gif: results/xray_demo/reg/"

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests bench

bench: setup
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python -m pip install --quiet --no-deps diffdrr==0.6.1
	$(BIN)/python bench/projector.py --threads 2

# The held-out cube of configs/heldout_spine.yaml (needs ../shared/data/chest_ct).
heldout: cache/spine_200/meta.json

cache/spine_200/meta.json: | setup
	$(BIN)/prostlab prepare --ct ../shared/data/chest_ct/ct.nii.gz \
		--labels ../shared/data/chest_ct/labels.nii.gz --out cache/spine_200 \
		--bones 29,30,31,32,33,34,35,36 --side-mm 200

# The shared scans of four more patients, prepared without labels (bones by HU threshold) into
# cache/patients/<name>, for configs/patients.yaml (needs ../shared/data).
SHARED_SCANS := chest_cta chest_lung1 chest_lung2 pelvis_ct
patients: $(SHARED_SCANS:%=cache/patients/%/meta.json)

cache/patients/%/meta.json: | setup
	$(BIN)/prostlab prepare --ct ../shared/data/$*/ct.nii.gz --out cache/patients/$* --overwrite

gpu-check: setup
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) results .pytest_cache
