"""Read a CSV table whose header must hold given columns; errors name the file and line."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from pathlib import Path

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
