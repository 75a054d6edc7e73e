"""CPU benchmark of prostlab's projector (torch backend) beside nanodrr and DiffDRR.

    python bench/projector.py [--quick] [--threads 1] [--full] [--out bench/results/projector_cpu.md]

(the rotated pose on the 256² detector is only cross-checked, not timed, unless ``--full``).

Installing the peers (they are optional; a missing one is reported as "not installed"). Neither
may replace the torch build you have, so check first:

    pip install --dry-run nanodrr      # must not list torch under "Would install"
    pip install nanodrr                # nanodrr 0.1.7: torch>=2.5, jaxtyping, roma, torchio
    pip install --no-deps diffdrr      # diffdrr 0.6.1 requires torchvision, timm, pyvista[all],
                                       # seaborn, tqdm, ... which the renderer never imports;
                                       # with them, pip would replace torch 2.13.0+cpu by
                                       # torch 2.14.1 and its CUDA wheels (+ vtk, trame, jupyter)
    pip install torchio roma kornia einops fastcore pandas matplotlib imageio
                                       # what `from diffdrr.drr import DRR` and
                                       # `from diffdrr.data import read` do import; use
                                       # --no-deps for any that would pull torch/torchvision

What is measured, for each detector (128^2 at 2.92 mm, 256^2 at 1.46 mm: ProST's pelvis camera,
sdd 1020 mm, sid 620 mm), each pose (identity, and a rotated and shifted one) and each library:

* ``forward``: one DRR under ``torch.no_grad()``.
* ``fwd+bwd``: ``sim = (drr * target).sum(); sim.backward()`` with the pose (B, 6) requiring grad.
* ``fwd+bwd+2nd``: one step of training a similarity network through the projector:
  ``g = autograd.grad(sim, pose, create_graph=True)[0]; (g ** 2).sum().backward()``, with the pose
  and the volume requiring grad (the double backward ProST needs).

Time is the median of up to ``--repeats`` calls after ``--warmup`` untimed ones
(time.perf_counter), fewer where they would not fit in ``--budget`` seconds. The three libraries
of a case run in one fresh process, round-robin (each round calls each once, in a rotating
order), so that other jobs on a shared machine slow them alike; speed ratios are medians of the
per-round ratios. Memory is the peak resident set size during one call, in a fresh process per
library and case, above the size just before it (VmHWM reset through /proc/self/clear_refs; see
``_common.PeakRSS``): temporaries, autograd's saved tensors and the returned gradients, not the
inputs. ``--threads 1`` runs torch single-threaded in the measuring processes: on a machine whose
cores are busy with other jobs, every parallel op otherwise waits for a descheduled thread, which
hurts prostlab's torch backend (many small ops) far more than the peers.

Samples: prostlab marches ``tau_k = k * step`` from the source, visiting only the samples inside
the volume's support (``RayBundle.sample_range``); its count is the sum of those per-ray counts.
nanodrr and DiffDRR put a fixed number ``n`` of samples on every ray; we give them the mean of
prostlab's per-ray counts, rounded, so that all three take (almost) the same number of trilinear
samples per image. "samples/s" is that count divided by the median time, for every pass (a
backward pass revisits the same samples).

How each peer's parameters map to ours (docs/geometry.md states our frames; all of this was read
from the installed sources, nanodrr 0.1.7 and diffdrr 0.6.1, and is checked by the image NCC):

* The volume. Both peers read a torchio ``ScalarImage`` whose data is our array unchanged,
  ``(1, D, H, W)`` in torchio's ``(C, X, Y, Z)`` layout, and whose affine is the NIfTI index-to-RAS
  affine of the prepared volume (LIP array axes). Both then sample with ``grid_sample``, whose
  ``(x, y, z)`` index the array's last, middle and first axes: nanodrr permutes the array to
  ``(Z, Y, X)`` (``Subject._to_bcdhw``), DiffDRR does ``density.permute(2, 1, 0)``, and both map a
  world point to the voxel index ``(i, j, k)`` of our ``(D, H, W)`` axes through the inverse
  affine, so no axis is flipped or swapped. Our volume frame is that index, centred and scaled:
  ``world = A @ V`` with ``V = [diag(1 / s) | (N - 1) / 2]``, here ``W_v = A V``.
  nanodrr is given the mu volume with ``convert_to_mu=False``; DiffDRR's ``read`` turns HU into a
  [0, 1] "density", so its density image is overwritten with the same mu. DiffDRR's ``read``
  also moves the world origin to the grid centre (``canonicalize``): we use its moved affine.
* The camera. nanodrr: ``DRR.from_carm_intrinsics(sdd, delx=du, dely=dv, x0=0, y0=0, H, W)``; its
  pixel ``(u, v)`` is at ``((u + 0.5 - W / 2) du, (v + 0.5 - H / 2) dv, sdd)`` from the source, which
  is our ray ``((u - (W - 1) / 2) du, (v - (H - 1) / 2) dv, sdd)``: the same camera frame. DiffDRR:
  ``DRR(subject, sdd, height, delx, width, dely, renderer="trilinear")`` with its default
  ``reverse_x_axis=True`` places pixel ``(row r, column c)`` at
  ``(-(c - (W - 1) / 2) du, -(r - (H - 1) / 2) dv, sdd)``: its camera frame is ours turned 180
  degrees about the beam, ``F = diag(-1, -1, 1)``.
* The pose. Ours is the camera-from-volume map ``E = [R | t + sid e_z]``; its inverse ``M = E^-1``
  takes camera to volume frame. nanodrr wants camera-to-world ``rt_inv = W_v M``. DiffDRR builds
  camera-to-world as ``pose @ reorient`` (``Detector.forward``: ``reorient.compose(pose)``), so its
  pose matrix is ``W_v M F reorient^T`` (``reorient`` of ``orientation="AP"``). For our identity
  pose these are exactly the peers' own AP set-ups: nanodrr's ``make_rt_inv(rotation=0,
  translation=(0, sid, 0), orientation="AP", isocenter=subject.isocenter)`` (asserted below) and
  DiffDRR's ``rotation=0, translation=(0, sid, 0)`` (source ``sid`` mm anterior of the centre).
  The maps are torch ops on the pose tensor, so gradients reach the same (B, 6) pose everywhere.
* The samples. nanodrr clips each ray to the same support as ours (one voxel beyond the outer
  voxel centres) and puts ``n`` samples at the midpoints of ``n`` equal parts of the clipped
  segment (``_clip_rays``). DiffDRR's trilinear renderer takes ``n_points`` samples, endpoints
  included, over one parameter interval shared by all rays of the batch (the earliest entry to the
  latest exit of a box from index -0.5 to N + 0.5), so a ray that crosses a short chord spends
  samples in air. All three images are ``step * sum(mu)``, line integrals in mu * mm.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO,
    PeakRSS,
    fmt,
    load_average,
    machine_facts,
    markdown_table,
    measure_call,
    median,
    package_version,
    run_worker,
)

SDD, SID, STEP = 1020.0, 620.0, 1.75
DETECTORS = {128: 2.92, 256: 1.46}  # pixels -> pixel spacing (mm): the same 373.8 mm detector
POSES = {
    "identity": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    # 36 degrees mostly about the vertical (image-row) axis, plus a tilt and a shift
    "rotated": (0.2, 0.6, 0.1, 10.0, -5.0, 20.0),
}
PASSES = ("forward", "fwd+bwd", "fwd+bwd+2nd")
LIBS = ("prostlab", "nanodrr", "diffdrr")
PEER_PACKAGES = {"nanodrr": "nanodrr", "diffdrr": "diffdrr"}
WORKER_TIMEOUT_S = 900


# ------------------------------------------------------------------------------------- data
def load_volume():
    """The bundled 128^3 chest CT as (volume (1, 1, D, H, W), spacing, affine, description)."""
    import numpy as np
    import torch

    import prostlab.data as pdata

    example = REPO / "data" / "chest_ct_128"
    if (example / "meta.json").is_file():
        ct = pdata.load_prepared(pdata.example_path()).ct
        return (ct.data[None].float(), ct.spacing, ct.affine,
                "bundled example data/chest_ct_128 (ct_mu, 128^3, 2.598 mm)")
    shared = REPO.parent / "shared" / "data" / "chest_ct"
    if (shared / "ct.nii.gz").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            pdata.prepare_ct(shared / "ct.nii.gz", shared / "labels.nii.gz", tmp, size=128,
                             bones="bones")
            ct = pdata.load_prepared(tmp).ct
        return (ct.data[None].float(), ct.spacing, ct.affine,
                "../shared/data/chest_ct/ct.nii.gz prepared to 128^3 (prostlab.data.prepare_ct)")
    # A synthetic phantom: a water ellipsoid with a denser rod and slab, LIP affine, 2.6 mm.
    n, s = 128, 2.6
    axis = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * s
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    mu = 0.02 * ((x / 140) ** 2 + (y / 160) ** 2 + (z / 100) ** 2 <= 1).float()
    mu += 0.03 * (((x - 10) ** 2 + (z - 40) ** 2) <= 15 ** 2).float()
    mu += 0.02 * ((y.abs() < 8) & (x.abs() < 90) & (z.abs() < 60)).float()
    affine = np.diag([-s, -s, -s, 1.0])[:, [0, 2, 1, 3]]  # LIP: axis 0 -> -x, 1 -> -z, 2 -> -y
    affine[:3, 3] = -affine[:3, :3] @ np.full(3, (n - 1) / 2)
    return mu[None, None], (s, s, s), affine, "synthetic 128^3 phantom (no CT data found)"


# --------------------------------------------------------------------------------- geometry
def camera(pixels: int):
    from prostlab.geometry import Camera

    px = DETECTORS[pixels]
    return Camera(sdd=SDD, sid=SID, height=pixels, width=pixels, pixel_spacing=(px, px))


def camera_to_volume(cam, pose):
    """``M = E^-1`` (B, 4, 4): our camera frame to our volume frame, differentiable in ``pose``."""
    import torch

    E = cam.extrinsics(pose)
    Rt = E[:, :, :3].transpose(1, 2)
    top = torch.cat((Rt, -Rt @ E[:, :, 3:]), dim=2)
    bottom = torch.tensor([[[0.0, 0.0, 0.0, 1.0]]], dtype=pose.dtype).expand(len(pose), 1, 4)
    return torch.cat((top, bottom), dim=1)


def world_from_volume(affine, shape, spacing):
    """``W_v = A V``: our volume frame (centred, mm, array axes) to the affine's world."""
    import numpy as np
    import torch

    V = np.eye(4)
    V[:3, :3] = np.diag(1.0 / np.asarray(spacing, dtype=np.float64))
    V[:3, 3] = (np.asarray(shape, dtype=np.float64) - 1) / 2
    return torch.from_numpy(np.asarray(affine, dtype=np.float64) @ V)


