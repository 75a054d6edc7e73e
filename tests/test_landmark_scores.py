"""The three landmark scores of a DeepFluoro benchmark row, each on hand-computed cases, and
DiffPose's score against its formula written in the file's own frames.

The scores: prostlab's 3D landmark mTRE (``metrics.mtre``), prostlab's 2D reprojection distance
on the detector plane (``metrics.mean_projection_distance``) and DiffPose's ``Evaluator``
quantity (``metrics.diffpose_mtre``; Gopalakrishnan, Dey & Golland, CVPR 2024).

The hand-computed geometry: ``sdd = 1000``, ``sid = 500`` (magnification ``M = 2``), the ground
truth the identity pose, two landmarks: the isocentre and a point 20 mm off it along x.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prostlab.data import deepfluoro as df
from prostlab.errors import ProstlabError
from prostlab.geometry import Camera
from prostlab.metrics import diffpose_mtre, mean_projection_distance, mtre

CAMERA = Camera(sdd=1000.0, sid=500.0, height=64, width=64, pixel_spacing=(0.5, 0.5),
                principal_point=(20.0, 40.0))
POINTS = torch.tensor([[0.0, 0.0, 0.0], [20.0, 0.0, 0.0]], dtype=torch.float64)
GT = torch.zeros(1, 6, dtype=torch.float64)


def _pose(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float64)


SHIFT_ACROSS = _pose(0, 0, 0, 10.0, 0, 0)  # 10 mm parallel to the detector
SHIFT_ALONG = _pose(0, 0, 0, 0, 0, 30.0)  # 30 mm along the beam
TURN_ABOUT_BEAM = _pose(0, 0, math.pi / 2, 0, 0, 0)  # 90 degrees about the central ray


@pytest.mark.parametrize("est, expected", [
    (SHIFT_ACROSS, 10.0),
    (SHIFT_ALONG, 30.0),
    (TURN_ABOUT_BEAM, 20.0 * math.sqrt(2) / 2),  # the isocentre stays; (20, 0, 0) -> (0, 20, 0)
])
def test_landmark_mtre_by_hand(est, expected):
    assert float(mtre(est, GT, POINTS)[0]) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("est, expected", [
    (SHIFT_ACROSS, 2.0 * 10.0),  # both points move M d = 20 mm on the detector
    (SHIFT_ALONG, 20.0 / 2 * (2.0 - 1000.0 / 530.0)),  # only the off-axis point: 40 -> 37.7 mm
    (TURN_ABOUT_BEAM, 2.0 * 20.0 * math.sqrt(2) / 2),  # (40, 0) -> (0, 40) mm, over 2 points
])
def test_reprojection_distance_on_the_detector_by_hand(est, expected):
    value = mean_projection_distance(est, GT, POINTS, CAMERA)
    assert float(value[0]) == pytest.approx(expected, abs=1e-9)
    isocentre = mean_projection_distance(est, GT, POINTS, CAMERA, plane="isocentre")
    assert float(isocentre[0]) == pytest.approx(expected / 2.0, abs=1e-9)


@pytest.mark.parametrize("est, expected", [
    # a point at depth sid lands M d off on the detector; carried back by its own pose that is
    # (M - 1) d = 10 mm from the ground truth's detector point, for both points
    (SHIFT_ACROSS, 0.194 * 10.0),
    # the isocentre's detector point is the same, carried back 30 mm apart; the off-axis point's
    # lands at x = 20 * 1000 / 530 instead of 40 and is carried back 30 mm along z
    (SHIFT_ALONG, 0.194 * (30.0 + math.hypot(40.0 - 20000.0 / 530.0, 30.0)) / 2),
    # a turn about the central ray turns the detector points with it: DiffPose's score is blind
    # to it, where the 3D mTRE is 14.1 mm and the reprojection distance 28.3 mm
    (TURN_ABOUT_BEAM, 0.0),
])
def test_diffpose_mtre_by_hand(est, expected):
    assert float(diffpose_mtre(est, GT, POINTS, CAMERA)[0]) == pytest.approx(expected, abs=1e-9)
    # the principal point and the binning do not enter it
    binned = Camera(sdd=1000.0, sid=500.0, height=16, width=16, pixel_spacing=(2.0, 2.0))
    assert float(diffpose_mtre(est, GT, POINTS, binned)[0]) == pytest.approx(expected, abs=1e-9)


def _diffpose_in_file_frames(k, extrinsic, t_gt, t_est, points_lps, focal_mm):
    """DiffPose's Evaluator written in DeepFluoro's frames: each landmark projected with K E T^-1,
    lifted to ``-focal K^-1 (u, v, 1)`` in the file's camera frame, carried into the CT by that
    pose's own ``T E^-1``, the mean 3D distance times 0.194."""
    homogeneous = np.concatenate((points_lps, np.ones((len(points_lps), 1))), axis=1)

    def lifted(t):
        camera = (extrinsic @ np.linalg.inv(t) @ homogeneous.T)[:3]
        uvw = k @ camera
        uv1 = uvw / uvw[2]
        on_detector = -focal_mm * (np.linalg.inv(k) @ uv1)
        back = t @ np.linalg.inv(extrinsic) @ np.vstack((on_detector, np.ones(len(points_lps))))
        return back[:3].T

    return 0.194 * np.linalg.norm(lifted(t_est) - lifted(t_gt), axis=1).mean()


