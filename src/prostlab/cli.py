"""The ``prostlab`` command: ``prepare`` a CT, ``render`` DRRs, ``register`` an X-ray, ``fit``
the similarity network, ``test`` registration methods.

Bad input (a ``ProstlabError``, a missing file) is printed on one line, and the command exits
with status 2, without a traceback. Ctrl-C (SIGINT) and SIGTERM stop a command with one line and
status 128 + the signal's number (130, 143); files are written under temporary names and moved
into place, so none is left half-written. ``register`` exits with status 3
(:data:`~prostlab.xray.register.UNTRUSTED_STATUS`) when it wrote a pose it does not trust.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from prostlab.backend_names import BACKENDS
from prostlab.errors import ProstlabError
from prostlab.resources import resolve_checkpoint, resolve_config


def _prepare(args: argparse.Namespace) -> None:
    from prostlab.data import prepare_ct
    from prostlab.data.bone_threshold import BoneThreshold
    from prostlab.data.patients import patient_names

    bones: str | list[int] = args.bones
    if all(part.strip().isdigit() for part in args.bones.split(",")):
        bones = [int(part) for part in args.bones.split(",")]
    if len(args.ct) > 1 and args.labels:
        raise ProstlabError("--labels: one label map for several --ct; expected one --ct, or "
                            "prepare the labelled scan on its own")
    if args.labels and args.bone_hu is not None:
        raise ProstlabError("--bone-hu: the bones come from --labels; expected one of the two")
    threshold = None if args.bone_hu is None else BoneThreshold(bone_hu=args.bone_hu)
    names = patient_names(args.ct)
    for ct, name in zip(args.ct, names, strict=True):
        out = Path(args.out) / name if len(args.ct) > 1 else Path(args.out)
        written = prepare_ct(
            ct,
            args.labels,
            out,
            size=args.size,
            bones=bones,
            structures_csv=args.structures,
            side_mm=args.side_mm,
            margin_mm=args.margin_mm,
            mu_water=args.mu_water,
            overwrite=args.overwrite,
            bone_threshold=threshold,
        )
        if not args.labels:
            print(f"{ct}: no --labels: bones by HU threshold (--bone-hu "
                  f"{(threshold or BoneThreshold()).bone_hu:g}), cube centred on them")
        for key, path in written.items():
            print(f"{key:>10}: {path}")


def _render(args: argparse.Namespace) -> None:
    from prostlab.outputs import output_folder

    # The output folder is checked (new, or empty, or --overwrite; writable) before any work.
    with output_folder(args.out, args.overwrite) as out:
        _render_into(out, args)


def _render_into(out: Path, args: argparse.Namespace) -> None:
    from rich.progress import Progress

    from prostlab.data import example_path
    from prostlab.geometry import Camera
    from prostlab.render import (
        PROST_PELVIS_CAMERA,
        camera_from_config,
        check_not_blank,
        load_volume,
        poses_from_degrees,
        read_pose_csv,
        render_poses,
        warn_cut_by_the_beam,
        write_drrs,
    )

    volume = load_volume(args.volume or example_path(), which=args.which)
    if args.poses:
        poses, what = read_pose_csv(args.poses), f"{args.poses}: pose"
    else:
        poses, what = poses_from_degrees(args.pose or [[0.0] * 6]), "--pose"
    camera = camera_from_config(args.config) if args.config else PROST_PELVIS_CAMERA
    overrides = {
        k: getattr(args, k)
        for k in ("sdd", "sid", "height", "width", "pixel_spacing")
        if getattr(args, k) is not None
    }
    if overrides:
        camera = Camera.from_dict({**camera.to_dict(), **overrides})

    with Progress(transient=True) as progress:
        task = progress.add_task("rendering", total=len(poses))
        images = render_poses(
            volume,
            camera,
            poses,
            args.step,
            args.backend,
            args.device,
            args.batch_size,
            lambda n: progress.advance(task, n),
            what,
        )
    for warning in (warn_cut_by_the_beam(volume, camera, poses, what),
                    check_not_blank(images, what)):
        if warning:
            print(f"prostlab render: WARNING: {warning}", file=sys.stderr)
    np_path = write_drrs(out, images, poses, args.colorbar, args.overwrite)
    print(
        f"wrote {len(images)} DRR(s) of {camera.height}x{camera.width} to {out}/ "
        f"(drr_*.png, {np_path.name}: array {tuple(images.shape)})"
    )


def _register(args: argparse.Namespace) -> int:
    from prostlab.outputs import output_folder, record_outputs, remove_recorded
    from prostlab.registration.search import SearchSpace
    from prostlab.xray.register import (
        UNTRUSTED_STATUS,
        RegisterSettings,
        prepare_problem,
        run,
        write_outputs,
    )

    camera = {k: getattr(args, k) for k in ("sdd", "sid", "pixel_spacing")
              if getattr(args, k) is not None}
    search = {key: getattr(args, f"search_{key}") for key in ("rotation_deg", "depth_mm",
                                                              "shift_mm")}
    given = [key for key, value in search.items() if value is not None]
    if given and not args.search:
        raise ProstlabError(f"--search-{given[0].replace('_', '-')}: sets the coarse search, "
                            "which runs only with --search; expected --search too")
    settings = RegisterSettings(
        xray=Path(args.xray), ct=Path(args.ct), out=Path(args.out),
        labels=None if args.labels is None else Path(args.labels), bones=args.bones,
        init=args.init, init_view=args.init_view, search=args.search,
        search_space=SearchSpace(**{k: v for k, v in search.items() if v is not None}),
        method=args.method, ckpt_path=None if args.ckpt_path is None else Path(args.ckpt_path),
        config=None if args.config is None else Path(args.config),
        detector=None if args.detector is None else tuple(args.detector), step=args.step,
        downsample=args.downsample, camera=camera, i0=args.i0,
        relationship=args.relationship, sign=args.sign, backend=args.backend,
        device=args.device, overwrite=args.overwrite, command=["prostlab", *args.argv],
    )
    with output_folder(args.out, args.overwrite) as out:
        problem = prepare_problem(settings)
        if args.overwrite:  # a run stopped from here on must leave none of the earlier results
            remove_recorded(out, "register")
        for note in problem.notes:
            print(f"  {note}")
        with _progress_bars() as progress:
            registration = run(problem, settings.search_space, settings.search, progress)
        written = write_outputs(out, problem, registration, settings)
        record_outputs(out, "register", written, args.overwrite)
    pose = registration.final
    angles = ", ".join(f"{float(a):.2f}" for a in pose[:3].rad2deg())
    shift = ", ".join(f"{float(t):.1f}" for t in pose[3:])
    record = registration.result.records[0]
    print(f"registered {args.xray} to {args.ct} ({args.method}, {record.n_iterations} "
          f"iterations, optimiser {record.status}): rotation vector ({angles}) deg, translation "
          f"({shift}) mm")
    for name, value in registration.similarities.items():
        print(f"  {name}: {value:.4f}")
    print(f"wrote {', '.join(p.name for p in written)} to {out}/")
    if registration.trusted:
        return 0
    print(f"prostlab register: WARNING: the pose is NOT TRUSTED (pose.json: \"trusted\": false; "
          f"exit status {UNTRUSTED_STATUS})", file=sys.stderr)
    for warning in registration.warnings:
        print(f"  - {warning}", file=sys.stderr)
    return UNTRUSTED_STATUS


def _progress_bars():
    """A rich progress display and a ``progress(phase, done, total)`` callback for it."""
    import contextlib

    from rich.progress import Progress

    @contextlib.contextmanager
    def bars():
        with Progress(transient=True) as display:
            tasks: dict[str, int] = {}

            def update(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = display.add_task(phase, total=total)
                display.update(tasks[phase], completed=done)

            yield update

    return bars()


LIGHTNING_HELP = {
    "fit": "train the convex similarity network",
    "validate": "score a checkpoint on the validation poses",
    "test": "benchmark registration methods -> tables, figures",
}
"""One line of ``prostlab --help`` per LightningCLI subcommand; each has its own ``--help``."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prostlab")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from prostlab import __version__

        return __version__


