"""Tests of prostlab.metrics against hand-computed values and torchmetrics' accumulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prostlab.errors import ProstlabError
from prostlab.geometry import Camera
from prostlab.metrics import (
    MeanProjectionDistance,
    MeanTargetRegistrationError,
    RotationError,
    SuccessRate,
    TranslationError,
    mean_projection_distance,
    mtre,
    rotation_error,
    success,
    target_points_from_mask,
    translation_error,
)

F64 = torch.float64
CAMERA = Camera(sdd=1020.0, sid=620.0, height=128, width=128, pixel_spacing=(2.92, 2.92))


def pose(rx=0.0, ry=0.0, rz=0.0, tx=0.0, ty=0.0, tz=0.0) -> torch.Tensor:
    return torch.tensor([[rx, ry, rz, tx, ty, tz]], dtype=F64)


def random_poses(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat(
        (0.2 * torch.randn(n, 3, generator=g), 10 * torch.randn(n, 3, generator=g)), -1
    )


POINTS = torch.tensor([[10.0, 0.0, 0.0], [0.0, 20.0, 0.0], [0.0, 0.0, -30.0], [5.0, 5.0, 5.0]])


def test_identity_gives_zero_errors():
    p = random_poses(5, 0)
    assert torch.all(rotation_error(p, p) < 1e-3)  # float32 rounding of the angle, degrees
    assert torch.all(translation_error(p, p) == 0)
    assert torch.all(mtre(p, p, POINTS) == 0)
    assert torch.all(mean_projection_distance(p, p, POINTS, CAMERA) == 0)


def test_pure_translation():
    gt = pose(0.1, -0.2, 0.3, 1.0, 2.0, 3.0)
    est = gt.clone()
    est[0, 3:] += torch.tensor([3.0, 4.0, 0.0], dtype=F64)
    assert rotation_error(est, gt).item() == pytest.approx(0.0, abs=1e-9)
    assert translation_error(est, gt).item() == pytest.approx(5.0)
    assert mtre(est, gt, POINTS).item() == pytest.approx(5.0)  # every point moves by t


def test_known_rotation_angle_and_mtre():
    angle = math.radians(7.0)
    gt = pose()
    est = pose(rz=angle)
    assert rotation_error(est, gt).item() == pytest.approx(7.0)
    assert rotation_error(gt, est).item() == pytest.approx(7.0)
    # A rotation by theta about z moves a point at distance rho from the axis by 2 rho sin(theta/2).
    chord = 2 * math.sin(angle / 2)
    expected = (10 * chord + 20 * chord + 0.0 + math.hypot(5, 5) * chord) / 4
    assert mtre(est, gt, POINTS).item() == pytest.approx(expected, rel=1e-9)
    # The rotation about the volume centre does not move it.
    assert translation_error(est, gt).item() == 0.0


def test_rotation_error_is_geodesic_not_vector_difference():
    # Rotations of +170 and -170 degrees about x are 20 degrees apart.
    a = pose(rx=math.radians(170))
    b = pose(rx=math.radians(-170))
    assert rotation_error(a, b).item() == pytest.approx(20.0, abs=1e-9)


def test_batched_points_and_broadcast_gt():
    est = random_poses(3, 1).double()
    gt = pose()
    points = torch.stack([POINTS, 2 * POINTS, 3 * POINTS]).double()
    batched = mtre(est, gt, points)
    one_by_one = torch.cat([mtre(est[i : i + 1], gt, points[i]) for i in range(3)])
    torch.testing.assert_close(batched, one_by_one)


def test_mpd_matches_a_manual_projection():
    gt = pose(tx=5.0)
    est = pose(ry=0.05, tx=-3.0, ty=4.0)
    K = CAMERA.intrinsics
    manual = []
    for x in POINTS.double():
        pixels = []
        for p in (est, gt):
            E = CAMERA.extrinsics(p)[0]
            uvw = K @ (E @ torch.cat((x, torch.ones(1, dtype=F64))))
            pixels.append(uvw[:2] / uvw[2])
        manual.append(((pixels[0] - pixels[1]) * 2.92).norm())
    expected = torch.stack(manual).mean()
    got = mean_projection_distance(est, gt, POINTS, CAMERA)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    at_iso = mean_projection_distance(est, gt, POINTS, CAMERA, plane="isocentre")
    assert at_iso.item() == pytest.approx(expected.item() * 620 / 1020, rel=1e-12)


def test_mpd_of_an_in_plane_translation_is_magnified():
    # A translation parallel to the detector of a point at the isocentre's depth moves its
    # projection by the magnification sdd / sid times the translation.
    points = torch.tensor([[0.0, 0.0, 0.0]])
    got = mean_projection_distance(pose(tx=10.0), pose(), points, CAMERA)
    assert got.item() == pytest.approx(10.0 * 1020 / 620, rel=1e-12)


def test_success_threshold():
    errors = torch.tensor([0.5, 9.99, 10.0, 25.0, float("nan")])
    assert success(errors).tolist() == [True, True, False, False, False]
    assert success(errors, threshold=1.0).tolist() == [True, False, False, False, False]
    with pytest.raises(ProstlabError, match="threshold"):
        success(errors, threshold=0.0)


def test_success_rate_metric():
    gt = pose().repeat(4, 1)
    est = gt.clone()
    est[:, 3] = torch.tensor([1.0, 5.0, 12.0, 30.0])  # mTRE = |t|
    metric = SuccessRate()
    metric.update(est, gt, POINTS)
    assert metric.compute().item() == pytest.approx(0.5)
    strict = SuccessRate(threshold=2.0)
    strict.update(est, gt, POINTS)
    assert strict.compute().item() == pytest.approx(0.25)


def _metrics():
    return [
        (RotationError(), False),
        (TranslationError(), False),
        (MeanTargetRegistrationError(), True),
        (MeanProjectionDistance(CAMERA), True),
        (SuccessRate(threshold=15.0), True),
    ]


def test_accumulation_over_updates_equals_one_update():
    est, gt = random_poses(12, 2), random_poses(12, 3)
    for (split, needs_points), (whole, _) in zip(_metrics(), _metrics(), strict=True):
        args = (POINTS,) if needs_points else ()
        for chunk in (slice(0, 5), slice(5, 6), slice(6, 12)):
            split.update(est[chunk], gt[chunk], *args)
        whole.update(est, gt, *args)
        torch.testing.assert_close(split.compute(), whole.compute())


def test_state_merge_as_under_ddp():
    """Two processes' states reduced with their dist_reduce_fx give the one-process result."""
    est, gt = random_poses(10, 4), random_poses(10, 5)
    for (rank0, needs_points), (rank1, _), (whole, _) in zip(
        _metrics(), _metrics(), _metrics(), strict=True
    ):
        args = (POINTS,) if needs_points else ()
        rank0.update(est[:4], gt[:4], *args)
        rank1.update(est[4:], gt[4:], *args)
        whole.update(est, gt, *args)
        assert set(rank0._reductions) == set(rank0._defaults)
        for name in rank0._defaults:
            reduce = rank0._reductions[name]
            assert reduce is not None, f"{type(rank0).__name__}.{name} has no dist_reduce_fx"
            merged = reduce(torch.stack([getattr(rank0, name), getattr(rank1, name)]))
            setattr(rank0, name, merged)
        torch.testing.assert_close(rank0.compute(), whole.compute())


