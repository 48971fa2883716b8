"""MemKD: Memory-guided Knowledge Distillation for unsupervised anomaly detection.

Lightning/anomalib implementation of Gu et al., "Remembering Normality: Memory-guided
Knowledge Distillation for Unsupervised Anomaly Detection", ICCV 2023. MemKD is Reverse
Distillation with three normality recall (NR) memories in the student decoder, trained
with ``L = L_KD + lambda_1 L_NM + lambda_2 L_Orth`` (Eq. 11) where ``L_NM`` makes the
memories' values reconstruct teacher features of ``N`` random normal training images
("exemplars") drawn at every iteration.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_memkd import MemKD
    >>> model = MemKD()  # WideResNet50-2 (torchvision ImageNet-V1 weights), 256 px
    >>> engine = Engine()
    >>> engine.fit(model, datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP

or from the stock CLI: ``anomalib train --model MemKD --data anomalib.data.MVTecAD``.

See :mod:`anomalib_memkd.torch_model` for the architecture (memory placement, exemplar
targets) and :mod:`anomalib_memkd.loss` for the exact loss definitions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import optim
from torch.utils.data import DataLoader, RandomSampler

from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer

from anomalib_kd.distributed import DistributedTrainingMixin
from anomalib_kd.export import ProvenanceExportMixin
from anomalib_kd.quantization import AnomalyMapPTQMixin

from .loss import MemKDLoss
from .torch_model import MemKDModel, check_input_size

logger = logging.getLogger(__name__)


def _cycle(loader: DataLoader) -> Iterator[Any]:
    """Iterate a (reshuffling) data loader forever."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:  # pragma: no cover - guarded by the clamp in _build_exemplar_iterator
            msg = "The exemplar data loader is empty."
            raise RuntimeError(msg)


