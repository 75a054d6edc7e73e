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

A kernel computes only the gradients that the running backward pass uses (:func:`_used`): the
pose gradient that the network's training takes by ``autograd.grad(S, delta)`` does not scatter a
volume gradient, though the lifted volume requires one, and a backward whose ``inputs`` are the
network's parameters does not sum pose gradients for the pose perturbation. Each unused gradient
was a third of its kernel's time (bench/RESULTS.md, "Training step"); :func:`every_gradient`
computes them all again, for comparisons.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
        need_vol, need_M = _used(ctx, 0), _used(ctx, 1)
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
        want_vol, want_M, want_g = _used(ctx, 0), _used(ctx, 1), _used(ctx, 2)
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


_every = False


@contextmanager
def every_gradient() -> Iterator[None]:
    """Within it, the kernels compute every gradient an input requires, used by the backward pass
    or not, as before that was pruned: for tests and benchmarks that compare (it is process-wide,
    since the autograd engine runs a CUDA backward on threads of its own)."""
    global _every
    before, _every = _every, True
    try:
        yield
    finally:
        _every = before


def _used(ctx, index: int) -> bool:
    """Whether the running backward pass uses the gradient of the function's input ``index``:
    it requires one and the engine will run the node it flows into (``autograd.grad`` and
    ``backward(inputs=...)`` run only the nodes on a path to their inputs). Where the engine does
    not say (a leaf under ``autograd.grad``), it is used."""
    if not ctx.needs_input_grad[index]:
        return False
    if _every:
        return True
    node = ctx.next_functions[index][0]
    try:
        return node is not None and torch._C._will_engine_execute_node(node)
    except RuntimeError:
        return True


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


def project(vol: torch.Tensor, M: torch.Tensor, rays, backend) -> torch.Tensor:
    """Differentiable line integrals (B, C, P) of ``vol`` along ``rays`` posed by ``M``."""
    return _Project.apply(vol, M, rays, backend)
