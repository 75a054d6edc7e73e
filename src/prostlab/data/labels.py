"""Select bone labels from a label map and build the segmented CT (bone attenuation only).

A label map stores one class id per voxel (0 = background). Its class table is a CSV with the
columns ``group,original_idx,structure,id`` (TotalSegmentator-style, as in
``../shared/data/chest_ct/structures.csv``). A bone selection is

* a preset: ``"bones"`` = the groups ``vertebrae``, ``ribs`` and ``skeleton`` (all bones of the
  table, plus sternum and costal cartilages, which the table files under ``ribs``);
  ``"pelvis"`` = the structures ``sacrum``, ``hip_left``, ``hip_right`` (ids 25, 77, 78), ProST's
  pelvis; ``"pelvis_xreg"`` = those and the structure ``vertebrae``, which only DeepFluoro's
  table has (its labels 1, 2, 3, 4, 7: the pelvis xreg renders, lumbar vertebrae included;
  :mod:`prostlab.data.deepfluoro`);
* a group name of the table, e.g. ``"vertebrae"``;
* label ids: a sequence of integers, or a string of comma-separated integers such as ``"25,77,78"``.

The segmented CT is ``mu_bone = mu * mask`` with ``mask = [label in ids]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from prostlab.csv_table import csv_rows
from prostlab.errors import ProstlabError

PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "bones": {"groups": ("vertebrae", "ribs", "skeleton")},
    "pelvis": {"structures": ("sacrum", "hip_left", "hip_right")},
    "pelvis_xreg": {"structures": ("sacrum", "hip_left", "hip_right", "vertebrae")},
}
"""Named bone selections, as groups or structure names of the class table."""

STRUCTURE_COLUMNS = ("group", "structure", "id")

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class Structure:
    """One row of the class table: the label ``id`` of ``structure`` in ``group``."""

    group: str
    structure: str
    id: int


def read_structures(path: str | Path) -> list[Structure]:
    """Read a class table CSV with (at least) the columns ``group``, ``structure``, ``id``."""
    path = Path(path)
    if not path.is_file():
        raise ProstlabError(
            f"{path}: no such file; expected a CSV class table with columns "
            f"{', '.join(STRUCTURE_COLUMNS)}"
        )
    rows = []
    for line, row in csv_rows(path, STRUCTURE_COLUMNS):
        try:
            rows.append(Structure(row["group"], row["structure"], int(row["id"])))
        except (TypeError, ValueError) as exc:
            raise ProstlabError(f"{path}, line {line}: id {row['id']!r} is not an integer") from exc
    return rows


def bone_ids(selection: str | Sequence[int], structures_csv: str | Path | None = None) -> list[int]:
    """Resolve a bone selection (see the module docstring) to sorted, unique label ids.

    ``structures_csv`` is needed for presets and group names, not for explicit ids.
    """
    if isinstance(selection, str):
        text = selection.strip()
        if text.replace(",", "").replace(" ", "").isdigit():
            return _checked_ids([int(t) for t in text.split(",") if t.strip()], selection)
        return _named_ids(text, structures_csv)
    return _checked_ids(list(selection), selection)


def _named_ids(name: str, structures_csv: str | Path | None) -> list[int]:
    if structures_csv is None:
        raise ProstlabError(
            f"bones: {name!r} names a preset or group, which needs a class table; pass "
            "structures_csv (a CSV with columns group, structure, id) or a list of label ids"
        )
    table = read_structures(structures_csv)
    groups = sorted({s.group for s in table})
    if name in PRESETS:
        wanted_groups = PRESETS[name].get("groups", ())
        wanted_names = PRESETS[name].get("structures", ())
        missing = [g for g in wanted_groups if g not in groups]
        missing += [n for n in wanted_names if n not in {s.structure for s in table}]
        if missing:
            raise ProstlabError(
                f"{structures_csv}: has no group/structure {', '.join(missing)}, which the "
                f"preset {name!r} needs"
            )
        ids = [s.id for s in table if s.group in wanted_groups or s.structure in wanted_names]
    elif name in groups:
        ids = [s.id for s in table if s.group == name]
    else:
        raise ProstlabError(
            f"bones: {name!r} is neither a preset ({', '.join(PRESETS)}) nor a group of "
            f"{structures_csv} ({', '.join(groups)}); label ids such as '25,77,78' also work"
        )
    return sorted(set(ids))


def _checked_ids(ids: list, given: object) -> list[int]:
    if not ids or not all(isinstance(i, (int, np.integer)) and i > 0 for i in ids):
        raise ProstlabError(
            f"bones: {given!r} is not a non-empty list of positive label ids (0 is background)"
        )
    return sorted({int(i) for i in ids})


def bone_mask(labels: np.ndarray, ids: Sequence[int], source: str | Path = "labels") -> np.ndarray:
    """Boolean mask ``labels in ids``, same shape as ``labels``.

    Raises ``ProstlabError`` naming ``source`` (the label file) if no voxel carries any of
    ``ids``.
    """
    mask = np.isin(labels, np.asarray(list(ids)))
    if not mask.any():
        raise ProstlabError(
            f"labels: none of the bone ids {list(ids)} occur in {source}; "
            "expected a selection that matches the label map"
        )
    return mask


def segment(mu: ArrayT, mask: np.ndarray | torch.Tensor) -> ArrayT:
    """The segmented CT ``mu * mask`` (attenuation inside the mask, 0 elsewhere)."""
    if isinstance(mu, torch.Tensor):
        return mu * torch.as_tensor(mask, device=mu.device).to(mu.dtype)
    return (mu * np.asarray(mask, dtype=mu.dtype)).astype(mu.dtype, copy=False)
