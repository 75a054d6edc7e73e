"""GPU benchmark of prostlab's projector: the CUDA kernels (cupy backend) beside the torch backend
on the same GPU, and nanodrr's Triton backend where it is installed.

    python bench/projector_gpu.py [--quick] [--cupy-bricks 3] [--cupy-tile-rays]
        [--out bench/results/projector_gpu.md]

Geometry: ProST's pelvis camera (sdd 1020 mm, sid 620 mm, step 1.75 mm) with a 128^2 detector of
2.92 mm pixels or a 256^2 one of 1.46 mm (the same 373.8 mm detector), and a synthetic phantom of
128^3 voxels of 2.33 mm, 256^3 of 1.165 mm or 384^3 of 0.776 mm (the same 298 mm field of view;
the last, 226 MB, is larger than any GPU's L2 cache, as a full-resolution CT is).
``--cupy-bricks 3`` makes the CUDA kernels read volumes of 2^22 voxels or more in the bricked
layout of 8^3 bricks (``KernelBackend.brick_shift``; the CPU build's default), to compare with
the linear layout of a run without it; ``--cupy-tile-rays`` launches the rays in Morton order of
their pixels (``KernelBackend.tile_rays``; the CPU build's default), so that a warp's 32 rays
form a 8 x 4 tile of the detector rather than 32 pixels of one row. Poses are drawn
about the identity as in ProST's training (rotations ~ N(0, 0.165 rad), shifts ~ N(0, 22 mm)).

Passes, for batches of 1 and 32 poses (one volume shared by all poses):

* ``forward``: the DRRs under ``torch.no_grad()``;
* ``fwd+bwd``: ``(drr * target).sum().backward()`` with the pose (B, 6) requiring grad;
* ``train``: one training-like double-backward step with the pose and the volume requiring grad,
  ``g = autograd.grad((drr * target).sum(), pose, create_graph=True)``, ``(g ** 2).sum().backward()``.

Time is the median of CUDA-event timings of repeated calls after a warm-up (the count adapts to
the call's length); memory is ``torch.cuda.max_memory_allocated`` during the calls above what was
allocated before them. Samples per second count prostlab's visited samples
(``RayBundle.sample_range``) for every pass; nanodrr is given the mean per-ray count of those
samples on every ray, so it takes about as many. The markdown table comes last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

SDD, SID, STEP = 1020.0, 620.0, 1.75
DETECTORS = {128: 2.92, 256: 1.46}  # pixels -> pixel spacing (mm)
VOLUMES = {128: 2.33, 256: 1.165, 384: 0.776}  # voxels per side -> voxel size (mm)
BATCHES = (1, 32)
PASSES = ("forward", "fwd+bwd", "train")
LIBS = ("cupy", "torch", "nanodrr")
TORCH_CHUNK = 1 << 24  # samples per chunk for the torch backend (its default is 1 << 21)


# ------------------------------------------------------------------------------------ inputs
def phantom(n: int, spacing: float, device):
    """A water ellipsoid with a denser rod and slab (attenuation, 1/mm), (1, 1, n, n, n)."""
    import torch

    axis = (torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2) * spacing
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    mu = 0.02 * ((x / 130) ** 2 + (y / 140) ** 2 + (z / 100) ** 2 <= 1).float()
    mu += 0.03 * (((x - 10) ** 2 + (z - 40) ** 2) <= 15**2).float()
    mu += 0.02 * ((y.abs() < 8) & (x.abs() < 90) & (z.abs() < 60)).float()
    return mu[None, None].contiguous()


def poses(batch: int, device, seed: int = 0):
    """``batch`` poses (B, 6) about the identity, ProST's training spread."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rotation = torch.randn(batch, 3, generator=g) * 0.165
    shift = torch.randn(batch, 3, generator=g) * 22.0
    return torch.cat((rotation, shift), dim=1).to(device)


def camera(pixels: int):
    from prostlab.geometry import Camera

    px = DETECTORS[pixels]
    return Camera(sdd=SDD, sid=SID, height=pixels, width=pixels, pixel_spacing=(px, px))


