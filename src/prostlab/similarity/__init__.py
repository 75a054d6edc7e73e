"""Image similarities: NCC, gradient-NCC, the learned convex similarity network, and its loss.

- :mod:`~prostlab.similarity.ncc`: :func:`ncc`, :func:`gradient_ncc` and the losses
  :class:`NCCLoss`, :class:`GradientNCCLoss` (``1 - ...``, lower is better).
- :mod:`~prostlab.similarity.patch_ncc`: :func:`patch_ncc`, :func:`multiscale_ncc` (global and
  patch-wise NCC averaged) and :class:`MultiscaleNCCLoss`.
- :mod:`~prostlab.similarity.convex_net`: :class:`ConvexSimilarityNet`, ProST's "Net".
- :mod:`~prostlab.similarity.objective`: pose objectives ``(B, 6) -> (B,)`` for registration,
  :class:`ImageObjective`, :class:`NetObjective` and :func:`make_objective`.
- :mod:`~prostlab.similarity.training_loss`: :func:`geodesic_gradient_loss`, the training
  objective (the network's pose gradient against the geodesic one).

``docs/similarity.md`` states the definitions and design choices.
"""

from prostlab.similarity.convex_net import ACTIVATIONS, ConvexSimilarityNet, minmax_normalise
from prostlab.similarity.ncc import GradientNCCLoss, NCCLoss, gradient_ncc, ncc, sobel
from prostlab.similarity.objective import (
    DEFAULT_MOVING,
    OBJECTIVES,
    ImageObjective,
    NetObjective,
    PoseObjective,
    make_objective,
)
from prostlab.similarity.patch_ncc import MultiscaleNCCLoss, multiscale_ncc, patch_ncc
from prostlab.similarity.training_loss import (
    direction_loss,
    geodesic_direction_loss,
    geodesic_gradient_loss,
    pose_gradient,
    unit,
)

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_MOVING",
    "OBJECTIVES",
    "ConvexSimilarityNet",
    "GradientNCCLoss",
    "ImageObjective",
    "MultiscaleNCCLoss",
    "NCCLoss",
    "NetObjective",
    "PoseObjective",
    "direction_loss",
    "geodesic_direction_loss",
    "geodesic_gradient_loss",
    "gradient_ncc",
    "make_objective",
    "minmax_normalise",
    "multiscale_ncc",
    "ncc",
    "patch_ncc",
    "pose_gradient",
    "sobel",
    "unit",
]