@pytest.mark.parametrize("flag", [False, True])
def test_diffpose_mtre_matches_its_formula_in_the_files_frames(flag):
    """DeepFluoro's detector (1536 px of 0.194 mm, negative focal terms, an off-centre principal
    point), a rigid extrinsic and two ground-truth-like poses; the value through prostlab's frames
    (the reader's pose conversion, landmarks in a cube's volume frame, the full or the binned
    detector) equals the formula in the file's frames to 1e-6."""
    rng = np.random.default_rng(3)
    focal = 1020.0 / 0.194
    k = np.array([[-focal, 0.0, 760.25], [0.0, -focal, 771.5], [0.0, 0.0, 1.0]])
    geometry = df.Geometry(k, _rigid(rng, [0.3, -0.2, 0.1], [5.0, -12.0, 40.0]), 1536, 1536,
                           (0.194, 0.194))
    # T = (E^-1 G)^-1 with G putting the CT 620 mm in front of the source (negative z)
    t_gt = _view(rng, geometry.extrinsic, 0.0)
    t_est = _view(rng, geometry.extrinsic, 1.0)
    points_lps = rng.normal([10.0, 20.0, -30.0], 40.0, size=(6, 3))
    vol_to_lps = _rigid(rng, [0.0, 0.0, 0.4], [-3.0, 8.0, 11.0]) @ np.diag([-1.0, -1, 1, 1])
    expected = _diffpose_in_file_frames(k, geometry.extrinsic, t_gt, t_est, points_lps, 1020.0)
    assert expected > 1.0  # the poses differ by a few mm and degrees
    signs = df.camera_signs(k, flag)
    full = df.detector_camera(geometry, signs, 700.0)
    poses = [df.pose_from_file(t, geometry.extrinsic, signs, vol_to_lps, 700.0)[None]
             for t in (t_est, t_gt)]
    points = torch.from_numpy(df.landmarks_in_volume(points_lps, vol_to_lps))
    for camera in (full, df.fitted_camera(full, full.resized(128, 128))):
        value = float(diffpose_mtre(*poses, points, camera)[0])
        assert value == pytest.approx(expected, abs=1e-6, rel=0)


def _rigid(rng, rotvec, translation):
    from scipy.spatial.transform import Rotation

    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_rotvec(np.asarray(rotvec) + rng.normal(0, 0.01, 3)).as_matrix()
    matrix[:3, 3] = translation
    return matrix


def _view(rng, extrinsic, spread):
    """A cam-to-pelvis-vol ``T`` whose camera ``E T^-1`` sees the origin 620 mm away."""
    camera_from_lps = _rigid(rng, [0.1, 2.9, 0.2] + rng.normal(0, 0.03 * spread, 3),
                             [0.0, 0.0, -620.0] + rng.normal(0, 3.0 * spread, 3))
    return np.linalg.inv(np.linalg.inv(extrinsic) @ camera_from_lps)


def test_diffpose_mtre_refusals():
    with pytest.raises(ProstlabError, match=r"camera: expected a prostlab.geometry.Camera"):
        diffpose_mtre(GT, GT, POINTS, None)
    with pytest.raises(ProstlabError, match=r"scale: expected a positive finite factor"):
        diffpose_mtre(GT, GT, POINTS, CAMERA, scale=0.0)
    with pytest.raises(ProstlabError, match=r"points: expected shape"):
        diffpose_mtre(GT, GT, POINTS[:, :2], CAMERA)
