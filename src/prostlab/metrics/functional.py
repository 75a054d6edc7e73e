"""Registration errors as plain functions of estimated and ground-truth poses.

Poses are ``(B, 6)`` tensors ``(omega rad, t mm)``: the rigid map ``X_iso = R X_vol + t`` from the
volume frame to the isocentre frame (``docs/geometry.md``). Every function computes in float64
and returns ``(B,)`` values in the estimate's dtype, on its device. Batches of 1 broadcast.

- :func:`rotation_error`: ``theta(R_est^T R_gt)`` in **degrees**, the geodesic angle on SO(3).
- :func:`translation_error`: ``|t_est - t_gt|`` in **mm**, measured in the isocentre frame; it is
  the displacement of the volume's centre (the volume frame's origin) between the two poses.
- :func:`mtre`: the mean target registration error, mm: the mean over target points ``X`` (volume
  frame) of ``|T_est X - T_gt X|``, in 3D, in the isocentre frame (any rigid frame gives the same
  lengths).
- :func:`mean_projection_distance`: the mean projection distance (mPD), mm: the mean over target
  points of the distance between their projections under the two poses, **on the detector
  plane** by default (pixels times pixel spacing), or divided by the magnification ``sdd / sid``
  to express it at the isocentre plane.
- :func:`diffpose_mtre`: the quantity DiffPose's ``Evaluator`` reports as mTRE on DeepFluoro
  (Gopalakrishnan, Dey & Golland, CVPR 2024): target points projected onto the detector with
  each pose, lifted back onto the detector plane in 3D, carried into the volume frame by each
  pose's own camera, their mean distance times 0.194. It is neither a 3D mTRE nor a distance on
  the detector (see its docstring).
- :func:`success`: ``mtre < threshold`` (10 mm by default, the criterion of ProST's follow-up
  work on fiducial-free registration).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from prostlab.errors import ProstlabError
from prostlab.geometry import Camera, check_pose, geodesic_angle, so3_exp

__all__ = [
    "DEFAULT_SUCCESS_THRESHOLD_MM",
    "DIFFPOSE_SCALE",
    "PLANES",
    "diffpose_mtre",
    "mean_projection_distance",
    "mtre",
    "rotation_error",
    "success",
    "target_points_from_mask",
    "translation_error",
]

DEFAULT_SUCCESS_THRESHOLD_MM = 10.0
"""Success means mTRE below this many mm, as in ProST's follow-up work (Gao et al.)."""

DIFFPOSE_SCALE = 0.194
"""The factor DiffPose's ``Evaluator`` multiplies its distance by (DeepFluoro's pixel spacing in mm,
applied to a distance that is already in mm)."""

PLANES = ("detector", "isocentre")
"""Where :func:`mean_projection_distance` measures: on the detector, or scaled to the isocentre."""


