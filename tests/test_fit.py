"""`prostlab fit` end to end on the CPU: offline W&B history, resume, two-process DDP."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wandb_offline import history

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def fit(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "prostlab.cli", "fit", "--config", str(TINY), *overrides],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_fit_offline_wandb_history_images_and_config(tmp_path):
    done = fit(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "tiny" / "wandb").glob("offline-run-*")
    keys = set().union(*history(run))
    for key in (
        "train/loss",
        "train/grad_norm",
        "lr-SGD",
        "val/loss",
        "val/convex_fraction",
        "val/cosine_rotation",
        "train/panels",
        "val/panels",
    ):
        assert any(k.startswith(key) for k in keys), (key, sorted(keys))
    assert list((run / "files" / "media" / "images").rglob("*.png"))
    assert (tmp_path / "runs" / "tiny" / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "runs" / "tiny" / "last.ckpt").is_file()


def test_resume_from_last_continues_as_if_never_stopped(tmp_path):
    """Stop at step 2, resume to step 4: the same step count, optimiser and scheduler state,
    cases and so parameters as a run of 4 steps straight."""
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    stopped.mkdir(), straight.mkdir()
    common = ["--trainer.limit_val_batches", "0", "--model.image_every_n_steps", "0"]
    first = fit(stopped, "--trainer.max_steps", "2", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    last = stopped / "checkpoints" / "runs" / "tiny" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    resumed = fit(stopped, "--trainer.max_steps", "4", "--ckpt_path", "last", *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 4
    assert state["optimizer_states"][0]["state"]  # momentum buffers carried over
    assert state["lr_schedulers"][0]["last_epoch"] == 4
    done = fit(straight, "--trainer.max_steps", "4", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = torch.load(straight / "checkpoints/runs/tiny/last.ckpt", weights_only=True)
    for key, value in reference["state_dict"].items():
        assert torch.allclose(state["state_dict"][key], value, atol=1e-6), key


def test_two_process_ddp_matches_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    common = [
        "--trainer.max_steps",
        "2",
        "--trainer.limit_val_batches",
        "0",
        "--data.batch_size",
        "2",
        "--model.image_every_n_steps",
        "0",
    ]
    done = fit(one, *common)
    assert done.returncode == 0, done.stderr[-3000:]
    done = fit(two, *common, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    a = torch.load(one / "checkpoints/runs/tiny/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(two / "checkpoints/runs/tiny/last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-5), key


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (["--model.stpe", "2"], "--model.step"),
        (
            ["--data.batch_size", "3", "--trainer.devices", "2", "--trainer.strategy", "ddp"],
            "data.batch_size",
        ),
        (["--data.volumes", "[{prepared: no/such/folder}]"], "no/such/folder"),
    ],
)
def test_bad_config_is_one_line_with_exit_code_2(tmp_path, override, needle):
    done = fit(tmp_path, *override)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert needle in last and "Traceback" not in done.stderr
