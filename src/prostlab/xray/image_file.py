"""Read a projection X-ray stored as a plain image: PNG, TIFF, NIfTI or ``.npy``.

These files carry no camera: :func:`prostlab.xray.load_xray` takes it from the caller. Their
values are read as detector intensity, linear and growing with the beam (``relationship
"lin"``, ``sign +1``) unless the caller says otherwise.

- **PNG, TIFF** (Pillow): one greyscale frame, 8 or 16 bit integers (modes ``L``, ``I;16``) or
  32-bit integers or floats (``I``, ``F``). Colour, palette and multi-page files are refused:
  an RGB rendering of an X-ray is a display, not a measurement.
- **NIfTI** (nibabel): a 2D image, or 3D with one slice ``(X, Y, 1)``, scaled by its
  ``scl_slope`` / ``scl_inter``. NIfTI's first axis is the column index ``x`` (as ITK, MONAI
  and prostlab's own DICOM reader lay arrays out), so the ``(H, W)`` image is the transpose.
  The header's voxel size is not read as the detector's pixel spacing: it may be of any plane.
- **.npy**: a 2D array ``(H, W)`` (or ``(H, W, 1)``), row-major as numpy and matplotlib show
  it; read without pickles.

The representable range of an integer file is its dtype's (``[0, 255]`` for 8 bit); a float
file has none, so it cannot be read as a linear image whose values fall with the intensity.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, UnidentifiedImageError

from prostlab.errors import ProstlabError
from prostlab.xray.raw import RawXRay

IMAGE_SUFFIXES = {
    ".png": "PNG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".nii": "NIfTI",
    ".nii.gz": "NIfTI",
    ".npy": "NumPy",
}
"""File name endings read as plain images, and the format each names."""

_GREYSCALE_MODES = ("L", "I;16", "I;16L", "I;16B", "I", "F")


def image_format(path: str | Path) -> str | None:
    """The format of :data:`IMAGE_SUFFIXES` that ``path``'s name ends with, or ``None``."""
    name = Path(path).name.lower()
    for suffix, kind in sorted(IMAGE_SUFFIXES.items(), key=lambda item: -len(item[0])):
        if name.endswith(suffix):
            return kind
    return None


def read_image_file(path: str | Path) -> RawXRay:
    """Read a PNG, TIFF, NIfTI or ``.npy`` X-ray (module doc).

    Returns:
        a :class:`~prostlab.xray.raw.RawXRay`: float64 ``(H, W)`` values, linear and growing
        with the intensity, the dtype's range for integer files, and no camera.

    Raises:
        ProstlabError: an unknown ending, an unreadable file, not one greyscale 2D image,
            a non-numeric dtype, or NaN or infinite values. The message names the file.
    """
    path = Path(path)
    kind = image_format(path)
    readers = {"PNG": _read_pillow, "TIFF": _read_pillow, "NIfTI": _read_nifti, "NumPy": _read_npy}
    if kind is None:
        raise ProstlabError(
            f"{path}: unknown image type; expected one of {', '.join(IMAGE_SUFFIXES)}"
        )
    array = readers[kind](path, kind)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise ProstlabError(
            f"{path}: {kind} array of shape {array.shape}; expected one greyscale 2D image "
            "(H, W) or (H, W, 1)"
        )
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise ProstlabError(f"{path}: {kind} of dtype {array.dtype}; expected integers or floats")
    if array.size == 0:
        raise ProstlabError(f"{path}: {kind} image is empty; expected at least one pixel")
    if not np.all(np.isfinite(array)):
        raise ProstlabError(f"{path}: {kind} image holds NaN or infinite values; expected finite")
    value_range = None
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        value_range = (float(info.min), float(info.max))
    height, width = array.shape
    return RawXRay(
        path=path,
        values=array.astype(np.float64),
        relationship="lin",
        sign=1,
        value_range=value_range,
        steps=(f"read {kind}, {height} x {width} pixels of {array.dtype}",),
    )


def _read_pillow(path: Path, kind: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            frames, mode = getattr(image, "n_frames", 1), image.mode
            array = np.array(image) if frames == 1 and mode in _GREYSCALE_MODES else None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ProstlabError(
            f"{path}: not a readable {kind} file ({type(error).__name__}: {error})"
        ) from error
    if frames != 1:
        raise ProstlabError(f"{path}: {kind} with {frames} pages; expected a single image")
    if array is None:
        raise ProstlabError(
            f"{path}: {kind} of mode {mode} (colour or palette); expected one greyscale channel "
            "(8 or 16 bit, or 32-bit integer or float)"
        )
    return array


def _read_nifti(path: Path, kind: str) -> np.ndarray:
    try:
        array = np.asanyarray(nib.load(path).dataobj)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as error:
        raise ProstlabError(
            f"{path}: not a readable {kind} file ({type(error).__name__}: {error})"
        ) from error
    while array.ndim > 2 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ProstlabError(
            f"{path}: {kind} of shape {array.shape}; expected a 2D image (X, Y) or (X, Y, 1)"
        )
    return np.ascontiguousarray(array.T)


def _read_npy(path: Path, kind: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise ProstlabError(
            f"{path}: not a readable {kind} file ({type(error).__name__}: {error}); expected "
            "an array saved by numpy.save"
        ) from error
