"""CSV tables: read one whose header must hold given columns (errors name the file and line),
and write a list of rows."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from prostlab.errors import ProstlabError


def csv_rows(path: str | Path, columns: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of a CSV file whose header holds every name in ``columns``."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise ProstlabError(
                    f"{path}: lacks the column(s) {', '.join(missing)}; expected a header with "
                    f"{', '.join(columns)}"
                )
            yield from enumerate(reader, start=2)
    except OSError as exc:
        raise ProstlabError(f"{path}: cannot read the table ({exc.strerror})") from exc


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` (dicts with the same keys, in order) as a CSV table with a header line,
    under a temporary name moved into place (:func:`prostlab.outputs.atomic_path`)."""
    from prostlab.outputs import atomic_path

    if not rows:
        raise ProstlabError(f"{path}: expected at least one row to write")
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path

