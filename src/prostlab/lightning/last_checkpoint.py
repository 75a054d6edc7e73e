"""``last.ckpt`` every N training steps, on Ctrl-C, on a crash and at the end of training.

Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only when its monitored
checkpoint is written (after a validation that improved the metric), so an interrupted run could
resume from far behind. :class:`LastCheckpoint` writes it on a fixed step interval whatever the
monitored metric does, so a run killed outright (SIGKILL, power loss) loses at most
``every_n_train_steps`` steps, and one stopped by Ctrl-C, SIGTERM or an exception loses nothing.

Ctrl-C does not interrupt a training step half-way (an optimiser step cut between the momentum
and the parameter update could not be resumed exactly): the first Ctrl-C asks to stop, and the
run stops at the start of the next training batch (or validation batch), in the state it would
have after step ``global_step``; ``last.ckpt`` is written, and the process exits with status 1.
A second Ctrl-C stops at once.

``last.ckpt`` is written to a temporary name and moved into place, so a kill during the write
leaves the previous one intact (the next ``fit`` into the folder removes that temporary file).
``prostlab fit ... --ckpt_path last`` resumes from it.

A run that did not resume from the folder's ``last.ckpt`` (no ``--ckpt_path``, or another
checkpoint) would replace it, and with it an earlier run's only resume point: at the start of
training that file is moved aside as ``last-step<global step>.ckpt`` (:func:`move_aside`) and a
warning says where it went and how to resume it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info

from prostlab.errors import ProstlabError
from prostlab.outputs import remove_stale_temporaries, temporary_name

LAST_NAME = "last.ckpt"
MOVED_PREFIX = "last-step"
"""Names of earlier runs' ``last.ckpt`` moved aside: ``last-step000036.ckpt``, ..."""


def move_aside(path: str | Path) -> Path:
    """Rename the checkpoint ``path`` to ``last-step<NNNNNN>.ckpt`` beside it; return the new path.

    The step is the checkpoint's ``global_step`` (``last-step-unknown.ckpt`` when the file cannot
    be read, which is moved all the same). A name that is taken gets ``-2``, ``-3``, ...: no file
    is ever replaced.
    """
    path = Path(path)
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
        stem = f"{MOVED_PREFIX}{int(step):06d}"
    except Exception:  # noqa: BLE001 - any unreadable content: keep the file, name it so
        stem = f"{MOVED_PREFIX}-unknown"
    for attempt in range(1, 10_000):
        target = path.with_name(f"{stem}.ckpt" if attempt == 1 else f"{stem}-{attempt}.ckpt")
        if not target.exists():
            os.rename(path, target)
            return target
    raise ProstlabError(f"{path}: {stem}.ckpt to {stem}-9999.ckpt are all taken; expected room "
                        "to move it aside (move or delete the old ones)")


