"""Preprocessing of one projection X-ray: intensities to line integrals, the usable field, and
the fit to the registration detector.

Plain numpy functions on an image and its :class:`~prostlab.geometry.Camera`, below both of
their users: :mod:`prostlab.xray` (a user's X-ray, :func:`~prostlab.xray.load_xray`) and
:mod:`prostlab.data.deepfluoro` (DeepFluoro's projections) import them from here, so that the
data layer never imports the X-ray package above it.

Images are 2D numpy arrays of shape ``(H, W)``: ``H`` rows (``v``, down the image) and ``W``
columns (``u``), pixel centres at integer ``(u, v)``, as in ``docs/geometry.md``.

**Line integrals.** By Beer-Lambert a pixel behind the attenuation line integral
``p = int mu ds`` (dimensionless: ``mu`` in 1/mm times mm) receives the intensity
``I = I0 exp(-p)``, where ``I0`` is the unattenuated intensity. So

    p = -log(I / I0),

which is what the projector renders (a DRR). ``I`` must be *detector intensity*, proportional
to the photons (or energy) that reached the pixel: :mod:`prostlab.xray.dicom_xray` says how
stored DICOM values become ``I``.

**The field.** Collimator blades and blank borders (zero padding, a saturated or constant fill)
carry no information about the patient, and a ray through a blade is not a line integral through
the CT. :func:`field_mask` peels such rows and columns off the image's edges.

**The detector.** :func:`fit_to_detector` bins the image by an integer factor and crops or pads
it to the registration detector's shape, and changes the :class:`~prostlab.geometry.Camera` so
that every physical point still projects to the same place on the detector.
"""

from __future__ import annotations

import math

import numpy as np

from prostlab.errors import ProstlabError
from prostlab.geometry import Camera

I0_PERCENTILE = 99.5
"""The percentile of the usable pixels' intensities taken as ``I0`` when it is not given."""

INTENSITY_FLOOR = 1e-4
"""Intensities are clipped below at ``INTENSITY_FLOOR * I0`` before the log, so that a pixel
that counted nothing gives ``p = -log(1e-4) = 9.2`` rather than infinity. The line integrals of
a pelvis or chest at 60-120 kV stay well below that (a 12-bit detector resolves at most
``log(4095) = 8.3``)."""


