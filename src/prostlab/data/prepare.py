"""Turn a CT (and its label map) into prostlab's prepared volumes, and load them back.

``prepare_ct`` runs, in this order:

1. read the CT (HU) and the labels (NIfTI or DICOM series); check they share one voxel grid;
2. reorient both to LIP (``docs/geometry.md``), so the identity pose is an AP view;
3. replace outside-the-field-of-view values by air and map HU to attenuation
   ``mu = mu_water (1 + HU / 1000)``, clamped at 0 (:mod:`prostlab.data.intensity`);
4. segment the bones at the source resolution, ``mu_bone = mu * mask``: ``mask = [label in ids]``
   with a label map, else the CT's own bones by a HU threshold cleaned of the table, contrast and
   specks (:mod:`prostlab.data.bone_threshold`);
5. choose a cube (centred on the bones' bounding box, or on the volume) and resample ``mu`` and
   ``mu_bone`` (linear, antialiased) and the labels (nearest) onto its ``size^3`` grid in one step
   (:mod:`prostlab.data.resample`);
6. write ``ct_mu.nii.gz``, ``bone_mu.nii.gz``, ``labels.nii.gz`` and ``meta.json``, each under a
   temporary name moved into place (:mod:`prostlab.outputs`).

Before any work the inputs are checked: ``mu_water`` (finite, positive), the cube's size,
voxel and margin (:func:`check_cube_settings`), the memory the cube needs
(:mod:`prostlab.limits`), and the output folder (new or empty unless ``overwrite``,
writable, and not where an output would replace an input file). After reading, a CT with voxels
coarser than :data:`MAX_SOURCE_SPACING_MM` is refused, and so is a cube in which the selected
bones vanish.

The written affines map each voxel to its world position in the source scan, with spacing
``side_mm / size`` along every axis.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import prostlab
from prostlab.data.bone_threshold import BoneThreshold, threshold_bones
from prostlab.data.intensity import (
    FOV_FILL_BELOW,
    HU_AIR,
    MU_WATER,
    check_mu_water,
    fill_outside_fov,
    hu_to_mu,
)
from prostlab.data.io import load_image, save_nifti
from prostlab.data.labels import bone_ids, bone_mask, segment
from prostlab.data.orientation import (
    PREPARED_ORIENTATION,
    orientation_of,
    reorient,
    reoriented_grid,
)
from prostlab.data.resample import cube_grid, resample_linear, resample_nearest
from prostlab.data.volume import Volume, spacing_of
from prostlab.errors import ProstlabError
from prostlab.limits import check_grid_side, check_memory, check_spacing_mm
from prostlab.outputs import atomic_path, output_folder, record_outputs, write_text

CT_FILE = "ct_mu.nii.gz"
BONE_FILE = "bone_mu.nii.gz"
LABELS_FILE = "labels.nii.gz"
META_FILE = "meta.json"
STRUCTURES_FILE = "structures.csv"
FORMAT = "prostlab-prepared-ct/1"

PREPARED_FILES = (CT_FILE, BONE_FILE, LABELS_FILE, STRUCTURES_FILE, META_FILE)

GRID_ATOL_MM = 1e-2
"""Largest difference between two affines' entries (mm) for them to count as one grid."""

MAX_SOURCE_SPACING_MM = 20.0
"""Coarsest voxel (mm, along any axis) accepted as a CT. Clinical CTs have 0.3-10 mm voxels; a
500 mm slice is a broken header, and would stretch the cube until the bones vanish."""


MIN_HU_SPAN = 500.0
"""Smallest range of values (max - min) accepted as a CT in Hounsfield units: any scan holds air
(about -1000) or fat (about -100) beside soft tissue and bone (+40 to +2000); attenuation in 1/mm
(0 to about 0.1) or a 0-1 normalised image spans far less."""


