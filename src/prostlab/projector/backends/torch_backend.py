"""The reference projector backend, in plain torch: runs on any device, in float32 or float64.

The four primitives below are all a double-differentiable projector needs (see
``prostlab.projector.autograd``). With ``f_V`` the zero-padded trilinear interpolant of the
volume ``V``, ``x_pk = M (tau_k d_p, 1)`` the sample positions and ``s`` the step:

* ``forward``:  ``I_p = s sum_k f_V(x_pk)``
* ``vjp``:      the gradients of ``<g, I>`` w.r.t. ``V`` (a trilinear scatter) and ``M``
  (``s sum_k g_p grad f_V(x_pk) (tau_k d_p, 1)^T``)
* ``jvp``:      the derivative of ``I`` along a tangent ``dM``: ``s sum_k <grad f_V(x_pk), dM q_pk>``
* ``jvp_vjp``:  the gradients of ``<g, jvp(V, M, dM)>`` w.r.t. ``V`` and ``M``; the latter needs the
  Hessian of ``f_V``, whose diagonal vanishes inside a cell (``f_V`` is linear along each axis).

Rays are processed in chunks of at most ``max_samples`` samples, so memory stays bounded whatever
the detector size; within a chunk, positions are computed from ``M`` where they are used.

``forward`` and ``vjp`` (the passes of rendering and of a first-order gradient) sample through
torch's fused ``grid_sample`` kernel and its backward, which compute ``f_V``, its scatter and its
gradient in one pass each. ``grid_sample`` sees the volume in normalised coordinates
(``align_corners=False``: ``g_a = 2 x_a / (s_a N_a)`` maps the voxel-centre convention exactly,
zero padding is the zero-padded interpolant), the samples stay ``tau_k = k * step`` inside the
clipped interval, and the padding beyond each ray's last sample is sent to ``g = 3``, where all
eight corners are off the grid. The mapping to normalised coordinates rounds, so a sample that lies
on a cell face (within a few ulps) may be floored into the neighbouring cell: harmless for the
values and the volume gradient, which are continuous there, but not for ``grad f_V``, which jumps
across a face. Those few samples (none in float64 but those exactly on a face; about 0.5% in
float32) get their gradient recomputed with the exact index arithmetic of ``jvp`` and the kernels,
so the pose gradient matches them sample for sample. ``jvp`` and ``jvp_vjp`` (double backward
only) gather the 8 corners explicitly.

On the CPU, ``forward`` and a ``vjp`` without the volume gradient read a volume of
``REORDER_MIN_VOXELS`` or more per channel through a copy with its axes reordered
(:func:`_axis_order`; the copy is kept by :mod:`~prostlab.projector.backends.volume_cache` while
the volume is unchanged): ``grid_sample`` runs up to 1.6x faster when the rays run along the
array's middle axis and the contiguous axis is the one they cross most nearly at right angles.
Reordering the axes permutes the rows of ``M``, the grid and the spacing, and nothing else: the
samples and their sums are the same, to rounding.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prostlab.projector.backends.volume_cache import cached_copy
from prostlab.projector.rays import RayBundle

REORDER_MIN_VOXELS = 1 << 20
"""Smaller volumes (below 128 x 128 x 64) are read as they are: they fit in the caches."""
_CORNERS = list(itertools.product((0, 1), repeat=3))
_PAIRS = ((0, 1), (0, 2), (1, 2))
_FAR = 3.0
"""A normalised ``grid_sample`` coordinate whose corners all lie off the grid (index >= N)."""
_FACE_ULPS = 8
"""Samples within ``_FACE_ULPS * eps * (r / s + N)`` voxels of a cell face (``r``: the largest
``|c| + tau |A d|``, mm) get their gradient from the exact index arithmetic (module docstring).
Both ways of computing a sample's index round a few times on terms of that size, so they differ
by at most about ``3 eps (r / s + N)``; measured on the chest CT in float32: 0.4."""


@dataclass
class _Chunk:
    """The samples of a slice of rays: positions and their homogeneous camera-frame points."""

    rays: slice
    tau: torch.Tensor  # (B, Pc, K) distance from the source, mm
    x: torch.Tensor  # (B, Pc, K, 3) positions in the volume frame, mm
    mask: torch.Tensor  # (B, Pc, K, 1) 1 inside the ray's clipped interval, 0 in the padding


@dataclass
class _Corner:
    """One of the 8 cell corners of every sample, with its interpolation weight and derivatives.

    ``weight`` is the trilinear weight (zero for samples outside the clipped interval or corners
    outside the grid); ``grad[a]`` its derivative along index axis ``a``; ``hess[(a, b)]`` the
    mixed second derivative. Derivatives are in index units (divide by spacing for mm).
    """

    index: torch.Tensor  # (B, Pc, K) int64, row of the channels-last volume
    weight: torch.Tensor
    grad: list[torch.Tensor]
    hess: dict[tuple[int, int], torch.Tensor]


class TorchBackend:
    """Chunked ray marching with trilinear interpolation written out in torch operations."""

    name = "torch"

    def __init__(self, max_samples: int = 1 << 18):
        self.max_samples = int(max_samples)

    # ----------------------------------------------------------------------------- primitives
    def forward(self, rays: RayBundle, vol: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """Line integrals ``(B, C, P)`` of ``vol`` (Bv, C, D, H, W) along the rays of ``M``."""
        rays, vol, M, _ = _reordered(rays, vol, M)
        batch, channels = M.shape[0], vol.shape[1]
        out = vol.new_zeros(batch, channels, rays.directions.shape[0])
        frame = _Frame.whole(rays, vol)
        for span in self._spans(rays, M):
            coord = span.coordinates(frame, M)
            image = F.grid_sample(
                vol, _per_volume(coord, vol), "bilinear", "zeros", align_corners=False
            )
            out[:, :, span.rays] = _per_pose(image.sum(dim=3))
        return _poisoned(out * rays.step, M)

    def vjp(self, rays, vol, M, g, need_vol: bool = True, need_M: bool = True):
        """Gradients of ``<g, forward(vol, M)>`` w.r.t. ``vol`` and ``M`` (None where not needed)."""
        order = None
        if not need_vol:
            rays, vol, M, order = _reordered(rays, vol, M)
        g = g * rays.step  # (B, C, P)
        gvol = torch.zeros_like(vol) if need_vol else None
        gM = M.new_zeros(M.shape) if need_M else None
        whole = _Frame.whole(rays, vol)
        for span in self._spans(rays, M):
            # The volume gradient of a chunk only touches the box its samples cross.
            frame = span.box(rays, M) if need_vol else whole
            coord = span.coordinates(frame, M)
            k = coord.shape[1]
            gs = g[:, :, span.rays]  # (B, C, Pc)
            bv = vol.shape[0]
            cot = gs.reshape(bv, -1, *gs.shape[1:]).transpose(1, 2)[:, :, :, None]
            cot = cot.expand(-1, -1, -1, k, -1)  # (Bv, C, B / Bv, K, Pc), as grid_sample's output
            gsub, ggrid = torch.ops.aten.grid_sampler_3d_backward(
                cot, vol[frame.crop], _per_volume(coord, vol), 0, 0, False, [need_vol, need_M]
            )
            if need_vol:
                gvol[frame.crop] += gsub
            if need_M:
                ggrid = ggrid.reshape(coord.shape)  # d<g, I>/d coord, (W, H, D) order
                _exact_on_faces(ggrid, span, frame, coord, rays, vol, M, gs)
                gM += span.pose_gradient(ggrid, frame, rays)
        if need_M and order is not None:  # rows of the reordered M back in the volume's order
            gM = gM[:, [order.index(a) for a in range(3)]]
        return gvol, (_poisoned(gM, M) if need_M else None)

    def jvp(self, rays, vol, M, dM):
        """Derivative ``(B, C, P)`` of ``forward(vol, M)`` along the tangent ``dM`` (B, 3, 4)."""
        table = _padded_table(vol)
        out = vol.new_zeros(M.shape[0], rays.directions.shape[0], vol.shape[1])
        for chunk in self._chunks(rays, M):
            dq = _index_velocity(chunk, rays, dM)
            acc = 0.0
            for corner in _corners(chunk, rays, vol.shape[0], order=1):
                rate = sum(corner.grad[a] * dq[..., a] for a in range(3))
                acc = acc + rate[..., None] * table[corner.index]
            out[:, chunk.rays] = (acc * chunk.mask).sum(dim=2)
        return out.transpose(1, 2) * rays.step

    def jvp_vjp(self, rays, vol, M, dM, g, need_vol: bool = True, need_M: bool = True):
        """Gradients of ``<g, jvp(vol, M, dM)>`` w.r.t. ``vol`` and ``M``."""
        table = _padded_table(vol)
        g = g.transpose(1, 2) * rays.step
        gvol = torch.zeros_like(table) if need_vol else None
        gM = M.new_zeros(M.shape) if need_M else None
        for chunk in self._chunks(rays, M):
            gc = g[:, chunk.rays, None, :] * chunk.mask
            dq = _index_velocity(chunk, rays, dM)
            gx = 0.0
            for corner in _corners(chunk, rays, vol.shape[0], order=2 if need_M else 1):
                if need_vol:
                    rate = sum(corner.grad[a] * dq[..., a] for a in range(3))
                    _scatter(gvol, corner.index, rate[..., None] * gc)
                if need_M:
                    u = (table[corner.index] * gc).sum(dim=-1)
                    gx = gx + _hessian_times(corner.hess, dq) * u[..., None]
            if need_M:
                gM += _pose_gradient(chunk, rays, gx)
        return _unpadded(gvol, vol), gM

    # ------------------------------------------------------------------------------- marching
    def _spans(self, rays: RayBundle, M: torch.Tensor) -> Iterator[_Span]:
        """Groups of rays whose sample grids (padded to the longest ray) hold at most
        ``max_samples`` samples, sample-major: neighbouring rays' k-th samples are adjacent.
        Rays are taken in the order of the memory address of their midpoint, so that
        neighbouring rays read neighbouring cache lines whichever array axis the detector's rows
        and columns run along, and a group's samples fill a slab of the array."""
        k_first, count = rays.sample_range(M)
        batch, n_rays = count.shape
        longest = max(int(count.max()), 1) if n_rays else 1
        per_chunk = max(1, self.max_samples // (batch * longest))
        A = M[:, :, :3]
        far = _far_tau(rays, M)
        order = _memory_order(rays, M, k_first, count)
        for start in range(0, n_rays, per_chunk):
            sl = order[start : start + per_chunk]
            n = int(count[:, sl].max())
            if n == 0:
                continue
            j = torch.arange(n, device=M.device)[:, None]
            valid = j < count[:, None, sl]
            tau = (k_first[:, None, sl] + j).to(M.dtype) * rays.step
            if far is not None:  # the padding goes off the grid through tau alone
                tau = torch.where(valid, tau, far[:, None, None])
            w = torch.einsum("bij,pj->bpi", A, rays.directions[sl])
            yield _Span(sl, k_first[:, sl], count[:, sl], tau, valid, w, far is None)

    def _chunks(self, rays: RayBundle, M: torch.Tensor) -> Iterator[_Chunk]:
        """Slices of rays whose padded sample grids hold at most ``max_samples`` samples."""
        k_first, count = rays.sample_range(M)
        batch, n_rays = count.shape
        longest = max(int(count.max()), 1) if n_rays else 1
        per_chunk = max(1, self.max_samples // (batch * longest))
        A, c = M[:, :, :3], M[:, :, 3]
        for start in range(0, n_rays, per_chunk):
            sl = slice(start, min(start + per_chunk, n_rays))
            n = int(count[:, sl].max())
            if n == 0:
                continue
            j = torch.arange(n, device=M.device)
            tau = (k_first[:, sl, None] + j).to(M.dtype) * rays.step
            w = torch.einsum("bij,pj->bpi", A, rays.directions[sl])
            x = c[:, None, None, :] + tau[..., None] * w[:, :, None, :]
            yield _Chunk(sl, tau, x, (j < count[:, sl, None]).to(M.dtype)[..., None])


@dataclass
class _Frame:
    """The normalised ``grid_sample`` coordinates of a box of voxels ``crop`` of the volume.

    Along array axis ``a`` the box holds voxels ``lo_a .. lo_a + n_a - 1`` of ``N_a``, and a
    volume-frame position ``x_a`` (mm) has the coordinate ``scale_a x_a + shift_a`` with
    ``scale_a = 2 / (s_a n_a)``, ``shift_a = (N_a - 2 lo_a - n_a) / n_a``: continuous index
    ``q_a = x_a / s_a + (N_a - 1) / 2`` mapped to ``(2 (q_a - lo_a) + 1) / n_a - 1``, which is
    what ``align_corners=False`` unnormalises back to ``q_a - lo_a``.
    """

    crop: tuple[slice, ...]
    sizes: torch.Tensor  # (3,) n_a, array-axis order
    scale: torch.Tensor  # (3,)
    shift: torch.Tensor  # (3,)

    @staticmethod
    def of_box(rays: RayBundle, lo, sizes, like: torch.Tensor) -> _Frame:
        crop = (
            slice(None),
            slice(None),
            *(slice(a, a + n) for a, n in zip(lo, sizes, strict=True)),
        )
        n = torch.tensor(sizes, dtype=like.dtype, device=like.device)
        lo = torch.tensor(lo, dtype=like.dtype, device=like.device)
        grid = torch.tensor(rays.grid, dtype=like.dtype, device=like.device)
        spacing = torch.tensor(rays.spacing, dtype=like.dtype, device=like.device)
        return _Frame(crop, n, 2 / (spacing * n), (grid - 2 * lo - n) / n)

    @staticmethod
    def whole(rays: RayBundle, like: torch.Tensor) -> _Frame:
        return _Frame.of_box(rays, (0, 0, 0), rays.grid, like)


@dataclass
class _Span:
    """A slice of rays and their samples, sample-major: ``tau[b, k, p]`` is ray ``p``'s k-th."""

    rays: torch.Tensor  # (Pc,) indices of the rays
    k_first: torch.Tensor  # (B, Pc)
    count: torch.Tensor  # (B, Pc)
    tau: torch.Tensor  # (B, K, Pc) distance from the source, mm
    valid: torch.Tensor  # (B, K, Pc) bool: inside the ray's clipped interval
    w: torch.Tensor  # (B, Pc, 3) the rays' directions in the volume frame, A d
    mask: bool  # whether the padding still has to be sent off the grid (no far tau)

    def coordinates(self, frame: _Frame, M: torch.Tensor) -> torch.Tensor:
        """``grid_sample`` coordinates (B, K, Pc, 3) of the samples, (W, H, D) order; the
        padding beyond each ray's last sample lies off the grid."""
        c = (M[:, :, 3] * frame.scale + frame.shift).flip(-1)
        w = (self.w * frame.scale).flip(-1)
        coord = torch.addcmul(c[:, None, None, :], self.tau[..., None], w[:, None, :, :])
        return coord.masked_fill_(~self.valid[..., None], _FAR) if self.mask else coord

    def box(self, rays: RayBundle, M: torch.Tensor) -> _Frame:
        """The frame of the voxels that this span's samples can touch, with one voxel to spare
        on each side (the samples are on straight rays, so their ends bound them)."""
        hit = self.count > 0
        ends = torch.stack((self.k_first, self.k_first + self.count - 1)).to(M.dtype) * rays.step
        x = M[None, :, None, :, 3] + ends[..., None] * self.w  # (2, B, Pc, 3)
        spacing = torch.tensor(rays.spacing, dtype=M.dtype, device=M.device)
        grid = torch.tensor(rays.grid, dtype=M.dtype, device=M.device)
        q = (x / spacing + (grid - 1) / 2)[:, hit]  # (2, hits, 3)
        lo_hi = torch.stack((q.amin(dim=(0, 1)), q.amax(dim=(0, 1)))).tolist()
        if not all(map(math.isfinite, lo_hi[0] + lo_hi[1])):
            return _Frame.whole(rays, M)
        lo = [
            min(max(math.floor(v) - 1, 0), n - 1) for v, n in zip(lo_hi[0], rays.grid, strict=True)
        ]
        hi = [
            min(max(math.floor(v) + 2, 0), n - 1) for v, n in zip(lo_hi[1], rays.grid, strict=True)
        ]
        return _Frame.of_box(rays, lo, [h - a + 1 for a, h in zip(lo, hi, strict=True)], M)

    def pose_gradient(self, gcoord: torch.Tensor, frame: _Frame, rays: RayBundle) -> torch.Tensor:
        """Chain per-sample coordinate gradients ``gcoord`` (B, K, Pc, 3), (W, H, D) order, to
        ``M``: with ``gx = scale * gcoord`` (mm), ``sum_k gx_k (tau_k d, 1)^T``."""
        # tau_k = (k_first + k) step on the clipped interval, and gcoord = 0 on the padding (off
        # the grid), so sum_k tau_k g_k = k_first step sum_k g_k + step sum_k k g_k: two
        # reductions over k, the second a matrix-vector product, and no (B, K, Pc, 3) temporary.
        batch, k, pc, _ = gcoord.shape
        total = gcoord.sum(dim=1)  # (B, Pc, 3)
        ramp = torch.arange(k, dtype=gcoord.dtype, device=gcoord.device)
        moment = torch.matmul(ramp, gcoord.reshape(batch, k, pc * 3)).reshape(batch, pc, 3)
        first = self.k_first.to(gcoord.dtype)[..., None]
        along = (first * total + moment) * rays.step
        gA = torch.einsum("bpi,pj->bij", along.flip(-1) * frame.scale, rays.directions[self.rays])
        gc = total.sum(dim=1).flip(-1) * frame.scale
        return torch.cat((gA, gc[..., None]), dim=-1)


def _axis_order(rays: RayBundle, M: torch.Tensor) -> tuple[int, int, int]:
    """The array axes in the order ``grid_sample`` reads fastest on the CPU: with ``u_a`` the
    speed, in voxels per mm, of the central ray of the first pose along axis ``a``
    (``|(A d)_a| / s_a``, ``d`` the mean ray direction), the fastest axis in the middle, the
    slowest last (the contiguous one) and the third first.

    ``grid_sample`` takes the k-th samples of neighbouring rays one after another: with the rays
    along the middle axis, and the rays sorted by the address of their midpoints
    (:func:`_memory_order`), consecutive samples are neighbours along the contiguous axis. On a
    2-core Xeon, the 256^3 cube's AP view at 128^2, whose rays run along the contiguous axis as
    stored: 116 ms as stored, 87 ms reordered (``bench/results/layouts_cpu.md``).
    """
    d = rays.directions.mean(dim=0)
    speed = (M[0, :, :3].detach() @ d).abs() / torch.tensor(rays.spacing, dtype=M.dtype)
    fast, middle, slow = sorted(range(3), key=lambda a: -float(speed[a].nan_to_num(0.0)))
    return middle, fast, slow


def _reordered(rays: RayBundle, vol: torch.Tensor, M: torch.Tensor):
    """``(rays, vol, M, order)`` in the axis order of :func:`_axis_order` for a CPU volume (a
    cached copy of ``vol``, the rows of ``M`` and the grid and spacing of ``rays`` permuted:
    new axis ``i`` is old axis ``order[i]``), or unchanged with ``order`` None."""
    if vol.device.type != "cpu" or M.shape[0] == 0 or math.prod(rays.grid) < REORDER_MIN_VOXELS:
        return rays, vol, M, None
    order = _axis_order(rays, M)
    if order == (0, 1, 2):
        return rays, vol, M, None
    dims = (0, 1, *(2 + a for a in order))
    vol = cached_copy(vol, "axes", order, lambda: vol.permute(dims).contiguous())
    rays = dataclasses.replace(rays, spacing=tuple(rays.spacing[a] for a in order),
                               grid=tuple(rays.grid[a] for a in order))
    return rays, vol, M[:, list(order)], order


def _per_volume(coord: torch.Tensor, vol: torch.Tensor) -> torch.Tensor:
    """(B, K, Pc, 3) -> (Bv, B / Bv, K, Pc, 3): a shared volume (Bv = 1) sees all poses at once."""
    return coord.reshape(vol.shape[0], -1, *coord.shape[1:])


def _per_pose(image: torch.Tensor) -> torch.Tensor:
    """``grid_sample``'s (Bv, C, B / Bv, Pc) -> (B, C, Pc)."""
    return image.transpose(1, 2).reshape(-1, image.shape[1], image.shape[3])


def _poisoned(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``x`` (B, ...) with the items of non-finite poses made NaN throughout, as the kernels do."""
    return x + (M.sum(dim=(1, 2)) * 0).reshape(-1, *([1] * (x.dim() - 1)))


def _memory_order(rays: RayBundle, M: torch.Tensor, k_first, count) -> torch.Tensor:
    """The rays (P,) sorted by the flat array index of their midpoint at the first pose (rays that
    miss the volume last): an order for speed only, the images do not depend on it."""
    hit = count[0] > 0
    tau = (k_first[0] + count[0] // 2).to(M.dtype) * rays.step
    x = M[0, :, 3] + tau[:, None] * torch.einsum("ij,pj->pi", M[0, :, :3], rays.directions)
    spacing = torch.tensor(rays.spacing, dtype=M.dtype, device=M.device)
    grid = torch.tensor(rays.grid, device=M.device)
    index = torch.floor(x / spacing + (grid - 1) / 2).nan_to_num(0).long()
    index = torch.minimum(index.clamp(min=0), grid - 1)
    flat = (index[:, 0] * rays.grid[1] + index[:, 1]) * rays.grid[2] + index[:, 2]
    flat = torch.where(hit, flat, math.prod(rays.grid))
    return torch.argsort(flat, stable=True)


def _far_tau(rays: RayBundle, M: torch.Tensor) -> torch.Tensor | None:
    """Per pose, a distance ``T`` (B,) at which every ray is off the grid: ``|c + T A d| >=
    |T| |A d| - |c|`` exceeds the support's half-diagonal by two voxels. None where ``M`` is not
    finite or some ray's ``A d`` vanishes (the padding is then masked instead)."""
    if not bool(torch.isfinite(M).all()):
        return None
    norm = torch.einsum("bij,pj->bpi", M[:, :, :3], rays.directions).norm(dim=-1)
    shortest = norm.amin(dim=1) if norm.shape[1] else norm.new_ones(M.shape[0])
    if not bool((shortest > 0).all()):
        return None
    half_diagonal = math.sqrt(sum(h * h for h in rays.half_support))
    return -(M[:, :, 3].norm(dim=-1) + half_diagonal + 2 * max(rays.spacing)) / shortest


def _exact_on_faces(gcoord, span: _Span, frame: _Frame, coord, rays, vol, M, g) -> None:
    """Overwrite ``gcoord`` (B, K, Pc, 3) at the samples that may lie on a cell face with the
    gradient from the exact index arithmetic (module docstring). ``g``: (B, C, Pc) cotangent."""
    n = frame.sizes.flip(-1)
    u = torch.addcmul((n - 1) / 2, coord, n / 2)  # grid_sample's continuous index in the box
    eps = torch.finfo(M.dtype).eps
    reach = M[:, :, 3].abs().max() + span.tau.abs().max() * span.w.abs().max()
    tol = _FACE_ULPS * eps * (reach / min(rays.spacing) + max(rays.grid) + 2)
    near = (u.sub_(u.round()).abs_().amin(dim=-1) < tol) & span.valid
    b, k, p = near.nonzero(as_tuple=True)
    if b.numel() == 0:
        return
    tau = span.tau[b, k, p]
    x = M[b, :, 3] + tau[:, None] * span.w[b, p]
    item = b if vol.shape[0] > 1 else torch.zeros_like(b)
    gx = _exact_gradient(vol, rays, x, item, g[b, :, p])  # mm, (D, H, W) order
    gcoord[b, k, p] = (gx / frame.scale).flip(-1)


def _exact_gradient(vol, rays: RayBundle, x, item, g) -> torch.Tensor:
    """``sum_c g_c grad f_V,c(x)`` (n, 3), mm, at points ``x`` (n, 3) of volumes ``item`` (n,),
    with ``_corners``' cells (the floor of the index clamped to the support), all 8 corners at
    once."""
    device = x.device
    grid = torch.tensor(rays.grid, device=device)
    spacing = torch.tensor(rays.spacing, dtype=x.dtype, device=device)
    q = x / spacing + (grid - 1) / 2
    q = torch.minimum(q.clamp(min=-1.0), (grid).to(q.dtype))
    base = torch.floor(q)
    frac = q - base
    offsets = torch.tensor(_CORNERS, device=device)  # (8, 3)
    index = base.long()[:, None, :] + offsets  # (n, 8, 3)
    inside = ((index >= 0) & (index < grid)).all(dim=-1)  # corners off the grid read zero
    strides = torch.tensor((rays.grid[1] * rays.grid[2], rays.grid[2], 1), device=device)
    flat = torch.where(inside, (index * strides).sum(dim=-1), 0)
    channels = torch.arange(vol.shape[1], device=device)
    first = (item[:, None] * vol.shape[1] + channels) * math.prod(rays.grid)  # (n, C)
    value = torch.take(vol.contiguous(), first[:, None, :] + flat[..., None])  # (n, 8, C)
    u = (value * g[:, None, :]).sum(dim=-1) * inside  # (n, 8)
    w = torch.where(offsets.bool(), frac[:, None, :], 1 - frac[:, None, :])  # (n, 8, 3)
    others = torch.stack((w[..., 1] * w[..., 2], w[..., 0] * w[..., 2], w[..., 0] * w[..., 1]), -1)
    sign = (2 * offsets - 1).to(x.dtype)
    return (sign * others * u[..., None]).sum(dim=1) / spacing


def _corners(chunk: _Chunk, rays: RayBundle, n_volumes: int, order: int) -> Iterator[_Corner]:
    """The 8 corners of each sample's cell in the padded table, with weight derivatives.

    Positions are clamped to the support, index ``[-1, N_a]`` on each axis, so every corner lies
    inside the table that ``_padded_table`` pads with zeros (one voxel below, two above); no
    per-corner bounds test is needed.
    """
    grid = torch.tensor(rays.grid, device=chunk.x.device)
    spacing = torch.tensor(rays.spacing, dtype=chunk.x.dtype, device=chunk.x.device)
    q = chunk.x / spacing + (grid - 1) / 2  # continuous voxel index
    q = torch.minimum(q.clamp(min=-1.0), (grid).to(q.dtype))
    base = torch.floor(q)
    frac = q - base
    base = base.long() + 1  # index into the padded grid
    padded = [n + 3 for n in rays.grid]
    strides = (padded[1] * padded[2], padded[2], 1)
    batch = chunk.x.shape[0]
    volume_of_item = torch.arange(batch, device=q.device) * (1 if n_volumes > 1 else 0)
    row0 = (volume_of_item * (padded[0] * strides[0]))[:, None, None] + (
        base[..., 0] * strides[0] + base[..., 1] * strides[1] + base[..., 2]
    )
    ones = [1 - frac[..., a] for a in range(3)]
    for corner in _CORNERS:
        w = [frac[..., a] if corner[a] else ones[a] for a in range(3)]
        sign = [1.0 if corner[a] else -1.0 for a in range(3)]
        row = row0 + sum(strides[a] for a in range(3) if corner[a])
        grad, hess = [], {}
        if order >= 1:
            grad = [sign[0] * w[1] * w[2], sign[1] * w[0] * w[2], sign[2] * w[0] * w[1]]
        if order >= 2:
            hess = {(a, b): sign[a] * sign[b] * w[3 - a - b] for a, b in _PAIRS}
        yield _Corner(row, w[0] * w[1] * w[2], grad, hess)


def _index_velocity(chunk: _Chunk, rays: RayBundle, dM: torch.Tensor) -> torch.Tensor:
    """Velocity of each sample in index units along the tangent ``dM``: ``(dM q) / spacing``."""
    dw = torch.einsum("bij,pj->bpi", dM[:, :, :3], rays.directions[chunk.rays])
    dx = dM[:, None, None, :, 3] + chunk.tau[..., None] * dw[:, :, None, :]
    return dx / torch.tensor(rays.spacing, dtype=dx.dtype, device=dx.device)


def _hessian_times(hess: dict, dq: torch.Tensor) -> torch.Tensor:
    """``H dq`` for a corner's weight Hessian (zero diagonal), stacked over the 3 axes."""
    h01, h02, h12 = hess[(0, 1)], hess[(0, 2)], hess[(1, 2)]
    return torch.stack(
        (
            h01 * dq[..., 1] + h02 * dq[..., 2],
            h01 * dq[..., 0] + h12 * dq[..., 2],
            h02 * dq[..., 0] + h12 * dq[..., 1],
        ),
        dim=-1,
    )


def _pose_gradient(chunk: _Chunk, rays: RayBundle, gq: torch.Tensor) -> torch.Tensor:
    """Chain index-space sample gradients ``gq`` (B, Pc, K, 3) to ``M``: ``sum gx (tau d, 1)^T``."""
    gx = gq / torch.tensor(rays.spacing, dtype=gq.dtype, device=gq.device)
    along = (gx * chunk.tau[..., None]).sum(dim=2)  # (B, Pc, 3)
    gA = torch.einsum("bpi,pj->bij", along, rays.directions[chunk.rays])
    gc = gx.sum(dim=(1, 2))
    return torch.cat((gA, gc[..., None]), dim=-1)


def _padded_table(vol: torch.Tensor) -> torch.Tensor:
    """(Bv, C, D, H, W) -> (Bv * (D+3) * (H+3) * (W+3), C): zero-padded and channels-last, so
    that one gather fetches all channels of a corner and no corner falls outside."""
    padded = torch.nn.functional.pad(vol, (1, 2, 1, 2, 1, 2))
    return padded.permute(0, 2, 3, 4, 1).reshape(-1, vol.shape[1])


def _unpadded(table: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """Crop a gradient table in ``_padded_table``'s layout back to (Bv, C, D, H, W)."""
    if table is None:
        return None
    bv, ch, d, h, w = like.shape
    full = table.reshape(bv, d + 3, h + 3, w + 3, ch).permute(0, 4, 1, 2, 3)
    return full[:, :, 1:-2, 1:-2, 1:-2].contiguous()


def _scatter(table: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``table[rows] += values``, accumulating repeated rows."""
    ch = table.shape[1]
    table.index_add_(0, rows.reshape(-1), values.expand(*rows.shape, ch).reshape(-1, ch))
