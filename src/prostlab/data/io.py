"""Read and write 3D images: NIfTI files and DICOM series, with their world affines.

Every reader returns ``(array, affine)``: a 3D array indexed ``[i, j, k]`` and the ``(4, 4)``
affine that maps ``(i, j, k, 1)`` to the voxel centre in world RAS millimetres (nibabel's
convention).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from prostlab.data.dicom import read_dicom_series
from prostlab.errors import ProstlabError
from prostlab.outputs import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def load_image(
    path: str | Path, dtype: type[np.generic] | np.dtype = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Load a NIfTI file (``.nii``/``.nii.gz``) or a DICOM series directory.

    Args:
        path: the file, or the directory holding one DICOM series.
        dtype: dtype of the returned array (``float32`` for images; an integer type for labels).
            NIfTI scaling (``scl_slope``/``scl_inter``) and DICOM rescaling are applied first.

    Returns:
        ``(array, affine)``: a 3D array ``(I, J, K)`` of ``dtype`` and the float64 ``(4, 4)``
        voxel-to-world RAS affine in mm. A 4D image whose last axis has length 1 is squeezed.

    Raises:
        ProstlabError: the path is missing or unreadable, the image is not 3D, or it holds NaN or
            infinite voxels. The message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise ProstlabError(
            f"{path}: no such file or directory; expected a .nii/.nii.gz file or a DICOM "
            "series directory"
        )
    if path.is_dir():
        array, affine = read_dicom_series(path)
    elif path.name.endswith(NIFTI_SUFFIXES):
        array, affine = _read_nifti(path)
    else:
        raise ProstlabError(
            f"{path}: unknown image format; expected a .nii/.nii.gz file or a DICOM series "
            "directory"
        )
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ProstlabError(
            f"{path}: image has shape {array.shape}; expected a 3D volume (or 4D with a last "
            "axis of length 1)"
        )
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise ProstlabError(f"{path}: {bad} voxels are NaN or infinite; expected finite values")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ProstlabError(f"{path}: the affine is singular or not finite: {affine.tolist()}")
    if np.issubdtype(np.dtype(dtype), np.integer):
        array = np.rint(array)
    return np.asarray(array, dtype=dtype), np.asarray(affine, dtype=np.float64)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = nib.load(str(path))
        array = image.get_fdata(dtype=np.float32)
    except Exception as exc:  # nibabel raises several types for corrupt or truncated files
        raise ProstlabError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc
    return array, np.asarray(image.affine, dtype=np.float64)


def save_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write a 3D array and its voxel-to-world RAS affine as NIfTI-1 (gzipped if ``.nii.gz``).

    The affine is stored as both sform and qform with code 1 (scanner coordinates), and the
    spatial unit as mm, so any NIfTI reader recovers the same world positions. The array's dtype
    is kept. The file is written under a temporary name and moved into place. Returns the path
    written.
    """
    path = Path(path)
    if array.ndim != 3:
        raise ProstlabError(f"{path}: cannot save shape {array.shape}; expected a 3D array")
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ProstlabError(f"{path}: expected a .nii or .nii.gz file name")
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(np.asarray(array), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units(xyz="mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return path
