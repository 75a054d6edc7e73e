"""Training augmentation (MONAI affine, soft-tissue weight, noise, blur, gamma) and the pose
curriculum: seeded, shape-preserving, physical, and the identity when every range is closed."""

import pytest
import torch

from prostlab.data.datamodule import Curriculum, PoseDataModule
from prostlab.errors import ProstlabError
from prostlab.lightning.augment import AugmentationConfig, TrainingAugmentation
from prostlab.similarity import minmax_normalise

IDENTITY = {"affine_prob": 0.0, "soft_tissue": [1.0, 1.0], "photons": None,
            "blur_px": [0.0, 0.0], "gamma": [1.0, 1.0]}


def volumes(n=16):
    g = torch.Generator().manual_seed(0)
    ct = torch.rand(1, 1, n, n, n, generator=g) * 0.02
    bone = torch.where(ct > 0.015, ct, torch.zeros(()))
    return ct, bone


def test_closed_ranges_are_the_identity():
    aug = TrainingAugmentation(IDENTITY, seed=0)
    ct, bone = volumes()
    ct2, bone2 = aug.volumes(ct, bone, aug.generator(0))
    torch.testing.assert_close(ct2, ct)
    torch.testing.assert_close(bone2, bone)
    drr = torch.rand(3, 1, 8, 8) * 4
    torch.testing.assert_close(aug.target(drr, aug.generator(0)), minmax_normalise(drr))


def test_same_step_same_draws_other_step_other_draws():
    aug = TrainingAugmentation({}, seed=3)
    ct, bone = volumes()
    a = aug.volumes(ct, bone, aug.generator(5))
    b = aug.volumes(ct, bone, aug.generator(5))
    c = aug.volumes(ct, bone, aug.generator(6))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[0], c[0])
    drr = torch.rand(2, 1, 8, 8) * 4
    torch.testing.assert_close(aug.target(drr, aug.generator(1)), aug.target(drr, aug.generator(1)))


def test_augmented_volumes_are_physical_and_bone_stays_inside_ct():
    aug = TrainingAugmentation({"affine_prob": 1.0, "soft_tissue": [0.5, 0.5]}, seed=0)
    ct, bone = volumes()
    ct2, bone2 = aug.volumes(ct, bone, aug.generator(0))
    assert ct2.shape == ct.shape and bone2.shape == bone.shape
    assert ct2.min() >= 0 and bone2.min() >= 0
    assert torch.all(ct2 >= bone2 - 1e-7)  # soft tissue is scaled, bone is kept
    assert not torch.allclose(bone2, bone)  # the affine moved it


def test_targets_are_normalised_images_of_the_same_shape():
    aug = TrainingAugmentation({"photons": [3.0, 3.0], "blur_px": [1.0, 1.0]}, seed=0)
    drr = torch.rand(4, 1, 16, 16) * 3
    out = aug.target(drr, aug.generator(0))
    assert out.shape == drr.shape
    assert out.min() >= 0 and out.max() <= 1 + 1e-6


@pytest.mark.parametrize("bad", [{"gamma": [2.0, 1.0]}, {"photons": [3.0]}, {"scale": -0.1},
                                 {"affine_prob": 2.0}, {"rotation": 3.0}])
def test_bad_ranges_name_the_field(bad):
    with pytest.raises(ProstlabError, match="model.augmentation"):
        AugmentationConfig.from_config(bad)


def test_curriculum_widens_offsets_from_start_to_full():
    c = Curriculum(start=0.25, samples=100)
    assert c.scale(0) == 0.25 and c.scale(50) == pytest.approx(0.625)
    assert c.scale(100) == c.scale(10_000) == 1.0
    poses = {"ground_truth": {"rotation_deg": 0.0}, "relative": True,
             "initial": {"kind": "uniform", "rotation_deg": 20.0, "translation_mm": 50.0}}
    dm = PoseDataModule(train_poses=poses, train_curriculum={"start": 0.25, "samples": 100})
    plain = PoseDataModule(train_poses=poses)
    early, full = dm.dataset("train")[0], plain.dataset("train")[0]
    # The same draw, scaled by a quarter at case 0 (gt is the identity here).
    torch.testing.assert_close(early["initial_pose"][3:], 0.25 * full["initial_pose"][3:])


def test_curriculum_needs_relative_poses():
    with pytest.raises(ProstlabError, match="relative"):
        PoseDataModule(train_poses={"relative": False}, train_curriculum={"start": 0.5})
