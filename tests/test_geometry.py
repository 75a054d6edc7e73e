"""Tests of prostlab.geometry against independent facts: scipy's rotations, torch's matrix
exponential, finite differences, and the worked example of docs/geometry.md."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from prostlab.errors import ProstlabError
from prostlab.geometry import (
    Camera,
    check_pose,
    compose,
    euler_to_pose,
    geodesic_angle,
    geodesic_distance,
    geodesic_gradient,
    hat,
    inverse,
    matrix_to_pose,
    perturb,
    pose_to_euler,
    pose_to_matrix,
    rotation_angle,
    se3_exp,
    se3_log,
    so3_exp,
    so3_left_jacobian,
    so3_left_jacobian_inverse,
    so3_log,
    vee,
)
from prostlab.geometry.checks import check_same_device, check_weights_device

F64 = torch.float64
DOCS = Path(__file__).resolve().parents[1] / "docs" / "geometry.md"
SEQUENCES = ["".join(s) for s in itertools.product("xyz", repeat=3) if s[0] != s[1] != s[2]]
CONVENTIONS = SEQUENCES + [s.upper() for s in SEQUENCES]


def rotvecs_with_angles(angles, seed: int = 0) -> torch.Tensor:
    """Rotation vectors with the given angles about random axes, float64, (N, 3)."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.randn(len(angles), 3, generator=g, dtype=F64)
    axes = axes / axes.norm(dim=-1, keepdim=True)
    return axes * torch.as_tensor(angles, dtype=F64)[:, None]


def random_poses(n: int, seed: int = 0, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    omega = rotvecs_with_angles(torch.rand(n, generator=g, dtype=F64) * 3.0, seed + 1)
    t = 50.0 * torch.randn(n, 3, generator=g, dtype=F64)
    return torch.cat((omega, t), dim=-1).to(dtype)


# Angles that probe every branch and threshold of the series/closed forms, incl. exactly 0 and pi.
SPECIAL_ANGLES = [
    0.0, 1e-12, 1e-8, 1e-5, 9.99e-3, 1.001e-2, 0.0999, 0.1001, 0.316, 0.317, 0.5, 1.0,
    2 * math.pi / 3 - 1e-9, 2 * math.pi / 3 + 1e-9, 2.5, math.pi - 1e-3, math.pi - 1e-6,
    math.pi - 1e-9, math.pi,
]  # fmt: skip


# ----------------------------------------------------------------------------------- so(3)


def test_hat_is_the_cross_product_and_vee_inverts_it():
    g = torch.Generator().manual_seed(1)
    w, v = torch.randn(2, 10, 3, generator=g, dtype=F64)
    torch.testing.assert_close((hat(w) @ v[..., None])[..., 0], torch.linalg.cross(w, v))
    torch.testing.assert_close(vee(hat(w)), w)
    assert torch.equal(hat(w).transpose(-1, -2), -hat(w))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
def test_so3_exp_matches_scipy_and_matrix_exp(dtype, tol):
    g = torch.Generator().manual_seed(3)
    omega = torch.cat(
        (rotvecs_with_angles(SPECIAL_ANGLES), 2.0 * torch.randn(50, 3, generator=g, dtype=F64))
    )
    expected = torch.as_tensor(Rotation.from_rotvec(omega.numpy()).as_matrix())
    got = so3_exp(omega.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=0)
    torch.testing.assert_close(
        so3_exp(omega), torch.linalg.matrix_exp(hat(omega)), atol=1e-13, rtol=0
    )


def test_so3_exp_keeps_leading_dimensions():
    omega = rotvecs_with_angles(torch.linspace(0, 3, 10)).reshape(2, 5, 3)
    assert so3_exp(omega).shape == (2, 5, 3, 3)
    assert so3_log(so3_exp(omega)).shape == (2, 5, 3)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_so3_log_matches_scipy(dtype, tol):
    angles = [a for a in SPECIAL_ANGLES if a < math.pi - 1e-7]
    rotations = Rotation.from_rotvec(rotvecs_with_angles(angles).numpy())
    rotations = Rotation.concatenate([rotations, Rotation.random(100, random_state=3)])
    matrices = torch.as_tensor(rotations.as_matrix()).to(dtype)
    got = so3_log(matrices)
    assert got.dtype == dtype
    expected = torch.as_tensor(rotations.as_rotvec())
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=0)


def test_so3_log_at_exactly_pi_and_near_it():
    axes = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, -2, 3], [-1, -1, -1]])
    axes = (axes / axes.norm(dim=-1, keepdim=True)).to(F64)
    for angle in (math.pi, math.pi - 1e-10, math.pi - 1e-4):
        matrices = so3_exp(angle * axes)
        omega = so3_log(matrices)
        torch.testing.assert_close(omega.norm(dim=-1), torch.full((6,), angle, dtype=F64))
        torch.testing.assert_close(so3_exp(omega), matrices, atol=1e-14, rtol=0)
        # Up to the sign ambiguity at pi, the axis is the one we built, and scipy's.
        cos = (omega / omega.norm(dim=-1, keepdim=True) * axes).sum(-1).abs()
        torch.testing.assert_close(cos, torch.ones(6, dtype=F64))
        scipy = torch.as_tensor(Rotation.from_matrix(matrices.numpy()).as_rotvec())
        sign = torch.sign((scipy * omega).sum(-1, keepdim=True))
        torch.testing.assert_close(sign * omega, scipy, atol=1e-7, rtol=0)
    # The 180 degree rotation about x, written out, returns (pi, 0, 0) exactly in sign.
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=F64))
    torch.testing.assert_close(so3_log(flip), torch.tensor([math.pi, 0.0, 0.0], dtype=F64))


