"""Run guards of AAND and MemKD: the :class:`RunGuards` callback, checkpoint records and resumable iteration.

:class:`RunGuards` (why: docs/training.md "Resuming", docs/limitations.md): a resumed fit's own ``ckpt_path`` handed
on to ``test`` (anomalib's ``Engine.train``) keeps the model just trained; mid-epoch checkpoints warn; the data checks
run at ``setup("fit")``; a test set without anomalous images reports the two-class metrics as NaN (torchmetrics: 0.0).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

from .checks import DATA_CHECK_ENV, anomalous_count, check_datasets, warn_if_no_anomalous
from .upstream import checkpoint_position

logger = logging.getLogger(__name__)

MODEL_KEY = "anomalib_kd_model"
#: metrics that need both normal and anomalous samples
_TWO_CLASS_METRICS = ("AUROC", "AUPR", "AUPRO", "F1Score", "F1Max")
_END = object()  # a ResumableCycle's pass ended


def data_checks_on(model: Any) -> bool:  # noqa: ANN401
    """Whether the fit-start data checks run: ``model.data_check`` and ``ANOMALIB_KD_DATA_CHECK`` not 0/false/no/off."""
    switch = os.environ.get(DATA_CHECK_ENV, "").strip().lower()
    return bool(getattr(model, "data_check", True)) and switch not in {"0", "false", "no", "off"}


def attached_trainer(module: Any) -> Any:  # noqa: ANN401
    """The Trainer ``module`` (a LightningModule) is attached to, or ``None``."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def schedule_flags(cls: type) -> list[str]:
    """``--model.<name>`` of the constructor arguments that set a model's number of epochs."""
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return []
    return [f"--model.{name}" for name in parameters if name.endswith("epochs")]


def one_loader(loaders: Any, index: int = 0) -> Any:  # noqa: ANN401
    """Loader ``index`` of a trainer's ``val_dataloaders`` / ``test_dataloaders`` (one loader, a list or a dict)."""
    loaders = list(loaders.values()) if isinstance(loaders, dict) else loaders
    if isinstance(loaders, list | tuple):
        return loaders[index] if index < len(loaders) else None
    return loaders


