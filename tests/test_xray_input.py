"""The X-ray input layer: DICOM and image files -> line integrals on the detector, with the camera.

The reference is prostlab's own DRR: a synthetic DX file made from the bundled CT at a known pose
must read back as the DRR rendered at the camera the reader reports.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from prostlab.data import example_path, load_prepared
from prostlab.errors import ProstlabError
from prostlab.geometry import Camera
from prostlab.projector import Projector
from prostlab.xray import (
    field_mask,
    fit_to_detector,
    line_integrals,
    load_xray,
    log_line_integrals,
    write_synthetic_dicom,
)

FINE = Camera(sdd=1020.0, sid=620.0, height=64, width=64, pixel_spacing=(2.92, 2.92))
DETECTOR = (32, 32)
POSE = torch.tensor([[0.05, -0.03, 0.02, 4.0, -6.0, 10.0]], dtype=torch.float64)
STEP = 2.6
IMAGE_CAMERA = {"sdd": 1020.0, "sid": 620.0, "pixel_spacing": (2.92, 2.92)}


@pytest.fixture(scope="module")
def ct():
    return load_prepared(example_path()).ct.downsampled(2)


@pytest.fixture(scope="module")
def synthetic(ct, tmp_path_factory):
    path = tmp_path_factory.mktemp("xray") / "synthetic.dcm"
    return write_synthetic_dicom(path, ct, POSE, FINE, step=STEP)


def _drr(ct, camera: Camera, pose: torch.Tensor = POSE) -> np.ndarray:
    with torch.no_grad():
        image = Projector(camera, step=STEP, backend="torch")(ct.batched(), ct.spacing, pose.float())
    return image[0, 0].numpy()


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _mutated(source: Path, target: Path, **changes) -> Path:
    """A copy of a DICOM file with tags set (or deleted, for ``None``)."""
    ds = pydicom.dcmread(source)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(target)
    return target


# ----------------------------------------------------------------------------- round trips


def test_synthetic_dicom_reads_back_as_the_drr_at_the_binned_camera(ct, synthetic):
    xray = load_xray(synthetic.path, detector=DETECTOR, i0=synthetic.i0)
    assert xray.camera == Camera(sdd=1020.0, sid=620.0, height=32, width=32,
                                 pixel_spacing=(5.84, 5.84))
    assert xray.image.shape == DETECTOR and xray.image.dtype == torch.float32
    image, mask = xray.image.numpy(), xray.mask.numpy()
    assert mask.mean() > 0.45 and np.all(image[~mask] == 0)
    drr = _drr(ct, xray.camera)
    assert _ncc(image[mask], drr[mask]) > 0.99
    assert abs(image[mask].mean() - drr[mask].mean()) < 0.05 * drr[mask].mean()
    assert any("binned 2x2" in step for step in xray.steps)


def test_i0_is_estimated_from_the_air_and_only_shifts_the_line_integrals(ct, tmp_path):
    # 150 mm to the side: 40 % of the field sees air.
    aside = torch.tensor([[0.0, 0.0, 0.0, 150.0, 0.0, 0.0]], dtype=torch.float64)
    written = write_synthetic_dicom(tmp_path / "aside.dcm", ct, aside, FINE, step=STEP)
    given = load_xray(written.path, detector=DETECTOR, i0=written.i0)
    estimated = load_xray(written.path, detector=DETECTOR)
    # The 99.5th percentile sits about 2.6 noise sigmas (1 / sqrt(20000) each) above the air.
    assert written.i0 < estimated.i0 < 1.03 * written.i0
    assert any("estimated, 99.5th percentile" in step for step in estimated.steps)
    shift = np.log(estimated.i0 / written.i0)
    # Away from the clip at 0, which the two I0 reach at different pixels.
    inside = given.mask.numpy() & (given.image.numpy() > 0.1)
    assert inside.mean() > 0.2
    np.testing.assert_allclose(estimated.image.numpy()[inside],
                               given.image.numpy()[inside] + shift, atol=1e-4)


def test_monochrome1_monochrome2_and_the_fallbacks_give_the_same_line_integrals(
    ct, synthetic, tmp_path
):
    reference = load_xray(synthetic.path, detector=DETECTOR).image
    mono2 = write_synthetic_dicom(tmp_path / "m2.dcm", ct, POSE, FINE, step=STEP,
                                  photometric="MONOCHROME2")
    untagged2 = write_synthetic_dicom(tmp_path / "m2u.dcm", ct, POSE, FINE, step=STEP,
                                      photometric="MONOCHROME2", sign_tag=False)
    # Fluoroscopy is shown with dense matter dark: MONOCHROME2 values grow with the intensity.
    untagged1 = write_synthetic_dicom(tmp_path / "m1u.dcm", ct, POSE, FINE, step=STEP,
                                      sign_tag=False)
    fluoro = _mutated(untagged1.path, tmp_path / "rf.dcm", Modality="RF",
                      PhotometricInterpretation="MONOCHROME2")
    for path in (mono2.path, untagged2.path, untagged1.path, fluoro):
        xray = load_xray(path, detector=DETECTOR)
        torch.testing.assert_close(xray.image, reference, rtol=0, atol=1e-5)
    assert any("inverted" in s for s in load_xray(mono2.path).steps)


def test_a_16_bit_file_without_noise_is_the_drr_to_quantisation(synthetic, ct, tmp_path):
    exact = write_synthetic_dicom(tmp_path / "16.dcm", ct, POSE, FINE, step=STEP, bits_stored=16,
                                  photons=None, collimation_px=0)
    xray = load_xray(exact.path, i0=exact.i0)
    assert xray.mask.all()
    np.testing.assert_allclose(xray.image.numpy(), exact.line_integrals, atol=0.02)


def test_a_log_image_gives_line_integrals_up_to_scale(synthetic, tmp_path):
    p = synthetic.line_integrals
    stored = np.rint(1000.0 * (10.0 - p)).astype(np.uint16)  # L = 1000 log I + const
    ds = pydicom.dcmread(synthetic.path)
    ds.PixelData = stored.tobytes()
    ds.BitsStored, ds.HighBit = 16, 15
    ds.PixelIntensityRelationship = "LOG"
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.save_as(tmp_path / "log.dcm")
    xray = load_xray(tmp_path / "log.dcm")
    mask = xray.mask.numpy()
    assert mask.mean() > 0.9
    assert _ncc(xray.image.numpy()[mask], p[mask]) > 0.999
    with pytest.raises(ProstlabError, match="log intensities"):
        load_xray(tmp_path / "log.dcm", i0=100.0)


def test_flags_replace_the_tags(synthetic):
    xray = load_xray(synthetic.path, camera={"sdd": 1100.0, "pixel_spacing": None})
    assert xray.camera.sdd == 1100.0 and xray.camera.pixel_spacing == (2.92, 2.92)
    assert any("--sdd" in s and "DistanceSourceToDetector" in s for s in xray.steps)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".npy", ".nii.gz"])
def test_image_files_with_a_given_camera_match_the_dicom(ct, tmp_path, suffix):
    plain = write_synthetic_dicom(tmp_path / "plain.dcm", ct, POSE, FINE, step=STEP,
                                  rescale=(1.0, 0.0))
    stored = pydicom.dcmread(plain.path).pixel_array  # MONOCHROME1, sign +1: the intensity
    path = tmp_path / f"xray{suffix}"
    if suffix == ".npy":
        np.save(path, stored)
    elif suffix == ".nii.gz":
        nib.save(nib.Nifti1Image(stored.T[:, :, None].copy(), np.eye(4)), path)
    else:
        Image.fromarray(stored).save(path)
    xray = load_xray(path, detector=DETECTOR, camera=IMAGE_CAMERA)
    dicom = load_xray(plain.path, detector=DETECTOR)
    assert xray.camera == dicom.camera and xray.i0 == dicom.i0
    torch.testing.assert_close(xray.mask, dicom.mask)
    torch.testing.assert_close(xray.image, dicom.image, rtol=0, atol=1e-6)


def test_an_8_bit_png_and_a_float_tiff_read(tmp_path):
    expected = np.random.default_rng(0).uniform(0.0, 3.0, (48, 40))
    intensity = 200.0 * np.exp(-expected)
    Image.fromarray(np.rint(intensity).astype(np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(intensity.astype(np.float32)).save(tmp_path / "a.tif")
    camera = {"sdd": 1000.0, "sid": 600.0, "pixel_spacing": (1.0, 1.0)}
    png = load_xray(tmp_path / "a.png", camera=camera, i0=200.0)
    tif = load_xray(tmp_path / "a.tif", camera=camera, i0=200.0)
    assert tif.mask.all() and png.mask.all()
    np.testing.assert_allclose(tif.image.numpy(), expected, atol=1e-5)
    assert _ncc(png.image.numpy(), expected) > 0.99


# ----------------------------------------------------------------------------- preprocessing


def test_line_integrals_with_given_and_estimated_i0():
    rng = np.random.default_rng(0)
    p = np.zeros((40, 50))
    p[10:30, 5:45] = rng.uniform(0.5, 4.0, (20, 40))
    intensity = rng.poisson(5000.0 * np.exp(-p)).astype(np.float64)
    exact, i0 = line_integrals(5000.0 * np.exp(-p), i0=5000.0)
    assert i0 == 5000.0 and exact.dtype == np.float32 and exact.shape == (40, 50)
    np.testing.assert_allclose(exact, p, atol=1e-5)
    _, estimated = line_integrals(intensity)
    assert 5000.0 < estimated < 5000.0 * (1 + 4 / np.sqrt(5000.0))  # 99.5th pct of the air
    valid = np.zeros((40, 50), dtype=bool)
    valid[10:30, 5:45] = True
    _, inside = line_integrals(intensity, valid=valid)
    assert inside < estimated
    floor, _ = line_integrals(np.zeros((4, 4)), i0=10.0)
    np.testing.assert_allclose(floor, -np.log(1e-4), rtol=1e-6)


@pytest.mark.parametrize("i0", [0.0, -3.0, float("nan"), float("inf")])
def test_line_integrals_refuse_a_bad_i0(i0):
    with pytest.raises(ProstlabError, match="I0"):
        line_integrals(np.ones((4, 4)), i0=i0)


def test_log_line_integrals_subtract_the_air_level():
    log_i = np.log(np.array([[100.0, 100.0], [10.0, 1.0]]))
    p, level = log_line_integrals(log_i)
    assert level == pytest.approx(np.log(100.0))
    np.testing.assert_allclose(p, [[0, 0], [np.log(10.0), np.log(100.0)]], rtol=1e-6)


def test_field_mask_finds_the_collimated_band(synthetic):
    intensity = pydicom.dcmread(synthetic.path).pixel_array.astype(np.float64)
    mask = field_mask(intensity, margin=0)
    top, bottom, left, right = synthetic.collimation_px
    expected = np.zeros_like(mask)
    expected[top:64 - bottom, left:64 - right] = True
    np.testing.assert_array_equal(mask, expected)
    with_margin = field_mask(intensity, margin=2)
    assert with_margin.sum() == (64 - top - bottom - 4) * (64 - left - right - 4)


def test_field_mask_peels_zero_padding_and_keeps_air():
    rng = np.random.default_rng(1)
    intensity = rng.poisson(1000.0, (30, 30)).astype(np.float64)  # open air, noisy
    intensity[10:20, 10:20] = rng.poisson(100.0, (10, 10))
    intensity[:, :3] = 0.0
    intensity[-2:, :] = 0.0
    mask = field_mask(intensity, margin=1)
    assert not mask[:, :4].any() and not mask[-3:].any()
    assert mask[:27, 4:].all()


@pytest.mark.parametrize(("shape", "size", "principal"), [
    ((20, 16), (64, 60), (30.3, 20.7)),   # bin 3, crop
    ((40, 40), (64, 60), None),           # bin 2 (round(1.5) = 2), pad
    ((64, 60), (64, 60), (10.0, 50.0)),   # identity
])
def test_fit_to_detector_keeps_every_point_where_it_projects(shape, size, principal):
    camera = Camera(sdd=1000.0, sid=600.0, height=size[0], width=size[1],
                    pixel_spacing=(0.5, 0.4), principal_point=principal)
    image = np.zeros(size, dtype=np.float32)
    mask = np.ones(size, dtype=bool)
    binned, binned_mask, fitted = fit_to_detector(image, mask, camera, shape)
    assert binned.shape == binned_mask.shape == shape == (fitted.height, fitted.width)
    factor = fitted.pixel_spacing[0] / camera.pixel_spacing[0]
    assert factor == pytest.approx(round(factor)) and fitted.sdd == camera.sdd
    # A camera-frame point lands on the same physical spot of the detector. The fitted image's
    # pixel (0, 0) has its corner at the original's pixel (left f - 1/2, top f - 1/2).
    rng = np.random.default_rng(0)
    points = torch.as_tensor(rng.uniform([-80, -80, 500], [80, 80, 700], (20, 3)))
    before, after = camera.project(points), fitted.project(points)
    hb, wb = size[0] // round(factor), size[1] // round(factor)
    top, left = (hb - shape[0]) // 2, (wb - shape[1]) // 2
    mm_before = (before + 0.5) * torch.tensor([0.4, 0.5], dtype=torch.float64)
    mm_after = (after + torch.tensor([left, top]) + 0.5) * torch.tensor(
        fitted.pixel_spacing[::-1], dtype=torch.float64)
    torch.testing.assert_close(mm_after, mm_before)
    K = fitted.intrinsics
    assert K[0, 0] == pytest.approx(camera.intrinsics[0, 0] / factor)


def test_fit_to_detector_averages_the_usable_pixels_of_each_block():
    camera = Camera(sdd=1000.0, sid=600.0, height=4, width=4, pixel_spacing=(1.0, 1.0))
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    mask = np.ones((4, 4), dtype=bool)
    mask[0, 0] = False                       # 3 of 4 usable: kept, mean of the three
    mask[2:, 2:] = [[False, False], [False, True]]  # 1 of 4: masked
    binned, binned_mask, _ = fit_to_detector(image, mask, camera, (2, 2))
    np.testing.assert_array_equal(binned_mask, [[True, True], [True, False]])
    assert binned[0, 0] == pytest.approx((1 + 4 + 5) / 3)
    assert binned[1, 1] == 0.0


# ----------------------------------------------------------------------------- refusals


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("changes", "expected"), [
    ({"ImagerPixelSpacing": None, "PixelSpacing": [1.77, 1.77]},
     ["ImagerPixelSpacing (0018,1164) is missing", "PixelSpacing", "--pixel-spacing"]),
    ({"DistanceSourceToDetector": None}, ["DistanceSourceToDetector (0018,1110)", "--sdd"]),
    ({"DistanceSourceToPatient": None}, ["DistanceSourceToPatient (0018,1111)", "--sid"]),
    ({"DistanceSourceToPatient": "1020"}, ["DistanceSourceToPatient", "not less than",
                                           "DistanceSourceToDetector"]),
    ({"ImagerPixelSpacing": ["-2.92", "2.92"]}, ["ImagerPixelSpacing", "positive"]),
    ({"ImagerPixelSpacing": ["NaN", "2.92"]}, ["ImagerPixelSpacing", "positive finite"]),
    ({"DistanceSourceToDetector": "1.02"}, ["DistanceSourceToDetector", "[100, 3000]"]),
    ({"Rows": 60}, ["Rows (0028,0010)", "pixel data"]),
    ({"Modality": "CT"}, ["Modality (0008,0060) is CT"]),
    ({"NumberOfFrames": 2}, ["NumberOfFrames"]),
    ({"RescaleSlope": "0"}, ["RescaleSlope (0028,1053)"]),
    ({"PixelIntensityRelationshipSign": 2}, ["PixelIntensityRelationshipSign", "+1 or -1"]),
])
@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_bad_dicom_geometry_and_tags_are_refused_in_one_line(synthetic, tmp_path, changes,
                                                             expected):
    path = _mutated(synthetic.path, tmp_path / "bad.dcm", **changes)
    with pytest.raises(ProstlabError) as error:
        load_xray(path, detector=DETECTOR)
    message = _one_line(error)
    for part in expected:
        assert part in message
    assert "bad.dcm" in message


def test_a_flag_supplies_a_missing_tag(synthetic, tmp_path):
    path = _mutated(synthetic.path, tmp_path / "nosdd.dcm", DistanceSourceToDetector=None)
    assert load_xray(path, camera={"sdd": 1000.0}).camera.sdd == 1000.0


def _npy(tmp_path: Path, array: np.ndarray) -> Path:
    np.save(tmp_path / "x.npy", array)
    return tmp_path / "x.npy"


@pytest.mark.parametrize(("make", "kwargs", "expected"), [
    (lambda d: (d / "x.dcm").write_text("not a dicom"), {}, ["x.dcm", "not a readable DICOM"]),
    (lambda d: (d / "x.jpg").write_bytes(b"\xff\xd8\xff"), {}, ["x.jpg", "unsupported file type"]),
    (lambda d: (d / "x.png").write_bytes(b"\x89PNG broken"), {"camera": IMAGE_CAMERA},
     ["x.png", "not a readable PNG"]),
    (lambda d: _npy(d, np.full((16, 16), 7.0)), {"camera": IMAGE_CAMERA}, ["x.npy", "blank"]),
    (lambda d: _npy(d, np.zeros((16, 16))), {"camera": IMAGE_CAMERA}, ["x.npy", "no positive"]),
    (lambda d: _npy(d, np.where(np.eye(16) > 0, np.nan, 1.0)), {"camera": IMAGE_CAMERA},
     ["x.npy", "NaN"]),
    (lambda d: _npy(d, np.ones((4, 16, 16))), {"camera": IMAGE_CAMERA}, ["x.npy", "(4, 16, 16)"]),
    (lambda d: _npy(d, np.ones((16, 16))), {}, ["x.npy", "no camera", "--sdd", "--sid",
                                                "--pixel-spacing"]),
    (lambda d: _npy(d, np.ones((16, 16))), {"camera": {**IMAGE_CAMERA, "sdd": -5.0}},
     ["--sdd", "positive"]),
    (lambda d: _npy(d, np.ones((16, 16))), {"camera": {**IMAGE_CAMERA, "focal": 3.0}},
     ["unknown key", "focal"]),
    (lambda d: _npy(d, np.ones((300, 300))), {"camera": {**IMAGE_CAMERA,
                                                           "pixel_spacing": (4.0, 4.0)}},
     ["--pixel-spacing", "1200 mm of detector"]),
    (lambda d: Image.new("RGB", (16, 16)).save(d / "x.png"), {"camera": IMAGE_CAMERA},
     ["x.png", "mode RGB"]),
    (lambda d: _npy(d, np.arange(256.0).reshape(16, 16)), {"camera": IMAGE_CAMERA, "i0": -1.0},
     ["x.npy", "I0 = -1.0"]),
    (lambda d: _npy(d, np.arange(256.0).reshape(16, 16)), {"camera": IMAGE_CAMERA, "sign": -1},
     ["x.npy", "floating-point"]),
])
def test_bad_files_and_values_are_refused_in_one_line(tmp_path, make, kwargs, expected):
    make(tmp_path)
    path = next(p for p in tmp_path.iterdir() if p.name.startswith("x."))
    with pytest.raises(ProstlabError) as error:
        load_xray(path, **kwargs)
    message = _one_line(error)
    for part in expected:
        assert part in message


def test_a_truncated_dicom_is_refused(synthetic, tmp_path):
    data = synthetic.path.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(ProstlabError) as error:
        load_xray(tmp_path / "cut.dcm")
    assert "cut.dcm" in _one_line(error)
