"""CPU benchmark of prostlab's projector (``cpu`` and ``torch`` backends) beside nanodrr and
DiffDRR, on CTs of the sizes users have, with the share of the memory bandwidth each one uses.

    python bench/projector.py [--quick] [--threads 1] [--volumes full 256 128]
        [--detectors 128 256 512] [--backends cpu torch] [--passes forward fwd+bwd]
        [--ct PATH [PATH ...]] [--views AP lateral axial oblique30 oblique60 rotated]
        [--full] [--journal PATH] [--out bench/results/projector_cpu.md]

(the rotated pose is only cross-checked, not timed, on detectors above 128², unless ``--full``;
every view is timed on every detector; ``--journal`` keeps each finished case, so that a run
stopped part-way measures only the rest when started again with the same settings and sources).
Each case runs in fresh worker processes that build the kernels and import the projector from
the working tree, so the run digests ``kernels/`` and ``src/prostlab/projector`` when it starts
and ends: if they changed in between, the report says so and the command exits with status 3.

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

What is measured, for each CT, each of its volumes, each detector, each view and each library
(prostlab with each of ``--backends``, and the peers):

* CTs (``--ct``, one or more; default ``../shared/data/chest_ct/ct.nii.gz`` beside the
  repository: 512 x 512 x 133 voxels of 0.703 x 0.703 x 2.5 mm, 133 MiB as float32). Rows are
  labelled by the CT's folder name (``chest_ct``); the shared CTs are stored LAS, LPS or RAS, in
  slices of 0.7 to 5 mm (../shared/data/README.md).
* Volumes (``--volumes``), for each CT. ``full``: the CT as stored: its array axes and spacing, HU
  to mu by ``prostlab.data.intensity`` (``fill_outside_fov``, then ``hu_to_mu``), not resampled.
  ``256`` and ``128``: the same CT prepared like the bundled cube (``prostlab.data.prepare_ct``:
  LIP, centred on the bones, from its labels.nii.gz when one lies beside it, else by a HU
  threshold) at 256^3 or 128^3, built once into ``cache/bench_projector/``; ``128`` is the
  bundled cube itself (data/chest_ct_128, 2.6 mm, 8 MiB) for the CT it was prepared from (the
  sha256 in its meta.json). Without the CT, ``full`` and ``256`` are skipped with a note and
  ``128`` is the bundled cube (or a phantom).
* Views (``--views``; ``--poses`` is the same flag, ``identity`` the same as ``AP``), each a pose
  (omega rad, t mm) applied after the volume's base rotation, the AP view ``ap_view``: the
  prepared cubes are LIP, and a stored CT's pose is turned by ``ap_view`` first, so that in every
  volume the camera's x, y and z run along the patient's left (right for a stored CT whose axes
  are a mirror of LIP, as LAS), inferior and posterior axes, and the rays cross its voxels as in
  an AP radiograph. From there, the y axis is the patient's long axis: ``lateral`` turns 90
  degrees about it (rays along the left-right axis), ``oblique30`` and ``oblique60`` 30 and 60
  degrees, and ``axial`` turns 90 degrees about x so that the rays run along the long axis from
  head to foot (across the slices of a stored CT). ``rotated`` is not a view: 36 degrees mostly
  about the long axis, a tilt and a shift, only cross-checked above 128² unless ``--full``.
* Detectors (``--detectors``): 128^2 at 2.92 mm, 256^2 at 1.46 mm and 512^2 at 0.73 mm, one
  373.8 mm field: ProST's pelvis camera, sdd 1020 mm, sid 620 mm.
* Passes (``--passes``, default ``forward fwd+bwd``):
  * ``forward``: one DRR under ``torch.no_grad()``.
  * ``fwd+bwd``: ``sim = (drr * target).sum(); sim.backward()`` with the pose (B, 6) requiring grad.
  * ``fwd+bwd+2nd``: one step of training a similarity network through the projector:
    ``g = autograd.grad(sim, pose, create_graph=True)[0]; (g ** 2).sum().backward()``, with the pose
    and the volume requiring grad (the double backward ProST needs). The peers differentiate
    ``grid_sample`` twice through autograd, about 1 KB per sample: 11 GB at 256^2 on the 128^3
    cube, 50 GB at 512^2 on the full CT; ask for it on small cases only.
* Memory bandwidth: a STREAM-like probe (``stream``) in a fresh process on the same thread count,
  at the start and at the end of the run: triad ``a = b + 3 c`` and copy ``a = b`` over float32
  arrays of 256 MiB each (8 times a 32 MiB last-level cache), median of 10. The higher triad
  figure is the limit the table compares with.

Time is the median of up to ``--repeats`` calls after ``--warmup`` untimed ones
(time.perf_counter), fewer where they would not fit in ``--budget`` seconds. All libraries
of a case run in one fresh process, round-robin (each round calls each once, in a rotating
order), so that other jobs on a shared machine slow them alike; speed ratios are medians of the
per-round ratios. Memory is the peak resident set size during a call, in a fresh process per
library and case, above the size just before it (VmHWM reset through /proc/self/clear_refs; see
``_common.PeakRSS``): temporaries, autograd's saved tensors and the returned gradients, not the
inputs; over the first calls (one-time copies such as the ``cpu`` backend's bricked volume) and
for the call after them (every later call). The first calls are one call, or for the ``cpu``
backend the ``2 x layout_trials`` calls in which it times its linear and bricked layouts
(``bricks.LayoutChoice``); its timed calls also start after those (``settling_calls``).
``--threads 1`` runs torch single-threaded in the measuring processes: on a machine whose cores
are busy with other jobs, every parallel op otherwise waits for a descheduled thread, which hurts
prostlab's torch backend (many small ops) far more than the peers.

Samples: prostlab marches ``tau_k = k * step`` from the source, visiting only the samples inside
the volume's support (``RayBundle.sample_range``); its count is the sum of those per-ray counts.
nanodrr and DiffDRR put a fixed number ``n`` of samples on every ray; we give them the mean of
prostlab's per-ray counts, rounded, so that all three take (almost) the same number of trilinear
samples per image. "samples/s" is that count divided by the median time, for every pass (a
backward pass revisits the same samples), and for every library (the same work).

Bytes: "gather GB/s" is samples/s times the volume data a pass must touch per sample, as if no
byte were ever reused: a trilinear sample reads its 8 float32 corners, 32 B, once per sweep of
the volume. A forward pass sweeps once (32 B); forward+backward twice (64 B: the backward re-reads
the 8 corners for the sample's spatial gradient; the volume needs no gradient); the double
backward three times and scatters into the volume's gradient (160 B: 32 forward, 32 for the pose
gradient, 32 more and 64 for the 8 corners' read-modify-write in ``jvp_vjp``, see
``prostlab.projector.autograd``). "of bandwidth" divides it by the measured triad bandwidth.
Cache reuse is not counted, nor is cache-line granularity: neighbouring samples and rays share
corners (which caches serve without DRAM traffic, and which can lift the figure above 100% when
the volume fits in cache), while a corner fetched from DRAM brings its whole 64 B line (so a
scattered gather can saturate the bus well below 100%). The figure says how fast a library
consumes volume data against what the memory system streams, the same yardstick for every
library on the same case.

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
  The stored CT (``full``) gives the peers that centred index frame itself as the world,
  ``A = V^-1``, so ``W_v`` is the identity (its own LAS axes would make the index frame a
  mirror of the world, and the peers' camera-to-world maps improper).
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
  pose matrix is ``W_v M F reorient^T`` (``reorient`` of ``orientation="AP"``). ``M`` includes
  the volume's base rotation ``B`` (``E = [R B | t + sid e_z]``). For our AP view (the zero
  pose) on a LIP cube these are exactly the peers' own AP set-ups: nanodrr's
  ``make_rt_inv(rotation=0, translation=(0, sid, 0), orientation="AP",
  isocenter=subject.isocenter)`` (asserted below) and DiffDRR's ``rotation=0,
  translation=(0, sid, 0)`` (source ``sid`` mm anterior of the centre).
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
import hashlib
import json
import math
import os
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

SDD, SID = 1020.0, 620.0
STEP_VARIABLE = "PROSTLAB_BENCH_STEP"  # --step, passed on to the worker processes
STEP = float(os.environ.get(STEP_VARIABLE, 1.75))  # mm between samples along a ray
DETECTORS = {128: 2.92, 256: 1.46, 512: 0.73}  # pixels -> pixel spacing (mm): one 373.8 mm field
VOLUMES = ("full", "256", "128")
# Poses (omega rad, t mm) after the AP view (module docstring, "Views"): camera x, y, z along the
# patient's left, inferior (the long axis) and posterior.
VIEWS = {
    "AP": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "lateral": (0.0, math.pi / 2, 0.0, 0.0, 0.0, 0.0),  # rays along the left-right axis
    "axial": (math.pi / 2, 0.0, 0.0, 0.0, 0.0, 0.0),  # rays along the long axis, head to foot
    "oblique30": (0.0, math.pi / 6, 0.0, 0.0, 0.0, 0.0),
    "oblique60": (0.0, math.pi / 3, 0.0, 0.0, 0.0, 0.0),
}
POSES = {
    **VIEWS,
    # 36 degrees mostly about the vertical (image-row) axis, plus a tilt and a shift
    "rotated": (0.2, 0.6, 0.1, 10.0, -5.0, 20.0),
}
POSE_ALIASES = {"identity": "AP"}  # the name of the AP view before there were others
# Bytes of volume data a pass reads or writes per trilinear sample (module docstring, "Bytes").
BYTES_PER_SAMPLE = {"forward": 32, "fwd+bwd": 64, "fwd+bwd+2nd": 160}
PASSES = tuple(BYTES_PER_SAMPLE)
LIBS = ("prostlab", "nanodrr", "diffdrr")
PROSTLAB_BACKENDS = ("cpu", "torch")
PEER_PACKAGES = {"nanodrr": "nanodrr", "diffdrr": "diffdrr"}
DEFAULT_CT = REPO.parent / "shared" / "data" / "chest_ct" / "ct.nii.gz"
CACHE = REPO / "cache" / "bench_projector"
NCC_TARGET = 0.99999
NCC_WRONG = 0.999  # below this, a peer's image is not the same view: the run stops before timing
# Issue 12's targets against nanodrr's torch backend (issue 20's too, for the cpu backend, on
# every view and CT): speed (peer ms / ours) and peak memory.
SPEED_TARGETS = {"cpu": {"forward": 3.0, "fwd+bwd": 3.0}, "torch": {"forward": 1.0, "fwd+bwd": 1.0}}
MEMORY_TARGETS = {"cpu": 0.5}
STREAM_BYTES = 256 * 2 ** 20  # per array of the bandwidth probe, at least 8 x the last-level cache
WORKER_TIMEOUT_S = 900


# ------------------------------------------------------------------------------------- data
def ct_label(ct_path: Path) -> str:
    """How rows name a CT: its folder's name (``chest_ct`` for ``.../chest_ct/ct.nii.gz``), or
    the DICOM folder's own."""
    ct_path = Path(ct_path)
    return ct_path.name if ct_path.is_dir() else ct_path.resolve().parent.name


