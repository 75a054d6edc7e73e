"""A small HDF5 file in DeepFluoro's layout, made from the bundled chest CT, for the tests.

The chest plays a pelvis: its ribs, sternum, vertebrae and shoulder bones get DeepFluoro's label
ids (left ribs 1, right ribs 2, vertebrae 3, sternum 4, left shoulder 5, right 6). The CT is the
bundled 128^3 cube averaged to 64^3, turned from LIP to DeepFluoro's LPS-aligned ITK grid and back
to HU. Each X-ray is a DRR rendered by prostlab's projector at a known pose on a 64 x 64 detector
of 5.84 mm pixels (four times finer than ``configs/tiny.yaml``'s 16 x 16), turned into detector
intensities ``I = I0 exp(-DRR)`` (whole numbers, a collimated border of ``BORDER_PX``), and stored
as the file stores its images: mirrored (the file's ``K`` has negative focal terms) and, for the
projections with ``rot-180-for-up`` set, upside down as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from prostlab.data import MU_WATER, example_path, load_prepared
from prostlab.data.deepfluoro import (
    DEEPFLUORO_NAMES,
    LPS_FROM_RAS,
    SPECIMEN_IDS,
    Geometry,
    camera_signs,
    detector_camera,
    orient_image,
    pose_to_file,
    volume_to_lps,
)
from prostlab.geometry import so3_exp, so3_log
from prostlab.projector import Projector

SPECIMEN = SPECIMEN_IDS[0]
I0 = 60000.0
BORDER_PX = 4
PIXELS = 64
PIXEL_MM = 5.84
SDD = 1020.0
SID = 620.0
FLAGS = (False, True, False, True, False)
AP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
"""Rotation of an upright AP view of an LPS grid: L to columns, S up the image, P along the
beam."""


@dataclass(frozen=True)
class Synthetic:
    """What the file holds, in prostlab's terms: ``poses[i]`` is projection ``i``'s prostlab
    pose of the LPS grid's own volume frame (camera ``sid = SID``)."""

    path: Path
    geometry: Geometry
    poses: torch.Tensor
    flags: tuple[bool, ...]
    vol_to_lps: np.ndarray
    landmarks: dict[str, np.ndarray]


