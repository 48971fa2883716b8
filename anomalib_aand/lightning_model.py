"""AAND: Advancing pre-trained teacher via Anomaly Amplification and Normality Distillation.

Tang et al., "Advancing Pre-trained Teacher: Towards Robust Feature Discrepancy for Anomaly
Detection". One ``fit`` (``engine.fit`` or ``anomalib train``) runs both stages in order:

* epochs ``[0, stage1_epochs)`` - **stage 1, anomaly amplification**: normal training images get
  synthetic Perlin anomalies on the fly (on the batch's device); only the RAA modules train, with
  ``L_focal + L_A`` (Eq. 9) and the ground-truth-gated residual (Eq. 6).
* epochs ``[stage1_epochs, stage1_epochs + stage2_epochs)`` - **stage 2, normality distillation**:
  the RAA modules are frozen; the RD bottleneck + decoder learn ``F_A`` of clean normal images with
  ``L_KD + L_HKD`` (Eq. 12).

Each stage has its own Adam optimiser and MultiStepLR schedule (milestones at 80 % / 90 % of the
stage's epochs, gamma 0.2). The stage is a function of the epoch, so a checkpoint taken in either
stage resumes in the same stage and epoch (optimiser and scheduler states are in the checkpoint).

Because the model owns its schedule, ``trainer_arguments`` sets ``max_epochs = stage1_epochs +
stage2_epochs`` (anomalib gives a model's trainer arguments precedence over the user's): change the
schedule with ``--model.stage1_epochs`` / ``--model.stage2_epochs``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import optim
from torch.nn import functional as F  # noqa: N812
from torchvision.transforms.v2 import Compose, Normalize

from anomalib_kd.distributed import DistributedTrainingMixin
from anomalib_kd.export import ProvenanceExportMixin
from anomalib_kd.quantization import AnomalyMapPTQMixin

from .components.synthesis import AnomalySynthesizer, foreground_mask
from .loss import AandAmplificationLoss, AandDistillationLoss
from .torch_model import AandModel

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _find_normalize(transform: Any) -> Normalize | None:
    if isinstance(transform, Normalize):
        return transform
    for child in getattr(transform, "transforms", []) or []:
        found = _find_normalize(child)
        if found is not None:
            return found
    return None


class Aand(DistributedTrainingMixin, ProvenanceExportMixin, AnomalyMapPTQMixin, AnomalibModule):
    """AAND anomaly detector (two-stage knowledge distillation with an advanced teacher).

    Args:
        backbone: teacher backbone (timm name, optionally with a weights tag). Default: torchvision's
            ImageNet-V1 WideResNet50-2 (``wide_resnet50_2.tv_in1k``), the weights the paper used.
        layers: three teacher levels.
        pre_trained: load ImageNet weights into the teacher (through timm: hub or local cache).
        memory_size: ``L`` normal and ``L`` anomaly memory items of each residual gate (50).
        gate_temperature: softmax temperature of the gate's cosine matching (0.2).
        margin: ``alpha`` of the dynamic margin of ``L_A``, Eq. (8) (0.3).
        amplification_weight: weight of ``L_A`` in Eq. (9) (1.0 as written; the reference code uses 0.1).
        amplification_pairs: ``"exact"`` - every (anomalous, normal) patch pair of the batch, streamed
            in chunks without the full matrix; ``"subsample"`` - at most ``max_anomalous_patches`` x
            ``max_normal_patches`` random pairs, as in the public reference implementation.
        max_anomalous_patches, max_normal_patches: caps for ``"subsample"``.
        focal_alpha, focal_gamma: focal loss of the gate (0.8, 2).
        label_threshold: a patch of a level is anomalous when its share of anomalous pixels exceeds it (0.3).
        hard_samples: ``K_h`` of the hard KD loss, Eq. (11) (10).
        stage1_epochs, stage2_epochs: schedule (100 + 120 in the paper).
        lr, betas: Adam of both stages (0.005, (0.5, 0.999)).
        lr_milestones, lr_gamma: MultiStepLR per stage at these fractions of the stage (0.8, 0.9; 0.2).
        anomaly_source_path: optional texture folder (e.g. DTD) for synthetic anomalies.
        anomaly_probability: share of training images that receive a synthetic anomaly in stage 1 (0.8).
        blend_range: opacity range of the synthetic perturbation (0.2, 1.0), i.e. ``beta in [0, 0.8)``.
        foreground: foreground strategy for synthesis: ``"none"`` (whole image), ``"bright"``, ``"dark"``.
        foreground_threshold: grey-level threshold in [0, 1] for the foreground; ``None`` = Otsu.
        backbone_weights: local ``.safetensors`` / ``.pth`` file with the teacher's weights (written by
            ``anomalib-kd-weights export``), for machines without network: loaded instead of downloading, whatever
            ``pre_trained`` says; every teacher tensor must be in it with the right shape. ``load_from_checkpoint``
            does not need the file (the checkpoint holds the teacher). Provenance: ``model.teacher_provenance``.
        fast_inference: opt-in fast eval path: networks under autocast (fp16 on CUDA, bf16 on CPU) with
            channels-last weights, anomaly-map head in float32 (see ``anomalib_kd.fast``); exports are unaffected.
        pre_processor, post_processor, evaluator, visualizer: anomalib components.

    Multi-GPU (``Engine(strategy="ddp", devices=N)``, see :mod:`anomalib_kd.distributed`): DDP runs with
    ``find_unused_parameters=True`` (set by the model: each stage leaves the other stage's modules without
    gradients); every rank synthesises its own anomalies from its own seed (``rank_seed(base, global_rank)``);
    ``L_A`` pairs and the HKD top-K are taken within the rank's batch and DDP averages the gradients (the mean
    of the per-rank losses, not the loss of the concatenated batch). BatchNorm of the bottleneck / decoder is
    not synchronised by default (per-rank batch statistics; rank 0's running statistics, broadcast to all ranks
    before each validation); ``sync_batchnorm=True`` on the trainer switches to ``SyncBatchNorm``.
    """

    ddp_find_unused_parameters = True

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = True,
        memory_size: int = 50,
        gate_temperature: float = 0.2,
        margin: float = 0.3,
        amplification_weight: float = 1.0,
        amplification_pairs: str = "exact",
        max_anomalous_patches: int = 1000,
        max_normal_patches: int = 5000,
        focal_alpha: float = 0.8,
        focal_gamma: float = 2.0,
        label_threshold: float = 0.3,
        hard_samples: int = 10,
        stage1_epochs: int = 100,
        stage2_epochs: int = 120,
        lr: float = 0.005,
        betas: Sequence[float] = (0.5, 0.999),
        lr_milestones: Sequence[float] = (0.8, 0.9),
        lr_gamma: float = 0.2,
        anomaly_source_path: str | None = None,
        anomaly_probability: float = 0.8,
        blend_range: Sequence[float] = (0.2, 1.0),
        foreground: str = "none",
        foreground_threshold: float | None = None,
        backbone_weights: str | None = None,
        fast_inference: bool = False,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        if self.input_size is None:
            msg = "AAND needs a fixed input size: give a pre_processor whose transform resizes the images."
            raise ValueError(msg)
        if stage1_epochs < 0 or stage2_epochs < 1:
            msg = f"stage1_epochs must be >= 0 and stage2_epochs >= 1, got {stage1_epochs} and {stage2_epochs}"
            raise ValueError(msg)
        if hard_samples < 1:
            msg = f"hard_samples (K_h) must be >= 1, got {hard_samples}"
            raise ValueError(msg)
        self.stage1_epochs = int(stage1_epochs)
        self.stage2_epochs = int(stage2_epochs)
        self.lr = lr
        self.betas = tuple(betas)
        self.lr_milestones = tuple(lr_milestones)
        self.lr_gamma = lr_gamma
        self.label_threshold = label_threshold

        self.model = AandModel(
            backbone=backbone,
            input_size=tuple(self.input_size),
            layers=layers,
            pre_trained=pre_trained,
            memory_size=memory_size,
            gate_temperature=gate_temperature,
            backbone_weights=backbone_weights,
        )
        self.model.set_fast_inference(fast_inference)
        self.amplification_loss = AandAmplificationLoss(
            margin=margin,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            amplification_weight=amplification_weight,
            mode=amplification_pairs,
            max_anomalous=max_anomalous_patches,
            max_normal=max_normal_patches,
        )
        self.loss = AandDistillationLoss(hard_samples=hard_samples)
        self.synthesizer = AnomalySynthesizer(
            anomaly_source_path=anomaly_source_path,
            probability=anomaly_probability,
            blend_range=tuple(blend_range),
            foreground=foreground,
            foreground_threshold=foreground_threshold,
        )
        self.automatic_optimization = False

    # ------------------------------------------------------------------ schedule
    @property
    def stage(self) -> int:
        """1 (anomaly amplification) or 2 (normality distillation), from the current epoch."""
        return 1 if self.current_epoch < self.stage1_epochs else 2

    def _stage_epochs(self, stage: int) -> int:
        return self.stage1_epochs if stage == 1 else self.stage2_epochs

    def _milestones(self, epochs: int) -> list[int]:
        return sorted({max(1, round(fraction * epochs)) for fraction in self.lr_milestones})

    def configure_optimizers(self) -> tuple[list[optim.Optimizer], list[optim.lr_scheduler.LRScheduler]]:
        """One Adam + MultiStepLR per stage: ``[RAA, student]``."""
        raa = optim.Adam(self.model.raa.parameters(), lr=self.lr, betas=self.betas)
        student = optim.Adam(
            [*self.model.bottleneck.parameters(), *self.model.decoder.parameters()],
            lr=self.lr,
            betas=self.betas,
        )
        schedulers = [
            optim.lr_scheduler.MultiStepLR(raa, self._milestones(self.stage1_epochs), self.lr_gamma),
            optim.lr_scheduler.MultiStepLR(student, self._milestones(self.stage2_epochs), self.lr_gamma),
        ]
        return [raa, student], schedulers

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        return {
            "gradient_clip_val": 0,
            "num_sanity_val_steps": 0,
            "max_epochs": self.stage1_epochs + self.stage2_epochs,
        }

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS

    def configure_trainable_parameters(self) -> None:
        """Before DDP wraps the module (``setup("fit")``): both stages' modules require grad, the teacher not.

        DDP registers the parameters that require grad at that moment; ``_set_trainable`` then switches between
        the stages at every epoch start (a second fit of the same object starts with the RAA frozen).
        """
        self.model.raa.requires_grad_(True)
        self.model.bottleneck.requires_grad_(True)
        self.model.decoder.requires_grad_(True)
        super().configure_trainable_parameters()

    def _set_trainable(self, stage: int) -> None:
        """Freeze what the stage does not train (the teacher is always frozen)."""
        self.model.encoder.requires_grad_(False)
        self.model.raa.requires_grad_(stage == 1)
        self.model.bottleneck.requires_grad_(stage == 2)
        self.model.decoder.requires_grad_(stage == 2)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self) -> None:
        super().on_fit_start()  # seeds this rank's synthesis stream
        datamodule = getattr(self.trainer, "datamodule", None)
        train_data = getattr(datamodule, "train_data", None)
        if train_data is not None and len(train_data) == 0:
            msg = (
                "AAND needs normal training images, but the datamodule's training set is empty "
                f"(check data.root / data.category of {type(datamodule).__name__})."
            )
            raise ValueError(msg)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore anomalib's components, then size the anomaly map like the restored pre-processor.

        ``load_from_checkpoint`` builds the module with the default pre-processor (256 px) before
        anomalib restores the saved one, so the model's input size is re-synchronised here.
        """
        super().on_load_checkpoint(checkpoint)
        if self.input_size is not None and tuple(self.input_size) != self.model.input_size:
            self.model.set_input_size(tuple(self.input_size))

    def on_train_epoch_start(self) -> None:
        stage = self.stage
        self._set_trainable(stage)
        if self.current_epoch in {0, self.stage1_epochs}:
            logger.info("AAND stage %d (%s) starts at epoch %d", stage, self._stage_name(stage), self.current_epoch)

    def on_train_epoch_end(self) -> None:
        schedulers = self.lr_schedulers()
        schedulers[self.stage - 1].step()

    @staticmethod
    def _stage_name(stage: int) -> str:
        return "anomaly amplification" if stage == 1 else "normality distillation"

    # ------------------------------------------------------------------ normalisation
    def _normalisation(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        transform = self.pre_processor.transform if self.pre_processor else None
        normalize = _find_normalize(transform)
        mean = normalize.mean if normalize is not None else IMAGENET_MEAN
        std = normalize.std if normalize is not None else IMAGENET_STD
        mean = torch.as_tensor(mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        std = torch.as_tensor(std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        return mean, std

    # ------------------------------------------------------------------ steps
    def level_labels(self, mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Pseudo-anomaly mask pooled to a level: anomalous where the anomalous share > ``label_threshold``."""
        return F.adaptive_avg_pool2d(mask, size) > self.label_threshold

    def stage1_losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Synthesise anomalies on (normalised) ``images`` and return the stage-1 losses."""
        mean, std = self._normalisation(images)
        with self.rank_random(images.device):  # this rank's synthesis stream during fit
            augmented, mask, foreground = self.synthesizer((images * std + mean).clamp(0, 1))
        vanilla = self.model.teacher_features((augmented - mean) / std)
        sizes = [tuple(features.shape[-2:]) for features in vanilla]
        anomalous = [self.level_labels(mask, size) for size in sizes]
        advanced, _, logits, _ = self.model.amplify(vanilla, [labels.to(vanilla[0].dtype) for labels in anomalous])
        normal = []
        for labels, size in zip(anomalous, sizes, strict=True):
            candidates = ~labels
            in_foreground = candidates & (F.adaptive_avg_pool2d(foreground, size) > 0.5)
            normal.append(in_foreground if in_foreground.any() else candidates)
        with self.rank_random(images.device):  # "subsample" pair draws
            total, focal, l_a = self.amplification_loss(advanced, vanilla, logits, anomalous, normal)
        return {"loss": total, "focal": focal, "amplification": l_a}

    def stage2_losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normality distillation losses on clean normal ``images`` (RAA frozen, predicted gate)."""
        with torch.no_grad():
            advanced = self.model.amplify(self.model.teacher_features(images))[0]
        student = self.model.student_features(advanced)
        total, l_kd, l_hkd = self.loss(advanced, student)
        return {"loss": total, "kd": l_kd, "hkd": l_hkd}

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        del args, kwargs
        stage = self.stage
        optimizer = self.optimizers()[stage - 1]
        losses = self.stage1_losses(batch.image) if stage == 1 else self.stage2_losses(batch.image)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(losses["loss"])
        optimizer.step()

        batch_size = batch.image.shape[0]
        self.log("stage", float(stage), prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train_loss", losses["loss"].detach(), prog_bar=True, on_epoch=True, batch_size=batch_size)
        for name, value in losses.items():
            if name != "loss":
                self.log(f"train/{name}", value.detach(), prog_bar=True, on_epoch=True, batch_size=batch_size)
        return {"loss": losses["loss"].detach()}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    # ------------------------------------------------------------------ introspection
    @torch.no_grad()
    def residual_intensity(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fig. 8 quantity: mean squared residual on synthetic-anomaly vs normal patches, per level.

        Synthesises anomalies on ``images`` (normalised, like ``batch.image``) and returns
        ``{"anomalous": (K,), "normal": (K,)}`` where entry ``k`` is
        ``1/(N C) sum_i sum_j (Delta_ij)^2`` over that level's anomalous / normal patches of the
        residual *as used* (``w^a * Delta``, the gated residual the advanced teacher adds).
        """
        mean, std = self._normalisation(images)
        augmented, mask, _ = self.synthesizer((images * std + mean).clamp(0, 1))
        vanilla = self.model.teacher_features((augmented - mean) / std)
        _, gates, _, residuals = self.model.amplify(vanilla)
        anomalous, normal = [], []
        for gate, residual in zip(gates, residuals, strict=True):
            labels = self.level_labels(mask, tuple(residual.shape[-2:]))
            energy = ((gate * residual) ** 2).mean(dim=1, keepdim=True)
            anomalous.append(energy[labels].mean() if labels.any() else energy.new_tensor(float("nan")))
            normal.append(energy[~labels].mean())
        return {"anomalous": torch.stack(anomalous), "normal": torch.stack(normal)}

    @staticmethod
    def foreground_preview(images: torch.Tensor, strategy: str, threshold: float | None = None) -> torch.Tensor:
        """Foreground masks AAND would use for synthesis on ``images`` in [0, 1] (to tune the strategy)."""
        return foreground_mask(images, strategy, threshold)


__all__ = ["Aand"]
