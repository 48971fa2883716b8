"""Distributed data-parallel (DDP) training support shared by AAND and MemKD.

Both models train with Lightning's own strategies (``Engine(strategy="ddp", devices=N)`` or
``anomalib train ... --trainer.strategy ddp --trainer.devices N``); nothing here launches processes.
:class:`DistributedTrainingMixin` makes the models behave correctly under them:

* **Unused parameters** - DDP registers the parameters that require grad when it wraps the module and waits
  for all of their gradients in every step. ``setup("fit")`` - which Lightning calls before it wraps the module
  in ``DistributedDataParallel``, so ``strategy="ddp"`` given as a string works too - freezes what never trains
  (the teacher, the two layers of anomalib's RD bottleneck that are never called): MemKD then uses every
  registered parameter in every step. AAND trains the RAA modules in stage 1 and the student in stage 2 of
  one fit, so each step leaves one of them without gradients: models that set
  ``ddp_find_unused_parameters = True`` switch DDP's ``find_unused_parameters`` on there.
* **Per-rank random streams** - after ``seed_everything`` every rank holds the same global RNG state, so
  on-the-fly randomness (AAND's Perlin synthesis and ``L_A`` pair subsampling, MemKD's exemplar draws) would
  be identical on all ranks. At fit start every rank draws the same ``base`` seed from the global torch RNG
  and derives its own seed :func:`rank_seed` ``(base, global_rank)``: distinct per rank, reproducible for a
  seeded run. The streams live only for the fit and never touch the global RNG (:class:`RNGStream`).
* **Model buffers** (BatchNorm running statistics of the RD bottleneck / decoder) - no ``SyncBatchNorm`` by
  default (as anomalib's Reverse Distillation): batch statistics are per rank; DDP broadcasts rank 0's buffers
  before every *training* forward (``broadcast_buffers=True``), after which each rank updates its copy with its
  own batch. DDP does not sync them in no-grad (validation) forwards, so without more each rank would validate
  with slightly different running statistics. The buffers of ``self.model`` are therefore broadcast from rank
  0 at the start of every validation epoch and at the end of training: every rank evaluates, and ends the fit
  with, exactly the state rank 0 checkpoints. ``--trainer.sync_batchnorm true`` converts the layers to
  ``SyncBatchNorm`` (GPU) instead.
* **Exact evaluation** - Lightning's ``DistributedSampler`` pads the validation / test set with repeated
  samples so that every rank gets the same number of batches; metrics would count those samples twice.
  The mixin drops the repeated samples from the batch in ``on_validation_batch_start`` /
  ``on_test_batch_start`` (before the model, the evaluator and the post-processor see it), so validation
  thresholds and test metrics are computed on each sample exactly once, as in a single process. When the
  only sample of a batch is a repeat, the other copy is dropped instead; only with ``eval_batch_size=1``
  (or fewer samples than ranks) can a repeat survive, and a warning says so.
* **Writes** - Lightning's checkpointing writes on rank 0 only. Exports (``to_torch`` / ``to_onnx`` /
  ``to_openvino``, i.e. ``engine.export`` in a DDP script) run on rank 0 while the other ranks wait and get its
  path. anomalib's ``Engine.fit`` creates one versioned results folder per process; the mixin makes every rank
  use rank 0's and points ``latest`` back at it (:meth:`DistributedTrainingMixin.align_workspace`).

Gradients: each rank computes its losses (``L_A`` pairs, HKD top-K, ``L_NM`` exemplars) on its local batch
and DDP averages the gradients, i.e. the update is the gradient of the mean of the per-rank losses. It is not
the single-process loss of the concatenated batch (pairs and top-K never cross ranks).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .resume import ResumableCycle, RunGuardMixin

logger = logging.getLogger(__name__)

#: checkpoint entry with the run's random state (base seed, per-rank streams, the model's own generators)
RNG_CHECKPOINT_KEY = "anomalib_kd_rng"

_SEED_MODULUS = 2**63


# ---------------------------------------------------------------------------------------------- random streams
def draw_base_seed() -> int:
    """A base seed drawn from the global torch RNG (identical on all ranks after ``seed_everything``)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def epoch_seed(base_seed: int, epoch: int) -> int:
    """Seed of the global torch RNG at the start of training epoch ``epoch`` (same on every rank)."""
    state = np.random.SeedSequence([int(base_seed) % _SEED_MODULUS, 0x45504F43, int(epoch)]).generate_state(
        2, dtype=np.uint32
    )
    return (int(state[0]) << 32 | int(state[1])) % _SEED_MODULUS


