#!/usr/bin/env bash
# Train the CPU-sized similarity network (configs/cpu.yaml) on one GPU, with its ablations, in
# parallel, in one short call (about 5 minutes on an H200):
#   full     the shipped recipe: wide offsets with a curriculum, MONAI augmentation, cosine lr;
#   noaug    the same without augmentation;
#   narrow   ProST's training law (two independent N(0, 0.15) poses), no curriculum, no
#            augmentation: the recipe of the first shipped checkpoint, with the same network.
# Each run works in its own folder under $WORK (checkpoints/, runs/). Usage:
#   bash bench/gpu_train.sh WORK [BACKEND] [MINUTES]
set -uo pipefail
cd "$(dirname "$0")/.."
WORK="$(mkdir -p "$1" && cd "$1" && pwd)"
BACKEND="${2:-auto}"
MINUTES="${3:-4}"
PYTHON="${PYTHON:-python3}"
REPO="$(pwd)"

declare -A EXTRA=(
  [full]=""
  [noaug]="--model.augmentation null"
  [narrow]='--model.augmentation null --data.train_curriculum null --data.train_poses
            {"ground_truth":{"preset":"prost"},"initial":{"preset":"prost"},"relative":false}'
)
# A CSV log beside each run (metrics.csv), for the model card's training curves.
LOGGER='{"class_path":"pytorch_lightning.loggers.CSVLogger","init_args":{"save_dir":"runs","name":"csv"}}'
for name in full noaug narrow; do
  mkdir -p "$WORK/$name"
  # shellcheck disable=SC2086
  (cd "$WORK/$name" && "$PYTHON" -m prostlab.cli fit --config "$REPO/configs/cpu.yaml" \
      --config "$REPO/configs/cpu_on_gpu.yaml" --model.backend "$BACKEND" \
      --trainer.logger "$LOGGER" --trainer.max_time "00:00:0${MINUTES}:00" ${EXTRA[$name]} \
      > train.log 2>&1;
   echo "$name: exit $?" >> "$WORK/status.txt") &
done
wait
cat "$WORK/status.txt"
for name in full noaug narrow; do echo "== $name"; tail -c 1500 "$WORK/$name/train.log"; done
