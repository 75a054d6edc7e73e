"""`prostlab fit` end to end on the CPU: offline W&B history, two-process DDP, bad configs.

Stopping and resuming a run is tested in ``test_resume.py``.
"""

import pytest
import torch

from fit_run import fit
from wandb_offline import history


def test_fit_offline_wandb_history_images_and_config(tmp_path):
    done = fit(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "anonymous" not in done.stdout + done.stderr  # W&B's warning on every run, before
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
