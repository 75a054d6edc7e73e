"""prostlab: 2D/3D X-ray to CT registration with Projective Spatial Transformers (ProST)."""

__version__ = "0.1.0"
