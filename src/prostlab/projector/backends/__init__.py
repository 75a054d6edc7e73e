"""Projector backends: ``torch`` (reference, any device), ``cupy`` (fused CUDA kernels) and
``cpu`` (the same kernels compiled for the host with OpenMP).

A backend offers four primitives on a :class:`~prostlab.projector.rays.RayBundle`: ``forward``,
``vjp``, ``jvp`` and ``jvp_vjp`` (see ``torch_backend`` for their maths). ``auto`` picks CuPy for
CUDA tensors when it imports, ``cpu`` for CPU tensors when its kernels build (tried once per
process), and torch otherwise.
"""

from __future__ import annotations

import warnings

import torch

from prostlab.errors import ProstlabError
from prostlab.projector.backends.torch_backend import TorchBackend

BACKENDS = ("auto", "torch", "cupy", "cpu")

_warned_cpu_build = False


def cupy_available() -> bool:
    """Whether CuPy imports and sees a CUDA device."""
    try:
        import cupy
    except ImportError:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means "not available"
        return False


def _cpu_or_torch() -> str:
    """``"cpu"`` when its kernels build here, else ``"torch"`` (warning once if the build failed)."""
    global _warned_cpu_build
    from prostlab.projector.backends.cpu_kernels import cpu_build_error, cpu_kernels_available

    if cpu_kernels_available():
        return "cpu"
    error = cpu_build_error()
    if error is not None and not _warned_cpu_build:
        _warned_cpu_build = True
        first = str(error).splitlines()[0]
        warnings.warn(
            f"prostlab: cpu kernels unavailable, using the torch backend ({first})",
            RuntimeWarning,
            stacklevel=3,
        )
    return "torch"


def resolve_backend(name: str, device: torch.device, max_samples: int):
    """The backend object for ``name`` ("auto", "torch", "cupy" or "cpu") on ``device``."""
    if name not in BACKENDS:
        raise ProstlabError(f"backend: expected one of {BACKENDS}, got {name!r}")
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            name = "cupy" if cupy_available() else "torch"
        else:
            name = _cpu_or_torch() if device.type == "cpu" else "torch"
    if name == "torch":
        return TorchBackend(max_samples=max_samples)
    if name == "cpu":
        if device.type != "cpu":
            raise ProstlabError(f"backend='cpu' needs CPU tensors; got tensors on {device}")
        from prostlab.projector.backends.cpu_kernels import cpu_backend

        return cpu_backend()
    if device.type != "cuda":
        raise ProstlabError(f"backend='cupy' needs CUDA tensors; got tensors on {device}")
    if not cupy_available():
        raise ProstlabError(
            "backend='cupy' needs CuPy and a CUDA device: pip install 'prostlab[gpu]'"
        )
    from prostlab.projector.backends.cupy_backend import CupyBackend

    return CupyBackend()
