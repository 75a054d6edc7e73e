"""Rotations: the group SO(3), its algebra so(3) and the maps between them.

A rotation vector ``omega`` (shape ``(..., 3)``, radians) stands for the rotation by the angle
``theta = |omega|`` about the unit axis ``omega / theta``; its matrix is the exponential of the
skew matrix ``[omega]x``. Every function here is batched over any leading dimensions, keeps the
input's dtype and device, and is built from plain torch operations so that first and second
derivatives flow through it.

The trigonometric coefficients that appear below (``sin t / t``, ``(1 - cos t) / t^2``, ...) are
evaluated in closed form for moderate angles and by their Taylor series in ``t^2`` for small
ones; the closed form's branch never sees a zero angle, so no NaN reaches a gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prostlab.geometry.checks import check_tensor

# Taylor coefficients, in powers of x = theta^2, of the functions of the rotation angle below.
_SIN_OVER_T = (1.0, -1 / 6, 1 / 120, -1 / 5040, 1 / 362880, -1 / 39916800)  # sin t / t
_ONE_MINUS_COS = (1 / 2, -1 / 24, 1 / 720, -1 / 40320, 1 / 3628800, -1 / 479001600)
_T_MINUS_SIN = (1 / 6, -1 / 120, 1 / 5040, -1 / 362880, 1 / 39916800, -1 / 6227020800)
_INV_JACOBIAN = (1 / 12, 1 / 720, 1 / 30240, 1 / 1209600, 1 / 47900160)  # (1 - (t/2)cot(t/2))/t^2
# Taylor coefficients, in powers of z^2, of atan(z) / z.
_ATAN_OVER_Z = (1.0, -1 / 3, 1 / 5, -1 / 7, 1 / 9, -1 / 11)


def _series(coefficients: tuple[float, ...], x: Tensor) -> Tensor:
    """Evaluate the polynomial ``sum_n coefficients[n] x^n`` by Horner's rule."""
    out = torch.full_like(x, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        out = out * x + c
    return out


def _small_angle_sq(dtype: torch.dtype) -> float:
    """Squared angle below which the Taylor series replace the closed forms.

    The truncated series are exact to rounding there, and the closed forms, whose derivatives
    cancel catastrophically as the angle shrinks, keep >= 10 correct digits above (float64).
    """
    return 1e-2 if dtype == torch.float64 else 1e-1


def _angle_functions(theta_sq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(sin t / t, (1 - cos t) / t^2, (t - sin t) / t^3)`` for ``t^2 = theta_sq``."""
    small = theta_sq < _small_angle_sq(theta_sq.dtype)
    some_small = bool(small.any())
    if some_small and bool(small.all()):  # only the series are selected: skip the closed forms
        return tuple(_series(k, theta_sq) for k in (_SIN_OVER_T, _ONE_MINUS_COS, _T_MINUS_SIN))
    x = torch.where(small, torch.ones_like(theta_sq), theta_sq)  # the closed forms never see 0
    t = torch.sqrt(x)
    a = torch.sin(t) / t
    half = torch.sin(0.5 * t) / (0.5 * t)
    b = 0.5 * half * half  # (1 - cos t) / t^2 = 2 sin^2(t/2) / t^2, free of cancellation
    c = (1.0 - a) / x
    if not some_small:  # nor the series (the same values and gradients as the where's)
        return a, b, c
    return (
        torch.where(small, _series(_SIN_OVER_T, theta_sq), a),
        torch.where(small, _series(_ONE_MINUS_COS, theta_sq), b),
        torch.where(small, _series(_T_MINUS_SIN, theta_sq), c),
    )


def hat(omega: Tensor) -> Tensor:
    """The skew-symmetric matrix of a vector: ``hat(omega) @ v = omega x v`` (cross product).

    Args:
        omega: ``(..., 3)``.

    Returns:
        ``(..., 3, 3)`` matrix ``[[0, -w3, w2], [w3, 0, -w1], [-w2, w1, 0]]``.
    """
    check_tensor(omega, "omega", (3,), "(..., 3)")
    w1, w2, w3 = omega.unbind(-1)
    zero = torch.zeros_like(w1)
    rows = (
        torch.stack((zero, -w3, w2), dim=-1),
        torch.stack((w3, zero, -w1), dim=-1),
        torch.stack((-w2, w1, zero), dim=-1),
    )
    return torch.stack(rows, dim=-2)


def vee(matrix: Tensor) -> Tensor:
    """The vector of the skew-symmetric part of a matrix; the inverse of :func:`hat`.

    ``vee(M) = vee((M - M^T) / 2) = ((M32 - M23) / 2, (M13 - M31) / 2, (M21 - M12) / 2)``, so
    ``vee(hat(w)) = w`` and, for a rotation by ``theta`` about ``n``, ``vee(R) = sin(theta) n``.

    Args:
        matrix: ``(..., 3, 3)``.

    Returns:
        ``(..., 3)``.
    """
    check_tensor(matrix, "matrix", (3, 3), "(..., 3, 3)")
    m = matrix
    return 0.5 * torch.stack(
        (m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]),
        dim=-1,
    )


def so3_exp(omega: Tensor) -> Tensor:
    """Rotation matrices of rotation vectors (Rodrigues' formula).

    ``R = exp([w]x) = I + (sin t / t) [w]x + ((1 - cos t) / t^2) [w]x^2`` with ``t = |w|``.

    Args:
        omega: ``(..., 3)`` rotation vectors, radians.

    Returns:
        ``(..., 3, 3)`` rotation matrices, same dtype and device.
    """
    check_tensor(omega, "omega", (3,), "(..., 3)")
    a, b, _ = _angle_functions((omega * omega).sum(-1))
    w = hat(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device)
    return eye + a[..., None, None] * w + b[..., None, None] * (w @ w)


def so3_left_jacobian(omega: Tensor) -> Tensor:
    """The left Jacobian of SO(3).

    ``J(w) = I + ((1 - cos t) / t^2) [w]x + ((t - sin t) / t^3) [w]x^2`` with ``t = |w|``.

    It is the ``V`` matrix of :func:`prostlab.geometry.se3.se3_exp` (a twist ``(w, v)``
    translates by ``J(w) v``) and relates perturbations: ``exp(w + e) ~ exp(J(w) e) exp(w)``.
    The right Jacobian is ``J(-w) = J(w)^T``.

    Args:
        omega: ``(..., 3)`` rotation vectors, radians.

    Returns:
        ``(..., 3, 3)``.
    """
    check_tensor(omega, "omega", (3,), "(..., 3)")
    _, b, c = _angle_functions((omega * omega).sum(-1))
    w = hat(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device)
    return eye + b[..., None, None] * w + c[..., None, None] * (w @ w)


def so3_left_jacobian_inverse(omega: Tensor) -> Tensor:
    """The inverse of :func:`so3_left_jacobian`, ``I - [w]x / 2 + D(t) [w]x^2``.

    ``D(t) = (1 - (t / 2) cot(t / 2)) / t^2``, finite for ``t < 2 pi`` (``1 / pi^2`` at ``t = pi``).

    Args:
        omega: ``(..., 3)`` rotation vectors, radians, of norm below ``2 pi``.

    Returns:
        ``(..., 3, 3)``.
    """
    check_tensor(omega, "omega", (3,), "(..., 3)")
    theta_sq = (omega * omega).sum(-1)
    small = theta_sq < _small_angle_sq(theta_sq.dtype)
    x = torch.where(small, torch.ones_like(theta_sq), theta_sq)
    half = 0.5 * torch.sqrt(x)
    d = (1.0 - half * torch.cos(half) / torch.sin(half)) / x
    d = torch.where(small, _series(_INV_JACOBIAN, theta_sq), d)
    w = hat(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device)
    return eye - 0.5 * w + d[..., None, None] * (w @ w)


def _safe_norm(v: Tensor) -> Tensor:
    """``|v|`` over the last axis, with a zero (not NaN) gradient at ``v = 0``."""
    sq = (v * v).sum(-1)
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), 0.0)


def rotation_angle(matrix: Tensor) -> Tensor:
    """The angle of rotation matrices, in ``[0, pi]``.

    ``theta = atan2(|vee(R)|, (tr R - 1) / 2)``: the sine and cosine of the angle, read from the
    skew and the trace parts. Unlike ``acos((tr R - 1) / 2)`` this keeps full precision near 0
    and pi and never leaves acos's domain through rounding. The gradient at the identity is 0.

    Args:
        matrix: ``(..., 3, 3)`` rotation matrices.

    Returns:
        ``(...)`` angles, radians.
    """
    check_tensor(matrix, "matrix", (3, 3), "(..., 3, 3)")
    cos = 0.5 * (matrix.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0)
    return torch.atan2(_safe_norm(vee(matrix)), cos)


def geodesic_angle(r_a: Tensor, r_b: Tensor) -> Tensor:
    """The geodesic distance between rotations: the angle of ``R_a^T R_b``, in ``[0, pi]``.

    Args:
        r_a: ``(..., 3, 3)`` rotation matrices.
        r_b: ``(..., 3, 3)`` rotation matrices (broadcast against ``r_a``).

    Returns:
        ``(...)`` angles, radians.
    """
    check_tensor(r_a, "r_a", (3, 3), "(..., 3, 3)")
    check_tensor(r_b, "r_b", (3, 3), "(..., 3, 3)")
    return rotation_angle(r_a.transpose(-1, -2) @ r_b)


def so3_log(matrix: Tensor) -> Tensor:
    """Rotation vectors of rotation matrices, the inverse of :func:`so3_exp` on angles in [0, pi].

    With ``s = vee(R) = sin(t) n`` and ``c = (tr R - 1) / 2 = cos(t)``:

    - for most angles, ``w = atan2(|s|, c) s / |s|``;
    - near 0 (``|s|`` small and ``c > 0``), the same ``atan2(y, c) / y = atan(z) / (z c)`` with
      ``y = |s|``, ``z = y / c``, by its Taylor series in ``z^2``, free of square roots;
    - near pi (``c < -1/2``), where ``s`` vanishes, the axis is read from the symmetric part
      ``(R + R^T) / 2 - c I = (1 - c) n n^T``: its column with the largest diagonal entry,
      normalised, signed so that ``n . s >= 0``; then ``w = atan2(n . s, c) n``.

    At exactly pi both ``n`` and ``-n`` are valid; the one returned has a positive component
    along the axis of the largest diagonal entry.

    Args:
        matrix: ``(..., 3, 3)`` rotation matrices.

    Returns:
        ``(..., 3)`` rotation vectors with norm in ``[0, pi]``, same dtype and device.
    """
    check_tensor(matrix, "matrix", (3, 3), "(..., 3, 3)")
    s = vee(matrix)
    cos = 0.5 * (matrix.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0)
    y_sq = (s * s).sum(-1)
    one = torch.ones_like(y_sq)

    near_pi = cos < -0.5
    threshold = 1e-4 if matrix.dtype == torch.float64 else 1e-2
    near_zero = (y_sq < threshold) & (cos > 0)

    # Generic angles: theta / sin(theta) times s; y is kept away from 0 where unused.
    y = torch.sqrt(torch.where(near_zero | near_pi, one, y_sq))
    generic = (torch.atan2(y, cos) / y)[..., None] * s
    if not bool((near_zero | near_pi).any()):  # the other branches would not be selected
        return generic

    c_safe = torch.where(near_zero, cos, one)
    small = (_series(_ATAN_OVER_Z, y_sq / (c_safe * c_safe)) / c_safe)[..., None] * s

    # Near pi: the axis from the symmetric part.
    sym = 0.5 * (matrix + matrix.transpose(-1, -2)) - cos[..., None, None] * torch.eye(
        3, dtype=matrix.dtype, device=matrix.device
    )
    k = sym.diagonal(dim1=-2, dim2=-1).argmax(-1)
    column = torch.gather(sym, -1, k[..., None, None].expand(*sym.shape[:-1], 1))[..., 0]
    col_sq = (column * column).sum(-1)
    axis = column / torch.sqrt(torch.where(near_pi, col_sq, one))[..., None]
    sign = torch.where((axis * s).sum(-1) < 0, -one, one)
    axis = sign[..., None] * axis
    pi_branch = torch.atan2((axis * s).sum(-1), cos)[..., None] * axis

    return torch.where(
        near_pi[..., None], pi_branch, torch.where(near_zero[..., None], small, generic)
    )
