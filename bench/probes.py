"""Probe the ``prostlab`` command line (and a little of the Python API) as a new user and a
reliability engineer would, classify every outcome, and write ``bench/results/probes.md``.

Usage::

    python bench/probes.py [--only PATTERN] [--out bench/results/probes.md] [--jobs 3] [--keep]

Each probe is one row of :data:`PROBES`: a command line run in a fresh temporary folder (with
``WANDB_MODE=offline`` and a timeout), the files set up there first (copies of the fixtures that
:func:`make_fixtures` writes once, a user's own file, an earlier run's outputs) and the class of
outcome a careful user should get:

``REFUSED``
    exit status 2, the last line on stderr ``prostlab <cmd>: error: ...`` (Lightning's chatter
    before it is allowed), and no file written in the folder.
``WORKS``
    exit status 0, no ``prostlab ...: WARNING`` line, and the expected outputs exist (and the
    expected text is on stdout).
``WARNS``
    exit status 0 (or ``register``'s 3, an untrusted pose) with a stderr line matching the
    probe's pattern.
``SIGNAL``
    SIGINT or SIGTERM sent after a delay (from the start, a file appearing or CPU seconds
    used): exit status 128 + the signal's number (or an end by the signal itself, which a shell
    reports the same way: a SIGTERM before any handler is installed), no ``.tmp-*`` file left,
    and what the probe expects saved is there.

``A|B`` accepts either; ``A+B`` is the sorted classes of several copies run at once (concurrent
runs). The outcome is judged in this order:

``TRACEBACK``
    ``Traceback (most recent call last)`` on stdout or stderr, whatever the exit status.
``LOSES-DATA``
    the bytes of a set-up file (a user's file, an input, an earlier run's result marked
    ``protect``) are nowhere in the folder after the run (moved aside is not lost).
``MISMATCH``
    any other outcome than the expected class; the row says what happened.
``PASS``, or ``CONFUSING``
    as expected; ``CONFUSING`` marks a behaviour that works as designed but surprises, and the
    report checks that the phrase ``confusing`` gives is in ``docs/`` or the README.

A probe meant to catch a silently wrong result (a wrong sign, another patient's CT, an offset
CT, a pose far away) expects ``REFUSED|WARNS``, so that silence is a ``MISMATCH``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROSTLAB = str(Path(sys.executable).with_name("prostlab"))
ERROR_LINE = re.compile(r"^prostlab( \w+)?: error: ")
WARNING_LINE = re.compile(r"^prostlab \w+: WARNING")
TRACEBACK = "Traceback (most recent call last)"

# Flags shared by many probes: a 16 x 16 detector (render), the test suite's fast registration
# (a 64 x 64 detector, the CT averaged to 64^3) and a start about 6 deg and 20 mm off the truth.
SMALL = "--height 16 --width 16 --pixel-spacing 23.36 --step 8"
REG = "--xray {fx}/chest.dcm --ct {ex} --detector 64 64 --downsample 2 --step 3.5"
NEAR = "--init 7 -8 9 20 -25 28"
PNG_CAMERA = "--sdd 1020 --sid 620 --pixel-spacing 5.84"
TINY = "--config tiny --trainer.max_steps 2"
TEST = "test --config tiny --ckpt_path {fx}/tiny.ckpt --data.test_samples 2"
RAW = "--ct {fx}/raw/ct.nii.gz --labels {fx}/raw/labels.nii.gz --size 32"
LONG_RENDER = "render --poses {fx}/many_poses.csv --height 128 --width 128 --step 1 --out d"
LONG_REGISTER = ("register --xray {fx}/chest.dcm --ct {ex} --search --detector 128 128 "
                 "--step 1.0 --out reg")
REFUSED, WORKS, WARNS, SIGNAL = "REFUSED", "WORKS", "WARNS", "SIGNAL"
QUIET = REFUSED + "|" + WARNS  # silently wrong unless refused or warned


@dataclass(frozen=True)
class Probe:
    """One probe: what is run, in what folder, and what a careful user should get."""

    id: str
    cmd: str  # `prostlab ...` with {fx} (fixtures), {ex} (bundled chest), {repo}; or `python`
    expect: str
    why: str = ""
    code: str = ""  # Python run as probe.py (cmd "python"); a ProstlabError is a refusal
    setup: dict = field(default_factory=dict)  # path -> "fx:NAME" (a copy) or the file's text
    before: tuple = ()  # commands run first in the folder: an earlier run's results
    protect: tuple = ()  # globs of `before`'s files whose bytes must survive
    unprotect: tuple = ()  # globs of set-up files that the command may replace (a resume)
    outputs: tuple = ()  # globs that WORKS, WARNS or SIGNAL must leave
    stdout: tuple = ()  # regexes that stdout must match (WORKS, WARNS)
    warn: str = ""  # WARNS: regex of a stderr line
    signal: tuple = ()  # (signum, "file:GLOB" | "cpu:SECONDS" | "", seconds after that)
    copies: int = 1  # run this many at once, in one folder
    env: dict = field(default_factory=dict)
    timeout: int = 300
    confusing: str = ""  # a surprising behaviour as designed: the phrase that documents it


def P(id: str, cmd: str, expect: str, why: str = "", **kw) -> Probe:  # noqa: N802 - a table row
    return Probe(id, cmd, expect, why, **kw)


# ------------------------------------------------------------------------------ the probes
GENERAL = [
    P("g01", "prostlab", REFUSED, "no command"),
    P("g02", "prostlab --version", WORKS, "version", stdout=(r"prostlab \d",)),
    P("g03", "prostlab frobnicate", REFUSED, "unknown command"),
    P("g06", "prostlab render --frobnicate 3", REFUSED, "unknown flag"),
]

RENDER = [
    P("r01", f"prostlab render {SMALL}", WORKS, "defaults: the bundled chest into ./drr",
      outputs=("drr/drr_000.png", "drr/drrs.npy")),
    P("r02", f"prostlab render --volume nope.nii.gz {SMALL}", REFUSED, "missing volume"),
    P("r04", f"prostlab render --volume empty.nii.gz {SMALL}", REFUSED, "empty file",
      setup={"empty.nii.gz": ""}),
    P("r06", f"prostlab render --volume {{fx}}/mu_2d.nii.gz {SMALL}", REFUSED, "2D NIfTI"),
    P("r08", f"prostlab render --volume {{fx}}/hu.nii.gz {SMALL}", REFUSED, "a CT in HU"),
    P("r09", f"prostlab render --volume {{fx}}/mu_offset.nii.gz {SMALL}", QUIET,
      "silent-wrong: HU stored with +1024 (never negative)"),
    P("r10", f"prostlab render --volume {{fx}}/mu_nan.nii.gz {SMALL}", QUIET,
      "silent-wrong: a NaN voxel"),
    P("r11", f"prostlab render --volume {{fx}}/mu_zero.nii.gz {SMALL}", QUIET,
      "silent-wrong: all zero, blank DRR"),
    P("r12", f"prostlab render {SMALL} --height 0", REFUSED, "0 rows"),
    P("r14", f"prostlab render {SMALL} --height 100000 --width 100000", REFUSED,
      "a detector that does not fit in memory"),
    P("r18", "prostlab render --height 16 --width 16 --step 8 --pixel-spacing 1 2 3", REFUSED,
      "three spacings"),
    P("r19", f"prostlab render {SMALL} --step 0", REFUSED, "step 0"),
    P("r21", f"prostlab render {SMALL} --step 1e-6", REFUSED, "tiny step (would hang)"),
    P("r22", f"prostlab render {SMALL} --step 1e9", QUIET,
      "silent-wrong: a step longer than the volume"),
    P("r25", f"prostlab render {SMALL} --sdd 1e9 --sid 620", QUIET, "sdd of 1000 km"),
    P("r26", f"prostlab render {SMALL} --pose 0 0 0 1e9 0 0", REFUSED, "a pose 1e9 mm away"),
    P("r32", f"prostlab render {SMALL} --poses p.csv", REFUSED, "a NaN in the pose table",
      setup={"p.csv": "rx_deg,ry_deg,rz_deg,tx_mm,ty_mm,tz_mm\n0,0,0,0,0,0\n0,nan,0,0,0,0\n"}),
    P("r33", f"prostlab render {SMALL} --poses p.csv", WARNS, "one of three poses beside the view",
      setup={"p.csv": "rx_deg,ry_deg,rz_deg,tx_mm,ty_mm,tz_mm\n0,0,0,0,0,0\n0,0,0,350,350,0\n"
                      "0,0,90,0,0,0\n"},
      warn=r"blank DRR", outputs=("drr/drr_002.png",)),
    P("r35", "prostlab render --poses p.csv --config pelvis --step 8 --height 32 --width 32",
      WORKS, "README: a shipped config's camera from any folder",
      setup={"p.csv": "rx_deg,ry_deg,rz_deg,tx_mm,ty_mm,tz_mm\n0,0,0,0,0,0\n"},
      outputs=("drr/drr_000.png",)),
    P("r38", f"prostlab render {SMALL} --out notes.txt", REFUSED, "--out is a file",
      setup={"notes.txt": "mine\n"}),
    P("r40", f"prostlab render {SMALL} --out d --overwrite", WORKS,
      "--overwrite over an earlier render and a user's drr_for_paper.png",
      before=(f"prostlab render {SMALL} --out d --pose 0 0 0 0 0 0 --pose 0 0 90 0 0 0 "
              "--pose 0 0 45 0 0 0",),
      setup={"d/drr_for_paper.png": "fx:chest.png", "d/notes.txt": "mine\n"},
      outputs=("d/drr_000.png",)),
    P("r41", f"prostlab render {SMALL} --out d --overwrite", WORKS,
      "--overwrite into a folder of a user's files (no manifest)",
      setup={"d/drr_for_paper.png": "fx:chest.png", "d/drrs_old.npy": "x"},
      outputs=("d/drr_000.png",)),
    P("r42", f"prostlab render {SMALL} --volume prep --out prep --overwrite", REFUSED + "|" + WORKS,
      "output folder = the prepared input folder", setup={"prep": "fx:prepared"}),
    P("r43", f"prostlab render {SMALL} --volume mu.nii.gz --out mu.nii.gz --overwrite", REFUSED,
      "output = the input file", setup={"mu.nii.gz": "fx:mu.nii.gz"}),
    P("r46", f"prostlab render {SMALL} --device cuda:0", REFUSED + "|" + WORKS,
      "CUDA where there may be none", outputs=("drr/drrs.npy",)),
    P("r48", f"prostlab render {SMALL} --backend cpu", WORKS, "compiled cpu kernels",
      outputs=("drr/drrs.npy",)),
    P("r49", f"prostlab render {SMALL} --volume {{fx}}/mu.nii.gz --which bone", REFUSED,
      "--which bone of a NIfTI (no bones to pick)"),
    P("r52", f"prostlab render {SMALL} --out /proc/drr", REFUSED, "unwritable --out"),
    P("r54", f"prostlab render {SMALL} --sdd 1020 --sid 1019.9", QUIET,
      "isocentre on the detector (magnification 1)"),
]

PREPARE = [
    P("p01", f"prostlab prepare {RAW} --bones bones --out p", WORKS, "CT and labels",
      outputs=("p/ct_mu.nii.gz", "p/bone_mu.nii.gz", "p/labels.nii.gz", "p/meta.json")),
    P("p02", "prostlab prepare --ct {fx}/raw/ct.nii.gz --size 32 --out p", WORKS,
      "no labels: bones by threshold", outputs=("p/bone_mu.nii.gz",),
      stdout=(r"no --labels: bones by HU threshold",)),
    P("p03", "prostlab prepare --ct nope.nii.gz --out p", REFUSED, "missing CT"),
    P("p04", "prostlab prepare --ct notes.nii.gz --out p", REFUSED, "text file as NIfTI",
      setup={"notes.nii.gz": "not a CT\n"}),
    P("p07", "prostlab prepare --ct {fx}/mu_2d.nii.gz --out p --size 16", REFUSED, "2D NIfTI"),
    P("p09", "prostlab prepare --ct {fx}/raw_offset/ct.nii.gz --size 32 --out p", QUIET,
      "silent-wrong: CT stored with +1024 (air at +24)"),
    P("p10", "prostlab prepare --ct {ex}/ct_mu.nii.gz --size 32 --out p", QUIET,
      "silent-wrong: attenuation volume as CT"),
    P("p11", "prostlab prepare --ct {fx}/raw_scaled/ct.nii.gz --size 32 --out p", QUIET,
      "silent-wrong: attenuation scaled to integers"),
    P("p12", "prostlab prepare --ct {fx}/thick.nii.gz --size 16 --out p", REFUSED,
      "500 mm slices"),
    P("p13", "prostlab prepare --ct {fx}/raw/ct.nii.gz --labels {fx}/labels_other_grid.nii.gz "
      "--size 32 --out p", REFUSED, "labels on another grid"),
    P("p18", f"prostlab prepare {RAW} --out p --size 1", REFUSED, "size 1"),
    P("p20", f"prostlab prepare {RAW} --out p --side-mm 0.001", REFUSED, "tiny cube"),
    P("p23", f"prostlab prepare {RAW} --out p --side-mm 50000", REFUSED, "bones vanish"),
    P("p26", f"prostlab prepare {RAW} --out p --mu-water 0", REFUSED, "mu water 0"),
    P("p27", f"prostlab prepare {RAW} --out p --mu-water 1e9", QUIET,
      "silent-wrong: mu water 1e9 /mm"),
    P("p29", f"prostlab prepare {RAW} --out p --bones 999", REFUSED, "bone id absent"),
    P("p31", "prostlab prepare --ct {fx}/raw/ct.nii.gz --size 32 --out p --bone-hu 1e9", REFUSED,
      "threshold above every voxel: no bone"),
    P("p33", "prostlab prepare --ct D/ct.nii.gz --labels D/labels.nii.gz --size 32 --out D",
      REFUSED, "--out = the inputs' folder",
      setup={"D/ct.nii.gz": "fx:raw/ct.nii.gz", "D/labels.nii.gz": "fx:raw/labels.nii.gz",
             "D/structures.csv": "fx:raw/structures.csv"}),
    P("p34", "prostlab prepare --ct D/ct.nii.gz --labels D/labels.nii.gz --size 32 --out D "
      "--overwrite", REFUSED, "--out = the inputs' folder, --overwrite",
      setup={"D/ct.nii.gz": "fx:raw/ct.nii.gz", "D/labels.nii.gz": "fx:raw/labels.nii.gz",
             "D/structures.csv": "fx:raw/structures.csv"}),
    P("p35", "prostlab prepare --ct {fx}/raw/ct.nii.gz --size 32 --out p --overwrite", WORKS,
      "--overwrite without labels over a labelled run and a user's notes",
      before=(f"prostlab prepare {RAW} --out p",), setup={"p/notes.txt": "mine\n"},
      outputs=("p/ct_mu.nii.gz",)),
    P("p36", "prostlab prepare --ct {fx}/raw/ct.nii.gz --size 32 --out p --overwrite", WORKS,
      "--overwrite into a user's folder (no manifest) with a labels.nii.gz",
      setup={"p/labels.nii.gz": "fx:raw/labels.nii.gz"}, outputs=("p/ct_mu.nii.gz",)),
    P("p38", f"prostlab prepare {RAW} --out p", REFUSED, "--out not empty",
      setup={"p/notes.txt": "mine\n"}),
    P("p39", "prostlab prepare --ct a/ct.nii.gz b/ct.nii.gz --size 32 --out p", WORKS,
      "two patients", setup={"a/ct.nii.gz": "fx:raw/ct.nii.gz", "b/ct.nii.gz": "fx:raw/ct.nii.gz"},
      outputs=("p/a/ct_mu.nii.gz", "p/b/ct_mu.nii.gz")),
    P("p42", "prostlab prepare --ct {ex} --out p", REFUSED, "a prepared folder as --ct"),
]

_REG_OUT = ("reg/pose.json", "reg/overlay.png")
REGISTER = [
    P("x01", f"prostlab register {REG} {NEAR} --out reg", WORKS, "DICOM from 6 deg, 20 mm off",
      outputs=_REG_OUT),
    P("x03", "prostlab register --xray notes.dcm --ct {ex} --out reg", REFUSED, "text as DICOM",
      setup={"notes.dcm": "not dicom\n"}),
    P("x05", "prostlab register --xray x.jpg --ct {ex} --out reg", REFUSED, "JPEG",
      setup={"x.jpg": "fx:chest.jpg"}),
    P("x07", "prostlab register --xray {fx}/chest.png --ct {ex} --out reg", REFUSED,
      "PNG without a camera"),
    P("x08", f"prostlab register --xray {{fx}}/eight.npy --ct {{ex}} {PNG_CAMERA} --out reg",
      REFUSED, "8 x 8 image"),
    P("x12", f"prostlab register --xray {{fx}}/chest.png --ct {{ex}} {PNG_CAMERA} --detector 64 "
      f"64 --downsample 2 --step 3.5 {NEAR} --out reg", QUIET,
      "silent-wrong: bone-bright PNG without --sign -1"),
    P("x13", f"prostlab register --xray {{fx}}/chest.png --ct {{ex}} {PNG_CAMERA} --detector 64 "
      f"64 --downsample 2 --step 3.5 {NEAR} --sign -1 --out reg", WORKS,
      "bone-bright PNG with --sign -1", outputs=_REG_OUT),
    P("x14", f"prostlab register {REG} {NEAR} --sign -1 --out reg", QUIET,
      "silent-wrong: wrong sign on a DICOM"),
    P("x15", "prostlab register --xray {fx}/chest.dcm --ct {fx}/phantom --detector 64 64 "
      "--step 3.5 --out reg", QUIET, "silent-wrong: another CT (a phantom)",
      warn=r"NOT TRUSTED", outputs=("reg/pose.json",)),
    P("x16", "prostlab register --xray {fx}/chest.dcm --ct nope --out reg", REFUSED, "missing CT"),
    P("x17", "prostlab register --xray {fx}/chest.dcm --ct {ex}/ct_mu.nii.gz --out reg", REFUSED,
      "attenuation volume as a raw CT"),
    P("x18", "prostlab register --xray {fx}/chest.dcm --ct {fx}/raw_offset/ct.nii.gz --out reg",
      QUIET, "silent-wrong: raw CT with +1024"),
    P("x19", "prostlab register --xray {fx}/chest.dcm --ct {fx}/raw/ct.nii.gz --bones pelvis "
      "--out reg", REFUSED, "--bones without --labels"),
    P("x21", f"prostlab register {REG} --method net_ncc --out reg", REFUSED, "net without ckpt"),
    P("x23", f"prostlab register {REG} --method net_ncc --ckpt_path {{fx}}/text.ckpt --out reg",
      REFUSED, "text checkpoint"),
    P("x25", "prostlab register --xray {fx}/chest.dcm --ct {ex} --method net_ncc --ckpt_path "
      f"prost_cpu_chest --downsample 2 {NEAR} --out reg", WORKS, "the shipped network",
      outputs=_REG_OUT, timeout=400),
    P("x27", f"prostlab register {REG} --init 0 0 0 1e9 0 0 --out reg", REFUSED,
      "start 1e9 mm away"),
    P("x28", f"prostlab register {REG} --init 1e9 0 0 0 0 0 --out reg", QUIET,
      "start rotated 1e9 deg"),
    P("x31", f"prostlab register {REG} --detector 100000 100000 --out reg", REFUSED,
      "a detector that does not fit in memory"),
    P("x34", f"prostlab register {REG} --step 1e-6 --out reg", REFUSED, "tiny step"),
    P("x36", f"prostlab register {REG} --downsample 1000 --out reg", REFUSED, "downsample 1000"),
    P("x42", f"prostlab register {REG} --search-depth-mm 40 --out reg", REFUSED,
      "search range without --search"),
    P("x44", f"prostlab register {REG} --out reg", REFUSED, "--out holds a user's file",
      setup={"reg/notes.txt": "mine\n"}),
    P("x45", f"prostlab register {REG} {NEAR} --out reg --overwrite", WORKS,
      "--overwrite over an earlier result and a user's notes",
      before=(f"prostlab register {REG} {NEAR} --out reg",), setup={"reg/notes.txt": "mine\n"},
      outputs=_REG_OUT),
    P("x46", "prostlab register --xray {fx}/chest.dcm --ct prep --detector 64 64 --downsample 2 "
      f"--step 3.5 {NEAR} --out prep --overwrite", REFUSED + "|" + WORKS,
      "--out = the prepared CT folder, --overwrite", setup={"prep": "fx:prepared"}),
    P("x47", "prostlab register --xray {fx}/chest.dcm --ct {ex} --config tiny --out reg",
      REFUSED, "the tiny config's 16 x 16 detector"),
    P("x48", f"prostlab register {REG} --device cuda:7 --out reg", REFUSED, "no such GPU"),
]

_CKPT = "checkpoints/runs/tiny/last.ckpt"
_EARLIER_RUN = {"checkpoints": "fx:fitrun/checkpoints"}
FIT = [
    P("f01", f"prostlab fit {TINY}", WORKS, "the tiny config", outputs=(_CKPT,)),
    P("f02", "prostlab fit --config tinny", REFUSED, "misspelt config"),
    P("f05", "prostlab fit --config c.yaml", REFUSED, "empty config (no data, no camera)",
      setup={"c.yaml": ""}),
    P("f06", f"prostlab fit {TINY} --trainer.max_steps 0", REFUSED, "max_steps 0"),
    P("f07", f"prostlab fit {TINY} --trainer.max_epochs 0", REFUSED, "max_epochs 0"),
    P("f08", f"prostlab fit {TINY} --trainer.max_steps -5", REFUSED, "max_steps -5"),
    P("f10", f"prostlab fit {TINY} --trainer.limit_train_batches 0", REFUSED, "no batches"),
    P("f12", f"prostlab fit {TINY} --ckpt_path {{fx}}/text.ckpt", REFUSED, "text checkpoint"),
    P("f15", f"prostlab fit {TINY} --ckpt_path last", REFUSED, "last without one"),
    P("f17", f"prostlab fit {TINY} --ckpt_path prost_cpu_chest", REFUSED, "another camera"),
    P("f18", f"prostlab fit {TINY}", WARNS, "a fresh run beside an earlier run's last.ckpt",
      setup=_EARLIER_RUN, warn=r"held an earlier run", outputs=(_CKPT,)),
    P("f19", "prostlab fit --config tiny --trainer.max_steps 6 --ckpt_path last", WORKS,
      "resume the earlier run", setup=_EARLIER_RUN, unprotect=(_CKPT,), outputs=(_CKPT,)),
    P("f20", "prostlab fit --config tiny --trainer.max_steps 2 --ckpt_path last", REFUSED,
      "resume with max_steps below the checkpoint's step", setup=_EARLIER_RUN),
    P("f22", f"prostlab fit {TINY} --model.step 0", REFUSED, "step 0"),
    P("f24", f"prostlab fit {TINY} --model.camera.height 1", REFUSED, "1-row camera"),
    P("f25", f"prostlab fit {TINY} --model.camera.sdd 1e9", QUIET, "sdd of 1000 km"),
    P("f27", f"prostlab fit {TINY} --trainer.max_stepz 4", REFUSED, "misspelt flag"),
    P("f31", f"prostlab fit {TINY} --data.volumes '[{{prepared: nope}}]'", REFUSED,
      "a volume folder that does not exist"),
    P("f32", f"prostlab fit {TINY}", REFUSED, "the checkpoint folder is a file",
      setup={"checkpoints/runs/tiny": "a file\n"}),
    P("f33", f"prostlab fit {TINY} --trainer.accelerator gpu", REFUSED, "GPU where there is none"),
    P("f34", f"prostlab fit {TINY} --trainer.logger.init_args.offline null", REFUSED,
      "W&B forced online by WANDB_MODE, no key or network", env={"WANDB_MODE": "online"}),
    P("f35", "prostlab fit --config tiny --config o.yaml --print_config", WORKS,
      "overlay of one scheduler key keeps the interpolation, resolved after the merge",
      setup={"o.yaml": "trainer: {max_steps: 70}\nmodel:\n  scheduler: {name: cosine, "
                       "T_max: '${trainer.max_steps}'}\n"},
      stdout=(r"T_max: 70",)),
    P("f36", "prostlab fit --config tiny --config o.yaml --print_config", REFUSED,
      "interpolation of a missing key",
      setup={"o.yaml": "model:\n  scheduler: {name: cosine, T_max: '${trainer.max_stepz}'}\n"}),
    P("f39", "prostlab fit --config tiny --config o.yaml --print_config", WORKS,
      "overlay of one pose key keeps the others",
      setup={"o.yaml": "data:\n  val_poses:\n    initial: {rotation_deg: 2.0}\n"},
      stdout=(r"rotation_deg: 2\.0\n\s+translation_mm: 22\.0",)),
]

_TEST_OUT = ("results/tiny/latest/summary.json",)
_GRADNCC_ONLY = "model:\n  benchmark:\n    methods: {gradncc: gradncc}\n"
TEST_VALIDATE = [
    P("t01", f"prostlab {TEST}", WORKS, "benchmark with a trained tiny network",
      outputs=_TEST_OUT),
    P("t02", "prostlab test --config tiny --data.test_samples 2", REFUSED,
      "network methods without a checkpoint"),
    P("t03", "prostlab test --config tiny --config o.yaml --data.test_samples 2", REFUSED,
      "an overlay naming only an image similarity keeps the base's network method",
      setup={"o.yaml": _GRADNCC_ONLY},
      confusing="An overlay cannot remove a key from a mapping"),
    P("t04", "prostlab test --config tiny --ckpt_path prost_cpu_chest", REFUSED,
      "checkpoint of another camera"),
    P("t05", f"prostlab {TEST} --model.benchmark.run_name ../escape", REFUSED, "run name with .."),
    P("t07", f"prostlab {TEST} --model.benchmark.output_dir notes.txt", REFUSED,
      "output folder is a file", setup={"notes.txt": "mine\n"}),
    P("t08", "prostlab test --config tiny --ckpt_path {fx}/tiny.ckpt --data.test_samples 0",
      REFUSED, "0 cases"),
    P("t10", f"prostlab {TEST} --model.benchmark.methods '{{nosuch: nosuch}}'", REFUSED,
      "unknown method preset"),
    P("t11", "prostlab test --config tiny --ckpt_path last", REFUSED, "last without one"),
    P("t12", "prostlab test --config tiny --config o.yaml --print_config", WORKS,
      "overlay of model.benchmark.target keeps methods and output folder",
      setup={"o.yaml": "model:\n  benchmark:\n    target: {blur_mm: 2.0}\n"},
      stdout=(r"blur_mm: 2\.0", r"net_gradncc:", r"output_dir: results/tiny")),
    P("t13", "prostlab validate --config tiny --ckpt_path {fx}/tiny.ckpt", WORKS,
      "validate a checkpoint"),
    P("t15", f"prostlab {TEST} --model.benchmark.run_name same", WORKS,
      "a run name taken by an earlier run", setup={"results/tiny/same/summary.json": "{}\n"},
      outputs=("results/tiny/same-2/summary.json",)),
    P("t17", "prostlab test --config tiny --model.benchmark.methods '{gradncc: gradncc}' "
      "--data.test_samples 2", WORKS, "a flag replaces a mapping whole: image similarity only",
      outputs=_TEST_OUT),
    P("t18", "prostlab test --config tiny --config o.yaml --data.test_samples 2 --print_config",
      WORKS, "null clears a mapping", setup={"o.yaml": "model:\n  benchmark: null\n"},
      stdout=(r"benchmark: null",)),
]

CONCURRENT = [
    P("c01", f"prostlab render {SMALL} --out d", "REFUSED+WORKS", "two renders into one --out",
      copies=2, outputs=("d/drrs.npy",)),
    P("c02", f"prostlab prepare {RAW} --out p", "REFUSED+WORKS", "two prepares into one --out",
      copies=2, outputs=("p/meta.json",)),
    P("c03", f"prostlab fit {TINY}", "REFUSED+WORKS|WARNS+WORKS",
      "two fits in one folder (one last.ckpt; WARNS: the second started after the first ended)",
      copies=2, warn=r"held an earlier run", outputs=(_CKPT,)),
    P("c04", f"prostlab {TEST} --model.benchmark.run_name same", "WORKS+WORKS",
      "two tests of one run_name", copies=2,
      outputs=("results/tiny/same/summary.json", "results/tiny/same-2/summary.json")),
    P("c05", f"prostlab register {REG} {NEAR} --out reg", "REFUSED+WORKS",
      "two registers into one --out", copies=2, outputs=("reg/pose.json",)),
]

_INT, _TERM = signal.SIGINT, signal.SIGTERM
SIGNALS = [
    P("s01", "prostlab prepare --ct {fx}/raw/ct.nii.gz --size 256 --out p", SIGNAL,
      "Ctrl-C during prepare", signal=(_INT, "cpu:9", 0)),
    P("s02", "prostlab prepare --ct {fx}/raw/ct.nii.gz --size 256 --out p", SIGNAL,
      "SIGTERM during prepare", signal=(_TERM, "cpu:9", 0)),
    P("s03", f"prostlab {LONG_RENDER}", SIGNAL, "Ctrl-C during render",
      signal=(_INT, "cpu:10", 0)),
    P("s04", f"prostlab {LONG_RENDER}", SIGNAL, "SIGTERM during render",
      signal=(_TERM, "cpu:10", 0)),
    P("s05", f"prostlab {LONG_REGISTER}", SIGNAL, "Ctrl-C during register",
      signal=(_INT, "cpu:12", 0)),
    P("s06", f"prostlab {LONG_REGISTER}", SIGNAL, "SIGTERM during register",
      signal=(_TERM, "cpu:12", 0)),
    P("s07", f"prostlab {LONG_REGISTER} --overwrite", SIGNAL,
      "SIGTERM during register --overwrite of an earlier result",
      before=(f"prostlab register {REG} {NEAR} --out reg",), signal=(_TERM, "cpu:12", 0)),
    P("s08", "prostlab fit --config tiny --trainer.max_steps 400", SIGNAL,
      "Ctrl-C during fit: last.ckpt written", signal=(_INT, f"file:{_CKPT}", 1),
      outputs=(_CKPT,)),
    P("s09", "prostlab fit --config tiny --trainer.max_steps 400", SIGNAL,
      "SIGTERM during fit (a batch scheduler): last.ckpt written",
      signal=(_TERM, f"file:{_CKPT}", 1), outputs=(_CKPT,)),
    P("s10", "prostlab fit --config tiny --trainer.max_steps 400", SIGNAL,
      "Ctrl-C while fit starts up", signal=(_INT, "cpu:1.5", 0)),
    P("s11", "prostlab fit --config tiny --trainer.max_steps 400", SIGNAL,
      "SIGTERM while fit starts up", signal=(_TERM, "cpu:1.5", 0)),
    P("s12", "prostlab test --config tiny --ckpt_path {fx}/tiny.ckpt --data.test_samples 60",
      SIGNAL, "Ctrl-C during test", signal=(_INT, "file:results/tiny/*/", 3)),
    P("s13", "prostlab test --config tiny --ckpt_path {fx}/tiny.ckpt --data.test_samples 60",
      SIGNAL, "SIGTERM during test", signal=(_TERM, "file:results/tiny/*/", 3)),
    P("s14", f"prostlab {LONG_RENDER}", SIGNAL, "Ctrl-C while render starts up",
      signal=(_INT, "cpu:1", 0)),
]

_CAM = ("from prostlab.geometry import Camera\n"
        "cam = Camera(sdd=200.0, sid=120.0, height=9, width=9, pixel_spacing=(1.0, 1.0))\n")
_PROJ = ("import torch\n" + _CAM + "from prostlab.projector import Projector\n"
         "proj = Projector(cam, step=1.0, backend='torch')\n")
_NCC = "import torch\nfrom prostlab.similarity import ncc, gradient_ncc\n"
_REGISTER = ("import torch\n" + _CAM + "from prostlab.projector import Projector\n"
             "from prostlab.registration import register\n"
             "cam = Camera(sdd=1020.0, sid=620.0, height=16, width=16, pixel_spacing=(20.0, 20.0))"
             "\nproj = Projector(cam, step=10.0, backend='torch')\n")
API = [
    P("a01", "python", REFUSED, "Projector: meta volume", code=_PROJ + "proj(torch.zeros(1, 1, 4, "
      "4, 4, device='meta'), (1.0, 1.0, 1.0), torch.zeros(1, 6))"),
    P("a02", "python", REFUSED, "Projector: 3D volume", code=_PROJ + "proj(torch.zeros(4, 4, 4), "
      "(1.0, 1.0, 1.0), torch.zeros(1, 6))"),
    P("a07", "python", REFUSED, "ncc: images of two sizes",
      code=_NCC + "ncc(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 9, 9))"),
    P("a08", "python", REFUSED, "gradient_ncc: meta images",
      code=_NCC + "gradient_ncc(torch.rand(1, 1, 8, 8, device='meta'), torch.rand(1, 1, 8, 8, "
      "device='meta'))"),
    P("a10", "python", REFUSED, "Camera: negative sdd", code=_CAM.replace("sdd=200.0",
                                                                           "sdd=-200.0")),
    P("a12", "python", REFUSED, "example_path of an unknown example",
      code="from prostlab.data import example_path\nexample_path('chest_ct_99')"),
    P("a14", "python", REFUSED, "load_xray of a text file",
      setup={"x.dcm": "x"}, code="from prostlab.xray import load_xray\nload_xray('x.dcm')"),
    P("a15", "python", REFUSED, "register: 3D target", code=_REGISTER + "register(torch.zeros("
      "16, 16), torch.zeros(1, 6), 'gradncc', projector=proj, spacing=(10, 10, 10), "
      "ct=torch.zeros(1, 1, 8, 8, 8))"),
    P("a16", "python", REFUSED, "register: meta CT", code=_REGISTER + "register(torch.zeros(1, 1, "
      "16, 16), torch.zeros(1, 6), 'gradncc', projector=proj, spacing=(10, 10, 10), "
      "ct=torch.zeros(1, 1, 8, 8, 8, device='meta'))"),
    P("a18", "python", REFUSED, "register: NaN starts", code=_REGISTER + "register(torch.zeros("
      "1, 1, 16, 16), torch.full((1, 6), float('nan')), 'gradncc', projector=proj, "
      "spacing=(10, 10, 10), ct=torch.zeros(1, 1, 8, 8, 8))"),
]

PROBES = GENERAL + RENDER + PREPARE + REGISTER + FIT + TEST_VALIDATE + CONCURRENT + SIGNALS + API


# ------------------------------------------------------------------------------ fixtures
def make_fixtures(fx: Path) -> None:
    """Write the probes' input files into ``fx`` once: volumes, CTs, X-rays, checkpoints."""
    import nibabel as nib
    import numpy as np
    import torch
    from PIL import Image

    from prostlab.data import example_path, load_prepared, prepare_ct
    from prostlab.geometry import Camera
    from prostlab.projector import Projector
    from prostlab.xray import write_synthetic_dicom

    fx.mkdir(parents=True, exist_ok=True)
    example = example_path()
    affine4 = np.diag([4.0, 4.0, 4.0, 1.0])

    def nifti(name, array, affine=affine4):
        (fx / name).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(array), affine), fx / name)

    mu = np.zeros((16, 16, 16), np.float32)
    mu[4:12, 4:12, 4:12] = 0.02
    nifti("mu.nii.gz", mu)
    nifti("mu_2d.nii.gz", mu[8])
    nifti("mu_4d.nii.gz", np.stack([mu] * 3, axis=-1))
    nifti("hu.nii.gz", mu / 0.02683 * 1000 - 1000)
    nifti("mu_offset.nii.gz", mu / 0.02683 * 1000 + 24)
    nan = mu.copy()
    nan[8, 8, 8] = np.nan
    nifti("mu_nan.nii.gz", nan)
    nifti("mu_zero.nii.gz", np.zeros_like(mu))

    # A raw chest CT in HU on the bundled example's grid, with its labels and class table.
    ct = nib.load(example / "ct_mu.nii.gz")
    hu = np.asarray(ct.dataobj, np.float32) / 0.02683 * 1000 - 1000
    nifti("raw/ct.nii.gz", hu, ct.affine)
    shutil.copy(example / "labels.nii.gz", fx / "raw" / "labels.nii.gz")
    shutil.copy(example / "structures.csv", fx / "raw" / "structures.csv")
    nifti("raw_offset/ct.nii.gz", hu + 1024, ct.affine)
    nifti("raw_scaled/ct.nii.gz", (np.asarray(ct.dataobj) * 1e4).astype(np.int16), ct.affine)
    nifti("labels_other_grid.nii.gz", np.zeros((40, 40, 40), np.uint8))
    thick = np.full((20, 18, 16), -1000.0, np.float32)
    thick[6:14, 5:13, 4:12] = 700.0
    nifti("thick.nii.gz", thick, np.diag([1.5, 1.5, 500.0, 1.0]))
    shutil.copytree(example, fx / "prepared")

    # X-rays: the test suite's synthetic DICOM, a bone-bright PNG of the 64 x 64 detector, and
    # broken images.
    prepared = load_prepared(example)
    truth = torch.tensor([[0.05, -0.08, 0.1, 8.0, -12.0, 15.0]], dtype=torch.float64)
    fine = Camera(sdd=1020, sid=620, height=256, width=256, pixel_spacing=(1.46, 1.46))
    write_synthetic_dicom(fx / "chest.dcm", prepared.ct, truth, fine, bits_stored=12, seed=3)
    camera = Camera(sdd=1020, sid=620, height=64, width=64, pixel_spacing=(5.84, 5.84))
    small = prepared.ct.downsampled(2)
    drr = Projector(camera, step=3.5)(small.batched(), small.spacing, truth.float())[0, 0]
    grey = (20 + 230 * drr / drr.max()).round().numpy().astype(np.uint8)
    Image.fromarray(grey).save(fx / "chest.png")
    Image.fromarray(grey).convert("RGB").save(fx / "chest_rgb.png")
    Image.fromarray(grey).save(fx / "chest.jpg")
    np.save(fx / "eight.npy", np.random.default_rng(0).random((8, 8)) + 1)
    np.save(fx / "cube.npy", np.random.default_rng(0).random((4, 16, 16)) + 1)
    flat = np.random.default_rng(0).random((64, 64)) + 1
    flat[3, 3] = np.nan
    np.save(fx / "nan.npy", flat)
    np.save(fx / "flat.npy", np.full((64, 64), 7.0))
    (fx / "notes.yaml").write_text("just: notes\n")

    # Another CT: a water cylinder with three bone balls, prepared to a 32^3 cube.
    z, y, x = np.meshgrid(*(np.arange(48) - 23.5,) * 3, indexing="ij")
    phantom = np.full((48, 48, 48), -1000.0, np.float32)
    phantom[(x / 18) ** 2 + (y / 14) ** 2 <= 1] = 0.0
    for cx, cy, cz in ((5, 4, 0), (-6, -3, 8), (0, 8, -10)):
        phantom[(x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= 9] = 1200.0
    nifti("phantom_hu.nii.gz", phantom, np.diag([6.0, 6.0, 6.0, 1.0]))
    prepare_ct(fx / "phantom_hu.nii.gz", None, fx / "phantom", size=32, side_mm=288)

    rows = ["rx_deg,ry_deg,rz_deg,tx_mm,ty_mm,tz_mm"]
    rows += [f"0,0,{angle},0,0,0" for angle in range(0, 360, 2)]
    (fx / "many_poses.csv").write_text("\n".join(rows) + "\n")

    # A tiny network trained 4 steps: its run folder, and broken checkpoints.
    run = fx / "fitrun"
    run.mkdir()
    done = subprocess.run([PROSTLAB, "fit", "--config", "tiny"], cwd=run, env=probe_env({}),
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"fixtures: the tiny fit failed:\n{done.stderr[-3000:]}")
    last = run / "checkpoints" / "runs" / "tiny" / "last.ckpt"
    shutil.copy(last, fx / "tiny.ckpt")
    (fx / "text.ckpt").write_text("not a checkpoint\n")
    (fx / "empty.ckpt").write_bytes(b"")
    (fx / "truncated.ckpt").write_bytes(last.read_bytes()[:2000])


# ------------------------------------------------------------------------------ running
@dataclass
class Run:
    """One process of a probe: its exit status and output."""

    rc: int | None
    out: str
    err: str
    note: str = ""  # what happened with the signal, or the timeout


def probe_env(extra: dict) -> dict:
    """A run's environment: W&B offline, no colour, SIGINT-able."""
    return {**os.environ, "WANDB_MODE": "offline", "NO_COLOR": "1", "TERM": "dumb", **extra}


def fill(text: str, fx: Path) -> str:
    """``text`` with {fx} (the fixtures), {ex} (the bundled chest) and {repo} filled in."""
    from prostlab.data import example_path

    for key, value in (("fx", fx), ("ex", example_path()), ("repo", REPO)):
        text = text.replace("{" + key + "}", str(value))
    return text


def argv_of(cmd: str, fx: Path) -> list[str]:
    argv = shlex.split(fill(cmd, fx))
    if argv[0] == "prostlab":
        argv[0] = PROSTLAB
    elif argv[0] == "python":
        argv = [sys.executable, "probe.py"]
    return argv


API_WRAPPER = """\
import sys
from prostlab.errors import ProstlabError
try:
{body}
except ProstlabError as exc:
    print(f"prostlab api: error: {{exc}}", file=sys.stderr)
    sys.exit(2)
"""


def set_up(probe: Probe, folder: Path, fx: Path) -> None:
    """Run the probe's earlier commands, then write its files (and probe.py)."""
    for cmd in probe.before:
        done = subprocess.run(argv_of(cmd, fx), cwd=folder, env=probe_env(probe.env),
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"set-up `{cmd}` exited {done.returncode}: "
                               f"{last_line(done.stderr)}")
    for name, content in probe.setup.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content.startswith("fx:"):
            source = fx / content[3:]
            if source.is_dir():
                shutil.copytree(source, path, dirs_exist_ok=True)
            else:
                shutil.copy(source, path)
        else:
            path.write_text(content)
    if probe.code:
        body = "\n".join("    " + line for line in probe.code.splitlines())
        (folder / "probe.py").write_text(API_WRAPPER.format(body=body))


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by process ``pid``, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_and_signal(proc: subprocess.Popen, folder: Path, spec: tuple) -> str:
    """Send ``spec``'s signal once its condition holds; say what happened."""
    signum, when, delay = spec
    kind, _, arg = when.partition(":")
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if kind == "cpu" and cpu_seconds(proc.pid) >= float(arg):
            break
        if kind == "file" and list(folder.glob(arg)):
            break
        if not kind:
            break
        time.sleep(0.1)
    time.sleep(delay)
    if proc.poll() is not None:
        return f"ended (exit {proc.returncode}) before the {signal.Signals(signum).name}"
    used = cpu_seconds(proc.pid)
    proc.send_signal(signum)
    return f"{signal.Signals(signum).name} sent after {used:.1f} CPU s"


def run_probe_processes(probe: Probe, folder: Path, fx: Path, logs: Path) -> list[Run]:
    """Start the probe's copies at once, signal them if asked, and collect their output."""
    procs = []
    for i in range(probe.copies):
        out = (logs / f"{probe.id}.{i}.out").open("w")
        err = (logs / f"{probe.id}.{i}.err").open("w")
        procs.append((subprocess.Popen(argv_of(probe.cmd, fx), cwd=folder,
                                       env=probe_env(probe.env), stdout=out, stderr=err,
                                       stdin=subprocess.DEVNULL), out, err))
    notes = [wait_and_signal(p, folder, probe.signal) if probe.signal else ""
             for p, _, _ in procs]
    runs = []
    for (proc, out, err), note in zip(procs, notes, strict=True):
        try:
            proc.wait(timeout=probe.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            note = f"killed after the {probe.timeout} s timeout"
        out.close()
        err.close()
        runs.append(Run(proc.returncode, Path(out.name).read_text(errors="replace"),
                        Path(err.name).read_text(errors="replace"), note))
    return runs


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> the SHA-1 of its bytes."""
    found = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and "__pycache__" not in path.parts:
            found[str(path.relative_to(folder))] = hashlib.sha1(path.read_bytes()).hexdigest()
    return found


# ------------------------------------------------------------------------------ judging
def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def class_of(probe: Probe, run: Run, written: list[str]) -> tuple[str, str]:
    """The class of one process's outcome, and a one-line reason."""
    err_lines = [line.strip() for line in run.err.splitlines() if line.strip()]
    usage = sum(1 for line in run.err.splitlines() if line.startswith(("usage:", " ")))
    warned = [line for line in err_lines
              if WARNING_LINE.match(line) or (probe.warn and re.search(probe.warn, line))]
    if run.note.startswith("killed"):
        return "TIMEOUT", run.note
    if probe.signal and run.note.endswith("CPU s") and run.rc in (128 + probe.signal[0],
                                                                  -probe.signal[0]):
        stopped = next((line for line in err_lines if "stopped" in line), "no stop message")
        how = "died of the signal" if run.rc < 0 else f"exit {run.rc}"
        return SIGNAL, f"{run.note}; {how}; {stopped}"
    if run.rc == 2 and err_lines and ERROR_LINE.match(err_lines[-1]):
        chatter = len(err_lines) - 1 - usage
        extra = f" (+{chatter} other stderr lines)" if chatter > 0 else ""
        return REFUSED, err_lines[-1] + extra
    if run.rc in (0, 3) and warned:
        return WARNS, f"exit {run.rc}; {warned[0]}"
    if run.rc == 0:
        more = f" and {len(written) - 4} more" if len(written) > 4 else ""
        return WORKS, f"wrote {', '.join(written[:4]) or 'nothing'}{more}"
    return f"EXIT {run.rc}", (run.note + "; " if run.note else "") + last_line(run.err or run.out)


def unmet(probe: Probe, got: str, runs: list[Run], written: list[str],
          folder: Path) -> list[str]:
    """What the class ``got`` promises and this outcome does not keep."""
    problems = []
    if got == REFUSED and written:
        problems.append(f"wrote {', '.join(written[:3])}")
    if got in (WORKS, WARNS, SIGNAL):
        missing = [g for g in probe.outputs if not list(folder.glob(g))]
        if missing:
            problems.append(f"missing {', '.join(missing)}")
        for pattern in probe.stdout:
            if not any(re.search(pattern, run.out) for run in runs):
                problems.append(f"stdout lacks /{pattern}/")
    if got == SIGNAL:
        left = [str(p.relative_to(folder)) for p in folder.rglob(".tmp-*")]
        if left:
            problems.append(f"left {', '.join(left[:3])}")
    return problems


def lost(before: dict[str, str], after: dict[str, str], protected: set[str]) -> list[str]:
    """The protected files whose bytes are nowhere in ``after`` (moved aside is kept)."""
    kept = set(after.values())
    return sorted(name for name in protected if before[name] not in kept)


def moved(before: dict[str, str], after: dict[str, str], protected: set[str]) -> list[str]:
    """``old -> new`` for each protected file whose bytes now lie under another name."""
    return sorted(f"{name} -> {other}" for name in protected if after.get(name) != before[name]
                  for other, digest in after.items() if digest == before[name])


def judge(probe: Probe, runs: list[Run], before: dict, after: dict, protected: set,
          folder: Path) -> dict:
    """The verdict of a probe: its class, the verdict and one line of reasons."""
    written = sorted(name for name, digest in after.items()
                     if before.get(name) != digest and name != "probe.py")
    classes = [class_of(probe, run, written) for run in runs]
    got = "+".join(sorted(c for c, _ in classes))
    reasons = list(dict.fromkeys(r for _, r in classes))
    # Several copies at once: the outputs of the one that worked are checked.
    problems = unmet(probe, got if len(runs) == 1 else WORKS, runs, written, folder)
    gone = lost(before, after, protected)
    if any(TRACEBACK in run.err or TRACEBACK in run.out for run in runs):
        verdict = "TRACEBACK"
        tb = next(run for run in runs if TRACEBACK in run.err + run.out)
        reasons.insert(0, "traceback: " + last_line(tb.err or tb.out))
    elif gone:
        verdict = "LOSES-DATA"
        reasons.insert(0, f"lost {', '.join(gone)}")
    elif got not in probe.expect.split("|") or problems:
        verdict = "MISMATCH"
    elif probe.confusing:
        verdict = "CONFUSING"
    else:
        verdict = "PASS"
    shifted = moved(before, after, protected)
    if shifted:
        reasons.append(f"moved {', '.join(shifted)}")
    return {"got": got, "verdict": verdict, "reason": "; ".join(problems + reasons)}


def run_probe(probe: Probe, fx: Path, base: Path, logs: Path, keep: bool) -> dict:
    """Run one probe in a fresh folder under ``base``, and judge it."""
    folder = Path(tempfile.mkdtemp(prefix=f"{probe.id}-", dir=base))
    start = time.monotonic()
    try:
        set_up(probe, folder, fx)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return {"probe": probe, "got": "SET-UP", "verdict": "SET-UP FAILED", "reason": str(exc),
                "seconds": time.monotonic() - start}
    before = snapshot(folder)
    protected = {name for name in before
                 if any(Path(name).is_relative_to(root) for root in probe.setup)
                 or any(Path(name).match(g) for g in probe.protect)}
    protected -= {name for name in protected if any(Path(name).match(g) for g in probe.unprotect)}
    protected.discard("probe.py")
    runs = run_probe_processes(probe, folder, fx, logs)
    result = judge(probe, runs, before, snapshot(folder), protected, folder)
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return {"probe": probe, **result, "seconds": time.monotonic() - start}


# ------------------------------------------------------------------------------ the report
VERDICTS = ("PASS", "CONFUSING", "MISMATCH", "TRACEBACK", "LOSES-DATA", "SET-UP FAILED")


def documented(phrase: str) -> bool:
    texts = [p.read_text() for p in (REPO / "docs").glob("*.md")] + [
        (REPO / "README.md").read_text()]
    return any(phrase in text for text in texts)


def shown(probe: Probe) -> str:
    """The probe's command as the report shows it: fixtures as fx/, the bundled chest as
    EXAMPLE, the Python as its last line, the set-up in brackets."""
    text = probe.cmd
    if probe.code:
        text = "python: " + probe.code.strip().splitlines()[-1]
    text = text.replace("{fx}/", "fx/").replace("{ex}", "EXAMPLE").replace("{repo}/", "")
    extras = []
    if probe.before:
        extras.append("after: " + "; ".join(c.replace("{fx}/", "fx/").replace("{ex}", "EXAMPLE")
                                          for c in probe.before))
    if probe.setup:
        extras.append("set-up: " + ", ".join(probe.setup))
    if probe.copies > 1:
        extras.append(f"{probe.copies} at once")
    if probe.signal:
        signum, when, delay = probe.signal
        extras.append(f"{signal.Signals(signum).name} at {when or 'start'}"
                      + (f" + {delay} s" if delay else ""))
    if probe.env:
        extras.append(" ".join(f"{k}={v}" for k, v in probe.env.items()))
    return text + (f" [{'; '.join(extras)}]" if extras else "")


def cell(text: str, limit: int = 260) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()

    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--", "src") else ""
    return git("rev-parse", "--short", "HEAD") + dirty


def report(results: list[dict], argv: list[str], wall: float, cpu: float, load: str) -> str:
    counts = {v: sum(r["verdict"] == v for r in results) for v in VERDICTS}
    got = {}
    for r in results:
        got[r["got"]] = got.get(r["got"], 0) + 1
    lines = [
        "# CLI probes (issue 19)",
        "",
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- commit: {commit()}",
        f"- command: `{' '.join(['python bench/probes.py', *argv])}`",
        f"- wall time: {wall / 60:.1f} min for {len(results)} probes; their processes' CPU time "
        f"{cpu / 60:.1f} min; load average {load} (this machine is shared)",
        "- classes and verdicts: see the docstring of `bench/probes.py`",
        "",
        "| verdict | probes |",
        "| --- | ---: |",
        *(f"| {v} | {n} |" for v, n in counts.items() if n or v in VERDICTS[:5]),
        "",
        "| outcome | probes |",
        "| --- | ---: |",
        *(f"| {g} | {n} |" for g, n in sorted(got.items())),
        "",
    ]
    confusing = [r for r in results if r["verdict"] == "CONFUSING"]
    if confusing:
        lines += ["Confusing but documented:", ""]
        for r in confusing:
            phrase = r["probe"].confusing
            state = "documented" if documented(phrase) else "NOT FOUND in docs/ or README"
            lines.append(f"- {r['probe'].id}: {r['probe'].why} (\"{phrase}\": {state})")
        lines.append("")
    lines += ["| id | command | expected | got | verdict | reason | s |",
              "| --- | --- | --- | --- | --- | --- | ---: |"]
    for r in results:
        p = r["probe"]
        lines.append(f"| {p.id} | {cell(p.why + ': `' + shown(p) + '`', 400)} | {p.expect} | "
                     f"{r['got']} | {r['verdict']} | {cell(r['reason'])} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="regex of the probe ids (or their purpose) to run")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "probes.md"))
    parser.add_argument("--jobs", type=int, default=3, help="probes run at once")
    parser.add_argument("--keep", action="store_true", help="keep the probes' folders")
    parser.add_argument("--fixtures", help="a folder of fixtures from an earlier run")
    args = parser.parse_args(argv)
    # Children inherit an ignored SIGINT (a background job's); a handled one resets on exec.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started, load = time.monotonic(), f"{os.getloadavg()[0]:.1f}"
    probes = [p for p in PROBES if not args.only or re.search(args.only, f"{p.id} {p.why}")]
    ids = [p.id for p in PROBES]
    assert len(ids) == len(set(ids)), "duplicate probe ids"
    base = Path(tempfile.mkdtemp(prefix="prostlab-probes-"))
    fx = Path(args.fixtures) if args.fixtures else base / "fixtures"
    if not (fx / "tiny.ckpt").is_file():
        print(f"fixtures -> {fx}", flush=True)
        make_fixtures(fx)
    logs = base / "logs"
    logs.mkdir()
    print(f"{len(probes)} probes, folders and logs under {base}", flush=True)
    results = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_probe, p, fx, base, logs, args.keep): p for p in probes}
        for future in concurrent.futures.as_completed(futures):
            r = future.result()
            results.append(r)
            print(f"{r['probe'].id:4} {r['verdict']:10} {r['got']:14} {r['seconds']:5.0f} s  "
                  f"{cell(r['reason'], 150)}", flush=True)
    results.sort(key=lambda r: ids.index(r["probe"].id))
    shown_argv = list(argv if argv is not None else sys.argv[1:])
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    load += f" at the start, {os.getloadavg()[0]:.1f} at the end"
    text = report(results, shown_argv, time.monotonic() - started,
                  children.ru_utime + children.ru_stime, load)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
