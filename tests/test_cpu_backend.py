"""The ``cpu`` backend: prost.cu built for the host with OpenMP, against the torch reference.

The cases and tolerances are those of the host-emulation tests (test_cuda_kernels.py), run on 2
threads; a shared volume under a batch of poses whose rays cross the same voxels exercises the
atomic scatter that races would corrupt.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from prostlab.errors import ProstlabError
from prostlab.geometry import Camera
from prostlab.projector import Projector
from prostlab.projector.autograd import project
from prostlab.projector.backends import BACKENDS, host_emulation, resolve_backend
from prostlab.projector.backends.cpu_kernels import (
    CpuKernelBackend,
    cpu_backend,
    cpu_kernels_available,
)
from prostlab.projector.backends.host_emulation import (
    VARIANTS,
    HostKernelBackend,
    build_host_library,
    compiler,
    library_path,
)
from prostlab.projector.backends.torch_backend import TorchBackend
from prostlab.projector.rays import RayBundle
from test_cuda_kernels import (
    TOLERANCE,
    camera_case,
    compare_primitives,
    exact_case,
    relative_error,
    tiny_problem,
)

pytestmark = pytest.mark.skipif(not cpu_kernels_available(), reason="cpu kernels do not build")


@pytest.fixture
def cpu():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield cpu_backend()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("scenario", ["centred", "face", "miss"])
@pytest.mark.parametrize(("bv", "channels"), [(1, 1), (2, 3), (1, 3)])
def test_cpu_kernels_match_torch(cpu, scenario, bv, channels, dtype):
    rays, vol, M, dM, g = camera_case(scenario, dtype, bv, channels)
    compare_primitives(cpu, TorchBackend(), rays, vol, M, dM, g, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cpu_kernels_match_torch_on_faces(cpu, dtype):
    compare_primitives(cpu, TorchBackend(), *exact_case(dtype), TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_shared_volume_scatter_has_no_races(cpu, dtype):
    """Many rays (two poses, 32 x 32 pixels, 16 blocks) into one small shared volume: every voxel gets
    adds from many blocks on both threads; a lost update would show far above rounding."""
    rays, vol, M, dM, cot = shared_volume_case(32, 1.0, (6, 5, 7), 2.0, 0.5, 3, dtype)
    assert int(rays.sample_range(M)[1].sum()) > 100 * vol[0, 0].numel()  # 800 adds a voxel
    errors = compare_primitives(cpu, TorchBackend(), rays, vol, M, dM, cot, TOLERANCE[dtype])
    assert errors["vjp vol"] < TOLERANCE[dtype] and errors["jvp_vjp vol"] < TOLERANCE[dtype]


def test_gradcheck_and_gradgradcheck_through_cpu_kernels(cpu):
    rays, vol, M = tiny_problem(6, channels=2)
    assert torch.autograd.gradcheck(lambda v, m: project(v, m, rays, cpu), (vol, M))
    rays, vol, M = tiny_problem(7, channels=1)
    assert torch.autograd.gradgradcheck(lambda v, m: project(v, m, rays, cpu), (vol, M))


def test_gradcheck_through_projector_with_cpu_backend(cpu):
    g = torch.Generator().manual_seed(4)
    camera = Camera(sdd=60.0, sid=40.0, height=4, width=5, pixel_spacing=(2.0, 1.8))
    volume = torch.rand(1, 1, 4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    pose = torch.cat((torch.rand(1, 3, generator=g) * 0.4, torch.rand(1, 3, generator=g)), 1)
    pose = pose.to(torch.float64).requires_grad_()
    projector = Projector(camera, step=0.7, backend="cpu")

    def render(v, p):
        return projector(v, (1.0, 1.2, 0.9), p)

    assert torch.autograd.gradcheck(render, (volume, pose))
    assert torch.autograd.gradgradcheck(render, (volume, pose))
    reference = Projector(camera, step=0.7, backend="torch")(volume, (1.0, 1.2, 0.9), pose)
    assert relative_error(render(volume, pose), reference) < 1e-10


def test_auto_picks_cpu_on_cpu_tensors():
    assert "cpu" in BACKENDS
    assert isinstance(resolve_backend("auto", torch.device("cpu"), 1 << 18), CpuKernelBackend)
    assert isinstance(resolve_backend("torch", torch.device("cpu"), 1 << 18), TorchBackend)
    assert resolve_backend("cpu", torch.device("cpu"), 1 << 18).name == "cpu"


def test_cpu_backend_refuses_cuda_tensors(cpu):
    with pytest.raises(ProstlabError, match="backend='cpu' needs CPU tensors"):
        resolve_backend("cpu", torch.device("cuda"), 1 << 18)
    if torch.cuda.is_available():
        camera = Camera(sdd=60.0, sid=40.0, height=4, width=5, pixel_spacing=(2.0, 1.8))
        with pytest.raises(ProstlabError, match="CPU tensors"):
            Projector(camera, backend="cpu")(
                torch.rand(1, 1, 4, 3, 5, device="cuda"),
                (1.0, 1.0, 1.0),
                torch.zeros(1, 6, device="cuda"),
            )


def test_thread_count_follows_torch(cpu):
    """Results with 1 and 2 threads agree to rounding (the volume copies are summed per thread)."""
    rays, vol, M, dM, g = camera_case("centred", torch.float64, 1, 2)
    two = cpu.vjp(rays, vol, M, g)
    torch.set_num_threads(1)
    one = cpu.vjp(rays, vol, M, g)
    for a, b in zip(one, two, strict=True):
        assert relative_error(a, b) < 1e-12


def contended_case(dtype):
    """Two poses of a 64 x 64 detector (64 blocks, 256 pose slots) through one small shared volume:
    with atomics, the order of the adds into each voxel and into gM changes from call to call."""
    return shared_volume_case(64, 0.5, (12, 10, 14), 1.0, 0.3, 5, dtype)


def shared_volume_case(pixels, pixel_mm, grid, voxel_mm, step, seed, dtype):
    """``(rays, vol, M, dM, cot)``: two nearby poses of a ``pixels``-square detector 120 mm from
    the source, through a small 2-channel random volume of ``grid`` voxels, with random
    directions and cotangents drawn from ``seed`` (in float64, then cast to ``dtype``)."""
    camera = Camera(sdd=200.0, sid=120.0, height=pixels, width=pixels,
                    pixel_spacing=(pixel_mm, pixel_mm))
    rays = RayBundle.from_camera(camera, (voxel_mm,) * 3, grid, step, dtype, "cpu")
    g = torch.Generator().manual_seed(seed)
    vol = torch.rand(1, 2, *grid, generator=g, dtype=torch.float64).to(dtype)
    M = torch.tensor([[1.0, 0, 0, 0.1], [0, 1, 0, -0.2], [0, 0, 1, -120.0]], dtype=torch.float64)
    M = torch.stack((M, M + torch.tensor([0.0, 0, 0, 0.3]))).to(dtype)
    dM = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).to(dtype)
    cot = torch.randn(2, 2, rays.directions.shape[0], generator=g, dtype=torch.float64).to(dtype)
    return rays, vol, M, dM, cot


def gradients(backend, case):
    """vjp and jvp_vjp (volume and pose), and the pose-only vjp: five tensors."""
    rays, vol, M, dM, g = case
    return (*backend.vjp(rays, vol, M, g), *backend.jvp_vjp(rays, vol, M, dM, g),
            backend.vjp(rays, vol, M, g, need_vol=False)[1])


def reads_only(backend, case):
    """The passes that only read the volume: forward, jvp, and the pose-only vjp and jvp_vjp."""
    rays, vol, M, dM, g = case
    return (backend.forward(rays, vol, M), backend.jvp(rays, vol, M, dM),
            backend.vjp(rays, vol, M, g, need_vol=False)[1],
            backend.jvp_vjp(rays, vol, M, dM, g, need_vol=False)[1])


def scattering(backend, case):
    """The passes that scatter a volume gradient, with the pose gradient and without:
    ``(volume gradients, pose gradients)`` of vjp and jvp_vjp."""
    rays, vol, M, dM, g = case
    both = (backend.vjp(rays, vol, M, g), backend.jvp_vjp(rays, vol, M, dM, g))
    alone = (backend.vjp(rays, vol, M, g, need_M=False)[0],
             backend.jvp_vjp(rays, vol, M, dM, g, need_M=False)[0])
    return [gvol for gvol, _ in both] + list(alone), [gM for _, gM in both]


@pytest.mark.parametrize("layout", ["linear", "bricks"])
@pytest.mark.parametrize("case", ["centred", "face", "miss", "nan", "exact", "shared", "large"])
def test_lanes_give_the_scalar_kernels_bits(case, layout):
    """The cpu build's lanes do each ray's arithmetic in the scalar kernel's order: float32
    images and pose gradients equal, bit for bit, those of the scalar emulation build (kernels
    one ray at a time, compiled without lanes) in the same ray order and fixed-order sums, and
    volume gradients to rounding. "miss" has a pose that
    misses every ray, "nan" a pose with a NaN translation (NaN images and gM for it); "large" a
    volume of 2^23 voxels a channel crossed by rays 24 voxels apart, 40 samples each, where the
    lanes prefetch the cells 16 samples ahead (lanes.h, prefetch_pays)."""
    if case in ("centred", "face", "miss"):
        data = camera_case(case, torch.float32, 2, 3)
    elif case == "nan":
        rays, vol, M, dM, g = camera_case("centred", torch.float32, 2, 3)
        M = M.clone()
        M[1, 0, 3] = float("nan")
        data = rays, vol, M, dM, g
    elif case == "exact":
        data = exact_case(torch.float32)
    elif case == "shared":
        data = shared_volume_case(24, 0.5, (12, 10, 14), 1.0, 0.3, 5, torch.float32)
    else:
        data = shared_volume_case(8, 4.0, (1024, 1024, 8), 0.1, 0.02, 6, torch.float32)
    lanes, scalar = CpuKernelBackend(), HostKernelBackend(deterministic=True)
    scalar.tile_rays = lanes.tile_rays
    for backend in (lanes, scalar):  # bricks of 2 voxels: several bricks even in small grids
        backend.brick_shift = 1 if layout == "bricks" else 0
        backend.brick_min_voxels = 0
        backend.layout_trials = 0
    ours, theirs = reads_only(lanes, data), reads_only(scalar, data)
    (volume, pose), (scalar_volume, scalar_pose) = scattering(lanes, data), scattering(scalar, data)
    ours, theirs = ours + tuple(pose), theirs + tuple(scalar_pose)
    assert all(t.nan_to_num().abs().sum() > 0 for t in ours)
    assert all(t.isnan().any() == (case == "nan") for t in ours)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
        assert torch.equal(a.isnan(), b.isnan())
    # The volume gradient's terms are the scalar kernel's, added to each voxel with the eight
    # rays' samples interleaved: equal to rounding.
    for a, b in zip(volume, scalar_volume, strict=True):
        assert a.isfinite().all() and a.abs().sum() > 0
        assert relative_error(a, b) < 1e-5


@pytest.mark.parametrize("threads", [1, 2])
def test_repeated_gradients_are_bit_identical(cpu, threads):
    """Issue 22: the same inputs on the same thread count give the same bits, pose and volume
    gradients alike (with the atomics this fails on 2 threads in almost every repeat)."""
    torch.set_num_threads(threads)
    case = contended_case(torch.float32)
    first = gradients(cpu, case)
    assert all(t.abs().sum() > 0 for t in first)
    for _ in range(6):
        for a, b in zip(first, gradients(cpu, case), strict=True):
            assert torch.equal(a, b)


def test_pose_gradient_does_not_depend_on_the_thread_count(cpu):
    """The pose slots are summed the same way whatever the threads: 1 and 2 give the same bits."""
    case = contended_case(torch.float32)
    two = gradients(cpu, case)
    torch.set_num_threads(1)
    one = gradients(cpu, case)
    for i in (1, 3, 4):
        assert torch.equal(one[i], two[i])
    for i in (0, 2):  # the volume gradient's copies: one per thread, so only to rounding
        assert relative_error(one[i], two[i]) < 1e-5


def test_fixed_point_volume_gradient_is_order_free(cpu, monkeypatch):
    """The GPU's deterministic volume gradient (int64 fixed point, atomics in any order), run here
    on 2 threads with blocks taken as threads come free: the same bits as on 1 thread, and
    the torch backend's values to float32 rounding."""
    monkeypatch.setattr(cpu, "volume_order", "fixed")
    case = contended_case(torch.float32)
    two = gradients(cpu, case)
    torch.set_num_threads(1)
    one = gradients(cpu, case)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)
    reference = gradients(TorchBackend(), case)
    for a, b in zip(two, reference, strict=True):
        assert relative_error(a, b) < TOLERANCE[torch.float32]


