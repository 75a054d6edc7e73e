"""Per-method summaries of benchmark rows: statistics, a markdown table, JSON and sentences.

:func:`summarise` turns the rows of :mod:`prostlab.benchmark.rows` into one dict of statistics per
method; :func:`markdown_table`, :func:`write_summary` and :func:`compare` present it. Definitions
are in ``docs/benchmark.md``. In short:

- a case **failed** when its status is ``"failed"`` or its final mTRE is not finite;
- it **succeeded** when it did not fail and its final mTRE is below ``threshold_mm``;
- the final-error statistics (median and mean mTRE, median rotation, translation error and mPD)
  are taken over the cases that did not fail; iterations and seconds over all cases; the switch
  iteration over the cases whose schedule switched (``switch_iteration >= 0``);
- success is also counted per initial-mTRE bin, and the bins give the **capture range**
  (:mod:`prostlab.benchmark.capture`).
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prostlab.benchmark.capture import (
    DEFAULT_BINS_MM,
    DEFAULT_CAPTURE_MIN_CASES,
    DEFAULT_CAPTURE_RATE,
    bin_label,
    capture_range,
    success_by_bin,
)
from prostlab.benchmark.rows import LANDMARK_FIELDS, is_failed, methods_in_order, validate_rows
from prostlab.errors import ProstlabError
from prostlab.metrics.functional import DEFAULT_SUCCESS_THRESHOLD_MM
from prostlab.outputs import write_text

__all__ = [
    "LANDMARK_SUMMARY_FIELDS",
    "SUMMARY_FIELDS",
    "bins_table",
    "check_threshold",
    "compare",
    "markdown_table",
    "summarise",
    "write_summary",
]

SUMMARY_FIELDS = (
    "n_cases",
    "n_failed",
    "n_success",
    "success_rate",
    "threshold_mm",
    "capture_range_mm",
    "capture_rate",
    "capture_min_cases",
    "median_final_mtre_mm",
    "mean_final_mtre_mm",
    "median_final_mpd_mm",
    "median_success_mpd_mm",
    "median_final_rotation_error_deg",
    "median_final_translation_error_mm",
    "median_initial_mtre_mm",
    "median_iterations",
    "median_seconds",
    "n_switched",
    "median_switch_iteration",
    "success_by_initial_mtre",
)
"""The keys of each method's statistics, in order."""

LANDMARK_SUMMARY_FIELDS = (
    "median_initial_landmark_mtre_mm",
    "median_final_landmark_mtre_mm",
    "median_final_landmark_mrpd_mm",
)
"""Keys added after :data:`SUMMARY_FIELDS` when the rows have landmark scores."""


def check_threshold(threshold_mm: Any) -> float:
    """``threshold_mm`` as a float; a :class:`ProstlabError` unless it is a positive finite number."""
    if isinstance(threshold_mm, bool) or not isinstance(threshold_mm, (int, float, np.floating)):
        raise ProstlabError(f"threshold_mm: expected a positive number of mm, got {threshold_mm!r}")
    if not (math.isfinite(threshold_mm) and threshold_mm > 0):
        raise ProstlabError(
            f"threshold_mm: expected a positive finite number of mm, got {threshold_mm}"
        )
    return float(threshold_mm)


def _median(values: Sequence[float]) -> float:
    """The median of the finite values; NaN when there are none."""
    finite = [float(v) for v in values if math.isfinite(float(v))]
    return float(np.median(finite)) if finite else math.nan


