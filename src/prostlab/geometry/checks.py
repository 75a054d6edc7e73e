"""Input validation shared by the geometry functions and the modules built on them.

Every check names the offending argument and the form it expected, e.g.
``pose: expected shape (B, 6), got (3,)``. Shape and dtype checks never synchronise with the
device; only :func:`check_pose` looks at the values (finiteness), which costs one sync.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from prostlab.errors import ProstlabError

if TYPE_CHECKING:
    from prostlab.geometry.camera import Camera


def check_real_device(x: Tensor, name: str) -> Tensor:
    """Refuse a tensor on the ``meta`` device; return ``x``.

    A meta tensor has a shape and a dtype but no data, so nothing can be computed from it:
    torch failed deep inside with ``Tensor.item() cannot be called on meta tensors`` or ``Tensor
    on device cpu is not on the expected device meta!``, naming no argument. The public entry
    points (the projector, the similarities, the network, the objectives and ``register``) check
    their tensors here.
    """
    if x.device.type == "meta":
        raise _on_meta(name)
    return x


def _on_meta(name: str) -> ProstlabError:
    """The refusal of a tensor ``name`` on the meta device."""
    return ProstlabError(
        f"{name}: expected a tensor on a real device (cpu or cuda), got one on the meta device, "
        "which holds no data"
    )


def check_weights_device(module: nn.Module, name: str) -> torch.device | None:
    """The device of ``module``'s parameters and buffers (``None`` if it has none); refuse meta.

    A module built under ``torch.device("meta")`` has weights with shapes but no data, and
    torch failed inside it with ``Tensor on device meta is not on the expected device cpu!``.
    Weights on several devices give the first one's; :func:`check_same_device` then compares it
    with the inputs'.
    """
    devices = [w.device for w in (*module.parameters(), *module.buffers())]
    if any(device.type == "meta" for device in devices):
        raise ProstlabError(
            f"{name}: the {type(module).__name__}'s weights are on the meta device, which holds "
            f"no data; expected real weights: {name}.to_empty(device=...) (cpu or cuda), then "
            "its weights loaded (load_state_dict)"
        )
    return devices[0] if devices else None


def check_same_device(*named: tuple[str, object]) -> None:
    """Refuse arguments on different devices, naming the first that differs and the first one.

    Each of ``named`` is ``(name, x)``, ``x`` a tensor (only its ``.device`` is read), a
    ``torch.device`` (a module's, from :func:`check_weights_device`), or anything else, which is
    skipped (``None``, a value whose own check refuses it). torch refused a mix of cpu and cuda
    deep inside a kernel, naming no argument, or copied silently where an operation allows it.
    One on the meta device is refused as :func:`check_real_device` refuses it.
    """
    devices = [(name, x if isinstance(x, torch.device) else getattr(x, "device", None))
               for name, x in named]
    devices = [(name, device) for name, device in devices if isinstance(device, torch.device)]
    for name, device in devices:
        if device.type == "meta":
            raise _on_meta(name)
    if not devices:
        return
    first, expected = devices[0]
    for name, device in devices[1:]:
        if device != expected:
            raise ProstlabError(
                f"{name}: on {device}, but {first} is on {expected}; expected both on one "
                "device (move one with .to(device))"
            )


def check_tensor(x: object, name: str, trailing: tuple[int, ...], form: str) -> Tensor:
    """Check that ``x`` is a floating-point tensor whose shape ends with ``trailing``.

    Args:
        x: the value to check.
        name: the argument's name, used in error messages.
        trailing: the required trailing dimensions, e.g. ``(3, 3)``; any leading dimensions pass.
        form: the expected form as written in error messages, e.g. ``"(..., 3, 3)"``.

    Returns:
        ``x``, unchanged.

    Raises:
        TypeError: ``x`` is not a tensor, or not of a floating-point dtype.
        ValueError: the shape does not end with ``trailing``, or ``x`` is on the meta device
            (:func:`check_real_device`).
    """
    if not isinstance(x, Tensor):
        raise ProstlabError(
            f"{name}: expected a torch.Tensor of shape {form}, got {type(x).__name__}"
        )
    check_real_device(x, name)
    if not x.is_floating_point():
        raise ProstlabError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    n = len(trailing)
    if x.ndim < n or tuple(x.shape[x.ndim - n :]) != trailing:
        raise ProstlabError(f"{name}: expected shape {form}, got {tuple(x.shape)}")
    return x


def check_batched(x: object, name: str, trailing: tuple[int, ...]) -> Tensor:
    """Check that ``x`` is a floating-point tensor of shape ``(B, *trailing)``.

    Error messages write the form as ``(B, 6)``, ``(B, 4, 4)``, and so on.
    """
    form = "(B, " + ", ".join(str(d) for d in trailing) + ")"
    x = check_tensor(x, name, trailing, form)
    if x.ndim != len(trailing) + 1:
        raise ProstlabError(f"{name}: expected shape {form}, got {tuple(x.shape)}")
    return x


def check_same_batch(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Check that two batched tensors have equal batch sizes or that one of them is 1."""
    na, nb = a.shape[0], b.shape[0]
    if na != nb and 1 not in (na, nb):
        raise ProstlabError(f"{name_b}: expected batch size {na} (that of {name_a}) or 1, got {nb}")


def check_pose(pose: object, name: str = "pose") -> Tensor:
    """Validate a batch of poses: a finite floating-point tensor of shape ``(B, 6)``.

    A pose is ``(omega, t)``: a rotation vector in radians and a translation in mm (see
    ``docs/geometry.md``). This check reads the values to test finiteness, which synchronises
    with the device; the geometry functions themselves check only shape and dtype.

    Args:
        pose: the value to check.
        name: the argument's name, used in error messages.

    Returns:
        ``pose``, unchanged.

    Raises:
        TypeError: not a tensor, or not of a floating-point dtype.
        ValueError: the shape is not ``(B, 6)`` or a value is NaN or infinite.
    """
    pose = check_batched(pose, name, (6,))
    if not bool(torch.isfinite(pose).all()):
        raise ProstlabError(f"{name}: expected finite values, got NaN or inf")
    return pose


def check_weight(value: object, name: str, *, positive: bool = False) -> float:
    """Check that ``value`` is a number >= 0 (> 0 when ``positive``); return it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ProstlabError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    bad = not value > 0 if positive else not value >= 0
    if bad or value == float("inf"):
        kind = "positive" if positive else "non-negative"
        raise ProstlabError(f"{name}: expected a finite {kind} number, got {value}")
    return value


def check_pose_in_beam(pose: Tensor, camera: Camera, name: str = "pose") -> Tensor:
    """Refuse poses that put the volume's centre where no ray of ``camera`` can reach it.

    The centre, at the pose's translation ``t`` from the isocentre, must lie between the source
    and the detector along the beam (``-sid < t_z < sdd - sid``) and, across it, within the
    detector's size in mm of the beam's axis (a generous bound: the field at the isocentre is
    smaller by the magnification). A pose 1e9 mm away renders a blank image and registers to
    nothing; it is a typing error, not a position.
    """
    pose = check_pose(pose, name)
    width = camera.width * camera.pixel_spacing[1]
    height = camera.height * camera.pixel_spacing[0]
    for i, (tx, ty, tz) in enumerate(pose[:, 3:].tolist()):
        if not (-camera.sid < tz < camera.sdd - camera.sid and abs(tx) <= width
                and abs(ty) <= height):
            which = f"{name} {i + 1}" if len(pose) > 1 else name
            raise ProstlabError(
                f"{which}: translation ({tx:.4g}, {ty:.4g}, {tz:.4g}) mm puts the volume's centre "
                f"outside the beam; expected -{camera.sid:g} < tz < {camera.sdd - camera.sid:g} "
                f"mm (between the source and the detector) and |tx| <= {width:.4g}, |ty| <= "
                f"{height:.4g} mm (the detector's size)"
            )
    return pose


def depth_outside_beam(pose: Tensor, camera: Camera, half_extent_mm: Sequence[float]) -> Tensor:
    """How far a volume's box reaches behind the source or past the detector, per pose, in mm.

    The box ``|x_a| <= h_a`` of the volume frame (``half_extent_mm``, the projector's support,
    ``(N_a + 1) / 2 * s_a``) is moved by each pose into the camera frame (source at ``z = 0``,
    detector at ``z = sdd``). Rays are integrated from the source to the detector only, so the
    part of the box outside ``0 <= z <= sdd`` is missing from the DRR. Returns ``(B,)``:
    ``max(z_max - sdd, -z_min, 0)`` over the box's eight corners.
    """
    pose = check_pose(pose, "pose")
    half = torch.tensor(half_extent_mm, dtype=pose.dtype, device=pose.device)
    signs = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)],
                         dtype=pose.dtype, device=pose.device) * 2 - 1
    extrinsics = camera.extrinsics(pose)  # (B, 3, 4)
    z = (signs * half) @ extrinsics[:, 2, :3].T + extrinsics[:, 2, 3]  # (8, B)
    past = torch.stack((z.amax(0) - camera.sdd, -z.amin(0), torch.zeros_like(z[0])))
    return past.amax(0)
