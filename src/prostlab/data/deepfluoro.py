"""DeepFluoro (Grupp et al., IPCAI 2020): its HDF5 file read into prostlab's frames.

The data set is one HDF5 file, ``ipcai_2020_full_res_data.h5``: six cadaveric pelves, each with
a CT, its segmentation, 3D landmarks and fluoroscopy images with ground-truth poses. The layout
read here is the one documented by its authors (``hdf5_layouts/Readme.md`` of
rg2/DeepFluoroLabeling-IPCAI2020) and read by DiffPose (``diffpose/deepfluoro.py`` of
eigenvivek/DiffPose) and by xreg (rg2/xreg):

- ``proj-params/{intrinsic (3, 3), extrinsic (4, 4), num-rows, num-cols, pixel-row-spacing,
  pixel-col-spacing}``, shared by every image: a 1536 x 1536 detector of 0.194 mm pixels whose
  ``K`` has **negative** focal terms ``-sdd / 0.194`` (sdd about 1020 mm), because the file's
  camera frame has its z-axis pointing from the detector towards the source. ``extrinsic`` maps
  the C-arm's world frame to that camera frame.
- ``<specimen>/vol/{pixels, spacing, origin, dir-mat}``: the CT in HU, an ITK image: ``pixels``
  is stored slice, row, column (``[k, j, i]``), and voxel ``(i, j, k)`` sits at the LPS point
  ``origin + dir-mat diag(spacing) (i, j, k)``. ``vol-seg/image`` is the label map on that grid.
- ``<specimen>/vol-landmarks/<name>``: 3D landmarks, LPS mm.
- ``<specimen>/projections/<NNN>/image/pixels`` (rows, columns): raw detector intensities;
  ``gt-poses/cam-to-pelvis-vol`` (4, 4): the map from the C-arm's world frame to the CT's LPS
  frame; ``rot-180-for-up``: 1 when the stored image must be turned 180 degrees for the
  patient's head to be at the top; ``gt-landmarks/<name>``: 2D landmarks (column, row) in the
  stored image.

A CT point ``p`` (LPS, mm) lands on the stored image at ``(u, v, 1) ~ K E T^-1 p`` with ``E`` the
extrinsic and ``T`` the ground-truth pose (DiffPose projects its landmarks that way).

**Into prostlab's frames** (docs/geometry.md, docs/deepfluoro.md). prostlab's camera has x along
columns, y down the rows and z along the beam, from the source to the detector; its image is the
view from the source. The file's frame has z the other way, so its stored image is that view
mirrored. The reader turns the file's camera frame ``C`` into prostlab's ``P`` by the proper
rotation ``Q = diag(sx, sy, sz)``:

    sz = sign(K[0, 0])          (-1 for DeepFluoro: z flipped to point along the beam)
    sy = -1 if rot-180-for-up else 1
    sx = sz * sy                (so that det Q = 1)

and the stored image by the matching flips: columns reversed when ``sx = -1``
(``u' = W - 1 - u``), rows when ``sy = -1`` (``v' = H - 1 - v``), the principal point likewise.
For DeepFluoro that is a column flip, or a row flip when ``rot-180-for-up`` is set: either way
the patient's head is at the top and the image is the view from the source. Then

    X_P = Q E T^-1 L M X_vol = [R | t + sid e_z] X_vol

gives the prostlab pose ``(log R, t)`` of the prepared cube, where ``M`` maps prostlab's volume
frame of the cube to RAS (from ``meta.json``'s affine) and ``L = diag(-1, -1, 1)`` maps RAS to
LPS. :func:`pose_to_file` is the inverse.

**The ground truth's half-millimetre** (:data:`GT_CORRECTIONS`, the source option
``gt_correction``). xreg's sample registration app (rg2/xreg,
``apps/hip_surgery/sample_single_view_regi_2d_3d``) replaces every ``T`` by ``C T`` with ``C`` a
translation of -0.5 mm on each axis, "an inconsistency with linear interpolation texture indexing
between when the ground truth was constructed and now"; DiffPose (``diffpose/deepfluoro.py``) uses
``T`` as stored. ``"none"`` (the default) is DiffPose's, ``"xreg"`` xreg's: up to 0.87 mm apart
at every point of the CT.

**I0** (the source option ``i0``, :func:`detector_line_integrals`): ``null`` is prostlab's
estimate (the 99.5th percentile of the field, brighter pixels clipped to a line integral of 0), a
number a fixed ``I0``; ``"diffpose"`` reproduces DiffPose's ``preprocess`` (a 5 x 5 Gaussian of
sigma 1 pixel on the collimated field, then ``log 65487 - log I``), ``"xreg"`` xreg's
``ProjPreProc`` (``I0`` the maximum of the field smoothed by ITK's discrete Gaussian of variance 2
pixels^2, then ``-log(I / I0)`` of the unsmoothed image). Neither clips.

Label ids (the authors' README; id 7, the lower sacrum, from xreg's pelvis label map): 1 left
hemipelvis, 2 right hemipelvis, 3 vertebrae, 4 upper sacrum, 5 left femur, 6 right femur, 7
lower sacrum. :data:`STRUCTURES` files them so that the ``pelvis`` preset selects the hips and
the sacrum, 1, 2, 4, 7 (ProST's pelvis), and the ``pelvis_xreg`` preset adds the vertebrae, 1, 2,
3, 4, 7: the labels xreg's sample app renders as the pelvis (its look-up table maps exactly these
to 1). DiffPose renders the whole CT.
"""

