#!/usr/bin/env bash
# All GPU checks in one short script (`make gpu-check`; under 4 minutes on an H200):
#   1. the GPU tests (`pytest -m gpu`): CuPy kernels against the torch backend in float32 and
#      float64, gradcheck / gradgradcheck on the GPU, a 1024^2 DRR of a 256^3 volume, streams
#      and devices;
#   2. the GPU benchmark (bench/projector_gpu.py), whose markdown table comes last;
#   3. the CUDA kernels alone on the 384^3 volume (larger than the L2 cache), in the linear
#      layout and then with 8^3 bricks and rays in Morton order (the CPU build's defaults),
#      to decide whether the GPU should use them too;
#   4. training steps and cases per second of configs/cpu.yaml's step at batch 2 and 16
#      (bench/training.py --device cuda: the step before issue 20's pruned gradients and now).
# Needs a CUDA build of torch and CuPy in the environment: `pip install -e '.[gpu]'` (and
# `make setup TORCH_SPEC=torch` for torch's CUDA wheel).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"

"$PYTHON" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu-check: torch {torch.__version__} sees no CUDA device (a CPU build, or no GPU)")
try:
    import cupy
except ImportError:
    sys.exit("gpu-check: CuPy is missing; pip install -e '.[gpu]'")
print(f"gpu-check: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
      f"CuPy {cupy.__version__}, {torch.cuda.device_count()} device(s)")
PY

echo "== GPU tests"
timeout 100 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider

echo "== GPU benchmark"
timeout 130 "$PYTHON" bench/projector_gpu.py --quick --time-limit 90 --out results/projector_gpu.md

echo "== GPU memory layouts (cupy, 384^3)"
layout=(--quick --volumes 384 --libs cupy --passes forward fwd+bwd --time-limit 25)
timeout 40 "$PYTHON" bench/projector_gpu.py "${layout[@]}" --out results/projector_gpu_linear.md
timeout 40 "$PYTHON" bench/projector_gpu.py "${layout[@]}" --cupy-bricks 3 --cupy-tile-rays \
    --out results/projector_gpu_bricks_tiles.md

echo "== Training step (configs/cpu.yaml on the GPU)"
timeout 90 "$PYTHON" bench/training.py --device cuda --steps 10 --batch 2 16
