"""torchmetrics wrappers of :mod:`prostlab.metrics.functional`, for test loops and DDP.

Each metric accumulates a float64 ``total`` and a ``count`` (both summed across processes by
``dist_reduce_fx="sum"``) and computes their ratio: the mean over every case seen, whichever
process saw it. Poses must be finite (a failed registration still reports its last finite pose,
see :class:`prostlab.registration.RegistrationRecord`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from prostlab.errors import ProstlabError
from prostlab.geometry import Camera
from prostlab.metrics.functional import (
    DEFAULT_SUCCESS_THRESHOLD_MM,
    PLANES,
    mean_projection_distance,
    mtre,
    rotation_error,
    success,
    translation_error,
)

__all__ = [
    "MeanProjectionDistance",
    "MeanTargetRegistrationError",
    "RotationError",
    "SuccessRate",
    "TranslationError",
]


class _MeanError(Metric):
    """The mean of a per-case error over all updates (and processes)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    total: Tensor
    count: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _accumulate(self, errors: Tensor) -> None:
        self.total += errors.detach().double().sum()
        self.count += errors.numel()

    def compute(self) -> Tensor:
        """The mean error over the cases seen, float64 (NaN before any)."""
        return self.total / self.count


class RotationError(_MeanError):
    """Mean geodesic rotation error, degrees (:func:`~prostlab.metrics.rotation_error`)."""

    def update(self, est: Tensor, gt: Tensor) -> None:
        """Add a batch of ``(B, 6)`` estimated and ground-truth poses."""
        self._accumulate(rotation_error(est, gt))


class TranslationError(_MeanError):
    """Mean translation error ``|t_est - t_gt|``, mm, isocentre frame."""

    def update(self, est: Tensor, gt: Tensor) -> None:
        """Add a batch of ``(B, 6)`` estimated and ground-truth poses."""
        self._accumulate(translation_error(est, gt))


class MeanTargetRegistrationError(_MeanError):
    """Mean over cases of the mTRE, mm (:func:`~prostlab.metrics.mtre`)."""

    def update(self, est: Tensor, gt: Tensor, points: Tensor) -> None:
        """Add poses ``(B, 6)`` with their target points ``(N, 3)`` or ``(B, N, 3)`` (mm)."""
        self._accumulate(mtre(est, gt, points))


class MeanProjectionDistance(_MeanError):
    """Mean over cases of the mPD, mm on the detector (or at the isocentre plane).

    Args:
        camera: the camera the points are projected with.
        plane: ``"detector"`` (default) or ``"isocentre"``.
    """

    def __init__(self, camera: Camera, plane: str = "detector", **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(camera, Camera):
            raise ProstlabError(f"camera: expected a prostlab.geometry.Camera, got {type(camera)}")
        if plane not in PLANES:
            raise ProstlabError(f"plane: expected one of {PLANES}, got {plane!r}")
        self.camera, self.plane = camera, plane

    def update(self, est: Tensor, gt: Tensor, points: Tensor) -> None:
        """Add poses ``(B, 6)`` with their target points ``(N, 3)`` or ``(B, N, 3)`` (mm)."""
        self._accumulate(mean_projection_distance(est, gt, points, self.camera, self.plane))


class SuccessRate(Metric):
    """The fraction of cases whose mTRE is below ``threshold`` mm (default 10 mm)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    successes: Tensor
    count: Tensor

    def __init__(self, threshold: float = DEFAULT_SUCCESS_THRESHOLD_MM, **kwargs) -> None:
        super().__init__(**kwargs)
        success(torch.zeros(1), threshold)  # validates the threshold
        self.threshold = float(threshold)
        self.add_state("successes", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, est: Tensor, gt: Tensor, points: Tensor) -> None:
        """Add poses ``(B, 6)`` with their target points ``(N, 3)`` or ``(B, N, 3)`` (mm)."""
        hits = success(mtre(est, gt, points), self.threshold)
        self.successes += hits.sum()
        self.count += hits.numel()

    def compute(self) -> Tensor:
        """Successes / cases, float64 (NaN before any update)."""
        return self.successes.double() / self.count
