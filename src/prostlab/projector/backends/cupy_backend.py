"""The CUDA projector backend: the fused ray-marching kernels of ``kernels/prost.cu``, via CuPy.

The four primitives are those of :mod:`~prostlab.projector.backends.torch_backend` (same maths,
same signatures, same results to rounding): with ``f_V`` the zero-padded trilinear interpolant of
the volume, ``x_pk = M (tau_k d_p, 1)`` the sample positions and ``s`` the step,

* ``forward``: ``I_p = s sum_k f_V(x_pk)``, shape (B, C, P);
* ``vjp``: the gradients of ``<g, I>`` w.r.t. the volume (Bv, C, D, H, W) and ``M`` (B, 3, 4);
* ``jvp``: the derivative of ``I`` along a tangent ``dM`` (B, 3, 4), shape (B, C, P);
* ``jvp_vjp``: the gradients of ``<g, jvp(V, M, dM)>`` w.r.t. the volume and ``M``.

Each is one kernel launch, one thread per (batch item, ray), with sample positions generated on
the fly (docs/cuda.md). Tensors stay torch tensors: CuPy sees them zero-copy through DLPack, and
the kernels run on torch's current stream of the tensors' device.

:class:`KernelBackend` holds everything but the launch itself, so that the host emulation
(:mod:`~prostlab.projector.backends.host_emulation`) runs the same argument packing, through the
same kernel sources compiled for the CPU. CuPy is imported only when a kernel is launched.
"""

from __future__ import annotations

import importlib.resources
import math
import os
import re
import threading
import time

import torch

from prostlab.errors import ProstlabError
from prostlab.projector.backends.bricks import LayoutChoice, cached_bricks, clear_brick_cache
from prostlab.projector.rays import RayBundle

BLOCK = 128
"""Threads per block (a multiple of the warp size; prost.cu's ``__launch_bounds__``)."""

SLOT_RAYS = 32
"""Rays per pose-gradient slot in a fixed-order launch (``kSlotRays`` in prost_common.cuh)."""

FIXED_POINT_BITS = 62
"""The bound on a voxel's volume gradient maps to at most ``2^62`` fixed-point units (int64)."""


def deterministic_requested() -> bool:
    """Whether fixed-order kernels are asked for: ``$PROSTLAB_DETERMINISTIC`` is 1 (or true),
    or torch's deterministic algorithms are on (``Trainer(deterministic=True)`` turns them on)."""
    flag = os.environ.get("PROSTLAB_DETERMINISTIC", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    return torch.are_deterministic_algorithms_enabled()

_MAX_GRID_Y = 65535
_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_./]+)"\s*$', re.MULTILINE)


def kernel_source(name: str = "prost.cu") -> str:
    """The text of ``kernels/<name>`` with its local ``#include "..."`` lines inlined.

    Inlining lets NVRTC compile it without an include path, wherever the package is installed.
    """
    root = importlib.resources.files("prostlab.kernels")

    def expand(match: re.Match) -> str:
        return root.joinpath(match.group(1)).read_text(encoding="utf-8")

    return _INCLUDE.sub(expand, root.joinpath(name).read_text(encoding="utf-8"))


