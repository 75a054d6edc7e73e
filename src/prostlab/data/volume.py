"""The :class:`Volume`: a voxel grid of attenuation with its spacing and world affine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from prostlab.errors import ProstlabError


@dataclass(frozen=True)
class Volume:
    """A multi-channel voxel grid on a known world grid.

    Attributes:
        data: float32 tensor of shape ``(C, D, H, W)``; for a CT, the linear attenuation
            ``mu`` in 1/mm.
        spacing: voxel size in mm **in array-axis order** ``(s_D, s_H, s_W)``.
        affine: ``(4, 4)`` float64 array mapping a voxel index ``(i, j, k, 1)`` to its centre in
            world RAS millimetres (the nibabel convention). Its column norms equal ``spacing``.

    The projector does not read the affine: it places the volume by the pose in the *volume
    frame* of ``docs/geometry.md``, whose origin is the grid centre and whose axes are the array
    axes scaled by ``spacing``. The affine only records where the grid sits in the patient.
    """

    data: torch.Tensor
    spacing: tuple[float, float, float]
    affine: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.data, torch.Tensor) or self.data.ndim != 4:
            shape = tuple(getattr(self.data, "shape", ()))
            raise ProstlabError(f"Volume.data: expected a (C, D, H, W) tensor, got shape {shape}")
        if self.data.dtype != torch.float32:
            raise ProstlabError(f"Volume.data: expected dtype float32, got {self.data.dtype}")
        spacing = tuple(float(s) for s in self.spacing)
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ProstlabError(
                f"Volume.spacing: expected three positive mm values, got {self.spacing}"
            )
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ProstlabError(
                f"Volume.affine: expected a finite 4x4 matrix, got shape {affine.shape}"
            )
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(C, D, H, W)``."""
        c, d, h, w = self.data.shape
        return (c, d, h, w)

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        """Edge-to-edge size of the grid in mm, ``N_a * s_a`` per array axis."""
        n = self.data.shape[1:]
        return (n[0] * self.spacing[0], n[1] * self.spacing[1], n[2] * self.spacing[2])

    def to(self, device: torch.device | str) -> Volume:
        """The same volume with ``data`` on ``device``."""
        return Volume(self.data.to(device), self.spacing, self.affine)

    def batched(self) -> torch.Tensor:
        """``data`` with a leading batch axis: ``(1, C, D, H, W)``."""
        return self.data.unsqueeze(0)

    def downsampled(self, factor: int) -> Volume:
        """Average ``factor^3`` blocks of voxels: spacing times ``factor``, same world extent.

        The new voxel 0 is centred on the mean of the old voxels ``0 .. factor - 1``, so the
        affine's origin moves by ``(factor - 1) / 2`` old voxels along each axis. Each axis must
        be a multiple of ``factor``.
        """
        if not isinstance(factor, int) or factor < 1:
            raise ProstlabError(f"factor: expected a positive integer, got {factor!r}")
        if any(n % factor for n in self.data.shape[1:]):
            raise ProstlabError(
                f"factor: {factor} does not divide the grid {tuple(self.data.shape[1:])}"
            )
        if factor == 1:
            return self
        data = torch.nn.functional.avg_pool3d(self.data.unsqueeze(0), factor)[0]
        affine = self.affine.copy()
        affine[:3, 3] += affine[:3, :3] @ np.full(3, (factor - 1) / 2)
        affine[:3, :3] *= factor
        return Volume(data, tuple(s * factor for s in self.spacing), affine)

    @staticmethod
    def from_array(array: np.ndarray, affine: np.ndarray) -> Volume:
        """Wrap a 3D ``(D, H, W)`` array as a one-channel volume; spacing from the affine.

        ``s_a = |A[:3, a]|``, the length of the affine's column ``a``.
        """
        if array.ndim != 3:
            raise ProstlabError(f"Volume.from_array: expected a 3D array, got shape {array.shape}")
        data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).unsqueeze(0)
        return Volume(data, spacing_of(affine), affine)


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm per array axis: the norms of the affine's first three columns."""
    s = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(s[0]), float(s[1]), float(s[2]))
