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

The paper's recipe and what the model does where it cannot follow it (each checked once at fit start):

* textures: DTD. ``anomalib-kd-dtd --root ./datasets/dtd`` downloads it with anomalib's download helpers into
  ``./datasets/dtd/images``, the default ``anomaly_source_path`` (relative to the working directory, like
  anomalib's dataset roots), so the stock CLI uses it without a flag. The model never downloads. When that default
  folder does not exist, or with ``anomaly_source_path=None``, stage 1 falls back to anomalib's Perlin-noise texture
  and logs one warning naming the deviation and the command. An explicitly given folder that is missing or holds
  no image is an error at fit start (not at construction, so a checkpoint loads on a machine without textures).
* foreground: ``foreground="auto"`` picks the paper's per-category mask from the datamodule's ``category``
  (see :mod:`anomalib_aand.components.synthesis`); unknown names use the whole image, with a notice. ``L_A``'s
  normal set is then the foreground's normal patches (the reference implementation's choice; Eq. 7 takes all
  normal patches): see ``amplification_pairs``.
* batch size 16 with lr 0.005: another training batch size with the default lr logs a warning (the lr is
  never scaled silently).
* resize: bicubic to 256 x 256, as the reference trains and tests (:meth:`Aand.configure_pre_processor`); the
  exported graph resizes bicubically too (anomalib's export turns the antialiasing off, as for every model).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.models.components import AnomalibModule
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import optim
from torch.nn import functional as F  # noqa: N812
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from anomalib_kd_base.model import (
    PAPER_BATCH_SIZE,  # noqa: F401  (re-exported: the recipe's constants, shared with MemKD)
    PAPER_LR,  # noqa: F401
    KDModelBase,
    batch_size_warning,
    check_at_least,
    check_choice,
    check_positive,
)

from .components.synthesis import (
    AUTO_FOREGROUND,
    FOREGROUND_STRATEGIES,
    AnomalySynthesizer,
    foreground_mask,
    foreground_preset,
    texture_folder_problem,
)
from .loss import AandAmplificationLoss, AandDistillationLoss
from .torch_model import AandModel

logger = logging.getLogger(__name__)

#: the paper's training batch size (Sec. IV-B), which goes with the default ``lr``
#: where ``anomalib-kd-dtd`` puts DTD's images (``./datasets/dtd/images/<class>/*.jpg``)
DTD_IMAGES = "./datasets/dtd/images"
DTD_COMMAND = "anomalib-kd-dtd --root ./datasets/dtd"


def _find_normalize(transform: Any) -> Normalize | None:
    if isinstance(transform, Normalize):
        return transform
    for child in getattr(transform, "transforms", []) or []:
        found = _find_normalize(child)
        if found is not None:
            return found
    return None


def _validate_optimisation(
    lr: float,
    betas: Sequence[float],
    lr_milestones: Sequence[float],
    lr_gamma: float,
) -> None:
    """Fail early (at construction, not after the first epoch) on optimiser settings Adam / MultiStepLR reject."""
    check_positive("lr", lr)
    betas = tuple(betas)
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        msg = f"betas must be two values in [0, 1), got {betas}"
        raise ValueError(msg)
    if not all(0.0 < fraction < 1.0 for fraction in lr_milestones):
        msg = f"lr_milestones must be fractions of a stage in (0, 1), got {tuple(lr_milestones)}"
        raise ValueError(msg)
    check_positive("lr_gamma", lr_gamma)


class Aand(KDModelBase, AnomalibModule):
    """AAND anomaly detector (two-stage knowledge distillation with an advanced teacher).

    Args:
        backbone: teacher backbone (timm name, optionally with a weights tag). Default: torchvision's
            ImageNet-V1 WideResNet50-2 (``wide_resnet50_2.tv_in1k``), the weights the paper used.
        layers: the three teacher levels (layer1-3, K = 3 in the paper).
        pre_trained: load ImageNet weights into the teacher (through timm: hub or local cache).
        memory_size: ``L``, the number of normal and of anomaly memory items of each residual gate (50).
        gate_temperature: ``tau``, temperature of the gate's softmax over cosine similarities (0.2).
        margin: ``alpha`` of the dynamic margin of ``L_A``, Eq. (8) (0.3).
        amplification_weight: weight of ``L_A`` in Eq. (9) (1.0 as written; the reference code uses 0.1).
        amplification_pairs: ``"exact"`` - every (anomalous, normal) patch pair of the batch, streamed
            in chunks without the full matrix; ``"subsample"`` - at most ``max_anomalous_patches`` x
            ``max_normal_patches`` random pairs, as in the public reference implementation. In both modes the
            normal set of ``L_A`` is the non-anomalous patches *inside the foreground mask* (all non-anomalous
            patches when a level has none in it), as in the reference implementation, not all ``N^n_k`` normal
            patches of Eq. (7): anomalies are only synthesised on the product, and for a small object the background
            patches (a plain backdrop no real defect looks like) would otherwise dominate the pairs. With
            ``foreground="none"`` (textures) both sets coincide.
        max_anomalous_patches: with ``amplification_pairs="subsample"``, at most this many anomalous patches
            per level and batch enter ``L_A`` (1000, the reference implementation's cap).
        max_normal_patches: with ``amplification_pairs="subsample"``, at most this many normal (foreground)
            patches per level and batch enter ``L_A`` (5000, the reference implementation's cap).
        focal_alpha: ``alpha`` of the gate's focal loss, the weight of the anomalous class (0.8).
        focal_gamma: ``gamma`` of the gate's focal loss, the focusing exponent (2).
        label_threshold: a patch of a level is anomalous when its share of anomalous pixels exceeds it (0.3); the
            normal patches of ``L_A`` are the other patches whose share of foreground pixels exceeds it (the reference
            uses the one 0.3 rule for both).
        hard_samples: ``K_h`` of the hard KD loss, Eq. (11) (10).
        stage1_epochs: epochs of stage 1, anomaly amplification (100 in the paper; 0 skips it: RD + HKD on
            the vanilla teacher).
        stage2_epochs: epochs of stage 2, normality distillation (120 in the paper).
        lr: Adam learning rate of both stages (0.005, the paper's value for a training batch of 16; it is not
            scaled with the batch size: a warning at fit start says when the batch differs).
        betas: Adam ``(beta1, beta2)`` of both stages, each in [0, 1) ((0.5, 0.999)).
        lr_milestones: MultiStepLR milestones of each stage as fractions in (0, 1) of that stage's epochs
            ((0.8, 0.9)).
        lr_gamma: MultiStepLR decay factor at each milestone (0.2).
        anomaly_source_path: texture folder for synthetic anomalies. Default ``./datasets/dtd/images``, where
            ``anomalib-kd-dtd --root ./datasets/dtd`` puts DTD, the paper's textures; if that default folder is
            missing, or with ``None``, anomalib's Perlin-noise texture is used (a deviation from the paper, warned
            about at fit start). Another folder that is missing or has no images is an error at fit start.
        anomaly_probability: share of training images that receive a synthetic anomaly in stage 1 (0.8).
        blend_range: opacity range of the synthetic perturbation (0.2, 1.0), i.e. ``beta in [0, 0.8)``.
        foreground: foreground strategy for synthesis: ``"auto"`` (default: the paper's preset for the
            datamodule's category, whole image for unknown names), ``"none"`` (whole image), ``"bright"``,
            ``"dark"`` (inverted threshold) or ``"disk"`` (centred disk of radius 0.45 H).
        foreground_threshold: grey-level threshold in [0, 1] for ``"bright"`` / ``"dark"``; ``None`` = Otsu per
            image. With ``"auto"`` a value here replaces the preset's threshold (ignored, with a warning, when
            the preset is ``"disk"`` or ``"none"``).
        backbone_weights: local ``.safetensors`` / ``.pth`` file with the teacher's weights (written by
            ``anomalib-kd-weights export``), for machines without network: loaded instead of downloading, whatever
            ``pre_trained`` says; every teacher tensor must be in it with the right shape. ``load_from_checkpoint``
            does not need the file (the checkpoint holds the teacher). Provenance: ``model.teacher_provenance``.
        fast_inference: opt-in fast eval path: networks under autocast (fp16 on CUDA, bf16 on CPU) with
            channels-last weights, anomaly-map head in float32 (see ``anomalib_kd_base.fast``); exports are unaffected.
        **components: anomalib's ``pre_processor`` (default: resize to 256 x 256, the paper's size, and ImageNet
            normalisation), ``post_processor``, ``evaluator`` and ``visualizer``, declared once in
            :class:`anomalib_kd_base.model.KDModelBase` (the CLI's ``--model.pre_processor`` etc.).

    Multi-GPU (``Engine(strategy="ddp", devices=N)``, see :mod:`anomalib_kd_base.distributed`): DDP runs with
    ``find_unused_parameters=True`` (set by the model: each stage leaves the other stage's modules without
    gradients); every rank synthesises its own anomalies from its own seed (``rank_seed(base, global_rank)``);
    ``L_A`` pairs and the HKD top-K are taken within the rank's batch and DDP averages the gradients (the mean
    of the per-rank losses, not the loss of the concatenated batch). BatchNorm of the bottleneck / decoder is
    not synchronised by default (per-rank batch statistics; rank 0's running statistics, broadcast to all ranks
    before each validation); ``sync_batchnorm=True`` on the trainer switches to ``SyncBatchNorm``.
    """

    #: the state-dict prefix that identifies this model in a checkpoint (see anomalib_kd_base.resume)
    state_signature = "model.raa."

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
        anomaly_source_path: str | None = DTD_IMAGES,
        anomaly_probability: float = 0.8,
        blend_range: Sequence[float] = (0.2, 1.0),
        foreground: str = AUTO_FOREGROUND,
        foreground_threshold: float | None = None,
        backbone_weights: str | None = None,
        fast_inference: bool = False,
        **components: Any,  # noqa: ANN401
    ) -> None:
        super().__init__(**components)
        self.require_input_size(
            "AAND needs a fixed input size: give a pre_processor whose transform resizes the images."
        )
        if stage1_epochs < 0 or stage2_epochs < 1:
            msg = f"stage1_epochs must be >= 0 and stage2_epochs >= 1, got {stage1_epochs} and {stage2_epochs}"
            raise ValueError(msg)
        check_at_least("hard_samples (K_h)", hard_samples, 1)
        _validate_optimisation(lr, betas, lr_milestones, lr_gamma)
        check_choice("foreground", foreground, (AUTO_FOREGROUND, *FOREGROUND_STRATEGIES))
        self.stage1_epochs = int(stage1_epochs)
        self.stage2_epochs = int(stage2_epochs)
        self.lr = lr
        self.betas = tuple(betas)
        self.lr_milestones = tuple(lr_milestones)
        self.lr_gamma = lr_gamma
        self.label_threshold = label_threshold
        self.anomaly_source_path = anomaly_source_path
        # what stage 1 really uses: the folder, or None (default DTD folder absent / explicit problem, see on_fit_start)
        self._texture_problem = texture_folder_problem(anomaly_source_path)
        texture_source = anomaly_source_path if self._texture_problem is None else None
        self.foreground = foreground
        self.foreground_threshold = foreground_threshold

        self.model = self.build_network(
            AandModel, backbone, layers, pre_trained, backbone_weights, fast_inference,
            memory_size=memory_size, gate_temperature=gate_temperature,
        )
        # stage1_epochs=0 is "RD + HKD on the vanilla teacher": an untrained RAA must not perturb F_T
        self.model.amplification = self.stage1_epochs > 0
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
            anomaly_source_path=texture_source,
            probability=anomaly_probability,
            blend_range=tuple(blend_range),
            # "auto" is resolved per category at fit start (resolve_foreground); until then the whole image
            foreground="none" if foreground == AUTO_FOREGROUND else foreground,
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

    @staticmethod
    def configure_pre_processor(image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Bicubic resize to ``image_size`` (256 x 256 by default) and ImageNet normalisation.

        The public reference implementation resizes bicubically for training and testing; anomalib's default is
        bilinear. Ground-truth masks are resized with nearest neighbours (torchvision does so for ``Mask``).
        """
        image_size = image_size or (256, 256)
        return PreProcessor(
            transform=Compose([
                Resize(image_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
            ]),
        )

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
    def training_epochs(self) -> int:
        """Both stages, ``stage1_epochs + stage2_epochs``: the ``max_epochs`` of ``trainer_arguments``."""
        return self.stage1_epochs + self.stage2_epochs

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
        super().on_fit_start()  # this rank's synthesis stream is seeded (RankRandomness callback, before this hook)
        datamodule = getattr(self.trainer, "datamodule", None)
        train_data = getattr(datamodule, "train_data", None)
        if train_data is not None and len(train_data) == 0:
            msg = (
                "AAND needs normal training images, but the datamodule's training set is empty "
                f"(check data.root / data.category of {type(datamodule).__name__})."
            )
            raise ValueError(msg)
        self.check_texture_source()
        if self.trainer.is_global_zero:
            self._check_recipe(datamodule, world_size=self.trainer.world_size)
        else:  # every rank needs the same foreground, only rank 0 logs
            self.resolve_foreground(getattr(datamodule, "category", None), log=False)

    def resolve_foreground(self, category: str | None, log: bool = True) -> tuple[str, float | None]:
        """Set the synthesis foreground for ``category`` when ``foreground="auto"``; return ``(strategy, threshold)``.

        Explicit strategies are kept as given. Unknown category names use the whole image (with a notice).
        """
        if self.foreground != AUTO_FOREGROUND:
            return self.synthesizer.foreground, self.synthesizer.foreground_threshold
        strategy, threshold, known = foreground_preset(category)
        if self.foreground_threshold is not None and strategy in {"bright", "dark"}:
            threshold = self.foreground_threshold
        elif self.foreground_threshold is not None and log:
            logger.warning(
                "AAND foreground='auto' for category %r uses strategy %r, which has no threshold: "
                "foreground_threshold=%s is ignored (set --model.foreground bright/dark to use it).",
                category,
                strategy,
                self.foreground_threshold,
            )
        self.synthesizer.set_foreground(strategy, threshold)
        if log and known:
            logger.info("AAND foreground='auto' for category %r: strategy %r, threshold %s", category, strategy, threshold)
        elif log:
            logger.warning(
                "AAND foreground='auto': no preset for category %r, so synthetic anomalies may fall anywhere on the "
                "image (whole-image foreground). Set --model.foreground bright/dark/disk (and "
                "--model.foreground_threshold) to keep them on the product; check a choice with "
                "examples/foreground_preview.py.",
                category,
            )
        return strategy, threshold

    def check_texture_source(self) -> str | None:
        """The texture-source deviation from the paper, as the warning text (``None``: DTD-like folder in use).

        The folder is checked once, when the model is built (a folder that appears later needs a new model).

        Raises:
            ValueError: an explicitly given ``anomaly_source_path`` (not the default) is missing or has no images,
                or a texture folder (default included) holds images that anomalib's generator does not find.
        """
        if self.stage1_epochs == 0:
            return None
        if self.anomaly_source_path is None:
            reason = "anomaly_source_path=None"
        elif self._texture_problem is None:
            if not self.synthesizer.generator.anomaly_source_paths:
                msg = (
                    f"anomaly_source_path {str(self.anomaly_source_path)!r} holds images, but anomalib's "
                    "PerlinAnomalyGenerator found none of them: it matches lower-case suffixes only (*.jpg, *.png, "
                    "...), so files such as *.JPG or *.PNG are skipped and stage 1 would silently use Perlin noise. "
                    "Rename the files to lower-case suffixes."
                )
                raise ValueError(msg)
            return None
        elif Path(self.anomaly_source_path).expanduser().resolve() == Path(DTD_IMAGES).expanduser().resolve():
            reason = f"the default texture folder {DTD_IMAGES} did not exist (or was empty) when the model was built"
        else:
            raise ValueError(self._texture_problem)
        return (
            f"AAND deviates from the paper: no texture source ({reason}), so stage-1 anomalies are filled with "
            "anomalib's Perlin-noise texture instead of DTD textures. Download DTD once with "
            f"`{DTD_COMMAND}` (then {DTD_IMAGES} is used by default), or pass --model.anomaly_source_path <folder>."
        )

    def _check_recipe(self, datamodule: Any, world_size: int = 1) -> None:
        """Fit-start checks of the paper's recipe: foreground preset, texture source, batch size (see module doc)."""
        self.resolve_foreground(getattr(datamodule, "category", None))
        texture_warning = self.check_texture_source()
        if texture_warning is not None:
            logger.warning(texture_warning)
        batch_warning = batch_size_warning("AAND", datamodule, self.lr, world_size)
        if batch_warning is not None:
            logger.warning(batch_warning)

    def set_network_input_size(self, size: tuple[int, int]) -> None:
        """Re-size the anomaly map (``load_from_checkpoint`` restored another pre-processor, see ``KDModelBase``)."""
        self.model.set_input_size(size)

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
        """``(mean, std)`` of the pre-processor's ``Normalize``; identity (0, 1) when it has none.

        Images are de-normalised to [0, 1] for the synthesis and re-normalised after it. Without a ``Normalize``
        the batch already is in [0, 1], so the identity is the only correct fallback.
        """
        transform = self.pre_processor.transform if self.pre_processor else None
        normalize = _find_normalize(transform)
        mean = normalize.mean if normalize is not None else 0.0
        std = normalize.std if normalize is not None else 1.0
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
        with self.kd_random.activate(images.device):  # this rank's synthesis stream during fit
            augmented, mask, foreground = self.synthesizer((images * std + mean).clamp(0, 1))
        vanilla = self.model.teacher_features((augmented - mean) / std)
        sizes = [tuple(features.shape[-2:]) for features in vanilla]
        anomalous = [self.level_labels(mask, size) for size in sizes]
        advanced, _, logits, _ = self.model.amplify(vanilla, [labels.to(vanilla[0].dtype) for labels in anomalous])
        normal = []
        for labels, size in zip(anomalous, sizes, strict=True):
            candidates = ~labels
            # the reference's rule for the labels (pooled share > 0.3) also picks the foreground patches
            in_foreground = candidates & (F.adaptive_avg_pool2d(foreground, size) > self.label_threshold)
            normal.append(in_foreground if in_foreground.any() else candidates)
        with self.kd_random.activate(images.device):  # "subsample" pair draws
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

    # ------------------------------------------------------------------ introspection
    @staticmethod
    def foreground_preview(images: torch.Tensor, strategy: str, threshold: float | None = None) -> torch.Tensor:
        """Foreground masks AAND would use for synthesis on ``images`` in [0, 1] (to tune the strategy).

        ``strategy`` may be a category name with ``"auto:<category>"`` (e.g. ``"auto:screw"``) to preview a preset.
        """
        if strategy.startswith(f"{AUTO_FOREGROUND}:"):
            strategy, preset_threshold, _ = foreground_preset(strategy.split(":", 1)[1])
            threshold = preset_threshold if threshold is None else threshold
        return foreground_mask(images, strategy, threshold)


__all__ = ["Aand"]
