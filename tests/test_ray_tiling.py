"""Rays launched in Morton order of their pixels (RayBundle.tiled, KernelBackend.tile_rays)."""

from __future__ import annotations

import pytest
import torch

from prostlab.projector.backends.cpu_kernels import CpuKernelBackend, cpu_kernels_available
from prostlab.projector.backends.torch_backend import TorchBackend
from prostlab.projector.rays import RayBundle, morton_order
from test_cuda_kernels import (
    TOLERANCE,
    _to_cuda,
    camera_case,
    compare_primitives,
    relative_error,
    requires_gpu,
)


@pytest.mark.parametrize("shape", [(1, 1), (4, 4), (12, 11), (3, 17), (64, 64)])
def test_morton_order_is_a_permutation_of_the_pixels(shape):
    order = morton_order(*shape)
    assert order.dtype == torch.int64
    assert torch.equal(order.sort().values, torch.arange(shape[0] * shape[1]))


def test_morton_order_walks_square_tiles():
    """On 8 x 8 each run of 4^k consecutive rays is one 2^k x 2^k tile, rows and columns."""
    order = morton_order(8, 8)
    row, col = order // 8, order % 8
    for side in (2, 4, 8):
        for start in range(0, 64, side * side):
            tile = slice(start, start + side * side)
            assert int(row[tile].max() - row[tile].min()) == side - 1
            assert int(col[tile].max() - col[tile].min()) == side - 1
    assert (row[:4].tolist(), col[:4].tolist()) == ([0, 0, 1, 1], [0, 1, 0, 1])


def test_tiled_bundle_permutes_the_rays_and_only_a_detectors():
    rays, *_ = camera_case("centred", torch.float64, 1, 1)
    assert rays.detector == (12, 11)
    tiled, order = rays.tiled()
    assert torch.equal(tiled.directions, rays.directions[order])
    assert torch.equal(tiled.lengths, rays.lengths[order])
    assert tiled.detector is None  # its rays are no longer in row order
    assert tiled.tiled() is None
    loose = RayBundle(rays.directions, rays.lengths, rays.spacing, rays.grid, rays.step)
    assert loose.tiled() is None


@pytest.mark.skipif(not cpu_kernels_available(), reason="cpu kernels do not build")
@pytest.mark.parametrize("scenario", ["centred", "face"])
def test_kernels_give_the_same_results_in_either_ray_order(scenario, monkeypatch):
    """Images bit for bit (each ray is summed alone), gradients but for the order of the adds;
    the cotangent reaches each ray in its own order (an image with distinct pixels shows it)."""
    dtype = torch.float64
    rays, vol, M, dM, g = camera_case(scenario, dtype, 2, 3)
    results = {}
    for tile in (False, True):
        monkeypatch.setattr(CpuKernelBackend, "tile_rays", tile)
        backend = CpuKernelBackend()
        results[tile] = (
            backend.forward(rays, vol, M),
            backend.jvp(rays, vol, M, dM),
            *backend.vjp(rays, vol, M, g),
            *backend.jvp_vjp(rays, vol, M, dM, g),
        )
    rows, tiled = results[False], results[True]
    assert torch.equal(rows[0], tiled[0]) and torch.equal(rows[1], tiled[1])
    assert rows[0].abs().sum() > 0
    for ours, theirs in zip(rows[2:], tiled[2:], strict=True):
        assert relative_error(theirs, ours) < TOLERANCE[dtype]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cuda_kernels_in_morton_order_match_torch(dtype, monkeypatch):
    """The CUDA kernels with the rays tiled (a class setting, as the GPU benchmark's
    --cupy-tile-rays sets it) against the torch backend on the GPU."""
    from prostlab.projector.backends.cupy_backend import CupyBackend

    monkeypatch.setattr(CupyBackend, "tile_rays", True)
    rays, vol, M, dM, g = _to_cuda(*camera_case("centred", dtype, 2, 3))
    assert rays.tiled() is not None
    compare_primitives(CupyBackend(), TorchBackend(), rays, vol, M, dM, g, TOLERANCE[dtype])


def test_a_cameras_rays_are_built_once_and_tiled_once():
    """A registration renders through one camera hundreds of times: the bundle and its Morton
    order are made once per camera, grid, spacing, step, dtype and device."""
    from prostlab.geometry import Camera

    camera = Camera(sdd=1020, sid=620, height=12, width=11, pixel_spacing=(2.0, 2.0))
    args = ((2.0, 2.0, 2.0), (8, 8, 8), 1.5, torch.float32, "cpu")
    rays = RayBundle.from_camera(camera, *args)
    assert RayBundle.from_camera(camera, [2, 2, 2], torch.Size((8, 8, 8)), 1.5, torch.float32,
                                 torch.device("cpu")) is rays
    assert rays.tiled() is rays.tiled()
    fresh = camera.ray_directions(torch.float32)
    torch.testing.assert_close(rays.directions, fresh / fresh.norm(dim=-1, keepdim=True),
                               rtol=0, atol=0)
    wider = Camera(sdd=1020, sid=620, height=12, width=11, pixel_spacing=(3.0, 3.0))
    assert RayBundle.from_camera(wider, *args) is not rays
    assert RayBundle.from_camera(camera, (2.0, 2.0, 2.0), (8, 8, 8), 1.5, torch.float64,
                                 "cpu").directions.dtype == torch.float64
