"""``backend="auto"`` on CPU tensors when the compiled ``cpu`` backend cannot be built.

The build is made to fail the two ways a user meets: no compiler at all (an empty PATH, no or a
wrong ``$CXX``), and a compiler that rejects the sources (a stand-in script). Each time the first
render warns once, naming the compiler and the measured cost, and the image is the torch
backend's.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import prostlab.projector.backends as backends
import prostlab.projector.backends.cpu_kernels as cpu_kernels
from prostlab.geometry import Camera
from prostlab.projector import Projector


@pytest.fixture
def no_build(monkeypatch, tmp_path):
    """A fresh 'tried once per process' state, an empty PATH, no $CXX and a private build cache."""
    monkeypatch.setattr(cpu_kernels, "_available", None)
    monkeypatch.setattr(cpu_kernels, "_build_error", None)
    monkeypatch.setattr(cpu_kernels, "_backend", None)
    monkeypatch.setattr(backends, "_warned_cpu_build", False)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PROSTLAB_CACHE", str(tmp_path / "cache"))
    return empty


def render_twice() -> tuple[list[warnings.WarningMessage], torch.Tensor, torch.Tensor]:
    """Two renders with backend='auto' (every warning recorded), and the torch backend's image."""
    camera = Camera(sdd=60.0, sid=40.0, height=4, width=5, pixel_spacing=(2.0, 1.8))
    volume = torch.rand(1, 1, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    pose = torch.tensor([[0.1, -0.2, 0.05, 0.5, 0.0, -1.0]])
    projector = Projector(camera, step=0.7, backend="auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = projector(volume, (1.0, 1.2, 0.9), pose)
        projector(volume, (1.0, 1.2, 0.9), pose)
    reference = Projector(camera, step=0.7, backend="torch")(volume, (1.0, 1.2, 0.9), pose)
    return [w for w in caught if "compiled 'cpu' backend" in str(w.message)], image, reference


def test_no_compiler_warns_once_naming_what_was_looked_for(no_build):
    caught, image, reference = render_twice()
    assert len(caught) == 1
    assert caught[0].category is RuntimeWarning
    message = str(caught[0].message)
    assert "no C++ compiler: $CXX is not set, and neither g++ nor c++ is on the PATH" in message
    assert backends.FALLBACK_COST in message and "bench/RESULTS.md" in message
    assert torch.equal(image, reference)


def test_missing_cxx_is_named(no_build, monkeypatch):
    monkeypatch.setenv("CXX", "clang++-99")
    caught, _, _ = render_twice()
    assert len(caught) == 1
    assert "$CXX='clang++-99' is not on the PATH" in str(caught[0].message)


def test_failed_build_quotes_the_compilers_first_error(no_build, monkeypatch):
    fake = no_build / "broken-cxx"
    fake.write_text("#!/bin/sh\necho 'prost.cu:1:1: error: simulated failure' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", "broken-cxx")
    caught, image, reference = render_twice()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "broken-cxx failed to compile prost.cu: prost.cu:1:1: error: simulated failure" in message
    assert "\n" not in message  # the first line only, not the compiler's whole log
    assert torch.equal(image, reference)


@pytest.mark.usefixtures("no_build")
def test_explicit_torch_backend_does_not_warn():
    camera = Camera(sdd=60.0, sid=40.0, height=4, width=5, pixel_spacing=(2.0, 1.8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Projector(camera, step=0.7, backend="torch")(
            torch.rand(1, 1, 4, 3, 5), (1.0, 1.2, 0.9), torch.zeros(1, 6)
        )
