"""Write DRRs as images a person can look at."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from prostlab.outputs import atomic_path  # noqa: E402


def save_drr_png(
    path: str | Path, image: np.ndarray, colorbar: bool = False, title: str | None = None
) -> Path:
    """Save a (H, W) line-integral image as a grey PNG; with ``colorbar``, a labelled figure.

    The file is written under a temporary name and moved into place.
    """
    path = Path(path)
    if not colorbar:
        with atomic_path(path) as tmp:
            plt.imsave(tmp, image, cmap="gray", format="png")
        return path
    fig, ax = plt.subplots(figsize=(5, 4.2), dpi=120)
    shown = ax.imshow(image, cmap="gray")
    fig.colorbar(shown, ax=ax, label="line integral of mu (dimensionless)")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
