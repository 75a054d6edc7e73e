"""CUDA C sources of the ProST kernels, compiled at run time by CuPy (see prostlab.projector)."""