from __future__ import annotations

import csv
import math
import numbers
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from scipy import ndimage
from scipy.special import ive

from prostlab.data.detector import fit_to_detector, line_integrals
from prostlab.data.io import save_nifti
from prostlab.data.labels import Structure, bone_ids
from prostlab.errors import ProstlabError
from prostlab.geometry import Camera, matrix_to_pose, pose_to_matrix
from prostlab.outputs import atomic_path

__all__ = [
    "COLLIMATOR_PX",
    "DIFFPOSE_I0",
    "GT_CORRECTIONS",
    "I0_MODES",
    "LPS_FROM_RAS",
    "SPECIMEN_IDS",
    "STRUCTURES",
    "Geometry",
    "Projection",
    "SpecimenCT",
    "XrayCase",
    "camera_signs",
    "check_fitted_camera",
    "corrected_ground_truth",
    "detector_camera",
    "detector_line_integrals",
    "export_specimen",
    "fitted_camera",
    "landmarks_in_volume",
    "orient_image",
    "pose_from_file",
    "pose_to_file",
    "projection_ids",
    "protocol",
    "read_geometry",
    "read_landmarks",
    "read_projection",
    "read_specimen",
    "source_options",
    "specimen_name",
    "volume_to_lps",
    "write_structures",
    "xray_case",
]

SPECIMEN_IDS = ("17-1882", "18-1109", "18-0725", "18-2799", "18-2800", "17-1905")
"""The specimen groups of the paper's specimens 1-6, in that order (the authors' README)."""

PROJ_PARAMS = "proj-params"

COLLIMATOR_PX = 50
"""Border of the full-resolution image shadowed by the collimator, pixels (the authors crop 50
pixels from each border before use)."""

GT_CORRECTIONS = {"none": 0.0, "xreg": -0.5}
"""Offset, mm, added to each of the three translation terms of every ground truth ``T``
(``cam-to-pelvis-vol``): ``"none"``, the file as stored (DiffPose); ``"xreg"``, xreg's -0.5 mm."""

DIFFPOSE_I0 = 65487.0
"""DiffPose's fixed ``I0`` (``initial_energy`` of its ``preprocess``)."""

I0_MODES = ("diffpose", "xreg")
"""The named ``i0`` settings (see :func:`detector_line_integrals`)."""

DIFFPOSE_BLUR = (5, 1.0)
"""DiffPose's Gaussian blur before the log: kernel size, sigma in pixels."""

