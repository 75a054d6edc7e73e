"""The benchmark protocol: offset levels, the wide law, and targets that are not the moving image."""

import math

import pytest
import torch

from prostlab.data import PoseDataModule, PoseDistribution
from prostlab.data.blur import detector_blur
from prostlab.errors import ProstlabError
from prostlab.geometry import Camera, geodesic_angle, so3_exp
from prostlab.lightning.benchmark import BenchmarkConfig
from prostlab.lightning.targets import TargetConfig, render_targets
from prostlab.lightning.volume_bank import VolumeBank
from prostlab.metrics.functional import mtre
from prostlab.projector import Projector

pytestmark = pytest.mark.filterwarnings("ignore:data. 1 volume:UserWarning")

LEVELS = {"kind": "levels", "rotation_deg": [5, 10, 20, 30], "translation_mm": [10, 25, 50, 75]}


def test_levels_give_each_case_one_exact_offset_cycling_and_seeded():
    poses = {"ground_truth": {"preset": "prost"}, "initial": LEVELS, "relative": True}
    cases = PoseDataModule(test_poses=poses, test_samples=8, seed=3).dataset("test")
    for i in range(8):
        case = cases[i]
        gt, initial = case["gt_pose"].double(), case["initial_pose"].double()
        angle = geodesic_angle(so3_exp(gt[None, :3]), so3_exp(initial[None, :3]))
        level = i % 4  # order: cycle
        assert math.degrees(float(angle)) == pytest.approx(LEVELS["rotation_deg"][level], abs=1e-3)
        assert float((gt[3:] - initial[3:]).norm()) == pytest.approx(
            LEVELS["translation_mm"][level], abs=1e-3)
    again = PoseDataModule(test_poses=poses, test_samples=8, seed=3).dataset("test")
    other = PoseDataModule(test_poses=poses, test_samples=8, seed=4).dataset("test")
    assert all(torch.equal(cases[i]["initial_pose"], again[i]["initial_pose"]) for i in range(8))
    assert not torch.equal(cases[5]["initial_pose"], other[5]["initial_pose"])

    drawn = PoseDistribution.from_config({**LEVELS, "order": "draw"})
    offsets = drawn.sample(40, torch.Generator().manual_seed(0))
    lengths = {round(float(v)) for v in offsets[:, 3:].norm(dim=1)}
    assert lengths == {10, 25, 50, 75}  # each level drawn at least once in 40
    assert torch.equal(offsets, drawn.sample(40, torch.Generator().manual_seed(0)))
    one_angle = PoseDistribution.from_config({"kind": "levels", "rotation_deg": 10,
                                              "translation_mm": [0, 20]})
    assert one_angle.rotation_deg == (10.0, 10.0)


@pytest.mark.parametrize("config, needle", [
    ({**LEVELS, "translation_mm": [1, 2, 3]}, "data.test_poses.initial.translation_mm"),
    ({**LEVELS, "rotation_deg": [5, -1, 2, 3]}, "data.test_poses.initial.rotation_deg"),
    ({**LEVELS, "order": "shuffle"}, "data.test_poses.initial.order"),
    ({**LEVELS, "translation_mean_mm": 5}, "data.test_poses.initial.translation_mean_mm"),
    ({"kind": "normal", "order": "cycle"}, "data.test_poses.initial.order"),
])
def test_bad_levels_name_the_field(config, needle):
    with pytest.raises(ProstlabError, match=needle.replace(".", r"\.")):
        PoseDataModule(test_poses={"initial": config})


def test_the_wide_law_reaches_150_mm_initial_mtre():
    """The issue's wide offsets, normal 20 deg and 50 mm per axis, as a plain config."""
    wide = {"ground_truth": {"preset": "prost"},
            "initial": {"kind": "normal", "rotation_deg": 20, "translation_mm": 50}}
    cases = PoseDataModule(test_poses=wide, test_samples=100, seed=0).dataset("test")
    gt = torch.stack([cases[i]["gt_pose"] for i in range(100)]).double()
    initial = torch.stack([cases[i]["initial_pose"] for i in range(100)]).double()
    grid = torch.linspace(-60.0, 60.0, 5, dtype=torch.float64)
    points = torch.cartesian_prod(grid, grid, grid)  # a 120 mm cube of anatomy
    errors = mtre(initial, gt, points)
    assert float(errors.max()) > 150.0 and 40.0 < float(errors.median()) < 150.0


@pytest.fixture(scope="module")
def bank():
    """The bundled CT at 32^3 (data.downsample 4) with its 128^3 original kept for targets."""
    datamodule = PoseDataModule(downsample=4)
    datamodule.setup()
    volumes = VolumeBank(datamodule.prepared, max_points=100)
    volumes.keep_fine(datamodule.full_resolution_cts([0]))
    return volumes


CAMERA = Camera(sdd=1020.0, sid=620.0, height=32, width=32, pixel_spacing=(11.68, 11.68))
GT = torch.tensor([[0.05, -0.1, 0.02, 3.0, -5.0, 8.0], [-0.1, 0.05, 0.0, -4.0, 2.0, -6.0]])


