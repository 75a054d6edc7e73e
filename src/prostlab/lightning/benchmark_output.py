"""Write what a benchmark found: tables, figures, an animation, and the same on W&B."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.loggers import WandbLogger

from prostlab.benchmark import (
    markdown_table,
    summarise,
    summarise_by_patient,
    write_cases_csv,
    write_summary,
)
from prostlab.data import deepfluoro
from prostlab.data.patients import source_name
from prostlab.outputs import claim_latest
from prostlab.reproducibility import reproducibility_facts
from prostlab.viz.report import (
    plot_mtre_cdf,
    plot_success_vs_initial,
    save_overlays,
    save_registration_gif,
)

_CAPTIONS = {
    "success_vs_initial": "success per initial-mTRE bin (the capture range)",
    "mtre_cdf": "final mTRE, cumulative",
    "overlays": "overlays: target magenta, DRR green, aligned anatomy grey",
    "registration": "one registration, iteration by iteration",
}


def _render(module, outcome, poses: torch.Tensor) -> torch.Tensor:
    """(T, h, w) DRRs of the moving volume of ``outcome`` at ``poses`` (T, 6)."""
    view = module.volumes[outcome.volume_index]
    moving = view.bone if module.bench.moving == "bone" else view.ct
    with torch.no_grad():
        images = module.net.projector(moving, view.spacing, poses.to(moving))
    return images[:, 0].cpu()


def _real_xrays(module) -> dict[str, Any]:
    """``{"real X-rays": "<protocol>; ..."}`` when the test cases are DeepFluoro X-rays: the
    bones rendered, the ground truth's correction and ``I0`` of each specimen, which the landmark
    scores depend on (:func:`prostlab.data.deepfluoro.protocol`); else nothing."""
    datamodule = getattr(module.trainer, "datamodule", None)
    xrays = getattr(datamodule, "xrays", None)
    if not xrays:
        return {}
    lines = [deepfluoro.protocol(datamodule.sources[i], datamodule.bones) for i in sorted(xrays)]
    return {"real X-rays": " | ".join(lines)}


def _patient_names(module) -> dict[int, str]:
    """Each volume's patient name (:func:`prostlab.data.patients.source_name`) by its index."""
    datamodule = getattr(module.trainer, "datamodule", None)
    sources = getattr(datamodule, "sources", None) or []
    return {i: source_name(source) for i, source in enumerate(sources)}


def write_benchmark(module, rows: list[dict[str, Any]], outcomes: list) -> None:
    """Write ``cases.csv``, ``summary.json/.md``, figures and a GIF into the run's folder
    ``module.bench_folder`` (made by the test loop's start), then point ``output_dir/latest`` at
    it (:func:`~prostlab.outputs.claim_latest`: it is named as this run's only if no concurrent
    run replaced it). Each file is written under a temporary name and moved into place."""
    config = module.bench
    folder = Path(module.bench_folder)
    threshold = module.hparams.success_threshold_mm
    write_cases_csv(rows, folder / "cases.csv")
    capture = {"capture_rate": config.capture_rate,
               "capture_min_cases": config.capture_min_cases}
    summary = summarise(rows, threshold, config.bins_mm, **capture)
    patients = summarise_by_patient(rows, _patient_names(module), threshold_mm=threshold,
                                    bins_mm=config.bins_mm, **capture)
    meta = {
        "checkpoint": str(module.trainer.ckpt_path),
        "threshold_mm": threshold,
        "target": config.target_config.as_dict(),
        "moving": config.moving,
        "run": folder.name,
        "methods": {k: (v if isinstance(v, str) else "custom") for k, v in config.methods.items()},
        **_real_xrays(module),
        "reproducibility": reproducibility_facts(
            module.net.projector.backend, module.device,
            getattr(getattr(module.trainer, "datamodule", None), "seed", None)),
    }
    figures = {  # the capture-range figure first: it is the headline
        "success_vs_initial": plot_success_vs_initial(rows, folder / "success_vs_initial.png",
                                                      threshold, config.bins_mm, **capture),
        "mtre_cdf": plot_mtre_cdf(rows, folder / "mtre_cdf.png"),
    }
    last = list(module.bench_schedules)[-1]
    shown = [o for o in outcomes if o.method == last][: config.overlays]
    if shown:
        panels = []
        for o in shown:
            initial, final = _render(module, o, torch.stack((o.initial, o.final)))
            row = next(r for r in rows if r["case"] == o.case and r["method"] == last)
            panels.append({"title": f"case {o.case}: mTRE {row['initial_mtre_mm']:.1f} -> "
                                    f"{row['final_mtre_mm']:.1f} mm ({last})",
                           "target": o.target, "initial": initial, "final": final})
        figures["overlays"] = save_overlays(panels, folder / "overlays.png")
    animated = [o for o in outcomes if o.method == last and o.case == config.gif_case]
    if animated and len(animated[0].poses):
        o = animated[0]
        keep = torch.linspace(0, len(o.poses) - 1, min(config.max_frames, len(o.poses))).long()
        frames = _render(module, o, o.poses[keep])
        titles = [f"{last} iteration {int(i)}" for i in keep]
        figures["registration"] = save_registration_gif(frames, o.target,
                                                        folder / "registration.gif",
                                                        titles=titles)
    write_summary(summary, folder, meta,
                  [(_CAPTIONS[name], Path(path).name) for name, path in figures.items()],
                  patients)
    table = markdown_table(summary)
    print(f"\n{table}\nresults and figures: {claim_latest(config.output_dir, folder)}")
    logger = module.logger
    if isinstance(logger, WandbLogger):
        columns = list(rows[0]) if rows else []
        logger.log_table("test/cases", columns=columns, data=[list(r.values()) for r in rows])
        for name, path in figures.items():
            if str(path).endswith(".png"):
                logger.log_image(key=f"test/{name}", images=[str(path)])
        logger.experiment.summary["test/summary_md"] = table
        for method, stats in summary.items():
            logger.experiment.summary[f"test/{method}/capture_range_mm"] = (
                stats["capture_range_mm"])
