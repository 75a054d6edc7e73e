"""CPU cost of registration iterations, per method, at ProST's pelvis geometry.

    python bench/registration.py [--iterations 3] [--batches 1 16] [--methods ncc gradncc net]

What runs: :func:`prostlab.registration.register` on the bundled 128^3 chest CT (2.60 mm voxels)
with ProST's pelvis camera (sdd 1020 mm, sid 620 mm, 128 x 128 pixels of 2.92 mm) and a 1.75 mm
step (projector backend ``--backend``, default "auto"), for each method (a one-stage schedule taken from the presets: ``ncc``, ``gradncc``, and the
``net`` stage of ``net_gradncc``) and batch size. Targets are DRRs of the CT at seeded poses and
the registrations start 3 degrees and 10 mm away. The plateau rule is switched off
(``plateau_std = 0``) and the schedule capped at ``1 + iterations``, so every case runs exactly
that many iterations and the batch never shrinks: this measures the cost of an iteration, not
how many a registration needs.

An iteration is one objective evaluation of the whole batch (rendering the DRRs and comparing
them with the targets), its gradient with respect to the pose, and the pose update. Its time is
measured from one objective call to the next (the last one to the end of the run); the first
iteration is a warm-up and is not counted. "build" is the time to construct the objective, once
per registration (for ``net``: the 3D CNN on the bone volume and the target embeddings). The net
is an **untrained** :class:`~prostlab.similarity.ConvexSimilarityNet` with default sizes: its
cost does not depend on its weights.

Wall time counts the time a process waits for a core, so on a shared machine it overstates the
cost; run with ``--threads 1``, where this process's CPU time is the time one idle core would
take, and the per-case, samples-per-second and projected figures are computed from it. Projected
seconds per registration are the median CPU time of an iteration times 100 and times 500
iterations (ProST's cap), divided by the batch size for the per-case figure; the number of
iterations a registration really takes depends on the method, the data and the start (the
evidence test in ``tests/test_registration.py``, at a reduced resolution, takes 76-93 with
``gradncc``). Samples are trilinear samples per rendering (rays clipped to the volume) times
channels (the net renders 1 + 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from prostlab.data import example_path, load_prepared
from prostlab.geometry import Camera, perturb
from prostlab.projector import Projector
from prostlab.projector.rays import RayBundle
from prostlab.registration import Schedule, load_schedule, optimise
from prostlab.similarity.objective import make_objective

REPO = Path(__file__).resolve().parents[1]
PELVIS = Camera(sdd=1020.0, sid=620.0, height=128, width=128, pixel_spacing=(2.92, 2.92))
STEP = 1.75
METHODS = {"ncc": ("ncc", 0), "gradncc": ("gradncc", 0), "net": ("net_gradncc", 0)}


def _poses(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ground-truth poses and starts 3 degrees and 10 mm away from them."""
    g = torch.Generator().manual_seed(seed)

    def directions() -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(batch, 3, generator=g), dim=-1)

    gt = torch.cat((directions() * math.radians(2.0), directions() * 5.0), dim=-1)
    offset = torch.cat((directions() * math.radians(3.0), directions() * 10.0), dim=-1)
    return gt, perturb(gt, offset)


def _samples(projector: Projector, spacing, grid, poses: torch.Tensor) -> int:
    """Trilinear samples one rendering of ``poses`` visits (rays clipped to the volume)."""
    rays = RayBundle.from_camera(
        projector.camera, spacing, grid, projector.step, torch.float32, "cpu"
    )
    E = projector.camera.extrinsics(poses)
    R, t = E[:, :, :3], E[:, :, 3:]
    M = torch.cat((R.transpose(1, 2), -R.transpose(1, 2) @ t), dim=2)
    return int(rays.sample_range(M)[1].sum())


def run(method: str, batch: int, iterations: int, data, backend: str = "auto") -> dict:
    preset, index = METHODS[method]
    stage = dataclasses.replace(
        load_schedule(preset).stages[index], plateau_std=0.0, max_iterations=iterations + 1
    )
    schedule = Schedule((stage,), max_total_iterations=iterations + 1)
    projector = Projector(PELVIS, step=STEP, backend=backend)
    ct, bone, spacing = data.ct.batched(), data.bone.batched(), data.ct.spacing
    gt, start = _poses(batch)
    with torch.no_grad():
        target = projector(ct, spacing, gt)
    net = None
    if method == "net":
        from prostlab.similarity import ConvexSimilarityNet

        torch.manual_seed(0)
        net = ConvexSimilarityNet(projector)
    build, calls = [], []

    def factory(stage, targets: torch.Tensor):
        t0 = time.perf_counter()
        objective = make_objective(
            stage.similarity,
            projector=projector,
            ct=ct,
            bone=bone,
            spacing=spacing,
            target=target[targets],
            net=net,
        )
        build.append(time.perf_counter() - t0)

        def timed(pose: torch.Tensor) -> torch.Tensor:
            calls.append((time.perf_counter(), time.process_time()))
            return objective(pose)

        return timed

    optimise(factory, start, schedule)
    end = (time.perf_counter(), time.process_time())
    marks = calls + [end]
    wall = [b[0] - a[0] for a, b in zip(marks[:-1], marks[1:], strict=True)][1:]
    cpu = [b[1] - a[1] for a, b in zip(marks[:-1], marks[1:], strict=True)][1:]
    samples = _samples(projector, spacing, ct.shape[2:], start)
    channels = 1 if net is None else 1 + net.volume_channels
    return {
        "method": method,
        "batch": batch,
        "iterations": len(wall),
        "build_s": sum(build),
        "iter_s": statistics.median(wall),
        "iter_cpu_s": statistics.median(cpu),
        "samples": samples,
        "channels": channels,
    }


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out + (" (with uncommitted changes in src/)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def table(rows: list[dict]) -> str:
    """The markdown table; per-case and projected figures are from CPU time (see the docstring)."""
    head = (
        "| method | batch | iterations timed | build (s) | wall s / iteration "
        "| CPU s / iteration | CPU ms / case-iteration | Msamples / CPU-s "
        "| CPU s / registration, 100 its: batch (per case) | 500 its: batch (per case) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cpu = r["iter_cpu_s"]
        per_case = cpu / r["batch"]
        rate = r["samples"] * r["channels"] / cpu / 1e6
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['iterations']} | {r['build_s']:.2f} "
            f"| {r['iter_s']:.2f} | {cpu:.2f} | {1e3 * per_case:.0f} | {rate:.2f} "
            f"| {100 * cpu:.0f} ({100 * per_case:.0f}) | {500 * cpu:.0f} ({500 * per_case:.0f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--iterations",
        type=int,
        default=3,
        help="timed iterations per run, after one warm-up iteration",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "cpu"],
        help="projector backend (auto: the compiled cpu kernels when they build, else torch)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_prepared(example_path())
    rows = []
    for method in args.methods:
        for batch in args.batches:
            rows.append(run(method, batch, args.iterations, data, args.backend))
            print(f"done {method} batch {batch}: {rows[-1]['iter_s']:.2f} s/iteration", flush=True)
    command = "python bench/registration.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if v is not None
    )
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print()
    print(f"- date: {datetime.date.today().isoformat()}")
    print(
        f"- machine: {_cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average at the end {load}"
    )
    print(f"- commit: {_commit()}")
    print(f"- command: `{command}`")
    print(
        f"- geometry: 128 x 128 detector, 2.92 mm pixels, sdd 1020 mm, sid 620 mm, step {STEP} mm;"
        f" bundled 128^3 CT, {load_prepared(example_path()).ct.spacing[0]:.2f} mm voxels"
    )
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