MAX_AIR_HU = -500.0
"""The 1st percentile of a CT in Hounsfield units must lie below this: every CT holds air (about
-1000) around the body, in the lungs or the bowel. A CT stored with a +1024 offset (air at +24)
or an attenuation volume scaled to integers (air at 0) has its lowest values far above, and
would become a volume of dense tissue (air at 0.011/mm)."""


def check_hounsfield(hu: np.ndarray, path: str | Path) -> None:
    """Refuse a CT whose values cannot be Hounsfield units: they span less than
    :data:`MIN_HU_SPAN` (an attenuation volume, a prepared ``ct_mu.nii.gz`` or a normalised
    image would be mapped to air), or hold no air (:data:`MAX_AIR_HU`)."""
    low, high = float(np.min(hu)), float(np.max(hu))
    if not high - low >= MIN_HU_SPAN:
        raise ProstlabError(
            f"{path}: values span {low:.4g} to {high:.4g}; expected a CT in Hounsfield units "
            f"(air about -1000, bone above +200). An attenuation volume (1/mm) such as a "
            f"prepared ct_mu.nii.gz is already prepared: pass its folder instead"
        )
    sample = hu.reshape(-1)[:: max(1, hu.size // 1_000_000)]  # a percentile of 1e6 values
    air = float(np.percentile(sample, 1))
    if air > MAX_AIR_HU:
        raise ProstlabError(
            f"{path}: its lowest values (1st percentile) sit at {air:.4g}; expected air near "
            f"-1000 HU (below {MAX_AIR_HU:g}). A CT stored with a +1024 offset (air at +24) "
            "needs the offset subtracted (its rescale intercept, -1024); an attenuation volume "
            "is not a CT"
        )


def prepare_memory_bytes(size: int, source_shape: tuple[int, int, int] | None = None) -> int:
    """Bytes :func:`prepare_ct` needs at its peak, estimated before it allocates.

    The cube is ``N = size^3`` float32 voxels. While the bones are resampled, the CT's cube is
    held and the resampler holds about three cube-sized arrays (its output and the temporaries of
    its last pass), and the labels' cube (int32) follows: about ``16 N`` bytes. With the source's
    shape ``(I, J, K)`` known, add the resampler's float32 copy of the source, the segmented copy
    and its first two passes (``size I... -> size J K``, ``size^2 K``), three times each.
    """
    cube = int(size) ** 3
    total = 16 * cube
    if source_shape is not None:
        i, j, k = (int(n) for n in source_shape)
        total += 4 * (2 * i * j * k + 3 * size * j * k + 3 * size * size * k)
    return total


@dataclass(frozen=True)
class PreparedCT:
    """A prepared CT as loaded by :func:`load_prepared`.

    Attributes:
        ct: attenuation ``mu`` (1/mm) of the whole CT, ``(1, N, N, N)``, LIP.
        bone: the segmented CT ``mu * mask`` on the same grid, or ``None`` without labels.
        labels: label map ``(N, N, N)`` (integer ids, 0 = background), or ``None``.
        meta: the contents of ``meta.json``.
        directory: where it was loaded from.
    """

    ct: Volume
    bone: Volume | None
    labels: np.ndarray | None
    meta: dict[str, Any] = field(repr=False)
    directory: Path


def prepare_ct(
    ct_path: str | Path,
    labels_path: str | Path | None = None,
    out_dir: str | Path = "prepared",
    size: int = 128,
    bones: str | list[int] = "bones",
    structures_csv: str | Path | None = None,
    side_mm: float | None = None,
    centre: str | None = None,
    margin_mm: float = 0.0,
    mu_water: float = MU_WATER,
    fov_fill_below: float = FOV_FILL_BELOW,
    antialias: bool = True,
    overwrite: bool = False,
    bone_threshold: BoneThreshold | None = None,
) -> dict[str, Path]:
    """Prepare a CT for registration and write it to ``out_dir``.

    Args:
        ct_path: CT in Hounsfield units: a ``.nii``/``.nii.gz`` file or a DICOM series directory.
        labels_path: label map on the CT's voxel grid (axis flips and order may differ), or
            ``None``.
        out_dir: output directory (created); it must be new or empty unless ``overwrite``.
        size: voxels per edge of the output cube.
        bones: bone selection: a preset (``"bones"``, ``"pelvis"``), a group of the class table,
            or label ids (see :mod:`prostlab.data.labels`). Ignored without labels.
            Without labels the bones are the CT's voxels that ``bone_threshold`` selects.
        structures_csv: the class table; default ``structures.csv`` beside ``labels_path``.
        side_mm: cube edge in mm; default the largest extent of the bones' bounding box (or of
            the volume when ``centre="volume"``) plus ``2 * margin_mm``.
        centre: ``"bones"`` (the bounding box of the selected or thresholded bones; the
            default) or ``"volume"`` (the grid's centre).
        margin_mm: added on each side to the default cube edge.
        mu_water: attenuation of water in 1/mm; finite and positive.
        fov_fill_below: HU below this are outside the field of view and become air.
        antialias: low-pass filter when downsampling (see :mod:`prostlab.data.resample`).
        overwrite: write into a non-empty ``out_dir``; files that an earlier preparation wrote
            there and this one does not (a label map, say) are removed at the end, and no
            others (:func:`prostlab.outputs.record_outputs`). An output that would replace an
            input file (``--out`` the folder of ``labels.nii.gz``) is refused all the same.
        bone_threshold: the settings of the bones without labels (default
            :class:`~prostlab.data.bone_threshold.BoneThreshold`'s); refused with labels.

    Returns:
        The written paths, keyed ``"ct"``, ``"bone"``, ``"meta"`` and, with labels, ``"labels"``
        and ``"structures"`` (a copy of the class table, when one was used).
    """
    ct_path = Path(ct_path)
    centre = centre or "bones"
    if centre not in ("bones", "volume"):
        raise ProstlabError(f"centre: {centre!r}; expected 'bones' or 'volume'")
    if labels_path is not None and bone_threshold is not None:
        raise ProstlabError(
            "bone_threshold (--bone-hu): the bones come from the label map when one is given; "
            "expected one of the two"
        )
    if labels_path is None:
        bone_threshold = bone_threshold or BoneThreshold()
    check_mu_water(mu_water)
    check_cube_settings(size, side_mm, margin_mm)
    check_memory(prepare_memory_bytes(size), "cpu", f"size {size}: a {size}^3 cube")
    check_outputs_are_not_inputs(out_dir, ct_path, labels_path, structures_csv)
    with output_folder(out_dir, overwrite, "output folder") as out:
        written = _prepare(ct_path, labels_path, out, size, bones, structures_csv, side_mm,
                           centre, margin_mm, mu_water, fov_fill_below, antialias,
                           bone_threshold)
        record_outputs(out, "prepare", list(written.values()), overwrite)
    return written


def check_cube_settings(size: object, side_mm: float | None, margin_mm: float) -> None:
    """Refuse a cube that cannot hold anatomy: ``size`` not a whole number or below
    :data:`~prostlab.limits.MIN_GRID_SIDE` voxels, a given ``side_mm`` whose voxels
    (``side_mm / size``) are finer than :data:`~prostlab.limits.MIN_SPACING_MM`, or a margin that
    is negative or not finite (a smaller cube is ``side_mm``'s job)."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise ProstlabError(f"size: {size!r}; expected a whole number of voxels")
    check_grid_side((size,), "size (--size)", "voxels")
    if side_mm is not None:
        check_spacing_mm((side_mm / size,),
                         f"the cube's voxel, side_mm / size (--side-mm {side_mm:g} / --size {size})")
    if not (math.isfinite(margin_mm) and margin_mm >= 0):
        raise ProstlabError(f"margin_mm (--margin-mm): {margin_mm:g}; expected a finite margin "
                            ">= 0 mm (for a smaller cube, give side_mm, --side-mm)")


def check_outputs_are_not_inputs(
    out_dir: str | Path,
    ct_path: str | Path,
    labels_path: str | Path | None = None,
    structures_csv: str | Path | None = None,
) -> None:
    """Refuse an ``out_dir`` where one of :data:`PREPARED_FILES` would replace an input file.

    The inputs are the CT, the label map and the class table (given, or the default
    ``structures.csv`` beside the labels). ``--out`` the folder of the inputs is common, and with
    ``--overwrite`` the resampled ``labels.nii.gz`` would replace the user's original.
    """
    inputs = [Path(ct_path)]
    if labels_path is not None:
        labels_path = Path(labels_path)
        inputs += [labels_path,
                   Path(structures_csv) if structures_csv else labels_path.parent / STRUCTURES_FILE]
    inputs = [p for p in inputs if p.is_file()]
    for name in PREPARED_FILES:
        output = Path(out_dir) / name
        for source in inputs:
            if output.exists() and output.samefile(source):
                raise ProstlabError(
                    f"output folder {out_dir}: writing {name} there would replace the input "
                    f"{source}; expected an output folder apart from the inputs (choose another "
                    "--out)"
                )


def _prepare(ct_path, labels_path, out, size, bones, structures_csv, side_mm, centre, margin_mm,
             mu_water, fov_fill_below, antialias, bone_threshold) -> dict[str, Path]:
    """The work of :func:`prepare_ct` once its arguments and output folder are checked."""
    hu, affine = load_image(ct_path)
    coarse = [s for s in spacing_of(affine) if s > MAX_SOURCE_SPACING_MM]
    if coarse:
        raise ProstlabError(
            f"{ct_path}: voxel spacing {tuple(round(s, 3) for s in spacing_of(affine))} mm; "
            f"expected at most {MAX_SOURCE_SPACING_MM:g} mm along every axis (a CT's slices are "
            "0.3-10 mm): check the header's voxel size (pixdim, or the DICOM slice positions)"
        )
    check_hounsfield(hu, ct_path)
    check_memory(prepare_memory_bytes(size, hu.shape), "cpu", f"size {size}: a {size}^3 cube")
    source_orientation = orientation_of(affine)
    source_shape = list(hu.shape)
    source_spacing = list(spacing_of(affine))
    labels = None
    if labels_path is not None:
        labels_path = Path(labels_path)
        labels, labels_affine = load_image(labels_path, dtype=np.int32)
        check_same_grid(ct_path, hu.shape, affine, labels_path, labels.shape, labels_affine)
        if labels.min() < 0:
            raise ProstlabError(f"{labels_path}: has negative labels; expected ids >= 0")
        labels, _ = reorient(labels, labels_affine, PREPARED_ORIENTATION)
    hu, affine = reorient(hu, affine, PREPARED_ORIENTATION)
    hu = fill_outside_fov(hu, below=fov_fill_below, value=HU_AIR)
    ids = table = None
    if labels is not None:
        table = Path(structures_csv) if structures_csv else labels_path.parent / STRUCTURES_FILE
        ids = bone_ids(bones, table)
        mask = bone_mask(labels, ids, source=labels_path)
    else:
        mask = threshold_bones(hu, spacing_of(affine), bone_threshold)
        if not mask.any():
            raise ProstlabError(
                f"{ct_path}: no bone found at {bone_threshold.bone_hu:g} HU and above (seeds "
                f"from {bone_threshold.dense_hu:g} HU); expected a CT with bones in it: pass a "
                "label map (--labels) or a lower --bone-hu"
            )
    mu = hu_to_mu(hu, mu_water=mu_water)
    del hu

    grid = cube_grid(
        mu.shape,
        spacing_of(affine),
        size=size,
        side_mm=side_mm,
        mask=mask if centre == "bones" else None,
        margin_mm=margin_mm,
    )
    cube_affine = grid.affine(affine)

    cube_mu = resample_linear(mu, grid, 0.0, antialias)
    cube_labels = None
    bone = resample_linear(segment(mu, mask), grid, 0.0, antialias)
    if labels is not None:
        cube_labels = resample_nearest(labels, grid, 0)
    if not (bone > 0).any() or (labels is not None and not np.isin(cube_labels, ids).any()):
        what = f"bones {ids}" if labels is not None else "thresholded bone"
        raise ProstlabError(
            f"{labels_path or ct_path}: the {int(mask.sum())} voxels of {what} vanish in the "
            f"{size}^3 cube of {grid.spacing:.3g} mm voxels ({grid.side_mm:.4g} mm wide); "
            "expected bones that fill some of the cube: check the voxel spacing, or pass a "
            "smaller side_mm (--side-mm) or a larger size (--size)"
        )
    written = {"ct": save_nifti(out / CT_FILE, cube_mu, cube_affine),
               "bone": save_nifti(out / BONE_FILE, bone, cube_affine)}
    if labels is not None:
        written["labels"] = save_nifti(out / LABELS_FILE, _compact(cube_labels), cube_affine)
        if table is not None and table.is_file():
            with atomic_path(out / STRUCTURES_FILE) as tmp:
                shutil.copyfile(table, tmp)
            written["structures"] = out / STRUCTURES_FILE

    centre_world = cube_affine @ np.array([(size - 1) / 2] * 3 + [1.0])
    meta = {
        "format": FORMAT,
        "orientation": PREPARED_ORIENTATION,
        "size": grid.size,
        "spacing_mm": grid.spacing,
        "side_mm": grid.side_mm,
        "units": "linear attenuation mu, 1/mm",
        "centre": centre,
        "centre_world_ras_mm": [round(float(v), 4) for v in centre_world[:3]],
        "affine": cube_affine.tolist(),
        "mu_water_per_mm": mu_water,
        "hu_to_mu": "mu = max(mu_water * (1 + HU / 1000), 0)",
        "fov_fill_below_hu": fov_fill_below,
        "antialias": antialias,
        "bones": {
            "method": "threshold",
            **dataclasses.asdict(bone_threshold),
            "source_voxels": int(mask.sum()),
        }
        if ids is None
        else {
            "method": "labels",
            "selection": _jsonable(bones),
            "ids": ids,
            "ids_present": sorted(set(np.unique(labels[mask]).tolist())),
        },
        "files": {key: path.name for key, path in written.items()},
        "sources": {
            "ct": _source(ct_path),
            "labels": None if labels_path is None else _source(labels_path),
            "structures_csv": None if table is None or not table.is_file() else _source(table),
        },
        "source_shape": source_shape,
        "source_spacing_mm": source_spacing,
        "source_orientation": source_orientation,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "prostlab_version": prostlab.__version__,
    }
    written["meta"] = write_text(out / META_FILE, json.dumps(meta, indent=2, allow_nan=False) + "\n")
    return written


def load_prepared(directory: str | Path) -> PreparedCT:
    """Load and validate a directory written by :func:`prepare_ct`.

    Checks that ``meta.json`` is readable and of this format, that every volume is a LIP cube of
    ``size^3`` voxels with spacing ``spacing_mm``, that all volumes share one grid, and that the
    attenuation is non-negative. Errors name the offending file.
    """
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ProstlabError(
            f"{meta_path}: no such file; expected a directory written by `prostlab prepare`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ProstlabError(f"{meta_path}: not valid JSON ({exc})") from exc
    missing = [k for k in ("format", "size", "spacing_mm", "files") if k not in meta]
    if missing or meta.get("format") != FORMAT:
        raise ProstlabError(
            f"{meta_path}: lacks {missing or 'the format'}; expected format {FORMAT!r} with "
            "keys format, size, spacing_mm, files"
        )
    size, spacing = int(meta["size"]), float(meta["spacing_mm"])

    ct = _load_cube(directory / CT_FILE, size, spacing)
    bone = labels = None
    if "bone" in meta["files"]:
        bone = _load_cube(directory / BONE_FILE, size, spacing, like=ct)
    if "labels" in meta["files"]:
        path = directory / LABELS_FILE
        array, affine = load_image(path, dtype=np.int32)
        _check_cube(path, array.shape, affine, size, spacing)
        check_same_grid(directory / CT_FILE, ct.shape[1:], ct.affine, path, array.shape, affine)
        labels = array
    return PreparedCT(ct=ct, bone=bone, labels=labels, meta=meta, directory=directory)


def check_same_grid(
    path_a: str | Path,
    shape_a: tuple[int, ...],
    affine_a: np.ndarray,
    path_b: str | Path,
    shape_b: tuple[int, ...],
    affine_b: np.ndarray,
    atol_mm: float = GRID_ATOL_MM,
) -> None:
    """Raise ``ProstlabError`` naming both files unless they sample the same voxel grid.

    The two may store the grid with different axis flips or orders (a DICOM series and its NIfTI
    conversion, say): both are compared after reorientation to LIP, where the shapes must be equal
    and the affines agree within ``atol_mm``.
    """
    lip_shape_a, lip_affine_a = reoriented_grid(tuple(shape_a), affine_a)
    lip_shape_b, lip_affine_b = reoriented_grid(tuple(shape_b), affine_b)
    if lip_shape_a != lip_shape_b:
        raise ProstlabError(
            f"{path_b}: shape {tuple(shape_b)} differs from {path_a}'s {tuple(shape_a)}; "
            "expected the label map on the CT's voxel grid"
        )
    if not np.allclose(lip_affine_a, lip_affine_b, atol=atol_mm, rtol=0):
        worst = float(np.max(np.abs(lip_affine_a - lip_affine_b)))
        raise ProstlabError(
            f"{path_b}: affine differs from {path_a}'s by up to {worst:.4g} mm; expected the "
            f"label map on the CT's voxel grid (tolerance {atol_mm} mm)"
        )


def _load_cube(path: Path, size: int, spacing: float, like: Volume | None = None) -> Volume:
    """Load an attenuation cube; with ``like`` (the CT), check it shares the CT's grid."""
    array, affine = load_image(path)
    _check_cube(path, array.shape, affine, size, spacing)
    if array.min() < 0:
        raise ProstlabError(f"{path}: has negative attenuation {array.min():.4g}; expected mu >= 0")
    if like is not None:
        ct_path = path.parent / CT_FILE
        check_same_grid(ct_path, like.shape[1:], like.affine, path, array.shape, affine)
    return Volume.from_array(array, affine)


def _check_cube(
    path: Path, shape: tuple[int, ...], affine: np.ndarray, size: int, spacing: float
) -> None:
    if tuple(shape) != (size,) * 3:
        raise ProstlabError(f"{path}: shape {tuple(shape)}; expected ({size}, {size}, {size})")
    if orientation_of(affine) != PREPARED_ORIENTATION:
        raise ProstlabError(
            f"{path}: orientation {orientation_of(affine)}; expected {PREPARED_ORIENTATION}"
        )
    found = spacing_of(affine)
    if not np.allclose(found, spacing, rtol=1e-4, atol=0):
        raise ProstlabError(
            f"{path}: spacing {tuple(round(s, 5) for s in found)} mm; expected {spacing:.5f} mm "
            "isotropic as meta.json says"
        )


def _compact(labels: np.ndarray) -> np.ndarray:
    """The smallest of uint8, int16, int32 that holds the label ids."""
    top = int(labels.max(initial=0))
    dtype = np.uint8 if top <= 255 else np.int16 if top <= 32767 else np.int32
    return labels.astype(dtype)


def _source(path: Path) -> dict[str, str]:
    return {"path": str(path), "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    """SHA-256 of a file, or of a directory's files (names and bytes, in name order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _jsonable(selection: str | list[int]) -> str | list[int]:
    return selection if isinstance(selection, str) else [int(i) for i in selection]
