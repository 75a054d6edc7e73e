"""Send target/moving/overlay panels to whichever logger a run uses."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import torch
from pytorch_lightning.loggers import Logger, WandbLogger

from prostlab.viz.panels import panel


def log_panels(
    logger: Logger, key: str, target: torch.Tensor, moving: torch.Tensor, step: int
) -> None:
    """Log a (target | moving | overlay) strip: a W&B image, or a PNG in the logger's folder."""
    strip = panel(target, moving)
    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[strip], step=step, caption=["target | moving | overlay"])
        return
    folder = getattr(logger, "log_dir", None)
    if folder is None:
        return
    path = Path(folder) / "panels" / f"{key.replace('/', '_')}_{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, strip)
