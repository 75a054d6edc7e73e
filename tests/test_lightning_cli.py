"""`prostlab fit` / `validate` / `test`: checkpoints are checked against the config, which is kept;
bad checkpoints, logging and checkpoint settings are refused in one line with exit code 2 before
any training; `fit` without a logger works."""

from __future__ import annotations

import time

import pytest
import pytorch_lightning as pl
import torch
import yaml

from fit_run import TINY, TINY_CHECKPOINTS
from prostlab.cli import main
from prostlab.lightning import ConvexSimilarityModule
from prostlab.lightning.cli import run_lightning
from prostlab.outputs import exclusive_folder

QUICK = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
         "--model.image_every_n_steps", "0", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Each run in its own empty folder, W&B offline unless a test says otherwise."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")


def refusal(capsys, command: str, *args: str) -> str:
    """Run ``prostlab <command> --config tiny.yaml <args>``; its one-line error."""
    code = main([command, "--config", str(TINY), *QUICK, *args])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"prostlab {command}: error: "), err[-3000:]
    return lines[-1]


@pytest.mark.parametrize("command", ["fit", "test"])
@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"hello\nworld\n", "not a readable checkpoint"), (b"", "empty file")],
)
def test_checkpoint_that_is_text_or_empty(tmp_path, capsys, command, content, needle):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    line = refusal(capsys, command, "--ckpt_path", str(path))
    assert str(path) in line and needle in line


def test_ckpt_path_best_names_what_is_expected(capsys):
    line = refusal(capsys, "fit", "--ckpt_path", "best")
    assert "--ckpt_path best" in line and "checkpoint file" in line


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_ckpt_path_last_without_a_last_checkpoint(capsys, command):
    line = refusal(capsys, command, "--ckpt_path", "last")
    assert "--ckpt_path last" in line and str(TINY_CHECKPOINTS) in line


def test_interval_must_be_positive(capsys):
    line = refusal(capsys, "fit", "--last_checkpoint.every_n_train_steps", "0")
    assert "last_checkpoint.every_n_train_steps = 0" in line and "at least 1" in line


def test_a_second_writer_of_last_ckpt_is_refused(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.read_text().replace("mode: max\n", "mode: max\n        save_last: true\n"))
    code = main(["fit", "--config", str(config), *QUICK])
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert code == 2 and "save_last" in line and "last_checkpoint" in line, err[-3000:]


def test_a_fit_into_a_checkpoint_folder_another_fit_holds_is_refused(tmp_path, capsys):
    """Two fits into one folder would share last.ckpt: the second is refused, naming the first
    (a lock held here stands for the other run's; they do not nest within a process either)."""
    TINY_CHECKPOINTS.mkdir(parents=True)
    with exclusive_folder(TINY_CHECKPOINTS):
        line = refusal(capsys, "fit")
    assert f"{TINY_CHECKPOINTS}: another prostlab process is writing there now" in line
    assert not (tmp_path / TINY_CHECKPOINTS / "last.ckpt").exists()
    assert main(["fit", "--config", str(TINY), *QUICK]) == 0  # free again
    assert (tmp_path / TINY_CHECKPOINTS / "last.ckpt").is_file()


@pytest.mark.parametrize(
    ("override", "env", "needle"),
    [
        (["--trainer.logger.init_args.offline", "null"], {"WANDB_MODE": "online"}, "API key"),
        (
            ["--trainer.logger.init_args.offline", "false"],
            {"WANDB_MODE": "", "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"},
            "127.0.0.1:9",
        ),
    ],
)
def test_forced_online_wandb_without_network_fails_fast(
    tmp_path, capsys, monkeypatch, override, env, needle
):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    start = time.monotonic()
    line = refusal(capsys, "fit", *override)
    assert time.monotonic() - start < 30
    assert "forced online" in line and needle in line and "WANDB_MODE=offline" in line


