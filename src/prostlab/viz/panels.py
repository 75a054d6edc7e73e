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


def _standard(image: torch.Tensor, spread: float = 2.5) -> np.ndarray:
    """``z = (x - mean) / std`` shown as ``clip(1/2 + z / (2 spread), 0, 1)`` (flat: 1/2)."""
    image = image.detach().double().cpu()
    std = image.std(unbiased=False)
    z = (image - image.mean()) / std if std > 0 else torch.zeros_like(image)
    return (0.5 + z / (2 * spread)).clamp(0, 1).float().numpy()


def overlay(target: torch.Tensor, moving: torch.Tensor) -> np.ndarray:
    """(H, W, 3) colour overlay: target in magenta, moving in green; aligned anatomy turns grey.

    Each image is standardised (zero mean, unit variance, +-2.5 std shown) rather than min-max
    scaled: two images that differ by an intensity scale and offset, which NCC ignores (a DRR and
    an X-ray whose I0 was estimated), then overlay as grey where they are aligned.
    """
    t, m = _standard(target), _standard(moving)
    return np.stack((t, m, t), axis=-1)


def panel(target: torch.Tensor, moving: torch.Tensor) -> np.ndarray:
    """(H, 3W, 3) uint8 strip: target | moving | overlay, from (H, W) images."""
    grey = [np.repeat(_unit(x)[..., None], 3, axis=-1) for x in (target, moving)]
    strip = np.concatenate((*grey, overlay(target, moving)), axis=1)
    return (strip * 255).round().astype(np.uint8)