def load_volumes(names, ct_paths) -> tuple[dict, dict]:
    """The benchmark's volumes keyed ``(CT label, volume name)``, and a note for each one that
    cannot be made here.

    Each volume is a dict: ``volume`` (1, 1, D, H, W) mu, ``spacing`` (mm, array axes),
    ``affine`` (index to world, as the peers get it), ``base`` (3, 3) the camera-from-volume
    rotation of the AP view (see ``ap_view``) and ``description``.
    """
    volumes, skipped = {}, {}
    for ct_path in ct_paths:
        label = ct_label(ct_path)
        for name in names:
            if name == "128":
                volumes[label, name] = bundled_cube(ct_path)
            elif not ct_path.is_file():
                skipped[label, name] = f"{ct_path} not found (--ct)"
            elif name == "full":
                volumes[label, name] = full_ct(ct_path)
            else:
                volumes[label, name] = prepared_cube(ct_path, int(name))
    return volumes, skipped


def _entry(volume, spacing, affine, description, base=None) -> dict:
    import numpy as np

    return {"volume": volume, "spacing": tuple(float(s) for s in spacing),
            "affine": np.asarray(affine, dtype=np.float64),
            "base": np.eye(3) if base is None else base, "description": description}


def bundled_cube(ct_path: Path) -> dict:
    """The bundled 128^3 chest CT (LIP) if it was prepared from ``ct_path`` (the sha256 in its
    meta.json) or ``ct_path`` is missing; else ``ct_path`` prepared to 128^3; else a phantom."""
    import hashlib

    import numpy as np
    import torch

    import prostlab.data as pdata

    example = REPO / "data" / "chest_ct_128"
    if (example / "meta.json").is_file():
        source = json.loads((example / "meta.json").read_text())["sources"]["ct"]["sha256"]
        bundled = not ct_path.is_file() or (
            hashlib.sha256(ct_path.read_bytes()).hexdigest() == source)
    else:
        bundled = False
    if bundled:
        ct = pdata.load_prepared(pdata.example_path()).ct
        return _entry(ct.data[None].float(), ct.spacing, ct.affine,
                      "bundled example data/chest_ct_128 (ct_mu, 128^3, 2.598 mm, LIP)")
    if ct_path.is_file():
        return prepared_cube(ct_path, 128)
    # A synthetic phantom: a water ellipsoid with a denser rod and slab, LIP affine, 2.6 mm.
    n, s = 128, 2.6
    axis = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * s
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    mu = 0.02 * ((x / 140) ** 2 + (y / 160) ** 2 + (z / 100) ** 2 <= 1).float()
    mu += 0.03 * (((x - 10) ** 2 + (z - 40) ** 2) <= 15 ** 2).float()
    mu += 0.02 * ((y.abs() < 8) & (x.abs() < 90) & (z.abs() < 60)).float()
    affine = np.diag([-s, -s, -s, 1.0])[:, [0, 2, 1, 3]]  # LIP: axis 0 -> -x, 1 -> -z, 2 -> -y
    affine[:3, 3] = -affine[:3, :3] @ np.full(3, (n - 1) / 2)
    return _entry(mu[None, None], (s, s, s), affine, "synthetic 128^3 phantom (no CT data found)")


