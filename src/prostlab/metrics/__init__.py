"""Registration metrics: rotation and translation errors, mTRE, mPD, DiffPose's
landmark score and success rate.

Functions (:mod:`prostlab.metrics.functional`) return one value per case; the torchmetrics
classes (:mod:`prostlab.metrics.modules`) average them over a test loop and across processes.
Units: degrees for rotation errors, mm for everything else. Definitions and frames are in the
functions' docstrings and ``docs/registration.md``. The classes are imported on first use:
torchmetrics takes over a second to import, which ``prostlab register`` and ``render``, which
use only the functions, need not pay.
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


_TORCHMETRICS = ("MeanProjectionDistance", "MeanTargetRegistrationError", "RotationError",
                 "SuccessRate", "TranslationError")


def __getattr__(name: str):
    if name in _TORCHMETRICS:
        from prostlab.metrics import modules

        return getattr(modules, name)
    raise AttributeError(f"module 'prostlab.metrics' has no attribute {name!r}")
