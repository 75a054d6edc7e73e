"""The reproducibility facts that `prostlab test` and `register` write (issue 22)."""

import torch

from prostlab.reproducibility import reproducibility_facts


def test_facts_name_backend_threads_and_versions():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        facts = reproducibility_facts("torch", "cpu", seed=7)
    finally:
        torch.set_num_threads(threads)
    assert facts["backend"] == "torch" and facts["torch_threads"] == 1 and facts["seed"] == 7
    assert facts["deterministic"] is True and facts["device"] == "cpu"
    assert facts["versions"]["torch"] == torch.__version__ and facts["versions"]["python"]
    assert facts["cpu"]


def test_auto_is_resolved():
    facts = reproducibility_facts("auto", "cpu")
    assert facts["backend"] in ("cpu", "torch")  # cpu where the kernels build
    assert facts["deterministic"] is True
