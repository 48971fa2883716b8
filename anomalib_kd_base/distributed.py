"""Random streams and DDP behaviour of AAND and MemKD as Lightning callbacks (why: docs/ddp.md, docs/training.md).

:class:`RankRandomness`: each rank's own stream, the global RNG re-seeded per epoch (Lightning restores none), its
``state_dict`` in every checkpoint (bit-identical resumes). :class:`DistributedTraining`: rank 0's results folder,
what never trains frozen before DDP wraps the module. :class:`DistributedEvaluation`: ``DistributedSampler``'s
padded repeats dropped from evaluation batches, rank 0's BatchNorm buffers broadcast.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .resume import ResumableCycle, one_loader
from .upstream import checkpoint_position, set_default_root_dir

logger = logging.getLogger(__name__)

#: where checkpoints of earlier versions kept the run's random state (read on resume)
RNG_CHECKPOINT_KEY = "anomalib_kd_rng"

_SEED_MODULUS = 2**63


# ---------------------------------------------------------------------------------------------- random streams
def _hash_seed(*entropy: int) -> int:
    state = np.random.SeedSequence([int(value) for value in entropy]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 32 | int(state[1])) % _SEED_MODULUS


def epoch_seed(base_seed: int, epoch: int) -> int:
    """Seed of the global torch RNG at the start of training epoch ``epoch`` (same on every rank)."""
    return _hash_seed(int(base_seed) % _SEED_MODULUS, 0x45504F43, epoch)


def rank_seed(base_seed: int, rank: int) -> int:
    """Seed of ``rank``'s private stream: a hash of ``(base_seed, rank)``, distinct per rank."""
    return _hash_seed(int(base_seed) % _SEED_MODULUS, rank)


