"""The ProST projector: differentiable line-integral images of a posed volume."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prostlab.errors import ProstlabError
from prostlab.geometry import Camera, check_pose
from prostlab.geometry.checks import check_real_device, check_same_device
from prostlab.projector.autograd import project
from prostlab.projector.backends import BACKENDS, resolve_backend
from prostlab.projector.rays import RayBundle


class Projector(nn.Module):
    """Render DRRs ``(B, C, H, W)`` of a volume ``(B | 1, C, D, H, W)`` at poses ``(B, 6)``.

    Each pixel is ``step * sum_k mu(x_k)`` over samples ``x_k`` spaced ``step`` mm along the ray from
    the source to the pixel's centre, inside the volume's support; ``mu`` is the trilinear
    interpolant of the volume, zero outside it (docs/geometry.md states the frames). The image is
    differentiable, twice, in the pose and in the volume. A volume batch of 1 is shared by all
    poses. Half-precision input is rendered in float32 and returned in the input's dtype.

    Args:
        camera: the cone-beam camera (detector size, distances, pixel spacing).
        step: distance between samples along a ray, mm.
        backend: "torch" (the reference), "cupy" (CUDA kernels), "cpu" (the same kernels built
            for the CPU with OpenMP, on ``torch.get_num_threads()`` threads), or "auto" (cupy
            for CUDA tensors when CuPy imports; cpu for CPU tensors when its kernels build,
            else torch).
        max_samples: samples per chunk of rays (torch backend); bounds the memory in use.
    """

    def __init__(
        self, camera: Camera, step: float = 1.0, backend: str = "auto", max_samples: int = 1 << 18
    ):
        super().__init__()
        if not isinstance(camera, Camera):
            raise ProstlabError(f"camera: expected a prostlab.geometry.Camera, got {type(camera)}")
        if not step > 0:
            raise ProstlabError(f"step: expected a positive sampling distance in mm, got {step}")
        if backend not in BACKENDS:
            raise ProstlabError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.camera, self.step, self.backend, self.max_samples = camera, step, backend, max_samples

    def forward(self, volume: torch.Tensor, spacing: Sequence[float], pose: torch.Tensor):
        """DRRs of ``volume`` (voxel ``spacing`` in mm, array-axis order) at ``pose`` (B, 6)."""
        check_pose(pose)
        check_same_device(("volume", volume), ("pose", pose))
        return self.render(volume, spacing, self.camera.extrinsics(pose))

    def render(self, volume: torch.Tensor, spacing: Sequence[float], extrinsics: torch.Tensor):
        """DRRs at extrinsic matrices ``[R | t + sid e_z]`` (B, 3, 4), camera-from-volume."""
        _check_volume(volume, extrinsics.shape[0])
        check_real_device(extrinsics, "extrinsics")
        check_same_device(("volume", volume), ("extrinsics", extrinsics))
        dtype = volume.dtype if volume.dtype in (torch.float32, torch.float64) else torch.float32
        R, t = extrinsics[:, :, :3].to(dtype), extrinsics[:, :, 3:].to(dtype)
        M = torch.cat((R.transpose(1, 2), -R.transpose(1, 2) @ t), dim=2)
        rays = RayBundle.from_camera(
            self.camera, spacing, volume.shape[2:], self.step, dtype, volume.device
        )
        backend = resolve_backend(self.backend, volume.device, self.max_samples)
        image = project(volume.to(dtype).contiguous(), M.contiguous(), rays, backend)
        batch, channels = image.shape[:2]
        image = image.reshape(batch, channels, self.camera.height, self.camera.width)
        return image.to(volume.dtype)


def _check_volume(volume: torch.Tensor, batch: int) -> None:
    if not isinstance(volume, torch.Tensor) or volume.dim() != 5:
        shape = tuple(volume.shape) if isinstance(volume, torch.Tensor) else type(volume)
        raise ProstlabError(f"volume: expected a tensor of shape (B, C, D, H, W), got {shape}")
    if not volume.is_floating_point():
        raise ProstlabError(f"volume: expected a floating-point tensor, got {volume.dtype}")
    check_real_device(volume, "volume")
    if volume.shape[0] not in (1, batch):
        raise ProstlabError(
            f"volume: batch of {volume.shape[0]} does not match {batch} poses (expected 1 or {batch})"
        )