def test_so3_exp_log_round_trips():
    omega = rotvecs_with_angles(torch.linspace(0.0, math.pi - 1e-6, 200), seed=5)
    torch.testing.assert_close(so3_log(so3_exp(omega)), omega, atol=1e-12, rtol=0)
    rotations = torch.as_tensor(Rotation.random(100, random_state=7).as_matrix())
    torch.testing.assert_close(so3_exp(so3_log(rotations)), rotations, atol=1e-14, rtol=0)


def test_rotation_angle_matches_scipy_and_is_symmetric():
    rotations = Rotation.from_rotvec(rotvecs_with_angles(SPECIAL_ANGLES).numpy())
    matrices = torch.as_tensor(rotations.as_matrix())
    torch.testing.assert_close(
        rotation_angle(matrices), torch.as_tensor(rotations.magnitude()), atol=1e-14, rtol=0
    )
    r_a = torch.as_tensor(Rotation.random(20, random_state=1).as_matrix())
    r_b = torch.as_tensor(Rotation.random(20, random_state=2).as_matrix())
    torch.testing.assert_close(geodesic_angle(r_a, r_b), geodesic_angle(r_b, r_a))
    # acos loses half the digits near 0; atan2 keeps them.
    tiny = so3_exp(torch.tensor([[1e-9, 0.0, 0.0]], dtype=F64))
    torch.testing.assert_close(rotation_angle(tiny), torch.tensor([1e-9], dtype=F64))


# Inside the series branches, across their thresholds (0.01, 0.1, 2 pi / 3), and in between.
@pytest.mark.parametrize("angle", [1e-3, 0.01, 0.05, 0.1, 0.7, 2 * math.pi / 3, 2.9])
def test_so3_exp_log_gradcheck(angle):
    omega = rotvecs_with_angles([angle, angle], seed=11).requires_grad_()
    torch.autograd.gradcheck(so3_exp, (omega,))
    torch.autograd.gradgradcheck(so3_exp, (omega,))
    # On the rotations, at the angle itself and after a further rotation.
    other = so3_exp(rotvecs_with_angles([0.4, 0.4], seed=12))
    for fn in (lambda w: so3_log(so3_exp(w)), lambda w: so3_log(so3_exp(w) @ other)):
        torch.autograd.gradcheck(fn, (omega,))
        torch.autograd.gradgradcheck(fn, (omega,))
    if abs(angle - 2 * math.pi / 3) > 1e-3:
        # On raw 3x3 entries (off the rotations), the branch near pi and the generic one have
        # different derivatives: only check away from their switch.
        matrix = so3_exp(omega.detach()).requires_grad_()
        torch.autograd.gradcheck(so3_log, (matrix,))
        torch.autograd.gradgradcheck(so3_log, (matrix,))


def test_log_of_exp_has_identity_jacobian_and_zero_hessian():
    for angle in (0.0, 1e-6, 0.01, 0.05, 0.1, 1.0, 2 * math.pi / 3, 3.0):
        omega = rotvecs_with_angles([angle], seed=2)[0]
        jac = torch.autograd.functional.jacobian(lambda w: so3_log(so3_exp(w)), omega)
        torch.testing.assert_close(jac, torch.eye(3, dtype=F64), atol=1e-9, rtol=0)
        hess = torch.autograd.functional.hessian(lambda w: so3_log(so3_exp(w)).sum(), omega)
        torch.testing.assert_close(hess, torch.zeros(3, 3, dtype=F64), atol=1e-7, rtol=0)


def test_gradients_are_finite_at_the_identity_and_at_pi():
    for angle in (0.0, math.pi):
        omega = rotvecs_with_angles([angle], seed=4).requires_grad_()
        so3_exp(omega).sum().backward()
        assert torch.isfinite(omega.grad).all()
        matrix = so3_exp(omega.detach()).requires_grad_()
        (so3_log(matrix).sum() + rotation_angle(matrix).sum()).backward()
        assert torch.isfinite(matrix.grad).all()


def test_left_jacobian_and_its_inverse():
    omega = rotvecs_with_angles(SPECIAL_ANGLES, seed=8)
    eye = torch.eye(3, dtype=F64).expand(len(SPECIAL_ANGLES), 3, 3)
    jac = so3_left_jacobian(omega)
    torch.testing.assert_close(jac @ so3_left_jacobian_inverse(omega), eye, atol=1e-12, rtol=0)
    # exp(w + e) = exp(J(w) e) exp(w) to first order in e.
    w = rotvecs_with_angles([1.3], seed=9)
    e = 1e-6 * torch.tensor([[0.3, -0.5, 0.8]], dtype=F64)
    lhs = so3_log(so3_exp(w + e) @ so3_exp(w).transpose(-1, -2))
    torch.testing.assert_close(
        lhs, (so3_left_jacobian(w) @ e[..., None])[..., 0], atol=1e-11, rtol=0
    )