def _ncc(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def test_fine_targets_differ_from_the_moving_image_but_agree_closely(bank):
    view = bank[0]
    assert view.fine.shape[-3:] == (128, 128, 128) and view.ct.shape[-3:] == (32, 32, 32)
    assert view.fine_spacing[0] == pytest.approx(view.spacing[0] / 4)
    projector = Projector(CAMERA, step=10.0, backend="torch")
    cases = torch.tensor([0, 1])
    crime = render_targets(TargetConfig(), projector, view, GT, cases, seed=0)
    fine = render_targets(TargetConfig(volume="fine", step_mm=5.0), projector, view, GT, cases, 0)
    with torch.no_grad():
        moving = projector(view.ct, view.spacing, GT)
    assert torch.equal(crime, moving)  # the inverse crime: the target is the moving image
    assert float((fine - moving).abs().max()) > 1e-2 * float(moving.abs().max())
    for b in range(2):
        assert _ncc(fine[b], moving[b]) > 0.99


def test_noise_is_per_case_whatever_the_batch_and_blur_conserves_intensity(bank):
    view = bank[0]
    projector = Projector(CAMERA, step=10.0, backend="torch")
    config = TargetConfig(photons=1e4, blur_mm=15.0)
    both = render_targets(config, projector, view, GT, torch.tensor([4, 9]), seed=1)
    alone = render_targets(config, projector, view, GT[1:], torch.tensor([9]), seed=1)
    assert torch.equal(both[1], alone[0])
    clean = render_targets(TargetConfig(blur_mm=15.0), projector, view, GT, torch.tensor([4, 9]), 1)
    assert not torch.equal(both, clean) and _ncc(both[0], clean[0]) > 0.95

    image = torch.zeros(1, 1, 33, 41, dtype=torch.float64)
    image[0, 0, 14:18, 18:22] = 1.0
    blurred = detector_blur(image, 6.0, (3.0, 1.5))  # 2 px along rows, 4 px along columns
    assert float(blurred.sum()) == pytest.approx(float(image.sum()), rel=1e-9)
    assert float(blurred.max()) < 0.5 * float(image.max())
    row = blurred[0, 0, 16]  # wider along the columns, whose pixels are smaller
    col = blurred[0, 0, :, 20]
    assert int((row > 0.01).sum()) > int((col > 0.01).sum())
    assert detector_blur(image, 0.0, (3.0, 1.5)) is image
    with pytest.raises(ProstlabError, match="blur_mm"):
        detector_blur(image, -1.0, (3.0, 1.5))


@pytest.mark.parametrize("config, needle", [
    ({"photons": 1e4}, "model.benchmark.target.photons"),  # moved into target
    ({"target": {"volume": "original"}}, "model.benchmark.target.volume"),
    ({"target": {"photons": 0}}, "model.benchmark.target.photons"),
    ({"target": {"blur_mm": -2}}, "model.benchmark.target.blur_mm"),
    ({"target": {"step": 1.0}}, "model.benchmark.target: unknown key"),
    ({"bins_mm": [0, 50, 20]}, "model.benchmark.bins_mm"),
    ({"capture_rate": 90}, "model.benchmark.capture_rate"),
    ({"capture_min_cases": 0}, "model.benchmark.capture_min_cases"),
])
def test_bad_benchmark_target_and_capture_keys_name_the_field(config, needle):
    with pytest.raises(ProstlabError, match=needle.replace(".", r"\.")):
        BenchmarkConfig.from_config(config)


def test_target_config_reports_the_inverse_crime():
    assert TargetConfig().inverse_crime
    assert not TargetConfig(volume="fine").inverse_crime
    made = BenchmarkConfig.from_config({"target": {"volume": "fine", "step_mm": 1.75,
                                                   "photons": 1e5, "blur_mm": 1.0}})
    assert made.target_config.as_dict() == {"volume": "fine", "step_mm": 1.75,
                                            "photons": 1e5, "blur_mm": 1.0}


def test_prostlab_test_renders_fine_blurred_noisy_targets_and_reports_capture(tmp_path):
    """End to end on configs/tiny.yaml: 32^3 moving CT, the 128^3 original for the targets."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    args = ["test", "--config", str(tiny), "--data.test_samples", "2",
            "--model.benchmark.methods", "{gradncc: gradncc}",  # no network: no checkpoint
            "--model.benchmark.max_iterations", "3", "--model.benchmark.gif_case", "null",
            # One flag for the mapping: a second --model.benchmark.target.KEY would replace it.
            "--model.benchmark.target", "{volume: fine, step_mm: 4, blur_mm: 10, photons: 1e5}",
            "--model.benchmark.capture_min_cases", "1"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "prostlab.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(next((tmp_path / "results" / "tiny").rglob("summary.json")).read_text())
    assert summary["meta"]["target"] == {"volume": "fine", "step_mm": 4.0, "photons": 1e5,
                                         "blur_mm": 10.0}
    for stats in summary["methods"].values():
        assert sum(b["n"] for b in stats["success_by_initial_mtre"]) == 2
        assert "capture_range_mm" in stats and "median_final_mpd_mm" in stats
    assert "capture range (mm)" in done.stdout
