"""Training steps per second on the CPU, today's step beside the step before issue 20's changes.

    python bench/training.py [--configs configs/cpu.yaml] [--steps 7] [--threads 1 2]
                             [--batch 2 4] [--checkpoint checkpoints/prost_cpu_chest.ckpt]
                             [--device cuda]

For each config, thread count and batch: build the module and the DataModule from its model and
data sections, then time one training step as ``prostlab fit`` runs it (a batch of training
cases, the augmentation of the volume and target at that step, the geodesic-gradient loss with
its double backward through the projector, the backward into the network, an optimiser step) on
two paths, alternating step by step in one process after one warm-up each:

- ``before``: every gradient the projector's inputs require (:func:`every_gradient`), the
  lifting CNN's dense convolutions and the whole lifted volume projected (``bone_only =
  False``), ``loss.backward()`` into every leaf, and on the CPU the ``cpu`` backend built from
  ``kernels/`` as of ``--before-kernels`` (git revision, default 76d00cd: before the kernels'
  unrolled loops and vector lanes): the step as it was before issue 20;
- ``now``: the code as it is.

Both paths run the same cases and augmentations (a new batch every step) with the same network
(the optimiser's learning rate is 0). Reported: medians of wall and CPU time per
step, cases per second, the speed-up (before / now, from the medians), the largest difference
between the two paths' losses on the same batch (they compute the same thing), and the
projector's share of a ``now`` step (torch's profiler over one more step). A benchmark, not a
test: numbers depend on the machine and its load (printed beside them).

With ``--checkpoint``, the trained network's validation convexity (as ``prostlab fit``
validates: the fraction of the first config's validation cases whose pose gradient points
towards the ground truth in rotation and in translation, and the mean cosines) on each path,
and the largest relative difference between the two paths' pose gradients.

``--device cuda`` runs both on a GPU (the CUDA kernels; lift and projection are dense there on
both paths, so "before" differs by the pruned gradients only), each step timed to its last
kernel.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    load_average,
    machine_facts,
    markdown_table,
    measure_call,
    median,
)
from kernel_builds import kernels_at  # noqa: E402
from prostlab.data import PoseDataModule  # noqa: E402
from prostlab.geometry import geodesic_gradient  # noqa: E402
from prostlab.lightning.augment import TrainingAugmentation  # noqa: E402
from prostlab.lightning.checkpoint import load_net_weights  # noqa: E402
from prostlab.lightning.training import ConvexSimilarityModule  # noqa: E402
from prostlab.lightning.volume_bank import VolumeBank  # noqa: E402
from prostlab.projector import projector as projector_module  # noqa: E402
from prostlab.projector.autograd import every_gradient  # noqa: E402
from prostlab.projector.backends.cpu_kernels import CpuKernelBackend  # noqa: E402
from prostlab.similarity import pose_gradient  # noqa: E402

PROJECTOR_EVENTS = ("_Project", "_ProjectBackward", "_ProjectVJPBackward")
PATHS = ("before", "now")


class _Module(ConvexSimilarityModule):
    """The module with a step counter of its own (no trainer), which keys the augmentation."""

    step = 0

    @property
    def global_step(self) -> int:
        return self.step


def build(config_path: str, batch: int | None, device: torch.device):
    config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    model_args = {k: v for k, v in config["model"].items() if k != "validation_registration"}
    module = _Module(**model_args)
    data = PoseDataModule(**{**config["data"], **({"batch_size": batch} if batch else {})})
    data.setup("fit")
    module.volumes = VolumeBank(data.prepared)
    if module.hparams.augmentation is not None:
        module.augmentation = TrainingAugmentation(module.hparams.augmentation, data.seed)
    # lr 0: every step costs what a step costs, and both paths see the same network.
    optimizer = torch.optim.SGD(module.net.parameters(), lr=0.0)
    return module.to(device), optimizer, data.dataset("train"), data.batch_size


def collate(cases, device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in default_collate(list(cases)).items()}


BEFORE_KERNELS: CpuKernelBackend | None = None
"""The "before" path's kernels on the CPU (``--before-kernels``); None: today's."""


@contextmanager
def on_path(path: str):
    """Run the projector as ``path`` does: "now" as it is; "before" with every gradient and,
    on CPU tensors, :data:`BEFORE_KERNELS` in place of the backend ``auto`` would pick."""
    if path == "now":
        yield
        return
    resolve = projector_module.resolve_backend

    def before(name, device, max_samples):
        if BEFORE_KERNELS is not None and device.type == "cpu":
            return BEFORE_KERNELS
        return resolve(name, device, max_samples)

    with every_gradient(), mock.patch.object(projector_module, "resolve_backend", before):
        yield


def training_step(module, optimizer, cases, path: str) -> float:
    """One step on ``path`` ("before" or "now"); the loss."""
    module.net.bone_only = path == "now"
    with on_path(path):
        optimizer.zero_grad()
        loss = module.case_losses(cases, augment=True).mean()
        if path == "before":
            loss.backward()
        else:
            module.backward(loss)
        optimizer.step()
    return float(loss.detach())


def convexity(config: str, checkpoint: str, device: torch.device) -> list[list[str]]:
    """The validation convexity of ``checkpoint``'s network on each path (module docstring)."""
    module, _, _, _ = build(config, None, device)
    load_net_weights(module.net, checkpoint)
    data = PoseDataModule(**OmegaConf.to_container(OmegaConf.load(config), resolve=True)["data"])
    data.setup("fit")
    cases = collate(data.dataset("val"), device)
    gradients = {}
    rows = []
    for path in PATHS:
        module.net.bone_only = path == "now"
        for metric in (module.val_convex, module.val_cos_rot, module.val_cos_trans):
            metric.reset()
        with on_path(path):
            parts = []
            for view, sel in module.volumes.groups(cases["volume_index"]):
                gt, current = cases["gt_pose"][sel], cases["initial_pose"][sel]
                target = module.targets(view, gt)
                _, g = pose_gradient(
                    lambda pose, v=view, t=target: module.net(v.bone, v.spacing, pose, t), current
                )
                module._convexity(g, geodesic_gradient(current, gt))
                parts.append(g)
        gradients[path] = torch.cat(parts)
        rows.append([config, path, str(len(gradients[path])),
                     f"{float(module.val_convex.compute()):.4f}",
                     f"{float(module.val_cos_rot.compute()):.5f}",
                     f"{float(module.val_cos_trans.compute()):.5f}"])
    before, now = gradients["before"], gradients["now"]
    change = float(((before - now).norm(dim=1) / before.norm(dim=1)).max())
    for row in rows:
        row.append(f"{change:.1e}")
    return rows


