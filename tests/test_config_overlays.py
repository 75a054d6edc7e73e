"""Stacked ``--config`` files: mapping-valued sections merge key by key, interpolations resolve
after the merge, and ``--print_config`` shows the merged result (issue 19, item 4)."""

from __future__ import annotations

import types
import typing

import pytest
import yaml

from prostlab.cli import main
from prostlab.data import PoseDataModule
from prostlab.lightning import ConvexSimilarityModule
from prostlab.resources import resolve_config

LINK_TARGETS = {"data.camera"}
"""Set from ``model.camera`` by the CLI, never from a config."""


def dict_sections() -> list[str]:
    """``section.key`` of every constructor argument of the model and the data module
    that takes a mapping."""
    found = []
    for section, cls in (("model", ConvexSimilarityModule), ("data", PoseDataModule)):
        for name, hint in typing.get_type_hints(cls.__init__).items():
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            options = typing.get_args(hint) if union else (hint,)
            if any(typing.get_origin(o) is dict for o in options):
                if f"{section}.{name}" not in LINK_TARGETS:
                    found.append(f"{section}.{name}")
    return found


def nested(config: dict, dotted: str, value) -> dict:
    """``config`` with ``value`` set at the dotted key, creating the mappings on the way."""
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return config


def get(config: dict, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def printed_config(capsys, *argv: str) -> dict:
    """``prostlab <argv> --print_config``, parsed."""
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--print_config"])
    out, err = capsys.readouterr()
    assert stop.value.code in (0, None), err[-3000:]
    return yaml.safe_load(out)


def write(path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_every_mapping_section_is_merged_key_by_key(tmp_path, capsys):
    sections = dict_sections()
    assert {"model.camera", "model.net", "model.optimizer", "model.scheduler", "model.benchmark",
            "model.augmentation", "data.train_poses", "data.val_poses", "data.test_poses",
            "data.train_curriculum", "data.split"} <= set(sections)
    base, overlay, expected = {}, {}, {}
    for name in sections:
        if name == "data.split":  # dict[str, list[int]]
            nested(base, name, {"train": [0, 1], "val": [2]})
            nested(overlay, name, {"val": [3]})
            expected[name] = {"train": [0, 1], "val": [3]}
            continue
        nested(base, name, {"kept": 1, "inner": {"kept": 2, "changed": 3}, "listed": [1, 2]})
        nested(overlay, name, {"inner": {"changed": 4}, "added": 5, "listed": [9]})
        expected[name] = {"kept": 1, "inner": {"kept": 2, "changed": 4}, "listed": [9],
                          "added": 5}
    printed = printed_config(capsys, "test", "--config", write(tmp_path / "base.yaml", base),
                             "--config", write(tmp_path / "overlay.yaml", overlay))
    wrong = {name: get(printed, name) for name in expected if get(printed, name) != expected[name]}
    assert not wrong, f"replaced instead of merged: {wrong}"


def test_an_overlay_of_one_benchmark_key_keeps_the_others(tmp_path, capsys):
    tiny = yaml.safe_load(open(resolve_config("tiny")))["model"]["benchmark"]
    overlay = write(tmp_path / "target.yaml", {"model": {"benchmark": {"target": {"blur_mm": 2.0}}}})
    printed = printed_config(capsys, "test", "--config", "tiny", "--config", overlay)
    assert printed["model"]["benchmark"] == {**tiny, "target": {"blur_mm": 2.0}}


def test_null_in_an_overlay_clears_a_section(tmp_path, capsys):
    overlay = write(tmp_path / "null.yaml", {"model": {"benchmark": None}})
    printed = printed_config(capsys, "test", "--config", "tiny", "--config", overlay)
    assert printed["model"]["benchmark"] is None


def test_interpolations_see_the_merged_config(tmp_path, capsys):
    base = write(tmp_path / "base.yaml", {"trainer": {"max_steps": 30}, "model": {
        "scheduler": {"name": "cosine", "T_max": "${trainer.max_steps}", "eta_min": 1.0e-5}}})
    overlay = write(tmp_path / "overlay.yaml", {"trainer": {"max_steps": 70},
                                                "model": {"scheduler": {"eta_min": 0.0}}})
    printed = printed_config(capsys, "fit", "--config", "tiny", "--config", base,
                             "--config", overlay)
    assert printed["model"]["scheduler"] == {"name": "cosine", "T_max": 70, "eta_min": 0.0}
    printed = printed_config(capsys, "fit", "--config", "tiny", "--config", base,
                             "--config", overlay, "--trainer.max_steps", "90")
    assert printed["model"]["scheduler"]["T_max"] == 90


def test_an_interpolation_of_a_missing_key_is_one_line(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", {"model": {"scheduler": {"name": "cosine",
                                                                "T_max": "${trainer.max_stepz}"}}})
    assert main(["fit", "--config", "tiny", "--config", bad, "--print_config"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("prostlab fit: error: ") and "trainer.max_stepz" in line, err[-2000:]


@pytest.mark.parametrize(("text", "got"), [("", "nothing (empty, or only comments)"),
                                           ("# only a comment\n", "nothing"),
                                           ("- trainer\n", "a list")])
def test_a_config_file_that_holds_no_mapping_is_one_line_naming_it(tmp_path, capsys, text, got):
    """An empty overlay said ``Unexpected config:`` and nothing more."""
    bad = tmp_path / "overlay.yaml"
    bad.write_text(text)
    assert main(["fit", "--config", "tiny", "--config", str(bad), "--print_config"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"prostlab fit: error: --config {bad}: holds {got}"), line
    assert "expected a YAML mapping of settings" in line


def test_the_shipped_overlays(capsys):
    cpu = yaml.safe_load(open(resolve_config("cpu")))

    def stacked(*names: str, command: str = "test") -> dict:
        argv = [command]
        for name in names:
            argv += ["--config", name]
        return printed_config(capsys, *argv)

    on_gpu = stacked("cpu", "cpu_on_gpu", command="fit")
    assert on_gpu["trainer"]["max_steps"] == 4000
    assert on_gpu["model"]["scheduler"] == {"name": "cosine", "T_max": 4000, "eta_min": 1.0e-5}
    assert on_gpu["data"]["train_curriculum"] == {"start": 0.25, "samples": 40000}
    assert on_gpu["trainer"]["logger"]["init_args"]["save_dir"] == "runs/cpu_on_gpu"
    assert on_gpu["model"]["benchmark"] == cpu["model"]["benchmark"]

    offsets = stacked("cpu", "prost_offsets")
    assert offsets["data"]["test_poses"] == {
        "ground_truth": {"preset": "prost"},
        "initial": {"kind": "normal", "rotation_deg": 8.0, "translation_mm": 22.0},
        "relative": True}
    assert offsets["data"]["train_poses"] == cpu["data"]["train_poses"]

    spine = stacked("cpu", "heldout_spine")
    assert spine["data"]["volumes"] == [{"prepared": "cache/spine_200"}]
    assert spine["data"]["test_poses"] == cpu["data"]["test_poses"]
    assert spine["model"]["benchmark"] == cpu["model"]["benchmark"]

    patients = stacked("cpu", "patients", command="fit")
    assert patients["model"]["scheduler"]["T_max"] == patients["trainer"]["max_steps"] == 6000
    assert patients["data"]["train_curriculum"] == {"start": 0.25, "samples": 2400}
    assert len(patients["data"]["volumes"]) == 5
    assert patients["model"]["augmentation"] == cpu["model"]["augmentation"]
