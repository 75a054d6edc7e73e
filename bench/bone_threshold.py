"""Bones without labels, measured: Dice of the thresholded bone mask with a label map's bones.

    python bench/bone_threshold.py [--ct ../shared/data/chest_ct/ct.nii.gz]
        [--labels ../shared/data/chest_ct/labels.nii.gz] [--bone-hu 100 150 200 250]
        [--patients data/chest_ct_128 cache/patients/*] [--out bench/results/bone_threshold]

For each ``--bone-hu`` (the other settings at :class:`BoneThreshold`'s defaults, and once with a
plain threshold: no seeds, no growth, no filling), on the CT's own grid after reorientation to
LIP: the Dice of :func:`threshold_bones`'s mask with the label map's ``bones`` preset, the
voxels it adds and misses, and which labelled structures the added voxels fall in (the five
largest). Writes ``summary.md`` and ``dice.png``: coronal and axial slices with the labelled
bones and the thresholded ones, and, with ``--patients`` (prepared folders, e.g. those of
``make patients``), the AP projections of each one's bones beside its whole CT.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_facts, markdown_table  # noqa: E402
from prostlab.csv_table import csv_rows  # noqa: E402
from prostlab.data import load_image, load_prepared  # noqa: E402
from prostlab.data.bone_threshold import BoneThreshold, dice, threshold_bones  # noqa: E402
from prostlab.data.intensity import FOV_FILL_BELOW, HU_AIR, fill_outside_fov  # noqa: E402
from prostlab.data.labels import bone_ids  # noqa: E402
from prostlab.data.orientation import PREPARED_ORIENTATION, reorient  # noqa: E402
from prostlab.data.volume import spacing_of  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_ct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct", default=str(SHARED / "ct.nii.gz"))
    parser.add_argument("--labels", default=str(SHARED / "labels.nii.gz"))
    parser.add_argument("--bone-hu", type=float, nargs="+", default=[100.0, 150.0, 200.0, 250.0])
    parser.add_argument("--patients", nargs="*", default=[], help="prepared folders to show")
    parser.add_argument("--out", default="bench/results/bone_threshold")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    hu, affine = load_image(args.ct)
    labels, labels_affine = load_image(args.labels, dtype=np.int32)
    hu, lip_affine = reorient(hu, affine, PREPARED_ORIENTATION)
    labels, _ = reorient(labels, labels_affine, PREPARED_ORIENTATION)
    hu = fill_outside_fov(hu, below=FOV_FILL_BELOW, value=HU_AIR)
    table = Path(args.labels).parent / "structures.csv"
    truth = np.isin(labels, bone_ids("bones", table))
    names = {int(row["id"]): row["structure"] for _, row in csv_rows(table, ("structure", "id"))}
    spacing = spacing_of(lip_affine)

    settings = [("plain threshold 150 HU", None)] + [
        (f"threshold_bones, bone_hu {b:g}", BoneThreshold(bone_hu=b)) for b in args.bone_hu
    ]
    rows, masks = [], {}
    for name, setting in settings:
        start = time.perf_counter()
        mask = (hu >= 150.0) if setting is None else threshold_bones(hu, spacing, setting)
        seconds = time.perf_counter() - start
        added = mask & ~truth
        ids, counts = np.unique(labels[added], return_counts=True)
        where = ", ".join(f"{names.get(int(i), 'unlabelled')} {c / added.sum():.0%}"
                          for i, c in sorted(zip(ids, counts, strict=True),
                                             key=lambda ic: -ic[1])[:5])
        rows.append([name, f"{dice(mask, truth):.3f}", f"{mask.sum() / truth.sum():.2f}",
                     f"{added.sum() / truth.sum():.2f}", f"{(truth & ~mask).sum() / truth.sum():.2f}",
                     where, f"{seconds:.1f}"])
        masks[name] = mask
        print(" | ".join(rows[-1]), flush=True)
    header = ["mask", "Dice", "voxels / labelled", "added / labelled", "missed / labelled",
              "added voxels fall in (labels)", "time (s)"]
    best = max(rows[1:], key=lambda r: float(r[1]))[0]
    _figure(hu, truth, masks[best], best, args.patients, out / "dice.png")
    lines = [
        "# Bones without labels: Dice with a label map's bones",
        "",
        f"`python bench/bone_threshold.py --ct {args.ct} --labels {args.labels} --bone-hu "
        f"{' '.join(f'{b:g}' for b in args.bone_hu)}"
        + (f" --patients {' '.join(args.patients)}" if args.patients else "")
        + f" --out {args.out}`",
        "",
        *[f"- {k}: {v}" for k, v in machine_facts().items()],
        "- reference: the label map's `bones` preset (vertebrae, ribs with sternum and costal "
        "cartilages, skeleton), on the CT's own grid",
        "",
        markdown_table(header, rows),
        "",
        f"![slices and projections](dice.png) (`{best}`)",
        "",
    ]
    (out / "summary.md").write_text("\n".join(lines))
    print(f"wrote {out / 'summary.md'} and {out / 'dice.png'}")


def _figure(hu, truth, mask, title, patients, path) -> None:
    """Coronal and axial slices through the spine (labels green, threshold magenta, both
    white), then the AP projections of bones and CT of each prepared patient."""
    folders = [Path(p) for p in patients]
    columns = max(2, len(folders))
    fig, axes = plt.subplots(3 if folders else 1, columns, figsize=(4 * columns, 12 if folders
                                                                           else 4), squeeze=False)
    centre = np.argwhere(truth).mean(axis=0).round().astype(int)
    for ax, (name, cut) in zip(axes[0], (("coronal", np.s_[:, :, centre[2]]),
                                         ("axial", np.s_[:, centre[1], :])), strict=False):
        grey = np.clip((hu[cut] + 1000) / 2000, 0, 1)
        rgb = np.stack([grey] * 3, axis=-1) * 0.6
        rgb[truth[cut]] = (0.2, 0.9, 0.2)
        rgb[mask[cut]] = (0.9, 0.2, 0.9)
        rgb[truth[cut] & mask[cut]] = (1.0, 1.0, 1.0)
        ax.imshow(np.transpose(rgb, (1, 0, 2)))
        ax.set_title(f"{name}: labels green, threshold magenta, both white", fontsize=8)
    for ax in axes[0][2:]:
        ax.axis("off")
    for col, folder in enumerate(folders):
        prepared = load_prepared(folder)
        axes[1][col].imshow(prepared.ct.data[0].sum(2).T.numpy(), cmap="gray")
        axes[1][col].set_title(f"{folder.name}: CT", fontsize=8)
        axes[2][col].imshow(prepared.bone.data[0].sum(2).T.numpy(), cmap="gray")
        method = prepared.meta["bones"].get("method", "labels")  # older folders: labels
        axes[2][col].set_title(f"{folder.name}: bones ({method})", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
