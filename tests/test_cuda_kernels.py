"""The CUDA kernels (kernels/prost.cu): they compile, and their arithmetic matches the torch backend.

Without a GPU the kernels are checked twice over: nvcc compiles them to PTX for sm_80 and sm_90,
and the same sources built for the CPU with kernels/emulation/cuda_host.h (HostKernelBackend) are
compared with the torch reference, primitive by primitive, and pushed through gradcheck and
gradgradcheck. Tests marked ``gpu`` run the CuPy backend itself where CUDA and CuPy exist.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from prostlab.errors import ProstlabError
from prostlab.geometry import Camera, so3_exp
from prostlab.projector import Projector
from prostlab.projector import projector as projector_module
from prostlab.projector.autograd import project
from prostlab.projector.backends import cupy_available
from prostlab.projector.backends.cupy_backend import (
    CupyBackend,
    kernel_source,
    volume_gradient_bound,
)
from prostlab.projector.backends.host_emulation import HostKernelBackend, compiler
from prostlab.projector.backends.torch_backend import TorchBackend
from prostlab.projector.rays import RayBundle

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels"
NVCC = shutil.which("nvcc")
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}


requires_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and cupy_available()), reason="needs CUDA and CuPy"
)


@pytest.fixture(scope="session")
def host() -> HostKernelBackend:
    if compiler() is None:
        pytest.skip("needs a C++ compiler for the host emulation")
    return HostKernelBackend(directory=REPO / "tests" / "_build")


# -------------------------------------------------------------------------------------- inputs


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` (0 when both vanish)."""
    scale = b.abs().max().item()
    error = (a - b).abs().max().item()
    return error / scale if scale > 0 else error


def volume_from_camera(R: torch.Tensor, t: torch.Tensor, sid: float) -> torch.Tensor:
    """``M = E^-1 = [R^T | -R^T (t + sid e_z)]`` (B, 3, 4) from rotations and translations."""
    shift = t.clone()
    shift[:, 2] += sid
    Rt = R.transpose(1, 2)
    return torch.cat((Rt, -Rt @ shift[..., None]), dim=2)


CAMERA = Camera(sdd=200.0, sid=120.0, height=12, width=11, pixel_spacing=(4.0, 4.5))
GRID, SPACING, STEP = (9, 10, 11), (2.0, 1.7, 2.3), 0.9
POSE_SEEDS = {"centred": 30, "miss": 4}
"""Pose draws whose samples all keep at least 1e-4 voxel (or step) away from cell faces and
clip boundaries (see ``face_margin``), so that float32 rounding cannot flip them."""
FACE_SHIFT = (0.75, 3.0)


def camera_case(scenario: str, dtype, bv: int, channels: int, seed: int = 0):
    """Rays of CAMERA and two poses of a small volume, in one of three scenarios.

    * ``centred``: small random rotations and shifts; the box fills part of the detector, so
      some rays hit it, some miss and some graze its edges.
    * ``face``: identity rotation and the box moved sideways so that its face x = -h lies in the
      plane of the detector's central column: those rays run along the face (on it exactly:
      the column's direction has x = 0), their neighbours graze it.
    * ``miss``: the second pose moves the box out of every ray.

    The volume, tangent and cotangent are drawn from ``seed``.
    """
    rays = RayBundle.from_camera(CAMERA, SPACING, GRID, STEP, dtype, "cpu")
    if scenario == "face":
        R = torch.eye(3, dtype=dtype).repeat(2, 1, 1)
        shift_y, shift_z = FACE_SHIFT
        half = rays.half_support[0]
        t = torch.tensor([[half, shift_y, shift_z], [half, -1.0 - shift_y, -shift_z]], dtype=dtype)
    else:
        p = torch.Generator().manual_seed(POSE_SEEDS[scenario])
        R = so3_exp((torch.rand(2, 3, generator=p, dtype=torch.float64) - 0.5) * 0.6).to(dtype)
        t = ((torch.rand(2, 3, generator=p, dtype=torch.float64) - 0.5) * 6.0).to(dtype)
        if scenario == "miss":
            t[1] = torch.tensor([400.0, 0.0, 0.0], dtype=dtype)
    M = volume_from_camera(R, t, CAMERA.sid)
    g = torch.Generator().manual_seed(seed)
    vol = torch.rand(bv, channels, *GRID, generator=g, dtype=torch.float64).to(dtype)
    dM = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).to(dtype)
    image = torch.randn(2, channels, rays.directions.shape[0], generator=g, dtype=torch.float64)
    return rays, vol, M, dM, image.to(dtype)