def test_target_points_from_mask_voxel_centres():
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[0, 0, 0] = True
    mask[2, 3, 4] = True
    mask[1, 1, 2] = True
    points = target_points_from_mask(mask, (1.0, 2.0, 3.0))
    expected = torch.tensor(
        [[-1.0, -3.0, -6.0], [0.0, -1.0, 0.0], [1.0, 3.0, 6.0]], dtype=F64
    )  # (i - (D-1)/2) s_D, ...
    torch.testing.assert_close(points, expected)


def test_target_points_subsampling_is_seeded():
    mask = torch.rand(10, 10, 10, generator=torch.Generator().manual_seed(0)) > 0.5
    a = target_points_from_mask(mask, (1, 1, 1), 50, torch.Generator().manual_seed(3))
    b = target_points_from_mask(mask, (1, 1, 1), 50, torch.Generator().manual_seed(3))
    c = target_points_from_mask(mask, (1, 1, 1), 50, torch.Generator().manual_seed(4))
    assert a.shape == (50, 3)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    everything = target_points_from_mask(mask, (1, 1, 1))
    assert everything.shape == (int(mask.sum()), 3)
    # Every drawn point is a voxel centre of the mask.
    assert a[:, None].eq(everything[None]).all(-1).any(-1).all()


def test_target_points_errors():
    with pytest.raises(ProstlabError, match="mask"):
        target_points_from_mask(np.zeros((3, 3, 3), bool), (1, 1, 1))
    with pytest.raises(ProstlabError, match="mask"):
        target_points_from_mask(np.ones((3, 3), bool), (1, 1, 1))
    with pytest.raises(ProstlabError, match="spacing"):
        target_points_from_mask(np.ones((3, 3, 3), bool), (1, 0, 1))
    with pytest.raises(ProstlabError, match="generator"):
        target_points_from_mask(np.ones((3, 3, 3), bool), (1, 1, 1), max_points=5)


def test_metric_input_errors():
    with pytest.raises(ProstlabError, match="points"):
        mtre(pose(), pose(), torch.zeros(4, 2))
    with pytest.raises(ProstlabError, match="est"):
        rotation_error(torch.zeros(2, 5), pose())
    with pytest.raises(ProstlabError, match="gt"):
        translation_error(random_poses(3, 0), random_poses(2, 0))
    with pytest.raises(ProstlabError, match="plane"):
        mean_projection_distance(pose(), pose(), POINTS, CAMERA, plane="film")


def test_mtre_points_are_the_bone_voxels_as_the_docs_say(example_dir):
    """The benchmark's mTRE targets are ``bone > 0`` (not ``labels > 0``), and the docs say so."""
    from pathlib import Path

    from prostlab.data import load_prepared
    from prostlab.lightning.volume_bank import VolumeBank

    prepared = load_prepared(example_dir)
    bone = prepared.bone.data[0] > 0
    labels = torch.as_tensor(prepared.labels) > 0
    assert int(bone.sum()) != int((bone & labels).sum())  # the two choices differ on this CT
    points = VolumeBank([prepared], max_points=10**7)[0].points  # all of them, in index order
    expected = target_points_from_mask(bone, prepared.ct.spacing, dtype=torch.float32)
    torch.testing.assert_close(points, expected)
    docs = (Path(__file__).resolve().parents[1] / "docs" / "benchmark.md").read_text()
    assert "target_points_from_mask(bone > 0" in docs
    assert "target_points_from_mask(labels > 0" not in docs
