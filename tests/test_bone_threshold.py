"""Bones without labels (prostlab.data.bone_threshold), several patients and their folds
(prostlab.data.patients), and prepare/fit using them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prostlab.data import load_prepared, prepare_ct, save_nifti
from prostlab.data.bone_threshold import BoneThreshold, dice, threshold_bones
from prostlab.data.patients import leave_patient_out, patient_name, patient_names
from prostlab.errors import ProstlabError

SPACING = (1.0, 1.0, 2.0)


def phantom(shape=(80, 70, 30)):
    """A body of water on a table, with a 'vertebra' (1000 HU cortex around 100 HU marrow), a
    contrast-filled vessel (350 HU), a calcified speck (900 HU, 2 voxels) and a dense table
    (500 HU) 6 mm under the body. Returns the HU and the true bone mask."""
    hu = np.full(shape, -1000.0, np.float32)
    i, j, k = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    body = ((i - 40) / 32) ** 2 + ((j - 30) / 24) ** 2 <= 1
    hu[body] = 20.0
    hu[5:75, 60:64, :] = 500.0  # the table, below the body (body ends at j = 54)
    r = np.hypot(i - 40, j - 38)
    vertebra = (r <= 8) & (k >= 4) & (k < 26)
    hu[vertebra] = 100.0
    hu[vertebra & (r > 6)] = 1000.0
    hu[vertebra & ((k < 5) | (k >= 25))] = 1000.0  # end plates close the shell
    vessel = np.hypot(i - 40, j - 18) <= 6
    hu[vessel] = 350.0
    hu[20, 30, 10:12] = 900.0
    return hu, vertebra


def test_bones_are_found_and_table_vessel_and_specks_are_not():
    hu, truth = phantom()
    mask = threshold_bones(hu, SPACING)
    assert dice(mask, truth) > 0.97
    assert not mask[:, 58:, :].any()  # the table
    assert not mask[np.hypot(*np.meshgrid(np.arange(80) - 40, np.arange(70) - 18,
                                          indexing="ij"))[..., None].repeat(30, 2) <= 6].any()
    assert not mask[20, 30, 10:12].any()  # the speck
    # The marrow (100 HU, below the threshold) is inside the mask, by hole filling.
    assert mask[40, 38, 15]


def test_a_plain_threshold_would_keep_the_vessel_and_table():
    hu, truth = phantom()
    # With the seeds at the threshold and no body mask opening, the vessel stays in.
    loose = threshold_bones(hu, SPACING, BoneThreshold(bone_hu=300, dense_hu=300))
    assert dice(loose, truth) < dice(threshold_bones(hu, SPACING), truth)


@pytest.mark.parametrize("field,value,needle", [
    ("bone_hu", 5000.0, "between -500 and 1500"),
    ("bone_hu", float("nan"), "finite"),
    ("grow_mm", -1.0, "expected >= 0"),
    ("dense_hu", 100.0, "below bone_hu"),
])
def test_bad_settings_name_the_field(field, value, needle):
    with pytest.raises(ProstlabError, match=needle) as err:
        BoneThreshold(**{field: value})
    assert field in str(err.value)


def test_dice():
    a = np.zeros(10, bool)
    b = a.copy()
    assert dice(a, b) == 1.0
    a[:4], b[2:6] = True, True
    assert dice(a, b) == pytest.approx(2 * 2 / 8)


def test_prepare_without_labels_thresholds_and_centres_on_the_bones(tmp_path):
    hu, truth = phantom()
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = (-40.0, -30.0, -20.0)
    ct = save_nifti(tmp_path / "ct.nii.gz", hu, affine)
    written = prepare_ct(ct, None, tmp_path / "p", size=16, margin_mm=4.0)
    assert {"ct", "bone", "meta"} == set(written)
    prepared = load_prepared(tmp_path / "p")
    assert prepared.labels is None and prepared.meta["bones"]["method"] == "threshold"
    assert prepared.meta["bones"]["bone_hu"] == BoneThreshold().bone_hu
    # Centred on the vertebra's box: voxel (40, 38, 14.5) in the source.
    expected = affine @ np.array([40.0, 38.0, 14.5, 1.0])
    np.testing.assert_allclose(prepared.meta["centre_world_ras_mm"], expected[:3], atol=1e-3)
    # Cube edge: the vertebra's largest extent (44 mm along k) plus twice the margin.
    assert prepared.meta["side_mm"] == pytest.approx(44.0 + 8.0)
    bone = prepared.bone.data[0]
    assert bool((bone > 0).any()) and bool((bone <= prepared.ct.data[0] + 1e-7).all())


def test_prepare_refuses_a_threshold_with_labels_and_a_ct_without_bones(tmp_path):
    hu, _ = phantom()
    ct = save_nifti(tmp_path / "ct.nii.gz", hu, np.diag([*SPACING, 1.0]))
    with pytest.raises(ProstlabError, match="from the label map"):
        prepare_ct(ct, ct, tmp_path / "a", bone_threshold=BoneThreshold())
    soft = save_nifti(tmp_path / "soft.nii.gz", np.clip(hu, -1000, 60), np.diag([*SPACING, 1.0]))
    with pytest.raises(ProstlabError, match="no bone found") as err:
        prepare_ct(soft, None, tmp_path / "b", size=8)
    assert "soft.nii.gz" in str(err.value) and not (tmp_path / "b" / "meta.json").exists()


def test_patient_names_come_from_files_or_their_folders(tmp_path):
    assert patient_name("/data/chest_cta/ct.nii.gz") == "chest_cta"
    assert patient_name("/data/scans/lung1.nii.gz") == "lung1"
    (tmp_path / "case07").mkdir()
    assert patient_name(tmp_path / "case07") == "case07"
    with pytest.raises(ProstlabError, match="one name per patient"):
        patient_names(["/a/p1/ct.nii.gz", "/b/p1/ct.nii.gz"])


def test_leave_patient_out_tests_each_patient_once_and_never_trains_on_it():
    n = 5
    folds = [leave_patient_out(n, k) for k in range(n)]
    assert sorted(f["test"][0] for f in folds) == list(range(n))
    for k, fold in enumerate(folds):
        assert fold["test"] == [k] and fold["val"] == [(k + 1) % n]
        assert sorted(fold["train"] + fold["val"] + fold["test"]) == list(range(n))
    with pytest.raises(ProstlabError, match="at least 3"):
        leave_patient_out(2, 0)
    with pytest.raises(ProstlabError, match="expected 0 to 4"):
        leave_patient_out(5, 5)


def test_datamodule_fold_is_a_leave_patient_out_split(example_dir):
    from prostlab.data import PoseDataModule

    volumes = [{"prepared": str(example_dir)}] * 4
    data = PoseDataModule(volumes=volumes, fold=2)
    assert data.split == {"train": [0, 1], "val": [3], "test": [2]}
    with pytest.raises(ProstlabError, match="data.fold and data.split"):
        PoseDataModule(volumes=volumes, fold=1, split={"train": [0], "val": [1], "test": [2]})


def test_init_weights_start_a_fresh_run_from_a_checkpoint(tmp_path):
    from prostlab.lightning.training import ConvexSimilarityModule

    camera = {"sdd": 1020.0, "sid": 620.0, "height": 16, "width": 16,
              "pixel_spacing": [20.0, 20.0]}
    net = {"volume_channels": 1, "volume_depth": 1, "volume_hidden": 4,
           "encoder_channels": [4, 8], "embedding_dim": 8, "pool_size": 2}
    source = ConvexSimilarityModule(camera=camera, net=net)
    path = tmp_path / "source.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    started = ConvexSimilarityModule(camera=camera, net=net, init_weights=str(path))
    for key, value in source.net.state_dict().items():
        assert torch.equal(started.net.state_dict()[key], value)
    fresh = ConvexSimilarityModule(camera=camera, net=net)
    assert any(not torch.equal(fresh.net.state_dict()[k], v)
               for k, v in source.net.state_dict().items())
    wider = {**net, "embedding_dim": 16}
    with pytest.raises(ProstlabError, match="source.ckpt: its network differs"):
        ConvexSimilarityModule(camera=camera, net=wider, init_weights=str(path))


def test_the_bundled_pelvis_is_a_thresholded_example_and_pelvis_yaml_trains_on_it():
    from omegaconf import OmegaConf

    from prostlab.data import PoseDataModule, example_path
    from prostlab.resources import resolve_config

    data = PoseDataModule(volumes=[{"example": "pelvis_ct_128"}])
    assert data.sources == [{"prepared": str(example_path("pelvis_ct_128"))}]
    prepared = load_prepared(example_path("pelvis_ct_128"))
    assert prepared.meta["bones"]["method"] == "threshold" and prepared.labels is None
    assert prepared.meta["sources"]["ct"]["sha256"].startswith("7811475c")  # source.json's
    # The bones fill a real part of the cube (hips, sacrum, lumbar spine), not one speck.
    assert 0.005 < float((prepared.bone.data > 0).float().mean()) < 0.1
    config = OmegaConf.load(resolve_config("configs/pelvis.yaml"))
    assert list(config.data.volumes) == [{"example": "pelvis_ct_128"}]
    with pytest.raises(ProstlabError, match="not found"):
        PoseDataModule(volumes=[{"example": "no_such_scan"}])
