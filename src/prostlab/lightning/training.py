"""Training ProST's convex similarity network: the geodesic-gradient loss in a LightningModule.

One training step, for a batch of cases ``(volume, gt pose, current pose)``:

1. render the target from the **whole CT** at the ground-truth pose, min-max normalised;
2. the network similarity ``S(pose) = |e_p(P(lift(bone), pose)) - e_t(target)|^2``;
3. its gradient with respect to the current pose (a ``perturb`` delta at zero), with
   ``create_graph=True``, against the Riemannian gradient of the squared geodesic distance to
   the ground truth: rotation and translation directions, each unit length, squared error
   (:func:`prostlab.similarity.geodesic_gradient_loss`);
4. backpropagate into the network: a double backward through the projector.

Validation reports the loss and a **convexity measure** on held-out cases: the cosine between
the network's descent direction ``-g`` and the geodesic direction towards the ground truth
``-G``, for the rotation and the translation parts; a case counts as convex-consistent when both
cosines are positive. A few short registrations (``validation_registration``) add mTRE and
success rate. The test loop is the registration benchmark (:mod:`prostlab.lightning.benchmark`).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric

from prostlab.geometry import Camera, geodesic_gradient
from prostlab.geometry.checks import check_weights_device
from prostlab.lightning.augment import TrainingAugmentation
from prostlab.lightning.benchmark import BenchmarkLoop
from prostlab.lightning.checkpoint import load_net_weights
from prostlab.lightning.optim import build_optimizer, build_scheduler
from prostlab.lightning.panels_log import log_panels
from prostlab.lightning.volume_bank import VolumeBank
from prostlab.limits import check_grid_side, check_sdd_mm, check_spacing_mm
from prostlab.metrics import MeanTargetRegistrationError, SuccessRate
from prostlab.projector import Projector
from prostlab.registration import as_schedule, register
from prostlab.similarity import (
    ConvexSimilarityNet,
    geodesic_direction_loss,
    geodesic_gradient_loss,
    minmax_normalise,
    pose_gradient,
)


class ConvexSimilarityModule(BenchmarkLoop, pl.LightningModule):
    """The convex similarity network and its training, validation and checkpointing.

    Args:
        camera: the detector geometry, a mapping of :class:`~prostlab.geometry.Camera` fields.
        step: sampling step along rays, mm.
        backend: projector backend, "auto" (CuPy on CUDA tensors), "torch", "cupy" or "cpu".
        net: architecture, keyword arguments of :class:`~prostlab.similarity.ConvexSimilarityNet`.
        rot_weight, trans_weight: weights of the SE(3) metric (0 drops that part of the loss).
        optimizer: ``{"name": "sgd" | "adam" | "adamw", **kwargs}`` (ProST's SGD by default).
        scheduler: ``{"name": "cyclic", base_lr, max_lr, step_size_up}`` or ``{"name":
            "constant"}`` (ProST's cyclic schedule by default).
        validation_registration: ``{"schedule": preset | config, "cases": n}``: register the
            first ``n`` validation cases with this schedule; ``None`` skips it.
        success_threshold_mm: mTRE below which a registration succeeds.
        image_every_n_steps: log target/moving/overlay panels this often (0: never).
        max_target_points: bone voxels per volume used as mTRE targets.
        augmentation: random training augmentation of the volumes and targets, a mapping of
            :class:`~prostlab.lightning.augment.AugmentationConfig` fields (``{}``: its
            defaults); None: none. Validation and test never augment.
        benchmark: what ``prostlab test`` runs, see
            :class:`~prostlab.lightning.benchmark.BenchmarkConfig`.
        init_weights: a checkpoint whose network weights start this run (a fresh run: step 0,
            new optimiser and schedule), as when a cross-patient network is fine-tuned on one
            patient; ``--ckpt_path`` instead resumes a run where it stopped.
    """

    def __init__(
        self,
        camera: dict[str, Any],
        step: float = 1.75,
        backend: str = "auto",
        net: dict[str, Any] | None = None,
        rot_weight: float = 1.0,
        trans_weight: float = 1.0,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        validation_registration: dict[str, Any] | None = None,
        success_threshold_mm: float = 10.0,
        image_every_n_steps: int = 100,
        max_target_points: int = 2000,
        benchmark: dict[str, Any] | None = None,
        augmentation: dict[str, Any] | None = None,
        init_weights: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.camera = Camera.from_dict(camera)
        # As render and register refuse them: a 1-row detector trained without a word.
        check_grid_side((self.camera.height, self.camera.width),
                        "model.camera height x width", "pixels")
        check_spacing_mm(self.camera.pixel_spacing, "model.camera.pixel_spacing")
        check_sdd_mm(self.camera.sdd, "model.camera.sdd")
        self.net = ConvexSimilarityNet(
            Projector(self.camera, step=step, backend=backend), **(net or {})
        )
        if init_weights is not None:
            load_net_weights(self.net, init_weights)
        self.registration = validation_registration and as_schedule(
            validation_registration.get("schedule", "net_gradncc")
        )
        self.val_loss, self.val_convex = MeanMetric(), MeanMetric()
        self.val_cos_rot, self.val_cos_trans = MeanMetric(), MeanMetric()
        self.val_mtre = MeanTargetRegistrationError()
        self.val_success = SuccessRate(success_threshold_mm)
        self.volumes: VolumeBank | None = None
        self.augmentation: TrainingAugmentation | None = None

    # -------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        # Before Lightning moves the module to its device: a network built on meta has nothing
        # to copy, and torch said only "Cannot copy out of meta tensor".
        check_weights_device(self.net, "model.net")
        if self.volumes is None:
            datamodule = self.trainer.datamodule
            datamodule.setup(stage)
            self.volumes = VolumeBank(
                datamodule.prepared, self.hparams.max_target_points, datamodule.seed
            )
            if self.hparams.augmentation is not None:
                self.augmentation = TrainingAugmentation(self.hparams.augmentation,
                                                         datamodule.seed)

    def targets(self, view, gt_pose: torch.Tensor) -> torch.Tensor:
        """Min-max normalised DRRs (B, 1, h, w) of the whole CT at the ground-truth poses."""
        with torch.no_grad():
            return minmax_normalise(self.net.projector(view.ct, view.spacing, gt_pose))

    def case_losses(self, batch: dict[str, torch.Tensor], augment: bool = False) -> torch.Tensor:
        """The geodesic-gradient loss of each case of a batch, (B,); with ``augment`` (and an
        ``augmentation`` config), on randomly augmented volumes and targets."""
        gt, current = batch["gt_pose"], batch["initial_pose"]
        losses = torch.zeros(gt.shape[0], dtype=gt.dtype, device=gt.device)
        for view, sel in self.volumes.groups(batch["volume_index"]):
            bone = view.bone
            if augment and self.augmentation is not None:
                generator = self.augmentation.generator(self.global_step, view.index)
                ct, bone = self.augmentation.volumes(view.ct, view.bone, generator)
                with torch.no_grad():
                    drr = self.net.projector(ct, view.spacing, gt[sel])
                target = self.augmentation.target(drr, generator)
            else:
                target = self.targets(view, gt[sel])
            losses[sel] = geodesic_gradient_loss(
                lambda pose, v=view, b=bone, t=target: self.net(b, v.spacing, pose, t),
                current[sel],
                gt[sel],
                self.hparams.rot_weight,
                self.hparams.trans_weight,
                reduction="none",
            )
        return losses

    # ----------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.case_losses(batch, augment=True).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["case"]))
        every = self.hparams.image_every_n_steps
        if every and self.global_step % every == 0:
            self._log_panels(batch, "train/panels")
        return loss

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """Backpropagate into the parameters only: the pose gradient's perturbation ``delta`` is
        a leaf too, and its gradient, which nothing reads, would cost the projector's double
        backward a pose-gradient sum per kernel (:mod:`prostlab.projector.autograd`)."""
        kwargs.setdefault("inputs", [p for p in self.parameters() if p.requires_grad])
        super().backward(loss, *args, **kwargs)

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = [p.grad.detach().norm() for p in self.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm())

    # --------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        with torch.inference_mode(False), torch.enable_grad():
            batch = {k: v.clone() for k, v in batch.items()}  # inference tensors -> normal
            gt, current = batch["gt_pose"], batch["initial_pose"]
            for view, sel in self.volumes.groups(batch["volume_index"]):
                # One target and one pose gradient per case serve the loss and the convexity.
                target = self.targets(view, gt[sel])
                _, g = pose_gradient(
                    lambda pose, v=view, t=target: self.net(v.bone, v.spacing, pose, t),
                    current[sel],
                )
                self.val_loss.update(
                    geodesic_direction_loss(
                        g, current[sel], gt[sel], self.hparams.rot_weight,
                        self.hparams.trans_weight,
                    )
                )
                self._convexity(g, geodesic_gradient(current[sel], gt[sel]))
                if self.registration is not None:
                    self._registrations(view, target, gt[sel], current[sel], batch["case"][sel])
        n = len(batch["case"])
        for name, metric in (
            ("loss", self.val_loss),
            ("convex_fraction", self.val_convex),
            ("cosine_rotation", self.val_cos_rot),
            ("cosine_translation", self.val_cos_trans),
        ):
            self.log(f"val/{name}", metric, batch_size=n, prog_bar=name == "convex_fraction")
        if self.registration is not None:
            self.log("val/mtre_mm", self.val_mtre, batch_size=n)
            self.log("val/success_rate", self.val_success, batch_size=n)
        if batch_idx == 0:
            self._log_panels(batch, "val/panels")

    def _convexity(self, g: torch.Tensor, G: torch.Tensor) -> None:
        """Cosines of the network's pose gradients ``g`` with the geodesic ones ``G`` (B, 6)."""
        cos_r = torch.nn.functional.cosine_similarity(g[:, :3], G[:, :3], dim=1)
        cos_t = torch.nn.functional.cosine_similarity(g[:, 3:], G[:, 3:], dim=1)
        self.val_cos_rot.update(cos_r)
        self.val_cos_trans.update(cos_t)
        self.val_convex.update(((cos_r > 0) & (cos_t > 0)).to(cos_r.dtype))

    def _registrations(self, view, target, gt, start, cases) -> None:
        """Register the first ``validation_registration.cases`` cases; update mTRE and success."""
        chosen = cases < self.hparams.validation_registration.get("cases", 4)
        if not chosen.any():
            return
        result = register(
            target[chosen],
            start[chosen],
            self.registration,
            projector=self.net.projector,
            spacing=view.spacing,
            ct=view.ct,
            bone=view.bone,
            net=self.net,
        )
        final = result.final_poses.to(gt)
        self.val_mtre.update(final, gt[chosen], view.points)
        self.val_success.update(final, gt[chosen], view.points)

    # ------------------------------------------------------------------------------ helpers
    def _log_panels(self, batch: dict[str, torch.Tensor], key: str) -> None:
        if self.logger is None or self.trainer.global_rank != 0:
            return
        view = self.volumes[int(batch["volume_index"][0])]
        with torch.no_grad():
            target = self.targets(view, batch["gt_pose"][:1])
            moving = self.net.projector(view.bone, view.spacing, batch["initial_pose"][:1])
        log_panels(self.logger, key, target[0, 0], moving[0, 0], self.global_step)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.net.parameters(), self.hparams.optimizer)
        scheduler = build_scheduler(optimizer, self.hparams.scheduler)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

