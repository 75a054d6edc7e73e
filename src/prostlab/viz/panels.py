"""Side-by-side panels of a target X-ray and a moving DRR, for logs and reports."""

from __future__ import annotations

import numpy as np
import torch


def _unit(image: torch.Tensor) -> np.ndarray:
    """Min-max scale a (H, W) image to [0, 1] (a flat image becomes zeros)."""
    image = image.detach().float().cpu()
    span = image.max() - image.min()
    scaled = (image - image.min()) / span if span > 0 else torch.zeros_like(image)
    return scaled.numpy()


def overlay(target: torch.Tensor, moving: torch.Tensor) -> np.ndarray:
    """(H, W, 3) colour overlay: target in magenta, moving in green; aligned anatomy turns grey."""
    t, m = _unit(target), _unit(moving)
    return np.stack((t, m, t), axis=-1)


def panel(target: torch.Tensor, moving: torch.Tensor) -> np.ndarray:
    """(H, 3W, 3) uint8 strip: target | moving | overlay, from (H, W) images."""
    grey = [np.repeat(_unit(x)[..., None], 3, axis=-1) for x in (target, moving)]
    strip = np.concatenate((*grey, overlay(target, moving)), axis=1)
    return (strip * 255).round().astype(np.uint8)