def test_cpu_build_is_warning_free():
    kernels = Path(__file__).resolve().parents[1] / "kernels"
    flags = [f for f in VARIANTS["cpu"] if f not in ("-shared", "-fPIC")]
    result = subprocess.run(
        [
            compiler(),
            *flags,
            "-fsyntax-only",
            "-Werror",
            "-include",
            str(kernels / "emulation" / "cuda_host.h"),
            str(kernels / "prost.cu"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_compile_error_names_the_first_error_line(tmp_path, monkeypatch):
    monkeypatch.setitem(VARIANTS, "cpu", (*VARIANTS["cpu"], "-fno-such-option-prostlab"))
    with pytest.raises(ProstlabError, match="cpu kernels: .*failed to compile.*no-such-option"):
        build_host_library(tmp_path, "cpu")


def test_native_build_is_keyed_by_the_cpu(tmp_path, monkeypatch):
    """A -march=native library built on one CPU is never loaded on another from a shared cache."""
    here = {variant: library_path(variant, tmp_path) for variant in VARIANTS}
    assert host_emulation.host_cpu().strip()
    monkeypatch.setattr(host_emulation, "host_cpu", lambda: "another CPU model, other flags")
    assert library_path("cpu", tmp_path) != here["cpu"]
    assert library_path("emulation", tmp_path) == here["emulation"]  # portable flags
