"""Real X-rays: read a projection X-ray and its camera, and turn it into line integrals on the
registration detector (``docs/xray.md``).

:func:`load_xray` is the entry point; :mod:`~prostlab.data.detector` holds its steps as plain
numpy functions, and :func:`write_synthetic_dicom` writes a test image of a CT at a known pose.
"""

from prostlab.data.detector import (
    binning_factor,
    field_mask,
    fit_to_detector,
    line_integrals,
    log_line_integrals,
    unattenuated_level,
)
from prostlab.xray.dicom_xray import is_dicom, read_dicom_xray
from prostlab.xray.image_file import read_image_file
from prostlab.xray.load import CAMERA_FLAGS, XRay, load_xray, read_xray_file
from prostlab.xray.raw import RawXRay
from prostlab.xray.synthetic import SyntheticXRay, write_synthetic_dicom

__all__ = [
    "CAMERA_FLAGS",
    "RawXRay",
    "SyntheticXRay",
    "XRay",
    "binning_factor",
    "field_mask",
    "fit_to_detector",
    "is_dicom",
    "line_integrals",
    "load_xray",
    "log_line_integrals",
    "read_dicom_xray",
    "read_image_file",
    "read_xray_file",
    "unattenuated_level",
    "write_synthetic_dicom",
]
