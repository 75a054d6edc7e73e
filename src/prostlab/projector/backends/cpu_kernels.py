"""The ``cpu`` backend: prost.cu's kernels compiled for the host with OpenMP.

The kernels of the CUDA backend, built by g++ through the host-emulation header
(``kernels/emulation/cuda_host.h``) with ``-O3 -fopenmp``: a launch runs its 128-ray blocks in
parallel on ``torch.get_num_threads()`` threads. Same four primitives, arguments and results (to
rounding) as the torch reference, on CPU tensors, without anything of size rays x samples in
memory. On a CPU with AVX2, the float32 passes walk eight neighbouring rays at once in vector
lanes (``kernels/emulation/lanes.h``), each lane with the scalar kernel's arithmetic in its
order, 2-4x faster (bench/RESULTS.md): images and pose gradients have the same bits; a volume
gradient, scattered from the lanes ray after ray at each sample, has the same terms added to a
voxel in another order (equal to rounding).

Its sums across threads are done in a fixed order (prost_common.cuh, "the reductions"), so that
the same inputs on the same number of threads give the same bits: the pose gradient in slots of
32 rays that one thread walks in order, summed in a fixed tree; the volume gradient in one
private copy per thread, the blocks dealt to the threads round robin, the copies summed in
thread order. The thread count may change the volume gradient's last bits; nothing else does.

The library is built once per process on first use, into the host emulation's cache
(``$PROSTLAB_CACHE``, default ``~/.cache/prostlab``), keyed by the sources and the flags.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch

from prostlab.errors import ProstlabError
from prostlab.projector.backends.host_emulation import HostKernelBackend, compiler

_lock = threading.Lock()
_available: bool | None = None
_build_error: ProstlabError | None = None
_backend: CpuKernelBackend | None = None


class CpuKernelBackend(HostKernelBackend):
    """The four primitives by prost.cu's kernels on the CPU, blocks of rays run by OpenMP.

    Results agree with the torch backend to rounding, and repeat bit for bit on the same number
    of threads (fixed-order sums, see the module docstring).

    Raises:
        ProstlabError: no C++ compiler, or the kernels do not compile (the compiler's first error).
    """

    name = "cpu"
    variant = "cpu"
    brick_shift = 3  # 8^3 bricks of 2 KiB (float32): bench/RESULTS.md, "real-size CTs"
    layout_trials = 2  # bricks or linear, whichever is faster here (bricks.LayoutChoice)
    tile_rays = True

    def __init__(self, directory: Path | None = None, sources: Path | None = None):
        super().__init__(directory, deterministic=True, sources=sources)
        self._library.prost_host_set_threads.restype = None
        self._library.prost_host_set_threads.argtypes = [ctypes.c_int]

    def _workers(self) -> int:
        return torch.get_num_threads()

    def _prepare_launch(self) -> None:
        self.set_threads(torch.get_num_threads())

    def set_threads(self, n: int) -> None:
        """Threads per launch (``n <= 0``: OpenMP's default); the backend resets it per launch."""
        self._library.prost_host_set_threads(int(n))


def cpu_backend() -> CpuKernelBackend:
    """The process's :class:`CpuKernelBackend` (built and loaded on the first call)."""
    global _backend
    with _lock:
        if _backend is None:
            _backend = CpuKernelBackend()
        return _backend


def cpu_kernels_available() -> bool:
    """Whether the ``cpu`` backend builds here (tried once per process; the build is cached).

    False without a C++ compiler, or when the build fails (:func:`cpu_build_error` says why).
    """
    global _available, _build_error, _backend
    with _lock:
        if _available is None:
            if compiler() is None:
                _available = False
            else:
                try:
                    _backend = _backend or CpuKernelBackend()
                    _available = True
                except (ProstlabError, OSError) as error:  # OSError: the library did not load
                    _available, _build_error = False, ProstlabError(str(error))
        return _available


def cpu_build_error() -> ProstlabError | None:
    """The error of a failed build by :func:`cpu_kernels_available`, else None."""
    return _build_error
