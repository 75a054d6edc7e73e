"""The benchmark's per-case rows: their schema, their validation and their CSV file.

A *row* is one registration: one case (a ground-truth pose, its target DRR and an initial pose)
registered by one method. The test loop produces a list of rows; everything in
:mod:`prostlab.benchmark` and :mod:`prostlab.viz.report` reads that list. Definitions of the
columns are in ``docs/benchmark.md``.
"""

from __future__ import annotations

import csv
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prostlab.errors import ProstlabError
from prostlab.outputs import atomic_path

__all__ = [
    "LANDMARK_FIELDS",
    "ROW_FIELDS",
    "STATUSES",
    "columns",
    "is_failed",
    "methods_in_order",
    "validate_rows",
    "write_cases_csv",
]

ROW_FIELDS = (
    "case",
    "volume_index",
    "method",
    "initial_rotation_error_deg",
    "initial_translation_error_mm",
    "initial_mtre_mm",
    "final_rotation_error_deg",
    "final_translation_error_mm",
    "final_mtre_mm",
    "final_mpd_mm",
    "iterations",
    "switch_iteration",
    "seconds",
    "status",
    "success",
)
"""The keys of a row, in the column order of ``cases.csv``."""

LANDMARK_FIELDS = (
    "initial_landmark_mtre_mm",
    "final_landmark_mtre_mm",
    "final_landmark_mrpd_mm",
    "initial_diffpose_mtre",
    "final_diffpose_mtre",
)
"""Optional keys, present when the cases have 3D landmarks (DeepFluoro): prostlab's own 3D mTRE
over them (initial, final), prostlab's own 2D mean reprojection distance on the detector plane,
mm (:func:`prostlab.metrics.mean_projection_distance`), and DiffPose's ``Evaluator`` quantity,
initial and final (:func:`prostlab.metrics.diffpose_mtre`: 0.194 times a distance in mm, the
number DiffPose reports as mTRE). They follow :data:`ROW_FIELDS` in ``cases.csv`` when any row
has them."""

STATUSES = ("converged", "max_iterations", "failed")
"""The values of a row's ``status``."""

_INTS = ("case", "volume_index", "iterations", "switch_iteration")
_FLOATS = (
    "initial_rotation_error_deg",
    "initial_translation_error_mm",
    "initial_mtre_mm",
    "final_rotation_error_deg",
    "final_translation_error_mm",
    "final_mtre_mm",
    "final_mpd_mm",
    "seconds",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def validate_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Check a list of benchmark rows; return it as a list.

    Each row must be a mapping with every key of :data:`ROW_FIELDS` (extra keys are allowed and
    ignored): integers for ``case``, ``volume_index``, ``iterations`` and ``switch_iteration``
    (``>= -1``), real numbers (NaN allowed) for the errors and ``seconds``, a non-empty string for
    ``method``, one of :data:`STATUSES` for ``status`` and a bool for ``success``. A
    ``(case, method)`` pair may occur once. The :data:`LANDMARK_FIELDS`, where present, are real
    numbers (NaN allowed).

    Raises:
        ProstlabError: naming the row index and the key, and the expected form.
    """
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Sequence):
        raise ProstlabError(
            f"rows: expected a list of dicts with keys {', '.join(ROW_FIELDS)}, "
            f"got {type(rows).__name__}"
        )
    seen: dict[tuple[int, str], int] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ProstlabError(f"rows[{i}]: expected a dict, got {type(row).__name__}")
        missing = [key for key in ROW_FIELDS if key not in row]
        if missing:
            raise ProstlabError(
                f"rows[{i}]: missing key {missing[0]!r}"
                + (f" (and {', '.join(map(repr, missing[1:]))})" if len(missing) > 1 else "")
                + f"; a row needs {', '.join(ROW_FIELDS)}"
            )
        for key in _INTS:
            if not _is_int(row[key]):
                raise ProstlabError(f"rows[{i}].{key}: expected an integer, got {row[key]!r}")
        if row["switch_iteration"] < -1:
            raise ProstlabError(
                f"rows[{i}].switch_iteration: expected an iteration index >= 0, or -1 when the "
                f"schedule never switched, got {row['switch_iteration']}"
            )
        for key in _FLOATS + tuple(k for k in LANDMARK_FIELDS if k in row):
            if not _is_real(row[key]):
                raise ProstlabError(
                    f"rows[{i}].{key}: expected a real number (NaN allowed), got {row[key]!r}"
                )
        method = row["method"]
        if not isinstance(method, str) or not method:
            raise ProstlabError(f"rows[{i}].method: expected a non-empty string, got {method!r}")
        if row["status"] not in STATUSES:
            raise ProstlabError(
                f"rows[{i}].status: expected one of {STATUSES}, got {row['status']!r}"
            )
        if not isinstance(row["success"], (bool, np.bool_)):
            raise ProstlabError(f"rows[{i}].success: expected a bool, got {row['success']!r}")
        pair = (int(row["case"]), method)
        if pair in seen:
            raise ProstlabError(
                f"rows[{i}]: case {pair[0]} with method {method!r} already appears in "
                f"rows[{seen[pair]}]; expected one row per case and method"
            )
        seen[pair] = i
    return list(rows)


def methods_in_order(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The distinct ``method`` values in first-seen order."""
    return list(dict.fromkeys(row["method"] for row in rows))


def is_failed(row: Mapping[str, Any]) -> bool:
    """A failed case: status ``"failed"`` or a final mTRE that is not finite (NaN, inf)."""
    return row["status"] == "failed" or not math.isfinite(float(row["final_mtre_mm"]))


def _cell(value: Any) -> Any:
    """A CSV cell: plain Python numbers (``nan`` for NaN), ``True``/``False`` for bools."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if _is_int(value):
        return int(value)
    if _is_real(value):
        value = float(value)
        return "nan" if math.isnan(value) else value
    return value


def columns(rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """The columns of ``rows``: :data:`ROW_FIELDS`, then :data:`LANDMARK_FIELDS` when any row
    has them (NaN in the rows that do not)."""
    marked = any(key in row for row in rows for key in LANDMARK_FIELDS)
    return ROW_FIELDS + (LANDMARK_FIELDS if marked else ())


def write_cases_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write one CSV line per case and method, the :func:`columns` of the rows.

    Lines are sorted by case, then by the methods' first-seen order, so the same rows give the same
    file. NaN is written ``nan`` and bools ``True``/``False``: ``float(cell)`` and
    ``cell == "True"`` read them back. Parent directories are created; the file is written under
    a temporary name and moved into place (:func:`prostlab.outputs.atomic_path`).

    Returns:
        The path written.
    """
    rows = validate_rows(rows)
    order = {method: k for k, method in enumerate(methods_in_order(rows))}
    ordered = sorted(rows, key=lambda row: (int(row["case"]), order[row["method"]]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        fields = columns(rows)
        writer.writerow(fields)
        for row in ordered:
            writer.writerow([_cell(row.get(key, math.nan)) for key in fields])
    return path
