"""The kernels' bricked volume layout (prostlab.projector.backends.bricks, prost_common.cuh)."""

from __future__ import annotations

import pytest
import torch

from prostlab.projector.backends import volume_cache
from prostlab.projector.backends.bricks import (
    LayoutChoice,
    cached_bricks,
    clear_brick_cache,
    to_bricks,
)
from prostlab.projector.backends.cpu_kernels import CpuKernelBackend, cpu_kernels_available
from prostlab.projector.backends.torch_backend import TorchBackend
from test_cuda_kernels import (
    TOLERANCE,
    _to_cuda,
    camera_case,
    compare_primitives,
    requires_gpu,
)


@pytest.mark.parametrize("shift", [1, 2, 3])
def test_to_bricks_puts_each_voxel_where_the_kernels_read_it(shift):
    """Voxel (i, j, k) at sum_a (i_a >> b) B_a + (i_a & (e - 1)) e^(2 - a) (prost_common.cuh)."""
    shape = (11, 6, 17)
    vol = torch.arange(2 * 3 * 11 * 6 * 17, dtype=torch.float64).reshape(2, 3, *shape)
    bricks = to_bricks(vol, shift)
    e = 1 << shift
    nb = [(n + e - 1) // e for n in shape]
    assert bricks.shape == (2, 3, nb[0] * nb[1] * nb[2] * e**3)
    index = torch.stack(torch.meshgrid(*(torch.arange(n) for n in shape), indexing="ij"))
    brick = ((index[0] >> shift) * nb[1] + (index[1] >> shift)) * nb[2] + (index[2] >> shift)
    local = ((index[0] & (e - 1)) * e + (index[1] & (e - 1))) * e + (index[2] & (e - 1))
    where = (brick * e**3 + local).flatten()
    torch.testing.assert_close(bricks[..., where], vol.flatten(2), rtol=0, atol=0)
    padding = torch.ones(bricks.shape[-1], dtype=torch.bool)
    padding[where] = False
    assert bool((bricks[..., padding] == 0).all())


def test_the_cache_serves_the_same_volume_and_notices_changes():
    clear_brick_cache()
    vol = torch.rand(1, 1, 9, 9, 9)
    first = cached_bricks(vol, 3)
    assert cached_bricks(vol.detach(), 3) is first  # the same storage and version
    vol.mul_(2.0)  # in place: the version counter moves on
    second = cached_bricks(vol, 3)
    assert second is not first
    torch.testing.assert_close(second, to_bricks(vol, 3))
    other = vol.clone()
    assert cached_bricks(other, 3) is not second
    clear_brick_cache()


def test_layout_choice_tries_both_layouts_then_keeps_the_faster():
    choice = LayoutChoice(shift=3, trials=2)
    assert choice.settled() and not choice.bricked()
    fast_bricks = {0: [0.9, 1.0], 3: [0.7, 1.2]}  # best of each: 0.9 linear, 0.7 bricked
    tried = []
    for _ in range(4):
        shift = choice.next("a")
        tried.append(shift)
        choice.record("a", shift, fast_bricks[shift].pop(0))
    assert tried == [0, 3, 0, 3]
    assert choice.chosen("a") == 3 and choice.next("a") == 3
    assert choice.settled() and choice.bricked()
    choice.record("a", 3, 99.0)  # later launches do not reopen the choice
    assert choice.chosen("a") == 3
    for seconds in (0.5, 0.8, 0.6, 0.9):  # another configuration, where linear wins
        choice.record("b", choice.next("b"), seconds)
    assert choice.chosen("b") == 0 and choice.chosen("a") == 3
    assert choice.chosen("c") is None and choice.next("c") == 0
    assert not choice.settled()  # "c" is on trial now


@pytest.mark.skipif(not cpu_kernels_available(), reason="cpu kernels do not build")
def test_cpu_backend_times_both_layouts_and_images_do_not_change():
    """The cpu backend's first launches of a configuration alternate the layouts; the images of
    every launch are the same, bit for bit, and one layout is kept afterwards."""
    backend = CpuKernelBackend()
    backend.brick_min_voxels = 0
    clear_brick_cache()
    rays, vol, M, _, _ = camera_case("centred", torch.float32, 2, 3)
    images = [backend.forward(rays, vol, M) for _ in range(2 * backend.layout_trials + 1)]
    for image in images[1:]:
        assert torch.equal(image, images[0])
    keys = list(backend._choice._chosen)
    assert len(keys) == 1 and keys[0][0] == "forward"
    kept = backend._choice.chosen(keys[0])
    assert kept in (0, backend.brick_shift)
    # the bricked copy is kept while some configuration reads it, and freed otherwise
    assert ("bricks" in volume_cache._slots) == (kept == backend.brick_shift)
    clear_brick_cache()


@pytest.mark.skipif(not cpu_kernels_available(), reason="cpu kernels do not build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("scenario", ["centred", "face", "miss"])
@pytest.mark.parametrize("shift", [1, 2, 3])
def test_bricked_kernels_match_torch(scenario, shift, dtype):
    """Every primitive that only reads the volume reads it bricked (need_vol=False), the others
    linearly; both against the torch reference."""
    backend = CpuKernelBackend()
    backend.brick_shift, backend.brick_min_voxels, backend.layout_trials = shift, 0, 0
    clear_brick_cache()
    rays, vol, M, dM, g = camera_case(scenario, dtype, 2, 3)
    compare_primitives(backend, TorchBackend(), rays, vol, M, dM, g, TOLERANCE[dtype])
    assert backend._layout(rays, None) == shift and backend._layout(rays, vol) == 0
    clear_brick_cache()


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("scenario", ["centred", "face"])
@pytest.mark.parametrize("shift", [1, 3])
def test_bricked_cuda_kernels_match_torch(scenario, shift, dtype, monkeypatch):
    """The same on the GPU: CupyBackend reading bricks (a class setting, as the GPU benchmark's
    --cupy-bricks sets it) against the torch backend on the GPU."""
    from prostlab.projector.backends.cupy_backend import CupyBackend

    monkeypatch.setattr(CupyBackend, "brick_shift", shift)
    monkeypatch.setattr(CupyBackend, "brick_min_voxels", 0)
    clear_brick_cache()
    rays, vol, M, dM, g = _to_cuda(*camera_case(scenario, dtype, 2, 3))
    backend = CupyBackend()
    compare_primitives(backend, TorchBackend(), rays, vol, M, dM, g, TOLERANCE[dtype])
    assert backend._layout(rays, None) == shift
    clear_brick_cache()