def sample_count(cam, n: int, spacing: float, pose) -> tuple[int, float]:
    """prostlab's visited samples for all poses: (total, mean per ray)."""
    import torch

    from prostlab.projector.rays import RayBundle

    E = cam.extrinsics(pose.double())
    Rt = E[:, :, :3].transpose(1, 2)
    M = torch.cat((Rt, -Rt @ E[:, :, 3:]), dim=2)
    rays = RayBundle.from_camera(cam, (spacing,) * 3, (n,) * 3, STEP, torch.float64, M.device)
    _, count = rays.sample_range(M)
    return int(count.sum()), float(count.double().mean())


# --------------------------------------------------------------------------------- renderers
def make_renderer(lib: str, cam, volume, spacing: float, n_peer: int):
    """``render(volume, pose) -> (B, 1, H, W)`` on the GPU for ``lib``."""
    if lib in ("cupy", "torch"):
        from prostlab.projector import Projector

        # The torch backend gets large chunks of rays: an H200 has the memory for them.
        projector = Projector(cam, step=STEP, backend=lib, max_samples=TORCH_CHUNK)
        return lambda vol, pose: projector(vol, (spacing,) * 3, pose)
    if lib == "nanodrr":
        return nanodrr_renderer(cam, volume, spacing, n_peer)
    raise ValueError(lib)


def nanodrr_renderer(cam, volume, spacing: float, n_peer: int, backend: str = "triton"):
    """nanodrr's Triton backend on our volume and poses (the frame mapping of bench/projector.py).

    The volume's affine is ``diag(s) i - (N - 1) / 2 s``, so nanodrr's world frame is our volume
    frame; its torchio layout reads our (D, H, W) array as (W, H, D), hence the permutes.
    """
    import numpy as np
    import torchio as tio
    from nanodrr.data import Subject
    from nanodrr.drr import DRR

    device = volume.device
    n = volume.shape[-1]
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(n - 1) / 2 * spacing
    image = tio.ScalarImage(tensor=volume[0].detach().cpu(), affine=affine)
    subject = Subject.from_images(image, convert_to_mu=False).to(device)
    dv, du = cam.pixel_spacing
    drr = DRR.from_carm_intrinsics(SDD, du, dv, 0.0, 0.0, cam.height, cam.width).to(device)
    world_from_volume = subject.voxel_to_world.double().cpu() @ index_from_volume(n, spacing)
    world_from_volume = world_from_volume.float().to(device)

    def render(vol, pose):
        if vol.requires_grad:
            subject._image_hu = vol.permute(0, 1, 4, 3, 2)
        rt_inv = world_from_volume @ camera_to_volume(cam, pose)
        return drr(subject, rt_inv, n_samples=n_peer, backend=backend)

    return render


def index_from_volume(n: int, spacing: float):
    """``V``: our volume frame (centred, mm) to array indices, (4, 4) float64."""
    import torch

    V = torch.eye(4, dtype=torch.float64)
    V[:3, :3] /= spacing
    V[:3, 3] = (n - 1) / 2
    return V


def camera_to_volume(cam, pose):
    """``E^-1`` (B, 4, 4), differentiable in ``pose``."""
    import torch

    E = cam.extrinsics(pose)
    Rt = E[:, :, :3].transpose(1, 2)
    top = torch.cat((Rt, -Rt @ E[:, :, 3:]), dim=2)
    bottom = torch.zeros(len(pose), 1, 4, dtype=pose.dtype, device=pose.device)
    bottom[..., 3] = 1.0
    return torch.cat((top, bottom), dim=1)


def library_status(lib: str) -> str | None:
    """None if ``lib`` can run here, else why not."""
    if lib == "cupy":
        from prostlab.projector.backends import cupy_available

        return None if cupy_available() else "not installed (cupy)"
    if lib == "nanodrr":
        try:
            import nanodrr.drr  # noqa: F401
            import torchio  # noqa: F401
            import triton  # noqa: F401
        except ImportError as error:
            return f"not installed ({error.name or error})"
    return None


