"""Where each image similarity's minimum lies when the DRR shows the bones or the whole CT.

    python bench/moving_bias.py [--cases 6] [--similarities ncc gradncc mncc] [--threads 1]

Why: a stage may render the segmented bones or the whole CT (``Stage.moving``). The target X-ray
always shows the whole body. If the DRR shows only bone, the similarity's minimum may not be at
the true pose; this measures how far it is, against the same similarity with the whole CT.

What runs: at the benchmark's CPU geometry (``configs/cpu.yaml``: 64 x 64 pixels of 5.84 mm,
3.5 mm step, the bundled CT averaged to 64^3), targets are DRRs of the full 128^3 CT with a 1.75
mm step at ``--cases`` ground truths from ProST's law. Each similarity's preset
(``configs/registration/<name>.yaml``) then starts **at the truth** and descends to the nearest
minimum of its objective, once rendering the bones and once the whole CT. The table gives the
median (and largest) distance of that minimum from the truth: rotation (degrees), translation
(mm), mTRE over 2000 bone voxels (mm), and how much lower the objective is there than at the
truth (median): by how much the similarity prefers the wrong pose.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, machine_facts, markdown_table  # noqa: E402
from multires import draw_cases, setting, targets  # noqa: E402
from prostlab.metrics import mtre, rotation_error, translation_error  # noqa: E402
from prostlab.registration import Schedule, load_schedule, register  # noqa: E402


def measure(similarity: str, moving: str, data: dict, gt: torch.Tensor,
            target: torch.Tensor) -> list[str]:
    preset = load_schedule(similarity)
    stages = tuple(dataclasses.replace(s, moving=moving) for s in preset.stages)
    result = register(target, gt, Schedule(stages, preset.max_total_iterations),
                      projector=data["projector"], spacing=data["spacing"], ct=data["ct"],
                      bone=data["bone"])
    final = result.final_poses.double()
    rot = rotation_error(final, gt.double())
    trans = translation_error(final, gt.double())
    tre = mtre(final, gt.double(), data["points"].double())
    at_truth = torch.tensor([r.values[0].item() for r in result.records], dtype=torch.float64)
    drop = at_truth - result.final_values

    def spread(x: torch.Tensor, digits: int) -> str:
        return f"{float(x.median()):.{digits}f} ({float(x.max()):.{digits}f})"

    return [similarity, moving, spread(rot, 2), spread(trans, 1), spread(tre, 1),
            f"{float(drop.median()):.4f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--similarities", nargs="+", default=["ncc", "gradncc", "mncc"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = setting()
    gt, _ = draw_cases(args.cases, "prost", args.seed)
    target = targets(data, gt)
    facts, load = machine_facts(), load_average()
    rows = []
    for similarity in args.similarities:
        for moving in ("ct", "bone"):
            rows.append(measure(similarity, moving, data, gt, target))
            print(" | ".join(rows[-1]), flush=True)
    headers = ["similarity", "moving", "rotation error, deg: median (max)",
               "translation error, mm", "mTRE, mm", "objective at truth - at minimum"]
    print(f"\n- date: {facts['date']}; commit {facts['commit']}; {facts['cpu']}, "
          f"{facts['cores']} cores (load {load})\n"
          f"- command: `python bench/moving_bias.py --cases {args.cases} --similarities "
          f"{' '.join(args.similarities)} --seed {args.seed} --threads {args.threads}`\n")
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
