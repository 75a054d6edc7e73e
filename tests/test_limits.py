"""prostlab.limits: devices that exist here, and memory estimated before allocating."""

import pytest
import torch

from prostlab.errors import ProstlabError
from prostlab.limits import available_bytes, check_memory, format_bytes, resolve_device


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
