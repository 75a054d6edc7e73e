"""``prostlab register`` end to end: a synthetic DICOM X-ray of the bundled CT at a known pose.

The X-ray is made the way a detector makes one, not by the registration's own projector setup:
rendered on a detector 4x finer than the registration's (binned on read),
``I = I0 exp(-DRR)`` with Poisson noise, 12-bit MONOCHROME1 with rescale tags, and collimated
borders (:func:`prostlab.xray.write_synthetic_dicom`). The registration moves the 64^3 average of
the CT that rendered it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from prostlab.cli import main
from prostlab.data import example_path, load_prepared
from prostlab.geometry import Camera, perturb, pose_to_euler, pose_to_matrix
from prostlab.metrics.functional import mtre
from prostlab.outputs import MANIFEST
from prostlab.xray import write_synthetic_dicom

FINE = Camera(sdd=1020, sid=620, height=256, width=256, pixel_spacing=(1.46, 1.46))
GT = torch.tensor([[0.05, -0.08, 0.1, 8.0, -12.0, 15.0]], dtype=torch.float64)
FAST = ["--detector", "64", "64", "--downsample", "2", "--step", "3.5"]
OUTPUTS = {"pose.json", "trajectory.csv", "overlay.png", "registration.gif", "xray.png", "drr.png"}


@pytest.fixture(scope="module")
def prepared():
    return load_prepared(example_path())


@pytest.fixture(scope="module")
def xray(prepared, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("xray") / "chest.dcm"
    write_synthetic_dicom(path, prepared.ct, GT, FINE, bits_stored=12, seed=3)
    return path


@pytest.fixture(scope="module")
def bone_points(prepared) -> torch.Tensor:
    """2000 bone voxel centres of the prepared CT, volume frame (mm)."""
    index = torch.nonzero(prepared.bone.data[0] > 0).double()
    centre = (torch.tensor(prepared.bone.data.shape[1:], dtype=torch.float64) - 1) / 2
    points = (index - centre) * torch.tensor(prepared.ct.spacing, dtype=torch.float64)
    keep = torch.randperm(len(points), generator=torch.Generator().manual_seed(0))[:2000]
    return points[keep]


def _start(rotation_deg: float, translation_mm: float) -> torch.Tensor:
    """The truth moved by ``rotation_deg`` about an oblique axis and ``translation_mm``."""
    axis = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    shift = torch.tensor([2.0, -1.0, 2.0], dtype=torch.float64)
    delta = torch.cat((axis / axis.norm() * math.radians(rotation_deg),
                       shift / shift.norm() * translation_mm))
    return perturb(GT, delta[None])[0]


def _init_flags(pose: torch.Tensor) -> list[str]:
    return ["--init", *(f"{v:.6f}" for v in (*torch.rad2deg(pose[:3]).tolist(),
                                              *pose[3:].tolist()))]


def _registered(out: Path) -> tuple[dict, torch.Tensor]:
    report = json.loads((out / "pose.json").read_text())
    pose = report["pose"]["rotation_vector_rad"] + report["pose"]["translation_mm"]
    return report, torch.tensor([pose], dtype=torch.float64)


def test_register_lands_within_2mm_from_10_deg_and_30_mm_off(xray, bone_points, tmp_path,
                                                              capsys):
    start = _start(10.0, 30.0)
    initial_mtre = float(mtre(start[None], GT, bone_points)[0])
    out = tmp_path / "reg"
    code = main(["register", "--xray", str(xray), "--ct", str(example_path()), "--out", str(out),
                 *FAST, *_init_flags(start)])
    assert code == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == OUTPUTS | {MANIFEST}
    report, final = _registered(out)
    final_mtre = float(mtre(final, GT, bone_points)[0])
    assert initial_mtre > 20 and final_mtre < 2.0, (initial_mtre, final_mtre)
    assert report["similarity"]["ncc"] > 0.99
    assert report["status"] in ("converged", "max_iterations")
    assert report["trusted"] and not report["warnings"]
    assert all(check["ok"] for check in report["confidence"].values())
    assert any("MONOCHROME1" in step or "binned 4x4" in step for step in report["preprocessing"])

    # The matrices are the pose's, in the frames of docs/geometry.md.
    camera_from_volume = torch.tensor(report["camera_from_volume"], dtype=torch.float64)
    expected = pose_to_matrix(final)[0]
    expected[2, 3] += report["camera"]["sid"]
    torch.testing.assert_close(camera_from_volume, expected)
    torch.testing.assert_close(
        camera_from_volume @ torch.tensor(report["volume_from_camera"], dtype=torch.float64),
        torch.eye(4, dtype=torch.float64))
    angles, _ = pose_to_euler(final, "xyz")
    torch.testing.assert_close(torch.tensor(report["euler_deg"]["angles"], dtype=torch.float64),
                               torch.rad2deg(angles[0]))
    # camera_from_world maps the world position of the volume's centre voxel where the pose does.
    world_from_volume = torch.tensor(report["world_from_volume"], dtype=torch.float64)
    camera_from_world = torch.tensor(report["camera_from_world"], dtype=torch.float64)
    torch.testing.assert_close(camera_from_world @ world_from_volume, camera_from_volume)
    # The camera is the file's, binned 4x: the detector's own pixel size times 4.
    assert report["camera"]["pixel_spacing"] == pytest.approx([5.84, 5.84])
    lines = (out / "trajectory.csv").read_text().splitlines()
    assert len(lines) == report["iterations"] + 1


def test_register_with_search_from_the_ap_view(xray, bone_points, tmp_path, capsys):
    out = tmp_path / "reg"
    code = main(["register", "--xray", str(xray), "--ct", str(example_path()), "--out", str(out),
                 *FAST, "--init-view", "ap", "--search", "--method", "ncc"])
    assert code == 0, capsys.readouterr().err
    report, final = _registered(out)
    assert report["start"]["searched"] and report["start"]["starts"] == 4
    assert float(mtre(final, GT, bone_points)[0]) < 2.0


def test_register_with_the_shipped_network(xray, bone_points, tmp_path, capsys):
    """Net+NCC with the shipped checkpoint, its camera's detector and the cpu config's pooling."""
    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "prost_cpu_chest.ckpt"
    out = tmp_path / "reg"
    code = main(["register", "--xray", str(xray), "--ct", str(example_path()), "--out", str(out),
                 "--method", "net_ncc", "--ckpt_path", str(ckpt), "--config", "cpu",
                 *_init_flags(_start(10.0, 30.0))])
    assert code == 0, capsys.readouterr().err
    report, final = _registered(out)
    assert report["camera"]["height"] == 64  # the checkpoint's detector
    assert float(mtre(final, GT, bone_points)[0]) < 2.0


def _refused(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        code = main(args)
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    return err.splitlines()[-1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "net_ncc"], "has a 'net' stage, which needs the trained network"),
        (["--ckpt_path", "missing.ckpt", "--method", "net_ncc"], "no such checkpoint file"),
        (["--method", "no_such_preset"], "no_such_preset"),
        (["--labels", "labels.nii.gz"], "--labels: .* is a prepared folder"),
        (["--init", "0", "0", "0", "0", "0", "nan"], "--init: expected six finite numbers"),
        (["--detector", "0", "64"], "detector"),
        (["--search", "--search-rotation-deg", "-5"], "search.rotation_deg"),
        (["--sid", "2000"], "sid"),
        (["--bones", "pelvis"], "--bones: .* is a prepared folder"),
        (["--search-depth-mm", "40"], "--search-depth-mm: .* expected --search too"),
        (["--init", "0", "0", "0", "1e9", "0", "0"], "--init: .* outside the beam"),
        (["--detector", "8", "8"], "--xray .*: \\d+ usable pixels .* expected at least 256"),
        (["--detector", "4", "1000"], "detector rows x columns \\(--detector, .*\\): 4 x 1000; "
                                      "expected at least 8 pixels a side"),
        # numpy's MemoryError and torch's AssertionError tracebacks (probes x31, x48)
        (["--detector", "100000", "100000"], "100000 x 100000: one DRR of it needs about .* "
                                             "of memory, more than"),
        (["--device", "cuda:7"], "--device 'cuda:7': "),
    ],
)
def test_register_refuses_bad_settings_in_one_line_and_writes_nothing(xray, tmp_path, capsys,
                                                                       extra, message):
    out = tmp_path / "reg"
    line = _refused(["register", "--xray", str(xray), "--ct", str(example_path()),
                     "--out", str(out), *extra], capsys)
    assert line.startswith("prostlab register: error:")
    assert __import__("re").search(message, line), line
    assert not out.exists()


def test_register_refuses_a_missing_ct_and_a_non_xray(xray, tmp_path, capsys):
    out = tmp_path / "reg"
    line = _refused(["register", "--xray", str(xray), "--ct", str(tmp_path / "nope"),
                     "--out", str(out)], capsys)
    assert "--ct" in line and "no such file or folder" in line
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    line = _refused(["register", "--xray", str(text), "--ct", str(example_path()),
                     "--out", str(out)], capsys)
    assert str(text) in line
    assert not out.exists()


def test_named_views_point_the_beam_as_documented():
    """AP: the beam runs along the volume's +z (posterior); lateral: along +x (to the left)."""
    from prostlab.xray.register import start_pose

    def beam(view: str) -> list[float]:
        rotation = pose_to_matrix(start_pose(None, view))[0, :3, :3]
        return (rotation.T @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)).round().tolist()

    assert beam("ap") == [0.0, 0.0, 1.0]
    assert beam("pa") == [0.0, 0.0, -1.0]
    assert beam("lateral") == [1.0, 0.0, 0.0]
    assert beam("right-lateral") == [-1.0, 0.0, 0.0]