XREG_I0_VARIANCE = 2.0
"""xreg's smoothing before it takes the maximum as ``I0``: variance, pixels^2 (ITK's
``DiscreteGaussianImageFilter``, maximum error 0.01)."""

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""``L``: RAS to LPS (and back: it is its own inverse)."""

STRUCTURES = (
    Structure("hip", "hip_left", 1),
    Structure("hip", "hip_right", 2),
    Structure("vertebrae", "vertebrae", 3),
    Structure("sacrum", "sacrum", 4),
    Structure("femur", "femur_left", 5),
    Structure("femur", "femur_right", 6),
    Structure("sacrum", "sacrum", 7),
)
"""DeepFluoro's label ids as a class table (:mod:`prostlab.data.labels`): ``bones: pelvis``
selects 1, 2, 4, 7 (ProST's pelvis); ``bones: pelvis_xreg`` 1, 2, 3, 4, 7 (xreg's)."""

DEEPFLUORO_NAMES = {1: "left-hemipelvis", 2: "right-hemipelvis", 3: "vertebrae",
                    4: "upper-sacrum", 5: "left-femur", 6: "right-femur", 7: "lower-sacrum"}


# ------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class Geometry:
    """``proj-params``: the detector shared by every projection of the file.

    Attributes:
        intrinsic: ``(3, 3)`` ``K`` of the stored images (negative focal terms in DeepFluoro).
        extrinsic: ``(4, 4)`` ``E``, the C-arm's world frame to the file's camera frame.
        rows, cols: detector size, pixels.
        pixel_spacing: ``(row spacing, column spacing)``, mm.
    """

    intrinsic: np.ndarray
    extrinsic: np.ndarray
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]


@dataclass(frozen=True)
class SpecimenCT:
    """A specimen's CT in the file's frame.

    Attributes:
        name: the specimen group, e.g. ``"17-1882"``.
        hu: ``(I, J, K)`` float32 HU, indexed (column, row, slice) as ITK.
        labels: ``(I, J, K)`` integer label map on the same grid.
        affine_lps: ``(4, 4)`` voxel index ``(i, j, k, 1)`` to LPS mm.
        landmarks: name -> ``(3,)`` LPS mm, names sorted.
    """

    name: str
    hu: np.ndarray
    labels: np.ndarray
    affine_lps: np.ndarray
    landmarks: dict[str, np.ndarray]


@dataclass(frozen=True)
class Projection:
    """One fluoroscopy image as stored.

    Attributes:
        specimen, index: its group, ``<specimen>/projections/<index>``.
        intensity: ``(rows, cols)`` float32 raw detector intensities.
        cam_to_pelvis_vol: ``(4, 4)`` ``T``, the C-arm's world frame to the CT's LPS frame.
        rot_180_for_up: the stored image must be turned 180 degrees for the head to be up.
        landmarks: name -> ``(2,)`` (column, row) in the stored image.
    """

    specimen: str
    index: str
    intensity: np.ndarray
    cam_to_pelvis_vol: np.ndarray
    rot_180_for_up: bool
    landmarks: dict[str, np.ndarray]


def _open(path: str | Path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise ProstlabError(
            f"{path}: no such file; expected the DeepFluoro HDF5 file (ipcai_2020_full_res_data.h5)"
        )
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ProstlabError(f"{path}: not a readable HDF5 file ({exc})") from exc


def _dataset(f: h5py.File, key: str, form: str) -> np.ndarray:
    """The dataset ``key`` of ``f``, read; a one-line error naming it when absent."""
    item = f.get(key)
    if not isinstance(item, h5py.Dataset):
        raise ProstlabError(f"{f.filename}: no dataset {key!r}; expected {form} "
                            "(the DeepFluoro layout, docs/deepfluoro.md)")
    return item[()]


def _matrix(f: h5py.File, key: str, shape: tuple[int, int], form: str) -> np.ndarray:
    value = np.asarray(_dataset(f, key, form), dtype=np.float64)
    if value.shape != shape or not np.all(np.isfinite(value)):
        raise ProstlabError(f"{f.filename}: {key!r} has shape {value.shape}; expected {form}, "
                            "finite")
    return value


def _scalar(f: h5py.File, key: str, form: str) -> float:
    value = np.asarray(_dataset(f, key, form), dtype=np.float64).reshape(-1)
    if value.size != 1 or not math.isfinite(value[0]) or value[0] <= 0:
        raise ProstlabError(f"{f.filename}: {key!r} is {value.tolist()}; expected {form}")
    return float(value[0])


def _group(f: h5py.File, key: str, form: str) -> h5py.Group:
    item = f.get(key)
    if not isinstance(item, h5py.Group):
        raise ProstlabError(f"{f.filename}: no group {key!r}; expected {form} "
                            "(the DeepFluoro layout, docs/deepfluoro.md)")
    return item


def specimen_name(path: str | Path, specimen: int | str) -> str:
    """The group of ``specimen``: a paper number 1-6 (:data:`SPECIMEN_IDS`) or a group name.

    Raises ``ProstlabError`` naming the specimens the file holds when it has no such group.
    """
    if isinstance(specimen, numbers.Integral) and not isinstance(specimen, bool):
        if not 1 <= int(specimen) <= len(SPECIMEN_IDS):
            raise ProstlabError(f"specimen: {specimen}; expected 1-6 (the paper's numbering) or "
                                f"a specimen group such as {SPECIMEN_IDS[0]!r}")
        name = SPECIMEN_IDS[int(specimen) - 1]
    elif isinstance(specimen, str) and specimen:
        name = specimen
    else:
        raise ProstlabError(f"specimen: {specimen!r}; expected 1-6 or a specimen group name")
    with _open(path) as f:
        if not isinstance(f.get(name), h5py.Group):
            found = sorted(k for k in f if k != PROJ_PARAMS and isinstance(f[k], h5py.Group))
            raise ProstlabError(f"{path}: no specimen group {name!r} (specimen {specimen}); "
                                f"found {', '.join(found) or 'none'}")
    return name


def read_geometry(path: str | Path) -> Geometry:
    """Read ``proj-params`` (see the module docstring)."""
    with _open(path) as f:
        k = _matrix(f, f"{PROJ_PARAMS}/intrinsic", (3, 3), "a 3x3 intrinsic matrix")
        e = _matrix(f, f"{PROJ_PARAMS}/extrinsic", (4, 4), "a 4x4 rigid matrix")
        counts = [_scalar(f, f"{PROJ_PARAMS}/{key}", "a positive pixel count")
                  for key in ("num-rows", "num-cols")]
        spacing = [_scalar(f, f"{PROJ_PARAMS}/{key}", "a positive spacing in mm")
                   for key in ("pixel-row-spacing", "pixel-col-spacing")]
    _check_rigid(e, f"{path}: {PROJ_PARAMS}/extrinsic")
    return Geometry(k, e, int(counts[0]), int(counts[1]), (spacing[0], spacing[1]))


def _image(f: h5py.File, group: str, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """An ITK image group: ``(pixels indexed (i, j, k) or (i, j), index -> LPS affine)``."""
    pixels = np.asarray(_dataset(f, f"{group}/pixels", "the image's pixels"))
    if pixels.ndim != ndim:
        raise ProstlabError(f"{f.filename}: {group}/pixels has shape {pixels.shape}; expected "
                            f"{ndim} dimensions")
    spacing = np.asarray(_dataset(f, f"{group}/spacing", f"{ndim} spacings in mm"),
                         dtype=np.float64).reshape(-1)
    origin = np.asarray(_dataset(f, f"{group}/origin", f"{ndim} coordinates in mm"),
                        dtype=np.float64).reshape(-1)
    direction = np.asarray(_dataset(f, f"{group}/dir-mat", f"a {ndim}x{ndim} matrix"),
                           dtype=np.float64)
    if (spacing.shape != (ndim,) or origin.shape != (ndim,) or direction.shape != (ndim, ndim)
            or not np.all(spacing > 0) or not np.all(np.isfinite(origin))
            or not np.allclose(direction @ direction.T, np.eye(ndim), atol=1e-5)):
        raise ProstlabError(f"{f.filename}: {group}: spacing {spacing.tolist()}, origin "
                            f"{origin.tolist()}, dir-mat {direction.tolist()}; expected {ndim} "
                            "positive spacings, a finite origin and an orthonormal dir-mat")
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = direction * spacing
    affine[:ndim, ndim] = origin
    return np.ascontiguousarray(pixels.transpose(tuple(range(ndim))[::-1])), affine


def read_specimen(path: str | Path, specimen: int | str) -> SpecimenCT:
    """Read a specimen's CT (HU), label map and 3D landmarks (see the module docstring)."""
    name = specimen_name(path, specimen)
    with _open(path) as f:
        hu, affine = _image(f, f"{name}/vol", 3)
        labels, labels_affine = _image(f, f"{name}/vol-seg/image", 3)
        if labels.shape != hu.shape or not np.allclose(labels_affine, affine, atol=1e-3):
            raise ProstlabError(f"{path}: {name}/vol-seg/image has shape {labels.shape}; "
                                f"expected the grid of {name}/vol, {hu.shape}")
        landmarks = _landmarks(f, name)
    return SpecimenCT(name, hu.astype(np.float32), labels.astype(np.int32), affine, landmarks)


