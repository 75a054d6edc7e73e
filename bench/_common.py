"""Shared helpers for the benchmarks in bench/: timing, peak memory, machine facts, tables.

Nothing here imports torch, so a benchmark can use it before choosing a device. For GPU timing,
pass ``sync=torch.cuda.synchronize`` to :func:`time_call` so that each repeat waits for its kernels.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------- timing
def time_call(fn: Callable[[], object], warmup: int = 1, repeats: int = 5,
              sync: Callable[[], None] | None = None) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones.

    ``time.perf_counter`` around each call; ``sync`` (e.g. ``torch.cuda.synchronize``) runs before
    the clock starts and before it stops, so asynchronous work is counted in its own repeat.
    """
    return measure_call(fn, warmup, repeats, sync)["wall_ms"]


def measure_call(fn: Callable[[], object], warmup: int = 1, repeats: int = 5,
                 sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Like :func:`time_call`, with this process's CPU time of each call beside its wall time.

    ``{"wall_ms": [...], "cpu_ms": [...]}``. CPU time (``time.process_time``, all threads) is
    what the call cost this process; on a machine shared with other jobs it is far steadier than
    wall time, which also counts the time the call waited for a core.
    """
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        if sync is not None:
            sync()
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return {"wall_ms": wall, "cpu_ms": cpu}


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, or '?' where the OS does not say."""
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# --------------------------------------------------------------------------------- peak memory
class PeakRSS:
    """Peak resident memory of this process above a baseline, in bytes (CPU benchmarks).

    ``start()`` records the current RSS as the baseline and resets the kernel's high-water mark
    (``VmHWM``, by writing 5 to /proc/self/clear_refs, Linux >= 4.0), so a transient peak during
    set-up does not hide the peak of the measured calls; ``peak()`` is then VmHWM minus the
    baseline: the most memory the calls held at once beyond what was resident before them (their
    temporaries, autograd's saved tensors, the gradients they return, allocator overhead).

    Where the reset is impossible it falls back to ``getrusage(RUSAGE_SELF).ru_maxrss`` minus the
    baseline, which is only honest if nothing before ``start()`` peaked higher: ``exact`` says
    which of the two was used. Run each measured case in a fresh process (see
    :func:`run_worker`), since a process's high-water mark only grows.
    """

    def __init__(self):
        self.baseline = 0
        self.exact = False

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            text = Path("/proc/self/status").read_text()
        except OSError:
            return None
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
        return int(match.group(1)) * 1024 if match else None

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.exact = self._status("VmHWM") is not None
        except OSError:
            self.exact = False
        current = self._status("VmRSS")
        if current is None:  # not Linux: the best we have is the running maximum
            current = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
                1 if sys.platform == "darwin" else 1024)
        self.baseline = current

    def peak(self) -> int:
        if self.exact:
            high = self._status("VmHWM")
        else:
            high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
                1 if sys.platform == "darwin" else 1024)
        return max(0, high - self.baseline)


# ------------------------------------------------------------------------------- subprocesses
def run_worker(args: Sequence[str], timeout: float | None = None) -> dict:
    """Run ``python <args>`` in a fresh process and return the JSON object on its last line.

    A crash, a timeout or a missing JSON line comes back as ``{"error": "..."}``.
    """
    try:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode < 0:
        why = " (out of memory?)" if proc.returncode == -9 else ""
        return {"error": f"killed by signal {-proc.returncode}{why}"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


# ------------------------------------------------------------------------------ machine facts
def _run(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    for line in _run(["lscpu"]).splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def last_level_cache() -> str:
    """The largest CPU cache lscpu reports, e.g. "L3 cache: 32 MiB (1 instance)", or "?"."""
    caches = [" ".join(line.split()) for line in _run(["lscpu"]).splitlines()
              if re.match(r"\s*L\d\S* cache:", line)]
    return max(caches, key=lambda line: int(line[1]), default="?")


def machine_facts() -> dict:
    """Date (UTC), CPU model, cores, git commit (with a '+dirty' mark), Python and torch."""
    import torch

    commit = _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cache": last_level_cache(),
        "torch_threads": torch.get_num_threads(),
        "commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------- tables
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    """A number for a table, or an em dash for a missing one."""
    if value is None:
        return "—"
    return f"{value:.{digits}f}{suffix}"
