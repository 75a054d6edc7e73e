"""The torch backend's grid_sample paths (forward, vjp) against its explicit-gather ones (jvp)
through adjoint identities, in small chunks whose volume gradients are cropped to boxes."""

import pytest
import torch

from prostlab.geometry import Camera, so3_exp
from prostlab.projector.backends import torch_backend as tb
from prostlab.projector.backends.torch_backend import TorchBackend
from prostlab.projector.rays import RayBundle

CAMERA = Camera(sdd=200.0, sid=120.0, height=10, width=9, pixel_spacing=(4.0, 4.5))


def case(bv: int, channels: int, seed: int = 0):
    """Rays of CAMERA through a (9, 10, 11) volume at two small random poses."""
    g = torch.Generator().manual_seed(seed)
    grid, spacing = (9, 10, 11), (2.0, 1.7, 2.3)
    rays = RayBundle.from_camera(CAMERA, spacing, grid, 0.9, torch.float64, "cpu")
    R = so3_exp((torch.rand(2, 3, generator=g, dtype=torch.float64) - 0.5) * 0.8)
    t = (torch.rand(2, 3, generator=g, dtype=torch.float64) - 0.5) * 8.0
    t[:, 2] += CAMERA.sid
    Rt = R.transpose(1, 2)
    M = torch.cat((Rt, -Rt @ t[..., None]), dim=2)
    vol = torch.rand(bv, channels, *grid, generator=g, dtype=torch.float64)
    other = torch.rand(bv, channels, *grid, generator=g, dtype=torch.float64)
    dM = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    cot = torch.randn(2, channels, rays.directions.shape[0], generator=g, dtype=torch.float64)
    return rays, vol, other, M, dM, cot


@pytest.mark.parametrize("max_samples", [7, 300, 1 << 18])
@pytest.mark.parametrize(("bv", "channels"), [(1, 1), (2, 2)])
def test_vjp_is_the_adjoint_of_forward_and_jvp(max_samples, bv, channels):
    """``<gV, W> = <g, P(W)>`` (P is linear in V) and ``<gM, dM> = <g, jvp(dM)>``; chunks of
    7 samples crop each volume gradient to a few voxels."""
    rays, vol, other, M, dM, cot = case(bv, channels)
    backend = TorchBackend(max_samples=max_samples)
    gvol, gM = backend.vjp(rays, vol, M, cot)
    lhs = (gvol * other).sum()
    rhs = (cot * backend.forward(rays, other, M)).sum()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-12)
    jvp = TorchBackend().jvp(rays, vol, M, dM)  # explicit corner gathers, no grid_sample
    assert (gM * dM).sum().item() == pytest.approx((cot * jvp).sum().item(), rel=1e-10)
    assert torch.allclose(backend.forward(rays, vol, M), TorchBackend().forward(rays, vol, M))


def test_images_match_explicit_trilinear_samples():
    """forward equals step * sum of trilinear samples at tau_k = k * step inside the support."""
    rays, vol, _, M, _, _ = case(1, 1, seed=3)
    k_first, count = rays.sample_range(M)
    n = int(count.max())
    j = torch.arange(n)
    tau = (k_first[..., None] + j).double() * rays.step  # (B, P, n)
    w = torch.einsum("bij,pj->bpi", M[:, :, :3], rays.directions)
    x = M[:, None, None, :, 3] + tau[..., None] * w[:, :, None, :]
    q = x / torch.tensor(rays.spacing, dtype=torch.float64) + (torch.tensor(rays.grid) - 1) / 2
    padded = torch.nn.functional.pad(vol[0, 0], (1, 1, 1, 1, 1, 1))
    base = torch.floor(q).long()
    frac = q - base
    total = torch.zeros(q.shape[:-1], dtype=torch.float64)
    for corner in torch.cartesian_prod(*[torch.tensor([0, 1])] * 3):
        index = (base + corner + 1).clamp(min=0)
        index = torch.minimum(index, torch.tensor(padded.shape) - 1)
        weight = torch.where(corner.bool(), frac, 1 - frac).prod(dim=-1)
        total += weight * padded[index[..., 0], index[..., 1], index[..., 2]]
    expected = (total * (j < count[..., None])).sum(dim=-1) * rays.step
    image = TorchBackend(max_samples=50).forward(rays, vol, M)[:, 0]
    assert torch.allclose(image, expected, rtol=1e-12, atol=1e-14)