class KernelBackend:
    """The four primitives on top of an abstract ``_launch`` of one of prost.cu's kernels.

    Every kernel takes the same parameter list (``PROST_PARAMS`` in prost.cu), built by
    :meth:`_arguments` as ``(kind, value)`` pairs: ``("ptr", tensor or None)``, ``("int", n)``
    or ``("real", x)`` (in the tensors' dtype).
    """

    name = "kernels"
    brick_shift = 0
    """Bricks of ``2^brick_shift`` voxels a side for volumes that a launch only reads (0: the
    linear layout always; :mod:`~prostlab.projector.backends.bricks`)."""
    brick_min_voxels = 1 << 22
    """Volumes of fewer voxels per channel stay linear: they fit in the caches as they are."""
    layout_trials = 0
    """With ``n > 0`` and bricks on, time each layout ``n`` times on the first launches of a
    configuration and keep the faster (:class:`~prostlab.projector.backends.bricks.LayoutChoice`;
    needs launches that return when done, as the CPU's do); 0: always bricks."""
    tile_rays = False
    """Launch a detector's rays in Morton (Z) order of their pixels rather than row by row, so
    that the rays one thread walks in turn are neighbours in both image directions
    (:meth:`RayBundle.tiled`); the images come back in row order."""
    volume_order = "fixed"
    """How a fixed-order launch sums the volume gradient (prost_common.cuh, "the reductions"):
    ``"fixed"``, in int64 fixed point (any order gives the same sum: the GPU's way), or
    ``"copies"``, one private copy per host worker, summed in worker order (the CPU's way)."""

    @property
    def deterministic(self) -> bool:
        """Whether gradients are summed in a fixed order (bit-reproducible) or with atomics."""
        return False

    def _workers(self) -> int:
        """Host workers of a launch, one volume-gradient copy each (``volume_order="copies"``)."""
        return 1

    # ----------------------------------------------------------------------------- primitives
    def forward(self, rays: RayBundle, vol: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """Line integrals ``(B, C, P)`` of ``vol`` (Bv, C, D, H, W) along the rays of ``M``."""
        out = vol.new_empty(M.shape[0], vol.shape[1], rays.directions.shape[0])
        self._run("forward", rays, vol, M, out=out)
        return out

    def vjp(self, rays, vol, M, g, need_vol: bool = True, need_M: bool = True):
        """Gradients of ``<g, forward(vol, M)>`` w.r.t. ``vol`` and ``M`` (None where not needed)."""
        gvol = _zeros(vol) if need_vol else None
        gM = _zeros(M) if need_M else None
        if need_vol or need_M:
            self._run("vjp", rays, vol, M, g=g, gvol=gvol, gM=gM)
        return gvol, gM

    def jvp(self, rays, vol, M, dM):
        """Derivative ``(B, C, P)`` of ``forward(vol, M)`` along the tangent ``dM`` (B, 3, 4)."""
        out = vol.new_empty(M.shape[0], vol.shape[1], rays.directions.shape[0])
        self._run("jvp", rays, vol, M, dM=dM, out=out)
        return out

    def jvp_vjp(self, rays, vol, M, dM, g, need_vol: bool = True, need_M: bool = True):
        """Gradients of ``<g, jvp(vol, M, dM)>`` w.r.t. ``vol`` and ``M``."""
        gvol = _zeros(vol) if need_vol else None
        gM = _zeros(M) if need_M else None
        if need_vol or need_M:
            self._run("jvp_vjp", rays, vol, M, dM=dM, g=g, gvol=gvol, gM=gM)
        return gvol, gM

    # ------------------------------------------------------------------------------- launching
    def _run(self, primitive, rays, vol, M, dM=None, g=None, out=None, gvol=None, gM=None):
        vol, M, dM, g = (_prepared(t) for t in (vol, M, dM, g))
        _check(rays, vol, M, dM, g)
        batch, n_rays = M.shape[0], rays.directions.shape[0]
        if batch == 0 or n_rays == 0 or vol.shape[1] == 0:
            if out is not None:
                out.zero_()
            return
        if batch > _MAX_GRID_Y:
            raise ProstlabError(f"pose batch: expected at most {_MAX_GRID_Y} poses, got {batch}")
        suffix = {torch.float32: "f32", torch.float64: "f64"}[vol.dtype]
        grid = (math.ceil(n_rays / BLOCK), batch, 1)
        shift, key = self._layout(rays, gvol), None
        if shift and self.layout_trials:
            key = (primitive, rays.grid, n_rays, tuple(vol.shape[:2]), batch, vol.dtype,
                   gM is not None)
            shift = self._layout_choice().next(key)
        if shift:
            vol = cached_bricks(vol, shift)
        tiled = rays.tiled() if self.tile_rays else None
        rows = out
        if tiled is not None:
            rays, order = tiled
            g = None if g is None else g[..., order].contiguous()
            out = None if out is None else torch.empty_like(out)
        order = _FixedOrder(self, grid, rays, M, dM, g, gvol, gM) if self.deterministic else None
        if order is not None:
            gvol, gM = order.gvol_target, order.gM_target
        args = self._arguments(rays, vol, M, dM, g, out, gvol, gM, shift, order)
        start = time.perf_counter()
        self._launch(f"prost_{primitive}_{suffix}", grid, (BLOCK, 1, 1), args, vol,
                     fixed_order=order is not None and order.copies > 1)
        if order is not None:
            order.finish()
        if key is not None:
            choice = self._layout_choice()
            choice.record(key, shift, time.perf_counter() - start)
            if choice.settled() and not choice.bricked():
                clear_brick_cache()  # every configuration reads the volume as it is: free the copy
        if tiled is not None and rows is not None:
            rows[..., tiled[1]] = out

    def _layout_choice(self) -> LayoutChoice:
        """This backend's :class:`LayoutChoice` (made on first use)."""
        choice = getattr(self, "_choice", None)
        if choice is None:
            choice = self._choice = LayoutChoice(self.brick_shift, self.layout_trials)
        return choice

    def _layout(self, rays: RayBundle, gvol: torch.Tensor | None) -> int:
        """The brick shift of a launch: :attr:`brick_shift` for a large volume that the launch
        does not differentiate (the volume gradient is written in the linear layout), else 0."""
        if gvol is not None or math.prod(rays.grid) < self.brick_min_voxels:
            return 0
        return self.brick_shift

    @staticmethod
    def _arguments(rays, vol, M, dM, g, out, gvol, gM, brick_shift: int = 0, order=None):
        """The kernels' common parameter list (prost.cu, ``PROST_PARAMS``); ``order`` a
        :class:`_FixedOrder` for a fixed-order launch."""
        dirs = rays.directions.to(vol.dtype).contiguous()
        lengths = rays.lengths.to(vol.dtype).contiguous()
        pointers = (vol, M, dM, dirs, lengths, g, out, gvol, gM)
        ints = (
            M.shape[0], dirs.shape[0], vol.shape[1], int(vol.shape[0] > 1), *rays.grid,
        )
        reals = (*(1.0 / s for s in rays.spacing), *rays.half_support, rays.step)
        flags = (int(gvol is not None), int(gM is not None), int(brick_shift))
        slots, copy, fixed = (0, 0, 0.0) if order is None else order.flags()
        return (
            [("ptr", t) for t in pointers]
            + [("int", int(n)) for n in ints]
            + [("real", float(x)) for x in reals]
            + [("int", f) for f in flags]
            + [("int", slots), ("long", copy), ("real", fixed)]
        )

    def _launch(self, kernel: str, grid, block, args, like: torch.Tensor,
                fixed_order: bool = False) -> None:
        """Run ``kernel``; ``fixed_order``: deal blocks to host workers in a fixed round robin."""
        raise NotImplementedError


class _FixedOrder:
    """The buffers of a fixed-order launch and the fixed-order sums that finish it.

    Pose gradient: slots (B, S, 12), one per 32 rays, summed by :func:`tree_sum`. Volume
    gradient: ``copies`` private copies summed in worker order (``volume_order="copies"``), or an
    int64 fixed-point array (``"fixed"``) whose scale puts :func:`volume_gradient_bound` at
    ``2^62`` units at most. Where that bound is not finite (NaN or inf in ``g`` or ``dM``) the
    volume gradient falls back to atomics: it is not finite either.
    """

    def __init__(self, backend, grid, rays, M, dM, g, gvol, gM):
        self.gvol, self.gM = gvol, gM
        self.gvol_target, self.gM_target = gvol, gM
        self.copies, self.scale = 0, 0.0
        if gM is not None:
            slots = grid[0] * BLOCK // SLOT_RAYS
            self.gM_target = gM.new_zeros(gM.shape[0], slots, 12)
        if gvol is None:
            return
        if backend.volume_order == "copies":
            self.copies = max(1, int(backend._workers()))
            if self.copies > 1:
                self.gvol_target = gvol.new_zeros(self.copies, *gvol.shape)
            return
        bound = volume_gradient_bound(rays, M, dM, g)
        if math.isfinite(bound):
            exponent = FIXED_POINT_BITS - math.ceil(math.log2(bound)) if bound > 0 else 0
            self.scale = 2.0 ** max(-1000, min(1000, exponent))
            self.gvol_target = torch.zeros(gvol.shape, dtype=torch.int64, device=gvol.device)

    def flags(self) -> tuple[int, int, float]:
        """The kernels' ``pose_slots``, ``gvol_copy`` and ``gvol_fixed`` arguments."""
        copy = self.gvol.numel() if self.copies else 0
        return int(self.gM is not None), copy, self.scale

    def finish(self) -> None:
        """Sum the slots into gM and the copies (or fixed-point units) into gvol."""
        if self.gM is not None:
            self.gM.copy_(tree_sum(self.gM_target).view(self.gM.shape))
        if self.gvol is None or self.gvol_target is self.gvol:
            return
        if self.scale:
            self.gvol.copy_(self.gvol_target.to(torch.float64) / self.scale)
            return
        copies = self.gvol_target  # summed in worker order: ((c0 + c1) + c2) + ...
        torch.add(copies[0], copies[1], out=self.gvol)
        for copy in copies[2:]:
            self.gvol += copy


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` (B, S, ...) over dim 1 in a fixed pairwise tree: the first half plus the
    second, until one is left (an odd one out waits a level). Each level is an elementwise add,
    so the order of the additions depends only on S."""
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        head = x[:, :half] + x[:, half:2 * half]
        x = torch.cat((head, x[:, 2 * half:]), 1) if x.shape[1] % 2 else head
    return x[:, 0]


def volume_gradient_bound(rays: RayBundle, M, dM, g) -> float:
    """A bound on any voxel's volume gradient in a vjp (``dM`` None) or jvp_vjp launch.

    A sample adds ``s g w`` to each corner of its cell, with ``|w| <= 1`` (vjp) or
    ``|w| <= |dq|_1 <= sum_a (|dM_a3| + L |dM_a,:3|_1) / s_a`` (jvp_vjp, ``L`` the longest ray);
    a ray has at most ``2 sqrt(3) max(s_a) / step + 1`` samples whose cell holds a given voxel.
    """
    step = float(rays.step)
    per_ray = step * (2.0 * math.sqrt(3.0) * max(rays.spacing) / step + 1.0)
    mass = g.detach().abs().to(torch.float64).sum(dim=(1, 2))  # (B,)
    if dM is not None:
        dm = dM.detach().abs().to(torch.float64)
        longest = float(rays.lengths.abs().max()) if rays.lengths.numel() else 0.0
        inv_s = torch.tensor([1.0 / s for s in rays.spacing], dtype=torch.float64,
                             device=dm.device)
        rate = ((dm[:, :, 3] + longest * dm[:, :, :3].sum(2)) * inv_s).sum(1)  # (B,)
        mass = mass * rate
    return float(mass.sum()) * per_ray


def _zeros(like: torch.Tensor) -> torch.Tensor:
    """A contiguous zero tensor shaped like ``like`` (the kernels accumulate into it)."""
    return torch.zeros(like.shape, dtype=like.dtype, device=like.device)


def _prepared(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` detached and contiguous (DLPack refuses tensors that require grad)."""
    if t is None:
        return None
    return t.detach().contiguous()


def _check(rays: RayBundle, vol, M, dM, g) -> None:
    """Shapes, dtypes and devices the kernels rely on, with errors that name what was expected."""
    if vol.dim() != 5:
        raise ProstlabError(f"volume: expected shape (Bv, C, D, H, W), got {tuple(vol.shape)}")
    if vol.dtype not in (torch.float32, torch.float64):
        raise ProstlabError(f"volume: expected float32 or float64, got {vol.dtype}")
    if tuple(vol.shape[2:]) != tuple(rays.grid):
        raise ProstlabError(
            f"volume: grid {tuple(vol.shape[2:])} does not match the rays' grid {rays.grid}"
        )
    if math.prod(rays.grid) >= 2**31:
        raise ProstlabError(f"volume: expected fewer than 2^31 voxels per channel, got {rays.grid}")
    batch = M.shape[0]
    if M.dim() != 3 or tuple(M.shape[1:]) != (3, 4):
        raise ProstlabError(f"M: expected shape (B, 3, 4), got {tuple(M.shape)}")
    if vol.shape[0] not in (1, batch):
        raise ProstlabError(f"volume: batch of {vol.shape[0]} for {batch} poses (expected 1 or B)")
    if dM is not None and dM.shape != M.shape:
        raise ProstlabError(f"dM: expected shape {tuple(M.shape)}, got {tuple(dM.shape)}")
    image = (batch, vol.shape[1], rays.directions.shape[0])
    if g is not None and tuple(g.shape) != image:
        raise ProstlabError(f"g: expected shape {image}, got {tuple(g.shape)}")
    for name, t in (("M", M), ("dM", dM), ("g", g)):
        if t is not None and (t.dtype != vol.dtype or t.device != vol.device):
            raise ProstlabError(
                f"{name}: expected {vol.dtype} on {vol.device} like the volume, "
                f"got {t.dtype} on {t.device}"
            )
    if rays.directions.device != vol.device:
        raise ProstlabError(
            f"rays: expected directions on {vol.device}, got {rays.directions.device}"
        )


class CupyBackend(KernelBackend):
    """prost.cu's kernels compiled by NVRTC (CuPy ``RawModule``) and run on CUDA tensors.

    Modules are compiled lazily, once per (device index, compile options) and process; CuPy's
    own disk cache keeps the binaries between processes. float32 and float64 have their own
    kernels in the module (``prost_<primitive>_f32 | _f64``).

    Args:
        options: NVRTC options. No fast-math by default: the images must match the torch backend
            to 1e-4 in float32.
    """

    name = "cupy"
    _modules: dict = {}  # (device index, options) -> cupy.RawModule, shared by all instances
    _functions: dict = {}  # (device index, options, kernel name) -> cupy.RawKernel
    _lock = threading.Lock()

    def __init__(self, options: tuple[str, ...] = ("--std=c++17",),
                 deterministic: bool | None = None):
        self.options = tuple(options)
        self._deterministic = deterministic

    @property
    def deterministic(self) -> bool:
        """Fixed-order sums (pose slots, fixed-point volume gradient) instead of atomics: as
        given to the constructor, else :func:`deterministic_requested` at each launch."""
        if self._deterministic is not None:
            return self._deterministic
        return deterministic_requested()

    def _function(self, kernel: str, device_index: int):
        """Kernel ``kernel`` (its name says the dtype) for ``device_index``; compiles on first use.

        Call with ``device_index`` the current CuPy device.
        """
        import cupy

        key = (device_index, self.options, kernel)
        with self._lock:
            function = self._functions.get(key)
            if function is None:
                module = self._modules.get(key[:2])
                if module is None:
                    module = cupy.RawModule(code=kernel_source(), options=self.options)
                    self._modules[key[:2]] = module
                function = self._functions[key] = module.get_function(kernel)
        return function

    def _launch(self, kernel, grid, block, args, like, fixed_order=False):
        if like.device.type != "cuda":
            raise ProstlabError(f"backend='cupy' needs CUDA tensors; got tensors on {like.device}")
        try:
            import cupy
        except ImportError as error:
            raise ProstlabError("backend='cupy' needs CuPy: pip install 'prostlab[gpu]'") from error
        import numpy

        index = like.device.index if like.device.index is not None else torch.cuda.current_device()
        real = numpy.float32 if like.dtype == torch.float32 else numpy.float64
        with cupy.cuda.Device(index):
            function = self._function(kernel, index)
            stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(like.device).cuda_stream)
            with stream:
                values = []
                for kind, value in args:
                    if kind == "ptr":
                        values.append(None if value is None else cupy.from_dlpack(value))
                    elif kind == "int":
                        values.append(numpy.int32(value))
                    elif kind == "long":
                        values.append(numpy.int64(value))
                    else:
                        values.append(real(value))
                function(grid, block, tuple(values), stream=stream)
