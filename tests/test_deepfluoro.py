"""DeepFluoro: the HDF5 layout read, its frames turned into prostlab's (round trips to 1e-6), the
rot-180-for-up flag, the data module's cases, and `prostlab test` on a synthetic file.

The file is written by ``tests/deepfluoro_synthetic.py`` from the bundled chest CT, following the
layout documented by the data set's authors; the real file is not used here.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from deepfluoro_synthetic import BORDER_PX, I0, SPECIMEN, write_synthetic
from fit_run import fit
from prostlab.data import PoseDataModule
from prostlab.data import deepfluoro as df
from prostlab.errors import ProstlabError
from prostlab.geometry import Camera, pose_to_matrix
from prostlab.projector import Projector

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
TINY_CAMERA = {"sdd": 1020.0, "sid": 620.0, "height": 16, "width": 16,
               "pixel_spacing": [23.36, 23.36]}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("deepfluoro") / "synthetic.h5")


@pytest.fixture(scope="module")
def datamodule(synthetic, tmp_path_factory):
    module = PoseDataModule(
        volumes=[{"deepfluoro": str(synthetic.path), "specimen": 1, "i0": I0,
                  "collimator_px": BORDER_PX}],
        cache_dir=str(tmp_path_factory.mktemp("cache")), size=32, bones="pelvis",
        camera=TINY_CAMERA, test_samples=4,
        test_poses={"initial": {"rotation_deg": 5.0, "translation_mm": 10.0}, "relative": True},
    )
    module.setup("test")
    return module


def _project_file(geometry, cam_to_vol, points_lps):
    """Pixels ``K E T^-1 p`` of LPS points in the stored image: the file's own camera model."""
    homogeneous = np.concatenate((points_lps, np.ones((len(points_lps), 1))), axis=1)
    camera = (geometry.extrinsic @ np.linalg.inv(cam_to_vol) @ homogeneous.T)[:3]
    uvw = geometry.intrinsic @ camera
    return (uvw[:2] / uvw[2]).T


