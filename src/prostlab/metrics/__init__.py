"""Registration metrics: rotation and translation errors, mTRE, mPD, DiffPose's
landmark score and success rate.

Functions (:mod:`prostlab.metrics.functional`) return one value per case; the torchmetrics
classes (:mod:`prostlab.metrics.modules`) average them over a test loop and across processes.
Units: degrees for rotation errors, mm for everything else. Definitions and frames are in the
functions' docstrings and ``docs/registration.md``.
"""

from prostlab.metrics.functional import (
    DEFAULT_SUCCESS_THRESHOLD_MM,
    DIFFPOSE_SCALE,
    diffpose_mtre,
    mean_projection_distance,
    mtre,
    rotation_error,
    success,
    target_points_from_mask,
    translation_error,
)
from prostlab.metrics.modules import (
    MeanProjectionDistance,
    MeanTargetRegistrationError,
    RotationError,
    SuccessRate,
    TranslationError,
)

__all__ = [
    "DEFAULT_SUCCESS_THRESHOLD_MM",
    "DIFFPOSE_SCALE",
    "MeanProjectionDistance",
    "MeanTargetRegistrationError",
    "RotationError",
    "SuccessRate",
    "TranslationError",
    "diffpose_mtre",
    "mean_projection_distance",
    "mtre",
    "rotation_error",
    "success",
    "target_points_from_mask",
    "translation_error",
]
