"""The volumes of a run on the training device: whole CT, bones, spacing and target points."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prostlab.data import PreparedCT
from prostlab.metrics.functional import target_points_from_mask


@dataclass(frozen=True)
class VolumeView:
    """One volume as the LightningModules use it (tensors on the module's device)."""

    ct: Tensor  # (1, 1, D, H, W) whole-CT attenuation, 1/mm
    bone: Tensor  # (1, 1, D, H, W) segmented CT, 1/mm
    spacing: tuple[float, float, float]
    points: Tensor  # (N, 3) mTRE target points in the volume frame, mm


class VolumeBank(nn.Module):
    """Holds each prepared volume as non-persistent buffers, so Lightning moves them to the
    device with the model and checkpoints stay small (weights only, no CT).

    The mTRE target points are the centres of up to ``max_points`` bone voxels, drawn with a
    generator seeded by ``seed`` (the same points in every run).
    """

    def __init__(self, prepared: Sequence[PreparedCT], max_points: int = 2000, seed: int = 0):
        super().__init__()
        self.spacings = []
        for i, volume in enumerate(prepared):
            bone = volume.bone.data
            points = target_points_from_mask(
                bone[0] > 0,
                volume.ct.spacing,
                max_points,
                torch.Generator().manual_seed(seed + i),
                dtype=torch.float32,
            )
            self.register_buffer(f"ct_{i}", volume.ct.batched(), persistent=False)
            self.register_buffer(f"bone_{i}", volume.bone.batched(), persistent=False)
            self.register_buffer(f"points_{i}", points, persistent=False)
            self.spacings.append(volume.ct.spacing)

    def __len__(self) -> int:
        return len(self.spacings)

    def __getitem__(self, index: int) -> VolumeView:
        index = int(index)
        return VolumeView(
            getattr(self, f"ct_{index}"),
            getattr(self, f"bone_{index}"),
            self.spacings[index],
            getattr(self, f"points_{index}"),
        )

    def groups(self, volume_index: Tensor):
        """``(view, selection)`` for each volume present in a batch's ``volume_index`` (B,)."""
        for index in torch.unique(volume_index).tolist():
            yield self[index], volume_index == index