def test_fit_without_a_logger_trains_and_saves(tmp_path, capsys):
    assert main(["fit", "--config", str(TINY), *QUICK, "--trainer.logger", "false"]) == 0, (
        capsys.readouterr().err[-3000:]
    )
    assert (tmp_path / TINY_CHECKPOINTS / "last.ckpt").is_file()


@pytest.mark.parametrize("flag", ["max_epochs", "max_steps", "limit_train_batches"])
def test_a_fit_that_trains_nothing_is_refused(tmp_path, capsys, flag):
    line = refusal(capsys, "fit", f"--trainer.{flag}", "0")
    assert f"--trainer.{flag} 0: trains nothing" in line and "expected" in line
    assert not (tmp_path / TINY_CHECKPOINTS).exists()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["--trainer.max_steps", "-5"], "`max_steps` must be a non-negative integer"),
     pytest.param(["--trainer.accelerator", "gpu"], "gpu",
                  marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU"))],
)
def test_a_setting_lightning_cannot_use_is_one_line(tmp_path, capsys, flags, needle):
    """Lightning's MisconfigurationException was a traceback (probes f08, f33)."""
    assert needle in refusal(capsys, "fit", *flags)
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]


def test_a_checkpoint_folder_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    """It trained, then failed at the first last.ckpt with a FileExistsError traceback (f32)."""
    (tmp_path / TINY_CHECKPOINTS).parent.mkdir(parents=True)
    (tmp_path / TINY_CHECKPOINTS).write_text("mine\n")
    line = refusal(capsys, "fit")
    assert "checkpoint folder (last_checkpoint or ModelCheckpoint) " in line
    assert f"{TINY_CHECKPOINTS}: is an existing file" in line
    assert not [path for path in (tmp_path / "runs").rglob("*") if path.is_file()]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["--model.camera.height", "1"], "model.camera height x width: 1 x 16; expected at least 8 "
                                      "pixels"),
     (["--model.camera.sdd", "1e9"], "model.camera.sdd: 1e+09 mm; expected the source-to-"
                                     "detector distance in mm within [100, 3000]")],
)
def test_a_camera_that_render_and_register_refuse_is_refused(capsys, flags, needle):
    """A 1-row or 1000 km model.camera trained without a word (probes f24, f25)."""
    assert needle in refusal(capsys, "fit", *flags)


@pytest.mark.parametrize(
    "flags",
    [["--model.benchmark.run_name", "../escape"], ["--model.benchmark.methods", "{x: nosuch}"],
     ["--model.benchmark.output_dir", "notes.txt"]],
)
def test_a_bad_benchmark_setting_is_refused_before_anything_is_written(tmp_path, capsys, flags):
    """Checked at the test loop's start, these left the logger's W&B run and config.yaml
    behind (probes t05, t07, t10)."""
    tiny_model_checkpoint(tmp_path / "model.ckpt")
    (tmp_path / "notes.txt").write_text("mine\n")
    line = refusal(capsys, "test", "--ckpt_path", str(tmp_path / "model.ckpt"), *flags)
    assert "model.benchmark." in line
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["model.ckpt", "notes.txt"]


def test_resuming_a_checkpoint_at_max_steps_is_refused(tmp_path, capsys):
    assert main(["fit", "--config", str(TINY), *QUICK, "--trainer.max_steps", "2"]) == 0
    capsys.readouterr()
    last = tmp_path / TINY_CHECKPOINTS / "last.ckpt"
    before = last.stat().st_mtime_ns
    line = refusal(capsys, "fit", "--trainer.max_steps", "2", "--ckpt_path", "last")
    assert f"--trainer.max_steps 2: {last} is at step 2 already" in line, line
    assert "--trainer.max_steps 4 trains 2 more" in line
    assert last.stat().st_mtime_ns == before and len(list(last.parent.iterdir())) == 1


EPOCHS = ["--trainer.max_steps", "-1", "--trainer.limit_train_batches", "2"]
"""Epochs of two steps; ``last.ckpt`` is written at each epoch's last step (every 2 steps)."""


