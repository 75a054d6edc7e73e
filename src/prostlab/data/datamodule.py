"""The LightningDataModule: CT volumes, split by volume, and seeded registration cases over them.

Batches carry poses and volume indices, never images: the LightningModule renders targets on its
own device, so loading stays cheap and the GPU renders. A case is

    {"volume_index": int, "gt_pose": (6,), "initial_pose": (6,), "case": int}

drawn from :class:`~prostlab.data.poses.PoseSampler` with a generator seeded by ``(seed, split,
index)``: the same seed and config give the same cases whatever the number of workers or
processes.

A DeepFluoro specimen (``{deepfluoro: FILE, specimen: N}``, :mod:`prostlab.data.deepfluoro`)
supplies a CT like any other, and its real X-rays as the test cases: each case is one projection,
its ground-truth pose from the file, a start drawn around it by ``test_poses``, and in the batch
its X-ray itself (:class:`XrayCaseDataset`). Training cases are a long fixed sequence (``train_samples``, read in order: every case
is already an independent random draw, so shuffling adds nothing and would make the global batch
depend on the number of processes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from prostlab.data import deepfluoro
from prostlab.data.example import example_path
from prostlab.data.patients import leave_patient_out
from prostlab.data.poses import PoseDistribution, PoseSampler, case_generator
from prostlab.data.prepare import PreparedCT, load_prepared, prepare_ct
from prostlab.data.volume import Volume
from prostlab.errors import ProstlabError
from prostlab.geometry import Camera, perturb

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """A training curriculum of pose offsets: case ``i`` draws its offset scaled by

        s(i) = start + (1 - start) * min(i / samples, 1),

    so training starts near the ground truth and reaches the full offset law after ``samples``
    cases (``data.train_curriculum: {start, samples}``; needs ``relative: true`` poses).
    """

    start: float = 0.25
    samples: int = 20_000

    def __post_init__(self) -> None:
        if not (isinstance(self.start, int | float) and 0 < self.start <= 1):
            raise ProstlabError(
                f"data.train_curriculum.start: expected a number in (0, 1], got {self.start!r}"
            )
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ProstlabError(
                f"data.train_curriculum.samples: expected a positive integer, got {self.samples!r}"
            )

    def scale(self, index: int) -> float:
        return self.start + (1.0 - self.start) * min(index / self.samples, 1.0)


class PoseCaseDataset(Dataset):
    """Seeded registration cases ``start .. n - 1`` spread over the volumes in turn.

    ``start`` skips the cases a resumed run has already trained on.
    """

    def __init__(
        self,
        volume_indices: Sequence[int],
        sampler: PoseSampler,
        n: int,
        seed: int,
        split: str,
        start: int = 0,
        curriculum: Curriculum | None = None,
    ):
        self.volume_indices = list(volume_indices)
        self.sampler, self.n, self.seed, self.start = sampler, int(n), int(seed), int(start)
        self.split_key = SPLITS.index(split)
        self.curriculum = curriculum

    def __len__(self) -> int:
        return max(self.n - self.start, 0)

    def __getitem__(self, position: int) -> dict[str, Any]:
        if not 0 <= position < len(self):
            raise IndexError(position)
        index = self.start + position
        scale = self.curriculum.scale(index) if self.curriculum is not None else 1.0
        gt, initial = self.sampler.sample(
            1, case_generator(self.seed, self.split_key, index), offset_scale=scale, first=index
        )
        return {
            "volume_index": self.volume_indices[index % len(self.volume_indices)],
            "gt_pose": gt[0].float(),
            "initial_pose": initial[0].float(),
            "case": index,
        }


@dataclasses.dataclass(frozen=True)
class XraySource:
    """A DeepFluoro specimen's real X-rays, placed on its prepared cube.

    Attributes:
        path, specimen: the file and the specimen group.
        ids: its projection indices.
        geometry: the file's ``proj-params``.
        vol_to_lps: the prepared cube's volume frame to the CT's LPS frame
            (:func:`~prostlab.data.deepfluoro.volume_to_lps`).
        landmarks: ``(L, 3)`` the 3D landmarks in the cube's volume frame, mm.
        landmark_names: their names.
        i0, collimator_px, gt_correction: the source's options.
    """

    path: Path
    specimen: str
    ids: tuple[str, ...]
    geometry: deepfluoro.Geometry
    vol_to_lps: np.ndarray
    landmarks: np.ndarray
    landmark_names: tuple[str, ...]
    i0: float | str | None
    collimator_px: int
    gt_correction: str = "none"


class XrayCaseDataset(Dataset):
    """Real X-rays as test cases: case ``i`` is the ``i``-th projection of the sources in
    order (specimen by specimen, projection by projection), the first ``n`` of them.

    A case is a :class:`PoseCaseDataset` case plus ``target`` ``(1, h, w)`` line integrals
    fitted to ``camera``, ``target_mask`` ``(1, h, w)`` bool and ``landmarks`` ``(L, 3)``
    (volume frame, mm; NaN rows for names another test specimen has and this one lacks). The
    start is ``perturb(gt, offset)`` with the offset drawn from ``sampler.initial`` by case
    ``i``'s generator.
    """

    def __init__(self, sources: Mapping[int, XraySource], sampler: PoseSampler, n: int | None,
                 seed: int, camera: Camera):
        self.items = [(v, pid) for v, source in sources.items() for pid in source.ids]
        if n is not None:
            self.items = self.items[: int(n)]
        self.sources, self.sampler, self.seed, self.camera = dict(sources), sampler, seed, camera
        names = sorted({name for s in sources.values() for name in s.landmark_names})
        self.landmark_rows = {
            v: [s.landmark_names.index(name) if name in s.landmark_names else -1
                for name in names]
            for v, s in sources.items()
        }

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        volume_index, pid = self.items[index]
        source = self.sources[volume_index]
        projection = deepfluoro.read_projection(source.path, source.specimen, pid)
        case = deepfluoro.xray_case(
            projection, source.geometry, source.vol_to_lps,
            (self.camera.height, self.camera.width), self.camera.sid, source.i0,
            source.collimator_px, source.gt_correction,
        )
        generator = case_generator(self.seed, SPLITS.index("test"), index)
        offset = self.sampler.initial.sample(1, generator, first=index)
        gt = case.gt_pose[None]
        rows = self.landmark_rows[volume_index]
        landmarks = torch.full((len(rows), 3), math.nan)
        for k, row in enumerate(rows):
            if row >= 0:
                landmarks[k] = torch.from_numpy(source.landmarks[row])
        return {
            "volume_index": volume_index,
            "gt_pose": gt[0].float(),
            "initial_pose": perturb(gt, offset)[0].float(),
            "case": index,
            "target": torch.from_numpy(case.target)[None],
            "target_mask": torch.from_numpy(case.mask)[None],
            "landmarks": landmarks,
        }


class PoseDataModule(pl.LightningDataModule):
    """CT/segmentation pairs, prepared once and cached, and registration cases around them.

    Args:
        volumes: the data, a list of entries, each ``{"prepared": DIR}`` (a folder written by
            ``prostlab prepare``), ``{"example": NAME}`` (a bundled example: ``chest_ct_128``,
            ``pelvis_ct_128``), ``{"ct": PATH, "labels": PATH}`` (prepared into
            ``cache_dir`` on first use), or ``{"deepfluoro": FILE, "specimen": N}`` (a DeepFluoro
            specimen, 1-6 or a group name, its CT prepared into ``cache_dir``; optional ``i0``,
            ``collimator_px``, ``gt_correction``: :func:`~prostlab.data.deepfluoro.xray_case`). Default:
            the bundled example.
        cache_dir: where raw CTs are prepared to, one folder per CT and preparation settings.
        size: voxels per cube edge when preparing.
        bones: bone selection when preparing (a preset, a group, or label ids).
        downsample: average ``downsample^3`` voxel blocks after loading (2: 128^3 -> 64^3), for
            fast CPU runs; the spacing grows by the same factor, the field of view stays.
        split: volume indices per split, e.g. ``{"train": [0, 1, 2], "val": [3], "test": [4]}``.
            Default: the last 20 % of the volumes for test, the 20 % before for validation, at
            least one each, when there are three volumes or more; otherwise every split uses
            every volume (and a warning says so).
        fold: instead of ``split``, fold ``k`` of a leave-patient-out cross-validation with one
            patient per volume (:func:`~prostlab.data.patients.leave_patient_out`): test patient
            ``k``, validation patient ``k + 1`` (cyclically), the others for training.
        train_poses, val_poses, test_poses: pose samplers, each a mapping
            ``{"ground_truth": {...}, "initial": {...}, "relative": bool}`` of
            :class:`~prostlab.data.poses.PoseDistribution` fields (degrees and mm).
        train_curriculum: ``{"start": s0, "samples": n}``: widen the training offsets from
            ``s0`` times the ``train_poses`` law to all of it over the first ``n`` cases
            (:class:`Curriculum`); None: the full law from the start.
        train_samples, val_samples, test_samples: cases per split; with DeepFluoro volumes in
            the test split, ``test_samples`` caps the number of real X-rays (null: all).
        batch_size: the **global** batch; each of ``world_size`` processes takes an equal share.
        num_workers: data-loader workers per process.
        seed: seeds every draw.
        camera: the model's camera (linked from ``model.camera`` by the CLI), a mapping of
            :class:`~prostlab.geometry.Camera` fields: real X-rays are fitted to its detector.
    """

    def __init__(
        self,
        volumes: list[dict[str, Any]] | None = None,
        cache_dir: str = "cache/prepared",
        size: int = 128,
        bones: str | list[int] = "bones",
        downsample: int = 1,
        split: dict[str, list[int]] | None = None,
        fold: int | None = None,
        train_poses: dict[str, Any] | None = None,
        val_poses: dict[str, Any] | None = None,
        test_poses: dict[str, Any] | None = None,
        train_curriculum: dict[str, Any] | None = None,
        train_samples: int = 1_000_000,
        val_samples: int = 16,
        test_samples: int | None = 100,
        batch_size: int = 2,
        num_workers: int = 0,
        seed: int = 0,
        camera: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.sources = [dict(v) for v in (volumes or [{"prepared": str(example_path())}])]
        for i, source in enumerate(self.sources):
            if set(source) == {"example"}:  # a bundled example, wherever prostlab is installed
                self.sources[i] = source = {"prepared": str(example_path(source["example"]))}
            if "deepfluoro" in source:
                self.sources[i] = deepfluoro.source_options(source, f"data.volumes[{i}]")
            elif set(source) not in ({"prepared"}, {"ct", "labels"}, {"ct"}):
                raise ProstlabError(
                    f"data.volumes[{i}]: expected {{prepared: DIR}}, {{example: NAME}}, {{ct: "
                    f"PATH, labels: PATH}} or {{deepfluoro: FILE, specimen: N}}, got keys "
                    f"{sorted(source)}"
                )
        self.cache_dir, self.size, self.bones = Path(cache_dir), int(size), bones
        if not isinstance(downsample, int) or downsample < 1:
            raise ProstlabError(f"data.downsample: expected a positive integer, got {downsample!r}")
        self.downsample = downsample
        if fold is not None and split is not None:
            raise ProstlabError("data.fold and data.split: expected one of the two (a fold is "
                                "a leave-patient-out split)")
        self.fold = fold
        self.split = (self._resolve_split(split) if fold is None
                      else leave_patient_out(len(self.sources), int(fold)))
        self.samplers = {
            name: _sampler(config, f"data.{name}_poses")
            for name, config in zip(SPLITS, (train_poses, val_poses, test_poses), strict=True)
        }
        self.curriculum = None
        if train_curriculum is not None:
            unknown = sorted(set(train_curriculum) - {"start", "samples"})
            if unknown:
                raise ProstlabError(f"data.train_curriculum: unknown key(s) {unknown}; "
                                    f"expected start, samples")
            self.curriculum = Curriculum(**dict(train_curriculum))
            if not self.samplers["train"].relative:
                raise ProstlabError("data.train_curriculum: needs data.train_poses.relative: true")
        self.counts = {"train": train_samples, "val": val_samples, "test": test_samples}
        real = [i for i in self.split["test"] if "deepfluoro" in self.sources[i]]
        if real and len(real) != len(self.split["test"]):
            raise ProstlabError(
                f"data.split.test: volumes {real} are DeepFluoro specimens (real X-rays) and the "
                "others CTs (rendered targets); expected one kind in the test split"
            )
        if real and not self.samplers["test"].relative:
            raise ProstlabError("data.test_poses.relative: real X-rays have their own ground "
                                "truth; expected relative: true (starts drawn around it)")
        for name, count in self.counts.items():
            if count is None and name == "test" and real:
                continue
            if count is None or int(count) < 1:
                raise ProstlabError(f"data.{name}_samples: expected a positive count, got {count}")
        if int(batch_size) < 1:
            raise ProstlabError(f"data.batch_size: expected a positive integer, got {batch_size}")
        self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)
        self.camera = None if camera is None else Camera.from_dict(camera)
        self.prepared: list[PreparedCT] = []
        self.xrays: dict[int, XraySource] = {}

    # ------------------------------------------------------------------------------ volumes
    def _resolve_split(self, split: Mapping[str, list[int]] | None) -> dict[str, list[int]]:
        n = len(self.sources)
        if split is None:
            if n < 3:
                rank_zero_warn(
                    f"data: {n} volume(s), too few to split by volume; train, val and test all "
                    "use every volume. Give three or more volumes for a held-out evaluation."
                )
                return {name: list(range(n)) for name in SPLITS}
            held = max(1, round(0.2 * n))
            return {
                "train": list(range(n - 2 * held)),
                "val": list(range(n - 2 * held, n - held)),
                "test": list(range(n - held, n)),
            }
        unknown = sorted(set(split) - set(SPLITS))
        if unknown:
            raise ProstlabError(f"data.split: unknown split(s) {unknown}; expected {SPLITS}")
        resolved = {}
        for name in SPLITS:
            indices = list(split.get(name, []))
            if not indices or any(not 0 <= i < n for i in indices):
                raise ProstlabError(
                    f"data.split.{name}: expected a non-empty list of volume indices in "
                    f"[0, {n - 1}], got {indices}"
                )
            resolved[name] = indices
        return resolved

    def _cached_folder(self, source: Mapping[str, str]) -> Path:
        """The cache folder of a raw CT: named by the inputs' identity and the settings."""
        identity = {"size": self.size, "bones": self.bones}
        for key in ("ct", "labels", "deepfluoro"):
            if key in source:
                path = Path(source[key])
                if not path.exists():
                    raise ProstlabError(f"data.volumes: {key} {path}: no such file or folder")
                stat = path.stat()
                identity[key] = [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
        if "deepfluoro" in source:
            identity["specimen"] = source["specimen"]
            name = f"deepfluoro-{source['specimen']}"
        else:
            name = Path(source["ct"]).name.split(".")[0]
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        return self.cache_dir / f"{name}-{digest}"

    def _folder(self, source: Mapping[str, str]) -> Path:
        if "prepared" in source:
            folder = Path(source["prepared"])
            if not (folder / "meta.json").is_file():
                raise ProstlabError(
                    f"data.volumes: prepared {folder}: no meta.json; expected a folder written "
                    "by `prostlab prepare`"
                )
            return folder
        return self._cached_folder(source)

    def prepare_data(self) -> None:
        """Prepare every raw CT not yet in the cache (runs once, on the first process)."""
        for source in self.sources:
            folder = self._folder(source)
            if "deepfluoro" in source and not (folder / "meta.json").is_file():
                rank_zero_info(f"preparing DeepFluoro specimen {source['specimen']} of "
                               f"{source['deepfluoro']} into {folder}")
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=self.cache_dir) as raw:
                    files = deepfluoro.export_specimen(source["deepfluoro"], source["specimen"], raw)
                    prepare_ct(files["ct"], files["labels"], folder, size=self.size,
                               bones=self.bones, overwrite=True)
            if "ct" in source and not (folder / "meta.json").is_file():
                rank_zero_info(f"preparing {source['ct']} into {folder}")
                prepare_ct(  # a cache folder without meta.json holds an interrupted try
                    source["ct"], source.get("labels"), folder, size=self.size, bones=self.bones,
                    overwrite=True,
                )

    def setup(self, stage: str | None = None) -> None:
        if not self.prepared:
            self.prepare_data()  # idempotent; covers use without a Trainer
            self.prepared = [
                _downsampled(load_prepared(self._folder(source)), self.downsample)
                for source in self.sources
            ]
            for source, prepared in zip(self.sources, self.prepared, strict=True):
                if prepared.bone is None or not bool(prepared.bone.data.gt(0).any()):
                    raise ProstlabError(
                        f"data.volumes: {prepared.directory}: the segmented CT has no bone "
                        f"voxels (source {source}); check the labels and data.bones"
                    )
            self.xrays = {i: self._xray_source(i) for i in self.split["test"]
                          if "deepfluoro" in self.sources[i]}

    def _xray_source(self, index: int) -> XraySource:
        source, cube = self.sources[index], self.prepared[index].ct
        specimen = deepfluoro.specimen_name(source["deepfluoro"], source["specimen"])
        landmarks = deepfluoro.read_landmarks(source["deepfluoro"], specimen)
        vol_to_lps = deepfluoro.volume_to_lps(cube.affine, cube.shape[1:])
        names = tuple(landmarks)
        points = deepfluoro.landmarks_in_volume([landmarks[n] for n in names], vol_to_lps)
        return XraySource(
            source["deepfluoro"], specimen, tuple(deepfluoro.projection_ids(source["deepfluoro"], specimen)),
            deepfluoro.read_geometry(source["deepfluoro"]), vol_to_lps, points.astype(np.float32),
            names, source["i0"], source["collimator_px"], source["gt_correction"],
        )

    def xray_cameras(self) -> list[Camera]:
        """The detectors the test split's real X-rays are fitted to, one per distinct
        orientation (the model's camera must equal each); empty without real X-rays."""
        self.setup()
        cameras = []
        for source in self.xrays.values():
            model = self._xray_camera()
            for flag in (False, True):
                signs = deepfluoro.camera_signs(source.geometry.intrinsic, flag)
                full = deepfluoro.detector_camera(source.geometry, signs, model.sid)
                cameras.append(deepfluoro.fitted_camera(full, model))
        return list(dict.fromkeys(cameras))

    def _xray_camera(self) -> Camera:
        if self.camera is None:
            raise ProstlabError("data.camera: real X-rays are fitted to the model's detector; "
                                "expected the model's camera (the CLI links model.camera)")
        return self.camera

    def full_resolution_cts(self, indices: Sequence[int]) -> dict[int, Volume]:
        """The CTs of volumes ``indices`` before ``downsample`` (the benchmark's finer targets).

        Read again from the prepared folders when ``downsample > 1``, so that nothing but the
        benchmark holds them; the downsampled CTs of ``setup`` themselves when it is 1.
        """
        self.setup()
        if self.downsample == 1:
            return {int(i): self.prepared[int(i)].ct for i in indices}
        return {int(i): load_prepared(self._folder(self.sources[int(i)])).ct for i in indices}

    # ---------------------------------------------------------------------------- datasets
    def dataset(self, split: str, start: int = 0) -> PoseCaseDataset | XrayCaseDataset:
        """The cases of ``split`` ("train", "val" or "test") from case ``start`` on; the real
        X-rays of the test split's DeepFluoro specimens, if it has them."""
        if split == "test" and any("deepfluoro" in self.sources[i] for i in self.split["test"]):
            self.setup()
            return XrayCaseDataset(self.xrays, self.samplers["test"], self.counts["test"],
                                   self.seed, self._xray_camera())
        return PoseCaseDataset(
            self.split[split], self.samplers[split], self.counts[split], self.seed, split, start,
            self.curriculum if split == "train" else None,
        )

    def per_process_batch(self) -> int:
        """The global batch divided over the processes; it must divide evenly."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world:
            raise ProstlabError(
                f"data.batch_size: {self.batch_size} does not divide over {world} processes; "
                f"expected a multiple of {world}"
            )
        return self.batch_size // world

    def _loader(self, split: str, start: int = 0) -> DataLoader:
        dataset = self.dataset(split, start)
        world = self.trainer.world_size if self.trainer is not None else 1
        # In order across processes too: rank r reads cases r, r + world, ..., so a step's
        # global batch holds the cases one process would read (Lightning's sampler shuffles).
        sampler = None
        if world > 1:
            sampler = DistributedSampler(
                dataset, num_replicas=world, rank=self.trainer.global_rank, shuffle=False
            )
        return DataLoader(
            dataset,
            batch_size=self.per_process_batch(),
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        # A resumed run continues with the cases after those of its restored steps.
        step = self.trainer.global_step if self.trainer is not None else 0
        return self._loader("train", start=step * self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def _downsampled(prepared: PreparedCT, factor: int) -> PreparedCT:
    """The CT and bone volumes averaged over ``factor^3`` blocks (labels are dropped)."""
    if factor == 1:
        return prepared
    bone = prepared.bone.downsampled(factor) if prepared.bone is not None else None
    return dataclasses.replace(prepared, ct=prepared.ct.downsampled(factor), bone=bone, labels=None)


def _sampler(config: Mapping[str, Any] | None, name: str) -> PoseSampler:
    if config is None:
        return PoseSampler()
    if not isinstance(config, Mapping):
        raise ProstlabError(f"{name}: expected a mapping with ground_truth, initial, relative")
    unknown = sorted(set(config) - {"ground_truth", "initial", "relative"})
    if unknown:
        raise ProstlabError(
            f"{name}: unknown key(s) {unknown}; expected ground_truth, initial, relative"
        )
    return PoseSampler(
        ground_truth=PoseDistribution.from_config(
            config.get("ground_truth", {}), f"{name}.ground_truth"
        ),
        initial=PoseDistribution.from_config(config.get("initial", {}), f"{name}.initial"),
        relative=bool(config.get("relative", True)),
    )
