"""What the ``cpu`` backend's fixed-order sums cost, against the atomics they replaced.

    python bench/determinism.py [--volumes full 256 128] [--detectors 128 256]
        [--passes fwd+bwd fwd+bwd+2nd] [--rounds 7] [--threads 2] [--out FILE]

On the volumes, cameras and poses of ``bench/projector.py`` (``make_call``), each case is timed in
one process in both modes of the same build: ``atomic`` (the kernels' ``atomicAdd`` into shared
sums, blocks taken as threads come free: how the backend summed before issue 22) and ``fixed``
(pose gradients in slots of 32 rays summed in a fixed tree, the volume gradient in one copy per
thread, blocks dealt round robin; prost_common.cuh, "the reductions"). The modes alternate call
by call after warm-up calls in both (enough for the layout choice to settle), so that other jobs
on a shared machine slow both alike; the table gives the median wall and CPU times of each mode
and the median of the per-round ratios fixed / atomic.

``fwd+bwd`` differentiates the pose only (what a registration does); ``fwd+bwd+2nd`` the pose
and the volume, twice (a training step), which also exercises the volume gradient's copies.
Each case also says whether three repeated gradients of each mode were bit-identical.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, machine_facts, markdown_table, measure_call, median  # noqa: E402
from projector import DEFAULT_CT, load_volumes, make_call  # noqa: E402

MODES = ("atomic", "fixed")
WARMUP = 5


def set_mode(backend, mode: str) -> None:
    backend._deterministic = mode == "fixed"


def gradients(volume: dict, pixels: int, pose: str, mode: str):
    """The pose (and volume) gradient of one ``mode`` pass, as ``make_call`` computes it."""
    import torch

    from projector import POSES, make_renderer

    render = make_renderer("prostlab-cpu", volume, pixels, 1)
    target = torch.randn(1, 1, pixels, pixels, generator=torch.Generator().manual_seed(0))
    p = torch.tensor([POSES[pose]], dtype=torch.float32, requires_grad=True)
    if mode == "fwd+bwd":
        (render(volume["volume"], p) * target).sum().backward()
        return (p.grad,)
    v = volume["volume"].clone().requires_grad_()
    (g,) = torch.autograd.grad((render(v, p) * target).sum(), p, create_graph=True)
    (g ** 2).sum().backward()
    return p.grad, v.grad


def run_case(backend, volume: dict, pixels: int, pose: str, mode: str, rounds: int) -> dict:
    call = make_call("prostlab-cpu", mode, volume, pixels, pose, 1, None)
    times = {m: {"wall_ms": [], "cpu_ms": []} for m in MODES}
    for m in MODES:
        set_mode(backend, m)
        measure_call(call, warmup=WARMUP, repeats=0)
    for i in range(rounds):
        for m in (MODES if i % 2 == 0 else MODES[::-1]):
            set_mode(backend, m)
            one = measure_call(call, warmup=0, repeats=1)
            for key in one:
                times[m][key] += one[key]
    repeatable = {}
    for m in MODES:
        set_mode(backend, m)
        runs = [gradients(volume, pixels, pose, mode) for _ in range(3)]
        repeatable[m] = all(a.equal(b) for run in runs[1:] for a, b in zip(runs[0], run, strict=True))
    set_mode(backend, "fixed")
    ratios = [f / a for f, a in zip(times["fixed"]["wall_ms"], times["atomic"]["wall_ms"], strict=True)]
    cpu_ratios = [f / a for f, a in zip(times["fixed"]["cpu_ms"], times["atomic"]["cpu_ms"], strict=True)]
    return {m: {k: median(v) for k, v in times[m].items()} for m in MODES} | {
        "ratio": median(ratios), "cpu_ratio": median(cpu_ratios), "repeatable": repeatable}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", nargs="+", default=["128", "256", "full"])
    parser.add_argument("--ct", type=Path, default=DEFAULT_CT)
    parser.add_argument("--detectors", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--poses", nargs="+", default=["identity"])
    parser.add_argument("--passes", nargs="+", default=["fwd+bwd", "fwd+bwd+2nd"])
    parser.add_argument("--rounds", type=int, default=7, help="timed calls of each mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)

    import torch

    from prostlab.projector.backends.cpu_kernels import cpu_backend

    torch.set_num_threads(args.threads)
    backend = cpu_backend()
    volumes, skipped = load_volumes(args.volumes, args.ct)
    facts = machine_facts()
    rows = []
    for name, volume in volumes.items():
        for pixels in args.detectors:
            for pose in args.poses:
                for mode in args.passes:
                    r = run_case(backend, volume, pixels, pose, mode, args.rounds)
                    rows.append([name, f"{pixels}²", pose, mode,
                                 f"{r['atomic']['wall_ms']:.1f}", f"{r['fixed']['wall_ms']:.1f}",
                                 f"{r['ratio']:.3f}",
                                 f"{r['atomic']['cpu_ms']:.1f}", f"{r['fixed']['cpu_ms']:.1f}",
                                 f"{r['cpu_ratio']:.3f}",
                                 "yes" if r["repeatable"]["atomic"] else "no",
                                 "yes" if r["repeatable"]["fixed"] else "no"])
                    print(" | ".join(rows[-1]), flush=True)
    text = "\n".join([
        f"{facts['date']}, {facts['cpu']}, {args.threads} threads, commit {facts['commit']}, "
        f"torch {facts['torch']}, load average {load_average()}; {args.rounds} alternating "
        f"rounds after {WARMUP} warm-up calls of each mode",
        "",
        markdown_table(
            ["volume", "detector", "pose", "pass", "atomic ms", "fixed ms", "fixed/atomic",
             "atomic CPU ms", "fixed CPU ms", "CPU fixed/atomic", "atomic repeats",
             "fixed repeats"], rows),
        *[f"\n{name}: skipped ({why})" for name, why in skipped.items()],
    ])
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