def _epilog() -> str:
    from prostlab.resources import config_names

    try:
        names = ", ".join(config_names())
    except ProstlabError:
        names = "none found (a broken install)"
    return (
        "fit, validate and test are LightningCLI commands (prostlab fit --help lists their "
        "flags). Their --config (and render's) takes a YAML file or the name of a config shipped "
        f"with prostlab: {names}. Example: prostlab test --config tiny."
    )


def _config_arg(value: str) -> str:
    try:
        return resolve_config(value)
    except ProstlabError as error:  # argparse prints this message, on one line, with status 2
        raise argparse.ArgumentTypeError(str(error)) from error


class _PixelSpacing(argparse.Action):
    """``--pixel-spacing MM`` (square pixels) or ``--pixel-spacing ROW_MM COLUMN_MM``, stored as
    the pair ``(row, column)`` that a camera's ``pixel_spacing`` is; more values are refused."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if len(values) > 2:
            raise argparse.ArgumentError(
                self, f"expected one value in mm (square pixels) or two (ROW_MM COLUMN_MM), got "
                f"{len(values)}")
        setattr(namespace, self.dest, (values[0], values[-1]))


def _add_pixel_spacing(parser: argparse.ArgumentParser, help: str) -> None:
    """``--pixel-spacing``, one value or two (:class:`_PixelSpacing`), the same for every
    command that takes a detector's pixel size."""
    parser.add_argument("--pixel-spacing", type=float, nargs="+", action=_PixelSpacing,
                        metavar=("ROW_MM", "COLUMN_MM"),
                        help=f"{help}: one value for square pixels, or ROW_MM COLUMN_MM")


