"""The ProST projector (differentiable DRRs) and its backends."""

from prostlab.projector.projector import Projector

__all__ = ["Projector"]
