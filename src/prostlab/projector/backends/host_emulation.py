"""The CUDA kernels' arithmetic on the CPU: prost.cu compiled as C++ with an emulation header.

``kernels/emulation/cuda_host.h`` turns the kernel sources into plain C++ (a launch becomes loops
over blocks and threads, ``atomicAdd`` a plain add, the warp one thread wide), so that g++ builds
a shared library from the very ``.cu`` files that CuPy compiles for the GPU. The
:class:`HostKernelBackend` calls it through ``ctypes`` with the same argument list as
:class:`~prostlab.projector.backends.cupy_backend.CupyBackend`, on CPU tensors, which lets the
tests compare the kernels with the torch backend, and run gradcheck / gradgradcheck through them,
on a machine without a GPU. It is slow (one thread at a time) and meant for tests and checks.
The same builder makes the OpenMP build behind the ``cpu`` backend
(:mod:`~prostlab.projector.backends.cpu_kernels`, :data:`VARIANTS`).

The library is cached under ``$PROSTLAB_CACHE`` (default ``~/.cache/prostlab``), keyed by a hash of
the sources and the compiler command, and for a ``-march=native`` build the CPU
(:func:`library_path`).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from prostlab.errors import ProstlabError
from prostlab.projector.backends.cupy_backend import KernelBackend

SOURCES = ("prost.cu", "prost_common.cuh", "emulation/cuda_host.h", "emulation/lanes.h")
"""The kernel files the host library is built from (relative to ``prostlab.kernels``)."""

CXXFLAGS = (
    "-x", "c++", "-std=c++17", "-O2", "-shared", "-fPIC", "-ffp-contract=off",
    "-Wall", "-Wextra", "-Wno-unknown-pragmas",
)
"""g++ flags: no FMA contraction, so that the host arithmetic rounds like the torch reference."""

VARIANTS = {
    "emulation": CXXFLAGS,
    "cpu": (
        "-x", "c++", "-std=c++17", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC",
        "-ffp-contract=off", "-DPROST_HOST_LANES",
        "-Wall", "-Wextra", "-Wno-unknown-pragmas",
    ),
}
"""The two builds of prost.cu: ``emulation`` (single-threaded, one ray at a time, for the tests)
and ``cpu`` (blocks run in parallel with OpenMP, and eight rays per call in vector lanes where
the CPU has AVX2: :mod:`~prostlab.projector.backends.cpu_kernels`). Both keep IEEE arithmetic
without FMA contraction, so the lanes give the emulation's bits."""

_lock = threading.Lock()
_libraries: dict[Path, ctypes.CDLL] = {}


