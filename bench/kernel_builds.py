"""The ``cpu`` backend's primitives, today's kernels beside an earlier revision's, in one process.

    python bench/kernel_builds.py [--revision 76d00cd] [--threads 1] [--repeats 11]
        [--cases training registration cube128 cube256]
        [--ct PATH ... [--views AP axial ...] [--detectors 128 256]] [--primitives forward ...]

For each case (a random smooth volume, ProST's camera at the case's detector, two or one poses a
few degrees apart) and each primitive the training step and registration call (the forward
projection; its jvp; the pose-only vjp and jvp_vjp; the volume's jvp_vjp and vjp), the two builds are called
in turn, ``--repeats`` times each after three warm-ups, and the medians of their wall times are
compared. The earlier build is ``kernels/`` as of git ``--revision`` (default 76d00cd: the
kernels before issue 20's unrolled loops and vector lanes), compiled with today's flags; both
run on ``--threads`` threads in the same process, so machine load slows them alike. The table
also says whether the two builds' results have the same bits (images and pose gradients should:
the changes keep each ray's arithmetic and order; a volume gradient scattered in lanes adds the
same terms in another order than one ray at a time, so it need not).

Cases: ``training`` is configs/cpu.yaml's step (64^3, 2 channels: the lifted bone volume, 64^2
detector, batch 2, 3.5 mm steps); ``registration`` is what ``prostlab register`` projects
(64^3, 1 channel, 64^2, 1 pose); ``cube128`` and ``cube256`` the bundled cube's size and the
256^3 preparation at ProST's detector sizes (128^2 and 256^2, 1.75 mm steps).

``--ct`` adds a case per stored CT (a NIfTI, as ``bench/projector.py --volumes full`` reads it:
its own grid and spacing, HU to attenuation), view and detector, with ``bench/projector.py``'s
camera, views and step: the volumes no cache holds. ``--primitives`` picks what is timed
(default all six).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, load_average, machine_facts, markdown_table, median, time_call  # noqa: E402
from prostlab.geometry.camera import Camera  # noqa: E402
from prostlab.projector.backends.cpu_kernels import CpuKernelBackend  # noqa: E402
from prostlab.projector.backends.host_emulation import SOURCES  # noqa: E402
from prostlab.projector.rays import RayBundle  # noqa: E402

CASES = {  # grid, channels, detector, batch, step (mm)
    "training": (64, 2, 64, 2, 3.5),
    "registration": (64, 1, 64, 1, 3.5),
    "cube128": (128, 1, 128, 1, 1.75),
    "cube256": (256, 1, 256, 1, 1.75),
}
SIDE_MM, FIELD_MM = 332.5, 373.8  # the bundled cube's side; ProST's field of view


def kernels_at(revision: str) -> CpuKernelBackend:
    """The ``cpu`` backend built from ``kernels/`` as of git ``revision`` (files it lacks are
    left out of the build, as that version did not have them)."""
    folder = Path(tempfile.mkdtemp(prefix="prostlab-kernels-"))
    for name in SOURCES:
        shown = subprocess.run(["git", "show", f"{revision}:kernels/{name}"], cwd=REPO,
                               capture_output=True)
        if shown.returncode == 0:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(shown.stdout)
    return CpuKernelBackend(sources=folder)


def problem(case: str):
    """``(rays, vol, M, dM, g)`` of a case: poses turned 0.1 + 0.2 b rad about the vertical
    axis and shifted a few mm, a random tangent and cotangent (seed 0)."""
    grid, channels, pixels, batch, step = CASES[case]
    generator = torch.Generator().manual_seed(0)
    camera = Camera(sdd=1020.0, sid=620.0, height=pixels, width=pixels,
                    pixel_spacing=(FIELD_MM / pixels, FIELD_MM / pixels))
    rays = RayBundle.from_camera(camera, (SIDE_MM / grid,) * 3, (grid,) * 3, step,
                                 torch.float32, "cpu")
    noise = torch.rand(1, channels, grid, grid, grid, generator=generator)
    vol = torch.nn.functional.avg_pool3d(noise, 5, 1, 2).contiguous()
    M = torch.zeros(batch, 3, 4)
    for b in range(batch):
        a = 0.1 + 0.2 * b
        R = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
        M[b, :, :3] = R
        M[b, :, 3] = -(R @ torch.tensor([0.0, 0.0, 620.0])) + torch.tensor([4.0 * b, -3.0, 2.0])
    dM = torch.randn(batch, 3, 4, generator=generator) * 0.01
    g = torch.randn(batch, channels, rays.directions.shape[0], generator=generator)
    return rays, vol, M, dM, g


def primitives(backend, rays, vol, M, dM, g):
    """The calls timed, by name: each returns its outputs (tensors)."""
    return {
        "forward": lambda: (backend.forward(rays, vol, M),),
        "jvp": lambda: (backend.jvp(rays, vol, M, dM),),
        "vjp (pose)": lambda: backend.vjp(rays, vol, M, g, need_vol=False)[1:],
        "jvp_vjp (pose)": lambda: backend.jvp_vjp(rays, vol, M, dM, g, need_vol=False)[1:],
        "jvp_vjp (volume)": lambda: backend.jvp_vjp(rays, vol, M, dM, g, need_M=False)[:1],
        "vjp (volume)": lambda: backend.vjp(rays, vol, M, g, need_M=False)[:1],
    }


def compare(case: str, data, earlier: CpuKernelBackend, today: CpuKernelBackend,
            repeats: int, names: list[str]) -> list[list[str]]:
    before, now = primitives(earlier, *data), primitives(today, *data)
    rows = []
    for name in names:
        same = all(torch.equal(a, b) for a, b in zip(before[name](), now[name](), strict=True))
        times = {"before": [], "now": []}
        for _ in range(3):
            before[name](), now[name]()
        for _ in range(repeats):  # alternate, so that load slows both alike
            times["before"] += time_call(before[name], warmup=0, repeats=1)
            times["now"] += time_call(now[name], warmup=0, repeats=1)
        t0, t1 = median(times["before"]), median(times["now"])
        rows.append([case, name, f"{t0:.1f}", f"{t1:.1f}", f"{t0 / t1:.2f}×",
                     "yes" if same else "no"])
        print(rows[-1], f"load {load_average()}", flush=True)
    return rows


def stored_ct_cases(paths: list[Path], views: list[str], detectors: list[int]):
    """``(label, (rays, vol, M, dM, g))`` of each stored CT, view and detector (module
    docstring), with bench/projector.py's loading, camera and poses."""
    import projector as views_bench

    for path in paths:
        ct = views_bench.full_ct(path)
        vol, spacing = ct["volume"].float().contiguous(), ct["spacing"]
        for pixels in detectors:
            camera = Camera(sdd=views_bench.SDD, sid=views_bench.SID, height=pixels,
                            width=pixels, pixel_spacing=(views_bench.DETECTORS[pixels],) * 2)
            rays = RayBundle.from_camera(camera, spacing, vol.shape[2:], views_bench.STEP,
                                         torch.float32, "cpu")
            generator = torch.Generator().manual_seed(0)
            for view in views:
                pose = torch.tensor([views_bench.VIEWS[view]], dtype=torch.float64)
                M = views_bench.camera_to_volume(camera, pose, ct["base"])[:, :3]
                dM = torch.randn(1, 3, 4, generator=generator) * 0.01
                g = torch.randn(1, 1, rays.directions.shape[0], generator=generator)
                label = f"{views_bench.ct_label(path)} {view} {pixels}²"
                yield label, (rays, vol, M.float().contiguous(), dM, g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revision", default="76d00cd")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--ct", type=Path, nargs="*", default=[],
                        help="stored CTs (NIfTI) to add as cases, each view and detector")
    parser.add_argument("--views", nargs="+", default=["AP", "axial", "oblique30"])
    parser.add_argument("--detectors", type=int, nargs="+", default=[128], choices=[128, 256])
    names = list(primitives(None, *[None] * 5))
    parser.add_argument("--primitives", nargs="+", default=names, choices=names)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    earlier, today = kernels_at(args.revision), CpuKernelBackend()
    cases = [(case, problem(case)) for case in args.cases]
    rows = []
    for case, data in [*cases, *stored_ct_cases(args.ct, args.views, args.detectors)]:
        rows += compare(case, data, earlier, today, args.repeats, args.primitives)
    print(f"\nmachine: {machine_facts()}\nload average: {load_average()}\n")
    print(markdown_table(["case", "primitive", f"ms, kernels at {args.revision}", "ms, today",
                          "speed-up", "same bits"], rows))


if __name__ == "__main__":
    main()