class LastCheckpoint(Callback):
    """Write ``<dirpath>/last.ckpt`` every ``every_n_train_steps`` steps, on interrupt and at the end.

    Args:
        every_n_train_steps: the interval, in optimiser steps (``trainer.global_step``); a
            killed run loses at most this many.
        dirpath: the folder of ``last.ckpt``; ``None``: that of the first ``ModelCheckpoint``
            with a ``dirpath``, else ``<trainer.default_root_dir>/checkpoints``.
    """

    def __init__(self, every_n_train_steps: int = 100, dirpath: str | None = None):
        if isinstance(every_n_train_steps, bool) or int(every_n_train_steps) != every_n_train_steps:
            raise ProstlabError(
                f"last_checkpoint.every_n_train_steps = {every_n_train_steps!r}; expected a "
                "positive whole number of training steps"
            )
        if every_n_train_steps < 1:
            raise ProstlabError(
                f"last_checkpoint.every_n_train_steps = {every_n_train_steps}; expected at least 1"
            )
        self.every_n_train_steps = int(every_n_train_steps)
        self.dirpath = dirpath
        self._saved_step: int | None = None
        self._started = self._stop_requested = False
        self._previous_handler: Any = None

    # -- where --------------------------------------------------------------------------------

    def resolve_dirpath(self, trainer: pl.Trainer) -> Path:
        """Fix ``dirpath`` (see the class docstring) and return it."""
        if self.dirpath is None:
            folders = [
                cb.dirpath
                for cb in trainer.callbacks
                if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None
            ]
            default = os.path.join(trainer.default_root_dir, "checkpoints")
            self.dirpath = str(folders[0] if folders else default)
        return Path(self.dirpath)

    @property
    def path(self) -> Path | None:
        """``<dirpath>/last.ckpt``, once ``dirpath`` is known."""
        return None if self.dirpath is None else Path(self.dirpath) / LAST_NAME

    def save(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` now (atomically), unless it already holds this step."""
        if self._saved_step == trainer.global_step:
            return
        path = self.resolve_dirpath(trainer) / LAST_NAME
        temporary = temporary_name(path)
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(temporary, weights_only=False)  # all state, to resume
        if trainer.is_global_zero:
            os.replace(temporary, path)
        self._saved_step = trainer.global_step

    # -- when ---------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a run killed while writing last.ckpt left its temporary file
            remove_stale_temporaries(self.resolve_dirpath(trainer))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Nothing to save yet at step 0, nor at the step just resumed from this last.ckpt.
        resumed = trainer.ckpt_path is not None and self.path is not None
        resumed = resumed and os.path.realpath(trainer.ckpt_path) == os.path.realpath(self.path)
        if not resumed and trainer.is_global_zero and self.path is not None and self.path.exists():
            self._keep_earlier_run()
        self._saved_step = trainer.global_step if trainer.global_step == 0 or resumed else None
        self._started, self._stop_requested = True, False
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._request_stop)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        stop = self._stop_requested
        if trainer.world_size > 1:  # every rank stops at the same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            raise KeyboardInterrupt

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        # A long validation need not run to its end; the training state is that of a step's
        # end. With several processes only the training-batch check, which they share, stops.
        if self._stop_requested and trainer.world_size == 1 and not trainer.sanity_checking:
            if trainer.state.fn == TrainerFn.FITTING:
                raise KeyboardInterrupt

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_train_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)
        self._started = False
        self._restore_handler()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handler()
        if trainer.state.fn != TrainerFn.FITTING or not self._started:
            return  # not training, or stopped before training started: nothing new to keep
        if trainer.world_size > 1 and not self._stop_requested:
            return  # one rank's crash: the others would wait for it in the save's barrier
        self.save(trainer)
        if trainer.is_global_zero:
            if isinstance(exception, KeyboardInterrupt | SystemExit):  # Ctrl-C, SIGTERM
                why = "stopped"
            else:
                why = f"crashed ({type(exception).__name__})"
            rank_zero_info(
                f"prostlab fit: {why} at step {trainer.global_step}; wrote {self.path}; resume "
                "with the same command and --ckpt_path last"
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handler()

    def _keep_earlier_run(self) -> None:
        """Move an earlier run's ``last.ckpt`` aside (:func:`move_aside`) and say so."""
        moved = move_aside(self.path)
        print(
            f"\nprostlab fit: WARNING: {self.path} held an earlier run that this one did not "
            f"resume; it was moved to {moved}. To continue that run instead, stop this one and "
            f"pass --ckpt_path {moved}\n",
            file=sys.stderr,
            flush=True,
        )

    # -- Ctrl-C -------------------------------------------------------------------------------

    def _request_stop(self, signum, frame) -> None:
        """First Ctrl-C: stop at the next batch boundary; the next one interrupts at once."""
        self._stop_requested = True
        self._restore_handler()
        print(
            "\nprostlab fit: stopping after this step and writing last.ckpt "
            "(Ctrl-C again to stop at once)",
            flush=True,
        )

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None
