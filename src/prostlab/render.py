"""The `prostlab render` job: DRRs of a volume at a list of poses, written as PNG and .npy.

Poses come in degrees and millimetres, as a researcher types them: ``(rx, ry, rz)`` is a rotation
vector in degrees (axis times angle, docs/geometry.md) and ``(tx, ty, tz)`` a translation in mm.

Refused before rendering: a NIfTI volume with attenuation below :data:`MIN_MU` (it looks like a
CT in Hounsfield units) or above :data:`MAX_MU` (a CT with a +1024 offset, an attenuation scaled
to integers), a detector of fewer than :data:`~prostlab.limits.MIN_GRID_SIDE` pixels a side or
of pixels finer than :data:`~prostlab.limits.MIN_SPACING_MM`, a source-to-detector distance
outside :data:`~prostlab.limits.SDD_RANGE_MM` (:func:`check_detector`), ``--which bone`` of a
NIfTI volume (which has no bones apart), a pose
that puts the volume's centre outside the beam (:func:`~prostlab.geometry.check_pose_in_beam`,
as ``register --init``), a batch size below 1, a device this machine lacks
(:func:`prostlab.limits.resolve_device`), a job whose memory estimate
(:func:`render_memory_bytes`) exceeds what is available, and a step that takes more than
:data:`prostlab.projector.rays.MAX_SAMPLES_PER_RAY` samples per ray. After rendering, before
anything is written, :func:`check_not_blank` refuses a job whose every DRR is blank and names
the poses whose DRR is. :func:`warn_cut_by_the_beam` names the poses that put part of the volume
behind the source or past the detector (the DRR misses that part).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from prostlab.csv_table import csv_rows
from prostlab.data import Volume, load_image, load_prepared
from prostlab.errors import ProstlabError
from prostlab.geometry import Camera, check_pose_in_beam, depth_outside_beam
from prostlab.limits import (
    check_grid_side,
    check_memory,
    check_sdd_mm,
    check_spacing_mm,
    resolve_device,
)
from prostlab.outputs import atomic_path, record_outputs
from prostlab.projector import Projector
from prostlab.projector.rays import check_samples_per_ray, support_half_sides
from prostlab.viz.images import save_drr_png

POSE_COLUMNS = ("rx_deg", "ry_deg", "rz_deg", "tx_mm", "ty_mm", "tz_mm")
CAMERA_KEYS = ("camera", "model.camera", "model.init_args.camera", "data.camera")

MIN_MU = -1e-3
"""Lowest attenuation (1/mm) accepted in a NIfTI volume to render: interpolation may undershoot 0
a little, but a CT in Hounsfield units reaches -1000 (air)."""

MAX_MU = 1.0
"""Highest attenuation (1/mm) accepted in a NIfTI volume to render: bone is about 0.05, the top of
a 12-bit CT's range (+3071 HU) 0.11 and steel about 0.9; a CT stored with a +1024 offset (air at
+24, so never negative) reaches thousands and rendered DRRs near 1e5."""

PROST_PELVIS_CAMERA = Camera(
    sdd=1020.0, sid=620.0, height=128, width=128, pixel_spacing=(2.92, 2.92)
)
"""ProST's pelvis geometry (Gao et al. 2020): 1020 mm source-detector, isocentre 400 mm before
the detector, 128 x 128 pixels of 2.92 mm."""


def poses_from_degrees(rows: Sequence[Sequence[float]]) -> torch.Tensor:
    """(N, 6) poses in radians and mm from rows ``(rx, ry, rz)`` degrees and ``(tx, ty, tz)`` mm."""
    poses = torch.tensor([list(map(float, r)) for r in rows], dtype=torch.float64)
    if poses.ndim != 2 or poses.shape[1] != 6:
        raise ProstlabError(
            f"pose: expected rows of 6 numbers (rx ry rz in deg, tx ty tz in mm), "
            f"got shape {tuple(poses.shape)}"
        )
    poses[:, :3] *= math.pi / 180.0
    return poses


def read_pose_csv(path: str | Path) -> torch.Tensor:
    """(N, 6) poses (rad, mm) from a CSV with the header ``rx_deg,ry_deg,rz_deg,tx_mm,ty_mm,tz_mm``."""
    path = Path(path)
    rows = []
    for line, row in csv_rows(path, POSE_COLUMNS):
        try:
            rows.append([float(row[c]) for c in POSE_COLUMNS])
        except (TypeError, ValueError) as exc:
            raise ProstlabError(f"{path}, line {line}: expected 6 numbers ({exc})") from exc
    if not rows:
        raise ProstlabError(f"{path}: no poses; expected at least one row after the header")
    poses = poses_from_degrees(rows)
    if not torch.isfinite(poses).all():
        raise ProstlabError(f"{path}: non-finite pose values; expected finite numbers")
    return poses


def camera_from_config(path: str | Path) -> Camera:
    """The camera section of a YAML config (looked up at ``camera`` or ``model.camera``)."""
    path = Path(path)
    try:
        config = OmegaConf.load(path)
    except OSError as exc:
        raise ProstlabError(f"{path}: cannot read the config ({exc.strerror})") from exc
    except Exception as exc:  # noqa: BLE001 - any YAML parse error
        raise ProstlabError(f"{path}: not valid YAML ({exc})") from exc
    for key in CAMERA_KEYS:
        section = OmegaConf.select(config, key)
        if section is not None:
            return Camera.from_dict(OmegaConf.to_container(section, resolve=True))
    raise ProstlabError(f"{path}: no camera section; expected one of the keys {CAMERA_KEYS}")


def load_volume(path: str | Path, which: str = "ct") -> Volume:
    """A volume of attenuation: a `prostlab prepare` directory (``which`` = ct or bone) or a
    NIfTI file of attenuation values (1/mm)."""
    path = Path(path)
    if path.is_dir():
        prepared = load_prepared(path)
        if which == "bone":
            if prepared.bone is None:
                raise ProstlabError(f"{path}: has no segmented CT (bone_mu.nii.gz)")
            return prepared.bone
        return prepared.ct
    array, affine = load_image(path)
    if which == "bone":  # it was ignored: the whole volume rendered as if it were the bones
        raise ProstlabError(
            f"--which bone: {path} is one volume of attenuation, with no bones apart; expected "
            "a `prostlab prepare` folder (its bone_mu.nii.gz), or --which ct"
        )
    highest = float(array.max())
    if highest > MAX_MU:
        raise ProstlabError(
            f"{path}: has attenuation up to {highest:.4g} /mm; expected mu in 1/mm, at most "
            f"{MAX_MU:g} (bone is about 0.05, steel about 0.9). A CT in Hounsfield units (stored "
            f"with a +1024 offset?) is converted by `prostlab prepare --ct {path} --out "
            "<folder>`; an attenuation volume scaled to integers needs the scale undone"
        )
    lowest = float(array.min())
    if lowest < MIN_MU:
        raise ProstlabError(
            f"{path}: has attenuation down to {lowest:.4g} /mm; expected mu >= 0 in 1/mm. It "
            f"looks like a CT in Hounsfield units: convert it with `prostlab prepare --ct {path} "
            "--out <folder>` and render that folder"
        )
    return Volume.from_array(array, affine)


def check_detector(camera: Camera) -> None:
    """Refuse a detector of fewer than :data:`~prostlab.limits.MIN_GRID_SIDE` pixels along a
    side, of pixels finer than :data:`~prostlab.limits.MIN_SPACING_MM`, or at a distance
    outside :data:`~prostlab.limits.SDD_RANGE_MM`: ``--height 1`` or ``--pixel-spacing 0.0001``
    rendered an image of nothing without a word, ``--sdd 1e9`` a camera 1000 km long."""
    check_grid_side((camera.height, camera.width),
                    "detector rows x columns (--height, --width, or the config's camera)", "pixels")
    check_spacing_mm(camera.pixel_spacing,
                     "pixel_spacing (--pixel-spacing, or the config's camera)")
    check_sdd_mm(camera.sdd, "sdd (--sdd, or the config's camera)")


def render_memory_bytes(
    n_poses: int, batch_size: int, channels: int, pixels: int
) -> tuple[int, int]:
    """Bytes :func:`render_poses` needs, estimated before it allocates: ``(host, device)``.

    On the host, the images are kept, ``(N, C, P)`` float32 for ``P`` detector pixels, and
    concatenated once at the end: ``8 N C P``. On the rendering device, each batch of ``B`` poses
    needs its ``(B, C, P)`` images and the per-ray clipping of
    :meth:`~prostlab.projector.rays.RayBundle.sample_range`, about 48 float32 per ray and pose,
    ``4 B P (C + 48)``, and the rays themselves, ``(P, 3)`` a few times, ``48 P``. The torch
    backend's chunks are bounded separately (``Projector.max_samples``).
    """
    batch = min(batch_size, n_poses)
    host = 8 * n_poses * channels * pixels
    return host, 4 * batch * pixels * (channels + 48) + 48 * pixels


def render_poses(
    volume: Volume,
    camera: Camera,
    poses: torch.Tensor,
    step: float,
    backend: str = "auto",
    device: str = "cpu",
    batch_size: int = 8,
    progress=None,
    what: str = "pose",
) -> np.ndarray:
    """DRRs (N, C, H, W) of ``volume`` at ``poses`` (N, 6), rendered ``batch_size`` at a time.

    The detector, the poses, the batch size, the device, the memory the job needs and the
    samples per ray are checked before anything is rendered (see the module docstring); each
    refusal is a ``ProstlabError``, and one of a pose starts with ``what`` (the flag or file
    that gave the poses) and its number.
    """
    check_detector(camera)
    check_pose_in_beam(poses, camera, what)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ProstlabError(f"batch_size: {batch_size!r}; expected a positive number of poses "
                            "rendered at once")
    device = resolve_device(device)
    projector = Projector(camera, step=step, backend=backend)
    check_samples_per_ray(volume.shape[1:], volume.spacing, step)
    pixels, channels = camera.height * camera.width, volume.shape[0]
    host, working = render_memory_bytes(len(poses), batch_size, channels, pixels)
    what = f"rendering {len(poses)} DRR(s) of {camera.height} x {camera.width} pixels"
    if device.type == "cpu":
        check_memory(host + working, device, what)
    else:
        check_memory(host, "cpu", what)
        check_memory(working, device, what)
    data = volume.batched().to(device)
    images = []
    with torch.no_grad():
        for start in range(0, len(poses), batch_size):
            batch = poses[start : start + batch_size].to(device=device, dtype=data.dtype)
            images.append(projector(data, volume.spacing, batch).cpu())
            if progress is not None:
                progress(len(batch))
    return torch.cat(images).numpy()


def warn_cut_by_the_beam(volume: Volume, camera: Camera, poses: torch.Tensor,
                         what: str = "pose") -> str | None:
    """A warning naming the poses ``(N, 6)`` that put part of ``volume``'s box behind the source
    or past the detector (:func:`~prostlab.geometry.depth_outside_beam`), or ``None``.

    Rays run from the source to the detector, so such a DRR misses that part of the volume: an
    isocentre a few mm before the detector (``--sid`` close to ``--sdd``) cuts the volume in half.
    Not refused: a box with air margins may reach past the detector with its anatomy inside.
    """
    half = support_half_sides(volume.shape[1:], volume.spacing)
    past = depth_outside_beam(poses.to(torch.float64), camera, half)
    cut = torch.nonzero(past > 0).flatten().tolist()
    if not cut:
        return None
    numbers = ", ".join(str(i + 1) for i in cut)
    return (f"{what} {numbers}: the volume's box reaches up to {float(past.max()):.4g} mm behind "
            f"the source or past the detector (sid {camera.sid:g}, sdd {camera.sdd:g} mm), and "
            "rays run from one to the other, so the DRR misses that part; expected the box "
            f"between them (sdd - sid above its half-diagonal, "
            f"{math.sqrt(sum(h * h for h in half)):.4g} mm, or a smaller tz)")


def check_not_blank(images: np.ndarray, what: str = "pose") -> str | None:
    """Refuse DRRs ``(N, C, H, W)`` that are all blank (no positive pixel: no ray crossed the
    volume), and return a warning naming the blank ones when only some are (``None`` when none
    is). A pose whose centre is in the beam can still project the volume beside the detector; a
    sweep may do so on purpose, a list that never shows the volume cannot. ``what`` names the
    poses' source, as in :func:`render_poses`."""
    blank = np.flatnonzero(images.reshape(len(images), -1).max(axis=1) <= 0).tolist()
    if not blank:
        return None
    beside = f"the volume projects beside the {images.shape[-2]} x {images.shape[-1]} detector"
    if len(blank) == len(images):
        raise ProstlabError(f"{what}: every DRR is blank ({len(blank)} of {len(images)}), "
                            f"{beside}; expected a pose that puts it in view (smaller "
                            "translations across the beam, tx and ty in mm)")
    numbers = ", ".join(str(i + 1) for i in blank)
    files = ", ".join(f"drr_{i:03d}.png" for i in blank)
    return (f"{what} {numbers}: blank DRR ({files}; {len(blank)} of {len(images)}), {beside}; "
            "check the translations (tx, ty in mm) if a view of the volume was meant")


def write_drrs(
    out: str | Path,
    images: np.ndarray,
    poses: torch.Tensor,
    colorbar: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``drrs.npy`` (the ``(N, C, H, W)`` array) and ``drr_000.png``, ... into ``out``.

    Each file is written under a temporary name and moved into place. The PNG titles give the
    pose in degrees and mm. The files are listed in the folder's manifest
    (:func:`prostlab.outputs.record_outputs`); with ``overwrite``, those of an earlier render
    that this one did not write (``drr_005.png`` after a run of 5 poses, say) are removed at the
    end, and no other file. Returns the path of ``drrs.npy``.
    """
    out = Path(out)
    np_path = out / "drrs.npy"
    with atomic_path(np_path) as tmp:
        np.save(tmp, images)
    written = [np_path]
    degrees = poses.clone()
    degrees[:, :3] *= 180.0 / math.pi
    for i, image in enumerate(images):
        title = "rotation (deg) {:.1f} {:.1f} {:.1f}, translation (mm) {:.1f} {:.1f} {:.1f}".format(
            *degrees[i].tolist()
        )
        written.append(save_drr_png(out / f"drr_{i:03d}.png", image[0], colorbar, title))
    record_outputs(out, "render", written, overwrite)
    return np_path
