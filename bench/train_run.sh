#!/usr/bin/env bash
# Run `prostlab fit` in the background as a named, resumable run on this machine's CPUs.
#
#   bash bench/train_run.sh NAME INIT_CKPT|- [prostlab fit arguments...]
#
# The run's log goes to logs/NAME.log, its checkpoints (and last.ckpt) to checkpoints/runs/NAME,
# its W&B run to runs/NAME. Run the same command again to resume from last.ckpt (a larger
# --trainer.max_time or max_steps then continues the run). INIT_CKPT starts a fresh run from
# those network weights (model.init_weights); "-" starts from random weights.
# THREADS (default: all cores) sets torch's threads: give each of several concurrent runs its
# share (THREADS=1 for two runs on 2 cores), since oversubscribed threads spin and wait.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; init=$2; shift 2
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
args=("$@" --config "$overlay")
if [ -f "$dir/last.ckpt" ]; then
  args+=(--ckpt_path "$dir/last.ckpt")
elif [ "$init" != "-" ]; then
  args+=(--model.init_weights "$init")
fi
threads=${THREADS:-$(nproc)}
echo "$(date -u +%FT%TZ) $(git rev-parse --short HEAD) THREADS=$threads prostlab fit ${args[*]}" \
  >> "logs/$name.log"
OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads nohup .venv/bin/prostlab fit "${args[@]}" \
  >> "logs/$name.log" 2>&1 &
echo "$name: pid $! log logs/$name.log"
