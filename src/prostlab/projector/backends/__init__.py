"""Projector backends: ``torch`` (reference, any device), ``cupy`` (fused CUDA kernels) and
``cpu`` (the same kernels compiled for the host with OpenMP).

A backend offers four primitives on a :class:`~prostlab.projector.rays.RayBundle`: ``forward``,
``vjp``, ``jvp`` and ``jvp_vjp`` (see ``torch_backend`` for their maths). ``auto`` picks CuPy for
CUDA tensors when it imports, ``cpu`` for CPU tensors when its kernels build (tried once per
process), and torch otherwise. When ``auto`` falls back from ``cpu`` to torch, the first render
says so once, in a ``RuntimeWarning``: which compiler was missing (or the build's first error)
and what the fallback costs.
"""

from __future__ import annotations

import os
import warnings

import torch

from prostlab.backend_names import BACKENDS
from prostlab.errors import ProstlabError
from prostlab.projector.backends.torch_backend import TorchBackend

_warned_cpu_build = False

FALLBACK_COST = (
    "a forward+backward render took 2.9x as long with it (330 ms against 113 ms: a 128^2 DRR "
    "of a 512 x 512 x 133 CT, 2 threads; bench/RESULTS.md, 'Projector on real-size CTs, CPU', "
    "2026-12-04)"
)
"""What falling back from ``cpu`` to torch costs, as measured; the warning quotes it."""


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
    """``"cpu"`` when its kernels build here, else ``"torch"`` (warning once, see module doc)."""
    global _warned_cpu_build
    from prostlab.projector.backends.cpu_kernels import cpu_build_error, cpu_kernels_available

    if cpu_kernels_available():
        return "cpu"
    if not _warned_cpu_build:
        _warned_cpu_build = True
        warnings.warn(cpu_fallback_message(cpu_build_error()), RuntimeWarning, stacklevel=3)
    return "torch"


def cpu_fallback_message(error: Exception | None) -> str:
    """Why ``auto`` renders CPU tensors with torch, what it costs, and how to undo it.

    ``error`` is the failed build's error (its first line is quoted), or None when no compiler
    was found: then the message lists what ``host_emulation.compiler()`` looked for, ``$CXX``
    (with its value), then ``g++`` and ``c++`` on the PATH.
    """
    if error is not None:
        why = str(error).splitlines()[0] if str(error) else type(error).__name__
    else:
        cxx = os.environ.get("CXX")
        why = ("no C++ compiler: " + (f"$CXX={cxx!r} is not on the PATH" if cxx
                                      else "$CXX is not set")
               + ", and neither g++ nor c++ is on the PATH")
    return (
        f"prostlab: backend='auto' renders CPU tensors with the torch backend, because the "
        f"compiled 'cpu' backend could not be built ({why}). The torch backend is slower: "
        f"{FALLBACK_COST}. Install g++ (or set $CXX to a C++ compiler with OpenMP) to use the "
        f"'cpu' backend; backend='torch' picks torch without this warning."
    )


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
