#!/usr/bin/env bash
# Train fold FOLD of configs/patients.yaml in the background on this machine's CPUs, resumable.
#
#   bash bench/patients_train.sh FOLD [INIT_CKPT] [extra prostlab fit arguments...]
#
# Logs go to logs/patients_fold$FOLD.log, checkpoints (and last.ckpt) to
# checkpoints/runs/patients_fold$FOLD, the W&B run to runs/patients_fold$FOLD. Run it again to
# resume from last.ckpt. INIT_CKPT (optional, "-" for none) starts a fresh run from those weights
# (patient-specific fine-tuning, or a warm start from a network that never saw the test patient).
# THREADS (default: all cores) sets torch's threads: give each of several concurrent runs its
# share (THREADS=1 for two runs on 2 cores), since oversubscribed threads spin and wait.
set -euo pipefail
cd "$(dirname "$0")/.."
fold=$1; init=${2:--}; shift $(( $# > 1 ? 2 : 1 ))
name=patients_fold$fold
dir=checkpoints/runs/$name
mkdir -p logs "$dir"
overlay=$dir/overlay.yaml
cat > "$overlay" <<YAML
trainer:
  logger:
    init_args: {name: $name, save_dir: runs/$name}
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args:
        dirpath: $dir
        filename: "step{step:06d}-convex{val/convex_fraction:.3f}"
        auto_insert_metric_name: false
        monitor: val/convex_fraction
        mode: max
    - class_path: pytorch_lightning.callbacks.LearningRateMonitor
      init_args: {logging_interval: step}
YAML
args=(--config configs/cpu.yaml --config configs/patients.yaml --config "$overlay"
      --data.fold "$fold")
if [ -f "$dir/last.ckpt" ]; then
  args+=(--ckpt_path "$dir/last.ckpt")
elif [ "$init" != "-" ]; then
  args+=(--model.init_weights "$init")
fi
echo "$(date -u +%FT%TZ) $(git rev-parse --short HEAD) THREADS=${THREADS:-$(nproc)} prostlab fit ${args[*]} $*" >> "logs/$name.log"
threads=${THREADS:-$(nproc)}
OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads nohup .venv/bin/prostlab fit "${args[@]}" "$@" >> "logs/$name.log" 2>&1 &
echo "fold $fold: pid $! log logs/$name.log"
