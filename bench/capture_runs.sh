#!/usr/bin/env bash
# The capture-range benchmarks of the shipped network (checkpoints/README.md), on the CPU:
#   wide         100 wide-offset cases (20 deg, 50 mm per axis), realistic targets, all methods;
#   prost        the same at ProST's test offsets (8 deg, 22 mm);
#   heldout      the wide cases on the held-out spine cube (make heldout first), without `net`;
#   ablations    Net+NCC with the networks trained without augmentation and on ProST's narrow law;
#   crime        NCC and Net+NCC on the wide cases with inverse-crime targets (the moving volume).
# Each writes results/capture/<name>/latest/ and a log beside it. Usage:
#   bash bench/capture_runs.sh CKPT [ABLATION_DIR] [NAMES...]
# EXTRA_FLAGS="--data.test_samples 50" adds flags to every run.
set -uo pipefail
cd "$(dirname "$0")/.."
CKPT="$1"; ABL="${2:-checkpoints/runs/gpu}"; shift 2 || shift $#
NAMES=("${@:-wide prost heldout ablations crime}")
BIN="${BIN:-.venv/bin}"
export WANDB_MODE=offline
run() {  # name, then extra flags
  local name="$1"; shift
  mkdir -p "results/capture/$name"
  "$BIN/prostlab" test --config configs/cpu.yaml --data.batch_size 25 --trainer.logger false \
    --model.benchmark.output_dir "results/capture/$name" "$@" ${EXTRA_FLAGS:-} \
    > "results/capture/$name.log" 2>&1
  echo "$name: exit $? at $(date +%T)"
}
# The image similarities and the network's two-stage schedules, without the 500-iteration net
# alone (a third of the work, and 0 % on the wide cases).
SHORT='{"gradncc": "gradncc", "ncc": "ncc", "mncc": "mncc", "net_gradncc": "net_gradncc_adam",
  "net_ncc": "net_ncc"}'
for name in ${NAMES[*]}; do
  case "$name" in
    wide) run wide --ckpt_path "$CKPT" ;;
    prost) run prost --config configs/prost_offsets.yaml --ckpt_path "$CKPT" ;;
    heldout) run heldout --config configs/heldout_spine.yaml --ckpt_path "$CKPT" \
      --model.benchmark.methods "$SHORT" ;;
    ablations)
      for variant in noaug narrow; do
        run "ablation_$variant" --ckpt_path "$ABL/${variant}_best.ckpt" \
          --model.benchmark.methods '{"net_ncc": "net_ncc"}'
      done ;;
    crime)
      run crime --ckpt_path "$CKPT" --model.benchmark.target '{"volume": "ct"}' \
        --model.benchmark.methods '{"ncc": "ncc", "net_ncc": "net_ncc"}' ;;
  esac
done
