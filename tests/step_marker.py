"""A test-only callback: ``--trainer.callbacks+=step_marker.StepMarker`` (``tests/`` on the path).

It appends each finished training step to ``steps.txt`` in the working folder, so that a test can
wait for a step before it kills the run, and knows afterwards how far the run had got.
"""

from pytorch_lightning.callbacks import Callback


class StepMarker(Callback):
    """Append ``trainer.global_step`` to ``./steps.txt`` at the end of every training batch."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open("steps.txt", "a") as f:
            f.write(f"{trainer.global_step}\n")