def _resolved(path: Any) -> Path | None:  # noqa: ANN401
    if path is None or str(path) in {"", "last", "best", "hpc", "registry"}:
        return None
    try:
        return Path(path).expanduser().resolve()
    except (OSError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------- checkpoint records
def _known_models() -> dict[str, str]:
    """``{state-dict prefix: "Class (package.Class)"}`` of the loaded ``KDModelBase`` subclasses that declare the
    ``state_signature`` recognising their checkpoints written without :data:`MODEL_KEY` (e.g. ``"model.raa."``)."""
    from .model import KDModelBase

    found: dict[str, str] = {}
    stack = list(KDModelBase.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if prefix := cls.__dict__.get("state_signature"):
            found[prefix] = f"{cls.__name__} ({cls.__module__.split('.')[0]}.{cls.__name__})"
    return found


def model_record(model: Any) -> str:  # noqa: ANN401
    """``"package.Class"`` of ``model``, the :data:`MODEL_KEY` record of its checkpoints."""
    return f"{type(model).__module__.split('.')[0]}.{type(model).__name__}"


def checkpoint_holds(checkpoint: dict[str, Any]) -> str | None:
    """Which model class wrote ``checkpoint`` (``"module.Class"``), from its record or its state-dict keys."""
    if recorded := checkpoint.get(MODEL_KEY):
        return str(recorded)
    keys = list((checkpoint.get("state_dict") or {}).keys())
    return next((name for prefix, name in _known_models().items() if any(k.startswith(prefix) for k in keys)), None)


def refuse_other_model(model: Any, checkpoint: dict[str, Any]) -> None:  # noqa: ANN401
    """``ValueError`` naming the model a checkpoint holds when it is the other KD model (not the raw missing keys)."""
    if (holds := checkpoint_holds(checkpoint)) is None:
        return
    mine, held = type(model).__name__, holds.split(" ")[0].split(".")[-1]
    if held == mine or held not in {name.split(" ")[0] for name in _known_models().values()}:
        return
    msg = (
        f"This checkpoint holds a {holds} model, not {mine}: load it with {held}.load_from_checkpoint(...) "
        f"(CLI: --model {held})."
    )
    raise ValueError(msg)


# ---------------------------------------------------------------------------------------------- resumable iteration
class ResumableCycle:
    """Endless iteration over a ``DataLoader`` shuffled by ``generator``, with an exact ``state_dict``. The state is the
    generator's state at the start of the pass plus the batches drawn in it; loading replays the pass to that point.
    ``generator`` must feed the loader's sampler only, not the ``DataLoader`` itself (each new iterator draws its
    workers' base seed from that). Create it with ``RankRandomness.cycle`` (``model.kd_random``)."""

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
        batch = _END if self._iterator is None else next(self._iterator, _END)
        if batch is _END:  # the first pass, or the last one ended
            self._start_pass()
            batch = next(self._iterator, _END)
        if batch is _END:
            msg = "The data loader of a ResumableCycle is empty."
            raise RuntimeError(msg)
        self._drawn += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self._iterator is None:  # no pass started: the next one starts from the generator's current state
            return {"pass_state": None if self.generator is None else self.generator.get_state(), "drawn": 0}
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


# ---------------------------------------------------------------------------------------------- the callback
class RunGuards(Callback):
    """Resume / data / metric guards (see the module docstring); no state to checkpoint."""

    def __init__(self) -> None:
        self._fit_ckpt: Path | None = None
        self._finished_resume: Path | None = None
        self._guarded: list[Any] = []

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:  # noqa: ANN401
        datamodule = getattr(trainer, "datamodule", None)
        if stage == "fit" and datamodule is not None and data_checks_on(pl_module):
            check_datasets(datamodule)
            warn_if_no_anomalous(datamodule)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        self._fit_ckpt, self._finished_resume = _resolved(trainer.ckpt_path), None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        self._finished_resume = self._fit_ckpt

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:  # noqa: ANN401
        _, unfinished = checkpoint_position(checkpoint)
        if trainer.state.fn == "fit" and unfinished is not None:
            logger.warning(
                "This checkpoint was written inside epoch %d, after %d batches of it (max_steps or a step-interval "
                "checkpoint). Checkpoints of these models are exact at epoch boundaries only: Lightning resumes it "
                "at the start of the next epoch, so the rest of epoch %d is skipped and the run is not identical to "
                "an uninterrupted one. Resume from an end-of-epoch checkpoint for an exact continuation.",
                unfinished[0], unfinished[1], unfinished[0],
            )  # fmt: skip

    def keep_trained_model(self, model: Any, checkpoint: dict[str, Any]) -> bool:  # noqa: ANN401
        """After a resumed fit ran to its end: make ``checkpoint`` (of the resume path) hold the state in memory, the
        callbacks' too (anomalib's thresholds); the model's ``on_load_checkpoint`` calls it before Lightning loads."""
        trainer, finished = attached_trainer(model), self._finished_resume
        if trainer is None or finished is None or trainer.training:
            return False
        self._finished_resume = None  # once per fit
        if _resolved(trainer.ckpt_path) != finished:
            return False
        checkpoint["state_dict"] = dict(model.state_dict())  # loading it again is a no-op
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
            type(model).__name__, trainer.state.fn, finished, checkpoint.get("epoch"), model.current_epoch,
            type(model).__name__,
        )  # fmt: skip
        return True

    # ------------------------------------------------------------------ undefined metrics
    def on_test_start(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        from anomalib import metrics as anomalib_metrics

        evaluator = getattr(pl_module, "evaluator", None)
        if evaluator is None or anomalous_count(_test_dataset(trainer)) != 0:
            return
        classes = tuple(getattr(anomalib_metrics, name) for name in _TWO_CLASS_METRICS)
        guarded = [m for m in getattr(evaluator, "test_metrics", []) or [] if isinstance(m, classes)]
        guarded = [metric for metric in guarded if "_kd_compute" not in vars(metric)]
        for metric in guarded:
            # torchmetrics keeps its wrapped ``compute`` on the instance; Lightning's epoch-end logging calls it
            object.__setattr__(metric, "_kd_compute", vars(metric).get("compute"))
            object.__setattr__(metric, "compute", lambda *_args, **_kwargs: torch.tensor(math.nan))
        if guarded:
            self._guarded = guarded
            logger.warning(
                "The test set has no anomalous images: %s are undefined and are reported as NaN (not measured).",
                ", ".join(metric.name for metric in guarded),
            )

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        for metric in self._guarded:
            original = vars(metric).pop("_kd_compute", None)
            if original is not None:
                object.__setattr__(metric, "compute", original)
            else:
                vars(metric).pop("compute", None)
        self._guarded = []


def _test_dataset(trainer: Any) -> Any:  # noqa: ANN401
    dataset = getattr(one_loader(getattr(trainer, "test_dataloaders", None)), "dataset", None)
    return dataset if dataset is not None else getattr(getattr(trainer, "datamodule", None), "test_data", None)
