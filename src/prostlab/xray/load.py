"""Load one X-ray for registration: file -> intensity -> line integrals on the detector.

:func:`load_xray` runs the steps of ``docs/xray.md`` in order and records each in words:

1. read the file (:mod:`~prostlab.xray.dicom_xray` by content, or
   :mod:`~prostlab.xray.image_file` by name);
2. the camera: the file's values, replaced or completed by the caller's, checked for physical
   sense (:data:`SDD_RANGE_MM`, :data:`PIXEL_SPACING_RANGE_MM`, :data:`MAX_FIELD_MM`);
3. detector intensity: values that fall with the beam intensity are inverted;
4. the usable field (:func:`~prostlab.data.detector.field_mask`);
5. line integrals, ``-log(I / I0)`` (or ``L0 - L`` for a log image);
6. the fit to the detector (:func:`~prostlab.data.detector.fit_to_detector`); unusable
   pixels are set to 0.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prostlab.data.detector import (
    I0_PERCENTILE,
    binning_factor,
    field_mask,
    fit_to_detector,
    line_integrals,
    log_line_integrals,
)
from prostlab.errors import ProstlabError
from prostlab.geometry import Camera
from prostlab.limits import MIN_SPACING_MM, SDD_RANGE_MM
from prostlab.xray.dicom_xray import is_dicom, read_dicom_xray
from prostlab.xray.image_file import IMAGE_SUFFIXES, image_format, read_image_file
from prostlab.xray.raw import FileValue, RawXRay

CAMERA_FLAGS = {"sdd": "--sdd", "sid": "--sid", "pixel_spacing": "--pixel-spacing"}
"""The ``prostlab register`` flag that supplies each camera value (the same names are the keys
of ``load_xray(camera={...})``); ``principal_point`` is a key only."""

_CAMERA_WORDS = {
    "sdd": "the source-to-detector distance in mm",
    "sid": "the source-to-isocentre (patient) distance in mm",
    "pixel_spacing": "the detector pixel spacing (rows, columns) in mm",
}

PIXEL_SPACING_RANGE_MM = (MIN_SPACING_MM, 10.0)
"""Plausible detector pixel sizes: flat panels have 0.07-0.2 mm pixels, binned modes up to
about 1 mm; outside is a wrong unit or a broken header. The lower bound is every command's
(:data:`prostlab.limits.MIN_SPACING_MM`)."""

MAX_FIELD_MM = 1000.0
"""The largest plausible detector side (rows x row spacing, columns x column spacing): the
largest flat panels are 430 mm."""


@dataclass(frozen=True)
class XRay:
    """An X-ray ready for registration.

    Attributes:
        image: float32 ``(h, w)`` line integrals, 0 where ``mask`` is False.
        mask: bool ``(h, w)``, the usable pixels.
        camera: the camera of ``image``.
        source: the file it was read from.
        steps: what the preprocessing did, in words, in order.
        i0: the unattenuated intensity used (for a log image, the log level ``L0``).
        sign: the sign the values were read with: ``+1`` (they grow with the beam intensity)
            or ``-1`` (the flag's, else the file's).
    """

    image: Tensor
    mask: Tensor
    camera: Camera
    source: Path
    steps: list[str]
    i0: float
    sign: int


def read_xray_file(path: str | Path) -> RawXRay:
    """Read ``path`` as DICOM when it starts like one (or is named ``.dcm``, ``.dicom`` or has
    no suffix), else as the image type its name ends with."""
    path = Path(path)
    if not path.is_file():
        raise ProstlabError(f"{path}: no such file; expected an X-ray file")
    if image_format(path) is not None:
        return read_image_file(path)
    if is_dicom(path) or path.suffix.lower() in ("", ".dcm", ".dicom"):
        return read_dicom_xray(path)
    raise ProstlabError(
        f"{path}: unsupported file type; expected DICOM or one of {', '.join(IMAGE_SUFFIXES)}"
    )


def load_xray(
    path: str | Path,
    *,
    detector: tuple[int, int] | None = None,
    camera: Camera | Mapping[str, Any] | None = None,
    i0: float | None = None,
    relationship: str | None = None,
    sign: int | None = None,
    percentile: float = I0_PERCENTILE,
) -> XRay:
    """Read an X-ray file and turn it into line integrals on the detector (module doc).

    Args:
        path: a DICOM file (DX, CR, XA, RF), or a ``.png``, ``.tif``/``.tiff``,
            ``.nii``/``.nii.gz`` or ``.npy`` image.
        detector: ``(h, w)``, the registration detector: the image is binned by an integer
            factor and centre-cropped or padded to it; ``None``: kept at full size.
        camera: a :class:`~prostlab.geometry.Camera` of the file's image (used whole), or a
            mapping with some of ``sdd``, ``sid``, ``pixel_spacing``, ``principal_point`` that
            **replace** the file's values (a ``None`` value is ignored). An image file needs
            ``sdd``, ``sid`` and ``pixel_spacing`` here.
        i0: the unattenuated intensity in the file's values (after rescaling); ``None``:
            estimated. Not accepted for log images.
        relationship: ``"lin"`` or ``"log"``: replaces the file's PixelIntensityRelationship
            (image files: ``"lin"``).
        sign: ``+1`` (values grow with the beam intensity) or ``-1``: replaces the file's
            (image files: ``+1``).
        percentile: of the ``I0`` estimate.

    Returns:
        :class:`XRay`.

    Raises:
        ProstlabError: any refusal of ``docs/refusals.md`` ("X-ray input"), in one line naming
            the file and the tag, flag or key.
    """
    raw = read_xray_file(path)
    name = str(raw.path)
    steps = list(raw.steps)
    height, width = raw.values.shape
    xray_camera = _camera(raw, camera, steps)

    relationship = raw.relationship if relationship is None else relationship
    if relationship not in ("lin", "log"):
        raise ProstlabError(f"relationship: expected 'lin' or 'log', got {relationship!r}")
    if sign is not None and (isinstance(sign, bool) or sign not in (1, -1)):
        raise ProstlabError(f"sign: expected +1 or -1, got {sign!r}")
    sign = raw.sign if sign is None else sign
    intensity = _oriented(raw, relationship, sign, steps)

    mask = field_mask(intensity, relationship=relationship, name=name)
    kept = int(mask.sum())
    if kept < mask.size:
        rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        steps.append(
            f"field mask: rows {rows[0]}-{rows[-1]}, columns {columns[0]}-{columns[-1]} usable "
            f"({100 * kept / mask.size:.1f} % of the pixels); the rest is collimator or blank "
            "border"
        )

    if relationship == "log":
        if i0 is not None:
            raise ProstlabError(
                f"{name}: i0 (--i0) is an intensity, but this image holds log intensities; "
                "leave it out (the log level of air is estimated)"
            )
        image, level = log_line_integrals(intensity, valid=mask, percentile=percentile, name=name)
        steps.append(
            f"line integrals p = L0 - L with L0 = {level:.6g} ({percentile:g}th percentile), "
            "in the image's own log units"
        )
    else:
        image, level = line_integrals(
            intensity, i0=i0, valid=mask, percentile=percentile, name=name
        )
        origin = "given" if i0 is not None else f"estimated, {percentile:g}th percentile"
        steps.append(f"line integrals p = -log(I / I0), I0 = {level:.6g} ({origin})")

    if detector is not None:
        h, w = _detector(detector)
        factor = binning_factor((height, width), (h, w))
        image, mask, xray_camera = fit_to_detector(image, mask, xray_camera, (h, w), factor=factor)
        hb, wb = height // factor, width // factor
        steps.append(
            f"binned {factor}x{factor}: {height} x {width} -> {hb} x {wb}, pixel spacing "
            f"{xray_camera.pixel_spacing[0]:.4g} x {xray_camera.pixel_spacing[1]:.4g} mm"
            if factor > 1 else f"not binned ({height} x {width})"
        )
        if (hb, wb) != (h, w):
            steps.append(_crop_words(hb - h, wb - w) + f" to the {h} x {w} detector")
    image = np.where(mask, image, 0.0).astype(np.float32)
    return XRay(
        image=torch.from_numpy(image),
        mask=torch.from_numpy(mask),
        camera=xray_camera,
        source=raw.path,
        steps=steps,
        i0=level,
        sign=sign,
    )


def _detector(detector: object) -> tuple[int, int]:
    if (
        isinstance(detector, (str, bytes))
        or not hasattr(detector, "__len__")
        or len(detector) != 2
        or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0
                   for n in detector)
    ):
        raise ProstlabError(f"detector: expected (rows, columns), positive integers, got {detector!r}")
    return int(detector[0]), int(detector[1])


def _crop_words(rows: int, columns: int) -> str:
    parts = []
    for count, what in ((rows, "rows"), (columns, "columns")):
        if count:
            parts.append(f"{'cropped' if count > 0 else 'padded'} {abs(count)} {what}")
    return ", ".join(parts)


def _oriented(raw: RawXRay, relationship: str, sign: int, steps: list[str]) -> np.ndarray:
    """Values that grow with the beam intensity: ``I`` (linear) or ``L`` (log)."""
    if sign > 0:
        return raw.values
    if relationship == "log":
        return -raw.values
    if raw.value_range is None:
        raise ProstlabError(
            f"{raw.path}: a linear image whose values fall with the intensity (sign -1) needs "
            "its representable range to be inverted, and floating-point values have none; "
            "save it as integers, or as intensities (sign +1)"
        )
    lo, hi = raw.value_range
    steps.append(f"inverted: I = {lo + hi:g} - value (the reflection within the representable "
                 f"range [{lo:g}, {hi:g}])")
    return lo + hi - raw.values


def _camera(raw: RawXRay, given: Camera | Mapping[str, Any] | None, steps: list[str]) -> Camera:
    """The camera of ``raw``'s image: the caller's values over the file's, checked."""
    height, width = raw.values.shape
    if isinstance(given, Camera):
        if (given.height, given.width) != (height, width):
            raise ProstlabError(
                f"camera: height x width = {given.height} x {given.width}; expected the image's "
                f"{height} x {width} ({raw.path})"
            )
        overrides = {
            "sdd": given.sdd,
            "sid": given.sid,
            "pixel_spacing": given.pixel_spacing,
            "principal_point": given.principal_point,
        }
    else:
        overrides = _overrides(given)
    values: dict[str, FileValue] = {}
    for key, flag in CAMERA_FLAGS.items():
        from_file = raw.geometry.get(key)
        if overrides.get(key) is not None:
            values[key] = FileValue(overrides[key], flag)
            if from_file is not None and from_file.value is not None:
                steps.append(f"{key} = {overrides[key]} from {flag}, not {from_file.label} = "
                             f"{from_file.value}")
        elif from_file is not None and from_file.value is not None:
            values[key] = from_file
        else:
            raise ProstlabError(_missing(raw, key))
    sdd, sid, spacing = (_checked(values, key) for key in ("sdd", "sid", "pixel_spacing"))
    if not sid < sdd:
        raise ProstlabError(
            f"{values['sid'].label} = {sid:g} mm is not less than {values['sdd'].label} = "
            f"{sdd:g} mm; expected the isocentre between the source and the detector"
        )
    for size, step, what in ((height, spacing[0], "rows"), (width, spacing[1], "columns")):
        if size * step > MAX_FIELD_MM:
            raise ProstlabError(
                f"{values['pixel_spacing'].label} = {spacing[0]:g}, {spacing[1]:g} mm gives "
                f"{size} {what} x {step:g} mm = {size * step:.0f} mm of detector; expected at most "
                f"{MAX_FIELD_MM:.0f} mm (a wrong unit?)"
            )
    principal = overrides.get("principal_point")
    try:
        camera = Camera(sdd=sdd, sid=sid, height=height, width=width, pixel_spacing=spacing,
                        principal_point=principal)
    except ProstlabError as error:
        raise ProstlabError(f"camera of {raw.path}: {error}") from error
    steps.append(
        f"camera: sdd {sdd:g} mm, sid {sid:g} mm, pixel spacing {spacing[0]:g} x {spacing[1]:g} mm"
        + (", principal point at the image centre" if principal is None
           else f", principal point ({principal[0]:g}, {principal[1]:g})")
    )
    return camera


