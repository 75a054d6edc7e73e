"""What the machine allows: torch devices that exist here, memory estimated before a job
allocates it, and the coarsest grids and finest spacings a job is given.

A job that would not fit is refused with its estimate and the limit, before it starts, rather
than failing in the allocator (a traceback, or the out-of-memory killer) part-way through:

* :func:`resolve_device` turns ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` into a
  :class:`torch.device` that this torch build can use.
* :func:`available_bytes` is the memory a new allocation can take now: on the CPU the smaller of
  Linux's ``MemAvailable`` and the control group's limit less its usage (where one is set); on a
  CUDA device the free memory ``torch.cuda.mem_get_info`` reports.
* :func:`check_memory` compares an estimate with :func:`available_bytes`.
* :func:`check_grid_side` and :func:`check_spacing_mm` refuse a detector or a cube below
  :data:`MIN_GRID_SIDE` samples a side, and pixels or voxels finer than :data:`MIN_SPACING_MM`:
  ``--size 1`` or ``--side-mm 0.001`` ran without a word and gave an image or a cube of nothing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from prostlab.errors import ProstlabError

DEVICES = "cpu, cuda, cuda:N or mps"

MIN_GRID_SIDE = 8
"""Fewest samples along a side of a grid that a command builds: a detector's rows and columns
(``render --height`` / ``--width`` or a config's camera, ``register --detector``) and a prepared
cube's voxels per edge (``prepare --size``). The coarsest in use are 16 (the tests) and 64 (a
registration detector); an image or a cube coarser than 8 shows no anatomy."""

SDD_RANGE_MM = (100.0, 3000.0)
"""Plausible source-to-detector distances: C-arms sit near 1000 mm, radiography stands up to
1800 mm (a chest film); a value outside is a wrong unit (cm, m) or a broken header. Every camera
a command builds is held to it: an X-ray's (``register``), ``render``'s and ``model.camera``."""

MIN_SPACING_MM = 0.01
"""Finest pixel or voxel, mm: a detector's pixel (``render`` and ``register --pixel-spacing``, a
config's camera) and a prepared cube's voxel (``prepare --side-mm`` over ``--size``). 10 um is
finer than any X-ray detector's pixel (70 um and up) or CT's voxel (0.3 mm and up in the clinic,
about 10 um in micro-CT): a finer one is a wrong unit or a slip of the keyboard."""


def resolve_device(name: str | torch.device, what: str = "device") -> torch.device:
    """The :class:`torch.device` ``name``, checked to exist in this torch build and machine.

    Raises ``ProstlabError`` for a string that is not a torch device, a CUDA device on a build
    without CUDA or a machine without a visible GPU, a CUDA index past the device count, MPS
    where it is unavailable, and other device types (``meta``, ``xpu``, ...).
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ProstlabError(f"{what} {name!r}: not a torch device; expected {DEVICES}") from exc
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA support"
                if torch.version.cuda is None
                else "no CUDA device is visible"
            )
            raise ProstlabError(f"{what} {name!r}: {why}; expected cpu")
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise ProstlabError(
                f"{what} {name!r}: this machine has {count} CUDA device(s); expected cuda:0 to "
                f"cuda:{count - 1}"
            )
        return device
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ProstlabError(f"{what} {name!r}: MPS is not available here; expected cpu")
        return device
    raise ProstlabError(f"{what} {name!r}: device type {device.type!r} is not supported; "
                        f"expected {DEVICES}")


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """Limit less usage of this process's cgroup (v2 or v1), or None where there is no limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return max(int(limit) - usage, 0)
    return None


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Bytes a new allocation on ``device`` can take now (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    known = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    if not known:  # not Linux: all physical memory
        try:
            known = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
        except (ValueError, OSError, AttributeError):
            return 1 << 62  # unknown: do not refuse
    return min(known)


def format_bytes(n: float) -> str:
    """``n`` bytes in B, kB, MB, GB, TB or PB (powers of 1000), three significant digits."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def check_memory(estimate: int, device: torch.device | str, what: str) -> None:
    """Refuse ``what`` when ``estimate`` bytes exceed :func:`available_bytes` on ``device``.

    The message gives the estimate, the limit and the device, and starts with ``what`` (the
    setting to change, e.g. ``"size 4096: a 4096^3 cube"``).
    """
    limit = available_bytes(device)
    if estimate > limit:
        raise ProstlabError(
            f"{what} needs about {format_bytes(estimate)} of memory, more than the "
            f"{format_bytes(limit)} available on {torch.device(device)}; expected a smaller job"
        )


def check_grid_side(sides: Sequence[int], what: str, unit: str) -> None:
    """Refuse a grid with fewer than :data:`MIN_GRID_SIDE` samples along any side.

    ``sides`` are the grid's sizes (``(rows, columns)`` of a detector, ``(size,)`` of a cube),
    ``what`` names the setting and its flags, ``unit`` the samples (``"pixels"``, ``"voxels"``).
    """
    if min(sides) < MIN_GRID_SIDE:
        raise ProstlabError(
            f"{what}: {' x '.join(str(side) for side in sides)}; expected at least "
            f"{MIN_GRID_SIDE} {unit} a side (a coarser grid shows no anatomy)"
        )


def check_sdd_mm(sdd: float, what: str) -> None:
    """Refuse a source-to-detector distance (mm) outside :data:`SDD_RANGE_MM`; ``what`` names
    the setting and its flags. ``render --sdd 1e9`` and ``model.camera.sdd: 1e9`` ran without a
    word, where ``register`` refuses such a camera."""
    low, high = SDD_RANGE_MM
    if not low <= sdd <= high:
        raise ProstlabError(
            f"{what}: {sdd:g} mm; expected the source-to-detector distance in mm within "
            f"[{low:g}, {high:g}] (a wrong unit?)"
        )


def check_spacing_mm(spacing: Sequence[float], what: str) -> None:
    """Refuse pixel or voxel sizes (mm) that are not finite or are finer than
    :data:`MIN_SPACING_MM`; ``what`` names the setting and its flags."""
    if not all(math.isfinite(value) and value >= MIN_SPACING_MM for value in spacing):
        raise ProstlabError(
            f"{what}: {', '.join(f'{value:.4g}' for value in spacing)} mm; expected at least "
            f"{MIN_SPACING_MM:g} mm (finer than any X-ray detector's pixel or CT's voxel: a "
            "wrong unit?)"
        )


__all__ = [
    "MIN_GRID_SIDE",
    "MIN_SPACING_MM",
    "SDD_RANGE_MM",
    "available_bytes",
    "check_grid_side",
    "check_memory",
    "check_sdd_mm",
    "check_spacing_mm",
    "format_bytes",
    "resolve_device",
]
