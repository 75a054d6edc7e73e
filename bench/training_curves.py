"""Training curves of one or more `prostlab fit` runs from their CSV logs (``metrics.csv``).

    python bench/training_curves.py --run full=PATH/metrics.csv --run noaug=PATH/metrics.csv \
        --out checkpoints/training/curves.png

Left: the training loss (geodesic-gradient loss, 0 ideal, 4 random), a running mean over 10
logged points; middle: the validation loss; right: the validation convex fraction (the share of
held-out cases whose descent direction points towards the truth in rotation and translation).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``column -> [(step, value)]`` of a Lightning CSVLogger file, empty cells skipped."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key not in ("step", "epoch") and value:
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def running_mean(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1): i + 1]
        out.append(sum(part) / len(part))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="NAME=CSV")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (("train/loss", "training loss (running mean)"), ("val/loss", "validation loss"),
              ("val/convex_fraction", "validation convex fraction"))
    for spec in args.run:
        name, path = spec.split("=", 1)
        series = read(Path(path))
        for ax, (key, title) in zip(axes, panels, strict=True):
            if key not in series:
                continue
            steps, values = zip(*series[key], strict=True)
            if key == "train/loss":
                values = running_mean(list(values), 10)
            ax.plot(steps, values, label=name, marker="" if key == "train/loss" else "o", ms=3)
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[2].set_ylim(0, 1)
    axes[0].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