def _add_backend(parser: argparse.ArgumentParser) -> None:
    """``--backend``, with the projector's choices (:data:`prostlab.backend_names.BACKENDS`), the
    same for every command that renders."""
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="projector backend: auto (CuPy on CUDA, else the compiled cpu "
                        "kernels when they build, else torch), torch, cupy or cpu (default auto)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prostlab",
        description="Prepare CTs, render DRRs, train the ProST similarity network and "
        "benchmark 2D/3D registration.",
        epilog=_epilog(),
    )
    parser.add_argument("--version", action="version", version=f"prostlab {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=LIGHTNING_HELP[name])

    prep = sub.add_parser("prepare", help="CT (+ labels) -> attenuation cube, segmented CT")
    prep.add_argument(
        "--ct", required=True, action="extend", nargs="+",
        help="CT in HU: NIfTI file or DICOM series folder; several (one patient each): each "
        "goes into --out/NAME, NAME its folder's name (or the file's when they share a folder)",
    )
    prep.add_argument("--labels", help="label map on the CT's grid (NIfTI or DICOM)")
    prep.add_argument(
        "--bone-hu", type=float,
        help="without --labels: bone threshold in HU (default 150; docs/data.md)",
    )
    prep.add_argument("--out", required=True, help="output folder (with several --ct: parent)")
    prep.add_argument("--size", type=int, default=128, help="voxels per cube edge (default 128)")
    prep.add_argument(
        "--bones",
        default="bones",
        help="bone preset (bones, pelvis), a group of structures.csv, or ids 1,2,3",
    )
    prep.add_argument("--structures", help="class table CSV (default: beside the labels)")
    prep.add_argument("--side-mm", type=float, help="cube edge in mm (default: fit the bones)")
    prep.add_argument("--margin-mm", type=float, default=0.0, help="margin around the bones, mm")
    prep.add_argument("--mu-water", type=float, default=0.02683, help="mu of water, 1/mm")
    prep.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty --out (replacing)"
    )
    prep.set_defaults(run=_prepare)

    ren = sub.add_parser("render", help="DRRs of a volume at given poses -> PNG and .npy")
    ren.add_argument("--volume", help="prepared folder or NIfTI of mu (default: bundled example)")
    ren.add_argument(
        "--which",
        choices=("ct", "bone"),
        default="ct",
        help="of a prepared folder: the full CT or the segmented bones",
    )
    ren.add_argument(
        "--pose",
        type=float,
        nargs=6,
        action="append",
        metavar=("RX_DEG", "RY_DEG", "RZ_DEG", "TX_MM", "TY_MM", "TZ_MM"),
        help="a pose: rotation vector in degrees, translation in mm (repeatable)",
    )
    ren.add_argument("--poses", help="CSV with columns rx_deg,ry_deg,rz_deg,tx_mm,ty_mm,tz_mm")
    ren.add_argument(
        "--config",
        type=_config_arg,
        help="YAML whose camera section sets the camera, or a shipped config's name (pelvis)",
    )
    ren.add_argument("--sdd", type=float, help="source-to-detector distance, mm")
    ren.add_argument("--sid", type=float, help="source-to-isocentre distance, mm")
    ren.add_argument("--height", type=int, help="detector rows")
    ren.add_argument("--width", type=int, help="detector columns")
    _add_pixel_spacing(ren, "detector pixel size, mm")
    ren.add_argument("--step", type=float, default=1.75, help="sample step along rays, mm")
    _add_backend(ren)
    ren.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    ren.add_argument("--batch-size", type=int, default=8, help="poses rendered at once")
    ren.add_argument("--colorbar", action="store_true", help="PNG with a colour bar and title")
    ren.add_argument("--out", default="drr", help="output folder (default ./drr)")
    ren.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty --out (replacing)"
    )
    ren.set_defaults(run=_render)
    _register_parser(sub)
    return parser


