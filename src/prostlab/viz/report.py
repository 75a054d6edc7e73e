"""Figures of a registration benchmark: success against initial error, mTRE curves, overlays, GIFs.

The plots read the benchmark rows of :mod:`prostlab.benchmark` (one per case and method). They
draw on :class:`matplotlib.figure.Figure` objects directly (the Agg renderer; pyplot's global
state is not touched), so they work headless and in threads. Every function creates the parent
directories of ``path``, writes under a temporary name that is moved into place
(:func:`prostlab.outputs.atomic_path`) and returns the written :class:`~pathlib.Path`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from prostlab.benchmark.capture import (
    DEFAULT_BINS_MM,
    DEFAULT_CAPTURE_MIN_CASES,
    DEFAULT_CAPTURE_RATE,
    bin_edges,
    bin_index,
    bin_label,
    capture_range,
    success_by_bin,
)
from prostlab.benchmark.rows import is_failed, methods_in_order, validate_rows
from prostlab.benchmark.summary import check_threshold
from prostlab.errors import ProstlabError
from prostlab.metrics.functional import DEFAULT_SUCCESS_THRESHOLD_MM
from prostlab.outputs import atomic_path
from prostlab.viz.panels import overlay

__all__ = [
    "plot_mtre_cdf",
    "plot_success_vs_initial",
    "save_overlays",
    "save_registration_gif",
]

_DPI = 130
_GIF_MIN_SIDE = 256


def _colours(methods: Sequence[str]) -> dict[str, Any]:
    """One tab10 colour per method, by first-seen order, the same in every figure."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {method: cmap(k % 10) for k, method in enumerate(methods)}


