"""LightningModules: training the convex similarity network, and the registration benchmark."""

from prostlab.lightning.training import ConvexSimilarityModule

__all__ = ["ConvexSimilarityModule"]
