"""Registration schedules side by side on the bundled CT: success, accuracy, iterations, seconds.

    python bench/multires.py [--schedules ncc ncc_multires] [--cases 8] [--offset wide]
                             [--threads 1] [--out bench/results/multires.md]

What runs: :func:`prostlab.registration.register` with each schedule (a preset name or a YAML
path) on the same cases, at the benchmark's CPU geometry, read from ``configs/cpu.yaml``: its
64 x 64 camera (5.84 mm pixels), its step (3.5 mm) and the bundled 128^3 CT averaged by its
``data.downsample`` (2: 64^3, 5.2 mm voxels). The targets are *not* the moving image: they are
DRRs of the full 128^3 CT (2.6 mm voxels) with a ``--target-step`` of 1.75 mm. Ground truths
follow ProST's law (``{preset: prost}``); starts are offset from them by a normal law per axis,
``--offset prost`` (8 degrees, 22 mm: ProST's test offsets) or ``wide`` (20 degrees, 50 mm, the
issue's wide offsets), seeded. All cases of a schedule run in one batch, as in the benchmark.

Columns: success (final mTRE below 10 mm, over 2000 bone voxels of the 128^3 labels), median
final mTRE of all cases and of the successes, median iterations (objective evaluations),
"cost": median per case of the sum over its iterations of the iteration's relative cost,
``detector_scale^2 / volume_downsample`` (1 for a full-resolution iteration: pixels times
samples per ray), so it counts work whatever the machine's load; and seconds per case, wall
and this process's CPU, the batch's time divided by the number of cases.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, load_average, machine_facts, markdown_table  # noqa: E402
from prostlab.data import example_path, load_prepared  # noqa: E402
from prostlab.data.poses import PoseDistribution, PoseSampler  # noqa: E402
from prostlab.geometry import Camera  # noqa: E402
from prostlab.metrics import mtre, target_points_from_mask  # noqa: E402
from prostlab.projector import Projector  # noqa: E402
from prostlab.registration import Schedule, as_schedule, register  # noqa: E402

OFFSETS = {"prost": (8.0, 22.0), "wide": (20.0, 50.0)}
"""Standard deviation per axis of the start's offset from the truth: degrees, mm."""
SUCCESS_MM = 10.0


def setting(config: Path = REPO / "configs" / "cpu.yaml", target_step: float = 1.75) -> dict:
    """The benchmark's CPU geometry and the bundled CT: moving volume, fine targets' renderer."""
    cfg = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    camera = Camera.from_dict(cfg["model"]["camera"])
    factor = int(cfg["data"].get("downsample", 1))
    prepared = load_prepared(example_path())
    fine = prepared.ct.batched()
    points = target_points_from_mask(
        prepared.labels > 0, prepared.ct.spacing, 2000, torch.Generator().manual_seed(1)
    )
    return {
        "projector": Projector(camera, step=float(cfg["model"]["step"]), backend="auto"),
        "ct": torch.nn.functional.avg_pool3d(fine, factor),
        "bone": torch.nn.functional.avg_pool3d(prepared.bone.batched(), factor),
        "spacing": tuple(factor * s for s in prepared.ct.spacing),
        "fine": fine,
        "fine_spacing": tuple(prepared.ct.spacing),
        "fine_projector": Projector(camera, step=target_step, backend="auto"),
        "points": points,
    }


def draw_cases(n: int, offset: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gt, start)`` ``(n, 6)`` float32: ProST's ground-truth law, starts offset per axis."""
    degrees, mm = OFFSETS[offset]
    sampler = PoseSampler(
        ground_truth=PoseDistribution.from_config({"preset": "prost"}),
        initial=PoseDistribution(kind="normal", rotation_deg=degrees, translation_mm=mm),
        relative=True,
    )
    gt, start = sampler.sample(n, torch.Generator().manual_seed(seed))
    return gt.float(), start.float()


def targets(data: dict, gt: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return data["fine_projector"](data["fine"], data["fine_spacing"], gt)


def iteration_cost(schedule: Schedule, stages: torch.Tensor) -> float:
    """Full-resolution iterations a case's iterations are worth (``scale^2 / downsample``)."""
    weights = [s.detector_scale**2 / s.volume_downsample for s in schedule.stages]
    return float(sum(weights[int(k)] for k in stages))


def run(schedule: Schedule, data: dict, gt: torch.Tensor, start: torch.Tensor,
        target: torch.Tensor) -> dict:
    """Register the cases with ``schedule``; the row of the table."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = register(target, start, schedule, projector=data["projector"],
                      spacing=data["spacing"], ct=data["ct"], bone=data["bone"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    final = mtre(result.final_poses.double(), gt.double(), data["points"].double())
    ok = final < SUCCESS_MM
    n = len(gt)
    return {
        "success": float(ok.double().mean()),
        "mtre": float(final.median()),
        "mtre_ok": float(final[ok].median()) if ok.any() else float("nan"),
        "iterations": statistics.median(r.n_iterations for r in result.records),
        "cost": statistics.median(iteration_cost(schedule, r.stages) for r in result.records),
        "wall": wall / n,
        "cpu": cpu / n,
        "final_mtre": final.tolist(),
    }


def row(name: str, r: dict) -> list[str]:
    return [f"`{name}`", f"{100 * r['success']:.0f}%", f"{r['mtre']:.2f}", f"{r['mtre_ok']:.2f}",
            f"{r['iterations']:.0f}", f"{r['cost']:.0f}", f"{r['wall']:.1f}", f"{r['cpu']:.1f}"]


HEADERS = ["schedule", "success", "median mTRE (mm)", "median mTRE of successes (mm)",
           "median iterations", "median cost (full-res iterations)", "s per case (wall)",
           "s per case (CPU)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", nargs="+", default=["ncc", "ncc_multires"])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--offset", choices=sorted(OFFSETS), default="wide")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-step", type=float, default=1.75)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = setting(target_step=args.target_step)
    gt, start = draw_cases(args.cases, args.offset, args.seed)
    target = targets(data, gt)
    initial = mtre(start.double(), gt.double(), data["points"].double())
    facts, load = machine_facts(), load_average()
    rows = []
    for name in args.schedules:
        result = run(as_schedule(name), data, gt, start, target)
        print(f"{name}: final mTRE {[round(x, 2) for x in result['final_mtre']]}", flush=True)
        rows.append(row(name, result))
    degrees, mm = OFFSETS[args.offset]
    text = "\n".join([
        f"- date: {facts['date']}; commit {facts['commit']}; {facts['cpu']}, {facts['cores']} "
        f"cores shared with other jobs (load {load} at the start); torch {facts['torch']}, "
        f"{args.threads} thread(s)",
        f"- command: `python bench/multires.py --schedules {' '.join(args.schedules)} --cases "
        f"{args.cases} --offset {args.offset} --seed {args.seed} --threads {args.threads}`",
        f"- {args.cases} cases, ProST's ground-truth law, starts offset N(0, {degrees:g} deg) "
        f"and N(0, {mm:g} mm) per axis: initial mTRE median {float(initial.median()):.1f} mm "
        f"({float(initial.min()):.1f}-{float(initial.max()):.1f})",
        "",
        markdown_table(HEADERS, rows),
    ])
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