def prepared_cube(ct_path: Path, size: int) -> dict:
    """``ct_path`` prepared like the bundled cube (``prostlab prepare``: LIP, centred on the bones
    when labels.nii.gz lies beside it) at ``size^3``, cached under cache/bench_projector/."""
    import hashlib

    import prostlab.data as pdata

    digest = hashlib.sha256(ct_path.read_bytes()).hexdigest()[:12]
    folder = CACHE / f"{ct_path.name.split('.')[0]}_{digest}_{size}"
    labels = ct_path.parent / "labels.nii.gz"
    if not (folder / "meta.json").is_file():
        print(f"preparing {ct_path} at {size}^3 into {folder} (once)", flush=True)
        pdata.prepare_ct(ct_path, labels if labels.is_file() else None, folder, size=size,
                         bones="bones", overwrite=True)
    ct = pdata.load_prepared(folder).ct
    side = size * ct.spacing[0]
    return _entry(ct.data[None].float(), ct.spacing, ct.affine,
                  f"{_shown(ct_path)} prepared to {size}^3 ({ct.spacing[0]:.3f} mm, a "
                  f"{side:.1f} mm LIP cube; prostlab.data.prepare_ct, cached in "
                  f"{_shown(folder)})")


def full_ct(ct_path: Path) -> dict:
    """``ct_path`` as stored: its array axes and spacing, HU to mu by prostlab's own rules
    (``fill_outside_fov`` then ``hu_to_mu``, as ``prepare_ct`` does), not resampled.

    Its volume frame is the centred index frame (mm along the array axes), and so is the world
    the peers get: ``affine = V^-1`` (module docstring), so ``W_v`` is the identity. The
    zero pose is turned by ``base`` into an AP view of the stored axes (``ap_view``).
    """
    import numpy as np
    import torch

    from prostlab.data.intensity import fill_outside_fov, hu_to_mu
    from prostlab.data.io import load_image
    from prostlab.data.orientation import orientation_of
    from prostlab.data.volume import spacing_of

    hu, stored = load_image(ct_path)
    mu = hu_to_mu(fill_outside_fov(hu))
    spacing = np.asarray(spacing_of(stored))
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = -spacing * (np.asarray(mu.shape) - 1) / 2
    code = orientation_of(stored)
    shape = "x".join(str(n) for n in mu.shape)
    return _entry(torch.from_numpy(np.ascontiguousarray(mu))[None, None], spacing, affine,
                  f"{_shown(ct_path)} as stored ({shape}, "
                  + " x ".join(f"{s:.3f}" for s in spacing) + f" mm, {code}; HU to mu by "
                  "prostlab.data.intensity)", ap_view(code))


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    return (path.relative_to(REPO).as_posix() if path.is_relative_to(REPO)
            else ("../" + path.relative_to(REPO.parent).as_posix()
                  if path.is_relative_to(REPO.parent) else str(path)))


def ap_view(code: str):
    """Camera-from-volume rotation (3, 3) that views a volume of axis ``code`` (e.g. "LAS") AP.

    A prepared LIP cube's identity pose looks along its axis 2 (posterior) with image rows
    along axis 1 (inferior) and columns along axis 0 (left): this returns the identity for
    "LIP". For other axes it picks the volume axes (and signs) along P, I and L as the camera's
    z, y and x. When the stored axes are a mirror of LIP (a determinant of -1, as LAS), no
    rotation does this; x is then turned to R, which mirrors the image left-right: the rays
    cross the voxels as in a true AP view, which is what the timing depends on.
    """
    import numpy as np

    opposite = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
    rows = []
    for letter in "LIP":  # camera x, y, z
        row = np.zeros(3)
        for axis, c in enumerate(code):
            if c == letter:
                row[axis] = 1.0
            elif c == opposite[letter]:
                row[axis] = -1.0
        rows.append(row)
    base = np.stack(rows)
    if np.linalg.det(base) < 0:
        base[0] *= -1
    return base


# --------------------------------------------------------------------------------- geometry
def camera(pixels: int):
    from prostlab.geometry import Camera

    px = DETECTORS[pixels]
    return Camera(sdd=SDD, sid=SID, height=pixels, width=pixels, pixel_spacing=(px, px))


def extrinsics(cam, pose, base):
    """``E = [R(pose) B | t + sid e_z]`` (B, 3, 4): the pose applied after the volume's base
    rotation ``B`` (its AP view), differentiable in ``pose``."""
    import torch

    E = cam.extrinsics(pose)
    B = torch.as_tensor(base, dtype=pose.dtype)
    return torch.cat((E[:, :, :3] @ B, E[:, :, 3:]), dim=2)


def camera_to_volume(cam, pose, base):
    """``M = E^-1`` (B, 4, 4): our camera frame to our volume frame, differentiable in ``pose``."""
    import torch

    E = extrinsics(cam, pose, base)
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


def sample_counts(cam, vol: dict, pose):
    """Per-ray sample counts of prostlab's projector at ``pose`` (1, 6): total, mean, max, rays
    that hit."""
    import torch

    from prostlab.projector.rays import RayBundle

    volume = vol["volume"]
    M = camera_to_volume(cam, pose.double(), vol["base"])[:, :3].to(volume.dtype)
    rays = RayBundle.from_camera(cam, vol["spacing"], volume.shape[2:], STEP, volume.dtype, "cpu")
    _, count = rays.sample_range(M)
    return int(count.sum()), float(count.float().mean()), int(count.max()), int(
        torch.count_nonzero(count))