def _project_prostlab(camera: Camera, pose: torch.Tensor, points_vol: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(points_vol)
    extrinsic = camera.extrinsics(pose[None].double())[0]
    return camera.project(x @ extrinsic[:, :3].T + extrinsic[:, 3]).numpy()


def _to_stored(uv: np.ndarray, signs: np.ndarray, rows: int, cols: int) -> np.ndarray:
    u = uv[:, 0] if signs[0] > 0 else cols - 1 - uv[:, 0]
    v = uv[:, 1] if signs[1] > 0 else rows - 1 - uv[:, 1]
    return np.stack((u, v), axis=1)


def test_layout_is_read(synthetic):
    geometry = df.read_geometry(synthetic.path)
    assert (geometry.rows, geometry.cols) == (64, 64) and geometry.intrinsic[0, 0] < 0
    assert df.specimen_name(synthetic.path, 1) == SPECIMEN == df.specimen_name(synthetic.path,
                                                                               SPECIMEN)
    ct = df.read_specimen(synthetic.path, 1)
    assert ct.hu.shape == ct.labels.shape == (64, 64, 64)
    assert set(np.unique(ct.labels)) <= set(range(8)) and ct.hu.min() >= -1000.5
    assert np.allclose(ct.affine_lps[:3, :3], 5.1953125 * np.eye(3))
    assert sorted(ct.landmarks) == [f"L{k}" for k in range(1, 7)]
    ids = df.projection_ids(synthetic.path, SPECIMEN)
    assert ids == ["000", "001", "002", "003", "004"]
    flags = [df.read_projection(synthetic.path, SPECIMEN, i).rot_180_for_up for i in ids]
    assert tuple(flags) == synthetic.flags


def test_poses_round_trip_and_project_the_landmarks_alike(synthetic, datamodule):
    geometry = df.read_geometry(synthetic.path)
    ct = df.read_specimen(synthetic.path, 1)
    points_lps = np.stack(list(ct.landmarks.values()))
    cube = datamodule.prepared[0].ct
    cube_to_lps = df.volume_to_lps(cube.affine, cube.shape[1:])
    for index, pid in enumerate(df.projection_ids(synthetic.path, SPECIMEN)):
        projection = df.read_projection(synthetic.path, SPECIMEN, pid)
        signs = df.camera_signs(geometry.intrinsic, projection.rot_180_for_up)
        # file -> prostlab -> file, and prostlab -> file -> prostlab (the writer's pose)
        pose = df.pose_from_file(projection.cam_to_pelvis_vol, geometry.extrinsic, signs,
                                 synthetic.vol_to_lps, 620.0)
        assert torch.allclose(pose, synthetic.poses[index], atol=1e-6, rtol=0)
        back = df.pose_to_file(pose, geometry.extrinsic, signs, synthetic.vol_to_lps, 620.0)
        assert np.allclose(back, projection.cam_to_pelvis_vol, atol=1e-6, rtol=0)
        # the prepared cube's pose projects the landmarks where the file's K E T^-1 does
        expected = _project_file(geometry, projection.cam_to_pelvis_vol, points_lps)
        assert np.allclose(expected, np.stack(list(projection.landmarks.values())), atol=1e-6)
        camera = df.detector_camera(geometry, signs, 620.0)
        cube_pose = df.pose_from_file(projection.cam_to_pelvis_vol, geometry.extrinsic, signs,
                                      cube_to_lps, 620.0)
        points = df.landmarks_in_volume(points_lps, cube_to_lps)
        uv = _project_prostlab(camera, cube_pose, points)
        assert np.allclose(_to_stored(uv, signs, 64, 64), expected, atol=1e-6, rtol=0)
        # and so does the fitted 16 x 16 detector (4 x 4 bins): u' = (u + 1/2) / 4 - 1/2
        case = df.xray_case(projection, geometry, cube_to_lps, (16, 16), 620.0, i0=I0,
                            collimator_px=BORDER_PX)
        fitted = _project_prostlab(case.camera, case.gt_pose, points)
        assert np.allclose(fitted, (uv + 0.5) / 4 - 0.5, atol=1e-6, rtol=0)
        assert case.camera == Camera.from_dict(TINY_CAMERA)


def test_stored_images_follow_the_files_camera_model():
    """Independent of the reader: a bright voxel rendered through the reader's pose and flips
    lands on the stored image where the file's own ``K E T^-1 p`` puts it."""
    geometry = df.Geometry(np.array([[-80.0, 0, 15.5], [0, -80.0, 15.5], [0, 0, 1]]),
                           np.eye(4), 32, 32, (12.0, 12.0))
    volume = torch.zeros(1, 1, 9, 9, 9)
    volume[0, 0, 6, 3, 4] = 50.0  # voxel (6, 3, 4): (8, -4, 0) mm in the volume frame
    vol_to_lps = np.eye(4)
    point = np.array([[8.0, -4.0, 0.0]])
    for flag in (False, True):
        signs = df.camera_signs(geometry.intrinsic, flag)
        pose = torch.tensor([0.2, -0.1, 0.3, 5.0, -7.0, 0.0], dtype=torch.float64)
        cam_to_vol = df.pose_to_file(pose, geometry.extrinsic, signs, vol_to_lps, 600.0)
        camera = df.detector_camera(geometry, signs, 600.0)
        drr = Projector(camera, step=0.5, backend="torch")(volume, (4.0,) * 3,
                                                           pose[None].float())[0, 0].numpy()
        stored = df.orient_image(drr, signs)
        row, col = np.unravel_index(np.argmax(stored), stored.shape)
        u, v = _project_file(geometry, cam_to_vol, point)[0]
        assert abs(col - u) <= 1.0 and abs(row - v) <= 1.0, (flag, (col, row), (u, v))


def test_upright_and_registered_targets(synthetic, datamodule):
    """Every converted pose shows the head up (superior points to -y), and the target matches
    the prepared CT's DRR at its ground truth, flagged or not; ignoring the flag breaks it."""
    view = datamodule.prepared[0]
    cube_to_lps = df.volume_to_lps(view.ct.affine, view.ct.shape[1:])
    superior = np.linalg.inv(cube_to_lps)[:3, :3] @ np.array([0.0, 0.0, 1.0])
    projector = Projector(Camera.from_dict(TINY_CAMERA), step=4.0, backend="torch")
    geometry = df.read_geometry(synthetic.path)
    for pid in df.projection_ids(synthetic.path, SPECIMEN):
        projection = df.read_projection(synthetic.path, SPECIMEN, pid)
        case = df.xray_case(projection, geometry, cube_to_lps, (16, 16), 620.0, i0=I0,
                            collimator_px=BORDER_PX)
        rotation = pose_to_matrix(case.gt_pose[None])[0, :3, :3].numpy()
        assert (rotation @ superior)[1] < -0.8
        drr = projector(view.ct.batched(), view.ct.spacing, case.gt_pose[None].float())[0, 0]
        mask = torch.from_numpy(case.mask)
        target = torch.from_numpy(case.target)
        assert _ncc(drr[mask], target[mask]) > 0.95, pid
        if projection.rot_180_for_up:
            wrong = np.ascontiguousarray(case.target[::-1, ::-1])
            assert _ncc(drr[mask], torch.from_numpy(wrong)[mask]) < 0.8


def _ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# ---------------------------------------------------------------------------- errors
def test_missing_file_specimen_and_dataset_are_one_line(synthetic, tmp_path):
    with pytest.raises(ProstlabError, match=r"nope\.h5: no such file"):
        df.read_geometry(tmp_path / "nope.h5")
    with pytest.raises(ProstlabError, match=r"no specimen group '18-1109' \(specimen 2\); "
                                            r"found 17-1882"):
        df.read_specimen(synthetic.path, 2)
    broken = tmp_path / "broken.h5"
    broken.write_bytes(synthetic.path.read_bytes())
    with h5py.File(broken, "a") as f:
        del f[f"{SPECIMEN}/projections/002/gt-poses/cam-to-pelvis-vol"]
        del f["proj-params/intrinsic"]
    with pytest.raises(ProstlabError, match=r"no dataset 'proj-params/intrinsic'"):
        df.read_geometry(broken)
    with pytest.raises(ProstlabError, match=r"'17-1882/projections/002/gt-poses/cam-to-pelvis"):
        df.read_projection(broken, SPECIMEN, "002")


# ---------------------------------------------------------------------------- data module
def test_datamodule_gives_the_real_xrays_as_test_cases(synthetic, datamodule):
    cases = datamodule.dataset("test")
    assert len(cases) == 4  # test_samples caps the 5 projections
    geometry = df.read_geometry(synthetic.path)
    cube = datamodule.prepared[0].ct
    cube_to_lps = df.volume_to_lps(cube.affine, cube.shape[1:])
    ct = df.read_specimen(synthetic.path, 1)
    for index in range(len(cases)):
        case = cases[index]
        assert case["target"].shape == case["target_mask"].shape == (1, 16, 16)
        assert case["target_mask"].dtype == torch.bool and case["target_mask"].sum() == 196
        assert float(case["target"][case["target_mask"]].min()) > 0
        projection = df.read_projection(synthetic.path, SPECIMEN, f"{index:03d}")
        signs = df.camera_signs(geometry.intrinsic, projection.rot_180_for_up)
        gt = df.pose_from_file(projection.cam_to_pelvis_vol, geometry.extrinsic, signs,
                               cube_to_lps, 620.0)
        assert torch.allclose(case["gt_pose"].double(), gt, atol=1e-5)
        offset = (case["initial_pose"] - case["gt_pose"]).abs()
        assert 0 < float(offset.max()) < 60
        expected = df.landmarks_in_volume(np.stack(list(ct.landmarks.values())), cube_to_lps)
        assert np.allclose(case["landmarks"].numpy(), expected, atol=1e-4)
        again = cases[index]
        assert torch.equal(again["initial_pose"], case["initial_pose"])  # seeded per case
    assert datamodule.xray_cameras() == [Camera.from_dict(TINY_CAMERA)]


def test_datamodule_applies_the_ground_truth_correction(synthetic, datamodule):
    module = PoseDataModule(
        volumes=[{"deepfluoro": str(synthetic.path), "specimen": 1, "i0": I0,
                  "collimator_px": BORDER_PX, "gt_correction": "xreg"}],
        cache_dir=str(datamodule.cache_dir), size=32, bones="pelvis", camera=TINY_CAMERA,
        test_samples=1,
        test_poses={"initial": {"rotation_deg": 5.0, "translation_mm": 10.0}, "relative": True},
    )
    module.setup("test")
    geometry = df.read_geometry(synthetic.path)
    cube = module.prepared[0].ct
    cube_to_lps = df.volume_to_lps(cube.affine, cube.shape[1:])
    projection = df.read_projection(synthetic.path, SPECIMEN, "000")
    signs = df.camera_signs(geometry.intrinsic, projection.rot_180_for_up)
    truth = {c: df.pose_from_file(df.corrected_ground_truth(projection.cam_to_pelvis_vol, c),
                                  geometry.extrinsic, signs, cube_to_lps, 620.0)
             for c in ("none", "xreg")}
    gt = module.dataset("test")[0]["gt_pose"].double()
    assert torch.allclose(gt, truth["xreg"], atol=1e-5)
    assert not torch.allclose(gt, truth["none"], atol=0.1)
    assert torch.allclose(datamodule.dataset("test")[0]["gt_pose"].double(), truth["none"],
                          atol=1e-5)


def test_datamodule_refusals(synthetic, tmp_path):
    source = {"deepfluoro": str(synthetic.path), "specimen": 1}
    with pytest.raises(ProstlabError, match=r"data.volumes\[0\].i0: -1"):
        PoseDataModule(volumes=[{**source, "i0": -1}])
    with pytest.raises(ProstlabError, match=r"data.volumes\[0\].gt_correction: 'DiffPose'"):
        PoseDataModule(volumes=[{**source, "gt_correction": "DiffPose"}])
    with pytest.raises(ProstlabError, match=r"data.volumes\[0\]: keys .*expected \{deepfluoro"):
        PoseDataModule(volumes=[{**source, "view": 3}])
    with pytest.raises(ProstlabError, match=r"data.test_poses.relative"):
        PoseDataModule(volumes=[source], test_poses={"relative": False})
    with pytest.raises(ProstlabError, match=r"specimen: 9; expected 1-6"):
        PoseDataModule(volumes=[{**source, "specimen": 9}], cache_dir=str(tmp_path)).setup()
    with pytest.raises(ProstlabError, match=r"model.camera: .* does not match the real X-rays"):
        df.check_fitted_camera(Camera.from_dict({**TINY_CAMERA, "pixel_spacing": [20.0, 20.0]}),
                               Camera.from_dict(TINY_CAMERA))


# ---------------------------------------------------------------------------- prostlab test
def _prostlab(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "prostlab.cli", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)


def _test_args(synthetic) -> list[str]:
    volumes = (f"[{{deepfluoro: {synthetic.path}, specimen: 1, i0: {I0}, "
               f"collimator_px: {BORDER_PX}, gt_correction: xreg}}]")
    return ["test", "--config", str(TINY), "--data.volumes", volumes, "--data.bones", "pelvis_xreg",
            "--data.size", "32", "--data.downsample", "1", "--data.test_samples", "3",
            "--model.benchmark.methods", "{ncc: ncc}", "--model.benchmark.max_iterations", "20",
            "--model.benchmark.gif_case", "null", "--model.benchmark.overlays", "1"]


def test_prostlab_test_on_the_synthetic_file_scores_the_landmarks(synthetic, tmp_path):
    done = _prostlab(tmp_path, *_test_args(synthetic))
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "results" / "tiny" / "latest"
    with (out / "cases.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["case"]) for r in rows] == [0, 1, 2]
    for row in rows:
        for key in ("initial_landmark_mtre_mm", "final_landmark_mtre_mm",
                    "final_landmark_mrpd_mm", "initial_diffpose_mtre", "final_diffpose_mtre"):
            assert math.isfinite(float(row[key])), key
        assert float(row["final_landmark_mtre_mm"]) < float(row["initial_landmark_mtre_mm"])
    summary = (out / "summary.md").read_text()
    assert "median landmark mTRE (mm)" in summary
    assert ("- real X-rays: specimen 1; bones (the segmented CT): labels 1, 2, 3, 4, 7 (xreg's "
            "pelvis); ground truth -0.5 mm on each translation (xreg's); I0 60000.0 (given); "
            f"border {BORDER_PX} px masked") in summary


def test_prostlab_test_refuses_a_camera_that_is_not_the_files(synthetic, tmp_path):
    done = _prostlab(tmp_path, *_test_args(synthetic), "--model.camera.pixel_spacing",
                     "[20.0, 20.0]")
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "model.camera" in last and "'pixel_spacing': [20.0, 20.0]" in last
    assert "[23.36, 23.36]" in last and "Traceback" not in done.stderr


def test_prostlab_fit_trains_on_the_specimens_ct(synthetic, tmp_path):
    volumes = f"[{{deepfluoro: {synthetic.path}, specimen: 1}}]"
    done = fit(tmp_path, "--data.volumes", volumes, "--data.bones", "pelvis", "--data.size", "32",
               "--data.downsample", "2", "--trainer.max_steps", "1",
               "--trainer.limit_val_batches", "0", "--model.image_every_n_steps", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    prepared = list((tmp_path / "cache" / "prepared").glob("deepfluoro-1-*/meta.json"))
    assert len(prepared) == 1 and '"ids": [\n      1,\n      2,\n      4,\n      7\n' in (
        prepared[0].read_text())


def test_shipped_config_fits_the_documented_detector():
    """configs/deepfluoro.yaml's camera is the real file's detector (1536 px of 0.194 mm,
    K = [[-5257.73, 0, 767.5], ...]) binned 12 x 12."""
    config = yaml.safe_load((REPO / "configs" / "deepfluoro.yaml").read_text())
    focal = 1020.0 / 0.194
    geometry = df.Geometry(np.array([[-focal, 0, 767.5], [0, -focal, 767.5], [0, 0, 1]]),
                           np.eye(4), 1536, 1536, (0.194, 0.194))
    model = Camera.from_dict(config["model"]["camera"])
    for flag in (False, True):
        full = df.detector_camera(geometry, df.camera_signs(geometry.intrinsic, flag), model.sid)
        df.check_fitted_camera(model, df.fitted_camera(full, model))
    assert config["data"]["bones"] == "pelvis_xreg" and config["data"]["test_samples"] is None


def test_the_data_layer_imports_nothing_from_the_packages_above_it():
    """deepfluoro.py reached up into ``prostlab.xray`` with imports hidden in its functions (a
    data <-> xray cycle). Every import of ``prostlab.data``, at module level or in a function,
    stays in the data layer or below it; the X-ray preprocessing both use is
    ``prostlab.data.detector``."""
    import ast

    below = ("prostlab.data", "prostlab.geometry", "prostlab.errors", "prostlab.limits",
             "prostlab.outputs", "prostlab.resources", "prostlab.csv_table")
    for path in sorted((REPO / "src" / "prostlab" / "data").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] if node.module != "prostlab" else [
                    f"prostlab.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert name == "prostlab" or not name.startswith("prostlab.") or any(
                    name == b or name.startswith(b + ".") for b in below), f"{path.name}: {name}"
