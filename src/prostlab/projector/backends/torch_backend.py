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
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from prostlab.projector.rays import RayBundle

_CORNERS = list(itertools.product((0, 1), repeat=3))
_PAIRS = ((0, 1), (0, 2), (1, 2))


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
        table = _padded_table(vol)
        out = vol.new_zeros(M.shape[0], rays.directions.shape[0], vol.shape[1])
        for chunk in self._chunks(rays, M):
            acc = 0.0
            for corner in _corners(chunk, rays, vol.shape[0], order=0):
                acc = acc + corner.weight[..., None] * table[corner.index]
            out[:, chunk.rays] = (acc * chunk.mask).sum(dim=2)
        return out.transpose(1, 2) * rays.step

    def vjp(self, rays, vol, M, g, need_vol: bool = True, need_M: bool = True):
        """Gradients of ``<g, forward(vol, M)>`` w.r.t. ``vol`` and ``M`` (None where not needed)."""
        table = _padded_table(vol)
        g = g.transpose(1, 2) * rays.step  # (B, P, C)
        gvol = torch.zeros_like(table) if need_vol else None
        gM = M.new_zeros(M.shape) if need_M else None
        for chunk in self._chunks(rays, M):
            gc = g[:, chunk.rays, None, :] * chunk.mask  # (B, Pc, K, C)
            gx = 0.0
            for corner in _corners(chunk, rays, vol.shape[0], order=1 if need_M else 0):
                if need_vol:
                    _scatter(gvol, corner.index, corner.weight[..., None] * gc)
                if need_M:
                    u = (table[corner.index] * gc).sum(dim=-1)
                    gx = gx + torch.stack(corner.grad, dim=-1) * u[..., None]
            if need_M:
                gM += _pose_gradient(chunk, rays, gx)
        return _unpadded(gvol, vol), gM

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
