"""Rigid poses: the group SE(3), its exponential map, and its geodesic distance.

A pose is a ``(B, 6)`` tensor ``(omega, t)``: a rotation vector (radians) and a translation (mm),
standing for the rigid map ``X -> R(omega) X + t`` and the 4x4 matrix ``T = [[R, t], [0, 1]]``
(``docs/geometry.md``). A *twist* ``xi = (omega, v)`` is a different 6-vector, an element of the
Lie algebra se(3): ``se3_exp(xi) = [[R(omega), J(omega) v], [0, 1]]``, so a twist's ``v`` equals
the pose's ``t`` only when ``omega = 0``.

Distances use the left-invariant Riemannian metric whose inner product at the identity is
``diag(w_r I3, w_t I3)``; see :func:`geodesic_distance`.

Batches of size 1 broadcast against batches of size B in the two-argument functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prostlab.geometry.checks import check_batched, check_same_batch, check_weight
from prostlab.geometry.euler import euler_to_pose, pose_to_euler
from prostlab.geometry.so3 import (
    so3_exp,
    so3_left_jacobian,
    so3_left_jacobian_inverse,
    so3_log,
)

__all__ = [
    "compose",
    "euler_to_pose",
    "geodesic_distance",
    "geodesic_gradient",
    "inverse",
    "matrix_to_pose",
    "perturb",
    "pose_to_euler",
    "pose_to_matrix",
    "se3_exp",
    "se3_log",
]


def _homogeneous(rotation: Tensor, translation: Tensor) -> Tensor:
    """Stack ``(B, 3, 3)`` rotations and ``(B, 3)`` translations into ``(B, 4, 4)`` matrices."""
    top = torch.cat((rotation, translation[..., None]), dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat((top, bottom), dim=-2)


def pose_to_matrix(pose: Tensor) -> Tensor:
    """The 4x4 matrices ``[[R(omega), t], [0, 1]]`` of poses.

    Args:
        pose: ``(B, 6)`` poses ``(omega rad, t mm)``.

    Returns:
        ``(B, 4, 4)``, same dtype and device.
    """
    check_batched(pose, "pose", (6,))
    return _homogeneous(so3_exp(pose[:, :3]), pose[:, 3:])


def matrix_to_pose(matrix: Tensor) -> Tensor:
    """Poses of rigid 4x4 matrices; the inverse of :func:`pose_to_matrix`.

    The bottom row is not read. The rotation vector returned has norm in ``[0, pi]``.

    Args:
        matrix: ``(B, 4, 4)`` rigid transforms ``[[R, t], [0, 1]]``.

    Returns:
        ``(B, 6)`` poses ``(omega rad, t mm)``.
    """
    check_batched(matrix, "matrix", (4, 4))
    return torch.cat((so3_log(matrix[:, :3, :3]), matrix[:, :3, 3]), dim=-1)


def compose(a: Tensor, b: Tensor) -> Tensor:
    """The pose of ``T(a) @ T(b)``: apply ``b`` first, then ``a``.

    ``R = R_a R_b``, ``t = R_a t_b + t_a``.

    Args:
        a: ``(B, 6)`` or ``(1, 6)`` poses.
        b: ``(B, 6)`` or ``(1, 6)`` poses.

    Returns:
        ``(B, 6)`` poses.
    """
    check_batched(a, "a", (6,))
    check_batched(b, "b", (6,))
    check_same_batch(a, b, "a", "b")
    r_a = so3_exp(a[:, :3])
    rotation = r_a @ so3_exp(b[:, :3])
    translation = (r_a @ b[:, 3:, None])[..., 0] + a[:, 3:]
    return torch.cat((so3_log(rotation), translation), dim=-1)


def inverse(pose: Tensor) -> Tensor:
    """The pose of ``T(pose)^-1``: ``(-omega, -R^T t)``.

    Args:
        pose: ``(B, 6)`` poses.

    Returns:
        ``(B, 6)`` poses.
    """
    check_batched(pose, "pose", (6,))
    omega = pose[:, :3]
    translation = -(so3_exp(omega).transpose(-1, -2) @ pose[:, 3:, None])[..., 0]
    return torch.cat((-omega, translation), dim=-1)


def perturb(pose: Tensor, delta: Tensor) -> Tensor:
    """Move poses along a tangent vector: ``R -> R exp([delta_rot]x)``, ``t -> t + delta_trans``.

    This is the retraction the registration steps with. Its rotation part is a body-frame
    (right-multiplied, "left-trivialised") perturbation; its translation part is added in the
    isocentre frame. :func:`geodesic_gradient` is the gradient with respect to this ``delta``
    at ``delta = 0``, and ``geodesic_distance(pose, perturb(pose, delta))^2`` equals
    ``w_r |delta_rot|^2 + w_t |delta_trans|^2`` for ``|delta_rot| <= pi``.

    Args:
        pose: ``(B, 6)`` or ``(1, 6)`` poses.
        delta: ``(B, 6)`` or ``(1, 6)`` tangent vectors ``(rad, mm)``.

    Returns:
        ``(B, 6)`` poses.
    """
    check_batched(pose, "pose", (6,))
    check_batched(delta, "delta", (6,))
    check_same_batch(pose, delta, "pose", "delta")
    rotation = so3_exp(pose[:, :3]) @ so3_exp(delta[:, :3])
    return torch.cat((so3_log(rotation), pose[:, 3:] + delta[:, 3:]), dim=-1)


def se3_exp(xi: Tensor) -> Tensor:
    """The exponential map of se(3): twists to 4x4 rigid matrices.

    ``exp(xi) = [[exp([w]x), J(w) v], [0, 1]]`` with ``J(w)`` the left Jacobian of SO(3)
    (:func:`prostlab.geometry.so3.so3_left_jacobian`, often written ``V``). A twist's ``v`` is
    not a pose's translation: ``matrix_to_pose(se3_exp(xi))`` is ``(w, J(w) v)``.

    Args:
        xi: ``(B, 6)`` twists ``(w rad, v mm)``.

    Returns:
        ``(B, 4, 4)`` matrices.
    """
    check_batched(xi, "xi", (6,))
    omega = xi[:, :3]
    translation = (so3_left_jacobian(omega) @ xi[:, 3:, None])[..., 0]
    return _homogeneous(so3_exp(omega), translation)


def se3_log(matrix: Tensor) -> Tensor:
    """The logarithm of SE(3), the inverse of :func:`se3_exp`: ``(w, J(w)^-1 t)``.

    Args:
        matrix: ``(B, 4, 4)`` rigid transforms.

    Returns:
        ``(B, 6)`` twists, rotation norm in ``[0, pi]``.
    """
    check_batched(matrix, "matrix", (4, 4))
    omega = so3_log(matrix[:, :3, :3])
    v = (so3_left_jacobian_inverse(omega) @ matrix[:, :3, 3:])[..., 0]
    return torch.cat((omega, v), dim=-1)


def _relative_rotation(current: Tensor, target: Tensor) -> Tensor:
    """``log(R_current^T R_target)``, ``(B, 3)``."""
    relative = so3_exp(current[:, :3]).transpose(-1, -2) @ so3_exp(target[:, :3])
    return so3_log(relative)


def geodesic_distance(
    a: Tensor,
    b: Tensor,
    rot_weight: float = 1.0,
    trans_weight: float = 1.0,
    *,
    squared: bool = False,
) -> Tensor:
    """The geodesic distance between poses on SE(3).

    The metric is the left-invariant one whose inner product at the identity is
    ``diag(w_r I3, w_t I3)`` on twists ``(w, v)``. Left-trivialising a velocity ``(dR, dt)`` at
    ``(R, t)`` gives ``(R^T dR, R^T dt)``, whose squared length ``w_r |R^T dR|^2 + w_t |dt|^2``
    is that of the product of the bi-invariant metric on SO(3) and the Euclidean one on R^3
    (rotations preserve length). Geodesics are therefore products of rotations at constant rate
    and straight lines, and

        d^2(a, b) = w_r theta(R_a^T R_b)^2 + w_t |t_a - t_b|^2,

    with ``theta`` the rotation angle in ``[0, pi]``. It is invariant under left composition,
    ``d(c a, c b) = d(a, b)``, but not under right composition.

    Args:
        a: ``(B, 6)`` or ``(1, 6)`` poses.
        b: ``(B, 6)`` or ``(1, 6)`` poses.
        rot_weight: ``w_r >= 0``, per rad^2.
        trans_weight: ``w_t >= 0``, per mm^2.
        squared: return ``d^2`` (smooth everywhere below the cut locus theta = pi) instead of
            ``d`` (whose gradient at ``d = 0`` is returned as 0).

    Returns:
        ``(B,)`` distances.
    """
    check_batched(a, "a", (6,))
    check_batched(b, "b", (6,))
    check_same_batch(a, b, "a", "b")
    w_r = check_weight(rot_weight, "rot_weight")
    w_t = check_weight(trans_weight, "trans_weight")
    phi = _relative_rotation(a, b)
    dt = a[:, 3:] - b[:, 3:]
    d_sq = w_r * (phi * phi).sum(-1) + w_t * (dt * dt).sum(-1)
    if squared:
        return d_sq
    positive = d_sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, d_sq, 1.0)), 0.0)


def geodesic_gradient(
    current: Tensor,
    target: Tensor,
    rot_weight: float = 1.0,
    trans_weight: float = 1.0,
    *,
    riemannian: bool = False,
) -> Tensor:
    """The gradient of the squared geodesic distance to ``target``, at ``current``.

    With ``phi = log(R_c^T R_target)`` (body frame of ``current``) and ``dt = t_c - t_target``:

    - ``riemannian=False`` (default): the Euclidean gradient at ``delta = 0`` of
      ``delta -> d^2(perturb(current, delta), target)`` (see :func:`perturb`),
      ``(-2 w_r phi, 2 w_t dt)``. It is what autograd gives for that map, so it compares
      directly with the gradient of any loss taken with respect to a ``perturb`` delta.
    - ``riemannian=True``: that gradient raised by the metric (each part divided by its weight),
      the tangent vector ``(-2 phi, 2 dt) = -2 log_current(target)``, independent of positive
      weights.

    Both vanish at ``current = target`` and point away from ``target``: a step
    ``perturb(current, -s * grad)`` moves towards it. At the cut locus (``theta = pi``) the
    rotation part has one of its two valid signs.

    Note that this is not the gradient with respect to the pose vector's ``omega`` itself: that
    one is ``J(-omega)^T`` times the rotation part (right Jacobian, see
    :func:`prostlab.geometry.so3.so3_left_jacobian`).

    Args:
        current: ``(B, 6)`` or ``(1, 6)`` poses.
        target: ``(B, 6)`` or ``(1, 6)`` poses.
        rot_weight: ``w_r >= 0`` (``> 0`` when ``riemannian``).
        trans_weight: ``w_t >= 0`` (``> 0`` when ``riemannian``).
        riemannian: return the Riemannian gradient instead of the Euclidean one.

    Returns:
        ``(B, 6)`` tangent vectors ``(rotation part, translation part)``.
    """
    check_batched(current, "current", (6,))
    check_batched(target, "target", (6,))
    check_same_batch(current, target, "current", "target")
    w_r = check_weight(rot_weight, "rot_weight", positive=riemannian)
    w_t = check_weight(trans_weight, "trans_weight", positive=riemannian)
    if riemannian:
        w_r = w_t = 1.0
    phi = _relative_rotation(current, target)
    dt = current[:, 3:] - target[:, 3:]
    return torch.cat((-2.0 * w_r * phi, 2.0 * w_t * dt), dim=-1)