def sample_counts(cam, volume, spacing, pose):
    """Per-ray sample counts of prostlab's projector at ``pose`` (1, 6): (total, mean, max)."""
    import torch

    from prostlab.projector.rays import RayBundle

    M = camera_to_volume(cam, pose.double())[:, :3].to(volume.dtype)
    rays = RayBundle.from_camera(cam, spacing, volume.shape[2:], STEP, volume.dtype, "cpu")
    _, count = rays.sample_range(M)
    return int(count.sum()), float(count.float().mean()), int(count.max()), int(
        torch.count_nonzero(count))


# -------------------------------------------------------------------------------- renderers
def make_renderer(lib: str, volume, spacing, affine, pixels: int, n_peer: int,
                  max_samples: int | None = None, backend: str = "torch"):
    """``render(volume, pose) -> (B, 1, H, W)`` for ``lib``, and its samples per image (B = 1).

    ``volume`` is our (1, 1, D, H, W) mu array and ``pose`` our (B, 6) pose; each peer gets them
    through the mapping in the module docstring, with torch ops, so gradients flow to both.
    """
    import torch

    cam = camera(pixels)
    dv, du = cam.pixel_spacing
    if lib == "prostlab":
        from prostlab.projector import Projector

        extra = {} if max_samples is None else {"max_samples": max_samples}
        projector = Projector(cam, step=STEP, backend=backend, **extra)

        def render(vol, pose):
            return projector(vol, spacing, pose)

        return render

    import torchio as tio

    image = tio.ScalarImage(tensor=volume[0].detach().clone(), affine=affine)
    if lib == "nanodrr":
        from nanodrr.camera import make_rt_inv
        from nanodrr.data import Subject
        from nanodrr.drr import DRR

        subject = Subject.from_images(image, convert_to_mu=False)
        drr = DRR.from_carm_intrinsics(SDD, du, dv, 0.0, 0.0, pixels, pixels)
        W_v = world_from_volume(subject.voxel_to_world.double().numpy(), volume.shape[2:],
                                spacing)
        # Our identity pose is nanodrr's own AP set-up (source sid mm anterior of the isocentre).
        zero = torch.zeros(1, 6, dtype=torch.float64)
        ours = W_v @ camera_to_volume(cam, zero)
        theirs = make_rt_inv(torch.zeros(1, 3, dtype=torch.float64),
                             torch.tensor([[0.0, SID, 0.0]], dtype=torch.float64), "AP",
                             subject.isocenter.double())
        assert torch.allclose(ours, theirs, atol=1e-3), (ours, theirs)
        W_v = W_v.float()

        def render(vol, pose):
            if vol.requires_grad:  # _to_bcdhw's layout: (1, 1, W, H, D) of ours
                subject._image_hu = vol.permute(0, 1, 4, 3, 2)
            rt_inv = W_v @ camera_to_volume(cam, pose)
            return drr(subject, rt_inv, n_samples=n_peer, backend="torch")

        return render

    if lib == "diffdrr":
        from diffdrr.data import read
        from diffdrr.drr import DRR
        from diffdrr.pose import RigidTransform

        subject = read(image, orientation="AP")  # moves the world origin to the grid centre
        subject.density.set_data(subject.volume.data.float())  # mu, not diffdrr's [0, 1] density
        drr = DRR(subject, sdd=SDD, height=pixels, width=pixels, delx=du, dely=dv,
                  renderer="trilinear")
        W_v = world_from_volume(subject.volume.affine, volume.shape[2:], spacing)
        F = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))
        reorient_T = drr.detector._reorient.double().T
        zero = torch.zeros(1, 6, dtype=torch.float64)
        theirs = torch.eye(4, dtype=torch.float64)
        theirs[1, 3] = SID  # DiffDRR's AP: rotation 0, translation (0, sid, 0)
        assert torch.allclose(W_v @ camera_to_volume(cam, zero) @ F @ reorient_T, theirs,
                              atol=1e-3)
        right = (F @ reorient_T).float()
        W_v = W_v.float()

        def render(vol, pose):
            if vol.requires_grad:
                drr.density = vol[0, 0]  # DiffDRR's density is (X, Y, Z): our array as it is
            matrix = W_v @ camera_to_volume(cam, pose) @ right
            return drr(RigidTransform(matrix), n_points=n_peer)

        return render
    raise ValueError(lib)