# ----------------------------------------------------------------------------------- SE(3)


def test_pose_matrix_round_trip_and_layout():
    poses = random_poses(50)
    matrices = pose_to_matrix(poses)
    assert matrices.shape == (50, 4, 4)
    torch.testing.assert_close(
        matrices[:, 3], torch.tensor([0.0, 0, 0, 1], dtype=F64).expand(50, 4)
    )
    torch.testing.assert_close(matrices[:, :3, 3], poses[:, 3:])
    torch.testing.assert_close(matrix_to_pose(matrices), poses, atol=1e-11, rtol=0)
    assert pose_to_matrix(poses.float()).dtype == torch.float32


def test_compose_is_the_matrix_product():
    a, b, c = random_poses(20, 1), random_poses(20, 2), random_poses(20, 3)
    ab = compose(a, b)
    torch.testing.assert_close(pose_to_matrix(ab), pose_to_matrix(a) @ pose_to_matrix(b))
    torch.testing.assert_close(
        pose_to_matrix(compose(compose(a, b), c)), pose_to_matrix(compose(a, compose(b, c)))
    )
    identity = torch.zeros(1, 6, dtype=F64)
    torch.testing.assert_close(compose(identity, a), a, atol=1e-11, rtol=0)
    torch.testing.assert_close(compose(a, identity), a, atol=1e-11, rtol=0)


def test_inverse():
    a = random_poses(20, 4)
    identity = torch.zeros(20, 6, dtype=F64)
    torch.testing.assert_close(compose(a, inverse(a)), identity, atol=1e-11, rtol=0)
    torch.testing.assert_close(compose(inverse(a), a), identity, atol=1e-11, rtol=0)
    torch.testing.assert_close(pose_to_matrix(inverse(a)), torch.linalg.inv(pose_to_matrix(a)))
    torch.testing.assert_close(inverse(inverse(a)), a)


def twist_matrix(xi: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(xi.shape[0], 4, 4, dtype=xi.dtype)
    out[:, :3, :3] = hat(xi[:, :3])
    out[:, :3, 3] = xi[:, 3:]
    return out


def test_se3_exp_is_the_matrix_exponential_and_log_inverts_it():
    xi = random_poses(30, 5)
    xi[:3, :3] = rotvecs_with_angles([0.0, 1e-7, 0.05], seed=6)
    torch.testing.assert_close(
        se3_exp(xi), torch.linalg.matrix_exp(twist_matrix(xi)), atol=1e-11, rtol=1e-12
    )
    torch.testing.assert_close(se3_log(se3_exp(xi)), xi, atol=1e-10, rtol=0)
    # A twist's v is not the pose's t unless the rotation vanishes.
    pose = matrix_to_pose(se3_exp(xi))
    torch.testing.assert_close(pose[:, :3], xi[:, :3], atol=1e-12, rtol=0)
    assert not torch.allclose(pose[3:, 3:], xi[3:, 3:])
    pure = xi.clone()
    pure[:, :3] = 0.0
    torch.testing.assert_close(matrix_to_pose(se3_exp(pure)), pure)


def test_pose_functions_broadcast_a_batch_of_one():
    a, b = random_poses(1, 1), random_poses(5, 2)
    torch.testing.assert_close(compose(a, b), compose(a.expand(5, 6), b))
    assert geodesic_distance(a, b).shape == (5,)


# ----------------------------------------------------------------------------------- Euler


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_euler_matches_scipy(convention):
    g = torch.Generator().manual_seed(13)
    rotations = Rotation.random(100, random_state=12)
    expected = torch.as_tensor(rotations.as_euler(convention))
    translation = torch.randn(100, 3, generator=g, dtype=F64)
    pose = torch.cat((torch.as_tensor(rotations.as_rotvec()), translation), dim=-1)
    angles, got_translation = pose_to_euler(pose, convention)
    torch.testing.assert_close(angles, expected, atol=1e-12, rtol=0)
    assert torch.equal(got_translation, translation)
    back = euler_to_pose(expected, translation, convention)
    torch.testing.assert_close(so3_exp(back[:, :3]), torch.as_tensor(rotations.as_matrix()))
    torch.testing.assert_close(back[:, 3:], translation)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_euler_round_trips_near_zero_and_pi(convention):
    omega = rotvecs_with_angles(SPECIAL_ANGLES, seed=14)
    pose = torch.cat((omega, torch.zeros_like(omega)), dim=-1)
    angles, translation = pose_to_euler(pose, convention)
    back = euler_to_pose(angles, translation, convention)
    torch.testing.assert_close(so3_exp(back[:, :3]), so3_exp(omega), atol=1e-13, rtol=0)
    reference = Rotation.from_euler(convention, angles.numpy()).as_matrix()
    torch.testing.assert_close(so3_exp(omega), torch.as_tensor(reference), atol=1e-13, rtol=0)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_euler_gimbal_lock_reproduces_the_rotation(convention):
    proper = convention[0].lower() == convention[2].lower()
    middles = (0.0, math.pi) if proper else (math.pi / 2, -math.pi / 2)
    angles = torch.tensor([[0.7, m, -0.4] for m in middles], dtype=F64)
    zero = torch.zeros(2, 3, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about the lock
        rotation = Rotation.from_euler(convention, angles.numpy())
        expected = rotation.as_euler(convention)
    for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-5)):
        got, _ = pose_to_euler(euler_to_pose(angles, zero, convention).to(dtype), convention)
        again = euler_to_pose(got.double(), zero, convention)
        torch.testing.assert_close(
            so3_exp(again[:, :3]), torch.as_tensor(rotation.as_matrix()), atol=tol, rtol=0
        )
        if dtype == F64:  # the same choice as scipy: the third angle is 0
            torch.testing.assert_close(got, torch.as_tensor(expected), atol=1e-9, rtol=0)


