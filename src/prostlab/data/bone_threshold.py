"""Bones from the CT itself, for scans without a label map.

Most scans a user has come without a segmentation. :func:`threshold_bones` builds a bone mask
from the Hounsfield units alone, in four steps on the source grid:

1. **Body.** ``HU > body_hu`` (soft tissue and denser), opened by a ball of ``body_opening_mm``
   so that the patient table's thin contacts with the body break, then the largest connected
   component, dilated back. Outside it (the table, cushions, cables, air) nothing is bone.
2. **Seeds.** ``HU >= dense_hu`` inside the body, without the connected objects smaller than
   ``min_volume_ml`` (specks: noise, small calcifications). Cortical bone is denser than
   contrast-filled vessels (200-450 HU) and far denser than soft tissue.
3. **Growth.** The seeds grow ``grow_mm`` (a geodesic dilation) through the candidates
   ``HU >= bone_hu`` inside the body: the trabecular bone beside the cortex joins, while a
   vessel as dense as trabecular bone joins only within ``grow_mm`` of a seed it touches.
4. **Marrow.** Holes of less than ``max_hole_cm2`` are filled slice by slice in each of the
   three planes, so that the marrow inside a cortical shell, softer than ``bone_hu``, counts as
   bone as it does in a label map; larger holes (the thorax inside its ring of ribs) stay empty.

Limits, measured on ``chest_ct`` (``bench/bone_threshold.py``): a contrast-enhanced heart or
aorta whose densest voxels pass ``dense_hu`` seeds itself, and costal cartilage (about 100 HU)
is not found; a label map counts both as they are.

The default ``bone_hu`` is chosen by the Dice of the mask with the bone labels of the labelled
chest CT (``bench/bone_threshold.py``, docs/data.md: "Bones without labels").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from prostlab.errors import ProstlabError

BONE_HU = 150.0
"""Default threshold (HU) of :func:`threshold_bones`, chosen on ``chest_ct``'s labels."""


@dataclass(frozen=True)
class BoneThreshold:
    """The settings of :func:`threshold_bones` (module docstring).

    Attributes:
        bone_hu: voxels at or above this HU (inside the body) are bone candidates.
        body_hu: voxels above this HU make the body.
        dense_hu: voxels at or above this HU (in objects of at least ``min_volume_ml``) seed
            the bones: cortical bone, denser than contrast-filled vessels.
        grow_mm: the seeds grow this far (a geodesic dilation) through the candidates.
        min_volume_ml: components smaller than this (millilitres) are specks.
        body_opening_mm: radius of the ball that opens the body mask (cuts the table off).
        max_hole_cm2: holes of a slice up to this area are marrow and filled; larger ones (the
            thorax inside the ribs) are not.
    """

    bone_hu: float = BONE_HU
    body_hu: float = -300.0
    dense_hu: float = 500.0
    grow_mm: float = 8.0
    min_volume_ml: float = 0.1
    body_opening_mm: float = 4.0
    max_hole_cm2: float = 20.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not np.isfinite(value):
                raise ProstlabError(f"{field.name}: {value!r}; expected a finite number")
        if not -500.0 <= self.bone_hu <= 1500.0:
            raise ProstlabError(
                f"bone_hu: {self.bone_hu:g}; expected a threshold between -500 and 1500 HU "
                f"(bone is about +150 to +2000 HU; the default is {BONE_HU:g})"
            )
        if self.dense_hu < self.bone_hu:
            raise ProstlabError(
                f"dense_hu: {self.dense_hu:g} below bone_hu {self.bone_hu:g}; expected the "
                "seeds' threshold at or above the candidates'"
            )
        if min(self.grow_mm, self.min_volume_ml, self.body_opening_mm, self.max_hole_cm2) < 0:
            raise ProstlabError(
                "grow_mm, min_volume_ml, body_opening_mm, max_hole_cm2: expected >= 0"
            )