def cache_dir() -> Path:
    """Where built libraries go: ``$PROSTLAB_CACHE``, else ``$XDG_CACHE_HOME/prostlab``."""
    if os.environ.get("PROSTLAB_CACHE"):
        return Path(os.environ["PROSTLAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prostlab"


def host_cpu() -> str:
    """This CPU's model and instruction-set flags (``/proc/cpuinfo``, else ``platform``).

    A library built with ``-march=native`` runs only on CPUs with the same instructions, so it is
    keyed by this string too: a cache shared between machines keeps one build per CPU.
    """
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return f"{fields.get('model name', platform.machine())} {fields.get('flags', '')}"


def compiler() -> str | None:
    """The C++ compiler to use (``$CXX``, else g++ or c++ on the PATH), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _kernel_root(sources: Path | None):
    """The folder of the kernel sources: ``sources``, else the package's ``prostlab.kernels``."""
    return Path(sources) if sources is not None else importlib.resources.files("prostlab.kernels")


def library_path(variant: str = "emulation", directory: Path | None = None,
                 sources: Path | None = None) -> Path:
    """Where the library of ``variant`` is cached: a name keyed by a SHA-256 of the compiler
    command, the kernel sources and, for a ``-march=native`` build, :func:`host_cpu`.
    ``sources``: another folder laid out as ``kernels/`` (an older version, for benchmarks that
    compare builds); files of :data:`SOURCES` it lacks are left out.

    Raises:
        ProstlabError: no C++ compiler.
    """
    flags = VARIANTS[variant]
    cxx = compiler()
    if cxx is None:
        raise ProstlabError(f"{variant} kernels: expected a C++ compiler (g++ or $CXX) on the PATH")
    digest = hashlib.sha256(" ".join((cxx, *flags)).encode())
    if "-march=native" in flags:
        digest.update(host_cpu().encode())
    root = _kernel_root(sources)
    for name in SOURCES:
        if root.joinpath(name).is_file():
            digest.update(root.joinpath(name).read_bytes())
    directory = Path(directory) if directory is not None else cache_dir()
    prefix = "prost_host" if variant == "emulation" else f"prost_{variant}"
    return directory / f"{prefix}_{digest.hexdigest()[:16]}.so"


def build_host_library(directory: Path | None = None, variant: str = "emulation",
                       sources: Path | None = None) -> Path:
    """Compile prost.cu for the host (once per :func:`library_path`) and return the library.

    ``variant`` picks the flags (:data:`VARIANTS`), ``sources`` the kernels (:func:`library_path`).

    Raises:
        ProstlabError: no C++ compiler, or the sources do not compile (the message's first line
            quotes the compiler's first error; the full log follows).
    """
    library = library_path(variant, directory, sources)
    if library.is_file():
        return library
    flags, cxx = VARIANTS[variant], compiler()
    root = _kernel_root(sources)
    with importlib.resources.as_file(root) as kernels:
        kernels = Path(kernels)
        directory = library.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        command = [cxx, *flags, "-include", str(kernels / "emulation" / "cuda_host.h"),
                   str(kernels / "prost.cu"), "-o", partial]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            os.unlink(partial)
            log = result.stderr.strip()
            lines = log.splitlines() or ["(no output)"]
            first = next((line for line in lines if "error" in line), lines[0])
            raise ProstlabError(
                f"{variant} kernels: {os.path.basename(cxx)} failed to compile prost.cu: "
                f"{first}\n{' '.join(command)}\n{log}"
            )
        os.replace(partial, library)  # atomic: concurrent builders agree on the result
    return library


def load_host_library(directory: Path | None = None, variant: str = "emulation",
                      sources: Path | None = None) -> ctypes.CDLL:
    """The host library of ``variant``, built if needed and loaded once per process."""
    path = build_host_library(directory, variant, sources)
    with _lock:
        if path not in _libraries:
            _libraries[path] = ctypes.CDLL(str(path))
        return _libraries[path]


class HostKernelBackend(KernelBackend):
    """The four primitives computed by prost.cu's kernels emulated on the CPU (CPU tensors).

    Same arguments, shapes and results as the CUDA backend; summation orders differ (the
    emulation adds pose gradients ray by ray, the GPU warp by warp), so results agree to
    rounding, not bit for bit. ``deterministic`` runs the fixed-order reductions
    (prost_common.cuh, "the reductions"); ``volume_order`` picks how (``"copies"``, the cpu
    backend's, or ``"fixed"``, the GPU's), so that the tests can run the GPU's arithmetic here.
    """

    name = "host"
    variant = "emulation"
    volume_order = "copies"

    def __init__(self, directory: Path | None = None, deterministic: bool = False,
                 sources: Path | None = None):
        self._library = load_host_library(directory, self.variant, sources)
        self._entries: dict[str, ctypes._CFuncPtr] = {}
        self._library.prost_host_set_fixed_order.restype = None
        self._library.prost_host_set_fixed_order.argtypes = [ctypes.c_int]
        self._deterministic = deterministic

    @property
    def deterministic(self) -> bool:
        return self._deterministic

    def _entry(self, kernel: str):
        entry = self._entries.get(kernel)
        if entry is None:
            entry = getattr(self._library, f"{kernel}_host")
            entry.restype = None
            entry.argtypes = [ctypes.c_uint] * 6 + [ctypes.POINTER(ctypes.c_void_p)]
            self._entries[kernel] = entry
        return entry

    def _prepare_launch(self) -> None:
        """Hook run before each launch (the cpu backend sets its thread count here)."""

    def _launch(self, kernel, grid, block, args, like, fixed_order=False):
        if like.device.type != "cpu":
            raise ProstlabError(f"backend={self.name!r}: expected CPU tensors, got {like.device}")
        real = ctypes.c_float if like.dtype == torch.float32 else ctypes.c_double
        values = []
        for kind, value in args:
            if kind == "ptr":
                values.append(ctypes.c_void_p(None if value is None else value.data_ptr()))
            elif kind == "int":
                values.append(ctypes.c_int(value))
            elif kind == "long":
                values.append(ctypes.c_longlong(value))
            else:
                values.append(real(value))
        pointers = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        entry = self._entry(kernel)
        self._prepare_launch()
        self._library.prost_host_set_fixed_order(int(fixed_order))
        entry(*grid, *block, pointers)  # ctypes releases the GIL for the call
