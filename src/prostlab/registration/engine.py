"""The registration engine: batched, multi-start, staged gradient descent on the pose manifold.

One loop serves every method. Each iteration, for every case still running:

1. evaluate its stage's objective at ``perturb(pose, delta)`` with ``delta = 0`` and take the
   gradient with respect to ``delta`` (the left-trivialised gradient, ``docs/geometry.md``);
2. record the pose and the value;
3. stop the case, or move it to its next stage, when its plateau rule or an iteration cap fires
   (its pose is then the last one evaluated, so its final value is known);
4. otherwise step: ``pose <- perturb(pose, delta)`` with ``delta`` from SGD with momentum or
   Adam in the tangent coordinates ``(r delta_rot, delta_trans)`` (see
   :mod:`prostlab.registration.schedule`).

Only running cases are evaluated: the objective of a stage is built for the indices of the cases
in it (``factory(stage, targets)``) and rebuilt when that set changes, so a case that has
stopped costs no rendering. A case whose value or gradient is NaN or infinite is marked
``"failed"`` and dropped; the others go on. Optimiser state is per case and starts afresh in
each stage. With several starts per target, every start runs as its own case in the same batch
and the one with the lowest final objective value is kept.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prostlab.errors import ProstlabError
from prostlab.geometry import perturb
from prostlab.geometry.checks import (
    check_batched,
    check_real_device,
    check_same_device,
    check_weights_device,
)
from prostlab.registration.levels import build_level
from prostlab.registration.schedule import Schedule, Stage, load_schedule

__all__ = [
    "STATUSES",
    "as_schedule",
    "ObjectiveFactory",
    "RegistrationRecord",
    "RegistrationResult",
    "optimise",
    "register",
    "stack_final_poses",
]

STATUSES = ("converged", "max_iterations", "failed")
"""How a case ends: the last stage's plateau rule fired, an iteration cap did, or NaN/inf."""

ObjectiveFactory = Callable[[Stage, Tensor], Callable[[Tensor], Tensor]]
"""``factory(stage, targets)`` -> ``objective(pose (n, 6)) -> (n,)``.

``stage`` is the :class:`Stage` the objective serves (its ``similarity``, ``moving`` and
resolution); ``targets`` is a ``(n,)`` long tensor of target indices (repeated when several
starts of one target run), in the order of the poses the objective will receive.
"""

_ADAM_BETA2 = 0.999
_ADAM_EPS = 1e-8


@dataclass
class RegistrationRecord:
    """The history and outcome of one case (one start of one target).

    Attributes:
        poses: ``(T, 6)`` the pose at each objective evaluation (rad, mm).
        values: ``(T,)`` the objective value there.
        stages: ``(T,)`` the stage index of each evaluation.
        switches: the iteration indices at which each later stage began (its first evaluation).
        wall_time: seconds from the start of the batched run until this case stopped.
        final_pose: ``(6,)``: the last pose evaluated; for a failed case, the last pose whose
            value and gradient were finite (the initial pose if none).
        final_value: the objective there (NaN for a failed case).
        status: one of :data:`STATUSES`.
        n_iterations: ``T``, the number of objective evaluations.
        start: which of the target's initial poses this case started from.
        message: why a case failed, empty otherwise.
    """

    poses: Tensor
    values: Tensor
    stages: Tensor
    switches: list[int]
    wall_time: float
    final_pose: Tensor
    final_value: float
    status: str
    n_iterations: int
    start: int = 0
    message: str = ""


@dataclass
class RegistrationResult:
    """The outcome of a batched registration.

    Attributes:
        records: one record per target: its best start (lowest final value among the starts
            that did not fail; start 0 if all failed).
        all_records: ``all_records[b][s]``, every start of every target.
        schedule: the schedule that ran.
    """

    records: list[RegistrationRecord]
    all_records: list[list[RegistrationRecord]]
    schedule: Schedule = field(repr=False)

    @property
    def final_poses(self) -> Tensor:
        """``(B, 6)`` the kept final pose of each target."""
        return stack_final_poses(self.records)

    @property
    def final_values(self) -> Tensor:
        """``(B,)`` float64, the kept final objective value of each target."""
        return torch.tensor([r.final_value for r in self.records], dtype=torch.float64)

    @property
    def statuses(self) -> list[str]:
        """The kept status of each target."""
        return [r.status for r in self.records]


