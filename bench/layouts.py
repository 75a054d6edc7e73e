"""How the memory layout of the volume changes prostlab's CPU projector speed, layout by layout.

    python bench/layouts.py [--volumes full 256 128] [--detectors 128 256] [--threads 2]
        [--out bench/results/layouts_cpu.md]

The backends choose a layout per call; this script forces each choice in turn, on the volumes,
cameras and poses of ``bench/projector.py`` (identity: an AP view; rotated: 36 degrees mostly
about the image's vertical axis), so that the choices can be checked on a new machine:

* ``cpu`` backend (forward, and fwd+bwd with the pose requiring grad; volumes below
  ``brick_min_voxels``, as the 128^3 cube, are never bricked):
  ``linear, rows`` (the volume as stored, rays in row order), ``linear, Morton`` (rays in Morton
  order, ``RayBundle.tiled``), ``bricks, Morton`` (8^3 bricks, ``bricks.to_bricks``) and what
  the backend does by itself (``chosen``: ``bricks.LayoutChoice`` times the two layouts on the
  first calls and keeps the faster).
* ``torch`` backend (forward): the volume's axes as stored, and the order of
  ``torch_backend._axis_order`` (what it does by itself).

Each cell is the median wall time (ms) of ``--repeats`` calls after 5 warm-up calls (enough for
the layout choice to settle), all in one process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_facts, markdown_table, median, time_call  # noqa: E402
from projector import DEFAULT_CT, POSES, load_volumes, make_call  # noqa: E402

CPU_LAYOUTS = {  # name -> (brick_shift, tile_rays, layout_trials)
    "linear, rows": (0, False, 0),
    "linear, Morton": (0, True, 0),
    "bricks, Morton": (3, True, 0),
    "chosen": (3, True, 2),
}
WARMUP = 5


def time_ms(call, repeats: int) -> float:
    """Median wall ms of ``repeats`` calls after ``WARMUP`` untimed ones."""
    return median(time_call(call, warmup=WARMUP, repeats=repeats))


def cpu_row(vol, pixels, pose, mode, repeats) -> list[float]:
    from prostlab.projector.backends.bricks import clear_brick_cache
    from prostlab.projector.backends.cpu_kernels import cpu_backend

    backend = cpu_backend()
    saved = backend.brick_shift, backend.tile_rays, backend.layout_trials
    row = []
    try:
        for shift, tile, trials in CPU_LAYOUTS.values():
            backend.brick_shift, backend.tile_rays, backend.layout_trials = shift, tile, trials
            backend._choice = None  # a fresh LayoutChoice for each row
            clear_brick_cache()
            row.append(time_ms(make_call("prostlab-cpu", mode, vol, pixels, pose, 0, None),
                               repeats))
    finally:
        backend.brick_shift, backend.tile_rays, backend.layout_trials = saved
    return row


def torch_row(vol, pixels, pose, repeats) -> list[float]:
    from prostlab.projector.backends import torch_backend

    saved = torch_backend.REORDER_MIN_VOXELS
    row = []
    try:
        for threshold in (float("inf"), saved):
            torch_backend.REORDER_MIN_VOXELS = threshold
            row.append(time_ms(make_call("prostlab-torch", "forward", vol, pixels, pose, 0, None),
                               repeats))
    finally:
        torch_backend.REORDER_MIN_VOXELS = saved
    return row


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", nargs="+", default=["full", "256", "128"],
                        choices=["full", "256", "128"])
    parser.add_argument("--detectors", nargs="+", type=int, default=[128, 256],
                        choices=[128, 256, 512])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ct", type=Path, default=DEFAULT_CT)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    facts = machine_facts()
    volumes, skipped = load_volumes(args.volumes, args.ct)
    cpu_rows, torch_rows = [], []
    for name, vol in volumes.items():
        for pixels in args.detectors:
            for pose in POSES:
                case = [name, f"{pixels}²", pose]
                for mode in ("forward", "fwd+bwd"):
                    ms = cpu_row(vol, pixels, pose, mode, args.repeats)
                    cpu_rows.append([*case, mode, *(f"{t:.1f}" for t in ms)])
                    print(" ".join(map(str, cpu_rows[-1])), flush=True)
                ms = torch_row(vol, pixels, pose, args.repeats)
                torch_rows.append([*case, *(f"{t:.1f}" for t in ms), f"{ms[0] / ms[1]:.2f}×"])
                print(" ".join(map(str, torch_rows[-1])), flush=True)
    command = "python bench/layouts.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "## Projector layouts, CPU: what each memory layout costs",
        "",
        f"- date: {facts['date']}; machine: {facts['cpu']}, {facts['cores']} cores, "
        f"{facts['cache']}; torch {torch.__version__} with {args.threads} threads",
        f"- commit: {facts['commit']}; command: `{command.strip()}`",
        f"- median wall ms of {args.repeats} calls after {WARMUP} warm-up calls, one process"
        + (f"; skipped: {skipped}" if skipped else ""),
        "",
        "`cpu` backend:",
        "",
        markdown_table(["volume", "detector", "pose", "pass", *CPU_LAYOUTS], cpu_rows),
        "",
        "`torch` backend, forward:",
        "",
        markdown_table(["volume", "detector", "pose", "axes as stored", "axes reordered",
                        "speed-up"], torch_rows),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
