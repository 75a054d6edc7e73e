"""The volumes of a run on the training device: whole CT, bones, spacing and target points."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prostlab.data import PreparedCT, Volume
from prostlab.errors import ProstlabError
from prostlab.metrics.functional import target_points_from_mask


@dataclass(frozen=True)
class VolumeView:
    """One volume as the LightningModules use it (tensors on the module's device)."""

    ct: Tensor  # (1, 1, D, H, W) whole-CT attenuation, 1/mm
    bone: Tensor  # (1, 1, D, H, W) segmented CT, 1/mm
    spacing: tuple[float, float, float]
    points: Tensor  # (N, 3) mTRE target points in the volume frame, mm
    fine: Tensor | None = None  # (1, 1, D', H', W') the CT before data.downsample, if kept
    fine_spacing: tuple[float, float, float] | None = None
    index: int = 0  # the volume's place in data.volumes


class VolumeBank(nn.Module):
    """Holds each prepared volume as non-persistent buffers, so Lightning moves them to the
    device with the model and checkpoints stay small (weights only, no CT).

    The mTRE target points are the centres of up to ``max_points`` bone voxels, drawn with a
    generator seeded by ``seed`` (the same points in every run).

    :meth:`keep_fine` adds, for the benchmark only, the CT before ``data.downsample`` (targets
    rendered from finer voxels than the moving image), so training never holds it.
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
        self.fine_spacings: dict[int, tuple[float, float, float]] = {}

    def keep_fine(self, volumes: Mapping[int, Volume]) -> None:
        """Hold ``volumes[i]``, volume ``i``'s CT at a finer grid over the same field of view, as
        a non-persistent buffer on the bank's device (volumes already held are kept)."""
        for index, volume in volumes.items():
            index = int(index)
            if index in self.fine_spacings:
                continue
            coarse = getattr(self, f"ct_{index}")
            extent = [n * s for n, s in zip(coarse.shape[2:], self.spacings[index], strict=True)]
            if any(abs(a - b) > 1e-3 * b for a, b in zip(volume.extent_mm, extent, strict=True)):
                raise ProstlabError(
                    f"keep_fine: volume {index} spans {volume.extent_mm} mm, expected the same "
                    f"field of view as the moving CT, {tuple(extent)} mm"
                )
            self.register_buffer(f"fine_{index}", volume.batched().to(coarse.device),
                                 persistent=False)
            self.fine_spacings[index] = volume.spacing

    def __len__(self) -> int:
        return len(self.spacings)

    def __getitem__(self, index: int) -> VolumeView:
        index = int(index)
        return VolumeView(
            getattr(self, f"ct_{index}"),
            getattr(self, f"bone_{index}"),
            self.spacings[index],
            getattr(self, f"points_{index}"),
            getattr(self, f"fine_{index}", None),
            self.fine_spacings.get(index),
            index,
        )

    def groups(self, volume_index: Tensor):
        """``(view, selection)`` for each volume present in a batch's ``volume_index`` (B,)."""
        for index in torch.unique(volume_index).tolist():
            yield self[index], volume_index == index
