"""Real X-rays: read a projection X-ray and its camera, and turn it into line integrals on the
registration detector (``docs/xray.md``)."""

from prostlab.xray.preprocess import (
    binning_factor,
    field_mask,
    fit_to_detector,
    line_integrals,
    log_line_integrals,
    unattenuated_level,
)

__all__ = [
    "binning_factor",
    "field_mask",
    "fit_to_detector",
    "line_integrals",
    "log_line_integrals",
    "unattenuated_level",
]
