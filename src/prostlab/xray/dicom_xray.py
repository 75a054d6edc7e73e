"""Read one projection X-ray DICOM file (DX, CR, XA, RF): its pixels, their meaning, its camera.

**Values.** ``value = RescaleSlope * stored + RescaleIntercept`` (the linear Modality LUT;
absent tags mean 1 and 0; the slope must be positive). The representable values are the stored
range of BitsStored bits, ``[0, 2^B - 1]`` (or ``[-2^(B-1), 2^(B-1) - 1]`` when
PixelRepresentation is 1), rescaled.

**Direction.** Whether values grow or fall with the beam intensity is what turns them into
detector intensity ``I``, and PhotometricInterpretation does not say it: it says how to *display*
the values (MONOCHROME1: the lowest value is white; MONOCHROME2: black), not what they measure.

1. PixelIntensityRelationshipSign (0028,1041), when present (it is required in DX): ``+1``,
   lower stored values mean less beam intensity; ``-1``, higher stored values mean less.
2. Otherwise the display convention of the modality decides. A radiograph (DX, CR) is shown
   with dense matter white: white is *low* intensity, so MONOCHROME1 values (white = low value)
   grow with the intensity and MONOCHROME2 values fall. Fluoroscopy (XA, RF) is shown with
   dense matter dark: MONOCHROME2 values grow with the intensity and MONOCHROME1 values fall.
   PresentationLUTShape INVERSE swaps black and white, and so swaps the answer.

Values that fall are *inverted* before anything else: for a linear image
``I = lo + hi - value``, the reflection within the representable range (``2^B - 1 - stored``
for unsigned pixels, then rescaled); the reflection point matters, since ``-log(I / I0)`` is not
blind to an offset. For a log image only the order matters (``L = -value``).

**Relationship.** PixelIntensityRelationship (0028,1040): LIN, values linear in the intensity;
LOG, values already log-transformed (``a log I + b``, scale unknown); DISP (XA, RF: processed
for display) or absent: read as LIN, and said so in the steps.

**Camera** (``docs/xray.md``): DistanceSourceToDetector (0018,1110) is ``sdd``,
DistanceSourceToPatient (0018,1111) is ``sid`` (DICOM: the source to the isocentre, the centre
of the field of view, which is prostlab's isocentre), ImagerPixelSpacing (0018,1164) is the
``(rows, columns)`` spacing at the detector. PixelSpacing (0028,0030) is *not* used: in a
projection image it is measured at the patient (or is a calibration of some plane), so it is
smaller than the detector's by an unknown magnification. The principal point is the image
centre: these modules carry no other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from prostlab.errors import ProstlabError
from prostlab.xray.raw import FileValue, RawXRay

PROJECTION_MODALITIES = ("DX", "CR", "XA", "RF")
"""Modalities read as projection X-rays; others (CT, MR, ...) are refused."""

FLUOROSCOPY_MODALITIES = ("XA", "RF")
"""Modalities displayed with dense matter dark (see the module doc, "Direction")."""

GEOMETRY_TAGS = {
    "sdd": "DistanceSourceToDetector (0018,1110)",
    "sid": "DistanceSourceToPatient (0018,1111)",
    "pixel_spacing": "ImagerPixelSpacing (0018,1164)",
}
"""The tag that gives each camera value."""

_DICOM_MAGIC_OFFSET = 128


def is_dicom(path: str | Path) -> bool:
    """Whether ``path`` starts like a DICOM file: 128 bytes of preamble, then ``DICM``."""
    try:
        with open(path, "rb") as file:
            head = file.read(_DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    return head[_DICOM_MAGIC_OFFSET:] == b"DICM"


def read_dicom_xray(path: str | Path) -> RawXRay:
    """Read a single-frame greyscale projection X-ray DICOM file.

    Returns:
        a :class:`~prostlab.xray.raw.RawXRay` with the rescaled values, their relationship and
        sign as the module doc decides them, the representable range, and the three camera
        values (each ``None`` where its tag is missing).

    Raises:
        ProstlabError: not DICOM, not a projection modality, several frames or colour samples,
            pixel data that does not match Rows x Columns, values outside BitsStored, or a
            non-positive RescaleSlope. The message names the file and the tag.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as error:
        # pydicom's own advice ("use force=True") is for its API, not for this command's user.
        reason = str(error).split(". Use force=True")[0].strip()
        raise ProstlabError(
            f"{path}: not a readable DICOM file ({type(error).__name__}: {reason}); expected a "
            "DICOM X-ray (DX, CR, XA, RF)"
        ) from error
    steps = []
    modality = str(ds.get("Modality", "")).upper()
    if not modality:
        modality = "DX"
        steps.append("Modality (0008,0060) missing: read as a radiograph (DX)")
    elif modality not in PROJECTION_MODALITIES:
        raise ProstlabError(
            f"{path}: Modality (0008,0060) is {modality}; expected a projection X-ray "
            f"({', '.join(PROJECTION_MODALITIES)})"
        )
    stored = _stored_pixels(ds, path)
    lo, hi = _stored_range(ds, path)
    if stored.min() < lo or stored.max() > hi:
        raise ProstlabError(
            f"{path}: stored values span [{stored.min()}, {stored.max()}], outside the "
            f"BitsStored (0028,0101) range [{lo}, {hi}]"
        )
    slope = _number(ds, "RescaleSlope", "(0028,1053)", 1.0, path)
    intercept = _number(ds, "RescaleIntercept", "(0028,1052)", 0.0, path)
    if not slope > 0:
        raise ProstlabError(
            f"{path}: RescaleSlope (0028,1053) is {slope}; expected a positive number"
        )
    if "ModalityLUTSequence" in ds:
        steps.append("ModalityLUTSequence (0028,3000) not applied: values are the stored ones")
    values = stored.astype(np.float64) * slope + intercept
    rows, columns = values.shape
    steps.insert(
        0,
        f"read {modality} DICOM, {rows} x {columns} pixels, {hi - lo + 1:.0f} stored levels, "
        f"value = {slope:g} * stored + {intercept:g}",
    )
    relationship = _relationship(ds, steps)
    sign = _sign(ds, modality, path, steps)
    return RawXRay(
        path=path,
        values=values,
        relationship=relationship,
        sign=sign,
        value_range=(lo * slope + intercept, hi * slope + intercept),
        geometry=_geometry(ds, path),
        steps=tuple(steps),
    )