def rank_seed(base_seed: int, rank: int) -> int:
    """Seed of ``rank``'s private stream: a hash of ``(base_seed, rank)``, distinct per rank."""
    state = np.random.SeedSequence([int(base_seed) % _SEED_MODULUS, int(rank)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 32 | int(state[1])) % _SEED_MODULUS


class RNGStream:
    """A private random stream for code that draws from torch's *global* generators.

    anomalib's Perlin generator and torchvision's random transforms take no ``generator`` argument. Inside
    ``with stream.activate(device):`` the global CPU generator (and the default generator of ``device`` when
    it is an accelerator) continue this stream; on exit the stream's state is stored and the global
    generators get their previous state back, so code outside the block is unaffected.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed) % _SEED_MODULUS
        self._cpu_state: torch.Tensor | None = None
        self._device_states: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        """Seed and current generator states (plain data + byte tensors: safe for ``weights_only`` loading)."""
        return {
            "seed": self.seed,
            "cpu": None if self._cpu_state is None else self._cpu_state.clone(),
            "devices": {key: value.clone() for key, value in self._device_states.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream exactly where :meth:`state_dict` left it."""
        self.seed = int(state["seed"]) % _SEED_MODULUS
        cpu = state.get("cpu")
        self._cpu_state = None if cpu is None else cpu.clone().to(torch.uint8)
        self._device_states = {key: value.clone().to(torch.uint8) for key, value in (state.get("devices") or {}).items()}

    def _initial_state(self, device: torch.device) -> torch.Tensor:
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        return generator.get_state()

    @contextmanager
    def activate(self, device: torch.device | str | None = None) -> Iterator[None]:
        """Run the block on this stream (CPU generator plus ``device``'s, if ``device`` is an accelerator)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        accelerator = None
        if device.type not in {"cpu", "meta"}:
            accelerator = torch.get_device_module(device.type)
            index = device.index if device.index is not None else accelerator.current_device()
            device = torch.device(device.type, index)
        saved_cpu = torch.get_rng_state()
        saved_device = accelerator.get_rng_state(device.index) if accelerator is not None else None
        try:
            if self._cpu_state is None:
                self._cpu_state = self._initial_state(torch.device("cpu"))
            torch.set_rng_state(self._cpu_state)
            if accelerator is not None:
                key = str(device)
                if key not in self._device_states:
                    self._device_states[key] = self._initial_state(device)
                accelerator.set_rng_state(self._device_states[key], device.index)
            yield
            self._cpu_state = torch.get_rng_state()
            if accelerator is not None:
                self._device_states[str(device)] = accelerator.get_rng_state(device.index)
        finally:
            torch.set_rng_state(saved_cpu)
            if accelerator is not None:
                accelerator.set_rng_state(saved_device, device.index)


# ---------------------------------------------------------------------------------------------- evaluation padding
def padded_positions_to_drop(num_samples: int, num_replicas: int, batch_size: int | None) -> frozenset[int]:
    """Positions of the padded index list of ``DistributedSampler(drop_last=False)`` to leave out.

    The sampler lists ``total = num_replicas * ceil(num_samples / num_replicas)`` positions, position ``g >=
    num_samples`` repeating position ``g % num_samples``, and rank ``r`` iterates positions ``r, r + R, ...``
    in batches of ``batch_size``. The returned positions keep every sample exactly once: by default the
    repeats; when that would empty a batch (its only samples are repeats) the original copy is dropped
    instead if its own batch keeps a sample. ``batch_size=None`` (batches unknown): always the repeats.
    """
    total = num_replicas * math.ceil(num_samples / num_replicas) if num_samples else 0
    dropped = set(range(num_samples, total))
    if not dropped or batch_size is None:
        return frozenset(dropped)

    def batch_of(position: int) -> tuple[int, int]:
        return position % num_replicas, (position // num_replicas) // batch_size

    kept_per_batch: dict[tuple[int, int], int] = {}
    for position in range(total):
        key = batch_of(position)
        kept_per_batch[key] = kept_per_batch.get(key, 0) + (position not in dropped)
    kept_copy = {original: original for original in range(min(num_samples, total))}
    for key in sorted(kept_per_batch):
        if kept_per_batch[key]:
            continue
        for position in sorted(p for p in dropped if batch_of(p) == key):
            current = kept_copy[position % num_samples]
            if kept_per_batch[batch_of(current)] >= 2:  # noqa: PLR2004 - the other batch keeps a sample
                dropped.discard(position)
                dropped.add(current)
                kept_copy[position % num_samples] = position
                kept_per_batch[key] += 1
                kept_per_batch[batch_of(current)] -= 1
                break
    return frozenset(dropped)


def _batch_size_of(batch: Any) -> int | None:
    image = getattr(batch, "image", None)
    return int(image.shape[0]) if isinstance(image, torch.Tensor) and image.dim() > 0 else None


def select_batch_(batch: Any, keep: torch.Tensor) -> Any:
    """Keep the samples where ``keep`` (bool, ``(B,)``) is true in an anomalib ``Batch``, in place."""
    size = int(keep.numel())
    indices = torch.nonzero(keep, as_tuple=False).flatten().tolist()
    changes: dict[str, Any] = {}
    for field in fields(batch):
        value = getattr(batch, field.name)
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            changes[field.name] = value[keep.to(value.device)]
        elif isinstance(value, np.ndarray) and value.ndim > 0 and value.shape[0] == size:
            changes[field.name] = value[keep.cpu().numpy()]
        elif isinstance(value, list | tuple) and len(value) == size:
            changes[field.name] = type(value)(value[i] for i in indices)
    return batch.update(**changes)


# ---------------------------------------------------------------------------------------------- the mixin
class _EpochRNGCallback(Callback):
    """Calls ``pl_module._reseed_global_rng(epoch)`` at every training epoch start (see the mixin)."""

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        reseed = getattr(pl_module, "_reseed_global_rng", None)
        if callable(reseed):
            reseed(trainer.current_epoch)


class DistributedTrainingMixin(RunGuardMixin):
    """DDP behaviour of the anomalib-kd models (see the module docstring). Put it before ``AnomalibModule``.

    Also the exact-resume protocol (see "Exact resume" in the module docstring) and, through
    :class:`anomalib_kd_base.resume.RunGuardMixin`, the data / checkpoint guards.
    """

    #: set by models whose steps leave registered parameters without gradients (AAND's two stages)
    ddp_find_unused_parameters: bool = False

    # ------------------------------------------------------------------ strategy
    def setup(self, stage: str) -> None:
        super().setup(stage)
        trainer = self._trainer
        self.align_workspace()
        if stage != "fit":
            return
        self.configure_trainable_parameters()
        strategy = getattr(trainer, "strategy", None) if trainer is not None else None
        if not self.ddp_find_unused_parameters or not isinstance(strategy, DDPStrategy):
            return
        ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
        if isinstance(ddp_kwargs, dict) and not ddp_kwargs.get("find_unused_parameters"):
            ddp_kwargs["find_unused_parameters"] = True
            rank_zero_info(
                f"{type(self).__name__}: DDP find_unused_parameters=True (each step trains only a part of the model).",
            )

    def configure_trainable_parameters(self) -> None:
        """Called in ``setup("fit")``, before DDP wraps the module and registers the parameters that require grad.

        The frozen teacher (``model.encoder``) and the two layers anomalib's RD bottleneck keeps from the original
        code but never calls (``conv4``, ``bn4``) never get gradients: they must not require grad, or DDP would
        wait for (and all-reduce) their gradients. Models whose trained parts change during the fit first make
        all of them require grad (see ``Aand``).
        """
        model = self.model
        encoder = getattr(model, "encoder", None)
        if isinstance(encoder, nn.Module):
            encoder.requires_grad_(False)
        bottleneck = getattr(model, "bottleneck", None)
        for name in ("conv4", "bn4"):
            unused = getattr(bottleneck, name, None)
            if isinstance(unused, nn.Module):
                unused.requires_grad_(False)

    def align_workspace(self) -> None:
        """Give every rank rank 0's ``default_root_dir`` (anomalib's versioned results folder).

        Under DDP every process runs ``Engine.fit``, whose ``create_versioned_dir`` makes one new ``v<k>`` folder
        per process and leaves ``latest`` pointing at whichever came last; rank 0's is the run's folder. This
        runs in ``setup``, after all processes joined the process group (so every folder exists), before
        anything is written: other ranks adopt rank 0's folder (images written in ``test`` land there), delete
        their own if it is still an empty ``v<k>`` folder and move ``latest`` back to rank 0's folder.
        """
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return
        own = Path(trainer.default_root_dir)
        chosen = Path(trainer.strategy.broadcast(str(own), src=0))
        if own == chosen or not hasattr(trainer, "_default_root_dir"):
            return
        trainer._default_root_dir = str(chosen)  # noqa: SLF001 - Lightning has no setter
        latest = own.parent / "latest"
        if re.fullmatch(r"v\d+", own.name) is None or not latest.is_symlink():
            return
        with suppress(OSError):
            if latest.resolve() == own.resolve() and chosen.exists():
                latest.unlink()
                latest.symlink_to(chosen.resolve(), target_is_directory=True)
            own.rmdir()  # only succeeds while the folder is empty

    # ------------------------------------------------------------------ random streams
    def configure_rank_streams(self, base_seed: int, rank: int) -> None:
        """Seed this rank's private random streams from ``rank_seed(base_seed, rank)``."""
        self.rank_stream_seed = rank_seed(base_seed, rank)
        self._rank_stream = RNGStream(self.rank_stream_seed)

    def clear_rank_streams(self) -> None:
        """Back to the global RNG (outside ``fit``)."""
        self.rank_stream_seed = None
        self._rank_stream = None

    def rank_random(self, device: torch.device | str | None = None) -> Any:
        """Context manager: this rank's private stream during ``fit``, the global RNG otherwise."""
        stream = getattr(self, "_rank_stream", None)
        return stream.activate(device) if stream is not None else nullcontext()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.run_base_seed = draw_base_seed()
        self.configure_rank_streams(self.run_base_seed, self.trainer.global_rank)
        self._kd_reseeded_epoch: int | None = None
        self._kd_cycles: dict[str, ResumableCycle] = {}
        self._kd_pending_cycles: dict[str, Any] = {}
        pending = getattr(self, "_kd_pending_rng", None)
        self._kd_pending_rng = None
        if pending is not None:
            self._restore_run_rng(pending)

    def on_fit_end(self) -> None:
        super().on_fit_end()
        self.clear_rank_streams()
        self._kd_cycles = {}

    def configure_callbacks(self) -> Any:
        """anomalib's component callbacks plus the per-epoch reseed (a callback: it runs before the model's hooks)."""
        callbacks = super().configure_callbacks()
        callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
        return [*callbacks, _EpochRNGCallback()]

    # ------------------------------------------------------------------ exact resume
    def _reseed_global_rng(self, epoch: int) -> None:
        """Global torch RNG := f(base seed, epoch) at each training epoch start (the train loader's shuffling).

        Lightning restores no global RNG on resume, and a resumed fit creates the first epoch's data iterator
        earlier than an uninterrupted one (in ``FitLoop.setup_data``, before ``on_train_epoch_start``). Tying
        the global state to the epoch makes both draw the same order; a resumed fit sets the state of its first
        epoch in ``on_fit_start`` already (before that iterator) and skips the reseed here once.
        """
        base = getattr(self, "run_base_seed", None)
        if base is None or getattr(self, "_kd_reseeded_epoch", None) == epoch:
            self._kd_reseeded_epoch = None
            return
        self._kd_reseeded_epoch = None
        seed = epoch_seed(base, epoch)
        torch.manual_seed(seed)

    def resumable_cycle(self, loader: DataLoader, generator: torch.Generator | None, name: str = "default") -> Any:
        """An endless iterator over ``loader`` whose position is saved in checkpoints and restored on resume.

        For loaders a model draws from during training (MemKD's exemplars): ``generator`` must be the one that
        shuffles ``loader`` (its ``sampler``'s, not also the ``DataLoader``'s: see :class:`ResumableCycle`). Creating
        it again after a resume (for example in ``on_train_epoch_start``) continues exactly where the checkpoint was
        written.
        """
        cycle = ResumableCycle(loader, generator)
        pending = (getattr(self, "_kd_pending_cycles", None) or {}).pop(name, None)
        if pending is not None:
            cycle.load_state_dict(pending)
        cycles = getattr(self, "_kd_cycles", None)
        if cycles is None:
            cycles = self._kd_cycles = {}
        cycles[name] = cycle
        return cycle

    def rank_rng_state(self) -> dict[str, Any]:
        """This rank's random state: its stream, its resumable cycles and the model's own ``rng_state_dict()``."""
        stream = getattr(self, "_rank_stream", None)
        model_state = self.rng_state_dict() if callable(getattr(self, "rng_state_dict", None)) else None
        cycles = {name: cycle.state_dict() for name, cycle in (getattr(self, "_kd_cycles", None) or {}).items()}
        return {"stream": stream.state_dict() if stream is not None else None, "model": model_state, "cycles": cycles}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        base = getattr(self, "run_base_seed", None)
        if base is None or getattr(self, "_rank_stream", None) is None:
            return  # not inside a fit: nothing to resume
        own = self.rank_rng_state()
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, own)  # every rank runs dump_checkpoint; rank 0 writes
        else:
            gathered = [own]
        checkpoint[RNG_CHECKPOINT_KEY] = {"base_seed": int(base), "world_size": world, "ranks": gathered}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return
        state = checkpoint.get(RNG_CHECKPOINT_KEY)
        if state is None:
            logger.warning(
                "%s: the checkpoint holds no random-stream state (written by an older version); the resumed run "
                "continues with fresh streams and will not be identical to an uninterrupted one.",
                type(self).__name__,
            )
        progress = ((checkpoint.get("loops") or {}).get("fit_loop") or {}).get("epoch_progress") or {}
        processed = (progress.get("current") or {}).get("processed")
        # Lightning resumes at epoch_progress.current.processed (FitLoop.on_run_start)
        epoch = int(processed) if processed is not None else int(checkpoint.get("epoch", 0)) + 1
        self._kd_pending_rng = {"state": state, "epoch": epoch}

    def _restore_run_rng(self, pending: dict[str, Any]) -> None:
        state = pending["state"]
        if state is None:
            return
        rank, world = self.trainer.global_rank, self.trainer.world_size
        self.run_base_seed = int(state["base_seed"])
        self.configure_rank_streams(self.run_base_seed, rank)
        ranks = state.get("ranks") or []
        if int(state.get("world_size", 1)) != world or rank >= len(ranks):
            logger.warning(
                "%s: the checkpoint was written by %s process(es), this fit runs %d; the per-rank random streams "
                "restart from their seeds, so the resumed run is not identical to an uninterrupted one.",
                type(self).__name__,
                state.get("world_size"),
                world,
            )
        else:
            own = ranks[rank] or {}
            if own.get("stream") is not None:
                self._rank_stream.load_state_dict(own["stream"])
            if own.get("model") is not None and callable(getattr(self, "load_rng_state_dict", None)):
                self.load_rng_state_dict(own["model"])
            self._kd_pending_cycles = dict(own.get("cycles") or {})
        # the first resumed epoch's data iterator is created before on_train_epoch_start (FitLoop.setup_data)
        epoch = int(pending["epoch"])
        torch.manual_seed(epoch_seed(self.run_base_seed, epoch))
        self._kd_reseeded_epoch = epoch

    # ------------------------------------------------------------------ buffers
    def on_train_end(self) -> None:
        super().on_train_end()
        self.broadcast_model_buffers()

    def broadcast_model_buffers(self) -> None:
        """Copy rank 0's buffers of ``self.model`` (BatchNorm statistics) to every rank (no-op in one process)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return
        for buffer in self.model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)

    # ------------------------------------------------------------------ exports
    def _export_on_rank_zero(self, export: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``export`` on rank 0 only; every rank waits for it and returns rank 0's path."""
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return export(*args, **kwargs)
        result = export(*args, **kwargs) if trainer.is_global_zero else None
        trainer.strategy.barrier("anomalib_kd_export")
        return trainer.strategy.broadcast(result, src=0)

    def to_torch(self, *args: Any, **kwargs: Any) -> Any:
        """anomalib's export (``engine.export``); under DDP only rank 0 writes the file."""
        return self._export_on_rank_zero(super().to_torch, *args, **kwargs)

    def to_onnx(self, *args: Any, **kwargs: Any) -> Any:
        """anomalib's export (``engine.export``); under DDP only rank 0 writes the file."""
        return self._export_on_rank_zero(super().to_onnx, *args, **kwargs)

    def to_openvino(self, *args: Any, **kwargs: Any) -> Any:
        """anomalib's export (``engine.export``); under DDP only rank 0 writes the files."""
        return self._export_on_rank_zero(super().to_openvino, *args, **kwargs)

    # ------------------------------------------------------------------ exact evaluation
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.broadcast_model_buffers()  # DDP does not sync buffers in no-grad forwards
        self._eval_seen: dict[int, int] = {}

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._eval_seen = {}

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_validation_batch_start(batch, batch_idx, dataloader_idx)
        self.drop_padded_samples(batch, dataloader_idx)

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_test_batch_start(batch, batch_idx, dataloader_idx)
        self.drop_padded_samples(batch, dataloader_idx)

    def _eval_dataloader(self, dataloader_idx: int) -> DataLoader | None:
        trainer = self._trainer
        if trainer.testing:
            loaders = trainer.test_dataloaders
        else:
            # `trainer.val_dataloaders` prefers the fit loop's loaders, even inside a later `trainer.validate()`
            combined = getattr(trainer.validate_loop, "_combined_loader", None) if trainer.validating else None
            loaders = combined.iterables if combined is not None and trainer.state.fn == "validate" else None
            loaders = loaders if loaders is not None else trainer.val_dataloaders
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        if isinstance(loaders, list | tuple):
            return loaders[dataloader_idx] if dataloader_idx < len(loaders) else None
        return loaders

    def drop_padded_samples(self, batch: Any, dataloader_idx: int = 0) -> None:
        """Remove, in place, the samples ``DistributedSampler`` repeated to even out the ranks."""
        trainer = self._trainer
        size = _batch_size_of(batch)
        if trainer is None or trainer.world_size <= 1 or size is None or not is_dataclass(batch):
            return
        seen = getattr(self, "_eval_seen", None)
        if seen is None:
            seen = self._eval_seen = {}
        start = seen.get(dataloader_idx, 0)
        seen[dataloader_idx] = start + size

        loader = self._eval_dataloader(dataloader_idx)
        sampler = getattr(loader, "sampler", None)
        if (
            not isinstance(sampler, DistributedSampler)
            or isinstance(sampler, UnrepeatedDistributedSampler)
            or sampler.drop_last
        ):
            return
        num_samples, replicas = len(sampler.dataset), sampler.num_replicas
        batch_sampler = getattr(loader, "batch_sampler", None)
        batch_size = getattr(batch_sampler, "batch_size", None)
        cache_key = (num_samples, replicas, batch_size)
        if getattr(self, "_padding_cache_key", None) != cache_key:
            self._padding_cache_key = cache_key
            self._padding_drop = padded_positions_to_drop(num_samples, replicas, batch_size)
        if not self._padding_drop:
            return
        positions = [sampler.rank + (start + i) * replicas for i in range(size)]
        keep = torch.tensor([position not in self._padding_drop for position in positions], dtype=torch.bool)
        if bool(keep.all()):
            return
        if not bool(keep.any()):
            logger.warning(
                "Rank %d: a distributed evaluation batch holds only samples that DistributedSampler repeated to even "
                "out the %d ranks; they are kept, so the metrics count them twice. Use an eval batch size > 1 (or "
                "evaluate with devices=1) for exact metrics.",
                sampler.rank,
                replicas,
            )
            return
        select_batch_(batch, keep)


__all__ = [
    "RNG_CHECKPOINT_KEY",
    "DistributedTrainingMixin",
    "RNGStream",
    "draw_base_seed",
    "epoch_seed",
    "padded_positions_to_drop",
    "rank_seed",
    "select_batch_",
]