# -------------------------------------------------------------------------------- renderers
def make_renderer(lib: str, vol: dict, pixels: int, n_peer: int,
                  max_samples: int | None = None):
    """``render(volume, pose) -> (B, 1, H, W)`` for ``lib`` ("prostlab-cpu", "prostlab-torch",
    "nanodrr" or "diffdrr") on the volume ``vol`` (see ``load_volumes``).

    ``volume`` is our (1, 1, D, H, W) mu array and ``pose`` our (B, 6) pose, applied after the
    volume's base rotation; each peer gets them through the mapping in the module docstring,
    with torch ops, so gradients flow to both.
    """
    import torch

    from prostlab.data.orientation import orientation_of

    volume, spacing, affine, base = vol["volume"], vol["spacing"], vol["affine"], vol["base"]
    cam = camera(pixels)
    dv, du = cam.pixel_spacing
    # The peers' own AP set-ups are ours only where the world is the patient's (a LIP cube).
    anatomical = orientation_of(affine) == "LIP"
    if lib.startswith("prostlab-"):
        from prostlab.projector import Projector

        extra = {} if max_samples is None else {"max_samples": max_samples}
        projector = Projector(cam, step=STEP, backend=lib.removeprefix("prostlab-"), **extra)

        def render(v, pose):
            return projector.render(v, spacing, extrinsics(cam, pose, base))

        return render

    import torchio as tio

    image = tio.ScalarImage(tensor=volume[0].detach().clone(), affine=affine)
    zero = torch.zeros(1, 6, dtype=torch.float64)
    if lib == "nanodrr":
        from nanodrr.camera import make_rt_inv
        from nanodrr.data import Subject
        from nanodrr.drr import DRR

        subject = Subject.from_images(image, convert_to_mu=False)
        drr = DRR.from_carm_intrinsics(SDD, du, dv, 0.0, 0.0, pixels, pixels)
        W_v = world_from_volume(subject.voxel_to_world.double().numpy(), volume.shape[2:],
                                spacing)
        if anatomical:  # our zero pose is nanodrr's AP set-up (source sid mm anterior)
            ours = W_v @ camera_to_volume(cam, zero, base)
            theirs = make_rt_inv(torch.zeros(1, 3, dtype=torch.float64),
                                 torch.tensor([[0.0, SID, 0.0]], dtype=torch.float64), "AP",
                                 subject.isocenter.double())
            assert torch.allclose(ours, theirs, atol=1e-3), (ours, theirs)
        W_v = W_v.float()

        def render(v, pose):
            if v.requires_grad:  # _to_bcdhw's layout: (1, 1, W, H, D) of ours
                subject._image_hu = v.permute(0, 1, 4, 3, 2)
            rt_inv = W_v @ camera_to_volume(cam, pose, base)
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
        if anatomical:
            theirs = torch.eye(4, dtype=torch.float64)
            theirs[1, 3] = SID  # DiffDRR's AP: rotation 0, translation (0, sid, 0)
            assert torch.allclose(W_v @ camera_to_volume(cam, zero, base) @ F @ reorient_T,
                                  theirs, atol=1e-3)
        right = (F @ reorient_T).float()
        W_v = W_v.float()

        def render(v, pose):
            if v.requires_grad:
                drr.density = v[0, 0]  # DiffDRR's density is (X, Y, Z): our array as it is
            matrix = W_v @ camera_to_volume(cam, pose, base) @ right
            return drr(RigidTransform(matrix), n_points=n_peer)

        return render
    raise ValueError(lib)


def peer_status(lib: str) -> str | None:
    """None if ``lib`` can run here, else why not."""
    if lib.startswith("prostlab-"):
        if lib == "prostlab-cpu":
            from prostlab.projector.backends.cpu_kernels import (
                cpu_build_error,
                cpu_kernels_available,
            )

            if not cpu_kernels_available():
                error = cpu_build_error()
                return f"not built ({str(error).splitlines()[0] if error else 'no C++ compiler'})"
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
def make_call(lib: str, mode: str, vol: dict, pixels: int, pose_name: str, n_peer: int,
              max_samples: int | None):
    """A no-argument function running one ``mode`` pass of ``lib``; all set-up done here."""
    import torch

    volume = vol["volume"]
    render = make_renderer(lib, vol, pixels, n_peer, max_samples)
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


def settling_calls(lib: str) -> int:
    """Calls of ``lib`` before its speed settles: ``prostlab-cpu`` times its linear and bricked
    layouts on the first ``2 x layout_trials`` launches of each configuration
    (``bricks.LayoutChoice``), and keeps the faster after them."""
    if lib != "prostlab-cpu":
        return 0
    from prostlab.projector.backends.cpu_kernels import CpuKernelBackend

    return 2 * CpuKernelBackend.layout_trials


def _error(error: Exception) -> dict:
    return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}


def run_case(spec: dict) -> dict:
    """One worker's job, in a fresh process; ``spec`` comes from the parent.

    ``kind == "bandwidth"``: the memory bandwidth probe (``stream``).
    ``kind == "memory"``: the first calls of one library (``settling_calls``, at least one),
    then one more, and the peak RSS growth (see ``PeakRSS``) over the first ones, which pay for
    one-time copies and caches (prostlab's bricked volume), and of the last, which is what every
    later call of a registration costs.
    ``kind == "time"``: all of ``spec["libs"]`` on the same case, timed round-robin: each library
    is warmed up, then every round calls each once, in an order that rotates from round to round,
    so that load from other jobs on the machine falls on all of them alike.
    """
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["kind"] == "bandwidth":
        return stream(spec["bytes"], spec["repeats"])
    vol = torch.load(spec["data"], weights_only=False)
    args = (spec["mode"], vol, spec["pixels"], spec["pose"], spec["n_peer"],
            spec.get("max_samples"))
    if spec["kind"] == "memory":
        call = make_call(spec["lib"], *args)
        peaks = []
        for _ in range(max(1, settling_calls(spec["lib"])) + 1):  # the first calls, a later one
            gc.collect()
            memory = PeakRSS()
            memory.start()
            try:
                call()
            except Exception as error:  # noqa: BLE001 - a peer that cannot do a pass is a result
                return _error(error)
            peaks.append(memory.peak())
        return {"first_peak_bytes": max(peaks[:-1]), "peak_bytes": peaks[-1],
                "peak_exact": memory.exact}

    calls, out, first = {}, {}, {}
    for lib in spec["libs"]:
        try:
            calls[lib] = make_call(lib, *args)
            start = time.perf_counter()  # the first warm-up call sizes the rounds
            calls[lib]()
            first[lib] = time.perf_counter() - start
            for _ in range(spec["warmup"] - 1 + settling_calls(lib)):
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


def cross_check(vol: dict, pixels, pose_name, n_peer, available):
    """NCC and relative mean difference of every other library's forward DRR against the first
    prostlab backend's (``available[0]``), and the images."""
    import torch

    pose = torch.tensor([POSES[pose_name]], dtype=torch.float32)
    images = {}
    with torch.no_grad():
        for lib in available:
            images[lib] = make_renderer(lib, vol, pixels, n_peer)(vol["volume"], pose)
    reference = images[available[0]]
    out = {}
    for lib, image in images.items():
        if lib != available[0]:
            out[lib] = {"ncc": ncc(reference, image),
                        "mean_rel": float(image.mean() / reference.mean() - 1),
                        "max_abs_rel": float((image - reference).abs().max()
                                             / reference.abs().max())}
    return out, images


