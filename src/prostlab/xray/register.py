"""``prostlab register``: one X-ray, one CT, one pose.

The job, in order; every input is read and checked before anything is written:

1. **Settings.** The detector the X-ray is fitted to, the sampling step and the volume's pooling
   come from the flags, else the checkpoint (the camera and step it was trained with), else the
   config (``model.camera``, ``model.step``, ``data.downsample``), else 128 x 128, 1.75 mm, 1.
2. **The X-ray** (:func:`prostlab.xray.load_xray`): DICOM with its own camera, or an image with
   the camera from the flags; turned into line integrals, masked, binned and cropped to the
   detector, the camera updated to match.
3. **The CT**: a ``prostlab prepare`` folder, or a CT (and labels) prepared into ``OUT/prepared``
   (the frame the pose refers to); average-pooled by ``downsample``.
4. **The network**, for methods with a ``net`` stage: the checkpoint's weights in a network whose
   projector has the X-ray's camera.
5. **The start**: ``--init`` (degrees and mm), a named view (:data:`VIEWS`), or the AP view; with
   ``--search`` a coarse multi-start around it (:func:`~prostlab.registration.search.
   coarse_search`) whose best starts all go to the engine. The X-ray's sign is checked against
   the CT's DRR at the start (:func:`check_sign`).
6. **Registration** with the method's schedule (:func:`~prostlab.registration.register`), then
   the result judged (:func:`judge`): NCC, gradient-NCC, the share of the field the CT covers and
   the distance travelled, each against a limit (:data:`TRUST`).
7. **Outputs** into ``OUT``: ``pose.json``, ``trajectory.csv``, ``overlay.png``,
   ``registration.gif``, ``xray.png`` and ``drr.png`` (:func:`write_outputs`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prostlab.data.prepare import PreparedCT, load_prepared, prepare_ct
from prostlab.errors import ProstlabError
from prostlab.geometry import (
    Camera,
    check_pose_in_beam,
    geodesic_angle,
    pose_to_euler,
    pose_to_matrix,
    so3_exp,
)
from prostlab.limits import check_grid_side, check_memory, resolve_device
from prostlab.projector import Projector
from prostlab.registration import Schedule, as_schedule, register
from prostlab.registration.search import SearchSpace, coarse_search
from prostlab.render import render_memory_bytes
from prostlab.similarity.objective import make_objective

EULER_CONVENTION = "xyz"
"""The Euler angles of ``pose.json``: extrinsic rotations about the fixed x, y, z axes, in that
order (scipy's lower-case convention; ``docs/geometry.md``)."""

VIEWS: dict[str, tuple[float, float, float]] = {
    "ap": (0.0, 0.0, 0.0),
    "pa": (0.0, 180.0, 0.0),
    "lateral": (0.0, -90.0, 0.0),
    "right-lateral": (0.0, 90.0, 0.0),
}
"""Named starting views of a LIP volume (``prostlab prepare``'s), as rotation vectors in degrees.
The identity is AP (the beam runs from anterior to posterior); ``pa`` turns the volume 180 deg
about its head-feet axis; ``lateral`` is a left lateral (the beam runs from the patient's right to
the left, the detector on the left), ``right-lateral`` the mirror view. Every view puts the
volume's centre at the isocentre."""

DEFAULT_DETECTOR = (128, 128)
DEFAULT_STEP_MM = 1.75

MIN_FIELD_PIXELS = 256
"""Fewer usable X-ray pixels (16 x 16) on the detector than this are refused: NCC over a few
dozen pixels matches anything."""

SIGN_NCC = -0.2
""":func:`check_sign` refuses an X-ray whose NCC with the CT's DRR at the start, both averaged
down to 8 x 8 cells, is below this. Bone and soft tissue attenuate, so the line integrals of a
correctly read X-ray are high where the DRR's are: on the synthetic chest X-ray of the tests this
NCC is 0.2 to 1.0 from starts up to 45 deg and 100 mm off, and -0.15 to -0.92 with the sign
flipped; a far start can leave it near 0, and then the check stays silent."""

TRUST: dict[str, float] = {
    "ncc": 0.6,
    "gradient_ncc": 0.1,
    "overlap": 0.5,
    "rotation_travelled_deg": 30.0,
    "translation_travelled_mm": 100.0,
}
"""The limits of :func:`judge`: a result is trusted when its final NCC and gradient-NCC reach
``ncc`` and ``gradient_ncc``, the CT's DRR covers at least the ``overlap`` share of the X-ray's
usable field, and the pose moved at most ``rotation_travelled_deg`` and
``translation_travelled_mm`` from the start the engine began with. A right pose correlates well
even on real X-rays with soft tissue, scatter and devices the DRR lacks; a flipped sign, a
mirrored start or another patient's CT can reach a fair NCC (a smooth body outline matches a
smooth body outline) and, on a coarse detector, a fair gradient-NCC too, but the optimiser then
wanders: registering the tests' chest X-ray to a water cylinder with three bone balls ends at NCC
0.76 and gradient-NCC 0.37 after turning 46 deg and moving 115 mm, where the methods' capture
range is about 10-20 deg and 30-60 mm (docs/xray.md, "Checking a registration")."""

UNTRUSTED_STATUS = 3
"""``prostlab register``'s exit status when it wrote a result that :func:`judge` does not trust
(2 is a refusal, 0 a trusted result)."""


@dataclass
class RegisterSettings:
    """What ``prostlab register`` was asked to do (the CLI's flags).

    Attributes:
        xray: the X-ray file.
        ct: a ``prostlab prepare`` folder, or a CT (NIfTI or DICOM series) in HU.
        out: the output folder (new, or empty, or ``overwrite``).
        labels: the CT's label map, when ``ct`` is a raw CT (needed by the network).
        bones: the bone selection when preparing a raw CT (see ``prostlab prepare --bones``;
            None: the config's ``data.bones``, else ``"bones"``).
        init: a start ``(rx, ry, rz, tx, ty, tz)``: rotation vector in degrees, mm.
        init_view: a named view of :data:`VIEWS`.
        search: scan around the start first (:mod:`prostlab.registration.search`).
        search_space: the search's grid and levels.
        method: a registration preset name or schedule YAML (``configs/registration``).
        ckpt_path: the network's checkpoint, for methods with a ``net`` stage.
        config: a prostlab config whose ``model`` and ``data`` sections give defaults.
        detector: ``(rows, columns)`` the X-ray is fitted to.
        step: sampling step along the rays, mm.
        downsample: average-pool the prepared CT by this factor.
        camera: camera values that replace or complete the X-ray's own (``sdd``, ``sid``,
            ``pixel_spacing``, ...).
        i0: the unattenuated intensity; None: estimated.
        relationship: ``"lin"`` or ``"log"`` values, replacing the file's (None: the file's).
        sign: ``+1`` (values grow with the beam intensity) or ``-1``, replacing the file's.
        backend: the projector backend.
        device: the torch device.
        overwrite: write into a non-empty ``out``.
        command: the command line, recorded in ``pose.json``.
    """

    xray: Path
    ct: Path
    out: Path
    labels: Path | None = None
    bones: str | None = None
    init: Sequence[float] | None = None
    init_view: str | None = None
    search: bool = False
    search_space: SearchSpace = field(default_factory=SearchSpace)
    method: str = "mncc"
    ckpt_path: Path | None = None
    config: Path | None = None
    detector: tuple[int, int] | None = None
    step: float | None = None
    downsample: int | None = None
    camera: dict[str, Any] = field(default_factory=dict)
    i0: float | None = None
    relationship: str | None = None
    sign: int | None = None
    backend: str = "auto"
    device: str = "cpu"
    overwrite: bool = False
    command: list[str] = field(default_factory=list)


@dataclass
class Problem:
    """Everything registration needs, read and checked (steps 1-5 of the module doc)."""

    xray: Any  # prostlab.xray.XRay
    prepared: PreparedCT
    ct: Tensor  # (1, 1, D, H, W) on the device
    bone: Tensor | None
    spacing: tuple[float, float, float]
    projector: Projector
    schedule: Schedule
    net: Any
    start: Tensor  # (1, 6) float64
    notes: list[str]
    settings: dict[str, Any] = field(default_factory=dict)  # as resolved, for pose.json


# ------------------------------------------------------------------------------------ settings


def _config_defaults(path: Path | None) -> dict[str, Any]:
    """``model.camera`` (height, width), ``model.step`` and ``data.downsample`` of a config."""
    if path is None:
        return {}
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.load(path)
    except OSError as exc:
        raise ProstlabError(f"{path}: cannot read the config ({exc.strerror})") from exc
    except Exception as exc:  # noqa: BLE001 - any YAML parse error
        raise ProstlabError(f"{path}: not valid YAML ({exc})") from exc
    found = {}
    for key, name in (("model.camera.height", "height"), ("model.camera.width", "width"),
                      ("model.step", "step"), ("data.downsample", "downsample"),
                      ("data.bones", "bones")):
        value = OmegaConf.select(config, key)
        if value is not None:
            found[name] = value
    return found


def _checkpoint(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    from prostlab.lightning.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path)
    if "camera" not in checkpoint.get("hyper_parameters", {}):
        raise ProstlabError(f"{path}: no camera in its hyper_parameters; expected a checkpoint "
                            "written by `prostlab fit`")
    return checkpoint


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


# -------------------------------------------------------------------------------------- inputs


def start_pose(init: Sequence[float] | None, view: str | None,
               camera: Camera | None = None) -> Tensor:
    """The ``(1, 6)`` float64 start: ``init`` (degrees, mm), a named view, or the AP view.

    With ``camera``, an ``init`` that puts the volume outside its beam is refused
    (:func:`~prostlab.geometry.check_pose_in_beam`)."""
    if init is not None and view is not None:
        raise ProstlabError("--init and --init-view: expected one of them, got both")
    if init is not None:
        values = [float(v) for v in init]
        if len(values) != 6 or not all(math.isfinite(v) for v in values):
            raise ProstlabError(f"--init: expected six finite numbers RX RY RZ (deg) TX TY TZ "
                                f"(mm), got {list(init)}")
        rotation = torch.deg2rad(torch.tensor(values[:3], dtype=torch.float64))
        start = torch.cat((rotation, torch.tensor(values[3:], dtype=torch.float64)))[None]
        return start if camera is None else check_pose_in_beam(start, camera, "--init")
    view = view or "ap"
    if view not in VIEWS:
        raise ProstlabError(f"--init-view: expected one of {sorted(VIEWS)}, got {view!r}")
    rotation = torch.deg2rad(torch.tensor(VIEWS[view], dtype=torch.float64))
    return torch.cat((rotation, torch.zeros(3, dtype=torch.float64)))[None]


def _prepared(settings: RegisterSettings, size: int = 128) -> PreparedCT:
    """The prepared CT: ``settings.ct`` itself, or the CT prepared into ``OUT/prepared``."""
    ct = Path(settings.ct)
    if ct.is_dir() and (ct / "meta.json").is_file():
        for flag, value in (("--labels", settings.labels), ("--bones", settings.bones)):
            if value is not None:
                raise ProstlabError(f"{flag}: {ct} is a prepared folder, which carries its own "
                                    f"segmentation; expected {flag} only with a raw CT")
        return load_prepared(ct)
    if settings.bones is not None and settings.labels is None:
        raise ProstlabError("--bones: selects structures of --labels; without --labels the bones "
                            "are thresholded from the CT (as `prostlab prepare` does); expected "
                            "--labels too, or no --bones")
    if not ct.exists():
        raise ProstlabError(f"--ct {ct}: no such file or folder; expected a `prostlab prepare` "
                            "folder, a NIfTI CT or a DICOM series folder")
    if settings.labels is not None and not Path(settings.labels).exists():
        raise ProstlabError(f"--labels {settings.labels}: no such file or folder")
    folder = Path(settings.out) / "prepared"
    try:
        prepare_ct(ct, settings.labels, folder, size=size, bones=settings.bones or "bones",
                   overwrite=settings.overwrite)
    except ProstlabError as error:
        where = "--ct" if str(error).startswith(str(ct)) else f"--ct {ct}:"
        raise ProstlabError(f"{where} {error}") from error
    return load_prepared(folder)


def _network(checkpoint: Mapping[str, Any], path: Path, camera: Camera, step: float,
             backend: str, device: str):
    """The checkpoint's network, rendering on the X-ray's ``camera``."""
    from prostlab.similarity import ConvexSimilarityNet

    saved = checkpoint["hyper_parameters"]
    net = ConvexSimilarityNet(Projector(camera, step=step, backend=backend), **(saved.get("net")
                                                                                or {}))
    weights = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items()
               if k.startswith("net.")}
    try:
        net.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise ProstlabError(f"{path}: its weights do not fit its own model.net ({first})") from exc
    return net.to(device).eval()


