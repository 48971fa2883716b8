"""The workarounds that rely on anomalib / Lightning internals, all of them: no public API does what they do.

Each says why it exists and the version it was written against (:data:`WRITTEN_AGAINST`);
``tests/base/test_upstream.py`` names the workaround whose internal changed; docs/limitations.md lists them.
"""

from __future__ import annotations

import functools
import importlib
import logging
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

logger = logging.getLogger(__name__)

WRITTEN_AGAINST = {"anomalib": "2.7.0", "lightning": "2.6.6"}

#: Lightning's DDP strategy names that have a registered ``<name>_find_unused_parameters_true`` twin
DDP_STRATEGY_NAMES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


# ---------------------------------------------------------------------------------------------- anomalib 2.7.0
def install_engine_hook() -> None:
    """anomalib 2.7.0: wrap ``Engine._setup_trainer`` (idempotent), before it builds the Trainer from ``Engine._cache``.

    * **Schedule warning.** The Engine gives a model's ``trainer_arguments`` precedence over the user's
      (``_TrainerArgumentsCache.update``) and says so at INFO only; for a KD model whose schedule replaces the
      user's ``max_epochs``, this logs a WARNING naming the model's own flags.
    * **Unused parameters.** A model with ``ddp_find_unused_parameters = True`` (AAND: each stage trains a part)
      needs DDP's ``find_unused_parameters``. Lightning's public route is the strategy name: the cached strategy
      ``"ddp"`` (``"ddp_spawn"``, ...) becomes ``"ddp_find_unused_parameters_true"`` before the Trainer is built.
      Other routes (a ``DDPStrategy`` object, a bare Lightning Trainer) are checked at fit start
      (:class:`anomalib_kd_base.distributed.DistributedTraining`).
    """
    try:  # a module that is still importing comes back as it stands (no Engine yet: the next model retries)
        engine_class = getattr(importlib.import_module("anomalib.engine.engine"), "Engine", None)
    except ImportError:  # pragma: no cover - anomalib.engine is still importing
        return
    original = getattr(engine_class, "_setup_trainer", None)
    if original is None or getattr(original, "_anomalib_kd", False):
        return

    @functools.wraps(original)
    def _setup_trainer(engine: Any, model: Any) -> None:  # noqa: ANN401
        from .model import KDModelBase
        from .resume import schedule_flags

        if isinstance(model, KDModelBase):
            args = engine._cache.args  # noqa: SLF001
            requested, schedule = args.get("max_epochs"), model.trainer_arguments.get("max_epochs")
            if requested not in {None, -1} and schedule is not None and requested != schedule:
                flags = " / ".join(schedule_flags(type(model))) or "the model's schedule arguments"
                logger.warning(
                    "%s sets its own schedule: --trainer.max_epochs=%s is replaced by max_epochs=%s. Set the length "
                    "with %s.", type(model).__name__, requested, schedule, flags,
                )  # fmt: skip
            strategy = args.get("strategy")
            if model.ddp_find_unused_parameters and isinstance(strategy, str) and strategy in DDP_STRATEGY_NAMES:
                args["strategy"] = f"{strategy}_find_unused_parameters_true"
                rank_zero_info(
                    f"{type(model).__name__}: DDP find_unused_parameters=True (each step trains only a part of the "
                    "model)."
                )
        original(engine, model)

    _setup_trainer._anomalib_kd = True  # type: ignore[attr-defined]  # noqa: SLF001
    engine_class._setup_trainer = _setup_trainer  # noqa: SLF001


# ---------------------------------------------------------------------------------------------- Lightning 2.6.6
def set_default_root_dir(trainer: Any, path: str | Path) -> bool:  # noqa: ANN401
    """Lightning 2.6.6: set ``trainer.default_root_dir``, a read-only property over ``Trainer._default_root_dir``.

    Under DDP every process runs anomalib's ``Engine.fit``, which makes one versioned results folder per process;
    the ranks adopt rank 0's (:func:`anomalib_kd_base.distributed.align_workspace`). ``False`` when not possible.
    """
    if not hasattr(trainer, "_default_root_dir"):
        return False
    trainer._default_root_dir = str(path)  # noqa: SLF001
    return True


def checkpoint_position(checkpoint: dict[str, Any]) -> tuple[int, tuple[int, int] | None]:
    """Lightning 2.6.6: ``(epoch a fit resumes at, (epoch, batches done) of an unfinished epoch or None)``.

    Read from the fit loop's state (``checkpoint["loops"]["fit_loop"]``): Lightning resumes at
    ``epoch_progress.current.processed`` (``FitLoop.on_run_start``); a checkpoint written inside an epoch has
    completed batches and ``is_last_batch`` false.
    """
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    current = (fit_loop.get("epoch_progress") or {}).get("current") or {}
    processed = current.get("processed")
    epoch = int(processed) if processed is not None else int(checkpoint.get("epoch", 0)) + 1
    batches = fit_loop.get("epoch_loop.batch_progress") or {}
    done = int((batches.get("current") or {}).get("completed", 0) or 0)
    if done == 0 or batches.get("is_last_batch", True):
        return epoch, None
    started = current.get("started")
    return epoch, (int(started) - 1 if started else int(checkpoint.get("epoch", 0)), done)
