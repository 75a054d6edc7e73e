"""The facts that decide whether a run's numbers can be reproduced bit for bit.

A registration is a long chain of gradient steps, so a difference of one rounding grows into a
different final pose. With the same seed, config and inputs, the numbers are the same when these
are the same too: the projector backend and whether its sums run in a fixed order, the number of
CPU threads (the ``cpu`` backend's volume gradient and torch's own CPU kernels split their sums
by thread), the devices, and the versions of the code and of the libraries that do arithmetic.
``prostlab test`` writes them into ``summary.json`` and ``prostlab register`` into ``pose.json``.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from prostlab.projector.backends import resolve_backend


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str | None:
    """The git commit of the source tree prostlab runs from (``+dirty`` if edited), else None."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def reproducibility_facts(backend: str, device: torch.device | str = "cpu",
                          seed: int | None = None) -> dict[str, Any]:
    """What a rerun must match to give the same bits (module docstring).

    Args:
        backend: the projector's ``backend`` setting ("auto" is resolved here, for ``device``).
        device: the device the projector runs on.
        seed: the data seed, if any.

    Returns:
        ``{"backend", "deterministic", "torch_threads", "device", "seed", "cpu", "versions"}``:
        ``deterministic`` says whether the projector's gradients are summed in a fixed order (the
        ``cpu`` backend always; ``cupy`` in its deterministic mode; ``torch`` when torch's
        deterministic algorithms are on).
    """
    device = torch.device(device)
    resolved = resolve_backend(backend, device, 1 << 18)
    if resolved.name == "torch":
        deterministic = device.type == "cpu" or torch.are_deterministic_algorithms_enabled()
    else:
        deterministic = bool(getattr(resolved, "deterministic", False))
    versions = {"prostlab": _version("prostlab"), "commit": _commit(),
                "python": platform.python_version(), "torch": torch.__version__,
                "numpy": _version("numpy"), "cupy": _version("cupy") or _version("cupy-cuda12x")}
    return {
        "backend": resolved.name,
        "deterministic": deterministic,
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "seed": seed,
        "cpu": _cpu_model(),
        "versions": {k: v for k, v in versions.items() if v is not None},
    }
