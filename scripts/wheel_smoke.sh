#!/usr/bin/env bash
# Install prostlab as a user would, from a wheel, and run it from outside the source tree:
# build the wheel, install it in a fresh virtual environment with the CPU build of torch, then
# run `prostlab --version`, `prostlab render` of the bundled example (and the README's render
# with a shipped config's camera), a 2-case `prostlab test`
# with the shipped tiny config and one with the cpu config and the shipped checkpoint. Everything happens in a temporary folder, removed at the end.
#
#   bash scripts/wheel_smoke.sh            # PYTHON=python3 TORCH_SPEC=torch==2.13.0 by default
#
# The temporary folder is in WHEEL_SMOKE_DIR if set, else in /dev/shm when it has 4 GB free (a
# venv with torch is over 10 000 files: on a disk mounted with discard, removing them alone took
# 70 s here, against 1 s in memory), else in $TMPDIR or /tmp.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"  # first, so pip does not pull a CUDA build for the wheel
base="${WHEEL_SMOKE_DIR:-}"
if [ -z "$base" ]; then
    base="${TMPDIR:-/tmp}"
    if [ -d /dev/shm ] && [ -w /dev/shm ] \
        && [ "$(df -Pk /dev/shm | awk 'NR == 2 {print $4}')" -ge $((4 * 1024 * 1024)) ]; then
        base=/dev/shm
    fi
fi
work="$(mktemp -d "$base/prostlab-wheel.XXXXXX")"
start=$SECONDS
step() { printf '[wheel smoke %3ds] %s\n' "$((SECONDS - start))" "$*"; }
trap 'rm -rf "$work"; step "removed $work"' EXIT
# pip, without the notes of an index mirror about projects it lacks; pip's own status is kept.
pip_in() { "$1" -m pip "${@:2}" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }; }

# Build from a copy of the files the wheel is made of, so no stale build/ or egg-info of the
# checkout can leak into it.
step "building the wheel"
mkdir -p "$work/source"
cp -r "$repo"/{pyproject.toml,README.md,src,configs,data,kernels} "$work/source/"
mkdir "$work/source/checkpoints"  # the shipped weights, not the runs/ of local training
cp "$repo"/checkpoints/*.* "$work/source/checkpoints/"
find "$work/source" \( -name __pycache__ -o -name '*.egg-info' -o -name build -o -name '*.so' \) \
    -prune -exec rm -rf {} +
pip_in "$PYTHON" wheel --quiet --no-deps --wheel-dir "$work/dist" "$work/source"
wheel="$(ls "$work"/dist/prostlab-*.whl)"
step "built $(basename "$wheel") ($(du -h "$wheel" | cut -f1))"

step "installing it in a fresh venv ($TORCH_SPEC first)"
"$PYTHON" -m venv "$work/venv"
# --no-compile: byte-compiling torch's sources would about double the time of this step.
pip_in "$work/venv/bin/python" install --quiet --no-compile "$TORCH_SPEC"
pip_in "$work/venv/bin/python" install --quiet --no-compile "$wheel"
prostlab="$work/venv/bin/prostlab"

mkdir "$work/run"
cd "$work/run"  # outside the source tree: nothing may be found through it
export WANDB_MODE=offline
"$prostlab" --version
location="$("$work/venv/bin/python" -c 'import prostlab; print(prostlab.__file__)')"
case "$location" in "$work/venv/"*) ;; *) echo "prostlab imported from $location" >&2; exit 1 ;; esac

step "prostlab render (bundled example, default camera)"
"$prostlab" render --pose 0 0 0 0 0 0 --pose 0 0 90 0 0 0 --out drr
test -s drr/drr_000.png && test -s drr/drr_001.png && test -s drr/drrs.npy

step "prostlab render --poses poses.csv --config pelvis (the README's example)"
printf 'rx_deg,ry_deg,rz_deg,tx_mm,ty_mm,tz_mm\n0,0,0,0,0,0\n0,0,30,0,0,20\n' > poses.csv
"$prostlab" render --poses poses.csv --config pelvis --out drr_pelvis
test -s drr_pelvis/drr_001.png

step "prostlab test --config tiny (2 cases, the shipped presets of the image similarities)"
"$prostlab" test --config tiny --data.test_samples 2 --data.batch_size 2 \
    --model.benchmark.methods '{"gradncc": "gradncc", "ncc": "ncc"}' \
    --model.benchmark.max_iterations 12 \
    --trainer.enable_progress_bar false
cases="$(find results -name cases.csv | head -n 1)"
test -n "$cases" || { echo "prostlab test wrote no cases.csv under $PWD/results" >&2; exit 1; }
rows=$(($(wc -l <"$cases") - 1))
step "cases.csv has $rows rows (2 cases x 2 methods)"
test "$rows" -ge 2

for ckpt in "$repo"/checkpoints/*.ckpt; do
    name="$(basename "$ckpt" .ckpt)"
    config="$(grep -l "checkpoints/$name.ckpt" "$repo"/configs/*.yaml | head -n 1)"
    step "prostlab test --config $(basename "$config" .yaml) --ckpt_path $name (the shipped weights)"
    "$prostlab" test --config "$(basename "$config" .yaml)" --ckpt_path "$name" \
        --data.test_samples 2 --data.batch_size 2 --trainer.enable_progress_bar false \
        --model.benchmark.run_name "wheel-$name"
done
step "passed"
