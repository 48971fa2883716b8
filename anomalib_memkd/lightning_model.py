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

from anomalib.data import Batch
from anomalib.models.components import AnomalibModule

from anomalib_kd_base.model import KDModelBase, batch_size_warning, check_at_least, check_positive

from .loss import MemKDLoss
from .torch_model import MemKDModel, check_input_size

logger = logging.getLogger(__name__)


def _empty_training_set_message(datamodule: Any) -> str:
    root = getattr(datamodule, "root", None)
    category = getattr(datamodule, "category", None)
    where = f" (root={str(root)!r}, category={category!r})" if root is not None else ""
    return (
        f"MemKD needs normal training images, but the training set of {type(datamodule).__name__}{where} is empty: "
        "check the data root / category (the train/good folder) of the datamodule."
    )


class MemKD(KDModelBase, AnomalibModule):
    """Memory-guided Knowledge Distillation (MemKD) anomaly detector.

    The paper trains with batch 16 and Adam lr 0.005: at fit start a global training batch other than 16 with the
    default lr logs a warning naming ``--data.train_batch_size 16`` (the lr is never rescaled; anomalib's default
    batch is 32).

    Args:
        backbone (str): Teacher backbone as a timm name; a pretrained tag selects the
            weights. Defaults to ``"wide_resnet50_2.tv_in1k"`` (torchvision ImageNet-V1
            weights, those used by RD and MemKD). The bottleneck and student decoder use
            the bare architecture name (``backbone.split(".")[0]``).
        layers (Sequence[str]): Three teacher layers. Defaults to ``("layer1", "layer2", "layer3")``.
        pre_trained (bool): Load the teacher's pretrained weights. Defaults to ``True``.
        memory_size (int | Sequence[int]): Key-value items ``L`` per NR memory: one value for the three, or
            ``(L_1, L_2, L_3)`` for the memories of teacher ``layer1, layer2, layer3`` (Tab. 4b's order).
            Defaults to ``50`` (50/50/50: the paper's setting, best image AUROC in Tab. 4b).
        num_exemplars (int): Normal exemplar images ``N`` drawn at random from the training
            set at every training iteration, never from the step's own batch (see below). Clamped, with a
            logged warning, to what the training set allows. Defaults to ``16`` (paper).
        lambda_nm (float): Weight ``lambda_1`` of the normality memorisation loss. Defaults to ``0.1`` (paper).
        lambda_orth (float): Weight ``lambda_2`` of the orthogonality loss. Defaults to ``0.1`` (paper).
        temperature (float): Softmax temperature ``tau`` over the cosine similarities of Eq. 5 and
            Eq. 8. Defaults to ``1.0``, the paper's formula (no temperature); see "Temperature" below.
        nm_reduction (str): ``L_NM`` reduction: ``"mean"`` (per element) or ``"sum"`` (Eq. 10 as written,
            summed over ``C*H*W``, the paper). Defaults to ``"sum"`` (see "Temperature" below and
            :mod:`anomalib_memkd.loss`).
        orth_form (str): ``d`` of ``L_Orth`` (Eq. 7, ambiguous: Eq. 1 defines ``d`` as a cosine distance, Eq. 5 as a
            similarity): ``"abs"`` (mean ``|cos(k_i, v_j)|``, 0 iff keys and values are pairwise orthogonal, the
            paper's stated aim), ``"signed"`` (mean ``cos``, Eq. 5's similarity as written: minimised by
            anti-aligning keys and values) or ``"distance"`` (mean ``1 - cos``, Eq. 1's distance: minimised by
            aligning them). Defaults to ``"abs"`` (see :mod:`anomalib_memkd.loss`).
        use_memory (bool): ``False`` is the "memory off" ablation: anomalib's plain RD decoder of the same width,
            no memories, no ``L_NM`` / ``L_Orth`` (MemKD's recipe otherwise). Defaults to ``True``.
        lr (float): Adam learning rate. Defaults to ``0.005`` (paper).
        betas (tuple[float, float]): Adam betas. Defaults to ``(0.5, 0.999)``, RD's: the paper gives none.
        epochs (int): Training epochs (``max_epochs`` of the trainer). Defaults to ``100`` (paper).
        backbone_weights (str | None): Local ``.safetensors`` / ``.pth`` file with the teacher's
            weights (written by ``anomalib-kd-weights export``), for machines without network: loaded
            instead of downloading, whatever ``pre_trained`` says; every teacher tensor must be in it
            with the right shape. ``load_from_checkpoint`` does not need the file (the checkpoint holds
            the teacher). Provenance: ``model.teacher_provenance``. Defaults to ``None``.
        fast_inference (bool): Opt-in fast eval path: networks under autocast (fp16 on CUDA, bf16 on
            CPU) with channels-last weights, anomaly-map head in float32 (see ``anomalib_kd_base.fast``);
            exports are unaffected. Defaults to ``False``.
        **components: anomalib's ``pre_processor`` (resize + ImageNet normalisation, 256x256 by default; its
            output size must be a multiple of 32), ``post_processor``, ``evaluator`` and ``visualizer``, declared
            once in :class:`anomalib_kd_base.model.KDModelBase` (the CLI's ``--model.pre_processor`` etc.).

    **Exemplars.** Training draws the exemplars through one separate ``DataLoader`` over the fitted
    datamodule's ``train_data``, built once per fit and reused across epochs (random sampler,
    ``drop_last=True``, the datamodule's ``num_workers`` with ``persistent_workers`` and its collate function);
    the pre-processor's transform is applied to them (anomalib's ``PreProcessor`` callback only
    transforms ``batch.image``). The paper assumes "the current sample is different from the N normal samples": each
    draw holds ``N + B`` random training images (``B``: the datamodule's ``train_batch_size``), those of the step's
    own batch (by ``image_path``) are dropped and ``N`` of the others are used. With fewer than ``N + B`` training
    images the step uses all ``|train| - B`` images outside its batch (``N`` clamped, with a warning); when the
    whole training set fits in one batch the exemplars cannot avoid it and are drawn from the whole set (warning).
    Without ``image_path`` in the batches, or without the datamodule's ``train_batch_size``, the exclusion is impossible
    and the exemplars may overlap the batch: a warning says so, once per fit.
    Training needs a datamodule: ``engine.fit(model, datamodule=...)`` or the CLI; an empty training set or a
    datamodule without ``train_data`` get MemKD's own error at fit start, and anomalous training images a warning.

    **The paper's recipe** is these defaults (``configs/memkd.yaml`` writes every one of them out) with a training
    batch of 16 (the datamodule's ``train_batch_size``; anomalib's default is 32). Every departure
    from the paper, and every interpretation of it (memory placement, Adam betas, the form of ``L_Orth``), is in
    the table of docs/memkd.md ("Method choices where the paper is silent").

    **Temperature** (``temperature``, default 1.0: the paper's Eq. 5 and 8 have none) and **L_NM scale**
    (``nm_reduction``, default ``"sum"``: Eq. 10 as written; ``"mean"`` is per element). Measured together (docs/memkd.md,
    "Addressing evidence"; WRN50 channels 256 / 512 / 1024, random-init teacher with calibrated BatchNorm, 128 px
    generated data, 24 optimiser steps, seeds 0-2; m0/m1/m2 = teacher layer1/2/3):

    ========= ====== ============================== ================== ============== ==============
    tau, L_NM phase  peak read weight x L, m0/m1/m2 entropy / log L    image AUROC    pixel AUROC
    ========= ====== ============================== ================== ============== ==============
    1.0, sum  random 1.14 / 1.11 / 1.08             1.00 / 1.00 / 1.00
    1.0, sum  before 1.15 / 1.10 / 1.07             1.00 / 1.00 / 1.00
    1.0, sum  after  1.14 / 1.10 / 1.07             1.00 / 1.00 / 1.00 0.468 +- 0.029 0.931 +- 0.040
    0.1, mean random 3.35 / 2.53 / 2.02             0.95 / 0.98 / 0.99
    0.1, mean before 3.56 / 2.49 / 1.99             0.95 / 0.98 / 0.99
    0.1, mean after  3.62 / 2.48 / 1.98             0.95 / 0.98 / 0.99 0.759 +- 0.086 0.951 +- 0.021
    ========= ====== ============================== ================== ============== ==============

    ("random": a fresh random memory read by a random ReLU query; "before" / "after": the model before and after
    training.) Training did not make the recall selective at either temperature: at ``tau = 1`` it is the mean of
    the values whatever the query (the logits, cosines in [-1, 1], span at most 2), and the selectivity at
    ``tau = 0.1`` is what that temperature does to random keys. At this 24-step schedule ``0.1`` / ``"mean"`` had the
    higher image AUROC on every seed (pixel AUROC the same), but the two options were not separated, the teacher was a
    proxy, and a 48-step ``tau = 1`` / ``"sum"`` run (seed 0) reached 0.934 / 0.973, above every 24-step ``0.1`` run:
    the measurement shows faster convergence on a short schedule, not a better model at the paper's 100 epochs, so the
    defaults are the paper's formulas and ``temperature=0.1, nm_reduction="mean"`` are documented options. With the sum,
    ``L_NM`` is the per-element error times ``C*H*W`` (1e3-1e6 per memory) and its gradient alone sets the values'
    Adam step; per element it is on the scale of ``L_KD``. ``train/nm_sum`` and ``train/nm_mean`` log both figures
    whatever the choice.

    ``trainer_arguments`` set ``max_epochs=epochs`` (the paper's 100 by default). anomalib's
    ``Engine`` lets a model's trainer arguments override the user's, so the schedule length is
    the ``epochs`` argument (``--model.epochs`` on the CLI); ``max_steps`` still bounds it further.

    Multi-GPU (``Engine(strategy="ddp", devices=N)``, see :mod:`anomalib_kd_base.distributed`): each rank draws
    its exemplars from the whole training set with its own generator, seeded with
    ``rank_seed(base, global_rank)`` at fit start (distinct per rank, reproducible for a seeded run); ``L_NM``
    and ``L_KD`` are computed on the rank's exemplars and batch, and DDP averages the gradients. BatchNorm of the
    bottleneck / decoder is not synchronised by default (per-rank batch statistics; rank 0's running statistics,
    broadcast to all ranks before each validation); ``sync_batchnorm=True`` on the trainer switches to
    ``SyncBatchNorm``.
    """

    #: the state-dict prefix that identifies this model in a checkpoint (see anomalib_kd_base.resume)
    state_signature = "model.memories."

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = True,
        memory_size: int | Sequence[int] = 50,
        num_exemplars: int = 16,
        lambda_nm: float = 0.1,
        lambda_orth: float = 0.1,
        temperature: float = 1.0,
        nm_reduction: str = "sum",
        orth_form: str = "abs",
        use_memory: bool = True,
        lr: float = 0.005,
        betas: tuple[float, float] = (0.5, 0.999),
        epochs: int = 100,
        fast_inference: bool = False,
        backbone_weights: str | None = None,
        **components: Any,  # noqa: ANN401
    ) -> None:
        super().__init__(**components)
        input_size = self.require_input_size(
            "Input size is required for MemKD: give it a pre-processor whose transform resizes the images, "
            "e.g. MemKD(pre_processor=MemKD.configure_pre_processor(image_size=(256, 256)))."
        )
        check_input_size(*input_size)
        check_at_least("num_exemplars", num_exemplars, 1, sentence=True)
        check_at_least("epochs", epochs, 1, sentence=True)
        check_positive("lr", lr, sentence=True)

        self.backbone = backbone
        self.layers = layers
        self.pre_trained = pre_trained
        self.memory_size = memory_size
        self.num_exemplars = num_exemplars
        self.epochs = int(epochs)
        self.lr = lr
        self.betas = (float(betas[0]), float(betas[1]))

        self.model: MemKDModel = self.build_network(
            MemKDModel, backbone, layers, pre_trained, backbone_weights, fast_inference,
            memory_size=memory_size, temperature=temperature, use_memory=use_memory,
        )
        self.loss = MemKDLoss(
            lambda_nm=lambda_nm, lambda_orth=lambda_orth, nm_reduction=nm_reduction, orth_form=orth_form
        )
        self._exemplar_iterator: Iterator[Any] | None = None
        self._exemplar_loader: DataLoader | None = None
        self._exemplars_per_step = num_exemplars
        self._overlap_warned: set[str] = set()  # reasons already warned about in this fit (see _warn_overlap_once)

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
            raise ValueError(_empty_training_set_message(datamodule))
        batch_size = int(getattr(datamodule, "train_batch_size", 0) or 0)
        if batch_size < 1:
            self._warn_overlap_once(
                "batch size",
                f"{type(datamodule).__name__} has no train_batch_size, so the exemplar draw cannot hold the B extra "
                "images that keep num_exemplars images outside the step's batch",
            )
        num_exemplars = self.num_exemplars
        outside = dataset_size - batch_size  # images that are never in a given step's batch
        if outside < 1:
            logger.warning(
                "MemKD: the %d training images all fit in one batch of %d, so the exemplars cannot be kept out of the "
                "batch; drawing min(num_exemplars=%d, %d) exemplars from the whole training set.",
                dataset_size,
                batch_size,
                num_exemplars,
                dataset_size,
            )
            num_exemplars = min(num_exemplars, dataset_size)
            draw = num_exemplars
        else:
            if num_exemplars > outside:
                logger.warning(
                    "MemKD: num_exemplars=%d exceeds the %d training images outside a batch of %d (the training set "
                    "has %d); drawing %d exemplars per iteration instead.",
                    num_exemplars,
                    outside,
                    batch_size,
                    dataset_size,
                    outside,
                )
                num_exemplars = outside
            draw = min(num_exemplars + batch_size, dataset_size)  # enough that N remain once the batch is removed
        self._exemplars_per_step = num_exemplars
        workers = int(getattr(datamodule, "num_workers", 0) or 0)
        collate_fn = getattr(datamodule, "external_collate_fn", None) or dataset.collate_fn
        # During fit: this rank's own reproducible stream (KDModelBase.kd_random.seed); else the global RNG.
        # The sampler's generator is consumed by the sampler only (one permutation per pass), which is what
        # ResumableCycle saves and replays. The loader gets its own generator (seed + 1): every new loader iterator
        # draws its workers' base seed from it, and a resumed fit creates a new iterator where an uninterrupted one
        # reuses its persistent workers, so a shared generator would shift every later permutation after a resume.
        seed = self.kd_random.seed
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        loader_generator = torch.Generator().manual_seed(seed + 1) if seed is not None else None
        loader = DataLoader(
            dataset,
            batch_size=draw,
            sampler=RandomSampler(dataset, generator=generator),
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,  # the same workers serve every pass over the training set
            collate_fn=collate_fn,
            generator=loader_generator,
        )
        self._exemplar_loader = loader
        return self.kd_random.cycle(loader, generator, name="exemplars")  # position saved in checkpoints

    def _next_exemplars(self, batch: Batch | None = None) -> torch.Tensor:
        """Next exemplar images, none of them in ``batch``, on the model's device and pre-processed like ``batch.image``.

        The exemplar loader draws ``N + B`` random training images (``B``: the datamodule's training batch size);
        those whose ``image_path`` is in ``batch`` are dropped and the first ``N`` of the rest are kept.
        """
        if self._exemplar_iterator is None:
            self._exemplar_iterator = self._build_exemplar_iterator()
        drawn = next(self._exemplar_iterator)
        images = drawn.image
        keep = list(range(images.shape[0]))
        batch_paths = getattr(batch, "image_path", None) if batch is not None else None
        drawn_paths = getattr(drawn, "image_path", None)
        if batch_paths is not None and drawn_paths is not None:
            excluded = {str(path) for path in batch_paths}
            outside = [i for i, path in enumerate(drawn_paths) if str(path) not in excluded]
            keep = outside or keep  # only empty when the batch is the whole training set (warned at build)
        elif batch is not None:
            self._warn_overlap_once(
                "image_path",
                f"the {'training batch' if batch_paths is None else 'exemplar draw'} has no image_path, so the "
                "exemplars cannot be told apart from the step's batch",
            )
        keep = keep[: self._exemplars_per_step]
        if len(keep) < images.shape[0]:
            images = images[keep]
        images = images.to(self.device)
        transform = getattr(self.pre_processor, "transform", None) if self.pre_processor is not None else None
        if transform is not None:
            images = transform(images)
        return images

    def _warn_overlap_once(self, reason: str, detail: str) -> None:
        """Warn, once per fit and reason, that the exemplars may overlap the step's batch (the paper assumes not)."""
        if reason in self._overlap_warned:
            return
        self._overlap_warned.add(reason)
        logger.warning("MemKD: %s; the exemplars may include images of the current batch.", detail)

    def on_fit_start(self) -> None:
        """Check the datamodule (before Lightning builds its training loader) and forget any previous exemplar loader."""
        super().on_fit_start()
        self._exemplar_iterator = None
        self._overlap_warned = set()
        self._check_datamodule()
        if self.trainer.is_global_zero:
            self._check_recipe(getattr(self.trainer, "datamodule", None), world_size=self.trainer.world_size)

    def _check_recipe(self, datamodule: Any, world_size: int = 1) -> None:  # noqa: ANN401
        """Fit-start check of the paper's recipe: a global training batch other than 16 with lr 0.005 warns."""
        warning = batch_size_warning("MemKD", datamodule, self.lr, world_size)
        if warning is not None:
            logger.warning(warning)

    def _check_datamodule(self) -> None:
        """MemKD's own messages for datamodule misuse, raised before torch's (e.g. ``num_samples=0``)."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is None:
            return  # the exemplar loader explains it at the first step (trainer.fit with bare dataloaders)
        dataset = getattr(datamodule, "train_data", None)
        if dataset is None:
            msg = (
                f"MemKD draws normal exemplar images from the datamodule's training set, but {type(datamodule).__name__} "
                "has no `train_data` after setup('fit'). Use an anomalib datamodule (e.g. MVTecAD, Folder)."
            )
            raise RuntimeError(msg)
        if len(dataset) == 0:
            raise ValueError(_empty_training_set_message(datamodule))
        samples = getattr(dataset, "samples", None)
        labels = getattr(samples, "label_index", None) if samples is not None else None
        if labels is not None:
            anomalous = int((labels.to_numpy() != 0).sum()) if hasattr(labels, "to_numpy") else 0
            if anomalous:
                logger.warning(
                    "MemKD learns from normal images only, but %d of the %d training images of %s are labelled "
                    "anomalous: they will be distilled and drawn as 'normal' exemplars.",
                    anomalous,
                    len(dataset),
                    type(datamodule).__name__,
                )

    def on_train_epoch_start(self) -> None:
        """Create the infinite exemplar iterator once per fit."""
        super().on_train_epoch_start()
        if self._exemplar_iterator is None:
            self._exemplar_iterator = self._build_exemplar_iterator()

    def on_fit_end(self) -> None:
        """Release the exemplar loader (and its workers)."""
        super().on_fit_end()
        self._exemplar_iterator = None
        self._exemplar_loader = None

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

        Logs ``train_loss`` (total) and the unweighted terms ``train/kd``, ``train/nm`` (the configured reduction),
        ``train/orth``, and both ``L_NM`` figures: ``train/nm_sum`` (Eq. 10 as written) and ``train/nm_mean``
        (per element).
        """
        del args, kwargs  # These variables are not used.
        exemplars = self._next_exemplars(batch) if self.model.use_memory else None
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
        self.log("train/nm_sum", losses.nm_sum, on_epoch=True, logger=True, batch_size=batch_size)
        self.log("train/nm_mean", losses.nm_mean, on_epoch=True, logger=True, batch_size=batch_size)
        self.log("train/orth", losses.orth.detach(), on_epoch=True, logger=True, batch_size=batch_size)
        return {"loss": losses.loss}

    @property
    def training_epochs(self) -> int:
        """``epochs`` (the paper's 100 by default): the ``max_epochs`` of ``trainer_arguments``."""
        return self.epochs