def read_landmarks(path: str | Path, specimen: int | str) -> dict[str, np.ndarray]:
    """A specimen's 3D landmarks, name -> ``(3,)`` LPS mm, names sorted (no CT is read)."""
    name = specimen_name(path, specimen)
    with _open(path) as f:
        return _landmarks(f, name)


def _landmarks(f: h5py.File, name: str) -> dict[str, np.ndarray]:
    group = _group(f, f"{name}/vol-landmarks", "a group of 3D landmarks")
    landmarks = {key: np.asarray(group[key][()], dtype=np.float64).reshape(-1)
                 for key in sorted(group)}
    bad = [key for key, p in landmarks.items() if p.shape != (3,) or not np.all(np.isfinite(p))]
    if bad:
        raise ProstlabError(f"{f.filename}: {name}/vol-landmarks/{bad[0]} is not a finite 3D "
                            "point")
    return landmarks


def projection_ids(path: str | Path, specimen: str) -> list[str]:
    """The projection indices of a specimen group, sorted (``"000"``, ``"001"``, ...)."""
    with _open(path) as f:
        group = _group(f, f"{specimen}/projections", "a group of projections")
        ids = sorted(group)
    if not ids:
        raise ProstlabError(f"{path}: {specimen}/projections is empty; expected fluoroscopy "
                            "images")
    return ids


def read_projection(path: str | Path, specimen: str, index: str) -> Projection:
    """Read one projection: its image, ground-truth pose, flag and 2D landmarks."""
    key = f"{specimen}/projections/{index}"
    with _open(path) as f:
        intensity = np.asarray(_dataset(f, f"{key}/image/pixels", "a 2D image"), np.float32)
        pose = _matrix(f, f"{key}/gt-poses/cam-to-pelvis-vol", (4, 4), "a 4x4 rigid matrix")
        flag = np.asarray(_dataset(f, f"{key}/rot-180-for-up", "0 or 1")).reshape(-1)
        landmarks = {}
        if isinstance(f.get(f"{key}/gt-landmarks"), h5py.Group):
            group = f[f"{key}/gt-landmarks"]
            landmarks = {k: np.asarray(group[k][()], dtype=np.float64).reshape(-1)
                         for k in sorted(group)}
    if intensity.ndim != 2:
        raise ProstlabError(f"{path}: {key}/image/pixels has shape {intensity.shape}; expected "
                            "(rows, columns)")
    if flag.size != 1 or int(flag[0]) not in (0, 1):
        raise ProstlabError(f"{path}: {key}/rot-180-for-up is {flag.tolist()}; expected 0 or 1")
    _check_rigid(pose, f"{path}: {key}/gt-poses/cam-to-pelvis-vol")
    return Projection(specimen, index, intensity, pose, bool(flag[0]), landmarks)


