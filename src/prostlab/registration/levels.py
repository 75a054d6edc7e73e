"""Resolution levels: the detector, volume and targets a coarse-to-fine stage works at.

A stage with ``detector_scale = s`` and ``volume_downsample = f`` (:class:`~prostlab.
registration.Stage`) renders on the camera :meth:`Camera.scaled(s) <prostlab.geometry.Camera.
scaled>`: ``s h x s w`` pixels of ``1 / s`` times the pixel spacing, over the same field of view,
with the principal point mapped so that a ray hits the same physical spot of the detector. The
volume is average-pooled by ``f`` (voxel ``j`` of the coarse volume is the mean of voxels
``f j ... f j + f - 1`` along each axis, so its centre stays put when ``f`` divides the shape)
and its spacing multiplied by ``f``; the sampling step grows by ``f`` too. The targets (and a
mask) are average-pooled to the coarse detector, so each coarse pixel is the mean of the fine
pixels it covers.

One :class:`Level` is built per distinct ``(s, f)`` of a schedule, before the first iteration:
nothing is pooled or rebuilt per iteration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from prostlab.errors import ProstlabError
from prostlab.projector import Projector

__all__ = ["Level", "build_level"]


@dataclass(frozen=True)
class Level:
    """What the stages of one resolution render and compare with.

    Attributes:
        projector: renders on the level's detector, with the level's step.
        spacing: the level's voxel size, mm, array-axis order.
        target: ``(B, 1, h', w')`` targets on the level's detector.
        ct: ``(B | 1, 1, D', H', W')`` whole CT, or None.
        bone: ``(B | 1, 1, D', H', W')`` segmented volume, or None.
        mask: ``(B | 1, 1, h', w')`` pixel weights, or None.
    """

    projector: Projector
    spacing: tuple[float, ...]
    target: Tensor
    ct: Tensor | None
    bone: Tensor | None
    mask: Tensor | None


def _pool_volume(volume: Tensor | None, factor: int, where: str, name: str) -> Tensor | None:
    if volume is None or factor == 1:
        return volume
    shape = tuple(volume.shape[2:])
    if any(n % factor for n in shape):
        raise ProstlabError(
            f"{where}.volume_downsample: expected a factor that divides the {name} volume's "
            f"shape {shape}, got {factor}"
        )
    return F.avg_pool3d(volume, factor)


def build_level(
    projector: Projector,
    spacing: Sequence[float],
    target: Tensor,
    ct: Tensor | None,
    bone: Tensor | None,
    mask: Tensor | None,
    detector_scale: float,
    volume_downsample: int,
    where: str = "stage",
) -> Level:
    """The projector, volumes and targets at ``detector_scale`` and ``volume_downsample``.

    At ``(1, 1)`` the inputs are returned as they are. Errors name ``<where>.detector_scale``
    (the detector size times the scale must be whole pixels) or ``<where>.volume_downsample``
    (the factor must divide every volume's shape).

    Args:
        projector: the full-resolution projector.
        spacing: full-resolution voxel size, mm.
        target: ``(B, 1, h, w)`` targets on ``projector``'s detector.
        ct: ``(B | 1, 1, D, H, W)`` or None.
        bone: ``(B | 1, 1, D, H, W)`` or None.
        mask: ``(B | 1, 1, h, w)`` weights in ``[0, 1]`` or None.
        detector_scale: in ``(0, 1]``.
        volume_downsample: integer ``>= 1``.
        where: the name of the stage, for errors.
    """
    spacing = tuple(float(s) for s in spacing)
    if detector_scale == 1 and volume_downsample == 1:
        return Level(projector, spacing, target, ct, bone, mask)
    camera = projector.camera
    if detector_scale != 1:
        try:
            camera = camera.scaled(detector_scale)
        except ProstlabError as error:
            raise ProstlabError(
                f"{where}.detector_scale: expected a scale that makes the {camera.height} x "
                f"{camera.width} detector whole pixels, got {detector_scale}"
            ) from error
        size = (camera.height, camera.width)
        target = F.adaptive_avg_pool2d(target, size)
        mask = None if mask is None else F.adaptive_avg_pool2d(mask.to(target.dtype), size)
    level_projector = Projector(
        camera,
        step=projector.step * volume_downsample,
        backend=projector.backend,
        max_samples=projector.max_samples,
    )
    return Level(
        level_projector,
        tuple(s * volume_downsample for s in spacing),
        target,
        _pool_volume(ct, volume_downsample, where, "ct"),
        _pool_volume(bone, volume_downsample, where, "bone"),
        mask,
    )