def prepare_problem(settings: RegisterSettings) -> Problem:
    """Steps 1-5 of the module doc: read and check every input. Writes only ``OUT/prepared``
    (when ``settings.ct`` is a raw CT), and only after the X-ray, the method and the checkpoint
    have been read."""
    from prostlab.xray import load_xray

    device = resolve_device(settings.device, "--device")  # cuda:7 raised torch's AssertionError
    schedule = as_schedule(settings.method)
    uses_net = any(stage.similarity == "net" for stage in schedule.stages)
    if uses_net and settings.ckpt_path is None:
        raise ProstlabError(f"--method {settings.method}: has a 'net' stage, which needs the "
                            "trained network; expected --ckpt_path")
    checkpoint = _checkpoint(settings.ckpt_path)
    saved = (checkpoint or {}).get("hyper_parameters", {})
    defaults = _config_defaults(settings.config)
    trained = Camera.from_dict(saved["camera"]) if checkpoint else None
    detector = _first(settings.detector,
                      trained and (trained.height, trained.width),
                      ("height" in defaults and (defaults["height"], defaults["width"])) or None,
                      DEFAULT_DETECTOR)
    what = "detector rows x columns (--detector, or the checkpoint's or the config's camera)"
    check_grid_side(tuple(detector), what, "pixels")
    # Before the X-ray is fitted to it: --detector 100000 100000 raised numpy's MemoryError.
    check_memory(render_memory_bytes(1, 1, 1, detector[0] * detector[1])[1], device,
                 f"{what}: {detector[0]} x {detector[1]}: one DRR of it")
    step = float(_first(settings.step, saved.get("step"), defaults.get("step"), DEFAULT_STEP_MM))
    downsample = int(_first(settings.downsample, defaults.get("downsample"), 1))
    if downsample < 1:
        raise ProstlabError(f"--downsample: expected a positive integer, got {downsample}")
    if settings.bones is None and settings.labels is not None and "bones" in defaults:
        settings.bones = defaults["bones"]

    xray = load_xray(settings.xray, detector=tuple(detector), camera=settings.camera or None,
                     i0=settings.i0, relationship=settings.relationship, sign=settings.sign)
    notes = list(xray.steps)
    usable = int(xray.mask.sum())
    if usable < MIN_FIELD_PIXELS:
        raise ProstlabError(
            f"--xray {settings.xray}: {usable} usable pixels on the {detector[0]} x {detector[1]} "
            f"detector; expected at least {MIN_FIELD_PIXELS} (16 x 16): a larger image, or a "
            "smaller --detector")
    if trained is not None:
        ratio = xray.camera.pixel_spacing[1] / xray.camera.magnification / (
            trained.pixel_spacing[1] / trained.magnification)
        if not 0.8 <= ratio <= 1.25:
            notes.append(f"warning: the network was trained at {trained.pixel_spacing[1]:.3g} mm "
                         f"pixels (magnification {trained.magnification:.3g}); this X-ray has "
                         f"{xray.camera.pixel_spacing[1]:.3g} mm ({xray.camera.magnification:.3g}"
                         "): expect a weaker network stage")
    start = start_pose(settings.init, settings.init_view, xray.camera)

    prepared = _prepared(settings)
    if settings.labels is None and not (Path(settings.ct) / "meta.json").is_file():
        notes.append("no --labels: the bones thresholded from the CT (as `prostlab prepare` "
                     "without --labels does)")
    ct_volume = prepared.ct.downsampled(downsample) if downsample > 1 else prepared.ct
    bone_volume = prepared.bone
    if bone_volume is not None and downsample > 1:
        bone_volume = bone_volume.downsampled(downsample)
    if uses_net and bone_volume is None:
        raise ProstlabError(f"--ct {settings.ct}: has no segmented bones, which the network "
                            "renders; expected a prepared folder with bone_mu.nii.gz, or a raw CT")
    projector = Projector(xray.camera, step=step, backend=settings.backend)
    net = None
    if uses_net:
        net = _network(checkpoint, settings.ckpt_path, xray.camera, step, settings.backend,
                       settings.device)
    problem = Problem(
        xray=xray,
        prepared=prepared,
        ct=ct_volume.batched().to(device),
        bone=None if bone_volume is None else bone_volume.batched().to(device),
        spacing=tuple(float(s) for s in ct_volume.spacing),
        projector=projector,
        schedule=schedule,
        net=net,
        start=start,
        notes=notes,
        settings={
            "detector": list(detector), "step_mm": step, "downsample": downsample,
            "method": settings.method, "schedule": schedule.to_config(),
            "ckpt_path": _absolute(settings.ckpt_path), "config": _absolute(settings.config),
            "init_deg_mm": None if settings.init is None else list(settings.init),
            "init_view": settings.init_view, "search": settings.search,
            "search_space": dataclasses.asdict(settings.search_space) if settings.search
            else None,
            "i0": settings.i0, "sign": settings.sign, "relationship": settings.relationship,
            "camera_flags": {k: list(v) if isinstance(v, tuple) else v
                             for k, v in settings.camera.items()},
            "backend": settings.backend, "device": settings.device,
        },
    )
    agreement = check_sign(problem)
    notes.append("sign check: " + ("too few pixels to judge" if agreement is None else
                                   f"NCC {agreement:.2f} with the DRR at the start (8 x 8 cells)"))
    return problem