def _check_rigid(matrix: np.ndarray, what: str) -> None:
    rotation = matrix[:3, :3]
    if (not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-4)
            or np.linalg.det(rotation) <= 0 or not np.allclose(matrix[3], [0, 0, 0, 1])):
        raise ProstlabError(f"{what}: not a rigid transform; expected [[R, t], [0, 1]] with R "
                            "a rotation")


# ---------------------------------------------------------------------------- frames
def camera_signs(intrinsic: np.ndarray, rot_180_for_up: bool) -> np.ndarray:
    """``(sx, sy, sz)``, the diagonal of ``Q``, the file's camera frame to prostlab's.

    ``sz = sign(K[0, 0])``, ``sy = -1`` when ``rot_180_for_up``, ``sx = sz sy``. A ``K`` whose
    two focal terms differ in sign images a mirror world, which no rigid pose can match.
    """
    fx, fy = float(intrinsic[0, 0]), float(intrinsic[1, 1])
    if fx * fy <= 0:
        raise ProstlabError(f"intrinsic: focal terms K[0, 0] = {fx}, K[1, 1] = {fy}; expected "
                            "two non-zero terms of one sign")
    sz = math.copysign(1.0, fx)
    sy = -1.0 if rot_180_for_up else 1.0
    return np.array([sz * sy, sy, sz])


