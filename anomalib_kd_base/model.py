"""What the Lightning models ``Aand`` and ``MemKD`` share: argument checks, the teacher, callbacks, checkpoints.

``class Aand(KDModelBase, AnomalibModule)``: ``AnomalibModule`` stays a direct base (anomalib's model lookup walks
its ``__subclasses__()``). Run-time behaviours are the callbacks ``configure_callbacks`` adds (the same instances in
every ``fit`` / ``test`` / ...: Lightning restores their state by ``state_key``); the base's own hooks are model state
or must run before any callback hook (``prepare_data``). The four components: docs/development.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import Any, NoReturn

from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import AUPR, AUPRO, AUROC, Evaluator, F1Score
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from . import distributed
from .checks import check_datamodule_layout
from .export import CHECKPOINT_KEY, ProvenanceExportMixin
from .quantization import AnomalyMapPTQMixin
from .resume import MODEL_KEY, RunGuards, attached_trainer, data_checks_on, model_record, refuse_other_model
from .upstream import install_engine_hook
from .weights import restoring

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ argument checks
def _fail(name: str, requirement: str, value: Any, sentence: bool) -> NoReturn:  # noqa: ANN401
    """``sentence``: MemKD's wording (``"at least"`` / ``"positive"`` and a full stop)."""
    msg = f"{name} must be {requirement}, got {value}{'.' if sentence else ''}"
    raise ValueError(msg)


def check_at_least(name: str, value: float, minimum: float, *, sentence: bool = False) -> None:
    """``ValueError("<name> must be >= <minimum>, got <value>")`` unless ``value >= minimum`` (``sentence``: _fail)."""
    if not value >= minimum:
        _fail(name, f"at least {minimum}" if sentence else f">= {minimum}", value, sentence)


def check_positive(name: str, value: float, *, sentence: bool = False) -> None:
    """``ValueError("<name> must be > 0, got <value>")`` unless ``value > 0`` (NaN is not; ``sentence``: MemKD's)."""
    if not value > 0:
        _fail(name, "positive" if sentence else "> 0", value, sentence)


def check_choice(name: str, value: Any, choices: Collection[Any], *, sentence: bool = False) -> None:  # noqa: ANN401
    """``ValueError("<name> must be one of <choices as a tuple>, got <value!r>")`` unless ``value in choices``."""
    if value not in choices:
        _fail(name, f"one of {tuple(choices)}", repr(value), sentence)


# ------------------------------------------------------------------ input size
#: total stride of the teacher's layer3 (16) and the RD bottleneck's extra stride-2 convolution: anomalib's RD
#: bottleneck and decoder reproduce the teacher's feature shapes only for image sides that are multiples of it
SIZE_MULTIPLE = 32


def check_size_multiple(height: int, width: int, message: str, minimum: int = 0) -> None:
    """Raise ``ValueError(message)`` unless both sides are multiples of :data:`SIZE_MULTIPLE` and ``>= minimum``."""
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE or min(height, width) < minimum:
        raise ValueError(message)


# ------------------------------------------------------------------ the papers' recipe
PAPER_BATCH_SIZE = 16  # both papers: "batch size 16" with Adam lr 0.005
PAPER_LR = 0.005


def batch_size_warning(model: str, datamodule: Any, lr: float, world_size: int = 1) -> str | None:  # noqa: ANN401
    """The warning for a global training batch other than the papers' 16 with their lr 0.005, else ``None`` (the lr
    is never rescaled: no rule in either paper; another lr is the user's choice and not warned)."""
    batch_size = getattr(datamodule, "train_batch_size", None)
    if not isinstance(batch_size, int) or lr != PAPER_LR:
        return None
    world_size = max(1, int(world_size or 1))
    if batch_size * world_size == PAPER_BATCH_SIZE:
        return None
    per_rank = f" ({batch_size} per rank x {world_size} ranks)" if world_size > 1 else ""
    advice = f"--data.train_batch_size {PAPER_BATCH_SIZE}"
    if world_size > 1:
        advice = f"--data.train_batch_size {max(1, PAPER_BATCH_SIZE // world_size)} (per rank, {world_size} ranks)"
    return (
        f"{model}: training batch size {batch_size * world_size}{per_rank} with the paper's lr {PAPER_LR}, which the "
        f"paper uses with batch {PAPER_BATCH_SIZE}; the lr is not scaled. Pass {advice} to train as in the paper, or "
        "set --model.lr for your batch size."
    )


