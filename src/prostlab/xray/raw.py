"""What a file reader hands to :func:`prostlab.xray.load_xray`: the pixel values, how they relate
to the beam intensity, and the camera values the file itself carries."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class FileValue:
    """A camera value read from a file, or the note that it is missing.

    Attributes:
        value: a distance in mm, a ``(rows, columns)`` pair in mm, or ``None`` when missing.
        label: where it comes from, for messages: ``"x.dcm: DistanceSourceToDetector
            (0018,1110)"``.
        note: appended to the message when it is missing (why a look-alike tag was not used).
    """

    value: float | tuple[float, float] | None
    label: str
    note: str = ""


@dataclass(frozen=True)
class RawXRay:
    """One projection image as read, before any preprocessing.

    Attributes:
        path: the file.
        values: float64 ``(H, W)`` pixel values (for DICOM after RescaleSlope/Intercept).
        relationship: ``"lin"``: values are linear in the beam intensity; ``"log"``: in its log.
        sign: ``+1``: values grow with the beam intensity; ``-1``: they fall (bone is high).
        value_range: ``(lo, hi)``, the representable values (the stored bit range, rescaled),
            within which a falling linear image is reflected: ``I = lo + hi - value``; ``None``
            when unknown (floating-point files).
        geometry: the camera values the file carries, by key (``sdd``, ``sid``,
            ``pixel_spacing``); empty for files that carry none.
        steps: what reading found worth saying, in words.
    """

    path: Path
    values: np.ndarray
    relationship: str
    sign: int
    value_range: tuple[float, float] | None
    geometry: dict[str, FileValue] = field(default_factory=dict)
    steps: tuple[str, ...] = ()