def test_resuming_a_checkpoint_at_max_epochs_is_refused(tmp_path, capsys):
    """The last.ckpt written at epoch 0's last step records that epoch as unfinished (its
    ``epoch`` is 0), yet resuming it with max_epochs 1 trained nothing and exited 0."""
    assert main(["fit", "--config", str(TINY), *QUICK, *EPOCHS, "--trainer.max_epochs", "1"]) == 0
    capsys.readouterr()
    last = tmp_path / TINY_CHECKPOINTS / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    before = last.stat().st_mtime_ns
    line = refusal(capsys, "fit", *EPOCHS, "--trainer.max_epochs", "1", "--ckpt_path", "last")
    assert f"--trainer.max_epochs 1: {last} has finished 1 epoch already (at step 2)" in line
    assert "--trainer.max_epochs 2 trains 1 more epoch" in line, line
    assert last.stat().st_mtime_ns == before and len(list(last.parent.iterdir())) == 1
    # One more epoch trains: the check refuses only a resume that trains nothing.
    code = main(["fit", "--config", str(TINY), *QUICK, *EPOCHS, "--trainer.max_epochs", "2",
                 "--ckpt_path", "last"])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 4


def test_resuming_in_the_middle_of_the_last_epoch_is_not_refused(tmp_path, capsys):
    """A checkpoint written before the epoch's last batch still has steps to train."""
    assert main(["fit", "--config", str(TINY), *QUICK, "--trainer.limit_train_batches", "3",
                 "--trainer.max_steps", "2"]) == 0
    code = main(["fit", "--config", str(TINY), *QUICK, "--trainer.limit_train_batches", "3",
                 "--trainer.max_steps", "-1", "--trainer.max_epochs", "1", "--ckpt_path", "last"])
    assert code == 0, capsys.readouterr().err[-3000:]
    last = tmp_path / TINY_CHECKPOINTS / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3


def tiny_model_checkpoint(path, **hyper_parameters) -> None:
    """A checkpoint of an untrained tiny-config network, its hyperparameters changed."""
    model_config = yaml.safe_load(TINY.read_text())["model"]
    model = ConvexSimilarityModule(**model_config)
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": pl.__version__,
                "hyper_parameters": {**model.hparams, **hyper_parameters}}, path)


def test_test_of_an_untrained_network_is_refused(tmp_path, capsys):
    line = refusal(capsys, "test")  # the tiny config's methods: gradncc, net_gradncc
    assert "model.benchmark.methods ['net_gradncc']: a 'net' stage needs the trained" in line
    assert "--ckpt_path" in line and "drop ['net_gradncc']" in line
    assert not (tmp_path / "results").exists()


def test_trainer_test_from_python_refuses_an_untrained_network():
    from prostlab.data import PoseDataModule
    from prostlab.errors import ProstlabError

    config = yaml.safe_load(TINY.read_text())
    module = ConvexSimilarityModule(**config["model"])
    data = PoseDataModule(camera=config["model"]["camera"], **config["data"])
    trainer = pl.Trainer(logger=False, accelerator="cpu", inference_mode=False,
                         enable_progress_bar=False)
    with pytest.raises(ProstlabError, match=r"\['net_gradncc'\]: a 'net' stage needs"):
        trainer.test(module, datamodule=data)


@pytest.mark.parametrize("weights", ["none, image similarities only", "model.init_weights"])
def test_test_runs_without_a_checkpoint_when_no_method_needs_one(tmp_path, capsys, weights):
    args = ["--model.benchmark.methods", "{gradncc: gradncc}"]
    if weights == "model.init_weights":
        tiny_model_checkpoint(tmp_path / "start.ckpt")
        args = ["--model.init_weights", str(tmp_path / "start.ckpt")]
    code = main(["test", "--config", str(TINY), *QUICK, *args, "--data.test_samples", "2",
                 "--model.benchmark.max_iterations", "2", "--model.benchmark.gif_case", "null",
                 "--model.benchmark.overlays", "0"])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert (tmp_path / "results" / "tiny" / "latest" / "cases.csv").is_file()