# ------------------------------------------------------------------------------------ timing
def measure(call, budget_s: float, max_repeats: int) -> tuple[list[float], int]:
    """CUDA-event milliseconds of repeated ``call()`` after a warm-up, and the peak bytes.

    The repeat count is what fits in ``budget_s`` (3 to ``max_repeats``) judged by the warm-up.
    """
    import torch

    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    repeats = int(min(max_repeats, max(3, budget_s / max(first, 1e-6))))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        call()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return times, torch.cuda.max_memory_allocated() - base


def make_call(render, mode: str, volume, pose0, target):
    import torch

    if mode == "forward":
        def call():
            with torch.no_grad():
                render(volume, pose0)
        return call
    pose = pose0.clone().requires_grad_()
    if mode == "fwd+bwd":
        def call():
            pose.grad = None
            (render(volume, pose) * target).sum().backward()
        return call
    vol = volume.clone().requires_grad_()

    def call():
        pose.grad = vol.grad = None
        (g,) = torch.autograd.grad((render(vol, pose) * target).sum(), pose, create_graph=True)
        (g**2).sum().backward()
    return call


# -------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing budget per case")
    parser.add_argument("--volumes", type=int, nargs="+", default=list(VOLUMES),
                        choices=list(VOLUMES))
    parser.add_argument("--detectors", type=int, nargs="+", default=list(DETECTORS),
                        choices=list(DETECTORS))
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--passes", nargs="+", default=list(PASSES), choices=list(PASSES))
    parser.add_argument("--libs", nargs="+", default=list(LIBS), choices=list(LIBS))
    parser.add_argument("--time-limit", type=float, default=150.0,
                        help="seconds; cases not started by then are reported as skipped")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--cupy-bricks", type=int, default=0,
                        help="brick shift of the CUDA kernels' volume layout (0: linear)")
    parser.add_argument("--cupy-tile-rays", action="store_true",
                        help="launch the CUDA kernels' rays in Morton order of their pixels")
    args = parser.parse_args(argv)

    import torch

    from prostlab.projector.backends.cupy_backend import CupyBackend

    CupyBackend.brick_shift = args.cupy_bricks
    CupyBackend.tile_rays = args.cupy_tile_rays

    if not torch.cuda.is_available():
        print("projector_gpu: no CUDA device visible to torch; nothing to measure")
        return 1
    started = time.perf_counter()
    device = torch.device("cuda")
    budget = 0.25 if args.quick else 1.0
    status = {lib: library_status(lib) for lib in args.libs}
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
          f"cupy volume layout: {f'bricks of 2^{args.cupy_bricks}' if args.cupy_bricks else 'linear'}, "
          f"rays {'in Morton order' if args.cupy_tile_rays else 'row by row'}")
    for lib, why in status.items():
        print(f"{lib}: {why or 'available'}")

    # The inputs of every case, and each library's forward DRR against the torch backend's.
    volumes = {n: phantom(n, VOLUMES[n], device) for n in args.volumes}
    cases = []
    for n in args.volumes:
        for pixels in args.detectors:
            for batch in args.batches:
                cam, pose = camera(pixels), poses(batch, device)
                total, mean = sample_count(cam, n, VOLUMES[n], pose)
                case = {"volume": n, "detector": pixels, "batch": batch, "camera": cam,
                        "pose": pose, "samples": total, "n_peer": max(2, round(mean)),
                        "target": torch.randn(batch, 1, pixels, pixels, device=device)}
                case["check"] = cross_check(case, volumes[n], args.libs, status)
                cases.append(case)
                print(f"{n}^3 {pixels}^2 B={batch}: {total / 1e6:.1f} M samples "
                      f"({mean:.0f} per ray); max rel. diff vs torch: {case['check']}")

    # Timing, library by library (the CUDA kernels first, in case the time limit strikes).
    rows = []
    for lib in args.libs:
        for case in cases:
            renderer = None
            for mode in args.passes:
                row = {k: case[k] for k in ("volume", "detector", "batch", "samples")}
                row.update({"pass": mode, "lib": lib, "check": case["check"].get(lib)})
                rows.append(row)
                if status[lib] is not None:
                    row["error"] = status[lib]
                    continue
                if time.perf_counter() - started > args.time_limit:
                    row["error"] = f"skipped (time limit {args.time_limit:.0f} s)"
                    continue
                try:
                    if renderer is None:
                        renderer = make_renderer(lib, case["camera"], volumes[case["volume"]],
                                                 VOLUMES[case["volume"]], case["n_peer"])
                    call = make_call(renderer, mode, volumes[case["volume"]], case["pose"],
                                     case["target"])
                    times, peak = measure(call, budget, 50)
                    row.update(ms=statistics.median(times), peak=peak)
                except Exception as error:  # noqa: BLE001 - a library's failure is a result
                    row["error"] = f"{type(error).__name__}: {error}"[:100]
                torch.cuda.empty_cache()
                print(line(row), flush=True)
    order = {lib: i for i, lib in enumerate(args.libs)}
    rows.sort(key=lambda r: (r["volume"], r["detector"], r["batch"], PASSES.index(r["pass"]),
                             order[r["lib"]]))
    print(f"\n{len(rows)} cases in {time.perf_counter() - started:.0f} s\n")
    report = table(rows)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0