# --------------------------------------------------------------------------------- bandwidth
def stream(nbytes: int, repeats: int) -> dict:
    """Memory bandwidth (GB/s, 1e9 B/s) of a STREAM-like triad and copy on torch's threads.

    Three float32 arrays of ``nbytes`` each; triad ``a = b + 3 c`` (``torch.add(b, c, alpha=3,
    out=a)``) moves ``3 nbytes``, copy ``a = b`` moves ``2 nbytes`` (STREAM's count: the
    write-allocate read of ``a`` is not counted). Median of ``repeats`` timed calls after two
    warm-ups.
    """
    import torch

    n = nbytes // 4
    a, b, c = torch.zeros(n), torch.ones(n), torch.full((n,), 2.0)
    out = {}
    for name, moved, fn in (("triad", 3 * nbytes, lambda: torch.add(b, c, alpha=3.0, out=a)),
                            ("copy", 2 * nbytes, lambda: a.copy_(b))):
        ms = median(measure_call(fn, warmup=2, repeats=repeats)["wall_ms"])
        out[f"{name}_gbs"] = moved / ms / 1e6
    out["threads"] = torch.get_num_threads()
    return out


# ------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    global STEP  # --step
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 warm-up + up to 3 repeats in 15 s per case (default: 1 + up to "
                             "5 in 40 s)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (at least 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls, at most")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed calls per case: fewer repeats (at least 1) when "
                             "the first warm-up call says they would not fit")
    parser.add_argument("--volumes", nargs="+", default=list(VOLUMES), choices=list(VOLUMES),
                        help="of each CT: full: as stored; 256, 128: prepared to 256^3, 128^3 "
                             "(128: the bundled cube for the CT it was made from)")
    parser.add_argument("--ct", type=Path, nargs="+", default=[DEFAULT_CT],
                        help="the CTs (HU NIfTI files), labelled by their folder's name "
                             "(default: ../shared/data/chest_ct/ct.nii.gz beside the repo)")
    parser.add_argument("--detectors", type=int, nargs="+", default=list(DETECTORS),
                        choices=list(DETECTORS))
    parser.add_argument("--views", "--poses", nargs="+", default=list(VIEWS),
                        choices=list(POSES) + list(POSE_ALIASES),
                        help="poses after the AP view (default: the views "
                             + ", ".join(VIEWS) + "); rotated: 36 degrees, a tilt and a shift; "
                             "identity: AP")
    parser.add_argument("--full", action="store_true",
                        help="also time the rotated pose on detectors above 128² (by default "
                             "it is only cross-checked there)")
    parser.add_argument("--passes", nargs="+", default=["forward", "fwd+bwd"],
                        choices=list(PASSES),
                        help="default: forward fwd+bwd; the peers' fwd+bwd+2nd needs about "
                             "1 KB per sample (11 GB at 256² on the 128³ cube)")
    parser.add_argument("--libs", nargs="+", default=list(LIBS), choices=list(LIBS))
    parser.add_argument("--backends", nargs="+", default=list(PROSTLAB_BACKENDS),
                        choices=list(PROSTLAB_BACKENDS),
                        help="prostlab's projector backends, each timed beside the peers")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads in the measuring processes (default: "
                             "torch's own choice); 1 keeps a machine shared with other jobs "
                             "from stalling every parallel op on a busy core")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="prostlab Projector max_samples (samples per chunk; default: its own)")
    parser.add_argument("--step", type=float, default=None,
                        help=f"mm between samples along a ray (default {STEP:g}); the peers "
                             "take as many samples per ray as prostlab")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--images", type=Path, default=None,
                        help="save a PNG of the DRRs of each cross-check case here")
    parser.add_argument("--journal", type=Path, default=None,
                        help="JSON lines of the finished cases: a run stopped part-way and "
                             "started again with the same settings measures only the rest")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.views = list(dict.fromkeys(POSE_ALIASES.get(v, v) for v in args.views))
    labels = [ct_label(path) for path in args.ct]
    if len(set(labels)) < len(labels):
        parser.error(f"--ct: two CTs in folders of the same name ({', '.join(labels)})")
    if args.step is not None:
        STEP = args.step
        os.environ[STEP_VARIABLE] = repr(args.step)

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
    dirty = subprocess.run(["git", "diff", "--name-only", "HEAD", "--", "src/prostlab/projector",
                            "kernels"],
                           capture_output=True, text=True, cwd=REPO).stdout.split()
    sources = sources_digest()
    load_start = load_average()
    print(f"machine: {facts['cpu']}, {facts['cores']} cores, {facts['cache']}, torch "
          f"{facts['torch']} ({args.threads or facts['torch_threads']} threads), commit "
          f"{facts['commit']}")
    worker = [str(Path(__file__).resolve()), "--worker"]
    probe = {"kind": "bandwidth", "bytes": STREAM_BYTES, "repeats": 10, "threads": args.threads}
    bandwidth = [run_worker(worker + [json.dumps(probe)], timeout=WORKER_TIMEOUT_S)]
    print(f"memory bandwidth: {bandwidth[0]}")

    libs = [f"prostlab-{b}" for b in args.backends] if "prostlab" in args.libs else []
    libs += [lib for lib in PEER_PACKAGES if lib in args.libs]
    status = {lib: peer_status(lib) for lib in libs}
    available = [lib for lib in libs if status[lib] is None]
    for lib in libs:
        version = package_version(PEER_PACKAGES.get(lib, "prostlab"))
        print(f"{lib}: {status[lib] or 'version ' + str(version)}")
    if not available or not available[0].startswith("prostlab-"):
        print("no prostlab backend can run here: nothing to compare")
        return 1

    volumes, skipped = load_volumes(args.volumes, args.ct)
    for (ct, name), why in skipped.items():
        print(f"{ct} {name}: skipped, {why}")
    tmp = Path(tempfile.mkdtemp(prefix="prostlab-bench-"))
    data_files = {}
    for (ct, name), vol in volumes.items():
        data_files[ct, name] = tmp / f"volume_{ct}_{name}.pt"
        torch.save(vol, data_files[ct, name])
        print(f"{ct} {name}: {vol['description']}, shape {tuple(vol['volume'].shape)}, "
              f"{vol['volume'].numel() * 4 / 2 ** 20:.0f} MiB as float32")

    # Sample counts and the image cross-check, in this process. A peer whose image is not the
    # same view (NCC below NCC_WRONG: a wrong mapping of the pose) stops the run before timing.
    counts, checks, wrong = {}, {}, []
    for (ct, name), vol in volumes.items():
        for pixels in args.detectors:
            for pose_name in args.views:
                cam = camera(pixels)
                pose = torch.tensor([POSES[pose_name]])
                total, mean, most, hit = sample_counts(cam, vol, pose)
                n_peer = max(2, round(mean))
                case = (ct, name, pixels, pose_name)
                counts[case] = {"total": total, "mean": mean, "max": most, "hit": hit,
                                "n_peer": n_peer, "rays": pixels * pixels}
                checks[case], images = cross_check(vol, pixels, pose_name, n_peer, available)
                line = ", ".join(f"{lib} NCC {c['ncc']:.6f} (mean {100 * c['mean_rel']:+.2f}%)"
                                 for lib, c in checks[case].items())
                print(f"{ct} {name} {pixels}px {pose_name}: {total} samples ({mean:.1f}/ray, "
                      f"max {most}); peers {n_peer}/ray. Against {available[0]}: {line}",
                      flush=True)
                wrong += [f"{ct} {name} {pixels}px {pose_name} {lib}: NCC {c['ncc']:.6f}"
                          for lib, c in checks[case].items() if not c["ncc"] >= NCC_WRONG]
                if args.images is not None:
                    save_images(images, args.images / f"drr_{ct}_{name}_{pixels}_{pose_name}.png")
    if wrong:
        print(f"IMAGES DISAGREE (NCC below {NCC_WRONG}: the pose or volume is mapped wrongly for "
              "a library); nothing timed:\n  " + "\n  ".join(wrong))
        return 2

    # Memory: one fresh process per (case, library). Time: one process per case, round-robin.
    # With --journal, a case already measured (by an earlier run of the same settings, stopped
    # part-way) is taken from it, and each case measured here is added to it.
    settings = {"commit": facts["commit"], "dirty": dirty, "sources": sources,
                "threads": args.threads,
                "warmup": warmup, "repeats": repeats, "budget": budget, "step": STEP,
                "max_samples": args.max_samples}
    journal = Journal(args.journal, settings, facts["date"]) if args.journal else None
    results = {}
    for ct, name, pixels, pose_name in timed_cases(args, volumes):
        for mode in args.passes:
            keys = [(ct, name, pixels, pose_name, mode, lib) for lib in libs]
            if journal is not None and all(key in journal.done for key in keys):
                results.update((key, journal.done[key]) for key in keys)
                print(f"{ct} {name} {pixels}px {pose_name:9s} {mode:12s} from the journal",
                      flush=True)
                continue
            spec = {"pixels": pixels, "pose": pose_name, "mode": mode,
                    "n_peer": counts[ct, name, pixels, pose_name]["n_peer"], "warmup": warmup,
                    "repeats": repeats, "budget": budget, "data": str(data_files[ct, name]),
                    "max_samples": args.max_samples, "threads": args.threads}
            timing = run_worker(worker + [json.dumps({**spec, "kind": "time", "libs": available})],
                                timeout=WORKER_TIMEOUT_S)
            for lib in libs:
                key = (ct, name, pixels, pose_name, mode, lib)
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
                if journal is not None:
                    journal.add(key, result)
                print(f"{ct} {name} {pixels}px {pose_name:9s} {mode:12s} {lib:15s} "
                      + (f"{result['median_ms']:9.1f} ms (cpu {result['cpu_ms']:9.1f} ms) "
                         f"x{result['repeats']}  peak {result['first_peak_bytes'] / 2**20:7.1f}"
                         f" / {result['peak_bytes'] / 2**20:7.1f} MiB"
                         if "error" not in result else result["error"]), flush=True)
    for path in data_files.values():
        path.unlink()
    tmp.rmdir()
    bandwidth.append(run_worker(worker + [json.dumps(probe)], timeout=WORKER_TIMEOUT_S))
    print(f"memory bandwidth at the end: {bandwidth[1]}")

    command = "python bench/projector.py" + (" --quick" if args.quick else "") + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]) if a != "--quick")
    changed = sources_digest() != sources
    run = {"facts": facts, "dirty": dirty, "command": command, "warmup": warmup,
           "repeats": repeats, "budget": budget, "elapsed": time.perf_counter() - started,
           "loads": (load_start, load_average()), "bandwidth": bandwidth, "journal": journal,
           "changed": changed}
    report = render_report(run, volumes, skipped, counts, checks, results, args, libs, status)
    print()
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
        print(f"\nwritten to {args.out}")
    if changed:
        print(f"{CHANGED_WARNING}", file=sys.stderr)
        return 3
    return 0


