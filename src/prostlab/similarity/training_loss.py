r"""ProST's training objective: make the similarity's pose gradient point along the geodesic.

Let ``S(pose)`` be the network similarity (lower is better) of a current pose ``x`` to a target
rendered at the ground truth ``x*``, and move poses by the retraction of ``docs/geometry.md``,
``perturb(x, delta)``: ``R -> R exp([delta_r]x)`` (body frame), ``t -> t + delta_t``. The network's
pose gradient is

    g = d/d delta  S(perturb(x, delta)) |_{delta = 0}                         (B, 6)

taken by autograd with ``create_graph=True``, so that a loss on ``g`` can be backpropagated into
the network's parameters (a double backward, through the projector too). Its ideal is the
gradient of the squared geodesic distance to the ground truth, in the same parametrisation
(:func:`prostlab.geometry.geodesic_gradient`),

    G = ( -2 w_r log(R_x^T R_x*),  2 w_t (t_x - t_x*) ).

Only directions matter for gradient descent, and rotations (rad) and translations (mm) have no
common scale, so the rotation parts ``g_r, G_r`` and the translation parts ``g_t, G_t`` are each
normalised to unit length and compared by squared error:

    L = | g_r / |g_r| - G_r / |G_r| |^2 + | g_t / |g_t| - G_t / |G_t| |^2,

each term in ``[0, 4]`` (``2 - 2 cos`` of the angle between the directions), so ``L in [0, 8]``.
``v / |v|`` is taken as 0 for ``v = 0``, with a finite gradient.

**Exact parts.** Where the current rotation (or translation) already equals the ground truth to
within ``tolerance`` (rad, or mm), ``G_r`` (or ``G_t``) is zero up to rounding and has no
direction; normalising rounding noise would compare ``g`` with a random unit vector. That term is
left out (it counts 0). Random training poses never hit this; it matters for hand-made cases.

**Weights.** Because each part is normalised separately, positive weights ``w_r, w_t`` scale
``G_r, G_t`` but not their directions: the loss does not depend on their values. A weight of 0
leaves its term out, e.g. ``rot_weight=0`` trains the translation direction only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from prostlab.errors import ProstlabError
from prostlab.geometry import check_pose, geodesic_gradient, perturb

__all__ = [
    "REDUCTIONS",
    "direction_loss",
    "geodesic_direction_loss",
    "geodesic_gradient_loss",
    "pose_gradient",
    "unit",
]

REDUCTIONS = ("mean", "sum", "none")


def unit(v: Tensor) -> Tensor:
    """``v / |v|`` over the last dimension, 0 where ``v = 0``; gradients stay finite."""
    sq = (v * v).sum(dim=-1, keepdim=True)
    positive = sq > torch.finfo(v.dtype).tiny
    norm = torch.sqrt(torch.where(positive, sq, torch.ones_like(sq)))
    return torch.where(positive, v / norm, torch.zeros_like(v))


def pose_gradient(
    objective_fn: Callable[[Tensor], Tensor], pose: Tensor, *, create_graph: bool = False
) -> tuple[Tensor, Tensor]:
    """An objective's values and its gradient with respect to a ``perturb`` delta at zero.

    ``g = d/d delta objective(perturb(pose, delta))`` at ``delta = 0``, the gradient that compares
    with :func:`prostlab.geometry.geodesic_gradient`. The objective must treat the samples of a
    batch independently (no batch statistics), so that differentiating the sum gives each
    sample's own gradient. Runs with gradients enabled even inside ``torch.no_grad()``.

    Args:
        objective_fn: ``(B, 6)`` poses -> ``(B,)`` values.
        pose: ``(B, 6)`` poses at which to differentiate (detached here).
        create_graph: keep the graph of ``g`` for a further backward (training).

    Returns:
        ``(values (B,), g (B, 6))``.
    """
    pose = check_pose(pose).detach()
    with torch.enable_grad():
        delta = torch.zeros_like(pose, requires_grad=True)
        values = objective_fn(perturb(pose, delta))
        if not isinstance(values, Tensor) or tuple(values.shape) != (pose.shape[0],):
            got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ProstlabError(
                f"objective_fn: expected values of shape (B,) = ({pose.shape[0]},), got {got}"
            )
        (g,) = torch.autograd.grad(
            values.sum(), delta, create_graph=create_graph, allow_unused=True
        )
    if g is None:
        raise ProstlabError("objective_fn: expected values that depend on the pose, got none")
    return values, g


def direction_loss(
    g: Tensor, target: Tensor, rot_tolerance: float = 0.0, trans_tolerance: float = 0.0
) -> Tensor:
    """``|unit(g_r) - unit(G_r)|^2 + |unit(g_t) - unit(G_t)|^2`` for ``(B, 6)`` tangents: ``(B,)``.

    A part whose target has norm ``<= `` its tolerance has no direction and counts 0.
    """
    total = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
    for part, tolerance in ((slice(0, 3), rot_tolerance), (slice(3, 6), trans_tolerance)):
        wanted = target[:, part]
        term = (unit(g[:, part]) - unit(wanted)).square().sum(dim=-1)
        active = wanted.square().sum(dim=-1) > tolerance * tolerance
        total = total + torch.where(active, term, torch.zeros_like(term))
    return total


def geodesic_direction_loss(
    g: Tensor,
    current_pose: Tensor,
    gt_pose: Tensor,
    rot_weight: float = 1.0,
    trans_weight: float = 1.0,
    tolerance: float = 1e-6,
) -> Tensor:
    """Per-case loss ``(B,)`` of pose gradients ``g`` (B, 6) already taken at ``current_pose``:
    :func:`direction_loss` against :func:`~prostlab.geometry.geodesic_gradient` to ``gt_pose``."""
    target = geodesic_gradient(current_pose.detach(), gt_pose.detach(), rot_weight, trans_weight)
    # |G_r| = 2 w_r |log(R_c^T R_gt)| and |G_t| = 2 w_t |t_c - t_gt|: the tolerance in rad and mm.
    tolerance = float(tolerance)
    return direction_loss(
        g,
        target.to(g.dtype),
        rot_tolerance=2.0 * float(rot_weight) * tolerance,
        trans_tolerance=2.0 * float(trans_weight) * tolerance,
    )


def geodesic_gradient_loss(
    net_objective_fn: Callable[[Tensor], Tensor],
    current_pose: Tensor,
    gt_pose: Tensor,
    rot_weight: float = 1.0,
    trans_weight: float = 1.0,
    reduction: str = "mean",
    tolerance: float = 1e-6,
) -> Tensor:
    """ProST's loss: the similarity's pose-gradient direction against the geodesic one.

    See the module docstring for the maths. The loss is differentiable in the network's
    parameters (the inner gradient is taken with ``create_graph=True``); it runs with
    gradients enabled even under ``torch.no_grad()``, so validation can compute it.

    Args:
        net_objective_fn: ``(B, 6)`` poses -> ``(B,)`` similarities, e.g.
            ``lambda pose: net(bone, spacing, pose, target)`` or a
            :class:`~prostlab.similarity.NetObjective` built with ``cache=False``.
        current_pose: ``(B, 6)`` poses where the gradient is taken.
        gt_pose: ``(B, 6)`` or ``(1, 6)`` ground-truth poses of the targets.
        rot_weight: ``w_r >= 0`` of the metric; 0 leaves the rotation term out (the loss does
            not depend on a positive value).
        trans_weight: ``w_t >= 0`` of the metric; 0 leaves the translation term out.
        reduction: ``"mean"`` (a scalar, the default), ``"sum"``, or ``"none"`` (``(B,)``).
        tolerance: a rotation (rad) or translation (mm) part closer than this to the ground
            truth is exact and left out.

    Returns:
        A scalar, or ``(B,)`` for ``reduction="none"``; each sample's loss lies in ``[0, 8]``.
    """
    if reduction not in REDUCTIONS:
        raise ProstlabError(f"reduction: expected one of {list(REDUCTIONS)}, got {reduction!r}")
    current_pose = check_pose(current_pose, "current_pose")
    gt_pose = check_pose(gt_pose, "gt_pose")
    if gt_pose.shape[0] not in (1, current_pose.shape[0]):
        raise ProstlabError(
            f"gt_pose: expected batch size {current_pose.shape[0]} (that of current_pose) or 1, "
            f"got {gt_pose.shape[0]}"
        )
    _, g = pose_gradient(net_objective_fn, current_pose, create_graph=True)
    loss = geodesic_direction_loss(g, current_pose, gt_pose, rot_weight, trans_weight, tolerance)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
