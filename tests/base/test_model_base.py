"""The Lightning base both models share (``anomalib_kd_base.model``): argument checks, teacher, checkpoint re-sync.

Tiny settings: resnet18 random init, 64 px. Every error message is compared in full: users and tests match them.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from anomalib import LearningType
from anomalib.models.components import AnomalibModule

from anomalib_aand import Aand
from anomalib_aand.components.raa import MatchingGuidedResidualGate
from anomalib_aand.loss import AandAmplificationLoss, amplification_loss
from anomalib_kd_base.export import ProvenanceExportMixin
from anomalib_kd_base.model import KDModelBase, check_at_least, check_choice, check_positive
from anomalib_kd_base.quantization import AnomalyMapPTQMixin
from anomalib_memkd import MemKD
from anomalib_memkd.loss import MemKDLoss, normality_memorization_loss

SIZE = 64
COMPONENTS = {"pre_processor", "post_processor", "evaluator", "visualizer"}


def _small(cls: type, size: int | None = SIZE, **kwargs):  # noqa: ANN202
    params = {"backbone": "resnet18", "pre_trained": False}
    if size is not None:
        params["pre_processor"] = cls.configure_pre_processor(image_size=(size, size))
    if cls is Aand:
        params.update(memory_size=4, anomaly_source_path=None)
    params.update(kwargs)
    return cls(**params)


# ================================================================== the checks
@pytest.mark.parametrize(
    ("check", "expected"),
    [
        (lambda: check_at_least("hard_samples (K_h)", 0, 1), "hard_samples (K_h) must be >= 1, got 0"),
        (lambda: check_at_least("epochs", 0, 1, sentence=True), "epochs must be at least 1, got 0."),
        (lambda: check_at_least("stage1_epochs", -1, 0), "stage1_epochs must be >= 0, got -1"),
        (lambda: check_positive("lr", 0.0), "lr must be > 0, got 0.0"),
        (lambda: check_positive("lr", -1, sentence=True), "lr must be positive, got -1."),
        (lambda: check_positive("lr", math.nan), "lr must be > 0, got nan"),
        (
            lambda: check_choice("foreground", "edges", ("auto", "none", "disk")),
            "foreground must be one of ('auto', 'none', 'disk'), got 'edges'",
        ),
        (
            lambda: check_choice("nm_reduction", "median", ["sum", "mean"], sentence=True),
            "nm_reduction must be one of ('sum', 'mean'), got 'median'.",
        ),
    ],
)
def test_checks_raise_with_the_models_wording(check, expected: str) -> None:
    with pytest.raises(ValueError) as error:
        check()
    assert str(error.value) == expected


def test_checks_accept_valid_values_up_to_the_bound() -> None:
    check_at_least("hard_samples", 1, 1)  # the bound itself is valid
    check_at_least("stage1_epochs", 0, 0)
    check_positive("lr", 1e-12)
    check_choice("nm_reduction", "sum", ("sum", "mean"))
    with pytest.raises(ValueError):
        check_at_least("memory_size", math.nan, 1)  # NaN passes no bound


# ================================================================== the checks where the models use them
@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (
            lambda: _small(Aand, size=None, pre_processor=False),
            "AAND needs a fixed input size: give a pre_processor whose transform resizes the images.",
        ),
        (lambda: _small(Aand, hard_samples=0), "hard_samples (K_h) must be >= 1, got 0"),
        (lambda: _small(Aand, lr=0.0), "lr must be > 0, got 0.0"),
        (lambda: _small(Aand, lr_gamma=-0.5), "lr_gamma must be > 0, got -0.5"),
        (
            lambda: _small(Aand, foreground="edges"),
            "foreground must be one of ('auto', 'none', 'bright', 'dark', 'disk'), got 'edges'",
        ),
        (
            lambda: _small(Aand, amplification_pairs="all"),
            "amplification_pairs must be one of ('exact', 'subsample'), got 'all'",
        ),
        (
            lambda: _small(MemKD, size=None, pre_processor=False),
            "Input size is required for MemKD: give it a pre-processor whose transform resizes the images, "
            "e.g. MemKD(pre_processor=MemKD.configure_pre_processor(image_size=(256, 256))).",
        ),
        (lambda: _small(MemKD, num_exemplars=0), "num_exemplars must be at least 1, got 0."),
        (lambda: _small(MemKD, epochs=0), "epochs must be at least 1, got 0."),
        (lambda: _small(MemKD, lr=-0.1), "lr must be positive, got -0.1."),
        (lambda: _small(MemKD, nm_reduction="max"), "nm_reduction must be one of ('sum', 'mean'), got 'max'."),
        (lambda: MatchingGuidedResidualGate(8, memory_size=0), "memory_size must be >= 1, got 0"),
        (lambda: MatchingGuidedResidualGate(8, temperature=0.0), "temperature must be > 0, got 0.0"),
        (
            lambda: AandAmplificationLoss(mode="all"),
            "amplification_pairs must be one of ('exact', 'subsample'), got 'all'",
        ),
        (lambda: MemKDLoss(nm_reduction="max"), "nm_reduction must be one of ('sum', 'mean'), got 'max'."),
        (
            lambda: amplification_loss([], [], [], [], mode="all"),
            "amplification mode must be one of ('exact', 'subsample'), got 'all'",
        ),
        (
            lambda: normality_memorization_loss([], [], reduction="max"),
            "reduction must be one of ('sum', 'mean'), got 'max'.",
        ),
    ],
)
def test_constructors_reject_invalid_arguments_with_their_message(build, expected: str) -> None:
    with pytest.raises(ValueError) as error:
        build()
    assert str(error.value) == expected


# ================================================================== the base in both models
@pytest.mark.parametrize("cls", [Aand, MemKD])
def test_both_models_stand_on_the_base(cls: type) -> None:
    # AnomalibModule a direct base (anomalib's model lookup), the shared mixins in their order before it
    assert cls.__bases__ == (KDModelBase, AnomalibModule)
    mro = cls.__mro__
    order = [KDModelBase, ProvenanceExportMixin, AnomalyMapPTQMixin, AnomalibModule]
    assert [mro.index(base) for base in order] == sorted(mro.index(base) for base in order)
    # anomalib's four components are declared once, in the base; the model passes them on as **components
    base = inspect.signature(KDModelBase.__init__).parameters
    assert set(base) - {"self", "unexpected"} == COMPONENTS
    own = inspect.signature(cls.__init__).parameters
    assert not COMPONENTS & set(own) and own["components"].kind is inspect.Parameter.VAR_KEYWORD
    # save_hyperparameters still records exactly the model's own arguments
    model = _small(cls)
    assert set(model.hparams) == set(own) - {"self", "components"}
    assert model.learning_type == LearningType.ONE_CLASS
    # the components reach anomalib (a given pre-processor is the one used); a misspelt one is refused
    assert model.input_size == (SIZE, SIZE)
    with pytest.raises(TypeError, match=rf"{cls.__name__}.__init__\(\) got an unexpected keyword argument 'pre_procesor'"):
        _small(cls, pre_procesor=True)


def _lightning_hooks() -> set[str]:
    from lightning.pytorch import Callback
    from lightning.pytorch.core.hooks import CheckpointHooks, DataHooks, ModelHooks

    names = {name for cls in (ModelHooks, DataHooks, CheckpointHooks, Callback) for name in vars(cls)
             if not name.startswith("_") and callable(getattr(cls, name))}  # fmt: skip
    return names | {"configure_callbacks"}  # a LightningModule hook of its own


def test_no_mixin_overrides_a_lightning_hook() -> None:
    """The run-time behaviours are callbacks; the base keeps only the hooks that are model behaviour."""
    hooks = _lightning_hooks()
    assert {"setup", "on_fit_start", "on_train_end", "on_save_checkpoint", "on_load_checkpoint"} <= hooks
    for mixin in (ProvenanceExportMixin, AnomalyMapPTQMixin):
        assert not hooks & set(vars(mixin)), mixin
    # configure_callbacks; prepare_data (before the datamodule's setup, earlier than any callback hook); the
    # checkpoint hooks for model state, which load_from_checkpoint (no trainer, no callbacks) needs too
    assert hooks & set(vars(KDModelBase)) == {"configure_callbacks", "prepare_data", "on_save_checkpoint",
                                             "on_load_checkpoint"}  # fmt: skip


@pytest.mark.parametrize("cls", [Aand, MemKD])
def test_configure_callbacks_adds_the_base_callbacks_to_anomalibs(cls: type) -> None:
    from anomalib_kd_base.distributed import DistributedEvaluation, DistributedTraining, RankRandomness
    from anomalib_kd_base.resume import RunGuards

    model = _small(cls)
    callbacks = model.configure_callbacks()
    kinds = [type(callback) for callback in callbacks]
    assert kinds[:4] == [RankRandomness, DistributedTraining, DistributedEvaluation, RunGuards]
    components = [model.pre_processor, model.post_processor, model.evaluator, model.visualizer]
    assert callbacks[4:] == components  # anomalib's own, none replaced
    # the same instances in every fit / validate / test / predict: Lightning restores their state by state_key
    assert all(a is b for a, b in zip(callbacks, model.configure_callbacks(), strict=True))
    assert len({callback.state_key for callback in callbacks}) == len(callbacks)


@pytest.mark.parametrize("cls", [Aand, MemKD])
def test_cli_sees_the_components_with_types_and_help(cls: type) -> None:
    """jsonargparse (the anomalib CLI) follows ``super().__init__(**components)`` to the base's parameters."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(cls, "model")
    helps = {action.dest: action.help for action in parser._actions}  # noqa: SLF001
    for name in COMPONENTS:
        assert helps.get(f"model.{name}") not in {None, "", "_EMPTY_HELP_"}, name
    assert "pre-processor" in helps["model.pre_processor"]
    config = parser.parse_args(["--model.visualizer", "false", "--model.backbone", "resnet18"])
    assert config.model.visualizer is False and config.model.backbone == "resnet18"


