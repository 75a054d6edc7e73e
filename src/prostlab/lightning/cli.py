"""``prostlab fit`` / ``validate`` / ``test``: LightningCLI over the module and the DataModule.

Every config field can be overridden on the command line (``--trainer.max_steps 100``,
``--data.batch_size 4``); the resolved config is saved beside the run (``config.yaml`` in the
logger's folder).

Several ``--config`` files stack: each later one is an overlay. Mapping-valued sections
(``model.benchmark``, ``model.scheduler``, ``data.test_poses``, ...) are merged key by key, so an
overlay that sets ``model.benchmark.target`` keeps the base's ``methods`` and ``output_dir``;
lists and plain values are replaced. OmegaConf interpolations (``${trainer.max_steps}``) are
resolved once, after every file and flag is merged (jsonargparse's ``omegaconf+`` mode), so they
see the final values; ``--print_config`` shows that merged, resolved config.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import os
import re
import sys
from pathlib import Path

import pytorch_lightning as pl
import yaml
from jsonargparse import ActionConfigFile, set_parsing_settings
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from prostlab.data import PoseDataModule
from prostlab.errors import ProstlabError
from prostlab.lightning.benchmark import check_benchmark_settings, check_trained_network
from prostlab.lightning.checkpoint import check_compatible, read_checkpoint
from prostlab.lightning.last_checkpoint import MOVED_PREFIX, LastCheckpoint
from prostlab.lightning.training import ConvexSimilarityModule
from prostlab.outputs import check_writable_dir, exclusive_folder

TRAINER_DEFAULTS = {
    # Validation and the benchmark differentiate the similarity: no inference mode.
    "inference_mode": False,
    "logger": {"class_path": "prostlab.lightning.wandb_logger.AutoWandbLogger"},
}


class _OneLineParser(LightningArgumentParser):
    """Report a config or flag error as one line, with the nearest known key when misspelt."""

    def error(self, message: str, *args, **kwargs):
        message = " ".join(str(message).split())
        unknown = re.findall(
            r"[Uu]nrecognized arguments: (\S+)|Key '([^']+)'|key \"([^\"]+)\"", message
        )
        names = [n for group in unknown for n in group if n]
        known = [a for action in self._actions for a in action.option_strings]
        for name in names:
            flag = name if name.startswith("--") else f"--{name}"
            close = difflib.get_close_matches(flag.split("=")[0], known, n=1, cutoff=0.6)
            if close:
                message += f" (did you mean {close[0]}?)"
        raise ProstlabError(message)


class _OverlayConfigFile(ActionConfigFile):
    """``--config``: a file (or YAML string) merged over the config read so far.

    jsonargparse replaces a mapping-valued argument (a ``dict`` parameter such as
    ``model.benchmark``) whole when a later file sets it, so an overlay that changed one key
    silently dropped the others. Here such an argument is merged key by key, recursively, with
    its earlier value; lists and plain values are replaced, and ``null`` clears the mapping.
    Class-valued arguments (``class_path``/``init_args``) keep jsonargparse's own merge. A file
    that holds no mapping (empty, only comments, a list) is refused naming it; jsonargparse said
    ``Unexpected config:`` and nothing more.
    """

    @staticmethod
    def apply_config(parser, cfg, dest, value) -> None:
        _check_config_file(value)
        before = cfg.clone()
        ActionConfigFile.apply_config(parser, cfg, dest, value)
        for action in parser._actions:
            key = action.dest
            old, new = before.get(key), cfg.get(key)
            if isinstance(old, dict) and isinstance(new, dict):
                cfg[key] = _deep_merge(old, new)


def _check_config_file(value) -> None:
    """Refuse a ``--config`` file whose YAML is not a mapping of settings (a YAML string given
    in its place, and a file that cannot be read, are left to jsonargparse)."""
    path = Path(str(value))
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    if not isinstance(content, dict):
        got = "nothing (empty, or only comments)" if content is None else (
            f"a {type(content).__name__}")
        raise ProstlabError(f"--config {value}: holds {got}; expected a YAML mapping of "
                            "settings, such as `trainer: {max_steps: 100}`")


def _deep_merge(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base``: mappings merged recursively, anything else replaced."""
    merged = dict(base)
    for key, value in overlay.items():
        old = merged.get(key)
        merged[key] = (
            _deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
        )
    return merged