# ------------------------------------------------------------------ the Lightning base
class KDModelBase(ProvenanceExportMixin, AnomalyMapPTQMixin):
    """Lightning boilerplate of ``Aand`` and ``MemKD``: a model sets ``self.model`` (from :meth:`build_network`) and
    defines :attr:`training_epochs`."""

    model: nn.Module
    #: set by models whose steps leave registered parameters without gradients (AAND's two stages)
    ddp_find_unused_parameters: bool = False
    #: run the data checks at fit start (also ``ANOMALIB_KD_DATA_CHECK=0``)
    data_check: bool = True

    def __init__(
        self,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
        **unexpected: Any,  # noqa: ANN401
    ) -> None:
        """anomalib's components of the model (the models pass them on as ``**components``).

        Args:
            pre_processor: anomalib pre-processor (default: the model's ``configure_pre_processor()``: resize to
                256 x 256, the papers' size, and ImageNet normalisation). It must resize to a fixed size.
            post_processor: anomalib post-processor (default: anomalib's one-class post-processor).
            evaluator: anomalib evaluator (default: anomalib's image and pixel metrics).
            visualizer: anomalib visualizer (default: anomalib's image visualizer).
            **unexpected: ``TypeError``, except in ``load_from_checkpoint``: Lightning hands a constructor with
                ``**kwargs`` every saved hyper-parameter, so the ones the model does not take are dropped here.
        """
        if unexpected:
            if not restoring():
                name = next(iter(unexpected))
                msg = f"{type(self).__name__}.__init__() got an unexpected keyword argument '{name}'"
                raise TypeError(msg)
            logger.debug("%s: checkpoint hyper-parameters it does not take, dropped: %s", type(self).__name__,
                         sorted(unexpected))  # fmt: skip
        install_engine_hook()  # here, not at import: anomalib.engine may still be importing then
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        # a pre-processor object (not True / False) is the user's explicit choice of the image size
        self._kd_requested_size = None if isinstance(pre_processor, bool | None) else self.input_size
        self.kd_random = distributed.RankRandomness()
        self.kd_guards = RunGuards()
        self._kd_callbacks = (self.kd_random, distributed.DistributedTraining(), distributed.DistributedEvaluation(),
                              self.kd_guards)  # fmt: skip

    def require_input_size(self, message: str) -> tuple[int, int]:
        """The pre-processor's output ``(H, W)``; ``ValueError(message)`` when it does not resize to a fixed size."""
        if self.input_size is None:
            raise ValueError(message)
        return tuple(self.input_size)

    def build_network(
        self,
        network: Callable[..., nn.Module],
        backbone: str,
        layers: Sequence[str],
        pre_trained: bool,
        backbone_weights: str | None,
        fast_inference: bool,
        **options: Any,  # noqa: ANN401
    ) -> nn.Module:
        """The torch model ``network(...)`` at the pre-processor's size (call :meth:`require_input_size` first); the
        teacher arguments go to :func:`anomalib_kd_base.weights.build_teacher`, ``options`` are the network's own."""
        teacher = dict(backbone=backbone, layers=layers, pre_trained=pre_trained, backbone_weights=backbone_weights)
        model = network(input_size=tuple(self.input_size), **teacher, **options)
        model.set_fast_inference(fast_inference)
        return model

    # ------------------------------------------------------------------ callbacks and data
    def configure_callbacks(self) -> list[Callback]:
        """The base's callbacks (:mod:`.distributed`, :mod:`.resume`), then anomalib's component callbacks."""
        components = super().configure_callbacks()
        components = [components] if isinstance(components, Callback) else list(components)
        return [*self._kd_callbacks, *components]

    def prepare_data(self) -> None:
        """The dataset layout check before the datamodule builds its sample table (see :mod:`.checks`)."""
        super().prepare_data()
        trainer = attached_trainer(self)
        datamodule = getattr(trainer, "datamodule", None)
        if trainer is not None and trainer.state.fn == "fit" and datamodule is not None and data_checks_on(self):
            check_datamodule_layout(datamodule)

    def configure_trainable_parameters(self) -> None:
        """In ``setup("fit")``, before DDP wraps the module (it waits for the gradient of every parameter that requires
        one): the frozen teacher and the RD bottleneck's never-called ``conv4`` / ``bn4`` stop requiring grad."""
        bottleneck = getattr(self.model, "bottleneck", None)
        frozen = [getattr(self.model, "encoder", None), *(getattr(bottleneck, name, None) for name in ("conv4", "bn4"))]
        for module in frozen:
            if isinstance(module, nn.Module):
                module.requires_grad_(False)

    # ------------------------------------------------------------------ exports: rank 0 only under DDP
    def to_torch(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        """anomalib's export (``engine.export``); under DDP only rank 0 writes the file."""
        return distributed.run_on_rank_zero(attached_trainer(self), super().to_torch, *args, **kwargs)

    def to_onnx(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        """anomalib's export (``engine.export``); under DDP only rank 0 writes the file."""
        return distributed.run_on_rank_zero(attached_trainer(self), super().to_onnx, *args, **kwargs)

    def to_openvino(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        """anomalib's export (``engine.export``); under DDP only rank 0 writes the files."""
        return distributed.run_on_rank_zero(attached_trainer(self), super().to_openvino, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints (model state)
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """anomalib's components, the teacher's record and which model wrote the checkpoint."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY] = self.teacher_provenance
        checkpoint[MODEL_KEY] = model_record(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse the other model's checkpoint; restore anomalib's components and the teacher's record; re-size the
        anomaly map to the restored pre-processor (the module was built at the default or the user's size)."""
        refuse_other_model(self, checkpoint)
        if self.kd_guards.keep_trained_model(self, checkpoint):
            return
        requested, self._kd_requested_size = self._kd_requested_size, None
        super().on_load_checkpoint(checkpoint)
        self.restore_teacher_record(checkpoint)
        size = self.input_size
        if requested is not None and size is not None and tuple(requested) != tuple(size):
            logger.warning(
                "%s: the checkpoint was trained at %dx%d but the pre-processor you passed resizes to %dx%d; the "
                "checkpoint's %dx%d wins (anomalib restores the checkpoint's pre-processor: the weights and anomaly "
                "map were trained at that size). Exports accept any input size and resize to it inside the graph.",
                type(self).__name__, *size, *requested, *size,
            )  # fmt: skip
        if size is not None and tuple(size) != tuple(self.model.input_size):
            self.set_network_input_size(tuple(size))

    def set_network_input_size(self, size: tuple[int, int]) -> None:
        """Make the torch model produce anomaly maps of ``size``: ``self.model.input_size = size`` unless overridden."""
        self.model.input_size = size

    # ------------------------------------------------------------------ what anomalib asks of a model
    @property
    def training_epochs(self) -> int:
        """The model's whole schedule in epochs (``max_epochs`` of its ``trainer_arguments``)."""
        raise NotImplementedError

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No gradient clipping, no sanity validation, :attr:`training_epochs` epochs (these win over the user's
        in anomalib's ``Engine``: see :func:`anomalib_kd_base.upstream.install_engine_hook`)."""
        return {"gradient_clip_val": 0, "num_sanity_val_steps": 0, "max_epochs": self.training_epochs}

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """The papers' test metrics: anomalib's image / pixel AUROC and F1, plus pixel AUPRO (FPR limit 0.3: both
        papers' PRO) and image / pixel AUPR (MemKD's AP). Their test-time cost: docs/training.md ("Test metrics")."""
        test_metrics = [
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            AUPR(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
            AUPR(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=0.3),
        ]
        return Evaluator(test_metrics=test_metrics)

    @property
    def learning_type(self) -> LearningType:
        """Both models learn from normal images only."""
        return LearningType.ONE_CLASS

    def validation_step(self, batch: Batch, *_args, **_kwargs) -> STEP_OUTPUT:
        """Anomaly maps and scores of a validation batch (the torch model's eval predictions)."""
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())
