"""The learned similarity ("Net" of ProST): lift the bone volume, project it, embed, compare.

::

    bone mu (B|1, 1, D, H, W) --lift--> (B|1, 1 + Cv, D, H, W) --Projector at pose--> (B, 1 + Cv, h, w)
                                                                                   --encoder_p--> e_p (B, E)
    target X-ray (B|1, 1, h, w) --min-max--> [0, 1] --encoder_t--> e_t (B|1, E)

    similarity = |e_p - e_t|^2                                                          (B,)

**Lift (3D CNN).** ``volume_depth`` 3 x 3 x 3 convolutions (``volume_hidden`` channels between
them, the activation after all but the last) map ``mu / mu_scale`` to ``Cv = volume_channels``
maps ``z``. Each learned channel is the bone's attenuation re-weighted,

    f_c = mu * softplus(z_c),

and the input ``mu`` is kept as channel 0, so the projection has ``1 + Cv`` channels. The gating
by ``mu`` keeps every channel a non-negative attenuation supported on the bone: air adds nothing
(an ungated CNN with biases would fill the whole box with a constant and its projection would
show the volume's outline, not the anatomy); each projected channel is a line integral on the
bone DRR's scale (softplus(0) = log 2), so no normalisation is needed before the encoder; and the
image still fades out smoothly as bone leaves the field of view. The CNN sees ``mu / mu_scale``
(``mu_scale`` = mu of water by default), so its input is of order 1. Since ``f_c`` is zero
wherever ``mu`` is, ``z`` is only needed on the bone: on the CPU, for a bone volume that needs no
gradient, the CNN runs on the bone's voxels and the neighbourhoods they read
(:meth:`ConvexSimilarityNet.lift`), the same values and gradients at a ninth of the dense
convolutions' time, forward and backward, on the CPU recipe's 64^3 chest (9 % bone; bench/
RESULTS.md, "The training step at 4x"), and only the box of the bone is projected
(:meth:`ConvexSimilarityNet.render`).

**Encoders.** Two 2D encoders of the same shape and separate weights: for each entry ``c`` of
``encoder_channels`` a 3 x 3 convolution of stride 2 into ``c`` channels and the activation;
then adaptive average pooling to ``pool_size x pool_size`` (coarse layout is kept, because the
similarity must see where things are, and any detector size is accepted), flattening and a
linear map to ``embedding_dim``. The projection encoder reads ``1 + Cv`` channels, the target
encoder 1. The target is min-max normalised per image first (a flat image becomes zeros).

**Smoothness.** Training fits the similarity's gradient with respect to the pose and
registration follows it, so the default activation is SiLU, which keeps that gradient continuous
in the pose; ReLU-like activations make it jump at every kink. Every operation (convolution,
softplus, SiLU, average pooling, the projector) supports double backward; there is no
grid_sample.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prostlab.errors import ProstlabError
from prostlab.geometry import Camera, check_pose
from prostlab.geometry.checks import check_real_device, check_same_device, check_weights_device
from prostlab.projector import Projector

__all__ = ["ACTIVATIONS", "ConvexSimilarityNet", "minmax_normalise"]

ACTIVATIONS = {
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "relu": nn.ReLU,
}
"""The activations the network may be built with, by name."""

MU_WATER = 0.02683
"""Default attenuation unit of the lifting CNN's input, 1/mm (mu of water at ~60 keV, as ProST)."""


def minmax_normalise(image: Tensor) -> Tensor:
    """Map each image of ``(B, C, H, W)`` (each channel separately) to ``[0, 1]``.

    ``(x - min) / (max - min)``; an image with ``max == min`` becomes zeros.
    """
    low = image.amin(dim=(-2, -1), keepdim=True)
    high = image.amax(dim=(-2, -1), keepdim=True)
    span = high - low
    positive = span > 0
    return torch.where(positive, (image - low) / torch.where(positive, span, 1.0), 0.0)


def _positive_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ProstlabError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def _dilate(mask: Tensor) -> Tensor:
    """``mask`` (B, 1, D, H, W) grown by one voxel to its 26 neighbours."""
    for dim in (2, 3, 4):
        n = mask.shape[dim]
        grown = mask.clone()
        grown.narrow(dim, 1, n - 1).logical_or_(mask.narrow(dim, 0, n - 1))
        grown.narrow(dim, 0, n - 1).logical_or_(mask.narrow(dim, 1, n - 1))
        mask = grown
    return mask


