"""How much realistic targets change registration: the inverse crime, then a finer CT, noise, blur.

    python bench/target_realism.py [--config configs/cpu.yaml] [--cases 10] [--max-iterations 200]
        [--methods gradncc ncc] [--out bench/results/target_realism.md]

Four variants of ``model.benchmark.target``, each adding one departure from the moving image:

1. inverse crime: the target is the moving CT's own DRR (``volume: ct``, the model's step);
2. fine volume: the CT before ``data.downsample``, at the config's ``target.step_mm``;
3. + noise: and Poisson noise at the config's ``target.photons``;
4. + blur: and the detector blur of the config's ``target.blur_mm`` (the shipped setting).

Each variant is one ``prostlab test`` run in a fresh process on the config, with only the
methods named by ``--methods`` (image similarities render the whole CT), the first ``--cases`` test cases of the
config's seed in one batch (every variant registers the same cases from the same starts), and
every schedule capped at ``--max-iterations``. Besides each run's success, final mTRE and mPD,
the table gives how far the targets are from the image the methods render at the truth: the mean
NCC between each target and the moving CT's DRR at the ground-truth pose (1 for the inverse
crime).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, fmt, load_average, machine_facts, markdown_table  # noqa: E402
from prostlab.data import PoseDataModule  # noqa: E402
from prostlab.geometry import Camera  # noqa: E402
from prostlab.lightning.targets import TargetConfig, render_targets  # noqa: E402
from prostlab.lightning.volume_bank import VolumeBank  # noqa: E402
from prostlab.projector import Projector  # noqa: E402


def variants(shipped: dict) -> list[tuple[str, dict]]:
    """The four target settings, each adding one departure to the one before."""
    fine = {"volume": "fine", "step_mm": shipped.get("step_mm")}
    noisy = {**fine, "photons": shipped.get("photons")}
    return [
        ("inverse crime", {"volume": "ct"}),
        ("fine volume", fine),
        ("+ noise", noisy),
        ("+ blur", {**noisy, "blur_mm": shipped.get("blur_mm", 0.0)}),
    ]


def target_ncc(config: dict, target: dict, cases: int) -> float:
    """Mean NCC, over the first ``cases`` test cases, of the target and the moving CT's DRR."""
    model, data = config["model"], dict(config.get("data", {}))
    datamodule = PoseDataModule(
        downsample=data.get("downsample", 1), test_poses=data.get("test_poses"),
        test_samples=cases, seed=config.get("seed_everything", 0),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datamodule.setup()
    bank = VolumeBank(datamodule.prepared)
    made = TargetConfig.from_config(target)
    if made.volume == "fine":
        bank.keep_fine(datamodule.full_resolution_cts(datamodule.split["test"]))
    projector = Projector(Camera.from_dict(model["camera"]), step=model.get("step", 1.75),
                          backend=model.get("backend", "auto"))
    values = []
    dataset = datamodule.dataset("test")
    for i in range(cases):
        case = dataset[i]
        view, gt = bank[case["volume_index"]], case["gt_pose"][None]
        image = render_targets(made, projector, view, gt, torch.tensor([i]), datamodule.seed)
        with torch.no_grad():
            moving = projector(view.ct, view.spacing, gt)
        a, b = image.flatten() - image.mean(), moving.flatten() - moving.mean()
        values.append(float(a @ b / (a.norm() * b.norm())))
    return sum(values) / len(values)


def run_variant(args, config: dict, name: str, target: dict, folder: Path) -> dict:
    """One ``prostlab test`` run; returns its summary.json and wall time."""
    bench = dict(config["model"].get("benchmark") or {})
    methods = bench.get("methods") or {}
    bench.update(
        methods={m: methods.get(m, m) for m in args.methods},
        target=target, max_iterations=args.max_iterations, output_dir=str(folder),
        run_name="run", overlays=0, gif_case=None,
    )
    overlay = folder / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"benchmark": bench}}))
    command = [
        sys.executable, "-m", "prostlab.cli", "test", "--config", str(args.config),
        "--config", str(overlay), "--data.test_samples", str(args.cases),
        "--data.batch_size", str(args.cases), "--trainer.logger", "false",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name}: prostlab test failed:\n{done.stderr[-3000:]}")
    summary = json.loads(next(folder.rglob("summary.json")).read_text())
    return {"summary": summary, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "cpu.yaml")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--max-iterations", type=int, default=200)
    parser.add_argument("--methods", nargs="+", default=["gradncc", "ncc"])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" /
                        "target_realism.md")
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())
    shipped = (config["model"].get("benchmark") or {}).get("target") or {}
    facts, load_start = machine_facts(), load_average()
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, target) in enumerate(variants(shipped)):
            folder = Path(tmp) / f"variant{k}"
            folder.mkdir()
            ncc = target_ncc(config, target, args.cases)
            result = run_variant(args, config, name, target, folder)
            print(f"{name}: {result['seconds']:.0f} s", file=sys.stderr)
            for method, s in result["summary"]["methods"].items():
                table.append([
                    name, json.dumps(target).replace('"', ""), f"{ncc:.4f}", method,
                    f"{s['n_success']}/{s['n_cases']}",
                    fmt(s["median_final_mtre_mm"], 2), fmt(s["median_final_mpd_mm"], 2),
                    fmt(s["median_final_rotation_error_deg"], 2),
                    fmt(s["median_iterations"], 0), fmt(s["median_seconds"], 1),
                ])
    headers = ["targets", "model.benchmark.target", "NCC(target, moving DRR) at truth",
               "method", "success (mTRE < 10 mm)", "median mTRE (mm)", "median mPD (mm)",
               "median rot. error (deg)", "median iterations",
               f"median s to stop (batch of {args.cases})"]
    text = "\n".join([
        f"- date: {facts['date']}; machine: {facts['cpu']}, {facts['cores']} cores (shared with "
        f"other jobs), torch {facts['torch']}; commit {facts['commit']}",
        f"- command: `python bench/target_realism.py --config {args.config.relative_to(REPO)} "
        f"--cases {args.cases} --max-iterations {args.max_iterations} "
        f"--methods {' '.join(args.methods)}`",
        f"- load average at the start: {load_start}, at the end: {load_average()}",
        "",
        markdown_table(headers, table),
        "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
