"""Run ``prostlab fit`` on ``configs/tiny.yaml`` in a subprocess, for the tests.

W&B runs offline. ``tests/`` is on the subprocess's ``PYTHONPATH``, so that a test may add one of
its own callbacks (``--trainer.callbacks+=step_marker.StepMarker``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TINY = REPO / "configs" / "tiny.yaml"
TINY_CHECKPOINTS = Path("checkpoints") / "runs" / "tiny"
"""The tiny config's checkpoint folder, relative to the run's working folder."""


def fit_command(*overrides: str) -> list[str]:
    """The command line of ``prostlab fit --config configs/tiny.yaml <overrides>``."""
    return [sys.executable, "-m", "prostlab.cli", "fit", "--config", str(TINY), *overrides]


def fit_env(**extra: str) -> dict[str, str]:
    """The environment of a test run: offline W&B, no warnings, ``tests/`` importable."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": path, **extra}


def fit(workdir: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``prostlab fit`` on the tiny config in ``workdir`` to its end (``env``: extra vars)."""
    return subprocess.run(fit_command(*overrides), cwd=workdir, env=fit_env(**env),
                          capture_output=True, text=True, timeout=600)


def start_fit(workdir: Path, *overrides: str) -> subprocess.Popen:
    """Start ``prostlab fit`` on the tiny config in ``workdir``; its output goes to ``fit.log``."""
    log = (workdir / "fit.log").open("w")
    return subprocess.Popen(fit_command(*overrides), cwd=workdir, env=fit_env(),
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def tiny_checkpoint(workdir: Path, name: str = "last.ckpt") -> dict:
    """A checkpoint of the tiny config's run in ``workdir``, read safely."""
    return torch.load(workdir / TINY_CHECKPOINTS / name, weights_only=True)
