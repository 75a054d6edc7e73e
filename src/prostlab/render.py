"""The `prostlab render` job: DRRs of a volume at a list of poses, written as PNG and .npy.

Poses come in degrees and millimetres, as a researcher types them: ``(rx, ry, rz)`` is a rotation
vector in degrees (axis times angle, docs/geometry.md) and ``(tx, ty, tz)`` a translation in mm.
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
from prostlab.geometry import Camera
from prostlab.projector import Projector

POSE_COLUMNS = ("rx_deg", "ry_deg", "rz_deg", "tx_mm", "ty_mm", "tz_mm")
CAMERA_KEYS = ("camera", "model.camera", "model.init_args.camera", "data.camera")

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
    return Volume.from_array(array, affine)


def render_poses(
    volume: Volume,
    camera: Camera,
    poses: torch.Tensor,
    step: float,
    backend: str = "auto",
    device: str = "cpu",
    batch_size: int = 8,
    progress=None,
) -> np.ndarray:
    """DRRs (N, C, H, W) of ``volume`` at ``poses`` (N, 6), rendered ``batch_size`` at a time."""
    projector = Projector(camera, step=step, backend=backend)
    data = volume.batched().to(device)
    images = []
    with torch.no_grad():
        for start in range(0, len(poses), batch_size):
            batch = poses[start : start + batch_size].to(device=device, dtype=data.dtype)
            images.append(projector(data, volume.spacing, batch).cpu())
            if progress is not None:
                progress(len(batch))
    return torch.cat(images).numpy()
