"""What accuracy ``prostlab register`` reaches from one view, on synthetic DICOM X-rays.

Each case: a ground-truth pose from ProST's law, a 12-bit MONOCHROME1 DICOM of the target CT
there (on a detector 4x finer than the registration's, Poisson noise, collimated borders:
``prostlab.xray.write_synthetic_dicom``), and a start moved from the truth by ``--rotation-deg``
about a random axis and ``--translation-mm`` in a random direction. Each method registers the
X-ray with the job ``prostlab register`` runs (``prostlab.xray.register``), moving the bundled
128^3 CT pooled to 64^3. The errors are split the way one view resolves them: the translation of
the volume's centre across the beam (in-plane) and along it (depth), the rotation, the 3D mTRE
over bone voxels and the mean projection distance at the isocentre (mPD).

    python bench/register_synthetic.py --cases 12 --methods mncc net_ncc \
        --target-ct cache/chest_256 --out bench/results/register/near
    python bench/register_synthetic.py --cases 12 --methods mncc --rotation-deg 20 \
        --translation-mm 80 --target-ct cache/chest_256 [--search] --out ...

``--xray-dir DIR`` keeps each X-ray (``DIR/case<N>.dcm``) and its start (``DIR/case<N>.init``,
the ``--init`` values), so the command itself can be timed end to end:
``prostlab register --xray DIR/case0.dcm --ct data/chest_ct_128 --detector 128 128
--downsample 2 --step 3.5 --init $(cat DIR/case0.init) --out reg``.

``--before-kernels REV`` also registers each case with the ``cpu`` backend built from
``kernels/`` as of git revision ``REV``, alternating with today's build in one process, and adds
the median seconds of both: the kernels' share of a change, apart from the machine's speed, which
can wander between runs (bench/RESULTS.md). Both builds reach the same poses (their images and
pose gradients have the same bits).

``--target-ct`` renders the X-rays from another preparation of the same scan (the shared
full-resolution chest CT prepared to 256^3 with the same bones, so the same cube and frame:
``prostlab prepare --ct ../shared/data/chest_ct/ct.nii.gz --labels
../shared/data/chest_ct/labels.nii.gz --size 256 --out cache/chest_256``); by default the bundled
cube itself.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, load_average, machine_facts, markdown_table  # noqa: E402
from kernel_builds import kernels_at  # noqa: E402
from prostlab.data import example_path, load_prepared  # noqa: E402
from prostlab.data.poses import PoseDistribution, case_generator  # noqa: E402
from prostlab.geometry import Camera, perturb  # noqa: E402
from prostlab.metrics.functional import (  # noqa: E402
    mean_projection_distance,
    mtre,
    rotation_error,
)
from prostlab.projector.backends import cpu_kernels  # noqa: E402
from prostlab.xray import write_synthetic_dicom  # noqa: E402
from prostlab.xray.register import RegisterSettings, prepare_problem, run  # noqa: E402

FINE = Camera(sdd=1020, sid=620, height=256, width=256, pixel_spacing=(1.46, 1.46))
CKPT = REPO / "checkpoints" / "prost_cpu_chest.ckpt"


def _start(gt: torch.Tensor, rotation_deg: float, translation_mm: float,
           generator: torch.Generator) -> torch.Tensor:
    axis, direction = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    delta = torch.cat((axis / axis.norm() * math.radians(rotation_deg),
                       direction / direction.norm() * translation_mm))
    return perturb(gt, delta[None])


def _bone_points(prepared) -> torch.Tensor:
    index = torch.nonzero(prepared.bone.data[0] > 0).double()
    centre = (torch.tensor(prepared.bone.data.shape[1:], dtype=torch.float64) - 1) / 2
    points = (index - centre) * torch.tensor(prepared.ct.spacing, dtype=torch.float64)
    return points[torch.randperm(len(points), generator=torch.Generator().manual_seed(0))[:2000]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--methods", nargs="+", default=["mncc", "net_ncc"])
    parser.add_argument("--rotation-deg", type=float, default=10.0)
    parser.add_argument("--translation-mm", type=float, default=30.0)
    parser.add_argument("--target-ct", help="prepared folder the X-rays are rendered from")
    parser.add_argument("--search", action="store_true", help="run the coarse search first")
    parser.add_argument("--out", default="bench/results/register/near")
    parser.add_argument("--detector", type=int, nargs=2, default=[64, 64],
                        help="the registration's detector (rows, columns)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--before-kernels", default=None, metavar="REV",
                        help="also time each case with the cpu kernels of this git revision")
    parser.add_argument("--xray-dir", type=Path, default=None,
                        help="keep the X-rays here (case<N>.dcm), with case<N>.init: the start's "
                             "--init values, to time the prostlab register command on them")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    facts = machine_facts()  # the commit that runs, not the one checked out when it ends

    moving = load_prepared(example_path())
    target_ct = load_prepared(args.target_ct) if args.target_ct else moving
    if target_ct.meta["side_mm"] != moving.meta["side_mm"] or (
            target_ct.meta.get("centre_world_ras_mm") != moving.meta.get("centre_world_ras_mm")):
        raise SystemExit(f"{args.target_ct}: not the bundled cube's frame (side and centre differ)")
    points = _bone_points(moving)
    cpu_kernels.cpu_backend()  # built before anything is timed
    before = kernels_at(args.before_kernels) if args.before_kernels else None
    law = PoseDistribution.from_config({"preset": "prost"}, "ground_truth")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.xray_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for case in range(args.cases):
            generator = case_generator(7, case)
            gt = law.sample(1, generator).to(torch.float64)
            start = _start(gt, args.rotation_deg, args.translation_mm, generator)
            init = [*torch.rad2deg(start[0, :3]).tolist(), *start[0, 3:].tolist()]
            xray = folder / f"case{case}.dcm"
            write_synthetic_dicom(xray, target_ct.ct, gt, FINE, bits_stored=12, seed=case)
            (folder / f"case{case}.init").write_text(" ".join(f"{v:.6f}" for v in init) + "\n")
            for method in args.methods:
                net = method.startswith("net")
                settings = RegisterSettings(
                    xray=xray, ct=example_path(), out=Path(tmp) / "unused", method=method,
                    init=init,
                    ckpt_path=CKPT if net else None, detector=tuple(args.detector), step=3.5,
                    downsample=2, search=args.search)
                problem = prepare_problem(settings)
                before_seconds = None
                if before is not None:  # the same case with the earlier kernels, first
                    with mock.patch.object(cpu_kernels, "_backend", before):
                        earlier = run(problem, settings.search_space, settings.search)
                    before_seconds = earlier.result.records[0].wall_time
                cpu_start = time.process_time()
                registration = run(problem, settings.search_space, settings.search)
                cpu_seconds = time.process_time() - cpu_start
                final = registration.final[None]
                error = (final[0, 3:] - gt[0, 3:]).abs()
                rows.append({
                    "case": case, "method": method,
                    "initial_mtre_mm": float(mtre(start, gt, points)[0]),
                    "final_mtre_mm": float(mtre(final, gt, points)[0]),
                    "final_mpd_mm": float(mean_projection_distance(
                        final, gt, points, problem.projector.camera, plane="isocentre")[0]),
                    "rotation_error_deg": float(rotation_error(final, gt)[0]),
                    "inplane_error_mm": float(error[:2].norm()),
                    "depth_error_mm": float(error[2]),
                    "iterations": registration.result.records[0].n_iterations,
                    "seconds": registration.result.records[0].wall_time,
                    "cpu_seconds": cpu_seconds,
                    **({"seconds_before_kernels": before_seconds} if before else {}),
                })
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()},
                      flush=True)

    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    with (out / "cases.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    keys = ("final_mtre_mm", "final_mpd_mm", "rotation_error_deg", "inplane_error_mm",
            "depth_error_mm", "seconds", "cpu_seconds", *(["seconds_before_kernels"] if before
                                                          else []))
    table = []
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        table.append([method, f"{sum(r['final_mtre_mm'] < 2 for r in mine)}/{len(mine)}",
                      *(f"{statistics.median(r[k] for r in mine):.2f}" for k in keys)])
    command = "python bench/register_synthetic.py " + " ".join(sys.argv[1:])
    text = (f"# prostlab register on synthetic DICOM X-rays\n\n"
            f"{facts['date']}, {facts['cpu']} ({facts['cores']} cores), commit {facts['commit']}\n\n"
            f"`{command}`\n\n"
            f"{args.cases} cases; starts {args.rotation_deg} deg and {args.translation_mm} mm "
            f"from the truth{', coarse search first' if args.search else ''} (initial mTRE median "
            f"{statistics.median(r['initial_mtre_mm'] for r in rows):.1f} mm); X-rays rendered "
            f"from {args.target_ct or 'the bundled cube'}; detector {args.detector[0]} x "
            f"{args.detector[1]}, {torch.get_num_threads()} torch thread(s), load average "
            f"{load_average()} at the end. Medians:\n\n"
            + markdown_table(["method", "mTRE < 2 mm", "mTRE mm", "mPD mm", "rotation deg",
                              "in-plane mm", "depth mm", "seconds", "CPU seconds",
                              *([f"seconds, kernels of {args.before_kernels}"] if before
                                else [])], table) + "\n")
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
