"""Seeded pose sampling and the LightningDataModule over prepared and raw CTs."""

import math
import types

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from prostlab.data import (
    PoseDataModule,
    PoseDistribution,
    PoseSampler,
    case_generator,
    prost_normalised,
)
from prostlab.errors import ProstlabError
from prostlab.geometry import geodesic_angle, so3_exp


def test_normal_and_uniform_laws_in_degrees_and_mm():
    g = case_generator(0)
    normal = PoseDistribution("normal", (2.0, 4.0, 6.0), (1.0, 2.0, 3.0), (10.0, 0.0, 0.0))
    poses = normal.sample(40000, g)
    std = poses.std(dim=0)
    expected = torch.tensor([2, 4, 6, 0, 0, 0], dtype=torch.float64) * math.pi / 180
    expected[3:] = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(std, expected, rtol=0.03)
    assert poses[:, 0].mean().item() == pytest.approx(math.radians(10.0), abs=1e-3)
    uniform = PoseDistribution("uniform", 5.0, 20.0).sample(40000, g)
    assert uniform[:, 3:].abs().max() <= 20.0 and uniform[:, 3:].abs().max() > 19.9
    assert uniform[:, :3].abs().max() <= math.radians(5.0)


def test_prost_preset_matches_the_paper():
    dist = prost_normalised(half_size_mm=64 * 2.33)
    assert dist.rotation_deg[0] == pytest.approx(9.45)
    assert dist.translation_mm[0] == pytest.approx(22.37, abs=0.01)
    assert PoseDistribution.from_config({"preset": "prost"}) == dist


def test_relative_initial_pose_is_the_offset_from_the_ground_truth():
    sampler = PoseSampler(
        PoseDistribution(rotation_deg=20.0, translation_mm=30.0),
        PoseDistribution("uniform", rotation_deg=(0.0, 0.0, 5.0)),
    )
    gt, initial = sampler.sample(200, case_generator(1))
    angle = geodesic_angle(so3_exp(gt[:, :3]), so3_exp(initial[:, :3]))
    assert angle.max() <= math.radians(5.0) + 1e-9 and angle.max() > math.radians(4.0)
    assert torch.allclose(gt[:, 3:], initial[:, 3:])


def test_cases_are_reproducible_and_independent_of_order_and_workers():
    config = {
        "ground_truth": {"preset": "prost"},
        "initial": {"rotation_deg": 8.0, "translation_mm": 22.0},
    }
    dm = PoseDataModule(train_poses=config, batch_size=4, seed=7)
    dataset = dm.dataset("train")
    forward = [dataset[i]["gt_pose"] for i in range(6)]
    backward = [dataset[i]["gt_pose"] for i in reversed(range(6))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward, strict=True))
    again = PoseDataModule(train_poses=config, batch_size=4, seed=7).dataset("train")
    assert torch.equal(again[3]["initial_pose"], dataset[3]["initial_pose"])
    other = PoseDataModule(train_poses=config, batch_size=4, seed=8).dataset("train")
    assert not torch.equal(other[3]["gt_pose"], dataset[3]["gt_pose"])

    small = PoseDataModule(train_poses=config, test_poses=config, test_samples=8, seed=7)
    serial = list(DataLoader(small.dataset("test"), batch_size=4))
    parallel = list(DataLoader(small.dataset("test"), batch_size=4, num_workers=2))
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a["gt_pose"], b["gt_pose"])
    assert not torch.equal(
        small.dataset("train")[0]["gt_pose"], small.dataset("test")[0]["gt_pose"]
    )


def test_split_by_volume(example_dir):
    five = [{"prepared": str(example_dir)}] * 5
    assert PoseDataModule(volumes=five).split == {"train": [0, 1, 2], "val": [3], "test": [4]}
    explicit = {"train": [0, 1], "val": [2], "test": [3, 4]}
    dm = PoseDataModule(volumes=five, split=explicit)
    assert dm.split == explicit
    assert {dm.dataset("test")[i]["volume_index"] for i in range(4)} == {3, 4}
    with pytest.warns(UserWarning, match="too few to split"):
        PoseDataModule(volumes=five[:1])


def _synthetic_ct(folder, bone_label=3):
    hu = np.full((20, 18, 16), -1000.0, dtype=np.float32)
    hu[6:14, 5:13, 4:12] = 700.0
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[6:14, 5:13, 4:12] = bone_label
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), folder / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), folder / "labels.nii.gz")
    return {"ct": str(folder / "ct.nii.gz"), "labels": str(folder / "labels.nii.gz")}


def test_raw_ct_is_prepared_once_into_the_cache(tmp_path):
    source = _synthetic_ct(tmp_path)
    dm = PoseDataModule(volumes=[source], cache_dir=str(tmp_path / "cache"), size=16, bones=[3])
    dm.setup()
    (folder,) = list((tmp_path / "cache").iterdir())
    stamp = (folder / "meta.json").stat().st_mtime_ns
    again = PoseDataModule(volumes=[source], cache_dir=str(tmp_path / "cache"), size=16, bones=[3])
    again.setup()
    assert (folder / "meta.json").stat().st_mtime_ns == stamp
    assert again.prepared[0].ct.shape == (1, 16, 16, 16)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"volumes": [{"ct_path": "x"}]}, "data.volumes[0]"),
        ({"volumes": [{"prepared": "no/such"}]}, "no/such"),
        ({"volumes": [{"ct": "absent.nii.gz"}]}, "absent.nii.gz"),
        ({"split": {"train": [0], "val": [0], "test": [5]}}, "data.split.test"),
        ({"split": {"training": [0]}}, "training"),
        ({"train_poses": {"initial": {"rotation": 3}}}, "data.train_poses.initial"),
        ({"train_poses": {"initial": {"kind": "cauchy"}}}, "kind"),
        ({"batch_size": 0}, "data.batch_size"),
    ],
)
def test_bad_config_names_the_field(kwargs, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProstlabError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        PoseDataModule(**kwargs).setup()


def test_segmentation_without_the_chosen_bones_is_an_error(tmp_path):
    source = _synthetic_ct(tmp_path, bone_label=4)
    dm = PoseDataModule(volumes=[source], cache_dir=str(tmp_path / "cache"), size=16, bones=[3])
    with pytest.raises(ProstlabError, match="3"):
        dm.setup()


def test_batch_must_divide_over_processes():
    dm = PoseDataModule(batch_size=3)
    dm.trainer = types.SimpleNamespace(world_size=2)
    with pytest.raises(ProstlabError, match="data.batch_size: 3 does not divide over 2"):
        dm.per_process_batch()