def measure(config: str, threads: int, batch: int | None, steps: int,
            device: torch.device) -> list[str]:
    torch.set_num_threads(threads)
    module, optimizer, dataset, batch = build(config, batch, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    batches = iter(range(10**6))
    pending = {}

    def run(path: str) -> None:
        if path == PATHS[0]:  # "before" draws the batch and "now" runs the same one
            module.step = next(batches)
            pending.clear()
            pending["cases"] = collate(
                (dataset[module.step * batch + i] for i in range(batch)), device
            )
        pending[path] = training_step(module, optimizer, pending["cases"], path)
        if len(pending) == 3:
            differences.append(abs(pending["before"] - pending["now"]))

    differences: list[float] = []
    timings = {path: {"wall_ms": [], "cpu_ms": []} for path in PATHS}
    for path in PATHS:
        run(path)  # warm-up
    for _ in range(steps):
        for path in PATHS:
            one = measure_call(lambda path=path: run(path), warmup=0, repeats=1, sync=sync)
            for key in one:
                timings[path][key] += one[key]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        training_step(module, optimizer, pending["cases"], "now")
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    projector = sum(e.cpu_time_total for e in events if e.key in PROJECTOR_EVENTS)
    wall = {path: median(timings[path]["wall_ms"]) / 1e3 for path in PATHS}
    cpu = {path: median(timings[path]["cpu_ms"]) / 1e3 for path in PATHS}
    return [
        config,
        str(threads),
        str(batch),
        f"{wall['before']:.2f} / {wall['now']:.2f}",
        f"{cpu['before']:.2f} / {cpu['now']:.2f}",
        f"{batch / wall['before']:.1f} / {batch / wall['now']:.1f}",
        f"{wall['before'] / wall['now']:.1f}×",
        f"{cpu['before'] / cpu['now']:.1f}×",
        f"{max(differences):.1e}",
        f"{100 * projector / total:.0f} %",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["configs/cpu.yaml"])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--batch", type=int, nargs="+", default=[0],
                        help="batch sizes (0: the config's)")
    parser.add_argument("--checkpoint", help="a trained network: its validation convexity on "
                        "both paths, on the first config's validation cases")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the CUDA kernels")
    parser.add_argument("--before-kernels", default="76d00cd",
                        help="git revision whose kernels/ the before path runs on the CPU "
                        "(\"now\": today's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    global BEFORE_KERNELS
    if device.type == "cpu" and args.before_kernels != "now":
        BEFORE_KERNELS = kernels_at(args.before_kernels)
    if args.checkpoint:
        print(markdown_table(
            ["config", "path", "cases", "convex fraction", "mean cos (rotation)",
             "mean cos (translation)", "max relative pose-gradient difference"],
            convexity(args.configs[0], args.checkpoint, device),
        ) + "\n", flush=True)
    rows = []
    for config in args.configs:
        for threads in args.threads:
            for batch in args.batch:
                rows.append(measure(config, threads, batch or None, args.steps, device))
                print(rows[-1], f"load {load_average()}", flush=True)
    print(f"\nmachine: {machine_facts()}\nload average: {load_average()}\n")
    print(
        markdown_table(
            [
                "config",
                "threads",
                "batch",
                "s / step, before / now (median wall)",
                "CPU s / step, before / now",
                "cases / s, before / now",
                "speed-up (wall)",
                "speed-up (CPU)",
                "max |loss before - now|",
                "projector share (now)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