def test_trainer_arguments_run_each_models_schedule() -> None:
    common = {"gradient_clip_val": 0, "num_sanity_val_steps": 0}
    assert _small(Aand, stage1_epochs=2, stage2_epochs=3).trainer_arguments == {**common, "max_epochs": 5}
    assert _small(Aand, stage1_epochs=0, stage2_epochs=4).trainer_arguments == {**common, "max_epochs": 4}
    assert _small(MemKD, epochs=7).trainer_arguments == {**common, "max_epochs": 7}


@pytest.mark.parametrize("cls", [Aand, MemKD])
def test_build_network_hands_over_the_teacher_arguments(cls: type, tmp_path) -> None:
    model = _small(cls, fast_inference=True)
    assert model.model.input_size == (SIZE, SIZE)
    assert model.model.fast_inference is True
    assert list(model.model.encoder.layers) == ["layer1", "layer2", "layer3"]
    record = model.teacher_provenance
    assert (record["backbone"], record["weights_source"]) == ("resnet18", "random-init")  # pre_trained=False
    assert _small(cls).model.fast_inference is False
    missing = tmp_path / "teacher.safetensors"
    with pytest.raises(FileNotFoundError, match="teacher.safetensors"):  # backbone_weights reaches build_teacher
        _small(cls, backbone_weights=str(missing))
    with pytest.raises(ValueError, match=r"three teacher layers.*\['layer1', 'layer2'\]"):  # so do the layers
        _small(cls, layers=("layer1", "layer2"))