MEASURED_SOURCES = ("kernels", "src/prostlab/projector")
"""What each worker builds or imports from the working tree (relative to the repository)."""

CHANGED_WARNING = ("warning: kernels/ or src/prostlab/projector changed while this ran, and each "
                   "worker builds from the working tree: the rows may come from different builds; "
                   "measure again")


def sources_digest() -> str:
    """A SHA-256 of every file under :data:`MEASURED_SOURCES`, names and contents: a run that
    ends with another digest than it started with measured more than one build."""
    digest = hashlib.sha256()
    for folder in MEASURED_SOURCES:
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPO)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


class Journal:
    """The finished cases of a run (``--journal``), one JSON line each after a first line of the
    settings they were measured with: a run stopped part-way (a long run on a shared machine)
    and started again with the same settings measures only the cases it lacks."""

    def __init__(self, path: Path, settings: dict, date: str):
        self.path, self.done = path, {}
        lines = path.read_text().splitlines() if path.is_file() else []
        if lines:
            head = json.loads(lines[0])
            if head["settings"] != settings:
                raise SystemExit(f"--journal {path} was measured with {head['settings']}, not "
                                 f"{settings}: remove it or name another")
            self.started = head["started"]
            for line in lines[1:]:
                with contextlib.suppress(json.JSONDecodeError):  # a line cut off by the stop
                    entry = json.loads(line)
                    self.done[tuple(entry["key"])] = entry["result"]
        else:
            self.started = date
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"settings": settings, "started": date}) + "\n")
        self.resumed = len(self.done)

    def add(self, key: tuple, result: dict) -> None:
        self.done[key] = result
        with self.path.open("a") as f:
            f.write(json.dumps({"key": list(key), "result": result}) + "\n")


def save_images(images, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(images), figsize=(4 * len(images), 4), squeeze=False)
    for ax, (lib, image) in zip(axes[0], images.items(), strict=True):
        ax.imshow(image[0, 0].numpy(), cmap="gray")
        ax.set_title(lib)
        ax.axis("off")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def default_max_samples():
    import inspect

    from prostlab.projector import Projector

    return inspect.signature(Projector).parameters["max_samples"].default


def timed_cases(args, volumes):
    """The (CT, volume, detector, view) cases to time: every view on every detector, the rotated
    pose only at 128² unless --full (or unless it is the only pose asked for); every case is
    cross-checked."""
    return [(ct, name, pixels, pose) for ct, name in volumes for pixels in args.detectors
            for pose in args.views
            if args.full or pose in VIEWS or pixels == 128 or len(args.views) == 1]


