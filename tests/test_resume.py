"""Stop a real ``prostlab fit`` with Ctrl-C, resume it, SIGKILL it, resume it again: the result is
the run that was never stopped.

``last.ckpt`` is written every ``last_checkpoint.every_n_train_steps`` steps, on Ctrl-C and at
the end (:mod:`prostlab.lightning.last_checkpoint`). After Ctrl-C nothing is lost; after SIGKILL
at most that interval. ``--ckpt_path last`` then reaches the same final step, parameters,
optimiser and scheduler state as an uninterrupted run (which runs alongside, to save time).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import torch

from fit_run import fit, start_fit, tiny_checkpoint

STEPS, EVERY = 9, 2  # 9: the last step is saved by the end of training, not the interval
RUN = ("--trainer.max_steps", str(STEPS), "--last_checkpoint.every_n_train_steps", str(EVERY),
       "--model.image_every_n_steps", "0", "--trainer.enable_progress_bar", "false")
MARKED = (*RUN, "--trainer.callbacks+=step_marker.StepMarker")


def steps_done(folder: Path) -> int:
    """The last step that the runs in ``folder`` finished (``steps.txt`` of the step marker)."""
    path = folder / "steps.txt"
    return max(map(int, path.read_text().split()), default=0) if path.is_file() else 0


def run_until_step(folder: Path, step: int, *overrides: str) -> subprocess.Popen:
    """Start the marked run in ``folder`` and return it once it has finished ``step``."""
    run = start_fit(folder, *MARKED, *overrides)
    deadline = time.monotonic() + 300
    while steps_done(folder) < step:
        assert run.poll() is None, (folder / "fit.log").read_text()[-3000:]
        assert time.monotonic() < deadline, f"the run did not reach step {step} in time"
        time.sleep(0.02)
    return run


def test_ctrl_c_and_sigkill_then_resume_give_the_straight_run(tmp_path):
    straight_dir, folder = tmp_path / "straight", tmp_path / "stopped"
    straight_dir.mkdir(), folder.mkdir()
    straight = start_fit(straight_dir, *RUN)

    # Ctrl-C after a step that the interval does not save: it stops at the next batch, saved.
    run = run_until_step(folder, EVERY + 1)
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=120) == 130  # 128 + SIGINT, as every command (was 1)
    log = (folder / "fit.log").read_text()
    stopped = tiny_checkpoint(folder)["global_step"]
    assert stopped == steps_done(folder), log[-3000:]  # nothing lost
    assert EVERY < stopped < STEPS - 1, log[-3000:]
    assert f"stopped at step {stopped}" in log and "--ckpt_path last" in log

    # Resume, then SIGKILL one step later: at most the interval is lost.
    run = run_until_step(folder, stopped + 1, "--ckpt_path", "last")
    run.kill()
    run.wait(timeout=60)
    saved = tiny_checkpoint(folder)["global_step"]
    assert stopped <= saved < STEPS
    assert steps_done(folder) - saved <= EVERY

    # Resume to the end: the same run as the one never stopped.
    done = fit(folder, *RUN, "--ckpt_path", "last")
    assert done.returncode == 0, done.stderr[-3000:]
    assert straight.wait(timeout=600) == 0, (straight_dir / "fit.log").read_text()[-3000:]
    state, reference = tiny_checkpoint(folder), tiny_checkpoint(straight_dir)
    assert state["global_step"] == reference["global_step"] == STEPS
    assert state["optimizer_states"][0]["state"]  # momentum buffers carried over
    assert state["lr_schedulers"][0]["last_epoch"] == STEPS
    for key, value in reference["state_dict"].items():
        assert torch.allclose(state["state_dict"][key], value, atol=1e-6), key


def test_sigterm_saves_last_checkpoint_and_exits_143_without_a_traceback(tmp_path):
    run = run_until_step(tmp_path, 2, "--trainer.max_steps", "1000")  # far from its end
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 128 + signal.SIGTERM  # a batch scheduler sees a failure
    log = (tmp_path / "fit.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    stopped = tiny_checkpoint(tmp_path)["global_step"]
    assert stopped == steps_done(tmp_path) >= 2, log[-3000:]  # nothing lost
    assert f"stopped at step {stopped}" in log and "stopped by SIGTERM" in log