def test_non_finite_pose_poisons_only_its_own_outputs():
    rays, vol, _, M, _, cot = case(1, 1)
    M[0, 1, 3] = float("nan")
    image = TorchBackend().forward(rays, vol, M)
    assert torch.isnan(image[0]).all() and torch.isfinite(image[1]).all()
    gvol, gM = TorchBackend().vjp(rays, vol, M, cot)
    assert torch.isnan(gM[0]).all() and torch.isfinite(gM[1]).all()
    assert torch.isfinite(gvol).all()


def _along(axis: int, grid=(9, 10, 11), spacing=(2.0, 1.7, 2.3)):
    """Rays of CAMERA whose central ray runs along volume axis ``axis`` (rotation only)."""
    rays = RayBundle.from_camera(CAMERA, spacing, grid, 0.9, torch.float64, "cpu")
    A = torch.zeros(3, 3, dtype=torch.float64)
    others = [a for a in range(3) if a != axis]
    A[others[0], 0], A[others[1], 1], A[axis, 2] = 1.0, 1.0, 1.0
    t = torch.tensor([0.0, 0.0, CAMERA.sid], dtype=torch.float64)
    M = torch.cat((A, -A @ t[:, None]), dim=1)[None]  # volume-from-camera, source at -sid
    return rays, M


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_axis_order_puts_the_rays_along_the_middle_axis(axis):
    rays, M = _along(axis)
    order = tb._axis_order(rays, M)
    assert sorted(order) == [0, 1, 2] and order[1] == axis
    # An oblique ray, in voxels per mm 0.6 along axis 0, 0.4 along axis 2, 0 along axis 1:
    # axis 0 goes in the middle, axis 2 first and axis 1 (the one it crosses) last.
    w = torch.tensor([0.6 * 2.0, 0.0, 0.4 * 2.3], dtype=torch.float64)
    A = torch.zeros(3, 3, dtype=torch.float64)
    A[:, 2] = w / w.norm()
    A[1, 0] = 1.0
    A[:, 1] = torch.linalg.cross(A[:, 2], A[:, 0])
    M = torch.cat((A, torch.zeros(3, 1, dtype=torch.float64)), dim=1)[None]
    assert tb._axis_order(rays, M) == (2, 0, 1)


def test_reordered_axes_change_neither_images_nor_pose_gradients(monkeypatch):
    """With the rays along the contiguous axis the torch backend reads a reordered copy; the
    images and pose gradients are those of the volume as stored, and an in-place change of the
    volume is seen (the copy is keyed by its version)."""
    rays, M = _along(2)
    M = M.repeat(2, 1, 1)
    M[1, :, 3] += torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    vol = torch.rand(1, 2, 9, 10, 11, generator=g, dtype=torch.float64)
    cot = torch.randn(2, 2, rays.directions.shape[0], generator=g, dtype=torch.float64)
    backend = TorchBackend(max_samples=40)
    monkeypatch.setattr(tb, "REORDER_MIN_VOXELS", 1 << 40)
    image = backend.forward(rays, vol, M)
    _, gM = backend.vjp(rays, vol, M, cot, need_vol=False)
    monkeypatch.setattr(tb, "REORDER_MIN_VOXELS", 0)
    order = tb._reordered(rays, vol, M)[3]
    assert order is not None and order[1] == 2
    torch.testing.assert_close(backend.forward(rays, vol, M), image, rtol=1e-12, atol=1e-12)
    _, gM_reordered = backend.vjp(rays, vol, M, cot, need_vol=False)
    torch.testing.assert_close(gM_reordered, gM, rtol=1e-10, atol=1e-12)
    vol.mul_(2.0)
    torch.testing.assert_close(backend.forward(rays, vol, M), 2 * image, rtol=1e-12, atol=1e-12)