def test_the_configs_model_section_is_kept_over_the_checkpoints(tmp_path):
    path = tmp_path / "other.ckpt"
    tiny_model_checkpoint(path, step=99.0, image_every_n_steps=7)
    cli = run_lightning(["validate", "--config", str(TINY), "--trainer.limit_val_batches", "0",
                         "--trainer.logger", "false", "--ckpt_path", str(path)])
    assert cli.model.hparams["step"] == 8.0 and cli.model.hparams["image_every_n_steps"] == 2


@pytest.mark.parametrize(("field", "value"), [("camera", {"height": 20}), ("net", {"pool_size": 1})])
def test_a_checkpoint_of_another_camera_or_network_is_refused(tmp_path, capsys, field, value):
    path = tmp_path / "other.ckpt"
    model_config = yaml.safe_load(TINY.read_text())["model"]
    tiny_model_checkpoint(path, **{field: {**model_config[field], **value}})
    line = refusal(capsys, "test", "--ckpt_path", str(path))
    assert str(path) in line and f"model.{field}" in line


def test_a_fresh_fit_moves_an_earlier_runs_last_checkpoint_aside(tmp_path, capsys):
    folder = tmp_path / TINY_CHECKPOINTS
    assert main(["fit", "--config", str(TINY), *QUICK, "--trainer.max_steps", "2"]) == 0
    capsys.readouterr()
    assert main(["fit", "--config", str(TINY), *QUICK]) == 0  # no --ckpt_path: starts afresh
    err = capsys.readouterr().err
    moved = folder / "last-step000002.ckpt"
    assert torch.load(moved, weights_only=True)["global_step"] == 2
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 1
    warning = [line for line in err.splitlines() if "WARNING" in line]
    assert len(warning) == 1 and str(moved) in warning[0]
    assert f"--ckpt_path {moved}" in warning[0]
    # --ckpt_path last is the newest run's last.ckpt, never a moved one
    assert main(["fit", "--config", str(TINY), *QUICK, "--trainer.max_steps", "3",
                 "--ckpt_path", "last"]) == 0
    assert "WARNING" not in capsys.readouterr().err
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 3
    assert sorted(p.name for p in folder.glob("last*.ckpt")) == [
        "last-step000002.ckpt", "last.ckpt"]


def test_move_aside_never_replaces_a_file(tmp_path):
    from prostlab.lightning.last_checkpoint import move_aside

    names = []
    for content in ({"global_step": 36}, {"global_step": 36}, b"not a checkpoint"):
        path = tmp_path / "last.ckpt"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        names.append(move_aside(path).name)
        assert not path.exists()
    assert names == ["last-step000036.ckpt", "last-step000036-2.ckpt", "last-step-unknown.ckpt"]
    assert torch.load(tmp_path / names[0], weights_only=True) == {"global_step": 36}


def test_fitting_a_module_built_on_meta_names_the_network(tmp_path):
    """Trainer.fit of a module built under torch.device("meta") failed with torch's 'Cannot copy
    out of meta tensor; no data!' as Lightning moved it; the module's setup now refuses it first
    (Lightning's teardown then fails to move it back, with prostlab's error as its context)."""
    from omegaconf import OmegaConf

    from prostlab.data import PoseDataModule
    from prostlab.errors import ProstlabError

    config = OmegaConf.to_container(OmegaConf.load(TINY), resolve=True)
    with torch.device("meta"):
        module = ConvexSimilarityModule(**config["model"])
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    with pytest.raises(BaseException) as raised:
        trainer.fit(module, datamodule=PoseDataModule(**config["data"]))
    chain, error = [], raised.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    refusals = [e for e in chain if isinstance(e, ProstlabError)]
    assert refusals and str(refusals[0]).startswith(
        "model.net: the ConvexSimilarityNet's weights are on the meta device"), chain