def peer_status(lib: str) -> str | None:
    """None if ``lib`` imports, else why not."""
    if lib == "prostlab":
        return None
    try:
        if lib == "nanodrr":
            import nanodrr.drr  # noqa: F401
        else:
            import diffdrr.data  # noqa: F401
            import diffdrr.drr  # noqa: F401
    except ImportError as error:
        return f"not installed ({error.name or error})"
    return None


# ---------------------------------------------------------------------------------- a case
def make_call(lib: str, mode: str, volume, spacing, affine, pixels: int, pose_name: str,
              n_peer: int, max_samples: int | None, backend: str = "torch"):
    """A no-argument function running one ``mode`` pass of ``lib``; all set-up done here."""
    import torch

    render = make_renderer(lib, volume, spacing, affine, pixels, n_peer, max_samples, backend)
    pose0 = torch.tensor([POSES[pose_name]], dtype=torch.float32)
    target = torch.randn(1, 1, pixels, pixels, generator=torch.Generator().manual_seed(0))
    if mode == "forward":
        def call():
            with torch.no_grad():
                render(volume, pose0)
    elif mode == "fwd+bwd":
        pose = pose0.clone().requires_grad_()

        def call():
            pose.grad = None
            sim = (render(volume, pose) * target).sum()
            sim.backward()
    elif mode == "fwd+bwd+2nd":
        pose = pose0.clone().requires_grad_()
        vol = volume.clone().requires_grad_()

        def call():
            pose.grad = vol.grad = None
            sim = (render(vol, pose) * target).sum()
            (g,) = torch.autograd.grad(sim, pose, create_graph=True)
            (g ** 2).sum().backward()
    else:
        raise ValueError(mode)
    return call