def face_margin(rays: RayBundle, M: torch.Tensor) -> float:
    """How close (in float64) any sample comes to a cell face, or a clip boundary to a sample.

    The smallest nonzero distance of a sample's continuous index to an integer (voxels), and
    of the clipped interval's ends to a multiple of the step (steps). Derivatives of the
    trilinear interpolant jump at cell faces and the sample count at the clip boundaries, so
    backends whose positions differ by rounding (float32: about 1e-5 voxel here) agree on
    derivatives only where this margin exceeds that. Exact zeros are exactly computed positions
    (on a face by construction) and are skipped.
    """
    rays = RayBundle(
        rays.directions.double(), rays.lengths.double(), rays.spacing, rays.grid, rays.step
    )
    M = M.double()
    k_first, count = rays.sample_range(M)
    w = torch.einsum("bij,pj->bpi", M[:, :, :3], rays.directions)
    c = M[:, None, :, 3].expand_as(w)
    j = torch.arange(max(int(count.max()), 1))
    tau = (k_first[..., None] + j) * rays.step
    x = c[:, :, None, :] + tau[..., None] * w[:, :, None, :]
    q = x / torch.tensor(rays.spacing, dtype=torch.float64)
    q = q + (torch.tensor(rays.grid, dtype=torch.float64) - 1) / 2
    to_face = (q - q.round()).abs()[j < count[..., None]].flatten()
    h = torch.tensor(rays.half_support, dtype=torch.float64)
    t0, t1 = (-h - c) / w, (h - c) / w  # +-inf or nan where w = 0: dropped below
    t_in, t_out = torch.minimum(t0, t1).amax(-1), torch.maximum(t0, t1).amin(-1)
    ends = torch.cat((t_in[(count > 0) & (t_in > 0)], t_out[count > 0])) / rays.step
    to_sample = (ends - ends.round()).abs()
    both = torch.cat((to_face, to_sample[torch.isfinite(to_sample)]))
    return both[both > 0].min().item()


def exact_case(dtype, seed: int = 1):
    """Rays and poses whose arithmetic is exact in float32 and float64 alike (few-bit dyadic
    numbers, with or without fused multiply-adds), so every backend sees the same samples in
    the same cells. Samples fall on cell faces (integer index), on the support's faces (index
    -1 and N) and at tau = L_p.

    Grid (6, 7, 8), spacing (0.5, 1, 2), step 0.25: along an axis-aligned ray a sample moves by
    0.5, 0.25 or 0.125 in index units. The oblique directions are dyadic rather than unit
    (the kernels do not care). The first three sources sit inside or on the support box, so
    every ray meets it; the fourth sits outside, where the ray (-0.5, 0.75, 0) touches the box's
    edge x_0 = -h_0, x_1 = -h_1 at a single point (tau = 4, a sample; entry equals exit).
    """
    grid, spacing, step = (6, 7, 8), (0.5, 1.0, 2.0), 0.25
    axes = torch.eye(3, dtype=torch.float64)
    oblique = torch.tensor(
        [[0.5, 0.75, 0.0], [0.0, 0.625, -0.75], [-0.5, 0.75, 0.0]], dtype=torch.float64
    )
    directions = torch.cat((axes, -axes, oblique))
    lengths = torch.tensor([64.0, 3.0, 64.0, 1.5, 64.0, 64.0, 64.0, 2.75, 64.0])
    rays = RayBundle(directions.to(dtype), lengths.to(dtype), spacing, grid, step)
    offset = [(n - 1) / 2 for n in grid]

    def position(q):  # volume-frame point (mm) of continuous index q
        return [(qa - oa) * sa for qa, oa, sa in zip(q, offset, spacing, strict=True)]

    identity = torch.eye(3, dtype=torch.float64)
    cycle = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    flip = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))
    A = torch.stack((identity, cycle, flip, identity))
    c = torch.tensor(
        [
            position((2.0, 3.5, 4.25)),
            position((-1.0, 0.0, 7.0)),
            position((6.0, 2.5, 0.5)),
            position((3.0, -4.0, 3.0)),
        ],
        dtype=torch.float64,
    )
    M = torch.cat((A, c[..., None]), dim=2).to(dtype)
    g = torch.Generator().manual_seed(seed)
    vol = torch.rand(1, 2, *grid, generator=g, dtype=torch.float64).to(dtype)
    dM = torch.randn(4, 3, 4, generator=g, dtype=torch.float64).to(dtype)
    image = torch.randn(4, 2, directions.shape[0], generator=g, dtype=torch.float64).to(dtype)
    return rays, vol, M, dM, image


