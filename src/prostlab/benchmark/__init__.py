"""The registration benchmark's results: per-case rows, per-method summaries and their files.

The test loop (:mod:`prostlab.lightning`) registers each case with each method and produces one
row per case and method (:data:`ROW_FIELDS`); this package checks the rows, writes them to CSV,
summarises them per method and writes ``summary.json`` and ``summary.md``. Figures of the same rows
are in :mod:`prostlab.viz.report`. Files, columns and definitions: ``docs/benchmark.md``.
"""

from prostlab.benchmark.capture import (
    DEFAULT_BINS_MM,
    DEFAULT_CAPTURE_MIN_CASES,
    DEFAULT_CAPTURE_RATE,
    capture_range,
    success_by_bin,
)
from prostlab.benchmark.rows import (
    LANDMARK_FIELDS,
    ROW_FIELDS,
    STATUSES,
    is_failed,
    methods_in_order,
    validate_rows,
    write_cases_csv,
)
from prostlab.benchmark.summary import (
    LANDMARK_SUMMARY_FIELDS,
    SUMMARY_FIELDS,
    bins_table,
    check_threshold,
    compare,
    markdown_table,
    summarise,
    summarise_by_patient,
    write_summary,
)

__all__ = [
    "DEFAULT_BINS_MM",
    "DEFAULT_CAPTURE_MIN_CASES",
    "DEFAULT_CAPTURE_RATE",
    "LANDMARK_FIELDS",
    "LANDMARK_SUMMARY_FIELDS",
    "ROW_FIELDS",
    "STATUSES",
    "SUMMARY_FIELDS",
    "bins_table",
    "capture_range",
    "check_threshold",
    "is_failed",
    "compare",
    "markdown_table",
    "methods_in_order",
    "success_by_bin",
    "summarise",
    "summarise_by_patient",
    "validate_rows",
    "write_cases_csv",
    "write_summary",
]