def _error(error: Exception) -> dict:
    return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}


def run_case(spec: dict) -> dict:
    """One worker's job, in a fresh process; ``spec`` comes from the parent.

    ``kind == "memory"``: one call of one library, and its peak RSS growth (see ``PeakRSS``).
    ``kind == "time"``: all of ``spec["libs"]`` on the same case, timed round-robin: each library
    is warmed up, then every round calls each once, in an order that rotates from round to round,
    so that load from other jobs on the machine falls on all of them alike.
    """
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    blob = torch.load(spec["data"], weights_only=False)
    volume, spacing, affine = blob["volume"], tuple(blob["spacing"]), blob["affine"]
    args = (spec["mode"], volume, spacing, affine, spec["pixels"], spec["pose"], spec["n_peer"],
            spec.get("max_samples"), spec.get("backend", "torch"))
    if spec["kind"] == "memory":
        call = make_call(spec["lib"], *args)
        gc.collect()
        memory = PeakRSS()
        memory.start()
        try:
            call()
        except Exception as error:  # noqa: BLE001 - a peer that cannot do a pass is a result
            return _error(error)
        return {"peak_bytes": memory.peak(), "peak_exact": memory.exact}

    calls, out, first = {}, {}, {}
    for lib in spec["libs"]:
        try:
            calls[lib] = make_call(lib, *args)
            start = time.perf_counter()  # the first warm-up call sizes the rounds
            calls[lib]()
            first[lib] = time.perf_counter() - start
            for _ in range(spec["warmup"] - 1):
                calls[lib]()
        except Exception as error:  # noqa: BLE001
            out[lib] = _error(error)
            calls.pop(lib, None)
    if not calls:
        return out
    rounds = max(1, min(spec["repeats"], int(spec["budget"] // max(sum(first.values()), 1e-9))))
    wall = {lib: [] for lib in calls}
    cpu = {lib: [] for lib in calls}
    order = list(calls)
    for r in range(rounds):
        for lib in order[r % len(order):] + order[:r % len(order)]:
            t = measure_call(calls[lib], warmup=0, repeats=1)
            wall[lib] += t["wall_ms"]
            cpu[lib] += t["cpu_ms"]
    for lib in calls:
        out[lib] = {"wall_ms": wall[lib], "cpu_times_ms": cpu[lib], "repeats": rounds,
                    "median_ms": median(wall[lib]), "cpu_ms": median(cpu[lib]),
                    "threads": torch.get_num_threads()}
    return out


# ------------------------------------------------------------------------------ cross-check
def ncc(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def cross_check(volume, spacing, affine, pixels, pose_name, n_peer, available):
    """NCC and relative mean difference of each peer's forward DRR against prostlab's."""
    import torch

    pose = torch.tensor([POSES[pose_name]], dtype=torch.float32)
    images = {}
    with torch.no_grad():
        for lib in ("prostlab", *[p for p in PEER_PACKAGES if p in available]):
            images[lib] = make_renderer(lib, volume, spacing, affine, pixels, n_peer)(volume, pose)
    ours = images["prostlab"]
    out = {}
    for lib, image in images.items():
        if lib != "prostlab":
            out[lib] = {"ncc": ncc(ours, image),
                        "mean_rel": float(image.mean() / ours.mean() - 1),
                        "max_abs_rel": float((image - ours).abs().max() / ours.abs().max())}
    return out, images


# ------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 warm-up + up to 3 repeats in 15 s per case (default: 1 + up to "
                             "5 in 40 s)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (at least 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls, at most")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed calls per case: fewer repeats (at least 1) when "
                             "the first warm-up call says they would not fit")
    parser.add_argument("--detectors", type=int, nargs="+", default=list(DETECTORS),
                        choices=list(DETECTORS))
    parser.add_argument("--poses", nargs="+", default=list(POSES), choices=list(POSES))
    parser.add_argument("--full", action="store_true",
                        help="also time the rotated pose on the 256² detector (by default it is "
                             "only cross-checked, to keep the run near 10 minutes)")
    parser.add_argument("--passes", nargs="+", default=list(PASSES), choices=list(PASSES))
    parser.add_argument("--libs", nargs="+", default=list(LIBS), choices=list(LIBS))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads in the measuring processes (default: "
                             "torch's own choice); 1 keeps a machine shared with other jobs "
                             "from stalling every parallel op on a busy core")
    parser.add_argument("--backend", default="torch",
                        help="prostlab's projector backend (this benchmark is of 'torch')")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="prostlab Projector max_samples (samples per chunk; default: its own)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--images", type=Path, default=None,
                        help="save a PNG of the three DRRs of each cross-check case here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        print(json.dumps(run_case(json.loads(args.worker))))
        return 0

    import torch

    warmup = max(1, args.warmup if args.warmup is not None else 1)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    budget = args.budget if args.budget is not None else (15.0 if args.quick else 40.0)
    started = time.perf_counter()
    facts = machine_facts()
    # Tracked changes only: an untracked new backend file does not change the torch backend.
    dirty = subprocess.run(["git", "diff", "--name-only", "HEAD", "--", "src/prostlab/projector"],
                           capture_output=True, text=True, cwd=REPO).stdout.split()
    load_start = load_average()
    volume, spacing, affine, source = load_volume()
    print(f"volume: {source}, shape {tuple(volume.shape)}, spacing {spacing}")
    print(f"machine: {facts['cpu']}, {facts['cores']} cores, torch {facts['torch']} "
          f"({args.threads or facts['torch_threads']} threads), commit {facts['commit']}")

    status = {lib: peer_status(lib) for lib in args.libs}
    available = [lib for lib in args.libs if status[lib] is None]
    for lib in PEER_PACKAGES:
        version = package_version(PEER_PACKAGES[lib])
        print(f"{lib}: {status.get(lib) or 'version ' + str(version)}")

    data_file = Path(tempfile.mkdtemp(prefix="prostlab-bench-")) / "volume.pt"
    torch.save({"volume": volume, "spacing": spacing, "affine": affine}, data_file)

    # Sample counts and the image cross-check, in this process.
    counts, checks = {}, {}
    for pixels in args.detectors:
        for pose_name in args.poses:
            cam = camera(pixels)
            pose = torch.tensor([POSES[pose_name]])
            total, mean, most, hit = sample_counts(cam, volume, spacing, pose)
            n_peer = max(2, round(mean))
            counts[pixels, pose_name] = {"total": total, "mean": mean, "max": most, "hit": hit,
                                         "n_peer": n_peer, "rays": pixels * pixels}
            checks[pixels, pose_name], images = cross_check(
                volume, spacing, affine, pixels, pose_name, n_peer, available)
            line = ", ".join(f"{lib} NCC {c['ncc']:.6f} (mean {100 * c['mean_rel']:+.2f}%)"
                             for lib, c in checks[pixels, pose_name].items())
            print(f"{pixels}px {pose_name}: prostlab {total} samples ({mean:.1f}/ray, max "
                  f"{most}); peers {n_peer}/ray. {line}")
            if args.images is not None:
                save_images(images, args.images / f"drr_{pixels}_{pose_name}.png")

    # Memory: one fresh process per (case, library). Time: one process per case, round-robin.
    results = {}
    worker = [str(Path(__file__).resolve()), "--worker"]
    for pixels, pose_name in timed_cases(args):
        for mode in args.passes:
            spec = {"pixels": pixels, "pose": pose_name, "mode": mode,
                    "n_peer": counts[pixels, pose_name]["n_peer"], "warmup": warmup,
                    "repeats": repeats, "budget": budget, "data": str(data_file),
                    "max_samples": args.max_samples, "backend": args.backend,
                    "threads": args.threads}
            timing = run_worker(worker + [json.dumps({**spec, "kind": "time", "libs": available})],
                                timeout=WORKER_TIMEOUT_S)
            for lib in args.libs:
                key = (pixels, pose_name, mode, lib)
                if lib not in available:
                    results[key] = {"error": status[lib]}
                    continue
                result = dict(timing.get(lib, timing if "error" in timing else {}))
                if "error" not in result:
                    memory = run_worker(worker + [json.dumps({**spec, "kind": "memory",
                                                              "lib": lib})],
                                        timeout=WORKER_TIMEOUT_S)
                    result = {**result, **memory} if "error" not in memory else memory
                results[key] = result
                print(f"{pixels}px {pose_name:8s} {mode:12s} {lib:9s} "
                      + (f"{result['median_ms']:9.1f} ms (cpu {result['cpu_ms']:9.1f} ms) "
                         f"x{result['repeats']}  peak {result['peak_bytes'] / 2**20:7.1f} MiB"
                         if "error" not in result else result["error"]), flush=True)
    data_file.unlink()

    command = "python bench/projector.py" + (" --quick" if args.quick else "") + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]) if a != "--quick")
    loads = (load_start, load_average())
    report = render_report(facts, dirty, source, command, warmup, repeats, budget, counts,
                           checks,
                           results, args, status, time.perf_counter() - started, loads)
    print()
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
        print(f"\nwritten to {args.out}")
    return 0