def _overrides(given: Mapping[str, Any] | None) -> dict[str, Any]:
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise ProstlabError(
            f"camera: expected a Camera or a mapping of camera values, got {type(given).__name__}"
        )
    known = (*CAMERA_FLAGS, "principal_point")
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ProstlabError(
            f"camera: unknown key(s) {unknown}; expected keys among {list(known)} (the image "
            "gives height and width)"
        )
    return {key: value for key, value in given.items() if value is not None}


def _missing(raw: RawXRay, key: str) -> str:
    flag, words = CAMERA_FLAGS[key], _CAMERA_WORDS[key]
    from_file = raw.geometry.get(key)
    if from_file is not None:
        return (f"{from_file.label} is missing{from_file.note}; give {words} with {flag} "
                f"(camera key '{key}')")
    return (f"{raw.path}: an image file carries no camera; give {words} with {flag} (camera key "
            f"'{key}'), and likewise {', '.join(f for k, f in CAMERA_FLAGS.items() if k != key)}")


def _checked(values: dict[str, FileValue], key: str) -> Any:
    """A camera value as floats, finite, positive and in its plausible range."""
    item = values[key]
    pair = key == "pixel_spacing"
    low, high = {"sdd": SDD_RANGE_MM, "pixel_spacing": PIXEL_SPACING_RANGE_MM}.get(
        key, (0.0, math.inf))
    form = "two numbers (rows, columns) in mm" if pair else "a number in mm"
    try:
        items = [float(v) for v in (item.value if pair else [item.value])]  # type: ignore[union-attr]
    except (TypeError, ValueError) as error:
        raise ProstlabError(f"{item.label} = {item.value!r}: expected {form}") from error
    if len(items) != (2 if pair else 1):
        raise ProstlabError(f"{item.label} = {item.value!r}: expected {form}")
    for number in items:
        if not (math.isfinite(number) and number > 0):
            raise ProstlabError(f"{item.label} = {item.value}: expected positive finite mm")
        if not low <= number <= high:
            raise ProstlabError(
                f"{item.label} = {item.value}: expected {_CAMERA_WORDS[key]} within "
                f"[{low:g}, {high:g}] (a wrong unit or a broken header?)"
            )
    return tuple(items) if pair else items[0]