class _SaveAndLogConfig(SaveConfigCallback):
    """Save the resolved config beside the run and hand it to the logger (W&B run config)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is not None:
            trainer.logger.log_hyperparams({"config": self.config.as_dict()})


class _ProstlabCLI(LightningCLI):
    """LightningCLI with a ``last_checkpoint`` section, and ``--ckpt_path`` checked up front.

    - ``last_checkpoint`` (:class:`~prostlab.lightning.last_checkpoint.LastCheckpoint`) writes
      ``last.ckpt`` every ``every_n_train_steps`` steps, on Ctrl-C or a crash, and at the end.
    - Lightning would overwrite the config's model section with the checkpoint's
      hyperparameters; prostlab keeps the config (so ``prostlab test`` runs the benchmark it
      describes) and instead requires the checkpoint's camera and network to be the config's.
    - ``--ckpt_path`` that is not a readable checkpoint, ``best`` (no best checkpoint is known
      before a run) and ``last`` without a ``last.ckpt`` are refused in one line.
    - ``fit`` that would train no step (``max_epochs`` 0, or a resumed checkpoint already at
      ``max_steps`` or ``max_epochs``) is refused: Lightning would exit 0 and write nothing.
    - ``fit`` holds its checkpoint folders' locks while it trains: a second ``fit`` into them
      (which would share ``last.ckpt``) is refused, naming the first. A multi-process run's
      first process holds them for all of its processes.
    - ``test`` of a method with a ``net`` stage without trained weights (no ``--ckpt_path``, no
      ``model.init_weights``) is refused, as ``prostlab register`` refuses it.
    - ``data.camera`` is ``model.camera``, linked: real X-rays are fitted to the model's detector.
    """

    _configured_model = None

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        """Lightning's parser, with ``--config`` files merged as overlays (module docstring)."""
        kwargs.setdefault("dump_header", [f"pytorch_lightning=={pl.__version__}"])
        parser = self.parser_class(**kwargs)
        parser.add_argument(
            "-c", "--config", action=_OverlayConfigFile,
            help="a YAML config file; several are merged in order, each over the ones before",
        )
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        # Real X-rays (DeepFluoro) are fitted to the model's detector.
        parser.link_arguments("model.camera", "data.camera")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except OmegaConfBaseException as exc:  # an interpolation that names no key
            where = str(getattr(exc, "full_key", "") or "config").split(".", 1)[-1]
            raise ProstlabError(
                f"{where}: {str(exc).splitlines()[0]}; expected ${{...}} to name a key of the "
                "merged config (e.g. ${trainer.max_steps})"
            ) from None
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        model = self.config[subcommand]["model"]
        self._configured_model = copy.deepcopy(model)
        path = self.config[subcommand].get("ckpt_path")
        if path in SPECIAL_CKPT_PATHS or path is None:
            return
        saved = read_checkpoint(path).get("hyper_parameters", {})
        for key, what in (("camera", "camera"), ("net", "architecture")):
            if key in saved and _plain(saved[key]) != _plain(model.get(key)):
                raise ProstlabError(
                    f"{path}: trained with model.{key} = {_plain(saved[key])}, the config has "
                    f"{_plain(model.get(key))}; expected the same {what}"
                )

    def instantiate_classes(self) -> None:
        # jsonargparse reports a constructor's error under a union type (trainer.logger) as
        # "Does not validate against any of the Union subtypes"; bring prostlab's line back.
        try:
            super().instantiate_classes()
        except Exception as exc:
            cause = _prostlab_error_in(exc)
            if cause is None or cause is exc:
                raise
            raise ProstlabError(str(cause)) from None

    def before_instantiate_classes(self) -> None:
        # Lightning has replaced the model section by the checkpoint's hyperparameters.
        if self._configured_model is not None:
            self.config[self.subcommand]["model"] = self._configured_model

    def _check_checkpoint(self) -> dict | None:
        """Check ``--ckpt_path`` (resolving ``last``); return the checkpoint read, if a file."""
        trainer, arguments = self.trainer, self.config_init[self.subcommand]
        if not trainer.loggers:  # it would fail at the first step with no logger to write to
            trainer.callbacks[:] = [
                cb for cb in trainer.callbacks if not isinstance(cb, LearningRateMonitor)
            ]
        folders = _checkpoint_folders(trainer, check_save_last=self.subcommand == "fit")
        path = arguments.get("ckpt_path")
        if path == "best":
            raise ProstlabError(
                "--ckpt_path best: no best checkpoint is known before a run; expected a "
                f"checkpoint file (e.g. in {folders[0] if folders else 'the checkpoint folder'}/) "
                "or last"
            )
        if path == "last":
            # Earlier runs' last.ckpt moved aside (last-step*.ckpt) are resumed by name only.
            found = [p for folder in folders for p in Path(folder).glob("last*.ckpt")
                     if not p.name.startswith(MOVED_PREFIX)]
            if not found:
                raise ProstlabError(
                    f"--ckpt_path last: no last.ckpt in {', '.join(map(str, folders))}; "
                    "expected the checkpoint folder of an earlier `prostlab fit` with this "
                    "config (leave --ckpt_path out to start afresh)"
                )
            path = arguments["ckpt_path"] = str(max(found, key=lambda p: p.stat().st_mtime))
        if path not in SPECIAL_CKPT_PATHS and path is not None:
            return check_compatible(path, self.model)
        return None

    def before_fit(self) -> None:
        checkpoint = self._check_checkpoint()
        _check_something_to_train(self.trainer, checkpoint,
                                  self.config_init[self.subcommand].get("ckpt_path"))
        # A folder that is a file, or not writable, failed with a traceback at the first save.
        for folder in _checkpoint_folders(self.trainer, check_save_last=False):
            check_writable_dir(folder, "checkpoint folder (last_checkpoint or ModelCheckpoint)")

    def before_test(self) -> None:
        self._check_checkpoint()
        check_trained_network(self.model, self.config_init[self.subcommand].get("ckpt_path"))
        # Every benchmark setting, then the output folder: refused before the logger writes.
        check_benchmark_settings(self.model)

    before_validate = _check_checkpoint

    def fit(self, **kwargs) -> None:
        """``trainer.fit`` with the checkpoint folders locked (:func:`exclusive_folder`): a
        second ``fit`` into them (which would share ``last.ckpt``) is refused while this runs."""
        folders = {} if _launched_worker(self.trainer) else {  # (its first process holds them)
            os.path.realpath(f): f for f in _checkpoint_folders(self.trainer, check_save_last=False)
        }
        with contextlib.ExitStack() as locks:
            for folder in folders.values():
                locks.enter_context(exclusive_folder(folder, "checkpoint folder"))
            self.trainer.fit(**kwargs)


