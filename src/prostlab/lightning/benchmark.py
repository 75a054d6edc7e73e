"""The registration benchmark that ``prostlab test`` runs in the Lightning test loop.

Each test case is a ground-truth pose, a target X-ray rendered from the **whole CT** there (at
the moving volume's resolution, or finer, with detector blur and Poisson noise as ``target``
says: :mod:`prostlab.lightning.targets`) and an initial pose; or, when the batch carries them
(DeepFluoro, :mod:`prostlab.data.deepfluoro`), a real X-ray ``target`` with its ``target_mask``
and the CT's 3D ``landmarks``, which add landmark scores to the rows. Every method (a
named registration schedule) registers the same cases; each stage renders what it chooses (the
network the segmented bones, as ProST; the image similarities the whole CT), or what
``moving`` forces on every stage. Each (case, method) gives one row of errors, iterations and
time; the rows of all processes are gathered, sorted by case, and written as ``cases.csv``,
``summary.json``, ``summary.md`` and figures into the run's own folder
``output_dir/<run_name or timestamp>/`` (``-2``, ``-3``, ... appended when taken); the link
``output_dir/latest`` then points at it. The folder is created, and checked for writability,
before the first registration (:mod:`prostlab.outputs`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prostlab.benchmark.capture import (
    DEFAULT_BINS_MM,
    DEFAULT_CAPTURE_MIN_CASES,
    DEFAULT_CAPTURE_RATE,
    bin_edges,
    capture_range,
)
from prostlab.data.deepfluoro import check_fitted_camera
from prostlab.errors import ProstlabError
from prostlab.lightning.benchmark_output import write_benchmark
from prostlab.lightning.targets import TargetConfig, render_targets
from prostlab.metrics.functional import (
    diffpose_mtre,
    mean_projection_distance,
    mtre,
    rotation_error,
    translation_error,
)
from prostlab.outputs import check_run_name, check_writable_dir, new_run_dir
from prostlab.registration import Schedule, as_schedule, register

DEFAULT_METHODS = {"gradncc": "gradncc", "ncc": "ncc", "mncc": "mncc", "net": "net",
                   "net_gradncc": "net_gradncc"}


@dataclass
class BenchmarkConfig:
    """What ``prostlab test`` runs (the ``model.benchmark`` section of a config).

    Attributes:
        methods: name -> schedule (a preset of configs/registration or a schedule mapping).
        moving: None: each stage renders its own choice (``Stage.moving``; by default the
            network the bones, the image similarities the whole CT). "bone" or "ct" overrides
            every stage of every method: "bone" is ProST's protocol (bones everywhere, as on
            its pelvis data); "ct" also feeds the whole CT to the network.
        target: how targets are rendered, a mapping of
            :class:`~prostlab.lightning.targets.TargetConfig` fields (``volume: ct | fine``,
            ``step_mm``, ``photons``, ``blur_mm``); empty: the moving CT's own DRR.
        bins_mm: finite edges of the initial-mTRE bins the success is counted in, mm (an open
            bin follows the last).
        capture_rate: the success fraction every bin inside the capture range reaches.
        capture_min_cases: cases a bin needs to count for the capture range.
        output_dir: the folder of the runs; each run writes its tables and figures into a new
            folder ``output_dir/<run_name>`` and points ``output_dir/latest`` at it.
        run_name: the run's folder name; None: the start time, ``YYYY-MM-DD_HH-MM-SS``. A name
            that is taken gets ``-2``, ``-3``, ... appended: earlier results are never replaced.
        overlays: cases drawn in the overlay figure.
        gif_case: the case whose registration (by the last method) is animated; None: none.
        max_frames: frames of the animation at most.
        max_iterations: caps every method's ``max_total_iterations`` (for short runs on a CPU;
            None keeps the schedules' own caps).
    """

    methods: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_METHODS))
    moving: str | None = None
    target: dict[str, Any] = field(default_factory=dict)
    bins_mm: list[float] = field(default_factory=lambda: list(DEFAULT_BINS_MM))
    capture_rate: float = DEFAULT_CAPTURE_RATE
    capture_min_cases: int = DEFAULT_CAPTURE_MIN_CASES
    output_dir: str = "results/benchmark"
    run_name: str | None = None
    overlays: int = 4
    gif_case: int | None = 0
    max_frames: int = 60
    max_iterations: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> BenchmarkConfig:
        config = dict(config or {})
        if "photons" in config:
            raise ProstlabError("model.benchmark.photons: moved; expected "
                                "model.benchmark.target.photons")
        unknown = sorted(set(config) - set(cls.__dataclass_fields__))
        if unknown:
            raise ProstlabError(f"model.benchmark: unknown key(s) {unknown}; expected among "
                                f"{sorted(cls.__dataclass_fields__)}")
        made = cls(**config)
        if made.moving not in (None, "bone", "ct"):
            raise ProstlabError(f"model.benchmark.moving: expected 'bone', 'ct' or null (each "
                                f"stage's own choice), got {made.moving!r}")
        if not made.methods:
            raise ProstlabError("model.benchmark.methods: expected at least one method")
        if made.run_name is not None:
            check_run_name(made.run_name, "model.benchmark.run_name")
        TargetConfig.from_config(made.target)  # refused now, not at the first case
        made.bins_mm = bin_edges(made.bins_mm, "model.benchmark.bins_mm").tolist()
        try:
            capture_range([], made.capture_rate, made.capture_min_cases)
        except ProstlabError as exc:
            raise ProstlabError(f"model.benchmark.{exc}") from exc
        return made

    @property
    def target_config(self) -> TargetConfig:
        """``target`` as a validated :class:`~prostlab.lightning.targets.TargetConfig`."""
        return TargetConfig.from_config(self.target)

    def schedules(self) -> dict[str, Schedule]:
        """Each method's schedule, validated (errors name the method), with ``moving`` and
        ``max_iterations`` applied."""
        out = {}
        for name, schedule in self.methods.items():
            try:
                out[name] = as_schedule(schedule)
            except ProstlabError as exc:
                raise ProstlabError(f"model.benchmark.methods.{name}: {exc}") from exc
            if self.moving is not None:
                stages = [dataclasses.replace(s, moving=self.moving) for s in out[name].stages]
                out[name] = dataclasses.replace(out[name], stages=tuple(stages))
            if self.max_iterations is not None:
                cap = min(out[name].max_total_iterations, int(self.max_iterations))
                out[name] = dataclasses.replace(out[name], max_total_iterations=cap)
        return out


@dataclass
class CaseOutcome:
    """What a figure needs of one case and method beyond its row."""

    case: int
    method: str
    target: torch.Tensor  # (h, w)
    poses: torch.Tensor  # (T, 6) per iteration
    initial: torch.Tensor  # (6,)
    final: torch.Tensor  # (6,)
    gt: torch.Tensor  # (6,)
    volume_index: int


def case_rows(method: str, batch_cases: torch.Tensor, volume_index: int, gt: torch.Tensor,
              initial: torch.Tensor, result, points: torch.Tensor, camera,
              threshold_mm: float, landmarks: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """One row per case of a registration result (see docs/benchmark.md for the columns).

    With ``landmarks`` ``(L, 3)`` (volume frame, mm) the rows also hold the 3D mTRE over them,
    initial and final, the final 2D mean reprojection distance on the detector plane, mm, and
    DiffPose's ``Evaluator`` quantity, initial and final (``metrics.diffpose_mtre``).
    """
    final = result.final_poses.to(gt)
    failed = torch.tensor([r.status == "failed" for r in result.records])
    nan = torch.full_like(failed, math.nan, dtype=torch.float64)

    def measure(fn, poses, *extra):
        return fn(poses.double(), gt.double(), *extra).cpu()

    init_errors = (measure(rotation_error, initial), measure(translation_error, initial),
                   measure(mtre, initial, points.double()))
    final_errors = [measure(rotation_error, final), measure(translation_error, final),
                    measure(mtre, final, points.double()),
                    measure(mean_projection_distance, final, points.double(), camera)]
    final_errors = [torch.where(failed, nan, e) for e in final_errors]
    scores = {}
    if landmarks is not None:
        marks = landmarks.double()
        scores = {
            "initial_landmark_mtre_mm": measure(mtre, initial, marks),
            "final_landmark_mtre_mm": torch.where(failed, nan, measure(mtre, final, marks)),
            "final_landmark_mrpd_mm": torch.where(
                failed, nan, measure(mean_projection_distance, final, marks, camera)),
            "initial_diffpose_mtre": measure(diffpose_mtre, initial, marks, camera),
            "final_diffpose_mtre": torch.where(
                failed, nan, measure(diffpose_mtre, final, marks, camera)),
        }
    rows = []
    for i, record in enumerate(result.records):
        final_mtre = float(final_errors[2][i])
        rows.append({
            "case": int(batch_cases[i]),
            "volume_index": int(volume_index),
            "method": method,
            "initial_rotation_error_deg": float(init_errors[0][i]),
            "initial_translation_error_mm": float(init_errors[1][i]),
            "initial_mtre_mm": float(init_errors[2][i]),
            "final_rotation_error_deg": float(final_errors[0][i]),
            "final_translation_error_mm": float(final_errors[1][i]),
            "final_mtre_mm": final_mtre,
            "final_mpd_mm": float(final_errors[3][i]),
            "iterations": int(record.n_iterations),
            "switch_iteration": int(record.switches[0]) if record.switches else -1,
            "seconds": float(record.wall_time),
            "status": record.status,
            "success": bool(final_mtre < threshold_mm),
            **{key: float(values[i]) for key, values in scores.items()},
        })
    return rows


class BenchmarkLoop:
    """The test-loop hooks of a LightningModule that holds ``net``, ``volumes`` and ``hparams``
    (``benchmark``, ``success_threshold_mm``) — mixed into :class:`ConvexSimilarityModule`."""

    def on_test_epoch_start(self) -> None:
        self.bench = BenchmarkConfig.from_config(self.hparams.benchmark)
        self.bench_schedules = self.bench.schedules()
        check_trained_network(self, self.trainer.ckpt_path)  # trainer.test() from Python too
        # Before the first registration: an unwritable output_dir is refused now, not after the
        # benchmark. Every process checks (so all stop together); the first one takes the folder.
        what = "model.benchmark.output_dir"
        check_writable_dir(self.bench.output_dir, what)
        self.bench_folder: Path | None = None
        if self.trainer.global_rank == 0:
            self.bench_folder = new_run_dir(self.bench.output_dir, self.bench.run_name, what)
        datamodule = self.trainer.datamodule
        for camera in datamodule.xray_cameras():
            check_fitted_camera(self.camera, camera)
        if self.bench.target_config.volume == "fine":
            self.volumes.keep_fine(datamodule.full_resolution_cts(datamodule.split["test"]))
        self.bench_rows: list[dict[str, Any]] = []
        self.bench_outcomes: list[CaseOutcome] = []

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        with torch.inference_mode(False), torch.enable_grad():
            batch = {k: v.clone() for k, v in batch.items()}
            for view, sel in self.volumes.groups(batch["volume_index"]):
                real = {key: batch[key][sel] for key in ("target", "target_mask", "landmarks")
                        if key in batch}
                self._benchmark_group(view, int(batch["volume_index"][sel][0]),
                                      batch["gt_pose"][sel], batch["initial_pose"][sel],
                                      batch["case"][sel], **real)
        last = list(self.bench_schedules)[-1]
        done = [r["success"] for r in self.bench_rows if r["method"] == last]
        self.log(f"test/{last}/success_running", sum(done) / max(len(done), 1), prog_bar=True,
                 batch_size=len(batch["case"]))

    def _benchmark_group(self, view, volume_index, gt, initial, cases, target=None,
                         target_mask=None, landmarks=None) -> None:
        """Register one volume's cases by every method: against the batch's real ``target``
        ``(B, 1, h, w)`` (pixels weighted by ``target_mask``) when it has one, else against
        targets rendered at ``gt``. ``landmarks`` ``(B, L, 3)``, shared by the volume's cases,
        add landmark scores over their finite rows."""
        if target is None:
            target = render_targets(self.bench.target_config, self.net.projector, view, gt,
                                    cases, self.trainer.datamodule.seed)
        mask = None if target_mask is None else target_mask.to(target.dtype)
        marks = None
        if landmarks is not None:
            marks = landmarks[0][torch.isfinite(landmarks[0]).all(dim=-1)]
            marks = marks if len(marks) else None
        for method, schedule in self.bench_schedules.items():
            result = register(target, initial, schedule, projector=self.net.projector,
                              spacing=view.spacing, ct=view.ct, bone=view.bone, net=self.net,
                              mask=mask)
            self.bench_rows += case_rows(method, cases, volume_index, gt, initial, result,
                                         view.points, self.camera,
                                         self.hparams.success_threshold_mm, marks)
            for i, record in enumerate(result.records):
                self.bench_outcomes.append(CaseOutcome(
                    int(cases[i]), method, target[i, 0].cpu(), record.poses.cpu(),
                    initial[i].cpu(), record.final_pose.cpu(), gt[i].cpu(), volume_index))

    def on_test_epoch_end(self) -> None:
        rows = _gathered(self.bench_rows)
        outcomes = _gathered(self.bench_outcomes)
        if self.trainer.global_rank != 0:
            return
        rows.sort(key=lambda r: (r["case"], list(self.bench_schedules).index(r["method"])))
        outcomes.sort(key=lambda o: (o.case, list(self.bench_schedules).index(o.method)))
        write_benchmark(self, rows, outcomes)


def check_benchmark_settings(module) -> BenchmarkConfig:
    """Check ``module``'s benchmark settings (every key, the methods' schedules, ``run_name``)
    and that ``output_dir`` is a writable folder, creating it.

    ``prostlab test`` calls this before the test starts, so a refusal writes nothing: checked at
    the test loop's start only, a bad ``run_name`` or method, or an ``output_dir`` that is a
    file, left the logger's W&B run and ``config.yaml`` behind. The loop checks again, for
    ``Trainer.test`` from Python.
    """
    bench = BenchmarkConfig.from_config(module.hparams.benchmark)
    bench.schedules()
    check_writable_dir(bench.output_dir, "model.benchmark.output_dir")
    return bench


def check_trained_network(module, ckpt_path: str | None) -> None:
    """Refuse to benchmark a method with a ``net`` stage when ``module`` has no trained weights:
    no ``ckpt_path`` and no ``model.init_weights``.

    An untrained network's similarity is noise, so its methods' rows would look like a result
    and mean nothing; ``prostlab register`` refuses it likewise. Methods of image similarities
    alone need no weights.
    """
    if ckpt_path is not None or module.hparams.get("init_weights") is not None:
        return
    schedules = BenchmarkConfig.from_config(module.hparams.benchmark).schedules()
    network = [name for name, schedule in schedules.items()
               if any(stage.similarity == "net" for stage in schedule.stages)]
    if network:
        raise ProstlabError(
            f"model.benchmark.methods {network}: a 'net' stage needs the trained network, and "
            "none was loaded; expected --ckpt_path (or model.init_weights), or methods without a "
            f"'net' stage (drop {network})"
        )


def _gathered(items: list) -> list:
    """Every process's items (all of them on every process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(items)
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, items)
    return [item for part in everyone for item in part]


__all__ = ["BenchmarkConfig", "BenchmarkLoop", "CaseOutcome", "case_rows",
           "check_benchmark_settings", "check_trained_network"]
