"""Autograd for the projector, twice differentiable, on top of any backend's four primitives.

Write ``I = P(V, M)`` for the projection of volume ``V`` through the volume-from-camera transforms
``M`` (B, 3, 4). Its backward is ``(gV, gM) = vjp(V, M, g)``, itself an autograd function of
``(V, M, g)``. Given cotangents ``(hV, hM)`` for ``(gV, gM)``, and using that ``P`` is linear in
``V`` and that ``<hM, gM> = <g, jvp(V, M, hM)>``:

    d/dg  = P(hV, M) + jvp(V, M, hM)
    d/dV  = d/dV <g, jvp(V, M, hM)>                      (jvp_vjp, volume part)
    d/dM  = d/dM <g, P(hV, M)> + d/dM <g, jvp(V, M, hM)>  (vjp with volume hV, + jvp_vjp)

so the double backward that training the convex-similarity network needs costs two more kernel
launches, and nothing of size H x W x K is kept between passes: only ``V``, ``M`` and ``g``.
"""

from __future__ import annotations

import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable


class _Project(Function):
    @staticmethod
    def forward(ctx, vol, M, rays, backend):
        ctx.save_for_backward(vol, M)
        ctx.rays, ctx.backend = rays, backend
        return backend.forward(rays, vol, M)

    @staticmethod
    def backward(ctx, g):
        vol, M = ctx.saved_tensors
        need_vol, need_M = ctx.needs_input_grad[:2]
        gvol, gM = _ProjectVJP.apply(
            vol, M, g.contiguous(), ctx.rays, ctx.backend, need_vol, need_M
        )
        return gvol, gM, None, None


class _ProjectVJP(Function):
    @staticmethod
    def forward(ctx, vol, M, g, rays, backend, need_vol, need_M):
        # An unused output's cotangent arrives as None, not zeros: no kernel runs on zeros.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(vol, M, g)
        ctx.rays, ctx.backend = rays, backend
        return backend.vjp(rays, vol, M, g, need_vol, need_M)

    @staticmethod
    @once_differentiable
    def backward(ctx, hvol, hM):
        vol, M, g = ctx.saved_tensors
        rays, backend = ctx.rays, ctx.backend
        want_vol, want_M, want_g = ctx.needs_input_grad[:3]
        dvol = dM = dg = None
        if hvol is not None:
            if want_g:
                dg = backend.forward(rays, hvol, M)
            if want_M:
                dM = backend.vjp(rays, hvol, M, g, need_vol=False, need_M=True)[1]
        if hM is not None:
            if want_g:
                dg = _add(dg, backend.jvp(rays, vol, M, hM))
            if want_vol or want_M:
                jv, jm = backend.jvp_vjp(rays, vol, M, hM, g, need_vol=want_vol, need_M=want_M)
                dvol, dM = jv, _add(dM, jm)
        return dvol, dM, dg, None, None, None, None


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


def project(vol: torch.Tensor, M: torch.Tensor, rays, backend) -> torch.Tensor:
    """Differentiable line integrals (B, C, P) of ``vol`` along ``rays`` posed by ``M``."""
    return _Project.apply(vol, M, rays, backend)
