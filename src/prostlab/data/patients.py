"""Several patients' scans: their names, and how a list of them is split into folds.

A multi-patient config lists one prepared folder per patient under ``data.volumes``. The
benchmark is honest only if the network never saw the test patient, so the split is by patient:
:func:`leave_patient_out` gives, for fold ``k``, the test patient ``k``, the next one (cyclically)
as the validation patient that selects the checkpoint, and every other patient for training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prostlab.errors import ProstlabError

CT_STEMS = ("ct", "image", "volume")
"""File stems that say nothing about the patient: such a file is named by its folder."""


def patient_name(path: str | Path) -> str:
    """A patient's name from its CT's path: the file's stem (``lung1`` of ``lung1.nii.gz``), or
    its folder's name when the stem is generic (``chest_cta`` of ``chest_cta/ct.nii.gz``) or the
    path is a DICOM series folder."""
    path = Path(path)
    if path.is_dir():
        return path.name
    stem = path.name.split(".")[0]
    return path.parent.name if stem.lower() in CT_STEMS and path.parent.name else stem


def patient_names(paths: Sequence[str | Path]) -> list[str]:
    """:func:`patient_name` of each path; refused where two paths give one name."""
    names = [patient_name(p) for p in paths]
    seen: dict[str, str] = {}
    for path, name in zip(paths, names, strict=True):
        if name in seen:
            raise ProstlabError(
                f"--ct {path}: named {name!r} like {seen[name]}; expected one name per patient "
                "(rename a file or folder)"
            )
        seen[name] = str(path)
    return names


def source_name(source: Mapping[str, Any]) -> str:
    """The name of a ``data.volumes`` entry: its prepared folder's, its CT's
    (:func:`patient_name`) or its DeepFluoro specimen's."""
    if "prepared" in source:
        return Path(source["prepared"]).name
    if "deepfluoro" in source:
        return f"deepfluoro-{source['specimen']}"
    return patient_name(source["ct"])


def leave_patient_out(n: int, fold: int) -> dict[str, list[int]]:
    """The split of fold ``fold`` of ``n`` patients: test ``[fold]``, validation
    ``[(fold + 1) % n]``, train the rest, in order."""
    if n < 3:
        raise ProstlabError(f"leave-patient-out: {n} patient(s); expected at least 3 (train, "
                            "validation and test patients)")
    if not 0 <= fold < n:
        raise ProstlabError(f"fold: {fold}; expected 0 to {n - 1} (one per patient)")
    val = (fold + 1) % n
    return {"train": [i for i in range(n) if i not in (fold, val)], "val": [val],
            "test": [fold]}


__all__ = ["leave_patient_out", "patient_name", "patient_names", "source_name"]
