"""A synthetic projection X-ray DICOM file of a CT at a known pose, for tests and demos.

The image is made as a detector would make it, so that reading it back exercises every step of
:func:`prostlab.xray.load_xray`:

1. the DRR ``p`` of the volume at ``pose`` and ``camera`` (prostlab's projector), usually at a
   finer pixel spacing than the registration detector, so that the reader bins it;
2. a collimated border: bands of ``collimation_px`` pixels where the blades let through the
   fraction ``collimator_transmission``, i.e. ``p = -log(transmission)``;
3. Poisson quantum noise at ``photons`` per unattenuated pixel
   (:func:`prostlab.data.noise.poisson_noise`), and the intensity ``I = I0 exp(-p_noisy)``;
4. quantisation: ``stored = round((I - intercept) / slope)`` clipped to ``[0, 2^B - 1]``;
5. a DX "for processing" file with PixelIntensityRelationship LIN. MONOCHROME1 (dense matter
   white, as radiographs are shown) stores values that grow with the intensity
   (PixelIntensityRelationshipSign +1); MONOCHROME2 stores ``2^B - 1 - stored`` (sign -1).

The ground truth comes back in :class:`SyntheticXRay`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    generate_uid,
)
from torch import Tensor

from prostlab.data.noise import poisson_noise
from prostlab.data.volume import Volume
from prostlab.errors import ProstlabError
from prostlab.geometry import Camera, check_pose
from prostlab.projector import Projector


@dataclass(frozen=True)
class SyntheticXRay:
    """What :func:`write_synthetic_dicom` wrote.

    Attributes:
        path: the DICOM file.
        pose: ``(1, 6)`` float64, the ground-truth pose (rad, mm) of the volume.
        camera: the camera of the file's image (its tags give it back).
        line_integrals: float32 ``(H, W)``, the noise-free DRR at ``camera``, without the
            collimator.
        i0: the unattenuated intensity, in rescaled values.
        collimation_px: ``(top, bottom, left, right)`` widths of the collimated bands.
    """

    path: Path
    pose: Tensor
    camera: Camera
    line_integrals: np.ndarray
    i0: float
    collimation_px: tuple[int, int, int, int]


def write_synthetic_dicom(
    path: str | Path,
    volume: Volume,
    pose: Tensor,
    camera: Camera,
    *,
    bits_stored: int = 12,
    i0: float | None = None,
    rescale: tuple[float, float] = (2.0, -40.0),
    photometric: str = "MONOCHROME1",
    sign_tag: bool = True,
    collimation_px: int | tuple[int, int, int, int] = (10, 6, 8, 4),
    collimator_transmission: float = 0.02,
    photons: float | None = 20000.0,
    seed: int = 0,
    step: float | None = None,
) -> SyntheticXRay:
    """Render ``volume`` at ``pose`` and write it as a DX DICOM file (module doc).

    Args:
        path: the file to write.
        volume: attenuation ``mu`` in 1/mm (its first channel is rendered).
        pose: ``(1, 6)`` pose, rad and mm.
        camera: the detector of the file, with a centred principal point (DX has no tag for
            another); finer than the registration detector, so that the reader bins it.
        bits_stored: 12 or 16.
        i0: the unattenuated intensity in rescaled values; ``None``: 80 % of the largest
            representable value, which leaves headroom for noise.
        rescale: ``(RescaleSlope, RescaleIntercept)``; the slope must be positive.
        photometric: ``"MONOCHROME1"`` or ``"MONOCHROME2"``.
        sign_tag: write PixelIntensityRelationshipSign (0028,1041); without it the reader falls
            back on the photometric interpretation.
        collimation_px: widths of the collimated bands, one for all sides or ``(top, bottom,
            left, right)``.
        collimator_transmission: the fraction of the beam the blades let through, in (0, 1).
        photons: unattenuated photons per pixel; ``None``: no noise.
        seed: of the noise.
        step: the projector's sampling step, mm; ``None``: the smallest voxel side.

    Returns:
        :class:`SyntheticXRay`, with the ground-truth pose and camera.
    """
    path = Path(path)
    pose = check_pose(pose).detach().to(torch.float64).cpu()
    if pose.shape[0] != 1:
        raise ProstlabError(f"pose: expected shape (1, 6), got {tuple(pose.shape)}")
    if camera.principal_point is not None:
        raise ProstlabError("camera.principal_point: a DX file has no tag for it; expected None")
    if bits_stored not in (12, 16):
        raise ProstlabError(f"bits_stored: expected 12 or 16, got {bits_stored}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ProstlabError(f"photometric: expected MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    slope, intercept = (float(x) for x in rescale)
    if not slope > 0:
        raise ProstlabError(f"rescale: expected a positive slope, got {slope}")
    if not 0 < collimator_transmission < 1:
        raise ProstlabError(
            f"collimator_transmission: expected a fraction in (0, 1), got {collimator_transmission}"
        )
    top, bottom, left, right = (
        (collimation_px,) * 4 if isinstance(collimation_px, int) else tuple(collimation_px)
    )
    top_value = (2**bits_stored - 1) * slope + intercept
    i0 = 0.8 * top_value if i0 is None else float(i0)
    if not 0 < i0 <= top_value:
        raise ProstlabError(f"i0: expected in (0, {top_value:g}] (the stored range), got {i0}")

    step = min(volume.spacing) if step is None else float(step)
    projector = Projector(camera, step=step, backend="torch")
    with torch.no_grad():
        drr = projector(volume.batched()[:, :1], volume.spacing, pose.float())[0, 0].double()
    blocked = torch.zeros_like(drr, dtype=torch.bool)
    blocked[:top] = blocked[camera.height - bottom:] = True
    blocked[:, :left] = blocked[:, camera.width - right:] = True
    attenuation = torch.where(blocked, -float(np.log(collimator_transmission)), drr)
    generator = torch.Generator().manual_seed(seed)
    noisy = poisson_noise(attenuation, photons, generator)
    intensity = i0 * torch.exp(-noisy).numpy()
    top_stored = 2**bits_stored - 1
    stored = np.clip(np.rint((intensity - intercept) / slope), 0, top_stored).astype(np.uint16)
    if photometric == "MONOCHROME2":
        stored = (top_stored - stored).astype(np.uint16)

    _write_dx(path, stored, camera, bits_stored, slope, intercept, photometric, sign_tag, seed)
    return SyntheticXRay(
        path=path,
        pose=pose,
        camera=camera,
        line_integrals=drr.float().numpy(),
        i0=i0,
        collimation_px=(top, bottom, left, right),
    )


def _write_dx(
    path: Path,
    stored: np.ndarray,
    camera: Camera,
    bits_stored: int,
    slope: float,
    intercept: float,
    photometric: str,
    sign_tag: bool,
    seed: int,
) -> None:
    """Write ``stored`` (uint16 ``(H, W)``) as a DX "for processing" file with ``camera``'s
    geometry tags, explicit VR little endian. UIDs derive from ``seed``, so the same arguments
    write the same file."""

    def uid(part: str) -> str:
        return generate_uid(entropy_srcs=[f"prostlab synthetic {seed} {part}"])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForProcessing
    meta.MediaStorageSOPInstanceUID = uid("instance")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.Modality = "DX"
    ds.PatientName = "prostlab^synthetic"
    ds.PatientID = "synthetic"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PresentationIntentType = "FOR PROCESSING"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LIN"
    if sign_tag:
        ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME1" else -1
    ds.RescaleSlope = _ds(slope)
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleType = "US"
    ds.DistanceSourceToDetector = _ds(camera.sdd)
    ds.DistanceSourceToPatient = _ds(camera.sid)
    ds.ImagerPixelSpacing = [_ds(s) for s in camera.pixel_spacing]
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters, DICOM's DS limit."""
    return f"{value:.10g}"