def stack_final_poses(records: Sequence[RegistrationRecord]) -> Tensor:
    """``(B, 6)``: the final poses of records, stacked in order."""
    if len(records) == 0:
        raise ProstlabError("records: expected at least one RegistrationRecord, got none")
    return torch.stack([r.final_pose for r in records])


def _initial_poses(initial_poses: object) -> Tensor:
    """Validate ``(B, 6)`` or ``(B, S, 6)`` finite poses; return ``(B, S, 6)``."""
    if isinstance(initial_poses, Tensor) and initial_poses.ndim == 3:
        if initial_poses.shape[1] == 0:
            raise ProstlabError("initial_poses: expected at least one start, shape (B, S >= 1, 6)")
        check_batched(initial_poses.reshape(-1, initial_poses.shape[-1]), "initial_poses", (6,))
        poses = initial_poses
    else:
        if isinstance(initial_poses, Tensor) and initial_poses.ndim != 2:
            raise ProstlabError(
                f"initial_poses: expected shape (B, 6) or (B, S, 6), got "
                f"{tuple(initial_poses.shape)}"
            )
        poses = check_batched(initial_poses, "initial_poses", (6,))[:, None]
    if poses.shape[0] == 0:
        raise ProstlabError("initial_poses: expected at least one case, got batch size 0")
    if not bool(torch.isfinite(poses).all()):
        bad = sorted({int(i) for i in torch.nonzero(~torch.isfinite(poses))[:, 0]})
        raise ProstlabError(
            f"initial_poses: expected finite values (rad, mm), got NaN or inf for case(s) {bad}"
        )
    return poses.detach()