def cross_check(case, volume, libs, status) -> dict:
    """Each library's forward DRR against the torch backend's: max |diff| / max |torch|."""
    import torch

    if "torch" not in libs:
        return {}
    out = {}
    spacing = VOLUMES[case["volume"]]
    with torch.no_grad():
        reference = make_renderer("torch", case["camera"], volume, spacing, 0)(volume,
                                                                               case["pose"])
        for lib in libs:
            if lib == "torch" or status[lib] is not None:
                continue
            try:
                render = make_renderer(lib, case["camera"], volume, spacing, case["n_peer"])
                image = render(volume, case["pose"])
                out[lib] = float((image - reference).abs().max() / reference.abs().max())
            except Exception as error:  # noqa: BLE001 - the timing reports it too
                out[lib] = f"{type(error).__name__}"
    return out


def line(row: dict) -> str:
    head = (f"{row['volume']:3d}^3 {row['detector']:3d}^2 B={row['batch']:<3d} "
            f"{row['pass']:8s} {row['lib']:8s}")
    if "error" in row:
        return f"{head} {row['error']}"
    return f"{head} {row['ms']:9.3f} ms  peak {row['peak'] / 2**20:8.1f} MiB"


def table(rows) -> str:
    headers = ["volume", "detector", "B", "pass", "library", "median ms", "DRRs/s",
               "Gsamples/s", "peak MiB", "max rel. diff vs torch (fwd)", "speed-up vs torch"]
    torch_ms = {(r["volume"], r["detector"], r["batch"], r["pass"]): r.get("ms")
                for r in rows if r["lib"] == "torch"}
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for r in rows:
        key = (r["volume"], r["detector"], r["batch"], r["pass"])
        check = r.get("check")
        check = "—" if check is None else (f"{check:.1e}" if isinstance(check, float) else check)
        if "error" in r:
            cells = [r["error"], "—", "—", "—", check, "—"]
        else:
            seconds = r["ms"] / 1e3
            reference = torch_ms.get(key)
            speedup = f"{reference / r['ms']:.1f}×" if reference else "—"
            cells = [f"{r['ms']:.3f}", f"{r['batch'] / seconds:,.0f}",
                     f"{r['samples'] / seconds / 1e9:.2f}", f"{r['peak'] / 2**20:.1f}", check,
                     speedup]
        lines.append("| " + " | ".join([f"{r['volume']}³", f"{r['detector']}²", str(r["batch"]),
                                         r["pass"], r["lib"], *cells]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