def _chest_lps() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mu, labels, affine_lps)`` of the bundled chest on an LPS-aligned grid, 2x averaged."""
    prepared = load_prepared(example_path())
    mu = prepared.ct.data[0].numpy().astype(np.float64)
    n = mu.shape[0] // 2
    mu = mu.reshape(n, 2, n, 2, n, 2).mean(axis=(1, 3, 5))
    labels = _deepfluoro_labels(prepared.labels[::2, ::2, ::2], prepared.directory)
    coarse = np.eye(4)
    coarse[:3, :3] *= 2.0
    coarse[:3, 3] = 0.5  # block a is centred on fine index 2a + 0.5 (its labels: those of 2a)
    # LPS index (i, j, k) is LIP index (i, n - 1 - k, j).
    lip_from_lps = np.array([[1, 0, 0, 0], [0, 0, -1, n - 1], [0, 1, 0, 0], [0, 0, 0, 1.0]])
    affine_lps = LPS_FROM_RAS @ prepared.ct.affine @ coarse @ lip_from_lps
    assert np.allclose(affine_lps[:3, :3], np.diag(np.diag(affine_lps[:3, :3])))
    mu = mu.transpose(0, 2, 1)[:, :, ::-1]
    labels = labels.transpose(0, 2, 1)[:, :, ::-1]
    return np.ascontiguousarray(mu), np.ascontiguousarray(labels), affine_lps


def _deepfluoro_labels(labels: np.ndarray, folder: Path) -> np.ndarray:
    names = {}
    for line in (folder / "structures.csv").read_text().splitlines()[1:]:
        group, _, structure, label = line.split(",")
        names[int(label)] = (group, structure)
    out = np.zeros(labels.shape, dtype=np.uint8)
    for label, (group, structure) in names.items():
        if structure.startswith("rib_left"):
            out[labels == label] = 1
        elif structure.startswith("rib_right"):
            out[labels == label] = 2
        elif group == "vertebrae":
            out[labels == label] = 3
        elif structure == "sternum":
            out[labels == label] = 4
        elif structure.endswith("_left") and group == "skeleton":
            out[labels == label] = 5
        elif structure.endswith("_right") and group == "skeleton":
            out[labels == label] = 6
    return out


def _itk_group(group: h5py.Group, pixels: np.ndarray, affine: np.ndarray) -> None:
    """An ITK image group: pixels stored slowest axis first, spacing and origin as columns."""
    ndim = pixels.ndim
    group["pixels"] = pixels.transpose(tuple(range(ndim))[::-1])
    spacing = np.linalg.norm(affine[:ndim, :ndim], axis=0)
    group["spacing"] = spacing.reshape(ndim, 1)
    group["origin"] = affine[:ndim, ndim].reshape(ndim, 1)
    group["dir-mat"] = affine[:ndim, :ndim] / spacing


def _pose(generator: torch.Generator) -> torch.Tensor:
    """An upright AP view of the LPS grid, a few degrees and mm off (the file stores the
    flagged projections' images turned by 180 degrees; the pose in prostlab's frame is upright
    either way)."""
    jitter = (torch.rand(3, generator=generator, dtype=torch.float64) - 0.5) * math.radians(16)
    rotation = so3_exp(jitter[None])[0] @ torch.from_numpy(AP)
    translation = (torch.rand(3, generator=generator, dtype=torch.float64) - 0.5) * 30.0
    return torch.cat((so3_log(rotation[None])[0], translation))


def write_synthetic(path: Path, seed: int = 0) -> Synthetic:
    """Write the file (see the module docstring) and return what it holds."""
    mu, labels, affine_lps = _chest_lps()
    hu = (1000.0 * (mu / MU_WATER - 1.0)).astype(np.float32)
    vol_to_lps = volume_to_lps(LPS_FROM_RAS @ affine_lps, mu.shape)
    spacing = tuple(float(s) for s in np.diag(affine_lps)[:3])
    focal = SDD / PIXEL_MM
    intrinsic = np.array([[-focal, 0.0, (PIXELS - 1) / 2], [0.0, -focal, (PIXELS - 1) / 2],
                          [0.0, 0.0, 1.0]])
    extrinsic = np.eye(4)
    extrinsic[:3, :3] = so3_exp(torch.tensor([[0.1, -0.3, 0.2]], dtype=torch.float64))[0].numpy()
    extrinsic[:3, 3] = (12.0, -30.0, 400.0)
    geometry = Geometry(intrinsic, extrinsic, PIXELS, PIXELS, (PIXEL_MM, PIXEL_MM))
    landmarks = {}
    for label in range(1, 7):
        index = np.argwhere(labels == label).mean(axis=0)
        landmarks[f"L{label}"] = (affine_lps @ np.append(index, 1.0))[:3]

    generator = torch.Generator().manual_seed(seed)
    volume = torch.from_numpy(mu.astype(np.float32))[None, None]
    poses = []
    with h5py.File(path, "w") as f:
        params = f.create_group("proj-params")
        params["intrinsic"], params["extrinsic"] = intrinsic, extrinsic
        params["num-rows"], params["num-cols"] = PIXELS, PIXELS
        params["pixel-row-spacing"], params["pixel-col-spacing"] = PIXEL_MM, PIXEL_MM
        specimen = f.create_group(SPECIMEN)
        _itk_group(specimen.create_group("vol"), hu, affine_lps)
        seg = specimen.create_group("vol-seg")
        _itk_group(seg.create_group("image"), labels, affine_lps)
        for label, name in DEEPFLUORO_NAMES.items():
            seg[f"labels-def/{label}"] = name
        for name, point in landmarks.items():
            specimen[f"vol-landmarks/{name}"] = point.reshape(3, 1)
        for index, flag in enumerate(FLAGS):
            pose = _pose(generator)
            poses.append(pose)
            signs = camera_signs(intrinsic, flag)
            camera = detector_camera(geometry, signs, SID)
            with torch.no_grad():
                drr = Projector(camera, step=2.0, backend="torch")(volume, spacing,
                                                                   pose[None].float())
            intensity = np.round(I0 * np.exp(-drr[0, 0].double().numpy()))
            intensity[:BORDER_PX], intensity[-BORDER_PX:] = 50.0, 50.0
            intensity[:, :BORDER_PX], intensity[:, -BORDER_PX:] = 50.0, 50.0
            cam_to_vol = pose_to_file(pose, extrinsic, signs, vol_to_lps, SID)
            group = specimen.create_group(f"projections/{index:03d}")
            image_affine = np.diag([PIXEL_MM, PIXEL_MM, 1.0])
            stored = orient_image(intensity, signs).astype(np.float32)
            _itk_group(group.create_group("image"), stored.T, image_affine)  # (column, row)
            group["gt-poses/cam-to-pelvis-vol"] = cam_to_vol
            group["rot-180-for-up"] = int(flag)
            world = np.linalg.inv(cam_to_vol)
            for name, point in landmarks.items():
                cam = extrinsic @ world @ np.append(point, 1.0)
                uvw = intrinsic @ cam[:3]
                group[f"gt-landmarks/{name}"] = (uvw[:2] / uvw[2]).reshape(2, 1)
    return Synthetic(path, geometry, torch.stack(poses), FLAGS, vol_to_lps, landmarks)