def _check_image(image: object, name: str) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 2:
        raise ProstlabError(f"{name}: expected a 2D image (H, W), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ProstlabError(f"{name}: expected real numbers, got dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise ProstlabError(f"{name}: expected finite values, got NaN or infinity")
    return array


def _check_mask(mask: object, shape: tuple[int, ...], name: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.dtype != np.bool_ or array.shape != shape:
        raise ProstlabError(
            f"{name} mask: expected a bool array of shape {shape}, got {array.dtype} "
            f"{array.shape}"
        )
    return array


def unattenuated_level(
    values: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    percentile: float = I0_PERCENTILE,
    name: str = "image",
) -> float:
    """The ``percentile``-th percentile of ``values[valid]``: the level of unattenuated pixels.

    Pixels that see the source through air are the brightest of an image. A high percentile
    rather than the maximum ignores hot pixels and the upper tail of quantum noise; it still
    sits a little above the mean air level (about 2.6 noise standard deviations at 99.5), which
    shifts every line integral by the same small constant. When no pixel sees air (the field
    lies wholly inside the patient), it is the brightest tissue's level, and the line integrals
    are relative to that tissue: an offset that NCC and gradient-NCC ignore; give ``I0`` when
    absolute values matter.

    Args:
        values: ``(H, W)`` intensities (or log intensities).
        valid: ``(H, W)`` bool, the pixels to use; ``None``: all.
        percentile: in ``(0, 100]``.
        name: the image's name for error messages.
    """
    values = _check_image(values, name)
    if not 0 < percentile <= 100:
        raise ProstlabError(f"percentile: expected a number in (0, 100], got {percentile}")
    if valid is not None:
        values = values[_check_mask(valid, values.shape, name)]
    if values.size == 0:
        raise ProstlabError(f"{name}: no usable pixels to estimate I0 from")
    return float(np.percentile(values, percentile))


def line_integrals(
    intensity: np.ndarray,
    *,
    i0: float | None = None,
    valid: np.ndarray | None = None,
    percentile: float = I0_PERCENTILE,
    floor: float = INTENSITY_FLOOR,
    name: str = "image",
) -> tuple[np.ndarray, float]:
    """Line integrals from detector intensities: ``p = max(0, -log(max(I, floor I0) / I0))``.

    Args:
        intensity: ``(H, W)`` detector intensity ``I``, proportional to the photons that reached
            each pixel (not a log image, not a display rendering).
        i0: the unattenuated intensity ``I0`` in the units of ``intensity``; ``None``: estimated
            by :func:`unattenuated_level` over the ``valid`` pixels.
        valid: ``(H, W)`` bool, the pixels that may be used to estimate ``I0`` (the field, see
            :func:`field_mask`); ``None``: all.
        percentile: the percentile of the estimate.
        floor: intensities below ``floor * I0`` are raised to it (see :data:`INTENSITY_FLOOR`).
        name: the image's name for error messages.

    Returns:
        ``(p, i0)``: the float32 ``(H, W)`` line integrals, ``>= 0`` (pixels brighter than
        ``I0``, which noise makes, give 0), and the ``I0`` used.

    Raises:
        ProstlabError: ``i0`` (given or estimated) is not a positive finite number, e.g. a blank
            image whose usable pixels are all zero.
    """
    intensity = _check_image(intensity, name)
    if i0 is None:
        i0 = unattenuated_level(intensity, valid, percentile=percentile, name=name)
        origin = f"estimated as the {percentile:g}th percentile of the usable pixels"
    else:
        origin = "given"
    if isinstance(i0, bool) or not isinstance(i0, (int, float, np.number)):
        raise ProstlabError(f"i0: expected a positive number, got {type(i0).__name__}")
    i0 = float(i0)
    if not (math.isfinite(i0) and i0 > 0):
        raise ProstlabError(
            f"{name}: I0 = {i0} ({origin}); expected a positive finite unattenuated intensity"
            + ("" if origin == "given" else ": the image has no bright pixels; pass i0 (--i0)")
        )
    if not 0 < floor < 1:
        raise ProstlabError(f"floor: expected a fraction of I0 in (0, 1), got {floor}")
    ratio = np.maximum(intensity.astype(np.float64) / i0, floor)
    p = np.maximum(-np.log(ratio), 0.0)
    return p.astype(np.float32), i0


def log_line_integrals(
    log_intensity: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    percentile: float = I0_PERCENTILE,
    name: str = "image",
) -> tuple[np.ndarray, float]:
    """Line integrals from an image already on a log scale: ``p = max(0, L0 - L)``.

    ``L = a log I + b`` with an unknown scale ``a > 0`` and offset ``b`` (a DICOM image with
    PixelIntensityRelationship LOG). Then ``L0 - L = a p`` with ``L0`` the level of
    unattenuated pixels, estimated by :func:`unattenuated_level`. The result is the line
    integral times the unknown ``a``: NCC and gradient-NCC do not see a positive scale, nor does
    the min-max normalisation of the network's inputs, but the values are not in ``mu``-mm.

    Args:
        log_intensity: ``(H, W)``, increasing with beam intensity.
        valid: ``(H, W)`` bool, the pixels used to estimate ``L0``; ``None``: all.
        percentile: the percentile of the estimate.
        name: the image's name for error messages.

    Returns:
        ``(a p, L0)``: float32 ``(H, W)``, ``>= 0``, and the ``L0`` used.
    """
    log_intensity = _check_image(log_intensity, name)
    l0 = unattenuated_level(log_intensity, valid, percentile=percentile, name=name)
    p = np.maximum(l0 - log_intensity.astype(np.float64), 0.0)
    return p.astype(np.float32), l0


def field_mask(
    values: np.ndarray,
    *,
    relationship: str = "lin",
    tolerance: float = 0.1,
    margin: int = 2,
    name: str = "image",
) -> np.ndarray:
    """The usable field: the image less its collimated and blank border rows and columns.

    The test runs on log intensities ``L``: ``log(max(I, INTENSITY_FLOOR max I))`` for a
    linear image, the values themselves for a log one. On that scale a collimator's shadow is
    flat (its noise is small against the image's range) while a row through the patient is not,
    even where the patient is dense: in linear units, dense tissue looks as flat as a blade.
    Let ``lo`` and ``hi`` be the 0.5th and 99.5th percentiles of ``L`` and ``r = hi - lo``. A
    row or column at the current edge of the field is *border* when, over the field's current
    span,

    - it is constant (its largest and smallest value are equal): zero padding, a fill, a
      saturated band; or
    - it is flat, ``P75 - P25 <= tolerance r``, and not open air, ``median < hi - tolerance r``:
      the shadow of a collimator blade, which lets through a little primary beam and scatter.
      The interquartile range is 1.35 noise standard deviations on a flat line, so quantum noise
      alone does not make a blade's shadow look like anatomy.
      (Whether a blade's shadow is darker than bone depends on the blade and the scatter, so
      darkness alone does not tell.)

    Border lines are peeled off all four edges, again and again, until none is left (peeling the
    left blade can make the top rows flat). Then ``margin`` more pixels are dropped on each
    peeled side, for the blade's penumbra. The collimation is assumed rectangular and aligned
    with the image axes; air is kept, for the ``I0`` estimate.

    Args:
        values: ``(H, W)`` values that grow with the beam intensity.
        relationship: ``"lin"`` (intensities) or ``"log"`` (log intensities, any scale).
        tolerance: the flatness bound, a fraction of the log image's range.
        margin: pixels dropped inside each peeled edge.
        name: the image's name for error messages.

    Returns:
        ``(H, W)`` bool, True on usable pixels: one axis-aligned rectangle.

    Raises:
        ProstlabError: nothing is left, e.g. a constant (blank) image.
    """
    values = _check_image(values, name).astype(np.float64)
    if relationship == "lin":
        top_value = values.max()
        if not top_value > 0:
            raise ProstlabError(
                f"{name}: no positive intensity (largest value {top_value:g}); expected an "
                "exposed image"
            )
        values = np.log(np.maximum(values, INTENSITY_FLOOR * top_value))
    elif relationship != "log":
        raise ProstlabError(f"relationship: expected 'lin' or 'log', got {relationship!r}")
    lo, hi = np.percentile(values, [0.5, 100 - 0.5])
    bound = tolerance * (hi - lo)
    top, bottom, left, right = 0, values.shape[0], 0, values.shape[1]

    def border(line: np.ndarray) -> bool:
        if line.size == 0:
            return False
        if line.max() == line.min():
            return True
        q25, median, q75 = np.percentile(line, [25, 50, 75])
        return q75 - q25 <= bound and median < hi - bound

    changed = True
    while changed and top < bottom and left < right:
        changed = False
        while top < bottom and border(values[top, left:right]):
            top, changed = top + 1, True
        while bottom > top and border(values[bottom - 1, left:right]):
            bottom, changed = bottom - 1, True
        while left < right and border(values[top:bottom, left]):
            left, changed = left + 1, True
        while right > left and border(values[top:bottom, right - 1]):
            right, changed = right - 1, True
    if top > 0:
        top += margin
    if left > 0:
        left += margin
    if bottom < values.shape[0]:
        bottom -= margin
    if right < values.shape[1]:
        right -= margin
    if top >= bottom or left >= right:
        raise ProstlabError(
            f"{name}: no usable pixels: the image is blank (constant) or wholly collimated; "
            "expected an exposed field"
        )
    mask = np.zeros(values.shape, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def binning_factor(image_shape: tuple[int, int], detector: tuple[int, int]) -> int:
    """The integer bin ``f = max(1, round(min(H / h, W / w)))`` that brings an ``(H, W)`` image
    closest to an ``(h, w)`` detector while keeping square bins and the whole detector covered
    up to a crop or pad of less than half a bin per side."""
    (height, width), (h, w) = image_shape, detector
    return max(1, int(math.floor(min(height / h, width / w) + 0.5)))


def fit_to_detector(
    image: np.ndarray,
    mask: np.ndarray,
    camera: Camera,
    shape: tuple[int, int],
    *,
    factor: int | None = None,
) -> tuple[np.ndarray, np.ndarray, Camera]:
    """Bin an image by ``f x f`` blocks and centre-crop or pad it to ``shape``, with its camera.

    1. **Bin.** The trailing ``H mod f`` rows and ``W mod f`` columns are dropped. Output pixel
       ``(i, j)`` is the mean of the usable pixels of block ``[f i, f i + f) x [f j, f j + f)``
       and is usable when at least half of the block is. A pixel coordinate maps as
       ``u' = (u + 1/2) / f - 1/2`` (the block's edge at ``-1/2`` stays there), so the
       principal point becomes ``c' = (c + 1/2) / f - 1/2`` and the pixel spacing ``f (dv, du)``:
       ``K' = diag(1/f, 1/f, 1) K`` up to the half-pixel shift.
    2. **Crop or pad.** Row offset ``o_v = (H' - h) // 2`` and column offset
       ``o_u = (W' - w) // 2`` (negative: padding, with masked zeros); ``c'' = c' - o``.

    Averaging line integrals (rather than intensities) matches a DRR rendered at the binned
    camera: the ray through a big pixel's centre sees about the mean of its sub-pixels' line
    integrals.

    Args:
        image: ``(H, W)`` line integrals.
        mask: ``(H, W)`` bool, usable pixels.
        camera: the camera of ``image`` (``height = H``, ``width = W``).
        shape: ``(h, w)``, the detector.
        factor: the bin; ``None``: :func:`binning_factor`.

    Returns:
        ``(image, mask, camera)``: float32 ``(h, w)`` with 0 where unusable, bool ``(h, w)``,
        and the camera of the result.
    """
    image = _check_image(image, "image")
    mask = _check_mask(mask, image.shape, "image")
    height, width = image.shape
    if (camera.height, camera.width) != (height, width):
        raise ProstlabError(
            f"camera: expected height x width = {height} x {width} (the image's), got "
            f"{camera.height} x {camera.width}"
        )
    h, w = (int(n) for n in shape)
    if h < 1 or w < 1:
        raise ProstlabError(f"detector: expected a positive (rows, columns), got {shape}")
    f = binning_factor((height, width), (h, w)) if factor is None else int(factor)
    if f < 1 or f > min(height, width):
        raise ProstlabError(f"factor: expected an integer bin in [1, {min(height, width)}], got {f}")

    hb, wb = height // f, width // f
    blocks = image[: hb * f, : wb * f].reshape(hb, f, wb, f).astype(np.float64)
    used = mask[: hb * f, : wb * f].reshape(hb, f, wb, f)
    count = used.sum(axis=(1, 3))
    total = np.where(used, blocks, 0.0).sum(axis=(1, 3))
    binned_mask = 2 * count >= f * f
    binned = np.divide(total, count, out=np.zeros((hb, wb)), where=binned_mask)
    binned_camera = _moved(camera, 0, 0, hb * f, wb * f).resized(hb, wb)

    top, left = (hb - h) // 2, (wb - w) // 2
    out = np.zeros((h, w), dtype=np.float32)
    out_mask = np.zeros((h, w), dtype=bool)
    src_rows, dst_rows = _overlap(top, hb, h)
    src_cols, dst_cols = _overlap(left, wb, w)
    out[dst_rows, dst_cols] = binned[src_rows, src_cols]
    out_mask[dst_rows, dst_cols] = binned_mask[src_rows, src_cols]
    return out, out_mask, _moved(binned_camera, top, left, h, w)


def _overlap(offset: int, size: int, target: int) -> tuple[slice, slice]:
    """Source and destination slices of a crop (``offset >= 0``) or pad (``offset < 0``)."""
    start = max(offset, 0)
    stop = min(offset + target, size)
    return slice(start, stop), slice(start - offset, stop - offset)


def _moved(camera: Camera, top: int, left: int, height: int, width: int) -> Camera:
    """The camera of the ``height x width`` window whose pixel ``(0, 0)`` is the original's
    ``(left, top)``: same distances and spacing, principal point ``(cx - left, cy - top)``; a
    principal point at the window's centre is written as the default ``None``."""
    cx, cy = camera.cx - left, camera.cy - top
    centred = abs(cx - (width - 1) / 2) <= 1e-9 and abs(cy - (height - 1) / 2) <= 1e-9
    return Camera(
        sdd=camera.sdd,
        sid=camera.sid,
        height=height,
        width=width,
        pixel_spacing=camera.pixel_spacing,
        principal_point=None if centred else (cx, cy),
    )
