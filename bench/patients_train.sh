#!/usr/bin/env bash
# Train fold FOLD of configs/patients.yaml (bench/train_run.sh: background, resumable, its own
# log and checkpoint folders patients_fold$FOLD):
#
#   THREADS=1 bash bench/patients_train.sh FOLD [INIT_CKPT] [extra prostlab fit arguments...]
#
# INIT_CKPT (optional, "-" for none) starts the fold from those network weights, e.g. from a
# network trained on other patients than the fold's test patient.
set -euo pipefail
cd "$(dirname "$0")/.."
fold=$1; init=${2:--}; shift $(( $# > 1 ? 2 : 1 ))
exec bash bench/train_run.sh "patients_fold$fold" "$init" --config configs/cpu.yaml \
  --config configs/patients.yaml --data.fold "$fold" "$@"