def _stored_pixels(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    """The ``(Rows, Columns)`` stored pixel array, checked against the header."""
    if "PixelData" not in ds:
        raise ProstlabError(f"{path}: no PixelData (7FE0,0010); expected an image")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ProstlabError(
            f"{path}: NumberOfFrames (0028,0008) is {frames}; expected a single frame "
            "(save the frame to register as its own file)"
        )
    photometric = str(ds.get("PhotometricInterpretation", ""))
    samples = int(ds.get("SamplesPerPixel", 1))
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or samples != 1:
        raise ProstlabError(
            f"{path}: PhotometricInterpretation (0028,0004) is {photometric or 'missing'} with "
            f"{samples} sample(s) per pixel; expected MONOCHROME1 or MONOCHROME2 (greyscale)"
        )
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as error:
        raise ProstlabError(
            f"{path}: Rows (0028,0010) or Columns (0028,0011) missing or not a number"
        ) from error
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and not syntax.is_compressed:
        expected = rows * columns * (int(ds.get("BitsAllocated", 16)) // 8)
        if len(ds.PixelData) not in (expected, expected + 1):
            raise ProstlabError(
                f"{path}: Rows (0028,0010) x Columns (0028,0011) = {rows} x {columns} needs "
                f"{expected} bytes of pixel data, the file holds {len(ds.PixelData)}; expected "
                "Rows and Columns to match the pixel data"
            )
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as error:  # pydicom raises many types for broken or undecodable data
        raise ProstlabError(
            f"{path}: cannot decode the pixel data ({type(error).__name__}: {error})"
        ) from error
    if pixels.shape != (rows, columns):
        raise ProstlabError(
            f"{path}: Rows (0028,0010) x Columns (0028,0011) = {rows} x {columns}, but the "
            f"pixel data decodes to shape {pixels.shape}"
        )
    return pixels


def _stored_range(ds: pydicom.Dataset, path: Path) -> tuple[int, int]:
    """``(lo, hi)`` representable in BitsStored bits, signed when PixelRepresentation is 1."""
    allocated = int(ds.get("BitsAllocated", 16))
    bits = int(ds.get("BitsStored", allocated))
    if not 1 <= bits <= allocated:
        raise ProstlabError(
            f"{path}: BitsStored (0028,0101) is {bits}; expected 1 to BitsAllocated = {allocated}"
        )
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _number(ds: pydicom.Dataset, keyword: str, tag: str, default: float, path: Path) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise ProstlabError(f"{path}: {keyword} {tag} is {value!r}; expected a number") from error
    if not np.isfinite(number):
        raise ProstlabError(f"{path}: {keyword} {tag} is {number}; expected a finite number")
    return number


def _relationship(ds: pydicom.Dataset, steps: list[str]) -> str:
    """``"lin"`` or ``"log"`` from PixelIntensityRelationship (0028,1040)."""
    value = str(ds.get("PixelIntensityRelationship", "")).upper()
    if value == "LOG":
        steps.append("PixelIntensityRelationship (0028,1040) LOG: values are log intensities")
        return "log"
    if value != "LIN":
        said = f"is {value}" if value else "missing"
        steps.append(f"PixelIntensityRelationship (0028,1040) {said}: values read as linear")
    return "lin"


def _sign(ds: pydicom.Dataset, modality: str, path: Path, steps: list[str]) -> int:
    """``+1`` when values grow with the beam intensity, ``-1`` when they fall (module doc)."""
    tagged = ds.get("PixelIntensityRelationshipSign")
    if tagged is not None and tagged != "":
        sign = int(tagged)
        if sign not in (1, -1):
            raise ProstlabError(
                f"{path}: PixelIntensityRelationshipSign (0028,1041) is {sign}; expected +1 or -1"
            )
        if sign < 0:
            steps.append(
                "PixelIntensityRelationshipSign (0028,1041) -1: higher values mean less beam "
                "intensity"
            )
        return sign
    photometric = str(ds.PhotometricInterpretation)
    inverse = str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    high_is_white = (photometric == "MONOCHROME2") != inverse
    white_is_intensity = modality in FLUOROSCOPY_MODALITIES
    sign = 1 if high_is_white == white_is_intensity else -1
    convention = "dense matter dark" if white_is_intensity else "dense matter white"
    steps.append(
        f"PixelIntensityRelationshipSign (0028,1041) missing: {modality} is shown with "
        f"{convention}, so {photometric}{' with an INVERSE presentation LUT' if inverse else ''} "
        + ("values fall with the beam intensity" if sign < 0 else "values grow with the beam "
           "intensity")
    )
    return sign


def _geometry(ds: pydicom.Dataset, path: Path) -> dict[str, FileValue]:
    """The camera values of the module doc, each ``None`` where its tag is missing."""
    geometry = {}
    for key, tag in GEOMETRY_TAGS.items():
        keyword = tag.split()[0]
        raw = ds.get(keyword)
        label = f"{path}: {tag}"
        if raw is None or raw == "":
            value = None
        else:
            try:
                items = [float(x) for x in (raw if key == "pixel_spacing" else [raw])]
            except (TypeError, ValueError) as error:
                raise ProstlabError(f"{label} is {raw!r}; expected numbers in mm") from error
            if key == "pixel_spacing" and len(items) != 2:
                raise ProstlabError(
                    f"{label} is {raw!r}; expected two values (row spacing, column spacing) in mm"
                )
            value = tuple(items) if key == "pixel_spacing" else items[0]
        note = ""
        if key == "pixel_spacing" and value is None and "PixelSpacing" in ds:
            note = (
                " (PixelSpacing (0028,0030) is present but measured at the patient, not the "
                "detector, so it is not used)"
            )
        geometry[key] = FileValue(value, label, note)
    return geometry