def compare_primitives(backend, reference, rays, vol, M, dM, g, tolerance):
    """All four primitives of ``backend`` against ``reference``; returns the relative errors."""
    errors = {
        "forward": relative_error(backend.forward(rays, vol, M), reference.forward(rays, vol, M)),
        "jvp": relative_error(backend.jvp(rays, vol, M, dM), reference.jvp(rays, vol, M, dM)),
    }
    for name, method, extra in (("vjp", "vjp", ()), ("jvp_vjp", "jvp_vjp", (dM,))):
        ours = getattr(backend, method)(rays, vol, M, *extra, g)
        theirs = getattr(reference, method)(rays, vol, M, *extra, g)
        errors[f"{name} vol"] = relative_error(ours[0], theirs[0])
        errors[f"{name} M"] = relative_error(ours[1], theirs[1])
        for need_vol, need_M in ((True, False), (False, True)):
            alone = getattr(backend, method)(rays, vol, M, *extra, g, need_vol, need_M)
            assert (alone[0] is None) != need_vol and (alone[1] is None) != need_M
            kept = alone[0] if need_vol else alone[1]
            # equal but for the order of atomic adds
            assert relative_error(kept, ours[0] if need_vol else ours[1]) < tolerance
    bad = {k: v for k, v in errors.items() if not v < tolerance}
    assert not bad, f"relative errors above {tolerance}: {bad}"
    return errors