def _register_parser(sub) -> None:
    reg = sub.add_parser(
        "register", help="register one X-ray (DICOM or image) to a CT -> pose.json, overlays",
        description="Register one X-ray to a CT: the X-ray is turned into line integrals and "
        "fitted to the detector, the CT prepared (or a prepared folder used), the registration "
        "started from --init, --init-view or the AP view (with --search: the best starts of a "
        "coarse scan around it). See docs/xray.md.",
    )
    reg.add_argument("--xray", required=True,
                     help="the X-ray: DICOM (DX, CR, XA, RF), PNG, TIFF, NIfTI or .npy")
    reg.add_argument("--ct", required=True,
                     help="a `prostlab prepare` folder, or a CT in HU (NIfTI or DICOM series)")
    reg.add_argument("--labels", help="label map of a raw --ct (the network needs the bones)")
    reg.add_argument("--bones",
                     help="bone selection when preparing a raw --ct (default: bones)")
    start = reg.add_mutually_exclusive_group()
    start.add_argument("--init", type=float, nargs=6,
                       metavar=("RX_DEG", "RY_DEG", "RZ_DEG", "TX_MM", "TY_MM", "TZ_MM"),
                       help="start pose: rotation vector in degrees, translation in mm")
    start.add_argument("--init-view", choices=("ap", "pa", "lateral", "right-lateral"),
                       help="start from a named view of the prepared (LIP) CT (default ap)")
    reg.add_argument("--search", action="store_true",
                     help="scan poses around the start at low resolution; the best go to the "
                     "registration as starts")
    reg.add_argument("--search-rotation-deg", type=float,
                     help="--search: half-range of each rotation component, deg (default 30)")
    reg.add_argument("--search-depth-mm", type=float,
                     help="--search: half-range along the beam, mm (default 100)")
    reg.add_argument("--search-shift-mm", type=float,
                     help="--search: largest in-plane shift, mm (default 100)")
    reg.add_argument("--method", default="mncc",
                     help="registration preset or schedule YAML (default mncc; net methods "
                     "need --ckpt_path)")
    reg.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", type=resolve_checkpoint,
                     help="checkpoint of the similarity network (prostlab fit), or the name of "
                     "a shipped one (prost_cpu_chest)")
    reg.add_argument("--config", type=_config_arg,
                     help="a config (file or shipped name) whose model.camera size, model.step "
                     "and data.downsample are the defaults")
    reg.add_argument("--detector", type=int, nargs=2, metavar=("ROWS", "COLUMNS"),
                     help="detector the X-ray is binned and cropped to (default: the "
                     "checkpoint's, the config's, or 128 128)")
    reg.add_argument("--step", type=float, help="sample step along rays, mm")
    reg.add_argument("--downsample", type=int, help="average-pool the prepared CT by this factor")
    reg.add_argument("--sdd", type=float, help="source-to-detector distance, mm (replaces the "
                     "DICOM tag; required for images without one)")
    reg.add_argument("--sid", type=float, help="source-to-isocentre (patient) distance, mm")
    _add_pixel_spacing(reg, "the X-ray's pixel size at the detector, mm")
    reg.add_argument("--i0", type=float, help="unattenuated intensity (default: estimated)")
    reg.add_argument("--sign", type=int, choices=(1, -1),
                     help="1: the X-ray's values grow with the beam intensity (raw detector data, "
                     "air bright); -1: they fall with it (bone bright, as most displayed PNGs); "
                     "default: the DICOM's tags, or 1 for an image file")
    reg.add_argument("--relationship", choices=("lin", "log"),
                     help="the values are linear in the intensity, or its logarithm (default: "
                     "the DICOM's PixelIntensityRelationship, or lin for an image file)")
    _add_backend(reg)
    reg.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    reg.add_argument("--out", required=True, help="output folder")
    reg.add_argument("--overwrite", action="store_true",
                     help="write into a non-empty --out (replacing)")
    reg.set_defaults(run=_register)


