"""prostlab.limits: devices that exist here, and memory estimated before allocating."""

import pytest
import torch

from prostlab.errors import ProstlabError
from prostlab.limits import (
    available_bytes,
    check_grid_side,
    check_memory,
    check_spacing_mm,
    format_bytes,
    resolve_device,
)


def test_cpu_resolves_and_unknown_devices_are_refused():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ProstlabError, match="'gpu0': not a torch device; expected cpu, cuda"):
        resolve_device("gpu0")
    with pytest.raises(ProstlabError, match="device type 'meta' is not supported"):
        resolve_device("meta")


def test_check_memory_names_the_estimate_and_the_limit(monkeypatch):
    import prostlab.limits as limits

    monkeypatch.setattr(limits, "available_bytes", lambda device: 2_000_000_000)
    check_memory(1_000_000_000, "cpu", "a job")  # fits
    with pytest.raises(ProstlabError, match=r"^a job needs about 3 GB of memory, more than the "
                                            r"2 GB available on cpu"):
        check_memory(3_000_000_000, "cpu", "a job")


def test_available_memory_is_positive_and_bytes_read_well():
    assert available_bytes("cpu") > 0
    assert [format_bytes(n) for n in (512, 1.5e6, 16e15, 3e18)] == [
        "512 B", "1.5 MB", "16 PB", "3e+03 PB"]


def test_grids_and_spacings_past_the_bounds_are_refused_with_the_bound():
    check_grid_side((8, 8), "detector", "pixels")
    check_spacing_mm((0.01, 3.0), "pixel_spacing")
    with pytest.raises(ProstlabError, match=r"^detector: 7 x 8; expected at least 8 pixels a "
                                            r"side"):
        check_grid_side((7, 8), "detector", "pixels")
    for spacing in ((0.001,), (float("nan"),), (-1.0,)):
        with pytest.raises(ProstlabError, match=r"^voxel: .* mm; expected at least 0.01 mm"):
            check_spacing_mm(spacing, "voxel")
