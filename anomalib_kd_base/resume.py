"""Run guards shared by AAND and MemKD: resume, checkpoints, data checks, undefined metrics, schedule warnings.

:class:`RunGuardMixin` is a base of :class:`anomalib_kd_base.distributed.DistributedTrainingMixin`, so both models get
it without a change to their bases. What it does:

* **Testing after a resumed fit.** anomalib's ``Engine.train`` (``anomalib train ... --ckpt_path last.ckpt``)
  passes the same ``ckpt_path`` to ``trainer.test``, which would reload the *interrupted* checkpoint and print its
  metrics instead of those of the model the fit just finished. When a fit in this process resumed from
  ``ckpt_path`` and ran to its end, the next ``test`` / ``validate`` / ``predict`` with that same path uses the
  model in memory (a warning says so, with the command to test a checkpoint on its own). Once per fit.
* **Mid-epoch checkpoints.** Checkpoints are exact at epoch boundaries (the random streams are in them, see
  :mod:`anomalib_kd_base.distributed`). Lightning resumes a checkpoint written inside an epoch (``max_steps``, a
  step-interval ``ModelCheckpoint``) at the next epoch's start, skipping the rest of that epoch: a warning says
  how many batches are skipped.
* **Checkpoint of the other model.** Loading a MemKD checkpoint into ``Aand`` (or the reverse) raises a
  ``ValueError`` that names the model the checkpoint holds, instead of the raw missing / unexpected keys.
* **Image size.** A checkpoint trained at another size than the pre-processor the user passed
  (``load_from_checkpoint(..., pre_processor=...)``, ``--model.pre_processor`` with ``--ckpt_path``): a warning
  says the checkpoint's size wins (anomalib restores the checkpoint's pre-processor; the weights and the anomaly map
  were trained at it).
* **Bad data** (:mod:`anomalib_kd_base.checks`): layout check in ``prepare_data`` (before the datamodule builds its
  sample table), decode check of every image in ``setup("fit")``. ``ANOMALIB_KD_DATA_CHECK=0`` or
  ``model.data_check = False`` switches both off.
* **No anomalous test images.** AUROC, AUPR, AUPRO and F1 are undefined; they are reported as NaN (torchmetrics
  would return 0.0 with a warning) and a warning says why.
* **Schedules.** anomalib's ``Engine`` replaces the trainer's ``max_epochs`` with the model's
  ``trainer_arguments`` (AAND: ``stage1_epochs + stage2_epochs``, MemKD: ``epochs``) with only an INFO line; for
  these models a WARNING names the model's own flags (:func:`install_schedule_warning`).
"""

from __future__ import annotations

import inspect
import logging
import math
from pathlib import Path
from typing import Any

import torch

from .checks import (
    anomalous_count,
    check_datamodule_layout,
    check_datasets,
    data_check_enabled,
    warn_if_no_anomalous,
)

logger = logging.getLogger(__name__)

MODEL_KEY = "anomalib_kd_model"
#: metrics that need both normal and anomalous samples
_TWO_CLASS_METRICS = ("AUROC", "AUPR", "AUPRO", "F1Score", "F1Max")


