#!/usr/bin/env bash
# The capture-range benchmark of fold FOLD of configs/patients.yaml on its test patient, which
# the checkpoint's training and model selection never saw (unless CKPT was fine-tuned on it):
#
#   THREADS=1 bash bench/patients_benchmark.sh FOLD CKPT OUT [extra prostlab test arguments...]
#
# 50 wide-offset cases (20 deg and 50 mm per axis, realistic targets: configs/cpu.yaml's test
# law), registered by NCC, multiscale NCC with SGD and with Adam, and the network's two-stage
# schedules. Tables and figures go to OUT/latest/ (summary.md: one table per test patient).
set -euo pipefail
cd "$(dirname "$0")/.."
fold=$1; ckpt=$2; out=$3; shift 3
methods='{"ncc": "ncc", "mncc": "mncc", "mncc_adam": "mncc_adam",
          "net_gradncc": "net_gradncc_adam", "net_ncc": "net_ncc"}'
threads=${THREADS:-$(nproc)}
mkdir -p logs
echo "$(date -u +%FT%TZ) $(git rev-parse --short HEAD) THREADS=$threads fold $fold $ckpt" \
  >> "logs/benchmark_$(basename "$out").log"
OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads .venv/bin/prostlab test \
  --config configs/cpu.yaml --config configs/patients.yaml --data.fold "$fold" \
  --ckpt_path "$ckpt" --data.test_samples 50 --data.batch_size 25 \
  --model.benchmark.methods "$methods" --model.benchmark.output_dir "$out" \
  --trainer.logger.init_args.save_dir "runs/$(basename "$out")" "$@" \
  >> "logs/benchmark_$(basename "$out").log" 2>&1