def _mean(values: Sequence[float]) -> float:
    finite = [float(v) for v in values if math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else math.nan


def summarise(
    rows: Sequence[Mapping[str, Any]],
    threshold_mm: float = DEFAULT_SUCCESS_THRESHOLD_MM,
    bins_mm: Sequence[float] = DEFAULT_BINS_MM,
    capture_rate: float = DEFAULT_CAPTURE_RATE,
    capture_min_cases: int = DEFAULT_CAPTURE_MIN_CASES,
) -> dict[str, dict[str, Any]]:
    """Statistics per method, methods in first-seen order.

    For each method (keys of each dict in :data:`SUMMARY_FIELDS` order):

    - ``n_cases``: its rows; ``n_failed``: those with status ``"failed"`` or a non-finite final
      mTRE; ``n_success``: those that did not fail with final mTRE ``< threshold_mm``;
      ``success_rate = n_success / n_cases`` (a fraction in [0, 1]; NaN if no cases).
    - ``capture_range_mm``: :func:`~prostlab.benchmark.capture.capture_range` of the bins at
      ``capture_rate`` and ``capture_min_cases`` (both repeated in the dict); ``None`` when no
      bin holds ``capture_min_cases`` cases.
    - ``median_final_mtre_mm``, ``mean_final_mtre_mm``, ``median_final_mpd_mm``,
      ``median_final_rotation_error_deg``, ``median_final_translation_error_mm``: over the cases
      that did not fail (non-finite values skipped), NaN when every case failed.
    - ``median_success_mpd_mm``: the mPD over the successful cases (how well they align on the
      detector), NaN when none succeeded.
    - ``median_initial_mtre_mm``, ``median_iterations``, ``median_seconds``: over all cases.
    - ``n_switched``: cases with ``switch_iteration >= 0``; ``median_switch_iteration``: over those
      (NaN when none switched, e.g. a single-stage method).
    - ``threshold_mm``: the threshold used, so the dict presents itself.
    - ``success_by_initial_mtre``: :func:`~prostlab.benchmark.capture.success_by_bin` over
      ``bins_mm`` (a list of ``{lo_mm, hi_mm, n, n_success, success_rate}``, the open bin last).
    - with landmark scores in the rows (:data:`~prostlab.benchmark.rows.LANDMARK_FIELDS`),
      :data:`LANDMARK_SUMMARY_FIELDS`: the median initial landmark mTRE over all cases, the
      median final landmark mTRE and mean reprojection distance over the cases that did not fail.

    Success is recomputed from ``final_mtre_mm`` and ``threshold_mm``; the rows' own ``success``
    flag is not read, so a summary can re-threshold the same rows.
    """
    threshold_mm = check_threshold(threshold_mm)
    rows = validate_rows(rows)
    summary: dict[str, dict[str, Any]] = {}
    for method in methods_in_order(rows):
        mine = [row for row in rows if row["method"] == method]
        kept = [row for row in mine if not is_failed(row)]
        switched = [row for row in mine if row["switch_iteration"] >= 0]
        succeeded = [row for row in kept if float(row["final_mtre_mm"]) < threshold_mm]
        n_success = len(succeeded)
        bins = success_by_bin(mine, threshold_mm, bins_mm)
        stats = {
            "n_cases": len(mine),
            "n_failed": len(mine) - len(kept),
            "n_success": int(n_success),
            "success_rate": n_success / len(mine),
            "threshold_mm": threshold_mm,
            "capture_range_mm": capture_range(bins, capture_rate, capture_min_cases),
            "capture_rate": capture_rate,
            "capture_min_cases": capture_min_cases,
            "median_final_mtre_mm": _median([r["final_mtre_mm"] for r in kept]),
            "mean_final_mtre_mm": _mean([r["final_mtre_mm"] for r in kept]),
            "median_success_mpd_mm": _median([r["final_mpd_mm"] for r in succeeded]),
            "median_final_rotation_error_deg": _median(
                [r["final_rotation_error_deg"] for r in kept]
            ),
            "median_final_translation_error_mm": _median(
                [r["final_translation_error_mm"] for r in kept]
            ),
            "median_final_mpd_mm": _median([r["final_mpd_mm"] for r in kept]),
            "median_initial_mtre_mm": _median([r["initial_mtre_mm"] for r in mine]),
            "median_iterations": _median([r["iterations"] for r in mine]),
            "median_seconds": _median([r["seconds"] for r in mine]),
            "n_switched": len(switched),
            "median_switch_iteration": _median([r["switch_iteration"] for r in switched]),
            "success_by_initial_mtre": bins,
        }
        summary[method] = {key: stats[key] for key in SUMMARY_FIELDS}
        if any(LANDMARK_FIELDS[0] in row for row in mine):
            summary[method].update({
                "median_initial_landmark_mtre_mm": _median(
                    [r.get("initial_landmark_mtre_mm", math.nan) for r in mine]),
                "median_final_landmark_mtre_mm": _median(
                    [r.get("final_landmark_mtre_mm", math.nan) for r in kept]),
                "median_final_landmark_mrpd_mm": _median(
                    [r.get("final_landmark_mrpd_mm", math.nan) for r in kept]),
            })
    return summary


def summarise_by_patient(
    rows: Sequence[Mapping[str, Any]], names: Mapping[int, str], **options: Any
) -> dict[str, dict[str, dict[str, Any]]]:
    """:func:`summarise` of each test patient's rows: ``{name: {method: statistics}}``, patients
    in the order of their volume index. ``names`` maps each row's ``volume_index`` to its
    patient's name (a missing index is named ``volume <i>``); ``options`` are
    :func:`summarise`'s."""
    rows = validate_rows(rows)
    patients = {}
    for index in sorted({int(row["volume_index"]) for row in rows}):
        mine = [row for row in rows if int(row["volume_index"]) == index]
        patients[names.get(index, f"volume {index}")] = summarise(mine, **options)
    return patients


def _check_summary(summary: Any) -> None:
    if not isinstance(summary, Mapping):
        raise ProstlabError(
            f"summary: expected the dict of summarise() (method -> statistics), "
            f"got {type(summary).__name__}"
        )
    for method, stats in summary.items():
        missing = [
            key for key in SUMMARY_FIELDS if not isinstance(stats, Mapping) or key not in stats
        ]
        if missing:
            raise ProstlabError(
                f"summary[{method!r}]: missing key {missing[0]!r}; expected the statistics of "
                "summarise()"
            )


def _number(value: float, digits: int = 2, unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}{unit}"


def _count(value: float) -> str:
    """A median of counts: an integer, or ``.5`` when the median falls between two."""
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _percent(fraction: float) -> str:
    return _number(100.0 * fraction if fraction is not None else math.nan, 1, " %")


def markdown_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table, one line per method, of the statistics of :func:`summarise`.

    Columns: method, cases, failed, success rate (mTRE below the threshold, %), capture range
    (mm), median and mean final mTRE (mm), median final mPD (mm), median rotation (deg) and
    translation (mm) errors, median iterations and median seconds; when a method has landmark
    scores, median final landmark mTRE and reprojection distance (mm) before the iterations.
    mm and deg have 2 decimals,
    success 1, the capture range 0 (it is a bin edge); ``–`` marks an undefined value (every case
    failed, or no bin measured). It ends without a newline.
    """
    _check_summary(summary)
    thresholds = sorted({float(stats["threshold_mm"]) for stats in summary.values()})
    if len(thresholds) > 1:
        raise ProstlabError(f"summary: expected one threshold_mm for all methods, got {thresholds}")
    threshold = f"{thresholds[0] if thresholds else DEFAULT_SUCCESS_THRESHOLD_MM:g} mm"
    marked = any(LANDMARK_SUMMARY_FIELDS[1] in stats for stats in summary.values())
    header = (
        "method",
        "cases",
        "failed",
        f"success (mTRE < {threshold})",
        "capture range (mm)",
        "median mTRE (mm)",
        "mean mTRE (mm)",
        "median mPD (mm)",
        "median rot. error (deg)",
        "median trans. error (mm)",
        *(("median landmark mTRE (mm)", "median landmark mRPD (mm)") if marked else ()),
        "median iterations",
        "median time (s)",
    )
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for method, s in summary.items():
        cells = (
            str(method).replace("|", "\\|"),
            str(s["n_cases"]),
            str(s["n_failed"]),
            _percent(s["success_rate"]),
            _number(s["capture_range_mm"], 0),
            _number(s["median_final_mtre_mm"]),
            _number(s["mean_final_mtre_mm"]),
            _number(s["median_final_mpd_mm"]),
            _number(s["median_final_rotation_error_deg"]),
            _number(s["median_final_translation_error_mm"]),
            *((_number(s.get("median_final_landmark_mtre_mm")),
               _number(s.get("median_final_landmark_mrpd_mm"))) if marked else ()),
            _count(s["median_iterations"]),
            _number(s["median_seconds"]),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bins_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table of success per initial-mTRE bin: one line per method, one column per bin.

    A cell reads ``92 % (11/12)``: the success rate, then successes over cases; ``–`` marks an
    empty bin. The header gives each bin's range in mm (the methods' bins must agree). It ends
    without a newline.
    """
    _check_summary(summary)
    layouts = {
        tuple((b["lo_mm"], b["hi_mm"]) for b in stats["success_by_initial_mtre"])
        for stats in summary.values()
    }
    if len(layouts) > 1:
        raise ProstlabError("summary: expected the same initial-mTRE bins for all methods")
    layout = next(iter(layouts), ())
    header = ["method", *(f"{bin_label(lo, hi)} mm" for lo, hi in layout)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(layout)) + "|",
    ]
    for method, stats in summary.items():
        cells = [str(method).replace("|", "\\|")]
        for b in stats["success_by_initial_mtre"]:
            cells.append(
                f"{100.0 * b['n_success'] / b['n']:.0f} % ({b['n_success']}/{b['n']})"
                if b["n"]
                else "–"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    """Plain JSON values: NaN and infinities become ``null``, numpy scalars Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


_META_LABELS = (
    ("config", "config"),
    ("checkpoint", "checkpoint"),
    ("n_cases", "cases"),
    ("threshold_mm", "success threshold (mm)"),
    ("date", "date"),
    ("commit", "commit"),
)


def write_summary(
    summary: Mapping[str, Mapping[str, Any]],
    directory: str | Path,
    meta: Mapping[str, Any],
    figures: Sequence[tuple[str, str]] = (),
    patients: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``summary.md`` into ``directory`` (created if needed).

    ``meta`` describes the run; the known keys are ``config`` (the config's name), ``checkpoint``,
    ``n_cases``, ``threshold_mm``, ``date`` and ``commit``, and other keys are kept too.
    ``threshold_mm`` defaults to the summary's, ``n_cases`` to the largest ``n_cases`` of its
    methods and ``date`` to now (UTC, ISO 8601); a ``threshold_mm`` that contradicts the summary's
    is an error.

    ``summary.json`` is ``{"meta": {...}, "methods": {method: statistics}}`` with NaN written as
    ``null`` (strict JSON). ``summary.md`` is a title, the meta as a list, the table of
    :func:`markdown_table`, the table of :func:`bins_table`, a paragraph on how the statistics
    are taken, and ``figures``: ``(caption, file name relative to directory)`` pairs, embedded in
    the order given (the success-against-initial-mTRE figure first).

    ``patients`` (of :func:`summarise_by_patient`) adds ``"patients": {name: {method:
    statistics}}`` to ``summary.json`` and, when it holds more than one patient, a table per
    patient to ``summary.md`` after the pooled one; the test patients are named in the meta.

    Returns:
        ``(json_path, md_path)``.
    """
    _check_summary(summary)
    if not isinstance(meta, Mapping):
        raise ProstlabError(
            f"meta: expected a dict (config, checkpoint, ...), got {type(meta).__name__}"
        )
    meta = dict(meta)
    thresholds = {float(stats["threshold_mm"]) for stats in summary.values()}
    if "threshold_mm" in meta:
        given = check_threshold(meta["threshold_mm"])
        if thresholds and thresholds != {given}:
            raise ProstlabError(
                f"meta.threshold_mm: {given} mm differs from the summary's {sorted(thresholds)} mm"
            )
        meta["threshold_mm"] = given
    elif thresholds:
        meta["threshold_mm"] = min(thresholds)
    meta.setdefault("n_cases", max((int(s["n_cases"]) for s in summary.values()), default=0))
    meta.setdefault(
        "date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "summary.json"
    if patients:
        for table in patients.values():
            _check_summary(table)
        meta.setdefault("test patients", ", ".join(patients))
    document = {"meta": _jsonable(meta), "methods": _jsonable(summary)}
    if patients:
        document["patients"] = _jsonable(patients)
    write_text(json_path, json.dumps(document, indent=2, allow_nan=False) + "\n")

    known = [key for key, _ in _META_LABELS]
    lines = ["# Registration benchmark", ""]
    for key, label in _META_LABELS:
        if meta.get(key) is not None:
            lines.append(f"- {label}: {meta[key]}")
    for key, value in meta.items():
        if key not in known and value is not None:
            lines.append(f"- {key}: {value}")
    first = next(iter(summary.values()), {})
    rate = first.get("capture_rate", DEFAULT_CAPTURE_RATE)
    min_cases = first.get("capture_min_cases", DEFAULT_CAPTURE_MIN_CASES)
    for caption, name in figures[:1]:
        lines += ["", f"![{caption}]({name})"]
    pooled = "All test patients pooled:" if patients and len(patients) > 1 else None
    lines += ["", *([pooled, ""] if pooled else []), markdown_table(summary)]
    if pooled:
        for name, table in patients.items():
            lines += ["", f"Test patient {name}:", "", markdown_table(table)]
    lines += [
        "",
        "Success per initial mTRE (mm), all test patients:" if pooled else
        "Success per initial mTRE (mm):",
        "",
        bins_table(summary),
        "",
        "A case fails when its registration diverged (status `failed`) or its final mTRE is not "
        "finite; it succeeds when it did not fail and its final mTRE is below the threshold. "
        "Success rates are over all cases; mTRE, mPD and error statistics over the cases that did "
        "not fail; iterations and time over all cases. The capture range is the upper edge of "
        f"the last initial-mTRE bin up to which every bin of at least {min_cases} cases succeeds "
        f"in at least {100 * rate:g} % (bins with fewer cases are passed over). mPD is measured "
        "on the detector: a single view resolves depth poorly, so a pose off along the beam "
        "axis has a small mPD and a large mTRE. Definitions: docs/benchmark.md.",
        "",
    ]
    for caption, name in figures[1:]:
        lines += [f"![{caption}]({name})", ""]
    md_path = directory / "summary.md"
    write_text(md_path, "\n".join(lines))
    return json_path, md_path


def compare(summary: Mapping[str, Mapping[str, Any]], better: str, worse: str) -> str:
    """One sentence comparing two methods' success rates.

    For example ``"net_gradncc succeeds in 93.0 % vs gradncc 41.0 % of 100 cases (mTRE < 10 mm)"``;
    when the two ran on different numbers of cases, both counts are given.
    """
    _check_summary(summary)
    for name, method in (("better", better), ("worse", worse)):
        if method not in summary:
            raise ProstlabError(
                f"{name}: expected one of the summary's methods {list(summary)}, got {method!r}"
            )
    a, b = summary[better], summary[worse]
    n_a, n_b = int(a["n_cases"]), int(b["n_cases"])
    cases = f"{n_a} cases" if n_a == n_b else f"{n_a} and {n_b} cases"
    threshold = f"{float(a['threshold_mm']):g} mm"
    return (
        f"{better} succeeds in {_percent(a['success_rate'])} vs {worse} "
        f"{_percent(b['success_rate'])} of {cases} (mTRE < {threshold})"
    )