def _known_models() -> dict[str, str]:
    """``{state-dict prefix: "Class (package.Class)"}`` of the loaded model classes that declare ``state_signature``.

    A model class (a subclass of :class:`RunGuardMixin`) names the parameter prefix by which its state dict is
    recognised in checkpoints written without :data:`MODEL_KEY`, e.g. ``state_signature = "model.raa."``. The base
    layer never names the models itself.
    """
    found: dict[str, str] = {}
    stack = list(RunGuardMixin.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        prefix = cls.__dict__.get("state_signature")
        if prefix:
            found[prefix] = f"{cls.__name__} ({cls.__module__.split('.')[0]}.{cls.__name__})"
    return found


def _size_of(pre_processor: Any) -> tuple[int, int] | None:  # noqa: ANN401
    transform = getattr(pre_processor, "transform", None)
    if transform is None:
        return None
    with torch.no_grad():
        out = transform(torch.zeros(1, 3, 4, 4))
    return tuple(int(v) for v in out.shape[-2:])  # type: ignore[return-value]


def schedule_flags(cls: type) -> list[str]:
    """``--model.<name>`` of the constructor arguments that set a model's number of epochs."""
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return []
    return [f"--model.{name}" for name in parameters if name.endswith("epochs")]


def _resolved(path: Any) -> Path | None:  # noqa: ANN401
    if path is None or str(path) in {"", "last", "best", "hpc", "registry"}:
        return None
    try:
        return Path(path).expanduser().resolve()
    except (OSError, TypeError):
        return None


def checkpoint_holds(checkpoint: dict[str, Any]) -> str | None:
    """Which model class wrote ``checkpoint`` (``"module.Class"``), from its record or its state-dict keys."""
    recorded = checkpoint.get(MODEL_KEY)
    if recorded:
        return str(recorded)
    keys = list((checkpoint.get("state_dict") or {}).keys())
    for prefix, name in _known_models().items():
        if any(key.startswith(prefix) for key in keys):
            return name
    return None


class ResumableCycle:
    """Endless iteration over a ``DataLoader`` shuffled by ``generator``, with an exact ``state_dict``.

    The state is the generator's state at the start of the current pass plus the number of batches drawn in it;
    :meth:`load_state_dict` replays the pass to that point (it fetches, and discards, the batches already drawn).
    ``generator`` must be consumed by the loader's sampler only: give the ``DataLoader`` itself another generator
    (or none), because every new loader iterator draws its workers' base seed from the loader's generator, and a
    resumed run starts a new iterator where an uninterrupted one with persistent workers does not.
    Create it with :meth:`DistributedTrainingMixin.resumable_cycle` and the model's checkpoints resume it exactly.
    """

    def __init__(self, loader: Any, generator: torch.Generator | None) -> None:  # noqa: ANN401
        self.loader = loader
        self.generator = generator
        self._iterator: Any = None
        self._pass_state: torch.Tensor | None = None
        self._drawn = 0

    def __iter__(self) -> ResumableCycle:
        return self

    def _start_pass(self) -> None:
        self._pass_state = self.generator.get_state() if self.generator is not None else None
        self._iterator = iter(self.loader)
        self._drawn = 0

    def __next__(self) -> Any:  # noqa: ANN401
        if self._iterator is None:
            self._start_pass()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._start_pass()
            try:
                batch = next(self._iterator)
            except StopIteration:
                msg = "The data loader of a ResumableCycle is empty."
                raise RuntimeError(msg) from None
        self._drawn += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self._iterator is None:  # no pass started: the next one starts from the generator's current state
            state = self.generator.get_state() if self.generator is not None else None
            return {"pass_state": state, "drawn": 0}
        return {"pass_state": None if self._pass_state is None else self._pass_state.clone(), "drawn": self._drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass_state = state.get("pass_state")
        if self.generator is not None and pass_state is not None:
            self.generator.set_state(pass_state.clone().to(torch.uint8))
        drawn = int(state.get("drawn", 0))
        self._iterator = None
        if drawn == 0:
            return
        self._start_pass()
        for _ in range(drawn):
            next(self._iterator)
        self._drawn = drawn


class RunGuardMixin:
    """Resume / checkpoint / data guards (see the module docstring). A base of ``DistributedTrainingMixin``."""

    #: run the data checks at fit start (also ``ANOMALIB_KD_DATA_CHECK=0``)
    data_check: bool = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pre_processor = kwargs.get("pre_processor")
        install_schedule_warning()  # here, not at import: anomalib.engine may still be importing then
        super().__init__(*args, **kwargs)
        # a pre-processor object (not True / False) is the user's explicit choice of the image size
        self._kd_requested_size = _size_of(pre_processor) if not isinstance(pre_processor, bool | None) else None
        self._kd_fit_ckpt: Path | None = None
        self._kd_finished_resume: Path | None = None
        self._kd_guarded_metrics: list[Any] = []

    # ------------------------------------------------------------------ data
    def _data_checks_on(self) -> bool:
        return bool(getattr(self, "data_check", True)) and data_check_enabled()

    def prepare_data(self) -> None:
        super().prepare_data()
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit" or not self._data_checks_on():
            return
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            check_datamodule_layout(datamodule)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit" or not self._data_checks_on():
            return
        datamodule = getattr(self._trainer, "datamodule", None)
        if datamodule is not None:
            check_datasets(datamodule)
            warn_if_no_anomalous(datamodule)

    # ------------------------------------------------------------------ fit bookkeeping
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._kd_fit_ckpt = _resolved(getattr(self.trainer, "ckpt_path", None))
        self._kd_finished_resume = None

    def on_train_end(self) -> None:
        super().on_train_end()
        self._kd_finished_resume = self._kd_fit_ckpt

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[MODEL_KEY] = f"{type(self).__module__.split('.')[0]}.{type(self).__name__}"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._refuse_other_model(checkpoint)
        if self._use_model_in_memory(checkpoint):
            return
        requested = getattr(self, "_kd_requested_size", None)
        super().on_load_checkpoint(checkpoint)
        restored = tuple(self.input_size) if getattr(self, "input_size", None) is not None else None
        if requested is not None and restored is not None and tuple(requested) != restored:
            logger.warning(
                "%s: the checkpoint was trained at %dx%d but the pre-processor you passed resizes to %dx%d; the "
                "checkpoint's %dx%d wins (anomalib restores the checkpoint's pre-processor: the weights and anomaly "
                "map were trained at that size). Exports accept any input size and resize to it inside the graph.",
                type(self).__name__,
                *restored,
                *requested,
                *restored,
            )
        self._kd_requested_size = None
        self._warn_mid_epoch(checkpoint)

    def _refuse_other_model(self, checkpoint: dict[str, Any]) -> None:
        holds = checkpoint_holds(checkpoint)
        if holds is None:
            return
        mine = type(self).__name__
        held_class = holds.split(" ")[0].split(".")[-1]
        known = {name.split(" ")[0] for name in _known_models().values()}
        if held_class == mine or held_class not in known:
            return
        flag = held_class
        msg = (
            f"This checkpoint holds a {holds} model, not {mine}: load it with "
            f"{held_class}.load_from_checkpoint(...) (CLI: --model {flag})."
        )
        raise ValueError(msg)

    def _use_model_in_memory(self, checkpoint: dict[str, Any]) -> bool:
        """After a resumed fit ran to its end: ``test(ckpt_path=<the resume path>)`` keeps the trained model."""
        trainer = self._trainer
        finished = getattr(self, "_kd_finished_resume", None)
        if trainer is None or finished is None or trainer.training:
            return False
        self._kd_finished_resume = None  # once per fit
        if _resolved(getattr(trainer, "ckpt_path", None)) != finished:
            return False
        checkpoint["state_dict"] = dict(self.state_dict())  # loading it again is a no-op
        # Lightning restores callback states in test too, and anomalib's post-processor is a callback whose state is
        # its thresholds and normalisation bounds: without this the final weights were scored with the interrupted
        # checkpoint's bounds (clamped scores, other ties: a different image AUROC and F1).
        states = checkpoint.get("callbacks")
        if isinstance(states, dict):
            for callback in trainer.callbacks:
                if callback.state_key in states:
                    states[callback.state_key] = callback.state_dict()
        logger.warning(
            "%s: %s was given --ckpt_path %s, the checkpoint this fit resumed from (epoch %s). anomalib's Engine.train "
            "passes it to test as well, which would report the metrics of that interrupted checkpoint. The model this "
            "fit just trained (epoch %d) is evaluated instead. To evaluate a checkpoint by itself, run "
            "`anomalib test --model %s ... --ckpt_path <file>` in a new process.",
            type(self).__name__,
            trainer.state.fn,
            finished,
            checkpoint.get("epoch"),
            self.current_epoch,
            type(self).__name__,
        )
        return True

    @staticmethod
    def _warn_mid_epoch(checkpoint: dict[str, Any]) -> None:
        loops = checkpoint.get("loops") or {}
        fit_loop = loops.get("fit_loop") or {}
        batch_progress = fit_loop.get("epoch_loop.batch_progress") or {}
        done = int((batch_progress.get("current") or {}).get("completed", 0) or 0)
        if done > 0 and not batch_progress.get("is_last_batch", True):
            started = ((fit_loop.get("epoch_progress") or {}).get("current") or {}).get("started")
            epoch = int(started) - 1 if started else int(checkpoint.get("epoch", 0))  # the epoch of those batches
            logger.warning(
                "This checkpoint was written inside epoch %d, after %d batches of it (max_steps or a step-interval "
                "checkpoint). Checkpoints of these models are exact at epoch boundaries only: Lightning resumes it "
                "at the start of the next epoch, so the rest of epoch %d is skipped and the run is not identical to "
                "an uninterrupted one. Resume from an end-of-epoch checkpoint for an exact continuation.",
                epoch,
                done,
                epoch,
            )

    # ------------------------------------------------------------------ undefined metrics
    def on_test_start(self) -> None:
        super().on_test_start()
        self._guard_undefined_metrics()

    def on_test_end(self) -> None:
        super().on_test_end()
        self._release_metric_guards()

    def _test_dataset(self) -> Any:  # noqa: ANN401
        trainer = self._trainer
        loaders = getattr(trainer, "test_dataloaders", None)
        loaders = list(loaders.values()) if isinstance(loaders, dict) else loaders
        loader = loaders[0] if isinstance(loaders, list | tuple) and loaders else loaders
        dataset = getattr(loader, "dataset", None)
        return dataset if dataset is not None else getattr(getattr(trainer, "datamodule", None), "test_data", None)

    def _guard_undefined_metrics(self) -> None:
        from anomalib import metrics as anomalib_metrics

        evaluator = getattr(self, "evaluator", None)
        if evaluator is None or anomalous_count(self._test_dataset()) != 0:
            return
        classes = tuple(getattr(anomalib_metrics, name) for name in _TWO_CLASS_METRICS)
        guarded = []
        for metric in getattr(evaluator, "test_metrics", []) or []:
            if isinstance(metric, classes) and "_kd_compute" not in vars(metric):

                def undefined(*_args: Any, **_kwargs: Any) -> torch.Tensor:  # noqa: ANN401
                    return torch.tensor(math.nan)

                # torchmetrics keeps its wrapped ``compute`` on the instance; Lightning's epoch-end logging calls it
                object.__setattr__(metric, "_kd_compute", vars(metric).get("compute"))
                object.__setattr__(metric, "compute", undefined)
                guarded.append(metric)
        if guarded:
            self._kd_guarded_metrics = guarded
            logger.warning(
                "The test set has no anomalous images: %s are undefined and are reported as NaN (not measured).",
                ", ".join(metric.name for metric in guarded),
            )

    def _release_metric_guards(self) -> None:
        for metric in getattr(self, "_kd_guarded_metrics", []):
            original = vars(metric).pop("_kd_compute", None)
            if original is not None:
                object.__setattr__(metric, "compute", original)
            else:
                vars(metric).pop("compute", None)
        self._kd_guarded_metrics = []


# ---------------------------------------------------------------------------------------------- schedule warning
def install_schedule_warning() -> None:
    """Warn when anomalib's ``Engine`` replaces the user's ``max_epochs`` with a RunGuardMixin model's schedule.

    anomalib 2.7 gives a model's ``trainer_arguments`` precedence over the trainer's (``_TrainerArgumentsCache.update``)
    and logs that at INFO only. This wraps that method (idempotent) to log a WARNING naming the model's own flags.
    """
    import sys

    engine_module = sys.modules.get("anomalib.engine.engine")
    if engine_module is None:
        try:
            from anomalib.engine import engine as engine_module
        except ImportError:  # pragma: no cover - anomalib.engine is still importing: the next model retries
            return
    cache = getattr(engine_module, "_TrainerArgumentsCache", None)
    if cache is None or getattr(cache.update, "_anomalib_kd", False):
        return
    original = cache.update

    def update(self: Any, model: Any) -> None:  # noqa: ANN401
        if isinstance(model, RunGuardMixin):
            requested = self._cached_args.get("max_epochs")  # noqa: SLF001
            schedule = model.trainer_arguments.get("max_epochs")
            if requested not in {None, -1} and schedule is not None and requested != schedule:
                flags = " / ".join(schedule_flags(type(model))) or "the model's schedule arguments"
                logger.warning(
                    "%s sets its own schedule: --trainer.max_epochs=%s is replaced by max_epochs=%s. Set the length "
                    "with %s.",
                    type(model).__name__,
                    requested,
                    schedule,
                    flags,
                )
        original(self, model)

    update._anomalib_kd = True  # type: ignore[attr-defined]  # noqa: SLF001
    cache.update = update


__all__ = ["MODEL_KEY", "ResumableCycle", "RunGuardMixin", "checkpoint_holds", "install_schedule_warning", "schedule_flags"]