def _neighbourhoods(flat: Tensor, at: Tensor, plane: int, row: int) -> Tensor:
    """``flat[at[n] + o_t]`` for the 27 offsets ``o_t`` of a voxel's 3 x 3 x 3 neighbours in a
    padded volume of ``plane`` voxels a slice and ``row`` a row, flattened (1-D, no gradient):
    ``(27, N)``, tap ``t`` in (D, H, W) order. Each tap gathers by ``at`` from ``flat`` shifted
    by its offset, which sweeps memory in order and computes no index of size 27 x N (several
    times faster than gathering by such an index, for int64 tables most of all). Every ``at``
    must lie a slice, a row and a voxel inside the padding."""
    base = plane + row + 1
    length = flat.shape[0] - 2 * base
    shifted = at - base
    out = flat.new_empty(27, len(at))
    for t, (a, b, c) in enumerate(itertools.product(range(3), repeat=3)):
        torch.index_select(flat.narrow(0, a * plane + b * row + c, length), 0, shifted, out=out[t])
    return out


def _convolutions_on_support(lifter: nn.Sequential, x: Tensor, support: Tensor) -> Tensor | None:
    """``lifter(x)`` at the voxels where ``support`` (B, 1, D, H, W) is true, zeros elsewhere;
    None when the voxels it reads are half the volume or more (the dense convolutions are faster
    there).

    ``lifter`` alternates 3 x 3 x 3 convolutions (zero padding 1) and activations. A
    convolution's output at a voxel reads the voxel and its 26 neighbours, so the ``i``-th of
    ``n`` convolutions is needed on the support grown ``n - i`` times. Each convolution runs as
    one matrix product on columns, one per voxel where it is needed, channels down a column: its
    weights ``(out, in x 27)`` times the neighbourhoods gathered as columns ``(in x 27, N)``
    (padding voxels read a column of zeros); or, with fewer output than input channels, the
    27 taps' weights ``(27 x out, in)`` times the input columns, of which each voxel gathers and
    sums its neighbours' (fewer numbers to gather, and to scatter in the backward). Tap by tap,
    the gathers and their backward's scatters sweep memory in order (:func:`_neighbourhoods`).
    """
    convolutions, activations = list(lifter)[0::2], list(lifter)[1::2]
    sizes = x.shape[2:]
    pad = (1,) * 6
    # Voxels are indexed in the zero-padded volume, so that every neighbour has an index.
    plane, row = (sizes[1] + 2) * (sizes[2] + 2), sizes[2] + 2
    inside = F.pad(torch.ones_like(support), pad)
    needed = [F.pad(support, pad)]
    for _ in convolutions[1:]:
        needed.append(_dilate(needed[-1]) & inside)
    if 2 * int(needed[-1].sum()) >= support.numel():
        return None
    columns = F.pad(x, pad).reshape(1, -1)  # the first convolution's input, a column per voxel
    lookup = None  # padded voxel -> its column of the current input (None: the voxel's index)
    for i, (conv, mask) in enumerate(zip(convolutions, reversed(needed), strict=True)):
        at = mask.reshape(-1).nonzero().squeeze(1)
        if lookup is not None:
            neighbours = _neighbourhoods(lookup, at, plane, row)  # (27, N): their columns
        if lookup is not None and conv.out_channels < conv.in_channels:
            # the 27 taps on the input columns, then each voxel gathers its neighbours'
            taps = conv.weight.permute(2, 3, 4, 0, 1).reshape(-1, conv.in_channels)
            per_tap = (taps @ columns).reshape(27, conv.out_channels, columns.shape[1])
            index = neighbours[:, None, :].expand(-1, conv.out_channels, -1)
            out = per_tap.gather(2, index).sum(dim=0) + conv.bias[:, None]
        else:  # gather the neighbourhoods, then one product with the weights
            if lookup is None:  # the first convolution reads the padded volume itself
                patches = _neighbourhoods(columns[0], at, plane, row)
            else:
                patches = columns.index_select(1, neighbours.reshape(-1))
            out = torch.addmm(conv.bias[:, None], conv.weight.reshape(conv.out_channels, -1),
                              patches.reshape(-1, len(at)))
        if i < len(activations):
            out = activations[i](out)
            columns = torch.cat((out, out.new_zeros(out.shape[0], 1)), dim=1)
            lookup = torch.full((mask.numel(),), len(at), dtype=torch.long, device=x.device)
            lookup[at] = torch.arange(len(at), device=x.device)
    z = out.new_zeros(out.shape[0], needed[0].numel()).index_copy(1, at, out)
    z = z.reshape(out.shape[0], x.shape[0], *(n + 2 for n in sizes)).transpose(0, 1)
    return z[:, :, 1:-1, 1:-1, 1:-1]