def test_register_refuses_a_ct_that_is_not_in_hounsfield_units(xray, tmp_path, capsys):
    attenuation = example_path() / "ct_mu.nii.gz"
    out = tmp_path / "reg"
    line = _refused(["register", "--xray", str(xray), "--ct", str(attenuation),
                     "--out", str(out)], capsys)
    assert line.startswith(f"prostlab register: error: --ct {attenuation}: values span 0 to")
    assert "expected a CT in Hounsfield units" in line
    assert not out.exists()


def test_a_wrong_intensity_sign_is_refused_before_registering(xray, tmp_path, capsys):
    """--sign -1 on a file whose values grow with the intensity turns bone into air: refused
    with the sign to pass, before anything is written (it ended 40 deg off with exit 0)."""
    out = tmp_path / "reg"
    line = _refused(["register", "--xray", str(xray), "--ct", str(example_path()),
                     "--out", str(out), *FAST, "--sign", "-1", *_init_flags(_start(10.0, 30.0))],
                    capsys)
    assert f"--xray {xray}: read with sign -1" in line and "expected --sign 1" in line
    assert not out.exists()


def test_a_bone_bright_png_without_sign_is_refused_and_accepted_with_it(prepared, tmp_path,
                                                                        capsys):
    """A displayed PNG (bone bright: the line integrals as grey levels) read as intensities, the
    default for an image file, is refused with --sign -1 named; with --sign -1 it passes."""
    import numpy as np
    from PIL import Image

    from prostlab.projector import Projector
    from prostlab.xray.register import RegisterSettings, prepare_problem

    camera = Camera(sdd=1020, sid=620, height=64, width=64, pixel_spacing=(5.84, 5.84))
    ct = prepared.ct.downsampled(2)
    drr = Projector(camera, step=3.5)(ct.batched(), ct.spacing, GT.float())[0, 0]
    png = tmp_path / "chest.png"
    Image.fromarray((20 + 230 * drr / drr.max()).round().numpy().astype(np.uint8)).save(png)
    flags = ["--xray", str(png), "--ct", str(example_path()), *FAST, "--sdd", "1020", "--sid",
             "620", "--pixel-spacing", "5.84", "5.84"]
    out = tmp_path / "reg"
    line = _refused(["register", *flags, "--out", str(out)], capsys)
    assert f"--xray {png}: read with sign +1" in line and "expected --sign -1" in line
    assert not out.exists()
    problem = prepare_problem(RegisterSettings(
        xray=png, ct=example_path(), out=out, detector=(64, 64), downsample=2, step=3.5,
        camera={"sdd": 1020, "sid": 620, "pixel_spacing": (5.84, 5.84)}, sign=-1))
    assert problem.notes[-1].startswith("sign check: NCC 0.")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """Another CT: a water cylinder with three bone balls, prepared to a 32^3 cube."""
    import nibabel as nib
    import numpy as np

    from prostlab.data import prepare_ct

    folder = tmp_path_factory.mktemp("phantom")
    z, y, x = np.meshgrid(*(np.arange(48) - 23.5,) * 3, indexing="ij")
    hu = np.full((48, 48, 48), -1000.0, np.float32)
    hu[(x / 18) ** 2 + (y / 14) ** 2 <= 1] = 0.0
    for cx, cy, cz in ((5, 4, 0), (-6, -3, 8), (0, 8, -10)):
        hu[(x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= 9] = 1200.0
    nib.save(nib.Nifti1Image(hu, np.diag([6.0, 6.0, 6.0, 1.0])), folder / "phantom.nii.gz")
    prepare_ct(folder / "phantom.nii.gz", None, folder / "prepared", size=32, side_mm=288)
    return folder / "prepared"


def test_registering_to_another_ct_exits_untrusted(xray, phantom, tmp_path, capsys):
    """The chest X-ray against a phantom reaches NCC 0.76: no longer exit 0 with a confident
    pose, but status 3, "trusted": false and the failed checks on stderr."""
    from prostlab.xray.register import UNTRUSTED_STATUS

    out = tmp_path / "reg"
    code = main(["register", "--xray", str(xray), "--ct", str(phantom), "--out", str(out),
                 "--detector", "64", "64", "--step", "3.5"])
    assert code == UNTRUSTED_STATUS == 3
    assert "the pose is NOT TRUSTED" in capsys.readouterr().err
    report, _ = _registered(out)
    assert report["trusted"] is False and report["warnings"]
    assert not all(check["ok"] for check in report["confidence"].values())
    assert report["settings"]["sign"] is None and report["command"][:4] == [
        "prostlab", "register", "--xray", str(xray)]


def test_judge_fails_each_check_past_its_limit(xray, tmp_path):
    """Each of judge's checks fails on its own: a pose moved 40 deg or 120 mm from its start, or
    the CT moved out of most of the field, or similarities under the limits."""
    from prostlab.xray.register import RegisterSettings, judge, prepare_problem

    problem = prepare_problem(RegisterSettings(xray=xray, ct=example_path(), out=tmp_path / "o",
                                               detector=(64, 64), downsample=2, step=3.5))
    good = {"ncc": 0.99, "gradient_ncc": 0.9}

    def failed(start, final, similarities=good):
        confidence, warnings = judge(problem, start, final, similarities)
        bad = {name for name, check in confidence.items() if not check["ok"]}
        assert bool(bad) == bool(warnings)
        return bad

    pose = GT[0]
    assert failed(pose, pose) == set()
    assert failed(_start(40.0, 0.0), pose) == {"rotation_travelled_deg"}
    assert failed(_start(0.0, 120.0), pose) == {"translation_travelled_mm"}
    aside = pose + torch.tensor([0, 0, 0, 300.0, 0, 0], dtype=torch.float64)
    assert "overlap" in failed(aside, aside)
    assert failed(pose, pose, {"ncc": 0.5, "gradient_ncc": 0.05}) == {"ncc", "gradient_ncc"}


def test_register_refuses_bones_without_labels(xray, tmp_path, capsys):
    """--bones selects among --labels' structures; a raw CT without labels has its bones
    thresholded, so --bones would be ignored: refused (it was dropped silently)."""
    out = tmp_path / "reg"
    line = _refused(["register", "--xray", str(xray), "--ct", str(tmp_path / "ct.nii.gz"),
                     "--bones", "pelvis", "--out", str(out)], capsys)
    assert "--bones: selects structures of --labels" in line
    assert not out.exists()

