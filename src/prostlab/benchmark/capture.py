"""Success per initial-mTRE bin and the capture range, from benchmark rows.

A registration method's **capture range** is how far from the truth it may start and still
succeed reliably. Cases are binned by their initial mTRE ``m0`` into fixed bins (mm),

    [e_0, e_1), [e_1, e_2), ..., [e_{K-1}, e_K), [e_K, inf),

the last bin open. A bin with at least ``min_cases`` cases is **measured**; one with fewer says
too little and is passed over. The capture range is the upper edge ``e_k`` of the last measured
bin of the leading run of measured bins whose success rate is ``>= rate``:

    capture = max { e_(k+1) : bin k measured, and every measured bin j <= k has success >= rate }

It is 0 when the first measured bin already falls below ``rate``, ``None`` when no bin is
measured, and at most ``e_K``: the open bin has no upper edge, so a method that still succeeds
beyond ``e_K`` reports ``e_K``, the limit of the measurement. Bins passed over neither stop nor
extend the range, so a thin bin between two good ones does not cut it short, and a range never
ends on a bin that was not measured. Definitions and defaults: ``docs/benchmark.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from prostlab.benchmark.rows import is_failed
from prostlab.errors import ProstlabError

__all__ = [
    "DEFAULT_BINS_MM",
    "DEFAULT_CAPTURE_MIN_CASES",
    "DEFAULT_CAPTURE_RATE",
    "bin_edges",
    "bin_index",
    "bin_label",
    "capture_range",
    "success_by_bin",
]

DEFAULT_BINS_MM = (0.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 150.0)
"""Finite edges of the initial-mTRE bins, mm; an open bin ``>= 150`` follows the last."""
DEFAULT_CAPTURE_RATE = 0.9
"""Success rate a bin must reach to lie inside the capture range."""
DEFAULT_CAPTURE_MIN_CASES = 5
"""Cases a bin needs to count for (or against) the capture range."""


def bin_edges(edges: Sequence[float] = DEFAULT_BINS_MM, name: str = "bins_mm") -> np.ndarray:
    """``edges`` checked and returned as a float array: at least two finite, increasing mm values
    (the open bin past the last edge is implicit)."""
    try:
        array = np.asarray(edges, dtype=float)
    except (TypeError, ValueError):
        array = np.empty(0)
    if array.ndim != 1 or array.size < 2 or not np.all(np.isfinite(array)):
        raise ProstlabError(
            f"{name}: expected at least two finite bin edges in mm, e.g. [0, 10, 20, 40], "
            f"got {edges!r}"
        )
    if np.any(np.diff(array) <= 0):
        raise ProstlabError(f"{name}: expected increasing bin edges, got {array.tolist()}")
    return array


def bin_index(value: float, edges: np.ndarray) -> int | None:
    """The bin of ``value``: ``k`` for ``e_k <= value < e_(k+1)``, ``len(edges) - 1`` for the open
    bin ``value >= e_K``, ``None`` below ``e_0`` or when not finite."""
    if not math.isfinite(value) or value < edges[0]:
        return None
    return int(np.searchsorted(edges, value, side="right")) - 1


def bin_label(lo: float, hi: float | None) -> str:
    """``"20–40"`` for a closed bin, ``"≥150"`` for the open one (mm)."""
    return f"≥{lo:g}" if hi is None else f"{lo:g}–{hi:g}"


def success_by_bin(
    rows: Sequence[Mapping[str, Any]],
    threshold_mm: float,
    edges: Sequence[float] = DEFAULT_BINS_MM,
) -> list[dict[str, Any]]:
    """Success of ``rows`` (one method's, already validated) per initial-mTRE bin.

    Returns one dict per bin, the open one last: ``lo_mm``, ``hi_mm`` (``None`` for the open bin),
    ``n`` (cases), ``n_success`` (not failed and final mTRE ``< threshold_mm``) and
    ``success_rate`` (``n_success / n``, NaN when ``n == 0``). Rows below the first edge or with a
    non-finite initial mTRE fall in no bin.
    """
    array = bin_edges(edges)
    his = [*array[1:].tolist(), None]
    bins = [{"lo_mm": float(lo), "hi_mm": hi, "n": 0, "n_success": 0} for lo, hi in
            zip(array.tolist(), his, strict=True)]
    for row in rows:
        k = bin_index(float(row["initial_mtre_mm"]), array)
        if k is None:
            continue
        bins[k]["n"] += 1
        bins[k]["n_success"] += int(
            not is_failed(row) and float(row["final_mtre_mm"]) < threshold_mm
        )
    for b in bins:
        b["success_rate"] = b["n_success"] / b["n"] if b["n"] else math.nan
    return bins


def capture_range(
    bins: Sequence[Mapping[str, Any]],
    rate: float = DEFAULT_CAPTURE_RATE,
    min_cases: int = DEFAULT_CAPTURE_MIN_CASES,
) -> float | None:
    """The capture range (mm) of the bins of :func:`success_by_bin` (see the module docstring).

    Args:
        bins: per-bin counts, in order, the open bin last.
        rate: the success rate (a fraction) every measured bin inside the range reaches.
        min_cases: cases a bin needs to be measured.

    Returns:
        The upper edge of the last bin inside the range (the open bin counts with its lower edge),
        ``0.0`` when the first measured bin falls short, ``None`` when no bin is measured.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise ProstlabError(f"capture_rate: expected a success fraction in (0, 1], got {rate!r}")
    if isinstance(min_cases, bool) or not isinstance(min_cases, int) or min_cases < 1:
        raise ProstlabError(
            f"capture_min_cases: expected a positive number of cases, got {min_cases!r}"
        )
    reached: float | None = None
    for b in bins:
        if b["n"] < min_cases:
            continue
        if b["n_success"] < rate * b["n"] - 1e-9:  # tolerance: 0.9 * n in floating point
            return reached if reached is not None else 0.0
        reached = float(b["hi_mm"] if b["hi_mm"] is not None else b["lo_mm"])
    return reached