def _bone_box(lifted: Tensor) -> list[tuple[int, int]] | None:
    """Per axis, ``[lo, hi)`` of the voxels where channel 0 of ``lifted`` (B, C, D, H, W) is
    non-zero in any batch item; None when that is the whole volume or empty."""
    occupied = (lifted[:, 0].detach() != 0).any(dim=0)
    plane = occupied.any(dim=0)  # (H, W); reductions over leading dimensions sweep memory in order
    box = []
    for along in (occupied.flatten(1).any(dim=1), plane.any(dim=1), plane.any(dim=0)):
        hit = along.nonzero()
        if len(hit) == 0:
            return None
        box.append((int(hit[0]), int(hit[-1]) + 1))
    whole = all(hi - lo == n for (lo, hi), n in zip(box, occupied.shape, strict=True))
    return None if whole else box


def _encoder(
    in_channels: int, channels: Sequence[int], pool: int, dim: int, act: type[nn.Module]
) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = in_channels
    for c in channels:
        layers += [nn.Conv2d(c_in, c, kernel_size=3, stride=2, padding=1), act()]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(c_in * pool * pool, dim)]
    return nn.Sequential(*layers)


class ConvexSimilarityNet(nn.Module):
    """ProST's learned similarity: ``|encoder_p(P(lift(bone), pose)) - encoder_t(target)|^2``.

    See the module docstring for the architecture and the reasons for it. Lower is better; the
    value is ``>= 0`` and 0 exactly when the two embeddings agree.

    Args:
        projector: the :class:`~prostlab.projector.Projector` that renders the lifted volume,
            or a :class:`~prostlab.geometry.Camera` to build one with ``step`` and ``backend``.
        volume_channels: ``Cv >= 1``, learned 3D channels (the projection has ``1 + Cv``).
        volume_depth: number of 3D convolutions, ``>= 1``.
        volume_hidden: channels between the 3D convolutions.
        encoder_channels: output channels of the stride-2 2D convolutions of each encoder.
        embedding_dim: length ``E`` of the embeddings.
        pool_size: side of the pooled feature map before the linear layer.
        activation: one of :data:`ACTIVATIONS`.
        mu_scale: attenuation unit of the lifting CNN's input, 1/mm.
        step: sampling step of a projector built from a camera, mm.
        backend: backend of a projector built from a camera.
    """

    def __init__(
        self,
        projector: Projector | Camera,
        *,
        volume_channels: int = 2,
        volume_depth: int = 3,
        volume_hidden: int = 8,
        encoder_channels: Sequence[int] = (16, 32, 64),
        embedding_dim: int = 64,
        pool_size: int = 4,
        activation: str = "silu",
        mu_scale: float = MU_WATER,
        step: float = 1.0,
        backend: str = "auto",
    ):
        super().__init__()
        if isinstance(projector, Camera):
            projector = Projector(projector, step=step, backend=backend)
        if not isinstance(projector, Projector):
            raise ProstlabError(
                "projector: expected a prostlab Projector or a Camera, got "
                f"{type(projector).__name__}"
            )
        volume_channels = _positive_int(volume_channels, "volume_channels")
        volume_depth = _positive_int(volume_depth, "volume_depth")
        volume_hidden = _positive_int(volume_hidden, "volume_hidden")
        embedding_dim = _positive_int(embedding_dim, "embedding_dim")
        pool_size = _positive_int(pool_size, "pool_size")
        if isinstance(encoder_channels, (str, bytes)) or not isinstance(encoder_channels, Sequence):
            raise ProstlabError(
                f"encoder_channels: expected a list of positive integers, got {encoder_channels!r}"
            )
        encoder_channels = [
            _positive_int(c, f"encoder_channels[{i}]") for i, c in enumerate(encoder_channels)
        ]
        if activation not in ACTIVATIONS:
            raise ProstlabError(
                f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}"
            )
        if not (isinstance(mu_scale, (int, float)) and mu_scale > 0):
            raise ProstlabError(f"mu_scale: expected a positive number (1/mm), got {mu_scale!r}")
        act = ACTIVATIONS[activation]

        self.projector = projector
        self.volume_channels = volume_channels
        self.mu_scale = float(mu_scale)

        layers: list[nn.Module] = []
        c_in = 1
        for _ in range(volume_depth - 1):
            layers += [nn.Conv3d(c_in, volume_hidden, kernel_size=3, padding=1), act()]
            c_in = volume_hidden
        layers.append(nn.Conv3d(c_in, volume_channels, kernel_size=3, padding=1))
        self.lifter = nn.Sequential(*layers)
        self.projection_encoder = _encoder(
            1 + volume_channels, encoder_channels, pool_size, embedding_dim, act
        )
        self.target_encoder = _encoder(1, encoder_channels, pool_size, embedding_dim, act)

    bone_only = True
    """Lift on the bone's voxels and project the box around them only, where :meth:`lift` and
    :meth:`render` may; False: the dense convolutions and the whole volume (the same values and
    parameter gradients: for tests and benchmarks that compare)."""

    @property
    def camera(self) -> Camera:
        """The camera whose detector the projection and the target share."""
        return self.projector.camera

    # ------------------------------------------------------------------------------ stages

    def lift(self, bone_volume: Tensor) -> Tensor:
        """``(B|1, 1, D, H, W)`` bone mu -> ``(B|1, 1 + Cv, D, H, W)``: ``mu`` and ``mu softplus(z)``.

        It does not depend on the pose: registration computes it once. ``mu softplus(z)`` is
        zero wherever ``mu`` is, so on the CPU, when ``bone_volume`` needs no gradient (which
        would read ``z`` at those voxels too), ``z`` is computed on the bone's voxels only
        (:func:`_convolutions_on_support`).
        """
        self._check_bone(bone_volume)
        x = bone_volume / self.mu_scale
        z = None
        if self.bone_only and bone_volume.device.type == "cpu" and not bone_volume.requires_grad:
            z = _convolutions_on_support(self.lifter, x, bone_volume != 0)
        if z is None:
            z = self.lifter(x)
        return torch.cat((bone_volume, bone_volume * F.softplus(z)), dim=1)

    def render(self, lifted: Tensor, spacing: Sequence[float], pose: Tensor) -> Tensor:
        """Project a lifted volume at ``pose`` (B, 6): ``(B, 1 + Cv, h, w)``.

        Every channel of a lifted volume is zero where its bone channel (0) is, so on the CPU
        only the box of the bone's voxels is projected, in a frame moved to that box's centre:
        the same image from fewer samples (the projector's support reaches a voxel beyond a
        volume's last voxels, as the interpolant does; 30 % less time per projection on the CPU
        recipe's chest). The gradient it passes back to the voxels outside the box is zero:
        :meth:`lift`'s output there is zero whatever the network's weights, and only a gradient
        with respect to the bone volume itself, which prostlab never takes, would miss them
        (``bone_only = False`` projects the whole volume).
        """
        check_same_device(("lifted", lifted), ("pose", pose))
        box = _bone_box(lifted) if self.bone_only and lifted.device.type == "cpu" else None
        if box is None:
            return self.projector(lifted, spacing, pose)
        check_pose(pose)
        extrinsics = self.camera.extrinsics(pose)
        # The box's centre c in the volume frame; camera-from-box is [R | t + R c].
        centre = torch.tensor(
            [((lo + hi - 1) / 2 - (n - 1) / 2) * s
             for (lo, hi), n, s in zip(box, lifted.shape[2:], spacing, strict=True)],
            dtype=extrinsics.dtype, device=extrinsics.device,
        )
        rotation = extrinsics[:, :, :3]
        moved = torch.cat((rotation, extrinsics[:, :, 3:] + rotation @ centre[:, None]), dim=2)
        inside = lifted[(slice(None), slice(None), *(slice(lo, hi) for lo, hi in box))]
        return self.projector.render(inside, spacing, moved)

    def embed_projection(self, projection: Tensor) -> Tensor:
        """Embed ``(B, 1 + Cv, h, w)`` projections: ``(B, E)``."""
        return self.projection_encoder(projection)

    def embed_pose(self, bone_volume: Tensor, spacing: Sequence[float], pose: Tensor) -> Tensor:
        """The embedding of the bone volume seen at ``pose`` (B, 6): ``(B, E)``."""
        check_same_device(("bone_volume", bone_volume), ("pose", pose))
        return self.embed_projection(self.render(self.lift(bone_volume), spacing, pose))

    def embed_target(self, target: Tensor) -> Tensor:
        """Embed ``(B|1, 1, h, w)`` target X-rays (min-max normalised here): ``(B|1, E)``."""
        self._check_target(target)
        return self.target_encoder(minmax_normalise(target))

    @staticmethod
    def distance(embedding: Tensor, target_embedding: Tensor) -> Tensor:
        """Squared L2 distance of embeddings ``(B|1, E)``: ``(B,)``."""
        a, b = embedding.shape[0], target_embedding.shape[0]
        if a != b and 1 not in (a, b):
            raise ProstlabError(
                f"target: expected a batch of 1 or {a} (that of the poses), got {b}"
            )
        return (embedding - target_embedding).square().sum(dim=1)

    def forward(
        self, bone_volume: Tensor, spacing: Sequence[float], pose: Tensor, target: Tensor
    ) -> Tensor:
        """The similarity ``(B,)`` of the bone volume at ``pose`` (B, 6) to ``target``.

        Args:
            bone_volume: ``(B | 1, 1, D, H, W)`` segmented CT, attenuation in 1/mm.
            spacing: voxel size in mm, array-axis order.
            pose: ``(B, 6)`` poses (rad, mm).
            target: ``(B | 1, 1, h, w)`` X-rays on the camera's detector, any intensity scale.

        Returns:
            ``(B,)``, ``>= 0``, lower is better.
        """
        return self.distance(self.embed_pose(bone_volume, spacing, pose), self.embed_target(target))

    def _check_bone(self, bone_volume: object) -> None:
        if not isinstance(bone_volume, Tensor) or bone_volume.ndim != 5:
            got = (
                tuple(bone_volume.shape)
                if isinstance(bone_volume, Tensor)
                else type(bone_volume).__name__
            )
            raise ProstlabError(
                f"bone_volume: expected a tensor of shape (B | 1, 1, D, H, W), got {got}"
            )
        if bone_volume.shape[1] != 1 or not bone_volume.is_floating_point():
            raise ProstlabError(
                "bone_volume: expected one floating-point channel of bone attenuation, "
                f"(B | 1, 1, D, H, W), got shape {tuple(bone_volume.shape)}, {bone_volume.dtype}"
            )
        check_real_device(bone_volume, "bone_volume")
        check_same_device(("net", check_weights_device(self, "net")), ("bone_volume", bone_volume))

    def _check_target(self, target: object) -> None:
        camera = self.camera
        form = f"(B | 1, 1, {camera.height}, {camera.width})"
        if not isinstance(target, Tensor) or target.ndim != 4:
            got = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise ProstlabError(f"target: expected an X-ray tensor of shape {form}, got {got}")
        if target.shape[1] != 1 or tuple(target.shape[2:]) != (camera.height, camera.width):
            raise ProstlabError(
                f"target: expected shape {form} (one channel on the camera's detector), got "
                f"{tuple(target.shape)}"
            )
        if not target.is_floating_point():
            raise ProstlabError(f"target: expected a floating-point tensor, got {target.dtype}")
        check_real_device(target, "target")
        check_same_device(("net", check_weights_device(self, "net")), ("target", target))
