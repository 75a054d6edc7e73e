"""Reorient a voxel array by flips and axis permutations, keeping its world affine exact.

An orientation code such as ``"LIP"`` names, for each array axis, the patient direction in which
the index increases: axis 0 towards the Left, axis 1 Inferior, axis 2 Posterior. Prepared volumes
are LIP (``docs/geometry.md``), so the identity pose looks at the patient from the front.
"""

from __future__ import annotations

import numpy as np
from nibabel.orientations import (
    aff2axcodes,
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from prostlab.errors import ProstlabError

PREPARED_ORIENTATION = "LIP"


def orientation_of(affine: np.ndarray) -> str:
    """The three-letter code of the world direction closest to each array axis, e.g. ``"LAS"``."""
    return "".join(aff2axcodes(affine))


def reorient(
    array: np.ndarray, affine: np.ndarray, target: str = PREPARED_ORIENTATION
) -> tuple[np.ndarray, np.ndarray]:
    """Flip and permute ``array``'s axes so that they point along ``target``.

    Only flips and permutations are applied, so no voxel value changes. If ``T`` maps new indices
    to old ones (``inv_ornt_aff``), the new affine is ``A' = A @ T``: every voxel keeps its world
    position. Oblique grids are assigned the nearest axis codes (nibabel's ``io_orientation``).

    Args:
        array: 3D array ``(I, J, K)``.
        affine: its ``(4, 4)`` voxel-to-world RAS affine.
        target: three letters, one from each of ``LR``, ``AP``, ``SI``, e.g. ``"LIP"``.

    Returns:
        ``(array', affine')`` with ``orientation_of(affine') == target`` (contiguous copy).
    """
    code = target.upper()
    if len(code) != 3 or sorted(_axis_pair(c) for c in code) != [0, 1, 2]:
        raise ProstlabError(
            f"reorient target: {target!r} is not an orientation code; expected three letters, "
            "one from each of LR, AP, SI (e.g. 'LIP')"
        )
    if array.ndim != 3:
        raise ProstlabError(f"reorient: expected a 3D array, got shape {array.shape}")
    transform = _transform(affine, code)
    out = np.ascontiguousarray(apply_orientation(array, transform))
    return out, np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(transform, array.shape)


def reoriented_grid(
    shape: tuple[int, ...], affine: np.ndarray, target: str = PREPARED_ORIENTATION
) -> tuple[tuple[int, int, int], np.ndarray]:
    """The shape and affine that :func:`reorient` would return, without touching any data."""
    transform = _transform(affine, target.upper())
    order = transform[:, 0].astype(int)  # new axis order[a] holds old axis a
    new_shape = [0, 0, 0]
    for old_axis, new_axis in enumerate(order):
        new_shape[new_axis] = int(shape[old_axis])
    new_affine = np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(transform, tuple(shape[:3]))
    return (new_shape[0], new_shape[1], new_shape[2]), new_affine


def _transform(affine: np.ndarray, code: str) -> np.ndarray:
    return ornt_transform(io_orientation(affine), axcodes2ornt(tuple(code)))


def _axis_pair(letter: str) -> int:
    for index, pair in enumerate(("LR", "AP", "SI")):
        if letter in pair:
            return index
    return -1