def _poses(est: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    est = check_pose(est, "est")
    gt = check_pose(gt, "gt")
    if est.shape[0] != gt.shape[0] and 1 not in (est.shape[0], gt.shape[0]):
        raise ProstlabError(
            f"gt: expected batch size {est.shape[0]} (that of est) or 1, got {gt.shape[0]}"
        )
    return est.double(), gt.to(device=est.device, dtype=torch.float64)


def _points(points: Tensor, batch: int, device: torch.device) -> Tensor:
    """Check target points ``(N, 3)`` or ``(B | 1, N, 3)``; return float64 ``(B | 1, N, 3)``."""
    if not isinstance(points, Tensor) or not points.is_floating_point():
        kind = points.dtype if isinstance(points, Tensor) else type(points).__name__
        raise ProstlabError(f"points: expected a floating-point tensor (N, 3), got {kind}")
    if points.ndim == 2:
        points = points[None]
    if points.ndim != 3 or points.shape[-1] != 3 or points.shape[1] == 0:
        raise ProstlabError(
            f"points: expected shape (N, 3) or (B, N, 3) with N >= 1 (volume frame, mm), "
            f"got {tuple(points.shape)}"
        )
    if points.shape[0] not in (1, batch):
        raise ProstlabError(
            f"points: expected a batch of 1 or {batch} (that of the poses), got {points.shape[0]}"
        )
    if not bool(torch.isfinite(points).all()):
        raise ProstlabError("points: expected finite coordinates, got NaN or inf")
    return points.to(device=device, dtype=torch.float64)


def _transform(pose: Tensor, points: Tensor) -> Tensor:
    """``R X + t`` for poses ``(B, 6)`` and points ``(B | 1, N, 3)`` -> ``(B, N, 3)``."""
    rotation = so3_exp(pose[:, :3])
    return points @ rotation.transpose(-1, -2) + pose[:, None, 3:]


def rotation_error(est: Tensor, gt: Tensor) -> Tensor:
    """The geodesic rotation error ``theta(R_est^T R_gt)``, degrees, in ``[0, 180]``.

    Args:
        est: ``(B, 6)`` estimated poses.
        gt: ``(B, 6)`` or ``(1, 6)`` ground-truth poses.

    Returns:
        ``(B,)`` angles in degrees.
    """
    e, g = _poses(est, gt)
    angle = geodesic_angle(so3_exp(e[:, :3]), so3_exp(g[:, :3]))
    return torch.rad2deg(angle).to(est.dtype)


def translation_error(est: Tensor, gt: Tensor) -> Tensor:
    """The translation error ``|t_est - t_gt|``, mm, in the isocentre frame.

    It is how far the volume's centre lies from where it should: it depends on the choice of that
    origin, unlike :func:`mtre`.

    Args:
        est: ``(B, 6)`` estimated poses.
        gt: ``(B, 6)`` or ``(1, 6)`` ground-truth poses.

    Returns:
        ``(B,)`` distances in mm.
    """
    e, g = _poses(est, gt)
    return (e[:, 3:] - g[:, 3:]).norm(dim=-1).to(est.dtype)


def mtre(est: Tensor, gt: Tensor, points: Tensor) -> Tensor:
    """The mean target registration error ``mean_X |T_est X - T_gt X|``, mm.

    Args:
        est: ``(B, 6)`` estimated poses.
        gt: ``(B, 6)`` or ``(1, 6)`` ground-truth poses.
        points: target points in the volume frame, mm: ``(N, 3)`` shared by all cases, or
            ``(B, N, 3)`` (e.g. from :func:`target_points_from_mask`).

    Returns:
        ``(B,)`` mean 3D distances in mm.
    """
    e, g = _poses(est, gt)
    batch = max(e.shape[0], g.shape[0])
    x = _points(points, batch, e.device)
    return (_transform(e, x) - _transform(g, x)).norm(dim=-1).mean(-1).to(est.dtype)


def mean_projection_distance(
    est: Tensor, gt: Tensor, points: Tensor, camera: Camera, plane: str = "detector"
) -> Tensor:
    """The mean projection distance (mPD): target points projected with both poses, mm.

    Each point ``X`` projects to pixels ``p = project(E X)`` with the camera's extrinsics ``E`` of
    each pose; the distance ``|p_est - p_gt|`` is measured in mm on the detector (column offsets
    times ``du``, row offsets times ``dv``) and averaged over the points. With
    ``plane="isocentre"`` it is divided by the magnification ``sdd / sid``: the same distance
    expressed at the isocentre plane, the scale of the anatomy.

    Args:
        est: ``(B, 6)`` estimated poses.
        gt: ``(B, 6)`` or ``(1, 6)`` ground-truth poses.
        points: ``(N, 3)`` or ``(B, N, 3)`` target points in the volume frame, mm; they must lie
            in front of the source under both poses.
        camera: the camera that images them.
        plane: ``"detector"`` (default) or ``"isocentre"``.

    Returns:
        ``(B,)`` mean distances in mm.
    """
    if not isinstance(camera, Camera):
        raise ProstlabError(f"camera: expected a prostlab.geometry.Camera, got {type(camera)}")
    if plane not in PLANES:
        raise ProstlabError(f"plane: expected one of {PLANES}, got {plane!r}")
    e, g = _poses(est, gt)
    batch = max(e.shape[0], g.shape[0])
    x = _points(points, batch, e.device)
    dv, du = camera.pixel_spacing
    scale = torch.tensor([du, dv], dtype=torch.float64, device=e.device)
    shift = torch.tensor([0.0, 0.0, camera.sid], dtype=torch.float64, device=e.device)
    p_est = camera.project(_transform(e, x) + shift)
    p_gt = camera.project(_transform(g, x) + shift)
    distance = ((p_est - p_gt) * scale).norm(dim=-1).mean(-1)
    if plane == "isocentre":
        distance = distance / camera.magnification
    return distance.to(est.dtype)


def diffpose_mtre(
    est: Tensor, gt: Tensor, points: Tensor, camera: Camera, scale: float = DIFFPOSE_SCALE
) -> Tensor:
    """DiffPose's ``Evaluator`` quantity, the number its paper reports as mTRE on DeepFluoro.

    Source: Gopalakrishnan, Dey & Golland, "Intraoperative 2D/3D image registration via
    differentiable X-ray rendering", CVPR 2024; the class ``Evaluator`` of ``diffpose/deepfluoro.py``
    (github.com/eigenvivek/DiffPose). For each pose ``P`` (est and gt) and target point ``X``:

    1. project: ``(u, v, 1) ~ K x`` with ``x = R X + t + sid e_z`` the camera-frame point;
    2. lift back onto the detector plane in 3D: ``y = f K^-1 (u, v, 1)``, ``f = sdd`` (DiffPose
       writes ``-focal_len K^-1 [u, v, 1]`` in DeepFluoro's camera frame, whose z-axis and focal
       terms have the opposite sign: the same point);
    3. carry ``y`` into the volume frame by that pose's own camera: ``P^-1 y = R^T (y - t - sid
       e_z)``;

    then ``scale * mean_X |P_est^-1 y_est - P_gt^-1 y_gt|`` with ``scale = 0.194`` as DiffPose
    (its comment calls it the pixel spacing; the distance it multiplies is already in mm). The
    lifted point is where the ray from the source through ``X`` meets the detector plane, so the
    value does not depend on the principal point or on binning, only on ``sdd`` and the poses.
    For one point at the isocentre and ``M = sdd / sid``: an estimate shifted by ``d`` parallel to
    the detector gives ``scale (M - 1) d`` (the 2D distance is ``M d``, the 3D one ``d``); a shift
    ``d`` along the beam gives ``scale d`` (2D distance 0, 3D ``d``).

    Args:
        est: ``(B, 6)`` estimated poses.
        gt: ``(B, 6)`` or ``(1, 6)`` ground-truth poses.
        points: ``(N, 3)`` or ``(B, N, 3)`` target points (DeepFluoro's 3D landmarks) in the volume
            frame, mm, in front of the source under both poses.
        camera: the camera that images them (only ``sdd`` and its ``K`` are used).
        scale: the factor applied to the mean distance (DiffPose's 0.194).

    Returns:
        ``(B,)`` values, DiffPose's units (0.194 times mm).
    """
    if not isinstance(camera, Camera):
        raise ProstlabError(f"camera: expected a prostlab.geometry.Camera, got {type(camera)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
            math.isfinite(scale) and scale > 0):
        raise ProstlabError(f"scale: expected a positive finite factor, got {scale!r}")
    e, g = _poses(est, gt)
    batch = max(e.shape[0], g.shape[0])
    x = _points(points, batch, e.device)
    k = camera.intrinsics.to(e.device)
    k_inv = torch.linalg.inv(k)
    shift = torch.tensor([0.0, 0.0, camera.sid], dtype=torch.float64, device=e.device)

    def lifted(pose: Tensor) -> Tensor:
        camera_points = _transform(pose, x) + shift
        uvw = camera_points @ k.T
        uv1 = uvw / uvw[..., 2:]
        detector = camera.sdd * (uv1 @ k_inv.T)
        rotation = so3_exp(pose[:, :3])
        return (detector - pose[:, None, 3:] - shift) @ rotation

    distance = (lifted(e) - lifted(g)).norm(dim=-1).mean(-1)
    return (float(scale) * distance).to(est.dtype)


def success(errors: Tensor, threshold: float = DEFAULT_SUCCESS_THRESHOLD_MM) -> Tensor:
    """``errors < threshold`` (bool, ``(B,)``); by default mTRE below 10 mm.

    A NaN error is not a success.
    """
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise ProstlabError(f"threshold: expected a positive number of mm, got {threshold!r}")
    if not (math.isfinite(threshold) and threshold > 0):
        raise ProstlabError(f"threshold: expected a positive finite number of mm, got {threshold}")
    return errors < threshold


def target_points_from_mask(
    mask: Tensor | np.ndarray,
    spacing: Sequence[float],
    max_points: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Volume-frame centres, in mm, of the voxels of a mask, optionally subsampled.

    Voxel ``(i, j, k)`` of a ``(D, H, W)`` grid has its centre at
    ``((i - (D - 1) / 2) s_D, (j - (H - 1) / 2) s_H, (k - (W - 1) / 2) s_W)``
    (``docs/geometry.md``). When the mask holds more than ``max_points`` voxels, ``max_points``
    of them are drawn without replacement with ``generator`` (seed it for reproducible points).

    Args:
        mask: ``(D, H, W)`` boolean (or 0/1) tensor or array, e.g. ``bone > 0``, as the benchmark does.
        spacing: voxel size in mm, array-axis order ``(s_D, s_H, s_W)``.
        max_points: keep at most this many points; ``None`` keeps all.
        generator: the random generator for the subsampling; required when it subsamples.
        dtype: the floating dtype of the result.

    Returns:
        ``(N, 3)`` points, mm, in index order (the draw's order when subsampled).
    """
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask)
    if m.ndim != 3:
        raise ProstlabError(f"mask: expected a (D, H, W) array, got shape {tuple(m.shape)}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ProstlabError(f"spacing: expected three positive mm values, got {spacing}")
    index = torch.nonzero(m.bool().cpu())
    if index.shape[0] == 0:
        raise ProstlabError("mask: expected at least one voxel set, got an empty mask")
    if max_points is not None:
        if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1:
            raise ProstlabError(f"max_points: expected a positive integer, got {max_points!r}")
        if index.shape[0] > max_points:
            if generator is None:
                raise ProstlabError(
                    "generator: expected a seeded torch.Generator to subsample "
                    f"{index.shape[0]} voxels to max_points = {max_points}"
                )
            keep = torch.randperm(index.shape[0], generator=generator)[:max_points]
            index = index[keep]
    centre = torch.tensor([(n - 1) / 2 for n in m.shape], dtype=torch.float64)
    points = (index.double() - centre) * torch.tensor(spacing, dtype=torch.float64)
    return points.to(dtype)