def threshold_bones(
    hu: np.ndarray,
    spacing_mm: tuple[float, float, float],
    settings: BoneThreshold | None = None,
) -> np.ndarray:
    """A boolean bone mask of a CT in Hounsfield units (module docstring).

    Args:
        hu: the CT, ``(I, J, K)``, Hounsfield units (outside-the-field-of-view already air).
        spacing_mm: voxel size along each axis.
        settings: the thresholds and sizes; default :class:`BoneThreshold`'s.

    Returns:
        ``(I, J, K)`` bool, True on bone.
    """
    s = settings or BoneThreshold()
    spacing = np.asarray(spacing_mm, dtype=float)
    body = _body(hu, spacing, s)
    seeds = _large_components((hu >= s.dense_hu) & body, spacing, s.min_volume_ml)
    candidates = (hu >= s.bone_hu) & body
    del body
    steps = int(round(s.grow_mm / float(spacing.min())))
    mask = seeds if steps == 0 else ndimage.binary_dilation(
        seeds, structure=np.ones((3, 3, 3), bool), iterations=steps, mask=candidates
    )
    for axis in range(3):
        pixel_cm2 = float(np.prod(np.delete(spacing, axis))) / 100.0
        mask = _fill_slices(mask, axis, s.max_hole_cm2 / pixel_cm2)
    return mask


def _large_components(mask: np.ndarray, spacing: np.ndarray, min_volume_ml: float) -> np.ndarray:
    """``mask`` without its connected components (26-connectivity) under ``min_volume_ml``."""
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return mask
    sizes = np.bincount(labelled.ravel()) * (float(np.prod(spacing)) / 1000.0)
    keep = sizes >= min_volume_ml
    keep[0] = False
    return keep[labelled]


def _body(hu: np.ndarray, spacing: np.ndarray, s: BoneThreshold) -> np.ndarray:
    """The largest connected object denser than ``body_hu`` after an opening of radius
    ``body_opening_mm`` (dilated back by the same ball so its surface stays where it was)."""
    body = hu > s.body_hu
    ball = _ball(s.body_opening_mm, spacing)
    opened = ndimage.binary_opening(body, structure=ball) if ball is not None else body
    labelled, count = ndimage.label(opened)
    if count == 0:
        raise ProstlabError(
            f"no voxel above {s.body_hu:g} HU: expected a CT with a body in it"
        )
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    largest = labelled == int(np.argmax(sizes))
    if ball is not None:
        largest = ndimage.binary_dilation(largest, structure=ball) & body
    return largest


def _ball(radius_mm: float, spacing: np.ndarray) -> np.ndarray | None:
    """A boolean ellipsoid of ``radius_mm`` in voxels of ``spacing``, or None if under a voxel."""
    radii = np.floor(radius_mm / spacing).astype(int)
    if radius_mm <= 0 or not radii.any():
        return None
    grids = np.meshgrid(*[np.arange(-r, r + 1) * d for r, d in zip(radii, spacing, strict=True)],
                        indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2


def _fill_slices(mask: np.ndarray, axis: int, max_hole_pixels: float) -> np.ndarray:
    """Fill the holes of fewer than ``max_hole_pixels`` pixels in each 2D slice across
    ``axis`` (larger holes are not marrow: the thorax inside the ring of ribs, spine and
    sternum)."""
    filled = np.moveaxis(mask.copy(), axis, 0)
    for plane in filled:
        if not plane.any():
            continue
        holes, count = ndimage.label(ndimage.binary_fill_holes(plane) & ~plane)
        if count:
            small = np.bincount(holes.ravel()) < max_hole_pixels
            small[0] = False
            plane |= small[holes]
    return np.moveaxis(filled, 0, axis)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient ``2 |A & B| / (|A| + |B|)`` of two boolean masks (1.0 if both empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


__all__ = ["BONE_HU", "BoneThreshold", "dice", "threshold_bones"]