# ------------------------------------------------------------------------------- compilation


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_to_ptx_without_warnings(arch, tmp_path):
    """What NVRTC compiles (prost.cu with its header inlined) builds cleanly with nvcc."""
    source = tmp_path / "prost_inlined.cu"
    source.write_text(kernel_source())
    result = subprocess.run(
        [NVCC, "-ptx", f"-arch={arch}", "-std=c++17", str(source), "-o", str(tmp_path / "p.ptx")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    ptx = (tmp_path / "p.ptx").read_text()
    for primitive in ("forward", "vjp", "jvp", "jvp_vjp"):
        for suffix in ("f32", "f64"):
            assert f".entry prost_{primitive}_{suffix}(" in ptx


@pytest.mark.skipif(compiler() is None, reason="needs a C++ compiler")
def test_host_build_is_warning_free():
    result = subprocess.run(
        [
            compiler(),
            "-x",
            "c++",
            "-std=c++17",
            "-fsyntax-only",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wno-unknown-pragmas",
            "-include",
            str(KERNELS / "emulation" / "cuda_host.h"),
            str(KERNELS / "prost.cu"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_kernel_source_inlines_its_header():
    source = kernel_source()
    assert '#include "' not in source
    assert "struct Cell" in source and "prost_jvp_vjp_f64" in source


def test_cupy_backend_imports_and_constructs_without_cupy():
    backend = CupyBackend()
    assert backend.name == "cupy"
    assert all(callable(getattr(backend, m)) for m in ("forward", "vjp", "jvp", "jvp_vjp"))


# ------------------------------------------------------------------- host emulation vs torch


@pytest.mark.parametrize("scenario", ["centred", "face", "miss"])
def test_float32_cases_keep_samples_off_faces(scenario):
    """The float32 comparisons are meaningful for derivatives, not lucky (see face_margin)."""
    rays, _, M, _, _ = camera_case(scenario, torch.float32, 1, 1)
    assert face_margin(rays, M) > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("scenario", ["centred", "face", "miss"])
@pytest.mark.parametrize(("bv", "channels"), [(1, 1), (2, 3), (1, 3), (2, 1)])
def test_host_kernels_match_torch(host, scenario, bv, channels, dtype):
    rays, vol, M, dM, g = camera_case(scenario, dtype, bv, channels)
    compare_primitives(host, TorchBackend(), rays, vol, M, dM, g, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_host_kernels_match_torch_on_faces(host, dtype):
    rays, vol, M, dM, g = exact_case(dtype)
    # The case is exact arithmetic: the torch reference sees the same samples in the same cells.
    k_first, count = rays.sample_range(M)
    assert bool((count[:3] > 0).all())
    assert count[3, -1] == 1 and k_first[3, -1] == 16  # the single sample on the box's edge
    assert face_margin(rays, M) >= 0.03  # no sample near a face but those exactly on one
    compare_primitives(host, TorchBackend(), rays, vol, M, dM, g, TOLERANCE[dtype])


def test_rays_that_miss_give_exact_zeros(host):
    rays, vol, M, dM, g = camera_case("miss", torch.float64, 1, 2)
    image = host.forward(rays, vol, M)
    assert torch.count_nonzero(image[1]) == 0 and torch.count_nonzero(image[0]) > 0
    gvol, gM = host.vjp(rays, vol, M[1:], g[1:])
    assert torch.count_nonzero(gvol) == 0 and torch.count_nonzero(gM) == 0


def test_nan_pose_gives_nan_like_torch(host):
    """A NaN in M reads nothing out of bounds and poisons that pose's outputs, as in torch."""
    rays, vol, M, dM, g = camera_case("centred", torch.float64, 1, 1)
    M[0, 1, 2] = float("nan")
    image = host.forward(rays, vol, M)
    assert torch.isnan(image[0]).all() and torch.isfinite(image[1]).all()
    assert torch.allclose(image, TorchBackend().forward(rays, vol, M), equal_nan=True)
    assert torch.isnan(host.jvp(rays, vol, M, dM)[0]).all()
    gvol, gM = host.vjp(rays, vol, M, g)
    assert torch.isnan(gM[0]).all() and torch.isfinite(gM[1]).all()
    assert torch.isfinite(gvol).all()


def test_bad_inputs_name_the_field(host):
    rays, vol, M, dM, g = camera_case("centred", torch.float64, 1, 1)
    with pytest.raises(ProstlabError, match="M"):
        host.forward(rays, vol, M.float())
    with pytest.raises(ProstlabError, match="grid"):
        host.forward(rays, vol[:, :, 1:], M)
    with pytest.raises(ProstlabError, match="g: expected shape"):
        host.vjp(rays, vol, M, g[:, :, 1:])
    with pytest.raises(ProstlabError, match="CUDA"):
        CupyBackend().forward(rays, vol, M)


def test_projector_with_host_kernels_matches_torch(host, monkeypatch):
    """End to end: Camera, pose, Projector.forward and autograd, with the kernels swapped in."""
    g = torch.Generator().manual_seed(4)
    volume = torch.rand(1, 2, 8, 7, 9, generator=g, dtype=torch.float64, requires_grad=True)
    pose = torch.cat((torch.rand(2, 3, generator=g) * 0.4, torch.rand(2, 3, generator=g) * 4.0), 1)
    pose = pose.to(torch.float64).requires_grad_()
    camera = Camera(sdd=150.0, sid=100.0, height=8, width=9, pixel_spacing=(2.5, 2.0))
    results = []
    for backend in ("torch", host):
        if not isinstance(backend, str):
            monkeypatch.setattr(projector_module, "resolve_backend", lambda *a, b=backend: b)
        image = Projector(camera, step=0.7, backend="torch")(volume, (1.1, 1.3, 0.9), pose)
        (grad_pose,) = torch.autograd.grad((image**2).sum(), pose, create_graph=True)
        grad_volume, grad_pose2 = torch.autograd.grad(grad_pose.square().sum(), (volume, pose))
        results.append((image, grad_pose, grad_volume, grad_pose2))
    for ours, theirs in zip(results[1], results[0], strict=True):
        assert relative_error(ours, theirs) < 1e-10


# -------------------------------------------------------------------- gradients through kernels


def tiny_problem(seed: int, channels: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    camera = Camera(sdd=60.0, sid=40.0, height=4, width=5, pixel_spacing=(2.0, 1.8))
    rays = RayBundle.from_camera(camera, (1.0, 1.2, 0.9), (4, 3, 5), 0.7, torch.float64, device)
    vol = torch.rand(1, channels, 4, 3, 5, generator=g, dtype=torch.float64)
    R = so3_exp((torch.rand(2, 3, generator=g, dtype=torch.float64) - 0.5) * 0.5)
    t = (torch.rand(2, 3, generator=g, dtype=torch.float64) - 0.5) * 2.0
    M = volume_from_camera(R, t, camera.sid)
    return rays, vol.to(device).requires_grad_(), M.to(device).requires_grad_()


def test_gradcheck_through_host_kernels(host):
    rays, vol, M = tiny_problem(6, channels=2)
    assert torch.autograd.gradcheck(lambda v, m: project(v, m, rays, host), (vol, M))


def test_gradgradcheck_through_host_kernels(host):
    rays, vol, M = tiny_problem(7, channels=1)
    assert torch.autograd.gradgradcheck(lambda v, m: project(v, m, rays, host), (vol, M))


@pytest.fixture
def fixed_order_host(host) -> HostKernelBackend:
    """The emulation running the GPU's deterministic mode: pose slots, fixed-point volume."""
    backend = HostKernelBackend(directory=REPO / "tests" / "_build", deterministic=True)
    backend.volume_order = "fixed"
    return backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("scenario", ["centred", "face", "miss"])
def test_deterministic_mode_matches_torch(fixed_order_host, scenario, dtype):
    """The CUDA kernels' fixed-order sums (what CupyBackend(deterministic=True) launches)."""
    rays, vol, M, dM, g = camera_case(scenario, dtype, 1, 3)
    compare_primitives(fixed_order_host, TorchBackend(), rays, vol, M, dM, g, TOLERANCE[dtype])


def test_gradcheck_and_gradgradcheck_in_deterministic_mode(fixed_order_host):
    rays, vol, M = tiny_problem(6, channels=2)
    assert torch.autograd.gradcheck(lambda v, m: project(v, m, rays, fixed_order_host), (vol, M))
    rays, vol, M = tiny_problem(7, channels=1)
    assert torch.autograd.gradgradcheck(
        lambda v, m: project(v, m, rays, fixed_order_host), (vol, M))


def test_deterministic_mode_follows_the_flag_and_torch(monkeypatch):
    monkeypatch.delenv("PROSTLAB_DETERMINISTIC", raising=False)
    assert CupyBackend(deterministic=True).deterministic
    assert not CupyBackend(deterministic=False).deterministic
    assert not CupyBackend().deterministic
    monkeypatch.setenv("PROSTLAB_DETERMINISTIC", "1")
    assert CupyBackend().deterministic
    monkeypatch.setenv("PROSTLAB_DETERMINISTIC", "")
    before = torch.are_deterministic_algorithms_enabled()
    try:  # what Trainer(deterministic=True) does
        torch.use_deterministic_algorithms(True)
        assert CupyBackend().deterministic
    finally:
        torch.use_deterministic_algorithms(before)


def test_fixed_point_bound_holds(host):
    """volume_gradient_bound bounds every voxel of both volume gradients, with room to spare
    but not so much that float32's 24 bits are lost in the 62 fixed-point bits."""
    for scenario in ("centred", "face"):
        rays, vol, M, dM, g = camera_case(scenario, torch.float64, 1, 3)
        for gvol, tangent in ((host.vjp(rays, vol, M, g)[0], None),
                              (host.jvp_vjp(rays, vol, M, dM, g)[0], dM)):
            bound = volume_gradient_bound(rays, M, tangent, g)
            assert gvol.abs().max().item() <= bound < gvol.abs().max().item() * 2 ** 30


# ------------------------------------------------------------------------------------- on GPU


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("scenario", ["centred", "face", "miss"])
@pytest.mark.parametrize(("bv", "channels"), [(1, 1), (2, 3)])
def test_cupy_matches_torch_on_gpu(scenario, bv, channels, dtype):
    case = camera_case(scenario, dtype, bv, channels)
    rays, *tensors = _to_cuda(*case)
    compare_primitives(CupyBackend(), TorchBackend(), rays, *tensors, TOLERANCE[dtype])


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cupy_matches_torch_on_faces_on_gpu(dtype):
    rays, *tensors = _to_cuda(*exact_case(dtype))
    compare_primitives(CupyBackend(), TorchBackend(), rays, *tensors, TOLERANCE[dtype])


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_deterministic_mode_on_gpu(dtype):
    """CupyBackend(deterministic=True): torch's values, and the same bits on every repeat."""
    rays, vol, M, dM, g = _to_cuda(*camera_case("centred", dtype, 2, 3))
    backend = CupyBackend(deterministic=True)
    compare_primitives(backend, TorchBackend(), rays, vol, M, dM, g, TOLERANCE[dtype])
    first = (*backend.vjp(rays, vol, M, g), *backend.jvp_vjp(rays, vol, M, dM, g))
    for _ in range(5):
        again = (*backend.vjp(rays, vol, M, g), *backend.jvp_vjp(rays, vol, M, dM, g))
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.gpu
@requires_gpu
def test_gradcheck_and_gradgradcheck_on_gpu():
    backend = CupyBackend()
    rays, vol, M = tiny_problem(6, channels=2, device="cuda")
    assert torch.autograd.gradcheck(lambda v, m: project(v, m, rays, backend), (vol, M))
    rays, vol, M = tiny_problem(7, channels=1, device="cuda")
    assert torch.autograd.gradgradcheck(lambda v, m: project(v, m, rays, backend), (vol, M))


@pytest.mark.gpu
@requires_gpu
def test_large_render_on_gpu():
    """A 1024 x 1024 DRR of a 256^3 volume: matches torch, and needs no per-sample memory."""
    g = torch.Generator(device="cuda").manual_seed(0)
    volume = torch.rand(1, 1, 256, 256, 256, generator=g, device="cuda")
    camera = Camera(sdd=1020.0, sid=620.0, height=1024, width=1024, pixel_spacing=(0.365, 0.365))
    pose = torch.tensor([[0.1, -0.2, 0.05, 3.0, -2.0, 1.0]], device="cuda")
    spacing = (1.165, 1.165, 1.165)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    image = Projector(camera, step=1.75, backend="cupy")(volume, spacing, pose)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert image.shape == (1, 1, 1024, 1024)
    assert extra < 256 * 2**20, f"{extra / 2**20:.1f} MiB beyond the inputs"  # P x K: 1.2 GiB
    reference = Projector(camera, step=1.75, backend="torch")(volume, spacing, pose)
    assert relative_error(image, reference) < 1e-4


@pytest.mark.gpu
@requires_gpu
def test_non_default_stream_on_gpu():
    """Kernels run on torch's current stream: work queued there is ordered with them."""
    rays, vol, M, dM, g = _to_cuda(*camera_case("centred", torch.float32, 1, 1))
    expected = CupyBackend().forward(rays, vol, M)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        bumped = vol * 2.0  # queued on `stream`; the kernel must see it done
        image = CupyBackend().forward(rays, bumped, M)
        gvol, gM = CupyBackend().vjp(rays, bumped, M, g)
    stream.synchronize()
    assert relative_error(image, 2.0 * expected) < 1e-5
    assert torch.isfinite(gM).all() and gvol.abs().sum() > 0


@pytest.mark.gpu
@requires_gpu
def test_second_device_on_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    case = camera_case("centred", torch.float32, 1, 2)
    rays, *tensors = _to_cuda(*case, device="cuda:1")
    with torch.cuda.device(0):  # the current device differs from the tensors'
        compare_primitives(CupyBackend(), TorchBackend(), rays, *tensors, 1e-4)


def _to_cuda(rays, *tensors, device="cuda"):
    moved = dataclasses.replace(
        rays, directions=rays.directions.to(device), lengths=rays.lengths.to(device)
    )
    return (moved, *(t.to(device) for t in tensors))
