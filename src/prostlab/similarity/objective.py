"""Pose objectives: what the registration engine minimises.

A **pose objective** is a callable ``objective(pose) -> values``: poses ``(B, 6)`` (rad, mm, see
``docs/geometry.md``) to ``(B,)`` values, lower is better, differentiable in the pose. Everything
that does not depend on the pose (the volume, the target, the network's lifted volume and target
embedding) is fixed when the objective is built, once per registration stage.

- :class:`ImageObjective`: render a volume at the pose and compare with the target by an image
  loss such as :class:`~prostlab.similarity.NCCLoss`.
- :class:`NetObjective`: the learned similarity :class:`~prostlab.similarity.ConvexSimilarityNet`.
- :func:`make_objective`: build one by name (``"ncc"``, ``"gradncc"``, ``"mncc"``, ``"net"``),
  rendering the whole CT or the segmented bones (``moving``; :data:`DEFAULT_MOVING`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from prostlab.errors import ProstlabError
from prostlab.geometry.checks import check_real_device, check_same_device
from prostlab.projector import Projector
from prostlab.similarity.convex_net import ConvexSimilarityNet
from prostlab.similarity.ncc import GradientNCCLoss, NCCLoss
from prostlab.similarity.patch_ncc import MultiscaleNCCLoss

__all__ = [
    "DEFAULT_MOVING",
    "MOVING",
    "OBJECTIVES",
    "ImageObjective",
    "NetObjective",
    "PoseObjective",
    "make_objective",
]


class PoseObjective(Protocol):
    """``(B, 6)`` poses -> ``(B,)`` values, lower is better, differentiable in the pose."""

    def __call__(self, pose: Tensor) -> Tensor: ...


ImageLoss = Callable[..., Tensor]
"""``loss(moving, target, mask=None) -> (B,)``, lower is better (e.g. ``NCCLoss()``)."""


class ImageObjective(nn.Module):
    """Render ``volume`` at the pose with ``projector`` and compare with ``target`` by ``loss``.

    ``objective(pose) = loss(projector(volume, spacing, pose), target, mask)`` (or
    ``loss(moving, target)`` without a mask).

    Args:
        projector: renders ``(B, C, h, w)`` images.
        volume: ``(B | 1, C, D, H, W)`` attenuation, 1/mm.
        spacing: voxel size in mm, array-axis order.
        target: ``(B | 1, C, h, w)`` image(s) to match.
        loss: ``loss(moving, target, mask=None) -> (B,)``, e.g. ``NCCLoss()``, ``GradientNCCLoss()``.
        mask: optional ``(B | 1, 1 | C, h, w)`` weights for ``loss``.
    """

    def __init__(
        self,
        projector: Projector,
        volume: Tensor,
        spacing: Sequence[float],
        target: Tensor,
        loss: ImageLoss,
        mask: Tensor | None = None,
    ):
        super().__init__()
        if not isinstance(projector, Projector):
            raise ProstlabError(
                f"projector: expected a prostlab Projector, got {type(projector).__name__}"
            )
        if not callable(loss):
            raise ProstlabError(
                f"loss: expected a callable loss(moving, target, mask=None) -> (B,), got "
                f"{type(loss).__name__}"
            )
        _check_tensor(volume, "volume", 5, "(B | 1, C, D, H, W)")
        _check_tensor(target, "target", 4, "(B | 1, C, h, w)")
        check_same_device(("volume", volume), ("target", target), ("mask", mask))
        camera = projector.camera
        if tuple(target.shape[2:]) != (camera.height, camera.width):
            raise ProstlabError(
                f"target: expected images of the projector's detector, (B | 1, C, "
                f"{camera.height}, {camera.width}), got {tuple(target.shape)}"
            )
        self.projector, self.loss = projector, loss
        self.volume, self.spacing, self.target, self.mask = volume, spacing, target, mask

    def render(self, pose: Tensor) -> Tensor:
        """The moving image ``(B, C, h, w)`` at ``pose``."""
        return self.projector(self.volume, self.spacing, pose)

    def forward(self, pose: Tensor) -> Tensor:
        """``(B, 6)`` poses -> ``(B,)`` losses."""
        moving = self.render(pose)
        if self.mask is None:
            return self.loss(moving, self.target)
        return self.loss(moving, self.target, self.mask)


class NetObjective(nn.Module):
    """The learned similarity of :class:`ConvexSimilarityNet` as a pose objective.

    With ``cache=True`` (registration) the lifted volume and the target embedding, which do not
    depend on the pose, are computed once here, without gradient; each call then costs one
    projection and one encoder pass. With ``cache=False`` (training) every call runs the whole
    network, so gradients reach all its parameters.

    Args:
        net: the network.
        bone_volume: ``(B | 1, 1, D, H, W)`` segmented CT attenuation, 1/mm.
        spacing: voxel size in mm, array-axis order.
        target: ``(B | 1, 1, h, w)`` X-ray(s) on the network camera's detector.
        cache: precompute the pose-independent parts (see above).
    """

    def __init__(
        self,
        net: ConvexSimilarityNet,
        bone_volume: Tensor,
        spacing: Sequence[float],
        target: Tensor,
        cache: bool = True,
    ):
        super().__init__()
        if not isinstance(net, ConvexSimilarityNet):
            raise ProstlabError(f"net: expected a ConvexSimilarityNet, got {type(net).__name__}")
        self.net, self.spacing, self.cache = net, spacing, bool(cache)
        self.bone_volume, self.target = bone_volume, target
        if self.cache:
            with torch.no_grad():
                self.lifted = net.lift(bone_volume)
                self.target_embedding = net.embed_target(target)
        else:
            net._check_bone(bone_volume)
            net._check_target(target)

    def forward(self, pose: Tensor) -> Tensor:
        """``(B, 6)`` poses -> ``(B,)`` similarities."""
        if not self.cache:
            return self.net(self.bone_volume, self.spacing, pose, self.target)
        embedding = self.net.embed_projection(self.net.render(self.lifted, self.spacing, pose))
        return self.net.distance(embedding, self.target_embedding)


OBJECTIVES = ("ncc", "gradncc", "mncc", "net")
"""The names :func:`make_objective` knows."""

MOVING = ("bone", "ct")
"""What a stage may render: the segmented bones or the whole CT."""

DEFAULT_MOVING = {"ncc": "ct", "gradncc": "ct", "mncc": "ct", "net": "bone"}
"""What each objective renders unless told otherwise. The network renders the bones, as in
ProST (it was trained on them). The image similarities render the whole CT: on the bundled chest
CT a bone-only DRR against a whole-CT X-ray moves their minimum 1-3 degrees away from the truth
(``docs/registration.md``, "What each stage renders")."""

_LOSSES = {"ncc": NCCLoss, "gradncc": GradientNCCLoss, "mncc": MultiscaleNCCLoss}


def make_objective(
    name: str,
    *,
    projector: Projector,
    ct: Tensor | None,
    bone: Tensor | None,
    spacing: Sequence[float],
    target: Tensor,
    net: ConvexSimilarityNet | None = None,
    mask: Tensor | None = None,
    moving: str | None = None,
) -> nn.Module:
    """Build the pose objective of one registration stage by name.

    - ``"ncc"``: ``1 - NCC`` of the DRR of the moving volume with ``target``;
    - ``"gradncc"``: ``1 - gradient-NCC`` of the same;
    - ``"mncc"``: ``1 - multiscale NCC`` of the same (global and 4 x 4 patch-wise NCC, see
      :mod:`~prostlab.similarity.patch_ncc`);
    - ``"net"``: the network similarity of the moving volume to ``target`` (cached, see
      :class:`NetObjective`). It renders with ``net``'s own projector, whose camera must be
      ``projector``'s.

    The moving volume is ``ct`` or ``bone`` as ``moving`` says; ``None`` takes the objective's
    default, :data:`DEFAULT_MOVING` (``net``: the bones; the image similarities: the whole CT).

    Args:
        name: one of :data:`OBJECTIVES`.
        projector: the registration's projector (used by the image objectives).
        ct: ``(B | 1, 1, D, H, W)`` whole-CT attenuation, 1/mm.
        bone: ``(B | 1, 1, D, H, W)`` segmented CT attenuation, 1/mm.
        spacing: voxel size in mm, array-axis order, shared by ``ct`` and ``bone``.
        target: ``(B | 1, 1, h, w)`` X-ray(s).
        net: the trained network, required by ``"net"``.
        mask: optional pixel weights for the image objectives (see :func:`ncc`).
        moving: ``"bone"``, ``"ct"`` or ``None`` (the default of ``name``).

    Returns:
        A pose objective (an ``nn.Module``): ``(B, 6) -> (B,)``.
    """
    if name not in OBJECTIVES:
        raise ProstlabError(
            f"name: expected an objective name in {list(OBJECTIVES)}, got {name!r}"
        )
    if moving is None:
        moving = DEFAULT_MOVING[name]
    if moving not in MOVING:
        raise ProstlabError(f"moving: expected one of {list(MOVING)} or None, got {moving!r}")
    volume = ct if moving == "ct" else bone
    if volume is None:
        what = "CT volume" if moving == "ct" else "segmented (bone) volume"
        raise ProstlabError(
            f"{moving}: objective {name!r} needs the {what} (moving={moving!r}), got None"
        )
    if name != "net":
        return ImageObjective(projector, volume, spacing, target, _LOSSES[name](), mask)
    if net is None:
        raise ProstlabError(
            "net: objective 'net' needs a ConvexSimilarityNet (load a checkpoint), got None"
        )
    if isinstance(projector, Projector) and projector.camera != net.camera:
        raise ProstlabError(
            f"net: the network's camera {net.camera} differs from the projector's "
            f"{projector.camera}; expected the same detector geometry"
        )
    return NetObjective(net, volume, spacing, target)


def _check_tensor(x: object, name: str, ndim: int, form: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != ndim:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ProstlabError(f"{name}: expected a tensor of shape {form}, got {got}")
    if not x.is_floating_point():
        raise ProstlabError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    check_real_device(x, name)
