"""Projector backends: ``torch`` (reference, any device) and ``cupy`` (fused CUDA kernels).

A backend offers four primitives on a :class:`~prostlab.projector.rays.RayBundle`: ``forward``,
``vjp``, ``jvp`` and ``jvp_vjp`` (see ``torch_backend`` for their maths). ``auto`` picks CuPy for
CUDA tensors when it imports, and torch otherwise.
"""

from __future__ import annotations

import torch

from prostlab.errors import ProstlabError
from prostlab.projector.backends.torch_backend import TorchBackend

BACKENDS = ("auto", "torch", "cupy")


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


def resolve_backend(name: str, device: torch.device, max_samples: int):
    """The backend object for ``name`` ("auto", "torch" or "cupy") on ``device``."""
    if name not in BACKENDS:
        raise ProstlabError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name == "auto":
        name = "cupy" if device.type == "cuda" and cupy_available() else "torch"
    if name == "torch":
        return TorchBackend(max_samples=max_samples)
    if device.type != "cuda":
        raise ProstlabError(f"backend='cupy' needs CUDA tensors; got tensors on {device}")
    if not cupy_available():
        raise ProstlabError(
            "backend='cupy' needs CuPy and a CUDA device: pip install 'prostlab[gpu]'"
        )
    from prostlab.projector.backends.cupy_backend import CupyBackend

    return CupyBackend()