@pytest.mark.parametrize("cls", [Aand, MemKD])
def test_validation_step_returns_the_networks_predictions(cls: type) -> None:
    from anomalib.data import ImageBatch

    model = _small(cls).eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    batch = ImageBatch(image=images)
    with torch.no_grad():
        out = model.validation_step(batch)
        expected = model.model(images)
    torch.testing.assert_close(out.anomaly_map.reshape(expected.anomaly_map.shape), expected.anomaly_map)  # (B, H, W)
    torch.testing.assert_close(out.pred_score, expected.pred_score)


# ================================================================== checkpoint re-sync
@pytest.mark.parametrize("cls", [Aand, MemKD])
def test_loaded_checkpoint_resizes_the_anomaly_map_to_the_restored_pre_processor(cls: type) -> None:
    trained = _small(cls)
    checkpoint = {"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams)}
    trained.on_save_checkpoint(checkpoint)
    fresh = cls(**checkpoint["hyper_parameters"])  # what load_from_checkpoint builds: the default 256 px pre-processor
    assert tuple(fresh.input_size) == (256, 256) and tuple(fresh.model.input_size) == (256, 256)
    fresh.on_load_checkpoint(checkpoint)
    assert tuple(fresh.input_size) == (SIZE, SIZE)
    assert tuple(fresh.model.input_size) == (SIZE, SIZE)
    with torch.no_grad():
        anomaly_map = fresh.eval().model(torch.rand(1, 3, SIZE, SIZE)).anomaly_map
    assert tuple(anomaly_map.shape[-2:]) == (SIZE, SIZE)


# ------------------------------------------------------------------ the papers' batch size
class _Datamodule:
    def __init__(self, train_batch_size: int) -> None:
        self.train_batch_size = train_batch_size


def test_batch_size_warning_names_the_global_batch_and_the_fix() -> None:
    from anomalib_kd_base.model import PAPER_BATCH_SIZE, PAPER_LR, batch_size_warning

    assert (PAPER_BATCH_SIZE, PAPER_LR) == (16, 0.005)  # both papers' recipe
    assert batch_size_warning("MemKD", _Datamodule(16), 0.005) is None
    assert batch_size_warning("MemKD", _Datamodule(4), 0.005, world_size=4) is None  # 4 ranks x 4 = 16
    assert batch_size_warning("MemKD", _Datamodule(32), 0.01) is None  # the user chose an lr for their batch
    assert batch_size_warning("MemKD", object(), 0.005) is None  # no train_batch_size: nothing to say
    message = batch_size_warning("MemKD", _Datamodule(32), 0.005)
    assert message.startswith("MemKD: training batch size 32 ") and "--data.train_batch_size 16" in message
    ddp = batch_size_warning("MemKD", _Datamodule(8), 0.005, world_size=4)
    assert "batch size 32 (8 per rank x 4 ranks)" in ddp and "--data.train_batch_size 4 (per rank, 4 ranks)" in ddp


def test_memkd_checks_the_papers_batch_size_like_aand(caplog: pytest.LogCaptureFixture) -> None:
    """MemKD's fit-start recipe check (both papers: batch 16, lr 0.005); on_fit_start calls it on rank 0."""
    import logging

    from anomalib_memkd import lightning_model as memkd_module

    assert "self._check_recipe(" in inspect.getsource(memkd_module.MemKD.on_fit_start)
    model = _small(MemKD)
    seen = []
    for batch, world_size in ((32, 1), (16, 1), (4, 4), (8, 4)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=memkd_module.logger.name):
            model._check_recipe(_Datamodule(batch), world_size=world_size)  # noqa: SLF001
        seen.append(sum("MemKD: training batch size" in r.getMessage() for r in caplog.records))
    assert seen == [1, 0, 0, 1]
