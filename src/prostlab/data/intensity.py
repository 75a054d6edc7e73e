"""Hounsfield units to linear attenuation, and the CT's outside-the-field-of-view fill.

The Hounsfield scale is defined by ``HU = 1000 (mu - mu_water) / (mu_water - mu_air)``, so

    mu = mu_water + HU (mu_water - mu_air) / 1000,

which with ``mu_air = 0`` is ProST's mapping ``mu = mu_water (1 + HU / 1000)``. Air (-1000 HU)
maps to ``mu_air``, water (0 HU) to ``mu_water``; values below ``clamp_min`` (HU below -1000,
from noise or fill values) are clamped, since attenuation is never negative. ProST uses
``mu_water = 0.02683`` /mm (water at about 60 keV).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import TypeVar

import numpy as np
import torch

from prostlab.errors import ProstlabError

MU_WATER = 0.02683
"""Linear attenuation of water in 1/mm (ProST's value)."""

MAX_MU_WATER = 0.2
"""Highest attenuation of water (1/mm) accepted: water attenuates about 0.02 /mm at diagnostic
energies (60-80 keV) and 0.08 /mm at 20 keV (mammography). Above is a wrong unit (1/cm gives
0.27) or a typo: ``--mu-water 1e9`` made bone volumes of 2e9 /mm that ``render`` refuses."""

HU_AIR = -1000.0
"""Air in Hounsfield units, by definition."""

FOV_FILL_BELOW = -1024.0
"""CT values below this are outside the scanner's field of view (e.g. -2048), not tissue."""

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def check_mu_water(mu_water: float, mu_air: float = 0.0) -> float:
    """Return ``mu_water`` as a float if it is a finite attenuation above ``mu_air`` (1/mm) and
    at most :data:`MAX_MU_WATER`.

    A NaN ``mu_water`` would make every voxel NaN, and one at or below ``mu_air`` (e.g. negative)
    maps all tissue to at most air, so the bones vanish; one far above water's (1e9) makes a
    volume no X-ray could cross. All are refused with a ``ProstlabError``.
    """
    ok = (
        isinstance(mu_water, Real) and not isinstance(mu_water, bool)
        and isinstance(mu_air, Real) and math.isfinite(mu_water) and math.isfinite(mu_air)
        and mu_air >= 0 and mu_air < mu_water <= MAX_MU_WATER
    )
    if not ok:
        raise ProstlabError(
            f"mu_water: {mu_water!r} (mu_air {mu_air!r}); expected a finite attenuation of water "
            f"in 1/mm, above mu_air >= 0 and at most {MAX_MU_WATER:g} (ProST: {MU_WATER}; a "
            "value in 1/cm is ten times too large)"
        )
    return float(mu_water)


def hu_to_mu(
    hu: ArrayT, mu_water: float = MU_WATER, mu_air: float = 0.0, clamp_min: float = 0.0
) -> ArrayT:
    """Linear attenuation ``max(mu_air + (HU + 1000) (mu_water - mu_air) / 1000, clamp_min)``.

    In 1/mm; equal to ``mu_water + HU (mu_water - mu_air) / 1000``.

    Works elementwise on a numpy array (returns float32) or a torch tensor (keeps a floating
    dtype, else float32) of any shape. ``mu_water`` must be finite and above ``mu_air >= 0``
    (:func:`check_mu_water`).
    """
    check_mu_water(mu_water, mu_air)
    # Evaluated as mu_air + (HU + 1000) * scale, so that air maps to mu_air exactly.
    scale = (mu_water - mu_air) / 1000.0
    if isinstance(hu, torch.Tensor):
        hu = hu if hu.is_floating_point() else hu.float()
        return ((hu - HU_AIR) * scale + mu_air).clamp_min(clamp_min)
    mu = np.array(hu, dtype=np.float32)  # a copy: hu is not touched
    mu -= np.float32(HU_AIR)
    mu *= np.float32(scale)
    mu += np.float32(mu_air)
    return np.maximum(mu, np.float32(clamp_min), out=mu)


def fill_outside_fov(
    hu: np.ndarray, below: float = FOV_FILL_BELOW, value: float = HU_AIR
) -> np.ndarray:
    """Replace values below ``below`` HU (the scanner's outside-the-field-of-view marker,
    typically -2048 or -3024) by ``value`` (air, -1000 HU) and return a new array.

    After :func:`hu_to_mu` with its clamp at 0 this changes nothing, since both map to
    ``mu = 0``; it matters wherever HU values are interpolated or displayed, where -2048 would
    otherwise darken the voxels next to the field of view's edge below air.
    """
    return np.where(hu < below, np.asarray(value, dtype=hu.dtype), hu)
