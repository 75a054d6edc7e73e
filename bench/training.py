"""Training steps per second on the CPU, peak memory, and the projector's share of a step.

    python bench/training.py [--configs configs/cpu.yaml configs/pelvis.yaml] [--steps 4]

For each config: build the module and the DataModule from its model and data sections, then
time ``steps`` training steps (forward, the geodesic-gradient loss with its double backward
through the projector, backward, optimiser step) after one warm-up, and report the median.
The projector's share is measured with torch's profiler over one more step: the CPU time of the
projector's autograd functions (forward, backward, double backward) over the step's total.
A benchmark, not a test: numbers depend on the machine and its load (printed beside them).
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).parent))
from _common import load_average, machine_facts, markdown_table, measure_call, median  # noqa: E402
from prostlab.data import PoseDataModule  # noqa: E402
from prostlab.lightning.training import ConvexSimilarityModule  # noqa: E402
from prostlab.lightning.volume_bank import VolumeBank  # noqa: E402

PROJECTOR_EVENTS = ("_Project", "_ProjectBackward", "_ProjectVJPBackward")


def build(config_path: str):
    config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    model_args = {k: v for k, v in config["model"].items() if k != "validation_registration"}
    module = ConvexSimilarityModule(**model_args)
    data = PoseDataModule(**config["data"])
    data.setup("fit")
    module.volumes = VolumeBank(data.prepared)
    optimizer = torch.optim.SGD(module.net.parameters(), lr=1e-6)
    dataset = data.dataset("train")
    return module, optimizer, dataset, data.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["configs/cpu.yaml", "configs/pelvis.yaml"])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    rows = []
    for config in args.configs:
        module, optimizer, dataset, batch = build(config)
        cursor = iter(range(10**6))

        def step(module=module, optimizer=optimizer, dataset=dataset, batch=batch, cursor=cursor):
            cases = default_collate([dataset[next(cursor)] for _ in range(batch)])
            optimizer.zero_grad()
            module.case_losses(cases).mean().backward()
            optimizer.step()

        timing = measure_call(step, warmup=1, repeats=args.steps)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        projector = sum(e.cpu_time_total for e in events if e.key in PROJECTOR_EVENTS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        wall = median(timing["wall_ms"]) / 1e3
        rows.append(
            [
                config,
                module.hparams.backend,
                batch,
                f"{wall:.2f}",
                f"{1 / wall:.2f}",
                f"{median(timing['cpu_ms']) / 1e3:.2f}",
                f"{100 * projector / total:.0f} %",
                f"{peak:.0f}",
            ]
        )
        print(rows[-1], flush=True)
    facts = machine_facts()
    print(f"\nmachine: {facts}\nload average: {load_average()}\n")
    print(
        markdown_table(
            [
                "config",
                "backend",
                "batch",
                "s / step (median)",
                "steps / s",
                "CPU s / step",
                "projector share",
                "peak RSS MiB (process)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
