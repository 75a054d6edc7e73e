"""``prostlab fit`` / ``validate`` / ``test``: LightningCLI over the module and the DataModule.

Every config field can be overridden on the command line (``--trainer.max_steps 100``,
``--data.batch_size 4``); configs may use OmegaConf interpolation; the resolved config is saved
beside the run (``config.yaml`` in the logger's folder).
"""

from __future__ import annotations

import difflib
import re
import sys

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from prostlab.data import PoseDataModule
from prostlab.errors import ProstlabError
from prostlab.lightning.checkpoint import check_compatible, read_checkpoint
from prostlab.lightning.training import ConvexSimilarityModule

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


class _SaveAndLogConfig(SaveConfigCallback):
    """Save the resolved config beside the run and hand it to the logger (W&B run config)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is not None:
            trainer.logger.log_hyperparams({"config": self.config.as_dict()})


class _ProstlabCLI(LightningCLI):
    """LightningCLI that checks ``--ckpt_path`` against the configured model first.

    Lightning would overwrite the config's model section with the checkpoint's hyperparameters;
    prostlab keeps the config (so ``prostlab test`` runs the benchmark it describes) and
    instead requires the checkpoint's camera and network to be the config's.
    """

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path in (None, "last", "best", "hpc", "registry"):
            return
        saved = read_checkpoint(path).get("hyper_parameters", {})
        model = self.config[subcommand]["model"]
        for key, what in (("camera", "camera"), ("net", "architecture")):
            if key in saved and _plain(saved[key]) != _plain(model.get(key)):
                raise ProstlabError(
                    f"{path}: trained with model.{key} = {_plain(saved[key])}, the config has "
                    f"{_plain(model.get(key))}; expected the same {what}"
                )

    def _check_checkpoint(self) -> None:
        path = self.config[self.subcommand].get("ckpt_path")
        if path not in (None, "last", "best", "hpc", "registry"):
            check_compatible(path, self.model)

    before_fit = before_validate = before_test = _check_checkpoint


def _plain(value):
    """Config values compared as plain data: mappings as dicts, sequences as lists."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def run_lightning(argv: list[str]) -> None:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``) with its arguments."""
    _ProstlabCLI(
        ConvexSimilarityModule,
        PoseDataModule,
        args=None if argv == sys.argv[1:] else argv,
        parser_class=_OneLineParser,
        parser_kwargs={"parser_mode": "omegaconf"},
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=_SaveAndLogConfig,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": True},
        seed_everything_default=0,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    run_lightning(sys.argv[1:])