def _target(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save_figure(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` to ``path`` via a temporary file (the format from the suffix, else PNG)."""
    path = _target(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix[1:].lower() or "png")
    return path


def _rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    rows = validate_rows(rows)
    if not rows:
        raise ProstlabError("rows: expected at least one benchmark row to plot, got none")
    return rows


def plot_success_vs_initial(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    threshold_mm: float = DEFAULT_SUCCESS_THRESHOLD_MM,
    bins: Sequence[float] = DEFAULT_BINS_MM,
    capture_rate: float = DEFAULT_CAPTURE_RATE,
    capture_min_cases: int = DEFAULT_CAPTURE_MIN_CASES,
) -> Path:
    """Success rate (%) per initial-mTRE bin, one curve per method: the capture-range figure.

    The bins are those of :func:`prostlab.benchmark.capture.success_by_bin` (``bins``: finite
    edges in mm; an open bin follows the last) and are drawn side by side, one slot each, since
    their widths differ. Empty bins leave a gap; empty bins past the last case are not drawn.
    Each tick reads the bin's range and its number of cases ``n`` (distinct cases: every method
    registers the same ones). Bins with fewer than ``capture_min_cases`` cases are hollow
    markers: they do not count for the capture range. A dashed line marks ``capture_rate``, and
    the legend gives each method's capture range (:func:`~prostlab.benchmark.capture_range`).
    """
    threshold_mm = check_threshold(threshold_mm)
    rows = _rows(rows)
    edges = bin_edges(bins, "bins")
    methods = methods_in_order(rows)
    colours = _colours(methods)
    per_method = {
        m: success_by_bin([r for r in rows if r["method"] == m], threshold_mm, edges)
        for m in methods
    }
    cases_in_bin: list[set[int]] = [set() for _ in range(len(edges))]
    for r in rows:
        k = bin_index(float(r["initial_mtre_mm"]), edges)
        if k is not None:
            cases_in_bin[k].add(int(r["case"]))
    shown = max((k + 1 for k, c in enumerate(cases_in_bin) if c), default=1)
    slots = np.arange(shown)

    fig = Figure(figsize=(max(6.4, 0.85 * shown + 1.5), 4.2), dpi=_DPI)
    ax = fig.add_subplot()
    ax.axhline(100.0 * capture_rate, color="0.4", ls="--", lw=1)
    for method in methods:
        counts = per_method[method][:shown]
        rate = np.array([100.0 * b["success_rate"] for b in counts])
        thin = np.array([b["n"] < capture_min_cases for b in counts])
        reach = capture_range(counts, capture_rate, capture_min_cases)
        label = f"{method}: capture " + ("–" if reach is None else f"{reach:g} mm")
        colour = colours[method]
        ax.plot(slots, rate, lw=1.8, color=colour, label=label)
        ax.plot(slots[~thin], rate[~thin], "o", ms=5, color=colour)
        ax.plot(slots[thin], rate[thin], "o", ms=5, mfc="white", color=colour)
    ax.set_xlim(-0.5, shown - 0.5)
    ax.set_ylim(-4, 104)
    lows, highs = edges.tolist(), [*edges[1:].tolist(), None]
    ax.set_xticks(slots)
    ax.set_xticklabels(
        [f"{bin_label(lows[k], highs[k])}\nn={len(cases_in_bin[k])}" for k in range(shown)],
        fontsize=8,
    )
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_xlabel("initial mTRE (mm), n = cases per bin")
    ax.set_ylabel(f"success rate (%), final mTRE < {threshold_mm:g} mm")
    ax.set_title(
        f"Capture range: success per initial-mTRE bin (dashed: {100 * capture_rate:g} %)",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="lower left", frameon=True)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_mtre_cdf(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    threshold_mm: float = DEFAULT_SUCCESS_THRESHOLD_MM,
) -> Path:
    """Cumulative distribution of the final mTRE per method, log mm axis, threshold marked.

    The y value at ``x`` is the percentage of *all* the method's cases whose final mTRE is at most
    ``x``; failed cases (status ``failed`` or non-finite mTRE) count as infinitely wrong, so such
    a curve ends below 100 %. The legend gives each method's success rate and failures.
    """
    threshold_mm = check_threshold(threshold_mm)
    rows = _rows(rows)
    methods = methods_in_order(rows)
    colours = _colours(methods)
    finals = {m: [] for m in methods}
    counts = dict.fromkeys(methods, 0)
    for row in rows:
        counts[row["method"]] += 1
        if not is_failed(row):
            finals[row["method"]].append(float(row["final_mtre_mm"]))
    positive = [v for vs in finals.values() for v in vs if v > 0] + [threshold_mm]
    lo, hi = min(positive) / 1.5, max(positive) * 1.5

    fig = Figure(figsize=(6.4, 4.2), dpi=_DPI)
    ax = fig.add_subplot()
    for method in methods:
        values = np.sort(np.clip(finals[method], lo, None))
        n = counts[method]
        fraction = 100.0 * np.arange(1, len(values) + 1) / n
        x = np.concatenate(([lo], values, [hi]))
        y = np.concatenate(([0.0], fraction, [fraction[-1] if len(values) else 0.0]))
        success = 100.0 * sum(v < threshold_mm for v in finals[method]) / n
        failed = n - len(finals[method])
        label = f"{method}: {success:.0f} % < {threshold_mm:g} mm" + (
            f", {failed} failed" if failed else ""
        )
        ax.step(x, y, where="post", lw=1.8, color=colours[method], label=label)
    ax.axvline(threshold_mm, color="0.3", ls="--", lw=1)
    ax.annotate(
        f"{threshold_mm:g} mm",
        (threshold_mm, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(3, -3),
        textcoords="offset points",
        va="top",
        fontsize=8,
        color="0.3",
    )
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 102)
    ax.grid(True, which="both", alpha=0.25)
    ax.set_xlabel("final mTRE (mm, log scale)")
    ax.set_ylabel("cases with final mTRE ≤ x (%)")
    ax.set_title("Cumulative distribution of the final mTRE", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save_figure(fig, path)


def _image(value: Any, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A (H, W) float tensor from an array or tensor; ``shape`` must match when given."""
    try:
        image = torch.as_tensor(
            value.detach().cpu() if isinstance(value, torch.Tensor) else np.asarray(value)
        )
    except (TypeError, ValueError, RuntimeError) as err:
        raise ProstlabError(
            f"{name}: expected a (H, W) image array or tensor, got {type(value).__name__}"
        ) from err
    image = image.squeeze() if image.ndim > 2 else image
    if image.ndim != 2 or (shape is not None and tuple(image.shape) != shape):
        want = f"shape {shape}" if shape is not None else "a (H, W) image"
        raise ProstlabError(f"{name}: expected {want}, got shape {tuple(image.shape)}")
    return image.float()


def save_overlays(panels: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """A grid of registrations: one row per case, columns target | initial | final overlay.

    Each panel is ``{"title": str, "target": (H, W), "initial": (H, W), "final": (H, W)}`` (arrays
    or tensors; a leading ``(1, 1)`` is squeezed); ``initial`` and ``final`` are the moving DRRs at
    the initial and final poses. The overlays are :func:`prostlab.viz.panels.overlay`: the target
    in magenta, the DRR in green, so aligned anatomy turns grey.
    """
    if isinstance(panels, Mapping) or not isinstance(panels, Sequence) or not panels:
        raise ProstlabError(
            "panels: expected a non-empty list of dicts with keys title, target, initial, final"
        )
    checked = []
    for i, p in enumerate(panels):
        if not isinstance(p, Mapping):
            raise ProstlabError(f"panels[{i}]: expected a dict, got {type(p).__name__}")
        for key in ("title", "target", "initial", "final"):
            if key not in p:
                raise ProstlabError(
                    f"panels[{i}]: missing key {key!r}; expected title, target, initial, final"
                )
        target = _image(p["target"], f"panels[{i}].target")
        shape = tuple(target.shape)
        initial = _image(p["initial"], f"panels[{i}].initial", shape)
        final = _image(p["final"], f"panels[{i}].final", shape)
        checked.append((str(p["title"]), target, initial, final))

    side = 2.3
    fig = Figure(figsize=(3 * side, len(checked) * side + 0.5), dpi=_DPI, layout="compressed")
    axes = fig.subplots(len(checked), 3, squeeze=False)
    columns = ("target", "initial pose", "final pose")
    for r, (title, target, initial, final) in enumerate(checked):
        images = (target.numpy(), overlay(target, initial), overlay(target, final))
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(image, cmap="gray" if c == 0 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
        axes[r][0].set_ylabel(title, fontsize=8)
    fig.suptitle("overlays: target magenta, DRR green; aligned anatomy turns grey", fontsize=8)
    return _save_figure(fig, path)


def _caption_font(points: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font at ``points`` px where this Pillow can scale it (FreeType, >= 10.1)."""
    try:
        return ImageFont.load_default(size=points)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def save_registration_gif(
    frames: Any,
    target: Any,
    path: str | Path,
    fps: float = 10,
    titles: Sequence[str] | None = None,
) -> Path:
    """An animated GIF of a registration: each frame overlays a moving DRR on the target.

    Args:
        frames: ``(T, H, W)`` moving DRRs over the iterations (array or tensor).
        target: ``(H, W)`` target image.
        path: where to write the GIF.
        fps: frames per second (GIF delays are whole hundredths of a second).
        titles: optional ``T`` captions (e.g. ``"it 40  mTRE 3.2 mm"``), drawn in a black bar
            under each frame with PIL's default font.

    Each frame is :func:`prostlab.viz.panels.overlay` (target magenta, DRR green), scaled up by
    a whole factor with nearest-neighbour so that its short side is at least 256 px. The GIF
    loops forever. GIF writers merge consecutive identical frames into one longer frame, so a
    registration that stood still can give fewer than ``T`` frames.
    """
    target_image = _image(target, "target")
    try:
        stack = torch.as_tensor(
            frames.detach().cpu() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        )
    except (TypeError, ValueError, RuntimeError) as err:
        raise ProstlabError(
            f"frames: expected a (T, H, W) array or tensor, got {type(frames).__name__}"
        ) from err
    if stack.ndim != 3 or tuple(stack.shape[1:]) != tuple(target_image.shape) or stack.shape[0] < 1:
        raise ProstlabError(
            f"frames: expected shape (T, {target_image.shape[0]}, {target_image.shape[1]}) with "
            f"T >= 1 to match target, got {tuple(stack.shape)}"
        )
    if (
        isinstance(fps, bool)
        or not isinstance(fps, (int, float))
        or not (fps > 0 and math.isfinite(fps))
    ):
        raise ProstlabError(f"fps: expected a positive number of frames per second, got {fps!r}")
    count = stack.shape[0]
    if titles is not None and (
        isinstance(titles, str) or not isinstance(titles, Sequence) or len(titles) != count
    ):
        got = f"{len(titles)}" if isinstance(titles, Sequence) else repr(titles)
        raise ProstlabError(
            f"titles: expected a list of {count} captions, one per frame, got {got}"
        )
    height, width = target_image.shape
    scale = max(1, math.ceil(_GIF_MIN_SIDE / min(height, width)))
    size = (width * scale, height * scale)
    font = _caption_font(max(12, size[0] // 20))
    bar = 0
    if titles is not None:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        bar = max(probe.textbbox((0, 0), str(t) or " ", font=font)[3] for t in titles) + 8

    images = []
    for k in range(count):
        rgb = (overlay(target_image, stack[k].float()) * 255).round().astype(np.uint8)
        image = Image.fromarray(rgb).resize(size, Image.Resampling.NEAREST)
        if titles is not None:
            canvas = Image.new("RGB", (size[0], size[1] + bar), (0, 0, 0))
            canvas.paste(image, (0, 0))
            ImageDraw.Draw(canvas).text(
                (6, size[1] + 4), str(titles[k]), fill=(255, 255, 255), font=font
            )
            image = canvas
        images.append(image)
    path = _target(path)
    with atomic_path(path) as tmp:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=max(10, round(1000 / fps)),
            loop=0,
        )
    return path
