"""The projector backends' names, in a module that imports nothing.

``prostlab render --backend`` and ``prostlab register --backend`` offer these choices, and the
projector (:func:`prostlab.projector.backends.resolve_backend`) accepts them, from this one
tuple: the command line builds its parser without importing torch.
"""

BACKENDS = ("auto", "torch", "cupy", "cpu")
"""``auto`` (CuPy on CUDA tensors, the compiled ``cpu`` kernels on CPU tensors when they build,
torch otherwise), ``torch`` (the reference), ``cupy`` (CUDA kernels), ``cpu`` (the same kernels
compiled for the host with OpenMP)."""