def _absolute(path: Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


# --------------------------------------------------------------------------------- registering


@dataclass
class Registration:
    """The outcome of :func:`run`.

    Attributes:
        starts: ``(S, 6)`` the poses the engine started from.
        result: the engine's :class:`~prostlab.registration.RegistrationResult` (one target).
        final: ``(6,)`` float64, the registered pose.
        similarities: name -> value of the final whole-CT DRR against the X-ray (NCC,
            gradient-NCC and multiscale NCC, higher is better), and the method's own final
            objective value (lower is better).
        confidence: :func:`judge`'s checks, name -> value, limit and whether it passed.
        warnings: one sentence per failed check, saying what to look at.
    """

    starts: Tensor
    result: Any
    final: Tensor
    similarities: dict[str, float]
    confidence: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def trusted(self) -> bool:
        """Every check of :func:`judge` passed."""
        return all(check["ok"] for check in self.confidence.values())


def _target(problem: Problem) -> tuple[Tensor, Tensor]:
    device = problem.ct.device
    image = torch.as_tensor(problem.xray.image, dtype=torch.float32, device=device)
    mask = torch.as_tensor(problem.xray.mask, device=device).to(torch.float32)
    return image[None, None], mask[None, None]


def _smoothed_ncc(drr: Tensor, target: Tensor, mask: Tensor, cells: int = 8) -> float | None:
    """NCC of ``drr`` and ``target`` averaged down to ``cells`` x ``cells``, over the cells wholly
    inside ``mask``; None when fewer than 9 cells are."""
    from prostlab.similarity import ncc

    pool = torch.nn.functional.adaptive_avg_pool2d
    inside = pool(mask, cells) > 0.999
    if int(inside.sum()) < 9:
        return None
    return float(ncc(pool(drr, cells), pool(target, cells), inside.to(drr.dtype))[0])


def check_sign(problem: Problem) -> float | None:
    """Refuse an X-ray that looks inverted: its line integrals fall where the CT's DRR at the
    start rises (:data:`SIGN_NCC`), as when bone is bright in a displayed image read as
    intensities. Returns the smoothed NCC it judged by (None: too few pixels to judge)."""
    target, mask = _target(problem)
    with torch.no_grad():
        drr = problem.projector(problem.ct, problem.spacing, problem.start[:1].to(target))
    value = _smoothed_ncc(drr, target, mask)
    if value is not None and value < SIGN_NCC:
        sign = problem.xray.sign
        raise ProstlabError(
            f"--xray {problem.xray.source}: read with sign {sign:+d}, its line integrals fall "
            f"where the CT's DRR at the start rises (smoothed NCC {value:.2f}): bone looks "
            f"bright, so the values fall with the beam intensity; expected --sign {-sign} (or, "
            "if the sign is right, a start nearer the truth, --init or --init-view, or this "
            "patient's CT)")
    return value


def judge(problem: Problem, start: Tensor, final: Tensor,
          similarities: Mapping[str, float]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Whether to trust ``final``: each check of :data:`TRUST` with its value, its limit and
    whether it passed, and a warning for each that failed."""
    target, mask = _target(problem)
    with torch.no_grad():
        drr = problem.projector(problem.ct, problem.spacing, final[None].to(target))
    field_pixels = mask > 0
    overlap = float((drr > 0)[field_pixels].sum()) / max(int(field_pixels.sum()), 1)
    rotation = math.degrees(float(geodesic_angle(so3_exp(start[None, :3]), so3_exp(final[None, :3]))[0]))
    translation = float((final[3:] - start[3:]).norm())
    values = {"ncc": similarities["ncc"], "gradient_ncc": similarities["gradient_ncc"],
              "overlap": overlap, "rotation_travelled_deg": rotation,
              "translation_travelled_mm": translation}
    confidence = {}
    for name, value in values.items():
        limit = TRUST[name]
        at_least = name in ("ncc", "gradient_ncc", "overlap")
        confidence[name] = {"value": value, ("min" if at_least else "max"): limit,
                            "ok": value >= limit if at_least else value <= limit}
    why = {
        "ncc": "the intensities do not match",
        "gradient_ncc": "the edges do not match (a CT of another patient, a mirrored view)",
        "overlap": "the CT covers little of the X-ray's field",
        "rotation_travelled_deg": "the optimiser turned the CT far from the start",
        "translation_travelled_mm": "the optimiser moved the CT far from the start",
    }
    warnings = [
        f"{name} {check['value']:.3g} is {'below' if 'min' in check else 'above'} "
        f"{check.get('min', check.get('max')):g}: {why[name]}"
        for name, check in confidence.items() if not check["ok"]]
    if warnings:
        warnings.append(
            "the pose is not trusted (\"converged\" only means the optimiser stopped): check "
            "overlay.png, the X-ray's --sign, the start (--init-view, --search) and that the CT "
            "is this patient's")
    return confidence, warnings


def run(problem: Problem, search_space: SearchSpace | None = None, search: bool = False,
        progress: Callable[[str, int, int], None] | None = None) -> Registration:
    """Search (optionally) and register; ``progress(phase, done, total)`` reports both."""
    target, mask = _target(problem)
    starts = problem.start
    if search:
        space = search_space or SearchSpace()
        total = len(space.grid())
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            if progress is not None:
                progress("search", done[0], total)

        rescore = make_objective(problem.schedule.stages[0].similarity, projector=problem.projector,
                                 ct=problem.ct, bone=problem.bone, spacing=problem.spacing,
                                 target=target, net=problem.net, mask=mask,
                                 moving=problem.schedule.stages[0].moving)
        found = coarse_search(target, starts, problem.projector, problem.ct, problem.spacing,
                              rescore, mask=mask, space=space, progress=advance)
        starts = found.starts
    total = problem.schedule.max_total_iterations
    result = register(
        target, starts.to(target.device, torch.float32)[None], problem.schedule,
        projector=problem.projector, spacing=problem.spacing, ct=problem.ct, bone=problem.bone,
        net=problem.net, mask=mask,
        progress=None if progress is None else (lambda i, _: progress("register", i, total)),
    )
    record = result.records[0]
    if record.status == "failed":
        raise ProstlabError(f"registration failed: {record.message}")
    final = record.final_pose.detach().to(torch.float64).cpu()
    similarities = _similarities(problem, final, target, mask, record.final_value)
    confidence, warnings = judge(problem, starts[record.start].to(torch.float64).cpu(), final,
                                 similarities)
    return Registration(starts.cpu(), result, final, similarities, confidence, warnings)


def _similarities(problem: Problem, pose: Tensor, target: Tensor, mask: Tensor,
                  objective: float) -> dict[str, float]:
    from prostlab.similarity import gradient_ncc, multiscale_ncc, ncc

    with torch.no_grad():
        drr = problem.projector(problem.ct, problem.spacing, pose[None].to(target))
        values = {
            "ncc": float(ncc(drr, target, mask)[0]),
            "gradient_ncc": float(gradient_ncc(drr, target, mask)[0]),
            "multiscale_ncc": float(multiscale_ncc(drr, target, mask)[0]),
        }
    values[f"objective ({problem.schedule.stages[-1].similarity}, lower is better)"] = objective
    return values


# ------------------------------------------------------------------------------------- outputs


def _matrix(pose: Tensor) -> Tensor:
    return pose_to_matrix(pose[None].to(torch.float64))[0]


def pose_report(pose: Tensor, camera: Camera, prepared: PreparedCT) -> dict[str, Any]:
    """``pose.json``'s geometry: the pose and the 4 x 4 maps between the frames.

    ``camera_from_volume = [R | t + sid e_z]`` (``docs/geometry.md``). With the prepared CT's
    voxel-to-world affine ``A`` (RAS, mm), ``world_from_volume = A [[diag(1/s), c], [0, 1]]`` for
    the voxel size ``s`` and the grid's centre ``c = (N - 1) / 2``, and ``camera_from_world =
    camera_from_volume world_from_volume^-1``.
    """
    isocentre_from_volume = _matrix(pose)
    camera_from_volume = isocentre_from_volume.clone()
    camera_from_volume[2, 3] += camera.sid
    angles, translation = pose_to_euler(pose[None].to(torch.float64), EULER_CONVENTION)
    report: dict[str, Any] = {
        "pose": {"rotation_vector_rad": pose[:3].tolist(), "translation_mm": pose[3:].tolist()},
        "euler_deg": {"convention": f"{EULER_CONVENTION} (extrinsic, scipy's lower case)",
                      "angles": torch.rad2deg(angles[0]).tolist()},
        "camera_from_volume": camera_from_volume.tolist(),
        "volume_from_camera": torch.linalg.inv(camera_from_volume).tolist(),
        "isocentre_from_volume": isocentre_from_volume.tolist(),
        "camera": camera.to_dict(),
        "intrinsics": camera.intrinsics.tolist(),
        "volume": {"prepared": str(prepared.directory), "orientation": "LIP",
                   "spacing_mm": [float(s) for s in prepared.ct.spacing],
                   "shape": list(prepared.ct.shape[1:])},
        "frames": "docs/geometry.md: volume = the prepared cube's centred index frame (mm); "
                  "camera = source at the origin, x along columns, y along rows, z along the "
                  "beam; world = the CT's RAS frame (mm)",
    }
    affine = prepared.meta.get("affine")
    if affine is not None:
        shape = torch.tensor(prepared.ct.shape[1:], dtype=torch.float64)
        spacing = torch.tensor([float(s) for s in prepared.ct.spacing], dtype=torch.float64)
        index_from_volume = torch.eye(4, dtype=torch.float64)
        index_from_volume[:3, :3] = torch.diag(1.0 / spacing)
        index_from_volume[:3, 3] = (shape - 1) / 2
        world_from_volume = torch.tensor(affine, dtype=torch.float64) @ index_from_volume
        report["world_from_volume"] = world_from_volume.tolist()
        report["camera_from_world"] = (camera_from_volume
                                       @ torch.linalg.inv(world_from_volume)).tolist()
    return report


def _dark_outside(image: Tensor, inside: Tensor) -> Tensor:
    """``image`` with the pixels outside the field set to its minimum inside: the collimated
    border is dark in the X-ray and the DRR alike, and two images related by ``a x + b``
    (``a > 0``) stay so, so that their overlay is grey where they are aligned."""
    return torch.where(inside, image, image[inside].min())


def write_outputs(out: Path, problem: Problem, registration: Registration,
                  settings: RegisterSettings, max_frames: int = 60) -> list[Path]:
    """Write ``pose.json``, ``trajectory.csv``, ``overlay.png``, ``registration.gif``,
    ``xray.png`` and ``drr.png`` into ``out`` (each under a temporary name, then renamed)."""
    from prostlab.csv_table import write_csv
    from prostlab.outputs import write_text
    from prostlab.reproducibility import reproducibility_facts
    from prostlab.viz.images import save_drr_png
    from prostlab.viz.report import save_overlays, save_registration_gif

    record = registration.result.records[0]
    target, mask = _target(problem)
    initial = registration.starts[record.start].to(torch.float64)
    picked = torch.linspace(0, len(record.poses) - 1, min(max_frames, len(record.poses)))
    frames_at = picked.round().long().unique()
    with torch.no_grad():
        poses = torch.cat((initial[None], registration.final[None],
                           record.poses[frames_at].to(torch.float64))).to(target)
        drrs = problem.projector(problem.ct, problem.spacing, poses)[:, 0].cpu()
    inside = mask[0, 0].cpu() > 0
    image = _dark_outside(target[0, 0].cpu(), inside)
    drrs = torch.stack([_dark_outside(drr, inside) for drr in drrs])

    report = {
        "xray": _absolute(settings.xray),
        "ct": _absolute(settings.ct),
        "command": settings.command,
        "method": settings.method,
        "status": record.status,
        "status_means": "how the optimiser stopped (converged: its value stopped changing; "
                        "max_iterations: the cap); not whether the pose is right",
        "trusted": registration.trusted,
        "trusted_means": "every check of confidence passed; when false, prostlab register "
                         f"exited with status {UNTRUSTED_STATUS}",
        "confidence": registration.confidence,
        "warnings": registration.warnings,
        "iterations": record.n_iterations,
        "start": {"searched": settings.search, "starts": len(registration.starts),
                  "pose": {"rotation_vector_rad": initial[:3].tolist(),
                           "translation_mm": initial[3:].tolist()}},
        "similarity": registration.similarities,
        "preprocessing": problem.notes,
        "settings": problem.settings,
        "reproducibility": reproducibility_facts(problem.projector.backend, problem.ct.device),
        **pose_report(registration.final, problem.projector.camera, problem.prepared),
    }
    written = [write_text(out / "pose.json", json.dumps(report, indent=2) + "\n")]
    rows = [{"iteration": i, "stage": int(record.stages[i]), "value": float(record.values[i]),
             **{name: float(record.poses[i, k]) for k, name in
                enumerate(("rx_rad", "ry_rad", "rz_rad", "tx_mm", "ty_mm", "tz_mm"))}}
            for i in range(record.n_iterations)]
    written.append(write_csv(out / "trajectory.csv", rows))
    written.append(save_overlays([{"title": Path(settings.xray).name, "target": image,
                                   "initial": drrs[0], "final": drrs[1]}], out / "overlay.png"))
    titles = [f"it {int(i)}  value {float(record.values[i]):.4f}" for i in frames_at]
    written.append(save_registration_gif(drrs[2:], image, out / "registration.gif",
                                         titles=titles))
    written.append(save_drr_png(out / "xray.png", image.numpy()))
    written.append(save_drr_png(out / "drr.png", drrs[1].numpy()))
    return written
