"""Shared test fixtures: the bundled example and the optional sibling ``../shared`` data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CHEST_CT = REPO.parent / "shared" / "data" / "chest_ct"
"""The full-resolution chest CT, present beside the repository in CI but not in user clones."""

requires_shared = pytest.mark.skipif(
    not (SHARED_CHEST_CT / "ct.nii.gz").is_file(),
    reason=f"needs the shared chest CT at {SHARED_CHEST_CT}",
)
"""Mark a test that reads ``../shared/data/chest_ct``; it is skipped where that is absent."""


@pytest.fixture(scope="session")
def example_dir() -> Path:
    """The bundled prepared example, ``data/chest_ct_128``."""
    from prostlab.data import example_path

    return example_path()


@pytest.fixture(scope="session")
def shared_chest_ct() -> Path:
    """The directory of the shared full-resolution chest CT; skips the test if absent."""
    if not (SHARED_CHEST_CT / "ct.nii.gz").is_file():
        pytest.skip(f"needs the shared chest CT at {SHARED_CHEST_CT}")
    return SHARED_CHEST_CT
