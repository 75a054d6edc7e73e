"""Read a DICOM series (one directory, one slice per file) into an array and a RAS affine.

Geometry (DICOM PS3.3 C.7.6.2). For slice ``k`` at ImagePositionPatient ``P_k``, with
ImageOrientationPatient ``(F_r, F_c)`` (``F_r``: direction of increasing column index, i.e. along a
row; ``F_c``: direction of increasing row index) and PixelSpacing ``(dr, dc)`` (row spacing, column
spacing), the pixel at column ``i`` and row ``j`` sits at the patient (LPS) position

    X = P_k + i * dc * F_r + j * dr * F_c.

Slices are sorted by ``P_k . n`` with the slice normal ``n = F_r x F_c``; the array is indexed
``[i, j, k]`` (column, row, slice), so the LPS affine's columns are ``dc F_r``, ``dr F_c``, the
slice step ``(P_last - P_first) / (K - 1)`` and the origin ``P_first``. DICOM's patient frame is
LPS and nibabel's world frame RAS, so ``A_ras = diag(-1, -1, 1, 1) @ A_lps``.

Stored values become ``RescaleSlope * stored + RescaleIntercept`` (Hounsfield units for CT), slice
by slice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from prostlab.errors import ProstlabError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Tolerances in mm (positions) and in direction cosines.
_POSITION_ATOL_MM = 1e-2
_COSINE_ATOL = 1e-4


def read_dicom_series(directory: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read every DICOM image file in ``directory`` as one volume.

    Files that are not DICOM, or carry no pixel data, are skipped. All images must belong to one
    series, share orientation, size and pixel spacing, and be evenly spaced along the normal (no
    gantry tilt, no gaps, no duplicates).

    Returns:
        ``(array, affine)``: float32 array ``(columns, rows, slices)`` of rescaled values and the
        ``(4, 4)`` voxel-to-world RAS affine in mm.
    """
    directory = Path(directory)
    slices = _read_slices(directory)

    first = slices[0][1]
    iop = _floats(first, "ImageOrientationPatient", 6, slices[0][0])
    f_r, f_c = iop[:3], iop[3:]
    normal = np.cross(f_r, f_c)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3 or abs(f_r @ f_c) > 1e-3:
        raise ProstlabError(
            f"{slices[0][0]}: ImageOrientationPatient {iop.tolist()} is not two orthonormal "
            "direction cosines"
        )
    rows, cols = int(first.Rows), int(first.Columns)
    spacing = _floats(first, "PixelSpacing", 2, slices[0][0])

    positions = []
    for path, ds in slices:
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, path), iop, atol=_COSINE_ATOL):
            raise ProstlabError(
                f"{path}: ImageOrientationPatient differs from {slices[0][0].name}'s; "
                "expected one orientation for the whole series"
            )
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise ProstlabError(
                f"{path}: image is {ds.Rows}x{ds.Columns}, expected {rows}x{cols} like "
                f"{slices[0][0].name}"
            )
        if not np.allclose(_floats(ds, "PixelSpacing", 2, path), spacing, atol=1e-4):
            raise ProstlabError(f"{path}: PixelSpacing differs from {slices[0][0].name}'s")
        positions.append(_floats(ds, "ImagePositionPatient", 3, path))

    positions_arr = np.stack(positions)
    order = np.argsort(positions_arr @ normal, kind="stable")
    slices = [slices[k] for k in order]
    positions_arr = positions_arr[order]

    step = _slice_step(directory, positions_arr, normal, first)

    array = np.empty((cols, rows, len(slices)), dtype=np.float32)
    for k, (path, ds) in enumerate(slices):
        try:
            pixels = ds.pixel_array.astype(np.float64)
        except Exception as exc:  # pydicom raises several types for missing decoders
            raise ProstlabError(f"{path}: cannot decode the pixel data ({exc})") from exc
        if pixels.shape != (rows, cols):
            raise ProstlabError(
                f"{path}: pixel data has shape {pixels.shape}, expected ({rows}, {cols}); "
                "multi-frame DICOM is not supported"
            )
        slope = float(ds.get("RescaleSlope", 1.0))
        intercept = float(ds.get("RescaleIntercept", 0.0))
        array[:, :, k] = (pixels * slope + intercept).T

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = f_r * spacing[1]
    affine_lps[:3, 1] = f_c * spacing[0]
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions_arr[0]
    return array, LPS_TO_RAS @ affine_lps


def _read_slices(directory: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """The ``(path, dataset)`` of every DICOM image in ``directory``, one series only."""
    if not directory.is_dir():
        raise ProstlabError(f"{directory}: not a directory; expected a DICOM series directory")
    slices = []
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, EOFError):
            continue
        if "PixelData" in ds:
            slices.append((path, ds))
    if not slices:
        raise ProstlabError(f"{directory}: no DICOM image files found; expected one slice per file")
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in slices})
    if len(series) > 1:
        raise ProstlabError(
            f"{directory}: holds {len(series)} series ({', '.join(series)}); "
            "expected exactly one series per directory"
        )
    return slices


def _slice_step(
    directory: Path, positions: np.ndarray, normal: np.ndarray, first: pydicom.Dataset
) -> np.ndarray:
    """The vector from one slice origin to the next, checked to be even and along the normal."""
    if len(positions) == 1:
        thickness = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)))
        return normal * thickness
    gaps = np.diff(positions @ normal)
    if np.any(gaps < _POSITION_ATOL_MM):
        raise ProstlabError(
            f"{directory}: two slices share the position {positions[np.argmin(gaps)].tolist()}; "
            "expected one slice per position"
        )
    if np.ptp(gaps) > _POSITION_ATOL_MM:
        raise ProstlabError(
            f"{directory}: slice gaps vary from {gaps.min():.3f} to {gaps.max():.3f} mm; "
            "expected evenly spaced slices"
        )
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    off_normal = step - (step @ normal) * normal
    if np.linalg.norm(off_normal) > _POSITION_ATOL_MM:
        raise ProstlabError(
            f"{directory}: slices are offset by {np.linalg.norm(off_normal):.3f} mm per slice "
            "across the normal (gantry tilt); expected slices stacked along their normal"
        )
    return step


def _floats(ds: pydicom.Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    """A numeric multi-valued DICOM attribute as a float64 array of length ``n``."""
    value = ds.get(keyword)
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except TypeError:
        out = np.array([], dtype=np.float64)
    if out.shape != (n,):
        raise ProstlabError(f"{path}: {keyword} is {value!r}; expected {n} numbers")
    return out