def render_report(run, volumes, skipped, counts, checks, results, args, libs, status) -> str:
    """The markdown section for bench/RESULTS.md: the facts of the run, the timing table, the
    image agreement, the ``cpu`` backend's ratios to nanodrr per case and the verdicts against
    issue 12's and 20's targets (every case counted, the missed ones named)."""
    facts, journal = run["facts"], run["journal"]
    ran = [lib for lib in libs if status[lib] is None]  # the others are named under "peers"
    peers = [lib for lib in ran if lib in PEER_PACKAGES]
    ours = [lib for lib in ran if lib.startswith("prostlab-")]
    probes = [b for b in run["bandwidth"] if "triad_gbs" in b]
    limit = max((b["triad_gbs"] for b in probes), default=None)

    def ok(result):
        return result is not None and "error" not in result

    def ms(result):  # "wall (cpu)"
        if result is None:
            return "—"
        if "error" in result:
            return result["error"]
        return f"{result['median_ms']:.0f} ({result['cpu_ms']:.0f})"

    def mib(result):
        if not ok(result):
            return "—"
        return f"{result['first_peak_bytes'] / 2 ** 20:.0f} / {result['peak_bytes'] / 2 ** 20:.0f}"

    headers = ["CT", "volume", "detector", "view", "pass", "library", "ms (cpu)", "Msamples/s",
               "gather GB/s", "of bandwidth", "peak MiB: first calls / later call"]
    for peer in peers:
        headers += [f"speed vs {peer} (cpu)", f"memory vs {peer}: first / later"]
    rows, verdicts = [], []
    cpu_vs_nanodrr = {}  # (case, mode) -> (speed, memory of later calls): the summary table
    for case in timed_cases(args, volumes):
        ct, name, pixels, pose_name = case
        c = counts[case]
        for mode in args.passes:
            for lib in ran:
                mine = results.get((*case, mode, lib))
                rate = gbs = share = None
                if ok(mine):
                    rate = c["total"] / mine["median_ms"] / 1e3
                    gbs = rate * BYTES_PER_SAMPLE[mode] / 1e3
                    share = 100 * gbs / limit if limit else None
                row = [ct, name, f"{pixels}²", pose_name, mode, lib, ms(mine), fmt(rate, 2),
                       fmt(gbs, 2), fmt(share, 1, "%"), mib(mine)]
                for peer in peers:
                    theirs = results.get((*case, mode, peer))
                    speed = speed_cpu = mem = first = None
                    if lib in ours and ok(mine) and ok(theirs):
                        # paired by round: the two calls ran within seconds of each other
                        speed = median([a / b for a, b in zip(
                            theirs["wall_ms"], mine["wall_ms"], strict=True)])
                        speed_cpu = median([a / b for a, b in zip(
                            theirs["cpu_times_ms"], mine["cpu_times_ms"], strict=True)])
                        if theirs["peak_bytes"] > 0 and theirs["first_peak_bytes"] > 0:
                            mem = mine["peak_bytes"] / theirs["peak_bytes"]
                            first = mine["first_peak_bytes"] / theirs["first_peak_bytes"]
                    row += ([f"{fmt(speed, 2, '×')} ({fmt(speed_cpu, 2, '×')})",
                             f"{fmt(first, 2, '×')} / {fmt(mem, 2, '×')}"]
                            if lib in ours else ["", ""])
                    if peer != "nanodrr":
                        continue
                    if lib == "prostlab-cpu" and speed is not None:
                        cpu_vs_nanodrr[case, mode] = (speed, mem)
                    backend = lib.removeprefix("prostlab-")
                    where = f"{ct} {name} {pixels}² {pose_name} {mode} {lib}"
                    goal = SPEED_TARGETS.get(backend, {}).get(mode)
                    if goal is not None and speed is not None:
                        verdicts.append((f"`{backend}` {mode} speed", where,
                                         f"{speed:.2f}× (cpu {speed_cpu:.2f}×)",
                                         f"≥ {goal:g}×", speed >= goal))
                    goal = MEMORY_TARGETS.get(backend)
                    if goal is not None and mem is not None:
                        verdicts.append((f"`{backend}` memory, later calls", where,
                                         f"{mem:.2f}×", f"≤ {goal:g}×", mem <= goal))
                        verdicts.append((f"`{backend}` memory, first calls", where,
                                         f"{first:.2f}×", f"≤ {goal:g}×", first <= goal))
                rows.append(row)

    others = [lib for lib in ran if lib != ours[0]]
    ncc_headers = ["CT", "volume", "detector", "view", "prostlab samples", "per ray: mean / max",
                   "peers' samples per ray"]
    for lib in others:
        ncc_headers += [f"NCC {lib}", f"mean {lib} / {ours[0]} - 1"]
    ncc_rows = []
    for case, c in counts.items():
        ct, name, pixels, pose_name = case
        row = [ct, name, f"{pixels}²", pose_name, f"{c['total']:,}",
               f"{c['mean']:.1f} / {c['max']}",
               f"{c['n_peer']} ({c['n_peer'] * c['rays']:,} in all)"]
        for lib in others:
            chk = checks[case].get(lib)
            row += [f"{chk['ncc']:.6f}", f"{100 * chk['mean_rel']:+.2f}%"] if chk else ["—", "—"]
            if chk and lib in peers:
                verdicts.append((f"image NCC against {lib}", f"{ct} {name} {pixels}² {pose_name}",
                                 f"{chk['ncc']:.6f}", f"≥ {NCC_TARGET}",
                                 chk["ncc"] >= NCC_TARGET))
        ncc_rows.append(row)

    short = sorted({r["repeats"] for r in results.values()
                    if r.get("repeats", run["repeats"]) < run["repeats"]})
    few = ("every case ran all" if not short else "some cases ran "
           + ", ".join(str(n) for n in short))
    threads = args.threads or facts["torch_threads"]
    exact = {r.get("peak_exact") for r in results.values() if "peak_exact" in r}
    memory_note = ("peak RSS during the call above the RSS just before it "
                   "(VmHWM reset via /proc/self/clear_refs)" if exact == {True}
                   else "ru_maxrss after the call minus the RSS before it (VmHWM could not be "
                   "reset: an over-estimate if set-up peaked higher)")
    versions = "; ".join(
        f"{lib} {package_version(PEER_PACKAGES[lib])}" if status[lib] is None
        else f"{lib} {status[lib]}" for lib in libs if lib in PEER_PACKAGES) or "none asked for"
    not_run = [f"{lib} {status[lib]}" for lib in libs
               if lib.startswith("prostlab-") and status[lib] is not None]
    probe_text = "; ".join(
        f"{when}: triad {b['triad_gbs']:.1f} GB/s, copy {b['copy_gbs']:.1f} GB/s"
        if "triad_gbs" in b else f"{when}: {b.get('error')}"
        for when, b in zip(("start", "end"), run["bandwidth"], strict=False))
    volume_lines = [
        f"  - {ct} {name}: {vol['description']}; "
        f"{vol['volume'][0, 0].numel() * 4 / 2 ** 20:.0f} MiB as float32"
        for (ct, name), vol in volumes.items()]
    volume_lines += [f"  - {ct} {name}: skipped, {why}" for (ct, name), why in skipped.items()]
    dirty = run["dirty"]
    lines = [
        "## Projector, CPU: " + ", ".join(f"`{lib}`" for lib in ours) + " beside "
        + (", ".join(peers) or "no peer"),
        "",
        f"- date: {facts['date']}",
        f"- machine: {facts['cpu']}, {facts['cores']} cores, {facts['cache']}; torch "
        f"{facts['torch']} with {threads} thread{'' if threads == 1 else 's'}"
        + (" (--threads)" if args.threads else " (its default)")
        + f"; Python {facts['python']}",
        f"- commit: {facts['commit']}"
        + (" (uncommitted changes to " + ", ".join(dirty) + ")" if dirty else
           " (src/prostlab/projector and kernels/ as committed)")
        + "; max_samples "
        + (f"{args.max_samples}" if args.max_samples else
           f"{default_max_samples()} (the Projector's default)"),
        f"- command: `{run['command']}` ({run['elapsed'] / 60:.1f} min)"
        + (f"; {journal.resumed} of {len(results)} case results were measured by an earlier "
           f"run of the same command and settings that stopped part-way (started "
           f"{journal.started}), taken from its journal" if journal and journal.resumed else ""),
        f"- peers: {versions}" + (f"; not run: {', '.join(not_run)}" if not_run else ""),
        *([f"- **{CHANGED_WARNING}**"] if run.get("changed") else []),
        "- views: " + ", ".join(f"{v} {tuple(round(x, 4) for x in POSES[v])}"
                                for v in args.views)
        + " (omega rad, t mm), each after the volume's AP view (`ap_view`; module docstring, "
        "\"Views\")",
        "- volumes:",
        *volume_lines,
        f"- camera: sdd {SDD:g} mm, sid {SID:g} mm, detector 373.8 mm square ("
        + ", ".join(f"{n}² at {px:g} mm" for n, px in DETECTORS.items() if n in args.detectors)
        + f"); prostlab step {STEP} mm; batch of 1 pose",
        f"- time: median wall-clock ms (time.perf_counter) of up to {run['repeats']} calls after "
        f"{run['warmup']} warm-up (prostlab-cpu: {settling_calls('prostlab-cpu')} more, while it "
        "picks its layout) (fewer rounds, at least 1, where they would not fit in "
        f"{run['budget']:g} s: {few}); all libraries of a case run in one fresh process, "
        "round-robin (each round calls each library once, in a rotating order), so load from "
        "other jobs falls on all alike. In brackets: the median CPU time of the process (all "
        "threads) per call; with n threads and no other load, cpu is up to n × wall",
        f"- load average (1 / 5 / 15 min) at the start: {run['loads'][0]}, at the end: "
        f"{run['loads'][1]}",
        f"- memory: {memory_note}; in a fresh process per case and library, over its first "
        "calls (which pay for one-time copies: prostlab's `cpu` backend makes a bricked copy of "
        "a volume of 2^22 voxels or more, as large as the volume, kept while the volume is "
        "unchanged; its first calls are the "
        f"{settling_calls('prostlab-cpu')} in which it times the linear and bricked layouts and "
        "then keeps the faster, all other libraries' the first one) and for the call after them "
        "(what each later call of a registration costs)",
        f"- memory bandwidth ({probe_text}): STREAM-like, three float32 arrays of "
        f"{STREAM_BYTES / 2 ** 20:.0f} MiB each, on the same thread count, median of 10; "
        f"the limit used below is the higher triad, {fmt(limit, 1)} GB/s",
        "- Msamples/s = prostlab's trilinear samples per image (the same for every library: the "
        "peers take as many) / median wall time, for every pass; gather GB/s = Msamples/s × "
        "the bytes a pass reads or writes per sample ("
        + ", ".join(f"{m} {b} B" for m, b in BYTES_PER_SAMPLE.items() if m in args.passes)
        + ": 8 float32 corners per volume sweep, no cache reuse counted; module docstring); "
        "of bandwidth = gather GB/s / the limit (above 100%: caches serve the reuse)",
        "- speed vs peer = median over rounds of peer ms / prostlab ms, wall (cpu) (above 1: "
        "prostlab is faster); memory vs peer = prostlab peak / peer peak (below 1: prostlab "
        "uses less)",
        "",
        markdown_table(headers, rows),
        "",
        "Image agreement (forward DRRs, same volume, camera, pose and sample count; NCC over the "
        f"whole image, against `{ours[0]}`):",
        "",
        markdown_table(ncc_headers, ncc_rows),
    ]
    if cpu_vs_nanodrr:
        lines += ["", "`cpu` against nanodrr's torch backend, per case: speed (median of the "
                  "per-round ratios, wall) and memory of later calls; in bold where issue 20's "
                  "targets (speed ≥ 3×, memory ≤ 0.5×) are missed:", "",
                  summary_table(cpu_vs_nanodrr, args)]
    if verdicts:
        lines += ["", "Targets of issues 12 and 20 against nanodrr's torch backend (`cpu`: "
                  "forward and forward+backward ≥ 3× faster, peak memory ≤ 0.5×; `torch`: ≥ 1×) "
                  f"and images (NCC ≥ {NCC_TARGET}):", ""]
        table = {}
        for target, where, value, goal, met in verdicts:
            table.setdefault((target, goal), []).append((where, value, met))
        lines.append(markdown_table(["target", "met", "not met"], [
            [f"{target} {goal}", f"{sum(met for *_, met in cases)}/{len(cases)}",
             "; ".join(f"{where} ({value})" for where, value, met in cases if not met)]
            for (target, goal), cases in table.items()]))
    return "\n".join(lines)