def as_schedule(schedule: object) -> Schedule:
    """A :class:`Schedule` from itself, a preset name or YAML path, or its config mapping."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, (str, Path)):
        return load_schedule(schedule)
    return Schedule.from_config(schedule)


class _Cases:
    """The running state of every case (one start of one target)."""

    def __init__(self, poses: Tensor):
        n = poses.shape[0]
        self.pose = poses.clone()
        self.good_pose = poses.clone()
        self.stage = [0] * n
        self.stage_values: list[list[float]] = [[] for _ in range(n)]
        self.poses: list[list[Tensor]] = [[] for _ in range(n)]
        self.values: list[list[float]] = [[] for _ in range(n)]
        self.stages: list[list[int]] = [[] for _ in range(n)]
        self.switches: list[list[int]] = [[] for _ in range(n)]
        self.status: list[str | None] = [None] * n
        self.message = [""] * n
        self.end = [0.0] * n
        zeros = torch.zeros_like(poses)
        self.m1, self.m2 = zeros.clone(), zeros.clone()
        self.count = torch.zeros(n, dtype=poses.dtype, device=poses.device)

    def reset_optimiser(self, n: int) -> None:
        self.m1[n] = 0
        self.m2[n] = 0
        self.count[n] = 0


def _direction(stage: Stage, cases: _Cases, idx: Tensor, grad: Tensor) -> Tensor:
    """The step ``delta`` (rad, mm) of the cases ``idx`` with gradients ``grad`` (rad, mm)."""
    r = stage.rotation_radius
    g = torch.cat((grad[:, :3] / r, grad[:, 3:]), dim=-1)  # gradient in u = (r delta_rot, dt)
    if stage.optimizer == "sgd":
        m1 = stage.momentum * cases.m1[idx] + g
        cases.m1[idx] = m1
        step = -stage.lr * m1
    else:  # adam
        b1 = stage.momentum
        count = cases.count[idx] + 1
        cases.count[idx] = count
        m1 = b1 * cases.m1[idx] + (1 - b1) * g
        m2 = _ADAM_BETA2 * cases.m2[idx] + (1 - _ADAM_BETA2) * g * g
        cases.m1[idx], cases.m2[idx] = m1, m2
        m1_hat = m1 / (1 - b1**count)[:, None]
        m2_hat = m2 / (1 - _ADAM_BETA2**count)[:, None]
        step = -stage.lr * m1_hat / (m2_hat.sqrt() + _ADAM_EPS)
    return torch.cat((step[:, :3] / r, step[:, 3:]), dim=-1)


def optimise(
    factory: ObjectiveFactory,
    initial_poses: Tensor,
    schedule: Schedule | Any,
    progress: Callable[[int, int], None] | None = None,
) -> RegistrationResult:
    """Run a schedule on a batch of cases, given a factory of objectives.

    This is the engine under :func:`register`; use it directly to register with objectives of
    your own.

    Args:
        factory: ``factory(stage, targets)`` -> ``objective(pose) -> values`` (see
            :data:`ObjectiveFactory`): lower is better, differentiable in the pose, one value per
            pose and independent across poses.
        initial_poses: ``(B, 6)`` one start per target, or ``(B, S, 6)`` S starts per target.
        schedule: a :class:`Schedule`, its config (dict or list), or a preset name/YAML path.
        progress: called after each iteration with ``(iteration, cases still running)``.

    Returns:
        The :class:`RegistrationResult`: per target the best start, and all starts.
    """
    schedule = as_schedule(schedule)
    starts = _initial_poses(initial_poses)
    n_targets, n_starts = starts.shape[:2]
    target_of = torch.arange(n_targets).repeat_interleave(n_starts)
    cases = _Cases(starts.reshape(-1, 6))
    n_cases = len(cases.status)
    objectives: dict[int, tuple[tuple[int, ...], Callable[[Tensor], Tensor]]] = {}
    t0 = time.perf_counter()

    def stop(n: int, status: str, message: str = "") -> None:
        cases.status[n], cases.message[n] = status, message
        cases.end[n] = time.perf_counter() - t0

    for iteration in range(schedule.max_total_iterations):
        running = [n for n in range(n_cases) if cases.status[n] is None]
        if not running:
            break
        if progress is not None and iteration:
            progress(iteration, len(running))
        groups = [
            tuple(n for n in running if cases.stage[n] == k) for k in range(len(schedule.stages))
        ]
        for k, (stage, members) in enumerate(zip(schedule.stages, groups, strict=True)):
            if not members:
                objectives.pop(k, None)
                continue
            if k not in objectives or objectives[k][0] != members:
                idx_targets = target_of[list(members)]
                objectives[k] = (members, factory(stage, idx_targets))
            objective = objectives[k][1]
            idx = torch.tensor(members, device=cases.pose.device)
            pose = cases.pose[idx]
            delta = torch.zeros_like(pose, requires_grad=True)
            with torch.enable_grad():
                values = objective(perturb(pose, delta))
                if not isinstance(values, Tensor) or tuple(values.shape) != (len(members),):
                    got = tuple(values.shape) if isinstance(values, Tensor) else type(values)
                    raise ProstlabError(
                        f"objective ({stage.similarity!r}): expected {len(members)} values, "
                        f"shape ({len(members)},), got {got}"
                    )
                (grad,) = torch.autograd.grad(values.sum(), delta, allow_unused=True)
            if grad is None:
                grad = torch.zeros_like(pose)
            values = values.detach().to(pose.dtype)
            finite = torch.isfinite(values) & torch.isfinite(grad).all(-1)
            value_list, finite_list = values.tolist(), finite.tolist()

            moving: list[int] = []
            for j, n in enumerate(members):
                cases.poses[n].append(pose[j])
                cases.values[n].append(value_list[j])
                cases.stages[n].append(k)
                if not finite_list[j]:
                    what = "value" if not torch.isfinite(values[j]) else "gradient"
                    stop(
                        n,
                        "failed",
                        f"non-finite objective {what} at iteration "
                        f"{len(cases.values[n]) - 1} (stage {k}, {stage.similarity})",
                    )
                    continue
                cases.good_pose[n] = pose[j]
                history = cases.stage_values[n]
                history.append(value_list[j])
                last = k == len(schedule.stages) - 1
                plateau = (
                    len(history) >= stage.plateau_window
                    and statistics.pstdev(history[-stage.plateau_window :]) < stage.plateau_std
                )
                if plateau and last:
                    stop(n, "converged")
                elif len(cases.values[n]) >= schedule.max_total_iterations or (
                    last and len(history) >= stage.max_iterations
                ):
                    stop(n, "max_iterations")
                elif plateau or len(history) >= stage.max_iterations:
                    cases.stage[n] = k + 1
                    cases.stage_values[n] = []
                    cases.switches[n].append(len(cases.values[n]))
                    cases.reset_optimiser(n)
                else:
                    moving.append(j)
            if not moving:
                continue
            rows = torch.tensor(moving, device=idx.device)
            with torch.no_grad():
                step = _direction(stage, cases, idx[rows], grad[rows].to(pose.dtype))
                new = perturb(pose[rows], step)
            ok = torch.isfinite(new).all(-1).tolist()
            for row, j in enumerate(moving):
                n = members[j]
                if ok[row]:
                    cases.pose[n] = new[row]
                else:
                    stop(n, "failed", f"non-finite step at iteration {len(cases.values[n]) - 1}")

    for n in range(n_cases):  # only reachable when the loop ran out, defensively
        if cases.status[n] is None:
            stop(n, "max_iterations")

    records = []
    for n in range(n_cases):
        failed = cases.status[n] == "failed"
        count = len(cases.values[n])
        records.append(
            RegistrationRecord(
                poses=torch.stack(cases.poses[n]) if count else starts.new_zeros(0, 6),
                values=torch.tensor(cases.values[n], dtype=torch.float64),
                stages=torch.tensor(cases.stages[n], dtype=torch.long),
                switches=list(cases.switches[n]),
                wall_time=cases.end[n],
                final_pose=cases.good_pose[n].clone() if failed else cases.poses[n][-1].clone(),
                final_value=float("nan") if failed else cases.values[n][-1],
                status=cases.status[n] or "max_iterations",
                n_iterations=count,
                start=n % n_starts,
                message=cases.message[n],
            )
        )
    grouped = [records[b * n_starts : (b + 1) * n_starts] for b in range(n_targets)]
    return RegistrationResult([_best(g) for g in grouped], grouped, schedule)


def _best(records: list[RegistrationRecord]) -> RegistrationRecord:
    """The start with the lowest final value among those that did not fail (else the first)."""
    kept = [r for r in records if r.status != "failed"]
    if not kept:
        return records[0]
    return min(kept, key=lambda r: (r.final_value, r.start))


def _take(x: Tensor | None, targets: Tensor) -> Tensor | None:
    """Index a ``(B | 1, ...)`` tensor by target indices; a batch of 1 is shared as is."""
    if x is None or x.shape[0] == 1:
        return x
    return x[targets.to(x.device)]


def register(
    target: Tensor,
    initial_poses: Tensor,
    schedule: Schedule | str | Path | Any,
    *,
    projector: Any,
    spacing: Sequence[float],
    ct: Tensor | None = None,
    bone: Tensor | None = None,
    net: Any = None,
    mask: Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RegistrationResult:
    """Register a batch of X-rays to their volumes.

    The objectives are those of :func:`prostlab.similarity.objective.make_objective`. Each stage
    chooses what it renders (:attr:`Stage.moving`): by default ``"net"`` renders ``bone`` through
    the network and the image similarities (``"ncc"``, ``"gradncc"``, ``"mncc"``) render ``ct``;
    ``moving: bone`` on an image stage gives ProST's bone-only DRR against a whole-CT X-ray.
    Pass the volumes the stages need (both, for a net-then-image schedule).

    A stage with ``detector_scale < 1`` or ``volume_downsample > 1`` works on a coarser detector
    or volume (:mod:`prostlab.registration.levels`): its projector, pooled targets, volumes and
    mask are built once, before the first iteration, for each distinct resolution.

    Args:
        target: ``(B, 1, h, w)`` X-rays on ``projector``'s detector.
        initial_poses: ``(B, 6)`` or ``(B, S, 6)`` starting poses (rad, mm), finite.
        schedule: a :class:`Schedule`, its config, or a preset name / YAML path
            (:func:`~prostlab.registration.load_schedule`).
        projector: the :class:`~prostlab.projector.Projector` (its camera fixes the detector).
        spacing: voxel size in mm, array-axis order.
        ct: ``(B | 1, 1, D, H, W)`` whole-CT attenuation (1/mm), rendered by stages with
            ``moving: ct`` (the image similarities' default).
        bone: ``(B | 1, 1, D, H, W)`` segmented attenuation, rendered by stages with
            ``moving: bone`` (the network's default).
        net: the :class:`~prostlab.similarity.ConvexSimilarityNet` for ``"net"``.
        mask: optional ``(B | 1, 1, h, w)`` pixel weights for the image similarities.
        progress: called after each iteration with ``(iteration, cases still running)``.

    Returns:
        A :class:`RegistrationResult`.
    """
    from prostlab.similarity.objective import make_objective

    schedule = as_schedule(schedule)
    camera = getattr(projector, "camera", None)
    if camera is None:
        raise ProstlabError(
            f"projector: expected a prostlab Projector, got {type(projector).__name__}"
        )
    if not isinstance(target, Tensor) or target.ndim != 4 or target.shape[1] != 1:
        got = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ProstlabError(f"target: expected a tensor of shape (B, 1, h, w), got {got}")
    check_real_device(target, "target")
    if tuple(target.shape[2:]) != (camera.height, camera.width):
        raise ProstlabError(
            f"target: expected images of the camera's detector, (B, 1, {camera.height}, "
            f"{camera.width}), got {tuple(target.shape)}"
        )
    starts = _initial_poses(initial_poses)
    if starts.shape[0] != target.shape[0]:
        raise ProstlabError(
            f"initial_poses: expected a batch of {target.shape[0]} (one per target), got "
            f"{starts.shape[0]}"
        )
    for name, volume in (("ct", ct), ("bone", bone), ("mask", mask)):
        if volume is not None and (
            not isinstance(volume, Tensor) or volume.shape[0] not in (1, target.shape[0])
        ):
            got = tuple(volume.shape) if isinstance(volume, Tensor) else type(volume).__name__
            raise ProstlabError(
                f"{name}: expected a tensor with batch 1 or {target.shape[0]} (the targets'), "
                f"got {got}"
            )
        if volume is not None:
            check_real_device(volume, name)
    weights = check_weights_device(net, "net") if isinstance(net, nn.Module) else None
    check_same_device(("target", target), ("initial_poses", starts), ("ct", ct), ("bone", bone),
                      ("mask", mask), ("net", weights))

    levels = {}
    for k, stage in enumerate(schedule.stages):
        key = (stage.detector_scale, stage.volume_downsample)
        if key not in levels:
            levels[key] = build_level(
                projector, spacing, target, ct, bone, mask, *key, where=f"stages[{k}]"
            )

    def factory(stage: Stage, targets: Tensor) -> Callable[[Tensor], Tensor]:
        level = levels[(stage.detector_scale, stage.volume_downsample)]
        return make_objective(
            stage.similarity,
            projector=level.projector,
            ct=_take(level.ct, targets),
            bone=_take(level.bone, targets),
            spacing=level.spacing,
            target=level.target[targets.to(target.device)],
            net=net,
            mask=_take(level.mask, targets),
            moving=stage.moving,
        )

    return optimise(factory, starts, schedule, progress)
