"""Detector blur for simulated X-rays: a Gaussian point spread on the detector plane.

A real detector spreads each ray's signal over neighbouring pixels (scintillator light spread,
focal-spot size). It is modelled as a separable Gaussian of standard deviation ``sigma_mm`` on
the detector, ``sigma_mm / dv`` pixels along rows and ``sigma_mm / du`` along columns
(``(dv, du)`` the camera's pixel spacing, mm):

    I_blur(v, u) = sum_(i, j) g_v(i) g_u(j) I(v - i, u - j),
    g(k) = exp(-k^2 / (2 s^2)) / sum_k' exp(-k'^2 / (2 s^2)),  |k| <= ceil(3 s),

with zero outside the detector. The kernels sum to one, so the total intensity is kept except
for what spreads past the detector's edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from prostlab.errors import ProstlabError

KERNEL_RADIUS_SIGMAS = 3.0
"""Half-width of the discrete kernel, in standard deviations (beyond it the weights are < 1.2 %
of the peak and are dropped)."""


def _kernel(sigma_px: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = max(1, math.ceil(KERNEL_RADIUS_SIGMAS * sigma_px))
    k = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    weights = torch.exp(-0.5 * (k / sigma_px) ** 2)
    return weights / weights.sum()


def detector_blur(
    image: torch.Tensor, sigma_mm: float | None, pixel_spacing: Sequence[float]
) -> torch.Tensor:
    """``image`` ``(B, C, H, W)`` blurred by a Gaussian of ``sigma_mm`` on the detector.

    Args:
        image: detector images, ``(B, C, H, W)``.
        sigma_mm: standard deviation of the point spread on the detector, mm; ``None`` or 0: none.
        pixel_spacing: ``(dv, du)``, the pixel size along rows and columns, mm.

    Returns:
        The blurred images, same shape and dtype.
    """
    if sigma_mm is None or sigma_mm == 0:
        return image
    if isinstance(sigma_mm, bool) or not isinstance(sigma_mm, int | float) or not (
        math.isfinite(sigma_mm) and sigma_mm > 0
    ):
        raise ProstlabError(
            f"blur_mm: expected a non-negative standard deviation in mm on the detector, "
            f"got {sigma_mm!r}"
        )
    if image.dim() != 4:
        raise ProstlabError(f"image: expected (B, C, H, W) detector images, got {tuple(image.shape)}")
    dv, du = (float(s) for s in pixel_spacing)
    batch, channels, height, width = image.shape
    flat = image.reshape(batch * channels, 1, height, width)
    rows = _kernel(sigma_mm / dv, image.dtype, image.device)
    cols = _kernel(sigma_mm / du, image.dtype, image.device)
    flat = F.conv2d(flat, rows.view(1, 1, -1, 1), padding=(rows.numel() // 2, 0))
    flat = F.conv2d(flat, cols.view(1, 1, 1, -1), padding=(0, cols.numel() // 2))
    return flat.reshape(batch, channels, height, width)