def save_images(images, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(images), figsize=(4 * len(images), 4))
    for ax, (lib, image) in zip(axes, images.items(), strict=True):
        ax.imshow(image[0, 0].numpy(), cmap="gray")
        ax.set_title(lib)
        ax.axis("off")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def default_max_samples():
    import inspect

    from prostlab.projector import Projector

    return inspect.signature(Projector).parameters["max_samples"].default


def timed_cases(args):
    """The (detector, pose) pairs to time: all, less the rotated 256² one unless --full."""
    return [(pixels, pose) for pixels in args.detectors for pose in args.poses
            if args.full or (pixels, pose) != (256, "rotated") or len(args.poses) == 1]


def render_report(facts, dirty, source, command, warmup, repeats, budget, counts, checks,
                  results, args, status, elapsed, loads) -> str:
    peers = [lib for lib in PEER_PACKAGES if lib in args.libs]

    def ok(result):
        return result is not None and "error" not in result

    def ms(result):  # "wall (cpu)"
        if result is None:
            return "—"
        if "error" in result:
            return result["error"]
        return f"{result['median_ms']:.0f} ({result['cpu_ms']:.0f})"

    def mib(result):
        return f"{result['peak_bytes'] / 2 ** 20:.0f}" if ok(result) else "—"

    headers = ["detector", "pose", "pass", "prostlab ms (cpu)", "prostlab Msamples/s",
               "prostlab peak MiB"]
    for lib in peers:
        headers += [f"{lib} ms (cpu)", f"{lib} peak MiB", f"speed vs {lib} (cpu)",
                    f"memory vs {lib}"]
    rows, verdicts = [], []
    targets = {"forward": 3.0, "fwd+bwd": 2.0}
    for pixels, pose_name in timed_cases(args):
        c = counts[pixels, pose_name]
        for mode in args.passes:
            ours = results.get((pixels, pose_name, mode, "prostlab"))
            rate = c["total"] / ours["median_ms"] / 1e3 if ok(ours) else None
            row = [f"{pixels}²", pose_name, mode, ms(ours), fmt(rate, 2), mib(ours)]
            for lib in peers:
                peer = results.get((pixels, pose_name, mode, lib))
                speed = speed_cpu = mem = None
                if ok(ours) and ok(peer):
                    # paired by round: the two calls ran within seconds of each other
                    speed = median([a / b for a, b in zip(peer["wall_ms"], ours["wall_ms"],
                                                          strict=True)])
                    speed_cpu = median([a / b for a, b in zip(
                        peer["cpu_times_ms"], ours["cpu_times_ms"], strict=True)])
                    if peer["peak_bytes"] > 0:
                        mem = ours["peak_bytes"] / peer["peak_bytes"]
                row += [ms(peer), mib(peer),
                        f"{fmt(speed, 2, '×')} ({fmt(speed_cpu, 2, '×')})",
                        fmt(mem, 2, "×")]
                if lib == "nanodrr" and speed is not None:
                    if mode in targets:
                        verdicts.append((pixels, pose_name, mode, "speed",
                                         f"{speed:.2f}× (cpu {speed_cpu:.2f}×)",
                                         f"≥ {targets[mode]:g}×", speed >= targets[mode]))
                    if mem is not None:
                        verdicts.append((pixels, pose_name, mode, "memory", f"{mem:.2f}×",
                                         "≤ 0.5×", mem <= 0.5))
            rows.append(row)

    ncc_headers = ["detector", "pose", "prostlab samples", "per ray: mean / max",
                   "peers' samples per ray"]
    for lib in peers:
        ncc_headers += [f"NCC {lib}", f"mean {lib} / prostlab - 1"]
    ncc_rows = []
    for (pixels, pose_name), c in counts.items():
        row = [f"{pixels}²", pose_name, f"{c['total']:,}", f"{c['mean']:.1f} / {c['max']}",
               f"{c['n_peer']} ({c['n_peer'] * c['rays']:,} in all)"]
        for lib in peers:
            chk = checks[pixels, pose_name].get(lib)
            row += ([f"{chk['ncc']:.6f}", f"{100 * chk['mean_rel']:+.2f}%"] if chk
                    else [status.get(lib) or "—", "—"])
        ncc_rows.append(row)

    short = sorted({r["repeats"] for r in results.values()
                    if r.get("repeats", repeats) < repeats})
    few = ("every case ran all" if not short else "some cases ran "
           + ", ".join(str(n) for n in short))
    threads = args.threads or facts["torch_threads"]
    exact = {r.get("peak_exact") for r in results.values() if "peak_exact" in r}
    memory_note = ("peak RSS during the call above the RSS just before it "
                   "(VmHWM reset via /proc/self/clear_refs)" if exact == {True}
                   else "ru_maxrss after the call minus the RSS before it (VmHWM could not be "
                   "reset: an over-estimate if set-up peaked higher)")
    versions = ", ".join(f"{lib} {package_version(PEER_PACKAGES[lib]) or 'not installed'}"
                         for lib in peers)
    lines = [
        "## Projector, CPU (torch backend)",
        "",
        f"- date: {facts['date']}",
        f"- machine: {facts['cpu']}, {facts['cores']} cores; torch {facts['torch']} with "
        f"{threads} thread{'' if threads == 1 else 's'}"
        + (" (--threads)" if args.threads else " (its default)")
        + f"; Python {facts['python']}",
        f"- commit: {facts['commit']}"
        + (" (uncommitted changes to "
           + ", ".join(Path(f).relative_to("src/prostlab/projector").as_posix() for f in dirty)
           + " under src/prostlab/projector)" if dirty else
           " (src/prostlab/projector as committed)")
        + f"; prostlab backend {args.backend!r}, max_samples "
        + (f"{args.max_samples}" if args.max_samples else
           f"{default_max_samples()} (the Projector's default)"),
        f"- command: `{command}` ({elapsed / 60:.1f} min)",
        f"- peers: {versions}",
        f"- volume: {source}; camera: sdd {SDD:g} mm, sid {SID:g} mm, detector 373.8 mm square "
        f"(128² at 2.92 mm, 256² at 1.46 mm); prostlab step {STEP} mm; batch of 1 pose",
        f"- time: median wall-clock ms (time.perf_counter) of up to {repeats} calls after "
        f"{warmup} warm-up (fewer rounds, at least 1, where they would not fit in {budget:g} s: "
        f"{few}); the three libraries run in one fresh process per case, round-robin (each "
        "round calls each library once, in a rotating order), so load from other jobs falls on "
        "all alike. In brackets: the median CPU time of the process (all threads) per call; "
        "with n threads and no other load, cpu is up to n × wall",
        f"- load average (1 / 5 / 15 min) at the start: {loads[0]}, at the end: {loads[1]}",
        f"- memory: {memory_note}; one call, in a fresh process per case and library",
        "- speed vs peer = median over rounds of peer ms / prostlab ms, wall (cpu) (above 1: "
        "prostlab is faster); memory vs peer = prostlab peak / peer peak (below 1: prostlab "
        "uses less); Msamples/s = prostlab's trilinear samples per image / median wall time, "
        "for every pass",
        "",
        markdown_table(headers, rows),
        "",
        "Image agreement (forward DRRs, same volume, camera, pose and sample count; NCC over the "
        "whole image):",
        "",
        markdown_table(ncc_headers, ncc_rows),
    ]
    if verdicts:
        lines += ["", "Targets against nanodrr's torch backend (forward ≥ 3×, forward+backward "
                  "≥ 2× faster; peak memory ≤ 0.5×):", ""]
        for pixels, pose_name, mode, kind, value, goal, met in verdicts:
            lines.append(f"- {pixels}² {pose_name} {mode} {kind}: {value} (target {goal}) — "
                         f"{'met' if met else 'NOT met'}")
    return "\n".join(lines)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