class RNGStream:
    """A private stream for code that draws from torch's *global* generators (anomalib's Perlin generator)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed) % _SEED_MODULUS
        self._cpu_state: torch.Tensor | None = None
        self._device_states: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        """Seed and generator states (plain data + byte tensors: safe for ``weights_only`` loading)."""
        return {
            "seed": self.seed,
            "cpu": None if self._cpu_state is None else self._cpu_state.clone(),
            "devices": {key: value.clone() for key, value in self._device_states.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"]) % _SEED_MODULUS
        cpu = state.get("cpu")
        self._cpu_state = None if cpu is None else cpu.clone().to(torch.uint8)
        self._device_states = {key: value.clone().to(torch.uint8) for key, value in (state.get("devices") or {}).items()}

    @contextmanager
    def activate(self, device: torch.device | str | None = None) -> Iterator[None]:
        """The block continues this stream (CPU generator, plus ``device``'s for an accelerator); on exit the global
        generators get their previous states back (``torch.random.fork_rng``)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        accelerator = None if device.type in {"cpu", "meta"} else torch.get_device_module(device.type)
        if accelerator is not None and device.index is None:
            device = torch.device(device.type, accelerator.current_device())
        forked = [device.index] if accelerator is not None else []
        with torch.random.fork_rng(devices=forked, device_type=device.type if forked else "cpu"):
            if self._cpu_state is None:
                self._cpu_state = torch.Generator().manual_seed(self.seed).get_state()
            torch.set_rng_state(self._cpu_state)
            if accelerator is not None:
                if str(device) not in self._device_states:
                    self._device_states[str(device)] = torch.Generator(device).manual_seed(self.seed).get_state()
                accelerator.set_rng_state(self._device_states[str(device)], device.index)
            yield
            self._cpu_state = torch.get_rng_state()
            if accelerator is not None:
                self._device_states[str(device)] = accelerator.get_rng_state(device.index)


class RankRandomness(Callback):
    """This rank's random stream during ``fit`` and its exact resume. ``state_dict``: ``{"base_seed", "world_size",
    "ranks": [{"stream", "cycles": {name: position}}, ...]}`` (all ranks', gathered): live during a fit, as it ended
    after it, empty before the first fit."""

    def __init__(self) -> None:
        self.base_seed: int | None = None
        self.stream: RNGStream | None = None
        self.cycles: dict[str, ResumableCycle] = {}
        self.pending_cycles: dict[str, Any] = {}  # restored positions, taken by the next cycle() of that name
        self._rank, self._world = 0, 1
        self._final: dict[str, Any] = {}  # the state at the end of the last fit
        self._resume: dict[str, Any] | None = None  # loaded from the checkpoint of the fit that starts
        self._reseeded_epoch: int | None = None

    @property
    def seed(self) -> int | None:
        """This rank's stream seed during ``fit``, else ``None``."""
        return None if self.stream is None else self.stream.seed

    def start(self, seed: int) -> None:
        self.stream, self.cycles = RNGStream(seed), {}

    def stop(self) -> None:
        self.stream, self.cycles = None, {}

    def activate(self, device: torch.device | str | None = None) -> Any:  # noqa: ANN401
        """Context manager: this rank's stream during ``fit``, the global RNG otherwise."""
        return self.stream.activate(device) if self.stream is not None else nullcontext()

    def cycle(self, loader: DataLoader, generator: torch.Generator | None, name: str = "default") -> ResumableCycle:
        """A :class:`ResumableCycle` whose position is saved in checkpoints (restored if one was loaded)."""
        cycle = ResumableCycle(loader, generator)
        if (pending := self.pending_cycles.pop(name, None)) is not None:
            cycle.load_state_dict(pending)
        self.cycles[name] = cycle
        return cycle

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        cycles = {**self.pending_cycles, **{name: cycle.state_dict() for name, cycle in self.cycles.items()}}
        own = {"stream": self.stream.state_dict(), "cycles": cycles}
        ranks: list[Any] = [own]
        if self._world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * self._world
            torch.distributed.all_gather_object(ranks, own)  # every rank dumps the checkpoint; rank 0 writes it
        return {"base_seed": int(self.base_seed), "world_size": self._world, "ranks": ranks}

    def state_dict(self) -> dict[str, Any]:
        return self._state() if self.stream is not None and self.base_seed is not None else dict(self._final)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._resume is not None:  # a fit resumes from this checkpoint (see on_load_checkpoint)
            self._resume["state"] = state_dict

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:  # noqa: ANN401
        self._resume = None
        if trainer.state.fn == "fit":
            epoch, _ = checkpoint_position(checkpoint)
            self._resume = {"state": checkpoint.get(RNG_CHECKPOINT_KEY), "epoch": epoch}

    # ------------------------------------------------------------------ the fit
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        self._rank, self._world = trainer.global_rank, trainer.world_size
        self.base_seed = int(torch.randint(0, 2**62, (1,)).item())  # the same on all ranks after seed_everything
        self.start(rank_seed(self.base_seed, self._rank))
        self.pending_cycles, self._final, self._reseeded_epoch = {}, {}, None
        resume, self._resume = self._resume, None
        if resume is not None:
            self._restore(resume["state"], resume["epoch"], type(pl_module).__name__)

    def _restore(self, state: dict[str, Any] | None, epoch: int, name: str) -> None:
        if not state:
            logger.warning(
                "%s: the checkpoint holds no random-stream state (written by an older version); the resumed run "
                "continues with fresh streams and will not be identical to an uninterrupted one.", name,
            )  # fmt: skip
            return
        self.base_seed = int(state["base_seed"])
        self.start(rank_seed(self.base_seed, self._rank))
        ranks = state.get("ranks") or []
        if int(state.get("world_size", 1)) != self._world or self._rank >= len(ranks):
            logger.warning(
                "%s: the checkpoint was written by %s process(es), this fit runs %d; the per-rank random streams "
                "restart from their seeds, so the resumed run is not identical to an uninterrupted one.",
                name, state.get("world_size"), self._world,
            )  # fmt: skip
        else:
            own = ranks[self._rank] or {}
            if own.get("stream") is not None:
                self.stream.load_state_dict(own["stream"])
            self.pending_cycles = dict(own.get("cycles") or {})
        # a resumed fit creates its first epoch's data iterator before on_train_epoch_start (FitLoop.setup_data)
        torch.manual_seed(epoch_seed(self.base_seed, epoch))
        self._reseeded_epoch = epoch

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        """Global torch RNG := f(base seed, epoch) (the train loader's shuffling); once skipped after a resume."""
        epoch, reseeded, self._reseeded_epoch = trainer.current_epoch, self._reseeded_epoch, None
        if self.base_seed is not None and self.stream is not None and reseeded != epoch:
            torch.manual_seed(epoch_seed(self.base_seed, epoch))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        self._final = self._state()  # what trainer.save_checkpoint(...) after the fit writes

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        self.stop()


# ---------------------------------------------------------------------------------------------- DDP set-up
def _distributed(trainer: Any) -> bool:  # noqa: ANN401
    return trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized()


def align_workspace(trainer: Any) -> None:  # noqa: ANN401
    """Every rank adopts rank 0's ``default_root_dir`` (each ``Engine.fit`` made a ``v<k>`` folder), removes its own
    while empty and points ``latest`` back at rank 0's. Runs in ``setup``: all processes joined, nothing written."""
    if not _distributed(trainer):
        return
    own = Path(trainer.default_root_dir)
    chosen = Path(trainer.strategy.broadcast(str(own), src=0))
    if own == chosen or not set_default_root_dir(trainer, chosen):
        return
    latest = own.parent / "latest"
    if re.fullmatch(r"v\d+", own.name) is None or not latest.is_symlink():
        return
    with suppress(OSError):
        if latest.resolve() == own.resolve() and chosen.exists():
            latest.unlink()
            latest.symlink_to(chosen.resolve(), target_is_directory=True)
        own.rmdir()  # only succeeds while the folder is empty


_IN_EXPORT = contextvars.ContextVar("anomalib_kd_rank_zero_export", default=False)


def run_on_rank_zero(trainer: Any, export: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
    """Run ``export`` on rank 0 only; every rank waits for it and returns rank 0's result. A nested export (anomalib's
    ``to_openvino`` calls ``to_onnx``) runs directly: only rank 0 is inside, so a barrier there would never be met."""
    if not _distributed(trainer) or _IN_EXPORT.get():
        return export(*args, **kwargs)
    token = _IN_EXPORT.set(True)
    try:
        result = export(*args, **kwargs) if trainer.is_global_zero else None
    finally:
        _IN_EXPORT.reset(token)
    trainer.strategy.barrier("anomalib_kd_export")
    return trainer.strategy.broadcast(result, src=0)


class DistributedTraining(Callback):
    """Rank 0's results folder, trainable parameters before DDP wraps the module, the unused-parameter check."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:  # noqa: ANN401
        align_workspace(trainer)
        if stage == "fit":
            pl_module.configure_trainable_parameters()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        wrapped = getattr(trainer.strategy, "model", None)
        strict = isinstance(wrapped, DistributedDataParallel) and not wrapped.find_unused_parameters
        if pl_module.ddp_find_unused_parameters and strict:
            msg = (
                f"{type(pl_module).__name__} trains only a part of the model in each step, so DDP must find the unused "
                "parameters: pass --trainer.strategy ddp_find_unused_parameters_true (Python: "
                "strategy='ddp_find_unused_parameters_true' or DDPStrategy(find_unused_parameters=True))."
            )
            raise ValueError(msg)


# ---------------------------------------------------------------------------------------------- exact evaluation
@functools.cache  # one answer per (dataset size, replicas, batch size): computed once per evaluation loader
def padded_positions_to_drop(num_samples: int, num_replicas: int, batch_size: int | None) -> frozenset[int]:
    """Positions of ``DistributedSampler(drop_last=False)``'s padded index list to leave out, keeping each sample once.
    Position ``g >= num_samples`` repeats ``g % num_samples``; rank ``r`` iterates ``r, r + R, ...`` in batches of
    ``batch_size``. The repeats are dropped, unless that empties a batch: then the original copy is, if its own batch
    keeps a sample. ``batch_size=None`` (batches unknown): always the repeats."""
    total = num_replicas * math.ceil(num_samples / num_replicas) if num_samples else 0
    dropped = set(range(num_samples, total))
    if not dropped or batch_size is None:
        return frozenset(dropped)

    def batch_of(position: int) -> tuple[int, int]:
        return position % num_replicas, (position // num_replicas) // batch_size

    kept_per_batch = Counter(batch_of(position) for position in range(total) if position not in dropped)
    kept_copy = {original: original for original in range(min(num_samples, total))}
    for key in sorted({batch_of(position) for position in dropped}):  # only batches of repeats can keep none
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


def select_batch_(batch: Any, keep: torch.Tensor) -> Any:  # noqa: ANN401
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


def broadcast_buffers(trainer: Any, module: nn.Module) -> None:  # noqa: ANN401
    """Copy rank 0's buffers of ``module`` (BatchNorm statistics) to every rank (no-op in one process)."""
    if _distributed(trainer):
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


class DistributedEvaluation(Callback):
    """Each evaluation sample scored once under DDP, with rank 0's BatchNorm statistics."""

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        broadcast_buffers(trainer, pl_module.model)  # DDP does not sync buffers in no-grad forwards
        self._seen = {}

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        self._seen = {}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        broadcast_buffers(trainer, pl_module.model)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,  # noqa: ANN401
                                  dataloader_idx: int = 0) -> None:  # fmt: skip
        """Remove, in place, the samples ``DistributedSampler`` repeated to even out the ranks."""
        image = getattr(batch, "image", None)
        if trainer.world_size <= 1 or not is_dataclass(batch) or not isinstance(image, torch.Tensor) or not image.dim():
            return
        size = int(image.shape[0])
        start = self._seen.get(dataloader_idx, 0)
        self._seen[dataloader_idx] = start + size
        loader = one_loader(trainer.test_dataloaders if trainer.testing else trainer.val_dataloaders, dataloader_idx)
        sampler = getattr(loader, "sampler", None)
        pads = isinstance(sampler, DistributedSampler) and not isinstance(sampler, UnrepeatedDistributedSampler)
        if not pads or sampler.drop_last:
            return
        replicas = sampler.num_replicas
        batch_size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
        drop = padded_positions_to_drop(len(sampler.dataset), replicas, batch_size)
        if not drop:
            return
        keep = torch.tensor([sampler.rank + (start + i) * replicas not in drop for i in range(size)], dtype=torch.bool)
        if bool(keep.all()):
            return
        if not bool(keep.any()):
            logger.warning(
                "Rank %d: a distributed evaluation batch holds only samples that DistributedSampler repeated to even "
                "out the %d ranks; they are kept, so the metrics count them twice. Use an eval batch size > 1 (or "
                "evaluate with devices=1) for exact metrics.", sampler.rank, replicas,
            )  # fmt: skip
            return
        select_batch_(batch, keep)

    on_test_batch_start = on_validation_batch_start
