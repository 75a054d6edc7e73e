"""Euler angles, written as scipy writes them, to and from poses.

A convention is three axis letters, consecutive ones different: the 6 Tait-Bryan sequences
(``xyz``, ``xzy``, ``yxz``, ``yzx``, ``zxy``, ``zyx``) and the 6 proper Euler sequences
(``xyx``, ``xzx``, ``yxy``, ``yzy``, ``zxz``, ``zyz``). Lower case means extrinsic rotations
about the fixed axes, in order; upper case means intrinsic rotations about the moving axes:

    "ijk"  (extrinsic):  R = R_k(t3) R_j(t2) R_i(t1)
    "IJK"  (intrinsic):  R = R_i(t1) R_j(t2) R_k(t3)

for angles ``(t1, t2, t3)`` and axes ``i, j, k``. So ``"xyz"`` with angles ``(t1, t2, t3)``
equals ``"ZYX"`` with ``(t3, t2, t1)``.

Decomposition returns scipy's ranges: the first and third angles in ``[-pi, pi]``, the second
in ``[-pi/2, pi/2]`` (Tait-Bryan) or ``[0, pi]`` (proper Euler). In gimbal lock (second angle at
the range's edge for Tait-Bryan, at 0 or pi for proper Euler) only the sum or difference of the
other two is defined; like scipy, the third angle is then set to 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prostlab.errors import ProstlabError
from prostlab.geometry.checks import check_batched, check_same_batch
from prostlab.geometry.so3 import so3_exp, so3_log

_AXES = "xyz"


def _parse(convention: object) -> tuple[tuple[int, int, int], bool]:
    """Return the axis indices of the equivalent intrinsic sequence and whether it was extrinsic."""
    ok = (
        isinstance(convention, str)
        and len(convention) == 3
        and (convention.islower() or convention.isupper())
        and set(convention.lower()) <= set(_AXES)
        and convention[0] != convention[1]
        and convention[1] != convention[2]
    )
    if not ok:
        raise ProstlabError(
            "convention: expected three axis letters from 'xyz', consecutive ones different, "
            "all lower case (extrinsic, e.g. 'xyz', 'zxz') or all upper case (intrinsic, e.g. "
            f"'XYZ', 'ZXZ'), got {convention!r}"
        )
    axes = tuple(_AXES.index(letter) for letter in convention.lower())
    extrinsic = convention.islower()
    if extrinsic:
        axes = axes[::-1]
    return axes, extrinsic  # type: ignore[return-value]


def _axis_rotation(axis: int, angle: Tensor) -> Tensor:
    """``(..., 3, 3)`` rotations by ``angle`` about coordinate axis ``axis`` (0, 1, 2 = x, y, z)."""
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    j, k = (axis + 1) % 3, (axis + 2) % 3
    entries = [[zero] * 3 for _ in range(3)]
    entries[axis][axis] = one
    entries[j][j], entries[j][k] = c, -s
    entries[k][j], entries[k][k] = s, c
    return torch.stack([torch.stack(row, dim=-1) for row in entries], dim=-2)


def _angle_tolerance(dtype: torch.dtype) -> float:
    """Gimbal lock: the second angle's cosine (Tait-Bryan) or sine (proper) below this.

    The bound sits just above rounding noise. Outside it the decomposition reproduces the matrix
    to rounding (the third angle absorbs the first's error); inside it the product errs by at
    most this bound times pi.
    """
    return 100 * torch.finfo(dtype).eps


def _safe_atan2(y: Tensor, x: Tensor, skip: Tensor) -> Tensor:
    """``atan2(y, x)``, with 0 (and a zero gradient) where ``skip``."""
    y = torch.where(skip, torch.zeros_like(y), y)
    x = torch.where(skip, torch.ones_like(x), x)
    return torch.where(skip, torch.zeros_like(y), torch.atan2(y, x))


def _safe_hypot(a: Tensor, b: Tensor) -> Tensor:
    """``sqrt(a^2 + b^2)`` with a finite gradient at 0."""
    sq = a * a + b * b
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), 0.0)


def _angle_about(axis: int, rotation: Tensor) -> Tensor:
    """The angle ``p`` of a rotation ``R_axis(p)`` about a coordinate axis, from its entries."""
    j, k = (axis + 1) % 3, (axis + 2) % 3
    return torch.atan2(rotation[..., k, j], rotation[..., j, j])


def _decompose(matrix: Tensor, axes: tuple[int, int, int], lock_zero_first: bool) -> Tensor:
    """Angles ``(p1, p2, p3)`` with ``matrix = R_a(p1) R_b(p2) R_c(p3)``, ``(..., 3)``.

    Tait-Bryan (a, b, c distinct; e = +1 when (a, b, c) is a cyclic order of (x, y, z), else -1):
    ``sin p2 = e R[a, c]``, ``cos p2 = hypot(R[a, a], R[a, b])``,
    ``p1 = atan2(-e R[b, c], R[c, c])``.
    Proper Euler (a = c, d the third axis, e the sign of the order (a, b, d)):
    ``cos p2 = R[a, a]``, ``sin p2 = hypot(R[a, b], R[a, d])``, ``p1 = atan2(R[b, a], -e R[d, a])``.
    In both, ``p3`` is read from the residual ``R_b(p2)^T R_a(p1)^T R = R_c(p3)``, which keeps the
    product exact even near gimbal lock. In gimbal lock, ``p1 = 0`` if ``lock_zero_first``;
    otherwise ``p1`` is read from ``R R_b(p2)^T = R_a(p1)`` so that ``p3 = 0``.
    """
    a, b, c = axes
    m = matrix
    e = 1.0 if b == (a + 1) % 3 else -1.0
    if a != c:
        cos2 = _safe_hypot(m[..., a, a], m[..., a, b])
        p2 = torch.atan2(e * m[..., a, c], cos2)
        lock = cos2 < _angle_tolerance(m.dtype)
        p1 = _safe_atan2(-e * m[..., b, c], m[..., c, c], lock)
    else:
        d = 3 - a - b
        sin2 = _safe_hypot(m[..., a, b], m[..., a, d])
        p2 = torch.atan2(sin2, m[..., a, a])
        lock = sin2 < _angle_tolerance(m.dtype)
        p1 = _safe_atan2(m[..., b, a], -e * m[..., d, a], lock)
    if not lock_zero_first:
        first = _angle_about(a, m @ _axis_rotation(b, p2).transpose(-1, -2))
        p1 = torch.where(lock, first, p1)
    residual = (_axis_rotation(a, p1) @ _axis_rotation(b, p2)).transpose(-1, -2) @ m
    return torch.stack((p1, p2, _angle_about(c, residual)), dim=-1)


def euler_to_pose(angles: Tensor, translation: Tensor, convention: str) -> Tensor:
    """Poses from Euler angles and translations.

    Args:
        angles: ``(B, 3)`` angles in radians, in the order of ``convention``'s letters.
        translation: ``(B, 3)`` or ``(1, 3)`` translations, mm.
        convention: one of the 12 axis sequences, lower case (extrinsic) or upper case
            (intrinsic), as in ``scipy.spatial.transform.Rotation.from_euler``.

    Returns:
        ``(B, 6)`` poses ``(omega rad, t mm)``; ``|omega| <= pi``.
    """
    axes, extrinsic = _parse(convention)
    check_batched(angles, "angles", (3,))
    check_batched(translation, "translation", (3,))
    check_same_batch(angles, translation, "angles", "translation")
    ordered = angles.flip(-1) if extrinsic else angles
    rotation = _axis_rotation(axes[0], ordered[:, 0])
    rotation = rotation @ _axis_rotation(axes[1], ordered[:, 1])
    rotation = rotation @ _axis_rotation(axes[2], ordered[:, 2])
    omega = so3_log(rotation)
    omega, translation = torch.broadcast_tensors(omega, translation)
    return torch.cat((omega, translation), dim=-1)


def pose_to_euler(pose: Tensor, convention: str) -> tuple[Tensor, Tensor]:
    """Euler angles and translations of poses; the inverse of :func:`euler_to_pose`.

    Args:
        pose: ``(B, 6)`` poses ``(omega rad, t mm)``.
        convention: one of the 12 axis sequences, lower case (extrinsic) or upper case
            (intrinsic), as in ``scipy.spatial.transform.Rotation.as_euler``.

    Returns:
        ``(angles, translation)``: ``(B, 3)`` radians in the order of ``convention``'s letters,
        and ``(B, 3)`` mm.
    """
    axes, extrinsic = _parse(convention)
    check_batched(pose, "pose", (6,))
    # In gimbal lock, like scipy, the convention's third angle is 0.
    angles = _decompose(so3_exp(pose[:, :3]), axes, lock_zero_first=extrinsic)
    if extrinsic:
        angles = angles.flip(-1)
    return angles, pose[:, 3:]