def summary_table(ratios: dict, args) -> str:
    """One row per (CT, volume, view): for each detector, the ``cpu`` backend's speed over
    nanodrr forward and forward+backward, and its memory of later calls (forward / fwd+bwd);
    ``ratios[(case, mode)] = (speed, memory)``, a miss of a target in bold."""
    def cell(value, met):
        return "—" if value is None else (f"{value:.2f}×" if met else f"**{value:.2f}×**")

    modes = [m for m in ("forward", "fwd+bwd") if m in args.passes]
    pixels_done = sorted({case[2] for case, _ in ratios})
    headers = ["CT", "volume", "view"]
    for pixels in pixels_done:
        headers += [f"{pixels}² {mode}" for mode in modes]
        headers.append(f"{pixels}² memory, later calls: " + " / ".join(modes))
    rows = []
    for ct, name, view in dict.fromkeys((case[0], case[1], case[3]) for case, _ in ratios):
        row = [ct, name, view]
        for pixels in pixels_done:
            pairs = [ratios.get(((ct, name, pixels, view), mode), (None, None)) for mode in modes]
            row += [cell(speed, speed is None or speed >= SPEED_TARGETS["cpu"][mode])
                    for (speed, _), mode in zip(pairs, modes, strict=True)]
            row.append(" / ".join(cell(mem, mem is None or mem <= MEMORY_TARGETS["cpu"])
                                  for _, mem in pairs))
        rows.append(row)
    return markdown_table(headers, rows)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