def orient_image(image: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """The stored image in prostlab's orientation: columns reversed where ``sx = -1``, rows
    where ``sy = -1``. Its own inverse."""
    return np.ascontiguousarray(image[:: int(signs[1]), :: int(signs[0])])


def detector_camera(geometry: Geometry, signs: np.ndarray, sid: float) -> Camera:
    """The full-resolution detector as a prostlab :class:`Camera` in the frame ``Q C``.

    ``sdd = |K[0, 0]| du`` (it must equal ``|K[1, 1]| dv``), pixel spacing ``(dv, du)`` from
    ``proj-params``, principal point ``cx' = cx`` or ``W - 1 - cx`` where the columns are
    reversed, ``cy'`` likewise. ``sid`` is prostlab's isocentre distance (the model's), not in
    the file.
    """
    k = geometry.intrinsic
    cx, cy = float(k[0, 2]), float(k[1, 2])
    if signs[0] < 0:
        cx = geometry.cols - 1 - cx
    if signs[1] < 0:
        cy = geometry.rows - 1 - cy
    matrix = [[abs(k[0, 0]), 0.0, cx], [0.0, abs(k[1, 1]), cy], [0.0, 0.0, 1.0]]
    return Camera.from_intrinsics(matrix, geometry.rows, geometry.cols, sid,
                                  pixel_spacing=geometry.pixel_spacing)


def volume_to_lps(affine_ras: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``L M``: prostlab's volume frame (centred, mm) of a grid to LPS mm.

    With ``A`` the grid's index-to-RAS affine (``meta.json``'s ``affine`` for a prepared cube)
    and spacing ``s_a = |A[:3, a]|``, the index of ``x`` is ``x_a / s_a + (n_a - 1) / 2``.
    """
    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    spacing = np.linalg.norm(affine_ras[:3, :3], axis=0)
    index = np.eye(4)
    index[:3, :3] = np.diag(1.0 / spacing)
    index[:3, 3] = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    return LPS_FROM_RAS @ affine_ras @ index


def _nearest_rotation(matrix: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(matrix)
    return u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt


def pose_from_file(cam_to_pelvis_vol: np.ndarray, extrinsic: np.ndarray, signs: np.ndarray,
                   vol_to_lps: np.ndarray, sid: float) -> torch.Tensor:
    """The prostlab pose ``(6,)`` float64 (rad, mm) of a file's ground truth.

    ``[R | t + sid e_z] = Q E T^-1 (L M)``; ``R`` is projected onto the nearest rotation (the
    file stores float matrices).
    """
    camera_from_volume = (np.diag([*signs, 1.0]) @ extrinsic @ np.linalg.inv(cam_to_pelvis_vol)
                          @ vol_to_lps)
    camera_from_volume[:3, :3] = _nearest_rotation(camera_from_volume[:3, :3])
    camera_from_volume[2, 3] -= sid
    return matrix_to_pose(torch.from_numpy(camera_from_volume)[None])[0]


def pose_to_file(pose: torch.Tensor, extrinsic: np.ndarray, signs: np.ndarray,
                 vol_to_lps: np.ndarray, sid: float) -> np.ndarray:
    """The file's ``cam-to-pelvis-vol`` ``T`` of a prostlab pose ``(6,)``; inverse of
    :func:`pose_from_file`: ``T = (E^-1 Q [R | t + sid e_z] (L M)^-1)^-1``."""
    camera_from_volume = pose_to_matrix(torch.as_tensor(pose, dtype=torch.float64)[None])[0]
    camera_from_volume = camera_from_volume.numpy().copy()
    camera_from_volume[2, 3] += sid
    world_from_lps = (np.linalg.inv(extrinsic) @ np.diag([*signs, 1.0]) @ camera_from_volume
                      @ np.linalg.inv(vol_to_lps))
    return np.linalg.inv(world_from_lps)


def landmarks_in_volume(landmarks_lps: np.ndarray, vol_to_lps: np.ndarray) -> np.ndarray:
    """``(L, 3)`` LPS points in prostlab's volume frame, ``(L M)^-1 p``."""
    points = np.asarray(landmarks_lps, dtype=np.float64).reshape(-1, 3)
    homogeneous = np.concatenate((points, np.ones((len(points), 1))), axis=1)
    return (homogeneous @ np.linalg.inv(vol_to_lps).T)[:, :3]


def corrected_ground_truth(cam_to_pelvis_vol: np.ndarray, correction: str = "none") -> np.ndarray:
    """A file's ground truth ``T`` with :data:`GT_CORRECTIONS` ``[correction]`` added to each of its
    translation terms: ``"none"`` returns a copy of ``T``, ``"xreg"`` xreg's ``C T`` with ``C`` the
    translation by (-0.5, -0.5, -0.5) mm."""
    if correction not in GT_CORRECTIONS:
        raise ProstlabError(f"gt_correction: {correction!r}; expected one of "
                            f"{', '.join(map(repr, GT_CORRECTIONS))}")
    matrix = np.array(cam_to_pelvis_vol, dtype=np.float64)
    matrix[:3, 3] += GT_CORRECTIONS[correction]
    return matrix


# ---------------------------------------------------------------------------- X-ray cases
def _gaussian_taps(size: int, sigma: float) -> np.ndarray:
    """The normalised samples of ``exp(-x^2 / (2 sigma^2))`` at ``x = -(size - 1) / 2 ...``
    (the kernel of torchvision's ``gaussian_blur``, which DiffPose calls)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def _discrete_gaussian_taps(variance: float, max_error: float = 0.01) -> np.ndarray:
    """Lindeberg's discrete Gaussian ``e^-t I_n(t)``, ``t = variance``, from ``n = 0`` until the
    taps hold ``1 - max_error`` of the mass, normalised (ITK's ``GaussianOperator``, which xreg's
    ``DiscreteGaussianImageFilter`` uses)."""
    half = [float(ive(0, variance))]
    total = half[0]
    while total < 1.0 - max_error:
        half.append(float(ive(len(half), variance)))
        total += 2.0 * half[-1]
    taps = np.array(half[:0:-1] + half)
    return taps / taps.sum()


def _smoothed(image: np.ndarray, taps: np.ndarray, mode: str) -> np.ndarray:
    out = ndimage.correlate1d(image, taps, axis=0, mode=mode)
    return ndimage.correlate1d(out, taps, axis=1, mode=mode)


def detector_line_integrals(intensity: np.ndarray, valid: np.ndarray,
                            i0: float | str | None = None) -> tuple[np.ndarray, float]:
    """Line integrals of the oriented full-resolution image over its collimated field ``valid``
    (a centred rectangle), and the ``I0`` used.

    - ``None``: prostlab's estimate, :func:`prostlab.data.detector.line_integrals` (``I0`` the
      99.5th percentile of the field; ``max(0, -log(I / I0))``, the brighter pixels clipped to 0).
    - a number: that ``I0``, same transform.
    - ``"diffpose"``: DiffPose's ``preprocess`` (``diffpose/deepfluoro.py``): the field, cropped as
      its ``center_crop``, blurred by a 5 x 5 Gaussian of sigma 1 pixel (torchvision's
      ``gaussian_blur``: sampled taps, reflected border), then ``log 65487 - log I``; 65487 is the
      largest intensity of the data set. Its final rescale to [0, 1] is not applied (a similarity
      invariant to gain and offset, such as NCC, does not see it).
    - ``"xreg"``: xreg's ``ProjPreProc`` (``lib/image/xregProjPreProc.cpp``,
      ``xregImageIntensLogTrans.cpp``): ``I0`` the maximum of the field smoothed by ITK's discrete
      Gaussian of variance 2 pixels^2 (border replicated), then ``-log(I / I0)`` of the unsmoothed
      field; pixels brighter than ``I0`` give negative values, kept.

    In both named settings an intensity ``<= 1e-6`` takes the largest finite line integral of
    the field (xreg's rule), and the pixels outside the field are 0 (they are masked).
    """
    if i0 is None or not isinstance(i0, str):
        return line_integrals(intensity, i0=i0, valid=valid)
    if i0 not in I0_MODES:
        raise ProstlabError(f"i0: {i0!r}; expected a positive intensity, null or one of "
                            f"{', '.join(map(repr, I0_MODES))}")
    rows, cols = np.nonzero(valid)
    if rows.size == 0:
        raise ProstlabError("i0: the collimated field is empty; expected collimator_px smaller "
                            "than half the image")
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    field = np.asarray(intensity, dtype=np.float64)[box]
    if i0 == "diffpose":
        field = _smoothed(field, _gaussian_taps(*DIFFPOSE_BLUR), "mirror")
        level = DIFFPOSE_I0
    else:
        level = float(_smoothed(field, _discrete_gaussian_taps(XREG_I0_VARIANCE), "nearest").max())
    positive = field > 1e-6
    if not positive.any() or not level > 0:
        raise ProstlabError(f"i0: {i0!r} found no positive intensity in the collimated field")
    lines = np.zeros(np.shape(intensity), dtype=np.float64)
    lines[box] = np.where(positive, -np.log(np.where(positive, field, 1.0) / level),
                          -np.log(field[positive].min() / level))
    return lines.astype(np.float32), level



@dataclass(frozen=True)
class XrayCase:
    """A projection ready for registration on a prostlab detector.

    Attributes:
        target: ``(h, w)`` float32 line integrals ``-log(I / I0)``.
        mask: ``(h, w)`` bool, the pixels outside the collimator's shadow.
        camera: the fitted detector (binned and cropped), in prostlab's frame.
        gt_pose: ``(6,)`` float64 prostlab pose of the prepared cube (rad, mm).
        i0: the unattenuated intensity used.
    """

    target: np.ndarray
    mask: np.ndarray
    camera: Camera
    gt_pose: torch.Tensor
    i0: float


def xray_case(projection: Projection, geometry: Geometry, vol_to_lps: np.ndarray,
              shape: tuple[int, int], sid: float, i0: float | str | None = None,
              collimator_px: int = COLLIMATOR_PX, gt_correction: str = "none") -> XrayCase:
    """Orient, log-transform and fit a projection to a ``shape = (h, w)`` detector.

    Steps: the stored image is flipped into prostlab's orientation (:func:`orient_image`); the
    pixels within ``collimator_px`` of its border are masked; intensities become line integrals
    as ``i0`` says (:func:`detector_line_integrals`); the image and mask are binned and
    centre-cropped to ``shape`` with the camera updated
    (:func:`prostlab.data.detector.fit_to_detector`); the pose is :func:`pose_from_file` of the
    ground truth corrected as ``gt_correction`` says (:func:`corrected_ground_truth`).
    """
    if projection.intensity.shape != (geometry.rows, geometry.cols):
        raise ProstlabError(
            f"{projection.specimen}/projections/{projection.index}/image/pixels: shape "
            f"{projection.intensity.shape}; expected proj-params' ({geometry.rows}, "
            f"{geometry.cols})")
    signs = camera_signs(geometry.intrinsic, projection.rot_180_for_up)
    camera = detector_camera(geometry, signs, sid)
    intensity = orient_image(projection.intensity, signs)
    valid = np.zeros(intensity.shape, dtype=bool)
    valid[collimator_px:intensity.shape[0] - collimator_px,
          collimator_px:intensity.shape[1] - collimator_px] = True
    lines, used_i0 = detector_line_integrals(intensity, valid, i0)
    image, mask, fitted = fit_to_detector(lines, valid, camera, tuple(shape))
    truth = corrected_ground_truth(projection.cam_to_pelvis_vol, gt_correction)
    pose = pose_from_file(truth, geometry.extrinsic, signs, vol_to_lps, sid)
    return XrayCase(np.asarray(image, dtype=np.float32), np.asarray(mask, dtype=bool), fitted,
                    pose, float(used_i0))


def fitted_camera(full: Camera, model: Camera) -> Camera:
    """The camera :func:`xray_case` gives a ``full``-resolution detector fitted to ``model``'s
    ``(height, width)`` (no image is read)."""
    blank = np.zeros((full.height, full.width), dtype=np.float32)
    return fit_to_detector(blank, blank > 0, full, (model.height, model.width))[2]


def check_fitted_camera(model: Camera, fitted: Camera, rtol: float = 1e-4) -> None:
    """Raise ``ProstlabError`` naming both cameras unless ``model`` images the detector the real
    X-rays were fitted to: the same size, ``sdd`` and pixel spacing (relative ``rtol``) and
    principal point (``rtol`` of a pixel)."""
    same = (
        (model.height, model.width) == (fitted.height, fitted.width)
        and math.isclose(model.sdd, fitted.sdd, rel_tol=rtol)
        and all(math.isclose(a, b, rel_tol=rtol)
                for a, b in zip(model.pixel_spacing, fitted.pixel_spacing, strict=True))
        and abs(model.cx - fitted.cx) <= rtol and abs(model.cy - fitted.cy) <= rtol
    )
    if not same:
        raise ProstlabError(
            f"model.camera: {model.to_dict()} does not match the real X-rays' detector after "
            f"binning, {fitted.to_dict()}; expected the same sdd, pixel_spacing and "
            "principal_point (docs/deepfluoro.md)"
        )


# ---------------------------------------------------------------------------- export
def write_structures(path: str | Path) -> Path:
    """Write :data:`STRUCTURES` as a class table CSV (``group,structure,id,deepfluoro``)."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("group", "structure", "id", "deepfluoro"))
        for s in STRUCTURES:
            writer.writerow((s.group, s.structure, s.id, DEEPFLUORO_NAMES[s.id]))
    return path


def export_specimen(path: str | Path, specimen: int | str, folder: str | Path) -> dict[str, Any]:
    """Write a specimen's CT and labels as NIfTI (RAS affine ``L A_lps``) with the class table.

    Returns ``{"ct": Path, "labels": Path, "structures": Path, "specimen": SpecimenCT}``: the
    files :func:`prostlab.data.prepare_ct` prepares like any raw CT.
    """
    ct = read_specimen(path, specimen)
    folder = Path(folder)
    affine_ras = LPS_FROM_RAS @ ct.affine_lps
    return {
        "ct": save_nifti(folder / "ct.nii", ct.hu, affine_ras),
        "labels": save_nifti(folder / "labels.nii", ct.labels.astype(np.int16), affine_ras),
        "structures": write_structures(folder / "structures.csv"),
        "specimen": ct,
    }


def source_options(source: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check a ``{deepfluoro: FILE, specimen: N, i0: null, collimator_px: 50, gt_correction:
    none}`` entry (docs/deepfluoro.md)."""
    allowed = {"deepfluoro", "specimen", "i0", "collimator_px", "gt_correction"}
    unknown = sorted(set(source) - allowed)
    if unknown or "specimen" not in source:
        raise ProstlabError(f"{where}: keys {sorted(source)}; expected {{deepfluoro: FILE, "
                            "specimen: 1-6 or a group name}, optionally i0, collimator_px, "
                            "gt_correction")
    i0 = source.get("i0")
    if isinstance(i0, str):
        if i0 not in I0_MODES:
            raise ProstlabError(f"{where}.i0: {i0!r}; expected a positive intensity, null "
                                f"(estimated from the image) or one of {', '.join(I0_MODES)}")
    elif i0 is not None and (isinstance(i0, bool) or not isinstance(i0, numbers.Real)
                             or not (math.isfinite(i0) and i0 > 0)):
        raise ProstlabError(f"{where}.i0: {i0!r}; expected a positive intensity, null "
                            f"(estimated from the image) or one of {', '.join(I0_MODES)}")
    border = source.get("collimator_px", COLLIMATOR_PX)
    if isinstance(border, bool) or not isinstance(border, numbers.Integral) or border < 0:
        raise ProstlabError(f"{where}.collimator_px: {border!r}; expected a whole number of "
                            "pixels >= 0")
    correction = source.get("gt_correction", "none")
    if correction not in GT_CORRECTIONS:
        raise ProstlabError(f"{where}.gt_correction: {correction!r}; expected one of "
                            f"{', '.join(GT_CORRECTIONS)} (none: the file's ground truth as "
                            "stored, as DiffPose; xreg: -0.5 mm on each translation, as xreg)")
    return {"deepfluoro": Path(source["deepfluoro"]), "specimen": source["specimen"],
            "i0": i0 if i0 is None or isinstance(i0, str) else float(i0),
            "collimator_px": int(border), "gt_correction": correction}


def protocol(source: Mapping[str, Any], bones: Any) -> str:
    """One line stating the choices a DeepFluoro score depends on, for the results: specimen,
    rendered bones, ground truth, ``I0`` and the masked border. ``source`` is a checked entry
    (:func:`source_options`)."""
    try:
        with tempfile.TemporaryDirectory() as folder:
            ids = bone_ids(bones, write_structures(Path(folder) / "structures.csv"))
        named = {(1, 2, 4, 7): " (prostlab's pelvis preset, ProST's)",
                 (1, 2, 3, 4, 7): " (xreg's pelvis)"}.get(tuple(ids), "")
        rendered = f"labels {', '.join(map(str, ids))}{named}"
    except ProstlabError:
        rendered = f"{bones!r}"
    i0 = source.get("i0")
    level = {None: "the 99.5th percentile of the field (prostlab's)",
             "diffpose": "65487 after a 5x5 Gaussian (DiffPose's)",
             "xreg": "the maximum of the smoothed field (xreg's)"}.get(i0, f"{i0} (given)")
    correction = source.get("gt_correction", "none")
    truth = {"none": "as stored (DiffPose's)",
             "xreg": "-0.5 mm on each translation (xreg's)"}[correction]
    return (f"specimen {source['specimen']}; bones (the segmented CT): {rendered}; "
            f"ground truth {truth}; I0 {level}; border {source.get('collimator_px', COLLIMATOR_PX)}"
            " px masked")

