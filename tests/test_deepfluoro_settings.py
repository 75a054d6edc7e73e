"""DeepFluoro's protocol settings: xreg's ground-truth correction, the I0 choices of DiffPose and
xreg, xreg's bones preset and the line that states them in the results; hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prostlab.data import bone_ids, example_path
from prostlab.data import deepfluoro as df
from prostlab.errors import ProstlabError
from prostlab.metrics import mtre

SIGNS = np.array([-1.0, 1.0, -1.0])


def _truth() -> np.ndarray:
    from scipy.spatial.transform import Rotation

    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_rotvec([0.3, -1.2, 2.0]).as_matrix()
    matrix[:3, 3] = (110.0, -40.0, 250.0)
    return matrix


# ---------------------------------------------------------------------------- ground truth
def test_xreg_correction_moves_every_translation_term_by_minus_half_a_millimetre():
    truth = _truth()
    corrected = df.corrected_ground_truth(truth, "xreg")
    assert np.array_equal(corrected[:3, :3], truth[:3, :3])
    assert np.allclose(corrected[:3, 3], truth[:3, 3] - 0.5, atol=1e-12, rtol=0)
    assert np.array_equal(df.corrected_ground_truth(truth, "none"), truth)
    assert df.corrected_ground_truth(truth, "none") is not truth
    with pytest.raises(ProstlabError, match=r"gt_correction: 'diffpose'; expected one of "
                                            r"'none', 'xreg'"):
        df.corrected_ground_truth(truth, "diffpose")


def test_xreg_correction_shifts_every_ct_point_by_sqrt_three_quarters():
    """``C T`` with ``C`` the translation by -0.5 mm: the camera sees ``E T^-1 (p + 0.5)``, so
    every point of the CT moves by |(0.5, 0.5, 0.5)| = 0.866 mm between the two ground truths."""
    extrinsic = np.eye(4)
    extrinsic[:3, 3] = (4.0, -2.0, 30.0)
    vol_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    vol_to_lps[:3, 3] = (12.0, 7.0, -90.0)
    poses = [df.pose_from_file(df.corrected_ground_truth(_truth(), c), extrinsic, SIGNS,
                               vol_to_lps, 700.0)[None] for c in ("xreg", "none")]
    points = torch.tensor([[0.0, 0.0, 0.0], [80.0, -30.0, 55.0], [-120.0, 10.0, 0.0]],
                          dtype=torch.float64)
    assert float(mtre(*poses, points)[0]) == pytest.approx(math.sqrt(0.75), abs=1e-9)


# ---------------------------------------------------------------------------- I0
def _field(shape=(20, 24), border=3):
    valid = np.zeros(shape, dtype=bool)
    valid[border:shape[0] - border, border:shape[1] - border] = True
    return valid


def test_diffpose_i0_blurs_the_field_by_a_5x5_gaussian_then_takes_log_65487():
    valid = _field()
    image = np.full(valid.shape, 1000.0)
    image[10, 12] = 2000.0  # inside the field
    image[3, 3] = 2000.0  # the field's first pixel: its mirror image is not itself
    image[0, 0] = 9.0e9  # in the collimated border: the blur must not see it
    lines, level = df.detector_line_integrals(image, valid, "diffpose")
    assert level == 65487.0
    # the taps exp(-x^2 / 2) at x = -2..2, normalised
    total = 1 + 2 * math.exp(-0.5) + 2 * math.exp(-2.0)
    w0, w1 = 1 / total, math.exp(-0.5) / total
    expect = {(10, 12): 1000 * (1 + w0 * w0), (10, 13): 1000 * (1 + w0 * w1),
              (11, 13): 1000 * (1 + w1 * w1), (3, 3): 1000 * (1 + w0 * w0),
              (15, 5): 1000.0}
    for (row, col), blurred in expect.items():
        assert lines[row, col] == pytest.approx(math.log(65487.0 / blurred), abs=1e-5)
    assert np.all(lines[~valid] == 0)


def test_xreg_i0_is_the_maximum_of_the_smoothed_field_and_the_log_is_not_clipped():
    valid = _field((40, 44))
    image = np.full(valid.shape, 1000.0)
    image[8:28, 10:30] = 3000.0  # a plateau wider than the kernel: its smoothed maximum is 3000
    image[33, 36] = 10000.0  # one bright pixel: brighter than I0, smoothed well below it
    image[34, 8] = 0.0  # a dead pixel: the largest finite line integral, log 3
    image[0, 0] = 9.0e9  # in the border
    lines, level = df.detector_line_integrals(image, valid, "xreg")
    assert level == pytest.approx(3000.0, rel=1e-9)
    assert lines[15, 20] == pytest.approx(0.0, abs=1e-6)
    assert lines[36, 5] == pytest.approx(math.log(3.0), abs=1e-6)
    assert lines[33, 36] == pytest.approx(-math.log(10.0 / 3.0), abs=1e-6)  # negative, kept
    assert lines[34, 8] == pytest.approx(math.log(3.0), abs=1e-6)
    assert np.all(lines[~valid] == 0)


def test_xreg_smoothing_is_itks_discrete_gaussian_of_variance_two():
    """ITK's kernel for variance t = 2 and maximum error 0.01: e^-t I_n(t) for |n| <= 4 (the
    taps up to 3 hold 0.983 of the mass, up to 4 0.997), normalised. A single bright pixel,
    smoothed, peaks at its value times the centre tap squared."""
    from scipy.special import ive

    taps = np.array([ive(abs(n), 2.0) for n in range(-4, 5)])
    taps /= taps.sum()
    valid = _field((30, 30))
    image = np.full(valid.shape, 1.0)
    image[15, 15] = 1.0 + 1.0e6
    _, level = df.detector_line_integrals(image, valid, "xreg")
    assert level == pytest.approx(1.0 + 1.0e6 * taps[4] ** 2, rel=1e-9)


def test_prostlab_i0_and_a_fixed_i0_clip_the_brighter_pixels():
    valid = _field()
    image = np.full(valid.shape, 1000.0)
    image[10, 10] = 1500.0
    lines, level = df.detector_line_integrals(image, valid, 1200.0)
    assert level == 1200.0 and lines[10, 10] == 0.0
    assert lines[5, 5] == pytest.approx(math.log(1.2), abs=1e-6)
    with pytest.raises(ProstlabError, match=r"i0: 'max'; expected a positive intensity, null or "
                                            r"one of 'diffpose', 'xreg'"):
        df.detector_line_integrals(image, valid, "max")


# ---------------------------------------------------------------------------- bones
def test_pelvis_xreg_preset_selects_xregs_labels(tmp_path):
    table = df.write_structures(tmp_path / "structures.csv")
    assert bone_ids("pelvis_xreg", table) == [1, 2, 3, 4, 7]
    assert bone_ids("pelvis", table) == [1, 2, 4, 7]
    chest = example_path() / "structures.csv"
    with pytest.raises(ProstlabError, match=r"has no group/structure .*vertebrae, which the preset "
                                            r"'pelvis_xreg' needs"):
        bone_ids("pelvis_xreg", chest)


# ---------------------------------------------------------------------------- options
def test_source_options_and_the_protocol_line():
    source = df.source_options({"deepfluoro": "f.h5", "specimen": 2, "i0": "xreg",
                                "gt_correction": "xreg"}, "data.volumes[0]")
    assert source["i0"] == "xreg" and source["gt_correction"] == "xreg"
    line = df.protocol(source, "pelvis_xreg")
    assert line == ("specimen 2; bones (the segmented CT): labels 1, 2, 3, 4, 7 (xreg's "
                    "pelvis); ground truth -0.5 mm on each translation (xreg's); I0 the maximum "
                    "of the smoothed field (xreg's); border 50 px masked")
    plain = df.source_options({"deepfluoro": "f.h5", "specimen": 1}, "v")
    assert plain["gt_correction"] == "none" and plain["i0"] is None
    assert "ground truth as stored (DiffPose's)" in df.protocol(plain, "pelvis")
    assert "labels 1, 2, 4, 7 (prostlab's pelvis preset, ProST's)" in df.protocol(plain, "pelvis")
    assert "I0 65487 after a 5x5 Gaussian" in df.protocol({**plain, "i0": "diffpose"}, "1,2")


@pytest.mark.parametrize("entry, message", [
    ({"gt_correction": "half"}, r"data.volumes\[0\].gt_correction: 'half'; expected one of "
                                r"none, xreg"),
    ({"i0": "median"}, r"data.volumes\[0\].i0: 'median'; expected a positive intensity, null "
                       r"\(estimated from the image\) or one of diffpose, xreg"),
    ({"i0": 0}, r"data.volumes\[0\].i0: 0; expected a positive intensity"),
])
def test_source_option_refusals_are_one_line(entry, message):
    with pytest.raises(ProstlabError, match=message) as raised:
        df.source_options({"deepfluoro": "f.h5", "specimen": 1, **entry}, "data.volumes[0]")
    assert "\n" not in str(raised.value)