def _launched_worker(trainer) -> bool:
    """Whether this process is one that a multi-process run started besides its first (a DDP
    rank other than 0, which Lightning's launcher or torchrun starts with ``RANK``,
    ``LOCAL_RANK`` or ``NODE_RANK`` set): it writes into the first process's folders."""
    ranks = (os.environ.get(name, "0") for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))
    return trainer.global_rank != 0 or any(rank not in ("", "0") for rank in ranks)


def _prostlab_error_in(exc: BaseException) -> ProstlabError | None:
    """The first ``ProstlabError`` in the chain of causes and contexts of ``exc``, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ProstlabError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


_NOTHING_TO_TRAIN = {
    "max_epochs": "expected at least 1 (or -1, no limit, with --trainer.max_steps)",
    "max_steps": "expected at least 1 (or -1, no limit, with --trainer.max_epochs)",
    "limit_train_batches": "expected a positive number (or fraction) of batches per epoch",
}
"""The trainer settings whose 0 ends ``fit`` before its first step, and what is expected."""


def _check_something_to_train(trainer, checkpoint: dict | None, path: str | None) -> None:
    """Refuse a ``fit`` that would train no step: Lightning then exits 0, writes no checkpoint
    and says no more than an info line.

    That happens when ``max_epochs``, ``max_steps`` or ``limit_train_batches`` is 0, and when
    the resumed ``checkpoint`` (read from ``path``) has reached ``max_steps`` or ``max_epochs``
    already, which count from the start of the run, not from the resumed step.
    """
    for flag, expected in _NOTHING_TO_TRAIN.items():
        if getattr(trainer, flag) == 0:
            raise ProstlabError(f"--trainer.{flag} 0: trains nothing and writes no checkpoint; "
                                f"{expected}")
    checkpoint = checkpoint or {}
    step, limit = checkpoint.get("global_step"), trainer.max_steps
    if step is not None and limit != -1 and step >= limit:
        raise ProstlabError(
            f"--trainer.max_steps {limit}: {path} is at step {step} already, so resuming it "
            f"trains nothing; expected more than {step}: max_steps counts from the run's start, "
            f"so --trainer.max_steps {step + limit} trains {limit} more (or leave --ckpt_path "
            "out to start afresh)"
        )
    done, limit = _epochs_done(checkpoint, steps_bound=limit != -1), trainer.max_epochs
    if done is not None and limit not in (None, -1) and done >= limit:
        raise ProstlabError(
            f"--trainer.max_epochs {limit}: {path} has finished {done} epoch{'s' * (done != 1)} already (at step "
            f"{step}), so resuming it trains nothing; expected more than {done}: max_epochs "
            f"counts from the run's start, so --trainer.max_epochs {done + limit} trains "
            f"{limit} more epoch{'s' * (limit != 1)} (or leave --ckpt_path out to start afresh)"
        )


def _epochs_done(checkpoint: dict, steps_bound: bool) -> int | None:
    """The epochs that a ``fit`` resuming ``checkpoint`` counts as done (Lightning 2.6's
    ``_FitLoop``); ``None`` for a checkpoint without the loops' state.

    That is ``e = epoch_progress.current.processed`` (epochs whose end ran), plus one when the
    checkpoint was written after an epoch's last batch and before the epoch's end: Lightning's
    ``_FitLoop.reset`` then counts that epoch as processed, though the checkpoint's ``epoch``
    still names it. Written so (``last.ckpt`` at an epoch's last step): the fit loop restarts
    (the epoch is unfinished, ``current.started != e`` or ``current.ready != e``, or
    ``steps_bound``: ``max_steps`` is set), the epoch counters stand mid-epoch (``total``:
    started = ready = processed + 1, completed = processed), the batch counters after a batch's
    end (``total``: started = ready = processed = completed + 1) and that batch was the last.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not fit:
        return None
    epochs, batches = fit["epoch_progress"], fit["epoch_loop.batch_progress"]
    done, current, e, b = (epochs["current"]["processed"], epochs["current"], epochs["total"],
                           batches["total"])
    restarting = steps_bound or current["started"] != done or current["ready"] != done
    mid_epoch = e["started"] == e["ready"] == e["processed"] + 1 == e["completed"] + 1
    after_batch = b["started"] == b["ready"] == b["processed"] == b["completed"] + 1
    return done + int(restarting and mid_epoch and after_batch and batches["is_last_batch"])


SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")
"""``--ckpt_path`` values that name no file (Lightning resolves them)."""


def _checkpoint_folders(trainer, check_save_last: bool) -> list[str]:
    """The folders where ``last.ckpt`` is looked for: ``last_checkpoint``'s, then the others'.

    Raises if a ``ModelCheckpoint`` with ``save_last`` would write a second ``last.ckpt`` beside
    the one of ``last_checkpoint`` (Lightning would name it ``last-v1.ckpt``).
    """
    folders = []
    for cb in trainer.callbacks:
        if isinstance(cb, LastCheckpoint):
            folders.insert(0, str(cb.resolve_dirpath(trainer)))
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None:
            same = folders and os.path.realpath(cb.dirpath) == os.path.realpath(folders[0])
            if check_save_last and same and cb.save_last:
                raise ProstlabError(
                    f"trainer.callbacks: the ModelCheckpoint in {cb.dirpath} has save_last: "
                    f"{cb.save_last}, but last.ckpt there is written by the last_checkpoint "
                    "section (every last_checkpoint.every_n_train_steps steps, on Ctrl-C and at "
                    "the end); expected no save_last"
                )
            if str(cb.dirpath) not in folders:
                folders.append(str(cb.dirpath))
    return folders


def _plain(value):
    """Config values compared as plain data: mappings as dicts, sequences as lists."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def run_lightning(argv: list[str]) -> LightningCLI:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``) with its arguments.

    Returns the CLI, whose ``model``, ``datamodule`` and ``trainer`` are those of the run.
    """
    # A config's ``${trainer.max_steps}`` names a key of the subcommand's config, which sits
    # under ``fit.``/``test.`` in the parsed whole: read as relative to the subcommand's root.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    return _ProstlabCLI(
        ConvexSimilarityModule,
        PoseDataModule,
        args=None if argv == sys.argv[1:] else argv,
        parser_class=_OneLineParser,
        parser_kwargs={"parser_mode": "omegaconf+"},
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=_SaveAndLogConfig,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": True},
        seed_everything_default=0,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    run_lightning(sys.argv[1:])