def test_euler_extrinsic_is_intrinsic_reversed():
    angles = torch.tensor([[0.3, -0.2, 1.1]], dtype=F64)
    zero = torch.zeros(1, 3, dtype=F64)
    torch.testing.assert_close(
        euler_to_pose(angles, zero, "xyz"), euler_to_pose(angles.flip(-1), zero, "ZYX")
    )


@pytest.mark.parametrize("bad", ["xxy", "xyZ", "abc", "xy", "XYZW", 3, "xYz"])
def test_euler_rejects_bad_conventions(bad):
    with pytest.raises(ValueError, match="convention"):
        euler_to_pose(torch.zeros(1, 3), torch.zeros(1, 3), bad)


# ----------------------------------------------------------------------------------- geodesic


def test_geodesic_distance_known_values():
    zero = torch.zeros(1, 6, dtype=F64)
    roll = torch.tensor([[0.0, 0.0, 0.3, 0.0, 0.0, 0.0]], dtype=F64)
    shift = torch.tensor([[0.0, 0.0, 0.0, 3.0, 4.0, 0.0]], dtype=F64)
    both = roll + shift
    torch.testing.assert_close(geodesic_distance(zero, roll), torch.tensor([0.3], dtype=F64))
    torch.testing.assert_close(geodesic_distance(zero, shift), torch.tensor([5.0], dtype=F64))
    torch.testing.assert_close(
        geodesic_distance(zero, both, rot_weight=4.0, trans_weight=0.25, squared=True),
        torch.tensor([4.0 * 0.09 + 0.25 * 25.0], dtype=F64),
    )
    half_turn = torch.tensor([[math.pi, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(
        geodesic_distance(zero, half_turn), torch.tensor([math.pi], dtype=F64)
    )
    assert geodesic_distance(both, both).item() == 0.0


def test_geodesic_distance_symmetry_and_left_invariance():
    a, b, c = random_poses(20, 1), random_poses(20, 2), random_poses(20, 3)
    kwargs = {"rot_weight": 2.0, "trans_weight": 0.01}
    d_ab = geodesic_distance(a, b, **kwargs)
    torch.testing.assert_close(d_ab, geodesic_distance(b, a, **kwargs))
    torch.testing.assert_close(d_ab, geodesic_distance(compose(c, a), compose(c, b), **kwargs))
    # The translation part is the plain Euclidean distance; the rotation part the angle.
    rot = geodesic_distance(a, b, trans_weight=0.0)
    angle = geodesic_angle(so3_exp(a[:, :3]), so3_exp(b[:, :3]))
    torch.testing.assert_close(rot, angle)


def test_geodesic_distance_of_a_perturbation_is_the_metric_norm():
    pose = random_poses(20, 6)
    delta = random_poses(20, 7) * 0.5
    w_r, w_t = 3.0, 0.2
    expected = w_r * (delta[:, :3] ** 2).sum(-1) + w_t * (delta[:, 3:] ** 2).sum(-1)
    got = geodesic_distance(pose, perturb(pose, delta), w_r, w_t, squared=True)
    torch.testing.assert_close(got, expected)


def test_perturb_right_multiplies_the_rotation():
    pose, delta = random_poses(10, 1), random_poses(10, 2) * 0.3
    moved = perturb(pose, delta)
    torch.testing.assert_close(so3_exp(moved[:, :3]), so3_exp(pose[:, :3]) @ so3_exp(delta[:, :3]))
    torch.testing.assert_close(moved[:, 3:], pose[:, 3:] + delta[:, 3:])


def squared_distance_after_perturbation(current, target, delta, w_r, w_t):
    return geodesic_distance(perturb(current, delta), target, w_r, w_t, squared=True)


@pytest.mark.parametrize("w_r,w_t", [(1.0, 1.0), (5.0, 0.01)])
def test_geodesic_gradient_by_finite_differences(w_r, w_t):
    current, target = random_poses(8, 21), random_poses(8, 22)
    target[0] = current[0]  # gradient 0 at the target
    target[1, :3] = current[1, :3] + 1e-4  # a small rotation away
    grad = geodesic_gradient(current, target, w_r, w_t)
    h = 1e-4  # d^2 is ~1e4 mm^2 here: a smaller step drowns in its rounding
    fd = torch.zeros_like(grad)
    for i in range(6):
        step = torch.zeros_like(current)
        step[:, i] = h
        plus = squared_distance_after_perturbation(current, target, step, w_r, w_t)
        minus = squared_distance_after_perturbation(current, target, -step, w_r, w_t)
        fd[:, i] = (plus - minus) / (2 * h)
    torch.testing.assert_close(grad, fd, atol=1e-6, rtol=1e-6)
    # Autograd through perturb at delta = 0 agrees exactly.
    delta = torch.zeros_like(current, requires_grad=True)
    squared_distance_after_perturbation(current, target, delta, w_r, w_t).sum().backward()
    torch.testing.assert_close(delta.grad, grad, atol=1e-10, rtol=1e-10)
    # The rotation part is -2 w_r log(R^T R_target), the translation part 2 w_t (t - t_target).
    relative = so3_exp(current[:, :3]).transpose(-1, -2) @ so3_exp(target[:, :3])
    torch.testing.assert_close(grad[:, :3], -2 * w_r * so3_log(relative))
    torch.testing.assert_close(grad[:, 3:], 2 * w_t * (current[:, 3:] - target[:, 3:]))


def test_riemannian_gradient_is_the_euclidean_one_over_the_weights():
    current, target = random_poses(8, 31), random_poses(8, 32)
    euclid = geodesic_gradient(current, target, 5.0, 0.01)
    riem = geodesic_gradient(current, target, 5.0, 0.01, riemannian=True)
    torch.testing.assert_close(riem[:, :3], euclid[:, :3] / 5.0)
    torch.testing.assert_close(riem[:, 3:], euclid[:, 3:] / 0.01)
    torch.testing.assert_close(riem, geodesic_gradient(current, target, riemannian=True))
    with pytest.raises(ValueError, match="trans_weight"):
        geodesic_gradient(current, target, 1.0, 0.0, riemannian=True)


def test_geodesic_gradient_steps_towards_the_target():
    current, target = random_poses(8, 41), random_poses(8, 42)
    grad = geodesic_gradient(current, target, riemannian=True)
    stepped = perturb(current, -0.5 * 0.5 * grad)  # half way along the geodesic
    torch.testing.assert_close(
        geodesic_distance(stepped, target), 0.5 * geodesic_distance(current, target)
    )


def test_pose_vector_gradient_is_the_right_jacobian_transpose_times_the_body_gradient():
    current, target = random_poses(4, 51), random_poses(4, 52)
    pose = current.clone().requires_grad_()
    geodesic_distance(pose, target, squared=True).sum().backward()
    body = geodesic_gradient(current, target)
    right_jac_t = so3_left_jacobian(-current[:, :3]).transpose(-1, -2)
    torch.testing.assert_close(pose.grad[:, :3], (right_jac_t @ body[:, :3, None])[..., 0])


def test_geodesic_functions_double_backward():
    current = random_poses(2, 61).requires_grad_()
    target = random_poses(2, 62)
    torch.autograd.gradgradcheck(
        lambda p: geodesic_distance(p, target, 2.0, 0.5, squared=True), (current,)
    )
    torch.autograd.gradcheck(lambda p: geodesic_gradient(p, target, 2.0, 0.5), (current,))
    torch.autograd.gradgradcheck(lambda p: compose(p, target), (current,))


# ----------------------------------------------------------------------------------- camera


def pelvis_camera(**kwargs) -> Camera:
    values = {"sdd": 1020.0, "sid": 620.0, "height": 128, "width": 128}
    values["pixel_spacing"] = (2.92, 2.92)
    return Camera(**(values | kwargs))


def test_camera_defaults_and_intrinsics():
    camera = pelvis_camera()
    assert (camera.cx, camera.cy) == (63.5, 63.5)
    assert camera.magnification == pytest.approx(1020 / 620)
    K = camera.intrinsics
    assert K.dtype == F64 and K.shape == (3, 3)
    expected = [[1020 / 2.92, 0, 63.5], [0, 1020 / 2.92, 63.5], [0, 0, 1]]
    torch.testing.assert_close(K, torch.tensor(expected, dtype=F64))
    odd = Camera(sdd=1000, sid=500, height=5, width=8, pixel_spacing=[0.5, 0.25])
    assert (odd.cx, odd.cy) == (3.5, 2.0)
    assert odd.pixel_spacing == (0.5, 0.25) and isinstance(odd.sdd, float)
    assert odd.focal_lengths == (4000.0, 2000.0)


@pytest.mark.parametrize(
    "kwargs,field,error",
    [
        ({"sdd": 0.0}, "sdd", ValueError),
        ({"sdd": "1020"}, "sdd", ProstlabError),
        ({"sid": -1.0}, "sid", ValueError),
        ({"sid": 1020.0}, "sid", ValueError),
        ({"sid": 2000.0}, "sid", ValueError),
        ({"sid": float("nan")}, "sid", ValueError),
        ({"height": 0}, "height", ValueError),
        ({"height": 12.5}, "height", ProstlabError),
        ({"width": True}, "width", ProstlabError),
        ({"pixel_spacing": (2.92,)}, "pixel_spacing", ValueError),
        ({"pixel_spacing": (2.92, 0.0)}, "pixel_spacing", ValueError),
        ({"pixel_spacing": "ab"}, "pixel_spacing", ValueError),
        ({"principal_point": (1.0, float("inf"))}, "principal_point", ValueError),
        ({"principal_point": 3.0}, "principal_point", ValueError),
    ],
)
def test_camera_validation_names_the_field(kwargs, field, error):
    with pytest.raises(error, match=f"^{field}:"):
        pelvis_camera(**kwargs)


def test_camera_is_frozen_and_hashable():
    camera = pelvis_camera()
    with pytest.raises(dataclasses.FrozenInstanceError):
        camera.sdd = 1.0  # type: ignore[misc]
    assert hash(camera) == hash(pelvis_camera())


@pytest.mark.parametrize("principal_point", [None, (60.25, 70.5)])
def test_intrinsics_round_trip(principal_point):
    camera = pelvis_camera(principal_point=principal_point, pixel_spacing=(2.5, 2.92))
    K = camera.intrinsics
    for extra in ({"sdd": camera.sdd}, {"pixel_spacing": camera.pixel_spacing}):
        again = Camera.from_intrinsics(K, camera.height, camera.width, camera.sid, **extra)
        assert again.principal_point == camera.principal_point
        assert again.sdd == pytest.approx(camera.sdd, rel=1e-14)
        assert again.pixel_spacing == pytest.approx(camera.pixel_spacing, rel=1e-14)
        torch.testing.assert_close(again.intrinsics, K, atol=0, rtol=1e-14)
    # Any array-like K will do.
    from_list = Camera.from_intrinsics(K.tolist(), 128, 128, 620.0, sdd=1020.0)
    from_numpy = Camera.from_intrinsics(K.numpy(), 128, 128, 620.0, sdd=1020.0)
    assert from_list == from_numpy


@pytest.mark.parametrize(
    "entry,value,message",
    [
        ((0, 1), 0.5, "zero skew"),
        ((1, 0), -0.5, "zero skew"),
        ((2, 0), 1e-3, "bottom row"),
        ((2, 2), 2.0, "bottom row"),
        ((0, 0), -349.0, "positive focal"),
        ((1, 1), 0.0, "positive focal"),
        ((0, 2), float("nan"), "finite"),
    ],
)
def test_from_intrinsics_rejects_bad_K(entry, value, message):
    K = pelvis_camera().intrinsics
    K[entry] = value
    with pytest.raises(ValueError, match=f"^K: .*{message}"):
        Camera.from_intrinsics(K, 128, 128, 620.0, sdd=1020.0)
    with pytest.raises(ValueError, match=r"^K: expected shape \(3, 3\), got \(2, 3\)"):
        Camera.from_intrinsics(K[:2], 128, 128, 620.0, sdd=1020.0)


def test_from_intrinsics_needs_exactly_one_of_sdd_and_spacing():
    K = pelvis_camera().intrinsics
    with pytest.raises(ValueError, match="sdd, pixel_spacing: .* neither"):
        Camera.from_intrinsics(K, 128, 128, 620.0)
    with pytest.raises(ValueError, match="sdd, pixel_spacing: .* both"):
        Camera.from_intrinsics(K, 128, 128, 620.0, sdd=1020.0, pixel_spacing=(2.92, 2.92))
    with pytest.raises(ValueError, match="pixel_spacing: K gives"):
        Camera.from_intrinsics(K, 128, 128, 620.0, pixel_spacing=(2.0, 2.92))
    with pytest.raises(ValueError, match="^sid:"):
        Camera.from_intrinsics(K, 128, 128, 2000.0, sdd=1020.0)
    with pytest.raises(ProstlabError, match="^K:"):
        Camera.from_intrinsics("K", 128, 128, 620.0, sdd=1020.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extrinsics(dtype):
    camera = pelvis_camera()
    pose = random_poses(3, 71, dtype)
    E = camera.extrinsics(pose)
    assert E.shape == (3, 3, 4) and E.dtype == dtype
    torch.testing.assert_close(E[:, :, :3], so3_exp(pose[:, :3]))
    torch.testing.assert_close(E[:, :, 3], pose[:, 3:] + torch.tensor([0, 0, 620.0], dtype=dtype))
    expected = pose_to_matrix(pose)[:, :3].clone()
    expected[:, 2, 3] += 620.0
    torch.testing.assert_close(E, expected)


def test_ray_directions_layout_and_projection():
    camera = Camera(
        sdd=1000.0, sid=600.0, height=5, width=7, pixel_spacing=(0.4, 0.3), principal_point=(2, 1)
    )
    d = camera.ray_directions(dtype=F64)
    assert d.shape == (35, 3) and d.dtype == F64
    assert camera.ray_directions().dtype == torch.float32
    v, u = 3, 5  # row-major: index v * width + u
    expected = torch.tensor([(u - 2.0) * 0.3, (v - 1.0) * 0.4, 1000.0], dtype=F64)
    torch.testing.assert_close(d[v * 7 + u], expected)
    torch.testing.assert_close(d[1 * 7 + 2], torch.tensor([0.0, 0.0, 1000.0], dtype=F64))
    rows, cols = torch.meshgrid(torch.arange(5.0), torch.arange(7.0), indexing="ij")
    pixels = torch.stack((cols.reshape(-1), rows.reshape(-1)), dim=-1).to(F64)
    torch.testing.assert_close(camera.project(d), pixels)
    torch.testing.assert_close(camera.project(3.7 * d), pixels)  # any point on the ray


def test_project_agrees_with_K():
    camera = pelvis_camera(principal_point=(60.0, 70.0))
    points = torch.tensor([[10.0, -20.0, 700.0], [-5.0, 3.0, 800.0]], dtype=F64)
    uvw = (camera.intrinsics @ points.T).T
    torch.testing.assert_close(camera.project(points), uvw[:, :2] / uvw[:, 2:])


def test_translation_shifts_the_image_by_the_magnification():
    camera = pelvis_camera()
    centre = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=F64)
    pose = torch.tensor([[0.0, 0, 0, 0, 0, 0], [0.0, 0, 0, 10.0, 0, 0]], dtype=F64)
    uv = camera.project(camera.extrinsics(pose) @ centre)
    shift = uv[1, 0] - uv[0, 0]
    assert shift.item() == pytest.approx(10.0 * camera.magnification / 2.92)
    assert shift.item() == pytest.approx(5.6, abs=0.05)


def test_roll_about_the_beam_rotates_the_image():
    camera = pelvis_camera()
    point = torch.tensor([20.0, 0.0, 0.0, 1.0], dtype=F64)
    pose = torch.tensor([[0.0, 0.0, math.pi / 2, 0.0, 0.0, 0.0]], dtype=F64)
    u, v = camera.project(camera.extrinsics(pose) @ point)[0]
    # +x (right in the image) turns to +y (down in the image).
    assert u.item() == pytest.approx(camera.cx)
    assert v.item() == pytest.approx(camera.cy + 20.0 * camera.magnification / 2.92)


@pytest.mark.parametrize("principal_point", [None, (60.25, 70.5)])
def test_resized_keeps_the_field_of_view(principal_point):
    camera = pelvis_camera(principal_point=principal_point)
    small = camera.resized(32, 64)
    assert small.height * small.pixel_spacing[0] == pytest.approx(128 * 2.92)
    assert small.width * small.pixel_spacing[1] == pytest.approx(128 * 2.92)
    assert (small.principal_point is None) == (principal_point is None)
    points = torch.tensor([[10.0, -20.0, 700.0], [-50.0, 3.0, 800.0], [0, 0, 1.0]], dtype=F64)
    uv, uv_small = camera.project(points), small.project(points)
    scale = torch.tensor([64 / 128, 32 / 128], dtype=F64)
    torch.testing.assert_close(uv_small, (uv + 0.5) * scale - 0.5)
    assert camera.scaled(0.5) == camera.resized(64, 64)
    assert camera.scaled(2) == camera.resized(256, 256)
    with pytest.raises(ValueError, match="^factor:"):
        camera.scaled(0.3)
    with pytest.raises(ValueError, match="^height:"):
        camera.resized(0, 10)


def test_camera_dict_round_trip():
    for camera in (pelvis_camera(), pelvis_camera(principal_point=(1.0, 2.0))):
        data = camera.to_dict()
        assert isinstance(data["pixel_spacing"], list)
        assert Camera.from_dict(data) == camera
    with pytest.raises(ValueError, match="unknown key"):
        Camera.from_dict(pelvis_camera().to_dict() | {"focal": 3})
    data = pelvis_camera().to_dict()
    del data["sid"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['sid'\]"):
        Camera.from_dict(data)
    with pytest.raises(ProstlabError, match="mapping"):
        Camera.from_dict([1, 2])


# ----------------------------------------------------------------------------------- the docs


def test_worked_example_of_the_docs():
    camera = pelvis_camera()
    torch.testing.assert_close(
        camera.intrinsics[0, 0], torch.tensor(349.32, dtype=F64), atol=5e-3, rtol=0
    )
    pose = torch.tensor([[0.0, 0.0, 0.0, 10.0, 0.0, 0.0]], dtype=F64)
    x = (84 - 63.5) * 2.33
    point = torch.tensor([x, 0.0, 0.0, 1.0], dtype=F64)
    u, v = camera.project(camera.extrinsics(pose)[0] @ point)
    assert u.item() == pytest.approx(96.05, abs=1e-2)
    assert v.item() == pytest.approx(63.5, abs=1e-12)
    assert camera.magnification == pytest.approx(1.645, abs=1e-3)


def test_code_block_of_the_docs_runs():
    text = DOCS.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/geometry.md should carry a python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(DOCS), "exec"), namespace)  # noqa: S102
    uv = namespace["uv"]
    torch.testing.assert_close(uv, torch.tensor([96.05, 63.5], dtype=uv.dtype), atol=1e-2, rtol=0)


# ----------------------------------------------------------------------------------- errors


def test_check_pose():
    pose = torch.zeros(2, 6)
    assert check_pose(pose) is pose
    with pytest.raises(ValueError, match=r"^pose: expected shape \(B, 6\), got \(3,\)$"):
        check_pose(torch.zeros(3))
    with pytest.raises(ValueError, match=r"^start: expected shape \(B, 6\), got \(2, 1, 6\)"):
        check_pose(torch.zeros(2, 1, 6), name="start")
    with pytest.raises(ProstlabError, match="^pose: expected a floating-point tensor"):
        check_pose(torch.zeros(2, 6, dtype=torch.int64))
    with pytest.raises(ProstlabError, match="^pose: expected a torch.Tensor"):
        check_pose(np.zeros((2, 6)))
    with pytest.raises(ValueError, match="^pose: expected finite values"):
        check_pose(torch.tensor([[0.0, 0, 0, 0, 0, float("nan")]]))


def test_functions_name_the_bad_argument():
    with pytest.raises(ValueError, match=r"^omega: expected shape \(\.\.\., 3\), got \(4, 2\)"):
        so3_exp(torch.zeros(4, 2))
    with pytest.raises(ProstlabError, match="^omega: expected a floating-point tensor"):
        so3_exp(torch.zeros(4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^matrix: expected shape \(\.\.\., 3, 3\)"):
        so3_log(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"^pose: expected shape \(B, 6\), got \(6,\)"):
        pose_to_matrix(torch.zeros(6))
    with pytest.raises(ValueError, match=r"^matrix: expected shape \(B, 4, 4\)"):
        matrix_to_pose(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="^b: expected batch size 3"):
        compose(torch.zeros(3, 6), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="^rot_weight: expected a finite non-negative"):
        geodesic_distance(torch.zeros(1, 6), torch.zeros(1, 6), rot_weight=-1.0)
    with pytest.raises(ValueError, match=r"^angles: expected shape \(B, 3\)"):
        euler_to_pose(torch.zeros(3), torch.zeros(1, 3), "xyz")
    with pytest.raises(ValueError, match=r"^points: expected shape"):
        pelvis_camera().project(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"^pose: expected shape \(B, 6\)"):
        pelvis_camera().extrinsics(torch.zeros(1, 7))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    pose = random_poses(4, 81).cuda()
    camera = pelvis_camera()
    assert camera.extrinsics(pose).device.type == "cuda"
    assert camera.ray_directions(device="cuda").device.type == "cuda"
    torch.testing.assert_close(matrix_to_pose(pose_to_matrix(pose)).cpu(), pose.cpu())
    assert geodesic_gradient(pose, pose.flip(0)).device.type == "cuda"


def test_depth_outside_beam_measures_the_box_past_the_detector_or_behind_the_source():
    """The box |x| <= (10, 20, 40) mm, moved by a pose into the camera frame (source z = 0,
    detector z = sdd = 1020, isocentre z = sid = 620): worked by hand."""
    from prostlab.geometry import depth_outside_beam

    camera = Camera(sdd=1020, sid=620, height=8, width=8, pixel_spacing=(1.0, 1.0))
    half = (10.0, 20.0, 40.0)
    pose = torch.tensor([[0, 0, 0, 0, 0, 0.0],     # z in [580, 660]: inside
                         [0, 0, 0, 0, 0, 370.0],   # z up to 1030: 10 mm past the detector
                         [0, 0, 0, 0, 0, -600.0],  # z down to -20: 20 mm behind the source
                         [0, math.pi / 2, 0, 0, 0, 395.0]], dtype=torch.float64)
    # the last: a quarter turn about y puts the volume's x (10 mm) along the beam: z up to 1025
    expected = torch.tensor([0.0, 10.0, 20.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(depth_outside_beam(pose, camera, half), expected)


def test_check_same_device_names_both_arguments_and_devices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    check_same_device(("a", torch.zeros(1)), ("b", cpu), ("c", None), ("d", "not a tensor"))
    with pytest.raises(ProstlabError, match=r"^b: on cuda:0, but a is on cpu; expected both on"):
        check_same_device(("a", torch.zeros(1)), ("b", cuda))
    with pytest.raises(ProstlabError, match=r"^b: expected a tensor on a real device"):
        check_same_device(("a", cpu), ("b", torch.zeros(1, device="meta")))


def test_check_weights_device_refuses_a_module_built_on_meta():
    assert check_weights_device(torch.nn.Linear(2, 2), "net") == torch.device("cpu")
    assert check_weights_device(torch.nn.ReLU(), "net") is None
    with torch.device("meta"):
        linear = torch.nn.Linear(2, 2)
    with pytest.raises(ProstlabError, match=r"^net: the Linear's weights are on the meta device.*"
                                            r"net.to_empty\(device=...\)"):
        check_weights_device(linear, "net")


def test_so3_gives_a_mixed_batch_the_bits_and_gradients_of_its_items_one_by_one():
    """so3_exp and so3_log skip the branches (series, near pi) that no item of a batch takes:
    a batch mixing every branch must give each item what that item alone gives, bit for bit,
    in value and gradient."""
    omega = rotvecs_with_angles([0.0, 1e-3, 0.05, 0.7, 2.0, 3.1], seed=5)
    for fn in (so3_exp, lambda w: so3_log(so3_exp(w) @ so3_exp(omega[3:4].flip(-1)))):
        batch = omega.clone().requires_grad_()
        out = fn(batch)
        (grad,) = torch.autograd.grad(out.sin().sum(), batch)
        for i in range(len(omega)):
            one = omega[i : i + 1].clone().requires_grad_()
            out_one = fn(one)
            (grad_one,) = torch.autograd.grad(out_one.sin().sum(), one)
            assert torch.equal(out_one[0], out[i]) and torch.equal(grad_one[0], grad[i]), i
