"""Where the bundled examples live: 128^3 preparations of a chest CT (``../shared/data/chest_ct``,
with labels) and of an abdomen-pelvis CT (``pelvis_ct``, bones by threshold)."""

from __future__ import annotations

from pathlib import Path

from prostlab.errors import ProstlabError
from prostlab.resources import example_data_dir

EXAMPLE_NAME = "chest_ct_128"


def example_path(name: str = EXAMPLE_NAME) -> Path:
    """The directory of a bundled prepared example, ``data/<name>`` of the repository.

    It holds ``ct_mu.nii.gz``, ``bone_mu.nii.gz``, ``labels.nii.gz`` and ``meta.json``; load it
    with :func:`prostlab.data.load_prepared`. The examples ship inside the package (as
    ``prostlab.example_data``, about 13.5 MB with ``pelvis_ct_128``), so a wheel install has
    them too.
    """
    root = example_data_dir()
    path = root / name
    if not (path / "meta.json").is_file():
        names = sorted(p.name for p in root.iterdir() if (p / "meta.json").is_file())
        raise ProstlabError(
            f"{path}: bundled example {name!r} not found; expected one of {names}, or run "
            "`prostlab prepare` on your own CT and use its output folder"
        )
    return path