LIGHTNING_COMMANDS = ("fit", "validate", "test")


class _Stopped(BaseException):
    """SIGTERM, raised where the main thread is, so that ``finally`` blocks and the temporary
    files' clean-up run (Python's default SIGTERM ends the process on the spot)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, _frame) -> None:
    raise _Stopped(signum)


def _stopped(command: str, signum: int) -> int:
    print(f"prostlab {command}: stopped by {signal.Signals(signum).name} before it finished; "
          "its results are incomplete (no file is left half-written)", file=sys.stderr)
    return 128 + signum


def _shipped_configs(argv: list[str]) -> list[str]:
    """``--config NAME`` of a config shipped with prostlab (``tiny``, ``cpu``) -> its file, and
    ``--ckpt_path`` of a shipped checkpoint (``prost_cpu_chest``) -> its file."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            argv[i + 1] = resolve_config(argv[i + 1])
        elif arg.startswith("--config="):
            argv[i] = "--config=" + resolve_config(arg.removeprefix("--config="))
        elif arg == "--ckpt_path" and i + 1 < len(argv):
            argv[i + 1] = resolve_checkpoint(argv[i + 1])
        elif arg.startswith("--ckpt_path="):
            argv[i] = "--ckpt_path=" + resolve_checkpoint(arg.removeprefix("--ckpt_path="))
    return argv


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prostlab`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        try:
            # Imported here, inside the handling: torch and Lightning take seconds to import,
            # and a Ctrl-C meanwhile printed a KeyboardInterrupt traceback.
            from prostlab.lightning.cli import run_lightning

            from_command_line = argv == sys.argv[1:]
            argv = _shipped_configs(argv)
            if from_command_line:  # LightningCLI reads sys.argv itself (it warns if given both)
                sys.argv[1:] = argv
            run_lightning(argv)
        except KeyboardInterrupt:  # outside Lightning's own handling (imports, setup, summary)
            return _stopped(argv[0], signal.SIGINT)
        except ProstlabError as exc:
            print(f"prostlab {argv[0]}: error: {exc}", file=sys.stderr)
            return 2
        except SystemExit as exc:
            from pytorch_lightning.utilities.exceptions import SIGTERMException

            if isinstance(exc, SIGTERMException):
                # Lightning stops at a step's end and (fit) last.ckpt is written; it then raises
                # a SystemExit of status 0, which a batch scheduler would read as success.
                print(f"prostlab {argv[0]}: stopped by SIGTERM", file=sys.stderr)
                return 128 + signal.SIGTERM
            if isinstance(exc.__context__, KeyboardInterrupt):
                # Lightning answers a Ctrl-C inside its loops (after its clean-up and, in fit,
                # last.ckpt) with sys.exit(1), the status of a failure, not of a stop.
                print(f"prostlab {argv[0]}: stopped by SIGINT", file=sys.stderr)
                return 128 + signal.SIGINT
            raise
        except Exception as exc:
            from lightning_fabric.utilities.exceptions import MisconfigurationException

            if not isinstance(exc, MisconfigurationException):
                raise
            # Lightning's word for a setting it cannot use (--trainer.accelerator gpu on a
            # machine without one, --trainer.max_steps -5): raised before anything is written.
            print(f"prostlab {argv[0]}: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        return 0
    args = _parser().parse_args(argv)
    args.argv = argv
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        return args.run(args) or 0
    except (ProstlabError, FileNotFoundError) as exc:
        print(f"prostlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _stopped(args.command, signal.SIGINT)
    except _Stopped as stop:
        return _stopped(args.command, stop.signum)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