class MemKD(DistributedTrainingMixin, ProvenanceExportMixin, AnomalyMapPTQMixin, AnomalibModule):
    """Memory-guided Knowledge Distillation (MemKD) anomaly detector.

    Args:
        backbone (str): Teacher backbone as a timm name; a pretrained tag selects the
            weights. Defaults to ``"wide_resnet50_2.tv_in1k"`` (torchvision ImageNet-V1
            weights, those used by RD and MemKD). The bottleneck and student decoder use
            the bare architecture name (``backbone.split(".")[0]``).
        layers (Sequence[str]): Three teacher layers. Defaults to ``("layer1", "layer2", "layer3")``.
        pre_trained (bool): Load the teacher's pretrained weights. Defaults to ``True``.
        memory_size (int): Key-value items ``L`` per NR memory. Defaults to ``50`` (paper).
        num_exemplars (int): Normal exemplar images ``N`` drawn at random from the training
            set at every training iteration. Clamped, with a logged warning, to the size of
            the training set. Defaults to ``16`` (paper).
        lambda_nm (float): Weight ``lambda_1`` of the normality memorisation loss. Defaults to ``0.1``.
        lambda_orth (float): Weight ``lambda_2`` of the orthogonality loss. Defaults to ``0.1``.
        temperature (float): Softmax temperature over the cosine similarities of Eq. 5 and
            Eq. 8; ``1.0`` is the paper. Defaults to ``1.0``.
        lr (float): Adam learning rate. Defaults to ``0.005`` (paper).
        betas (tuple[float, float]): Adam betas. Defaults to ``(0.5, 0.999)``.
        epochs (int): Training epochs (``max_epochs`` of the trainer). Defaults to ``100`` (paper).
        backbone_weights (str | None): Local ``.safetensors`` / ``.pth`` file with the teacher's
            weights (written by ``anomalib-kd-weights export``), for machines without network: loaded
            instead of downloading, whatever ``pre_trained`` says; every teacher tensor must be in it
            with the right shape. ``load_from_checkpoint`` does not need the file (the checkpoint holds
            the teacher). Provenance: ``model.teacher_provenance``. Defaults to ``None``.
        fast_inference (bool): Opt-in fast eval path: networks under autocast (fp16 on CUDA, bf16 on
            CPU) with channels-last weights, anomaly-map head in float32 (see ``anomalib_kd.fast``);
            exports are unaffected. Defaults to ``False``.
        pre_processor (PreProcessor | bool): Pre-processor (resize + ImageNet normalisation;
            256x256 by default). Its output size must be a multiple of 32. Defaults to ``True``.
        post_processor (PostProcessor | bool): Post-processor. Defaults to ``True``.
        evaluator (Evaluator | bool): Evaluator. Defaults to ``True``.
        visualizer (Visualizer | bool): Visualizer. Defaults to ``True``.

    Training draws the exemplars through a separate ``DataLoader`` over the fitted
    datamodule's ``train_data`` (random sampler, ``batch_size=num_exemplars``,
    ``drop_last=True``, the datamodule's ``num_workers`` and collate function); the
    pre-processor's transform is applied to them (anomalib's ``PreProcessor`` callback only
    transforms ``batch.image``). Training therefore needs a datamodule:
    ``engine.fit(model, datamodule=...)`` or the CLI.

    ``trainer_arguments`` set ``max_epochs=epochs`` (the paper's 100 by default). anomalib's
    ``Engine`` lets a model's trainer arguments override the user's, so the schedule length is
    the ``epochs`` argument (``--model.epochs`` on the CLI); ``max_steps`` still bounds it further.

    Multi-GPU (``Engine(strategy="ddp", devices=N)``, see :mod:`anomalib_kd.distributed`): each rank draws
    its exemplars from the whole training set with its own generator, seeded with
    ``rank_seed(base, global_rank)`` at fit start (distinct per rank, reproducible for a seeded run); ``L_NM``
    and ``L_KD`` are computed on the rank's exemplars and batch, and DDP averages the gradients. BatchNorm of the
    bottleneck / decoder is not synchronised by default (per-rank batch statistics; rank 0's running statistics,
    broadcast to all ranks before each validation); ``sync_batchnorm=True`` on the trainer switches to
    ``SyncBatchNorm``.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = True,
        memory_size: int = 50,
        num_exemplars: int = 16,
        lambda_nm: float = 0.1,
        lambda_orth: float = 0.1,
        temperature: float = 1.0,
        lr: float = 0.005,
        betas: tuple[float, float] = (0.5, 0.999),
        epochs: int = 100,
        fast_inference: bool = False,
        backbone_weights: str | None = None,
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
            msg = (
                "Input size is required for MemKD: give it a pre-processor whose transform resizes the images, "
                "e.g. MemKD(pre_processor=MemKD.configure_pre_processor(image_size=(256, 256)))."
            )
            raise ValueError(msg)
        check_input_size(*self.input_size)
        if num_exemplars < 1:
            msg = f"num_exemplars must be at least 1, got {num_exemplars}."
            raise ValueError(msg)
        if epochs < 1:
            msg = f"epochs must be at least 1, got {epochs}."
            raise ValueError(msg)
        if lr <= 0:
            msg = f"lr must be positive, got {lr}."
            raise ValueError(msg)

        self.backbone = backbone
        self.layers = layers
        self.pre_trained = pre_trained
        self.memory_size = memory_size
        self.num_exemplars = num_exemplars
        self.epochs = int(epochs)
        self.lr = lr
        self.betas = (float(betas[0]), float(betas[1]))

        self.model: MemKDModel = MemKDModel(
            backbone=backbone,
            input_size=tuple(self.input_size),
            layers=layers,
            pre_trained=pre_trained,
            memory_size=memory_size,
            temperature=temperature,
            backbone_weights=backbone_weights,
        )
        self.model.set_fast_inference(fast_inference)
        self.loss = MemKDLoss(lambda_nm=lambda_nm, lambda_orth=lambda_orth)
        self._exemplar_iterator: Iterator[Any] | None = None

    # ------------------------------------------------------------------ exemplars
    def _build_exemplar_iterator(self) -> Iterator[Any]:
        """Infinite iterator of ``num_exemplars`` random normal training images per batch."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        dataset = getattr(datamodule, "train_data", None) if datamodule is not None else None
        if dataset is None:
            msg = (
                f"MemKD draws num_exemplars={self.num_exemplars} normal exemplar images from the training set at every "
                "iteration (normality embedding learning) and needs the trainer's datamodule for that, but none is "
                "attached (or it has no `train_data`). Train it through a datamodule, e.g. "
                "`Engine().fit(model, datamodule=MVTecAD(...))` or the anomalib CLI."
            )
            raise RuntimeError(msg)
        dataset_size = len(dataset)
        if dataset_size == 0:
            msg = "MemKD cannot draw exemplars: the datamodule's training set is empty."
            raise RuntimeError(msg)
        num_exemplars = self.num_exemplars
        if num_exemplars > dataset_size:
            logger.warning(
                "MemKD: num_exemplars=%d exceeds the %d training images; drawing %d exemplars per iteration instead.",
                num_exemplars,
                dataset_size,
                dataset_size,
            )
            num_exemplars = dataset_size
        collate_fn = getattr(datamodule, "external_collate_fn", None) or dataset.collate_fn
        # During fit: this rank's own reproducible stream (see DistributedTrainingMixin); else the global RNG.
        seed = getattr(self, "rank_stream_seed", None)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        loader = DataLoader(
            dataset,
            batch_size=num_exemplars,
            sampler=RandomSampler(dataset, generator=generator),
            drop_last=True,
            num_workers=int(getattr(datamodule, "num_workers", 0) or 0),
            collate_fn=collate_fn,
            generator=generator,
        )
        return _cycle(loader)

    def _next_exemplars(self) -> torch.Tensor:
        """Next exemplar images, on the model's device and pre-processed like ``batch.image``."""
        if self._exemplar_iterator is None:
            self._exemplar_iterator = self._build_exemplar_iterator()
        batch = next(self._exemplar_iterator)
        images = batch.image.to(self.device)
        transform = getattr(self.pre_processor, "transform", None) if self.pre_processor is not None else None
        if transform is not None:
            images = transform(images)
        return images

    def on_fit_start(self) -> None:
        """Forget any exemplar iterator of a previous fit (the datamodule may have changed)."""
        super().on_fit_start()
        self._exemplar_iterator = None

    def on_train_epoch_start(self) -> None:
        """Create the infinite exemplar iterator once per fit."""
        super().on_train_epoch_start()
        if self._exemplar_iterator is None:
            self._exemplar_iterator = self._build_exemplar_iterator()

    def on_fit_end(self) -> None:
        """Release the exemplar loader (and its workers)."""
        super().on_fit_end()
        self._exemplar_iterator = None

    # ------------------------------------------------------------------ steps
    def configure_optimizers(self) -> optim.Adam:
        """Adam over the bottleneck, the student decoder and the NR memories (the teacher is frozen)."""
        params = [
            *self.model.bottleneck.parameters(),
            *self.model.decoder.parameters(),
            *self.model.memories.parameters(),
        ]
        return optim.Adam(params=params, lr=self.lr, betas=self.betas)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One MemKD iteration: draw exemplars, distil, memorise, orthogonalise (Eq. 11).

        Logs ``train_loss`` (total) and the unweighted terms ``train/kd``, ``train/nm``, ``train/orth``.
        """
        del args, kwargs  # These variables are not used.
        exemplars = self._next_exemplars()
        outputs = self.model(batch.image, exemplars)
        losses = self.loss(
            outputs.teacher_features,
            outputs.student_features,
            self.model.memories,
            outputs.exemplar_features,
        )
        batch_size = batch.image.shape[0]
        self.log("train_loss", losses.loss.detach(), on_epoch=True, prog_bar=True, logger=True, batch_size=batch_size)
        self.log("train/kd", losses.kd.detach(), on_epoch=True, logger=True, batch_size=batch_size)
        self.log("train/nm", losses.nm.detach(), on_epoch=True, logger=True, batch_size=batch_size)
        self.log("train/orth", losses.orth.detach(), on_epoch=True, logger=True, batch_size=batch_size)
        return {"loss": losses.loss}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict anomaly maps and scores for a validation batch (Eq. 3-4)."""
        del args, kwargs  # These variables are not used.
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore components, then size the anomaly map to the restored pre-processor's output.

        ``load_from_checkpoint`` builds the model with the default pre-processor (256 px)
        before the checkpoint's pre-processor configuration is restored; without this the
        anomaly map of a model trained at another size would come out at 256 px.
        """
        super().on_load_checkpoint(checkpoint)
        input_size = self.input_size
        if input_size is not None:
            self.model.input_size = tuple(input_size)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No gradient clipping, no sanity validation, ``epochs`` epochs (the paper's 100 by default)."""
        return {"gradient_clip_val": 0, "num_sanity_val_steps": 0, "max_epochs": self.epochs}

    @property
    def learning_type(self) -> LearningType:
        """MemKD learns from normal images only."""
        return LearningType.ONE_CLASS
