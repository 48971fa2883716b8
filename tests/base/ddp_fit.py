"""A short 2-process DDP fit + test on CPU (gloo), driven by ``tests/base/test_ddp.py``; not a pytest module.

    python tests/base/ddp_fit.py {aand,memkd} DATA_ROOT OUT_DIR

Lightning's ``strategy="ddp"`` re-runs this script for rank 1, so it must run as a script, never inside the
pytest process. Every rank writes ``OUT_DIR/rank<r>.pt`` with its state dict after the fit, its test metrics,
the samples it evaluated, its draws of synthetic anomalies / exemplars, the checkpoint and export paths; the
checkpoint IO appends to ``OUT_DIR/saves_rank<r>.txt`` each time this rank really writes a checkpoint file, the
torch export to ``OUT_DIR/exports_rank<r>.txt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from anomalib.callbacks.checkpoint import ModelCheckpoint  # noqa: E402
from anomalib.data import MVTecAD  # noqa: E402
from anomalib.engine import Engine  # noqa: E402
from anomalib.engine.plugins.checkpoint_io import AnomalibCheckpointIO  # noqa: E402
from lightning.pytorch import seed_everything  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

CATEGORY = "widget"
SIZE = 64
TRAIN_BATCH = 2
EVAL_BATCH = 3  # 11 test images: no batch of one image, neither on a rank nor in one process (see test_ddp.py)
SEED = 0


def build_model(name: str):
    """The tiny model of the test (also built by the single-process reference in the test)."""
    common = {"backbone": "resnet18", "pre_trained": False}
    if name == "aand":
        from anomalib_aand import Aand

        pre = Aand.configure_pre_processor(image_size=(SIZE, SIZE))
        return Aand(**common, memory_size=8, stage1_epochs=1, stage2_epochs=1, pre_processor=pre)
    from anomalib_memkd import MemKD

    pre = MemKD.configure_pre_processor(image_size=(SIZE, SIZE))
    return MemKD(**common, memory_size=8, num_exemplars=3, epochs=2, pre_processor=pre)


def build_datamodule(root: Path) -> MVTecAD:
    return MVTecAD(
        root=root,
        category=CATEGORY,
        train_batch_size=TRAIN_BATCH,
        eval_batch_size=EVAL_BATCH,
        num_workers=0,
        seed=SEED,
    )


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class RecordingCheckpointIO(AnomalibCheckpointIO):
    """anomalib's checkpoint IO, logging each real write with the rank that made it."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:  # noqa: ANN001
        with (self.out / f"saves_rank{_rank()}.txt").open("a") as log:
            log.write(f"{path}\n")
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)


class EvalRecorder(Callback):
    """Image paths each rank's evaluator saw (after the model dropped the sampler's repeats)."""

    def __init__(self) -> None:
        self.paths: dict[str, list[str]] = {"validate": [], "test": []}
        self.scores: dict[str, dict[str, float]] = {"validate": {}, "test": {}}  # last validation, test (raw)

    def _record(self, stage: str, batch) -> None:  # noqa: ANN001
        self.paths[stage] += [str(p) for p in batch.image_path]
        for path, score in zip(batch.image_path, batch.pred_score.flatten().tolist(), strict=True):
            self.scores[stage][str(path)] = score

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self._record("validate", batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self._record("test", batch)


def record_torch_exports(out: Path) -> None:
    """Log every real torch export with the rank that wrote it."""
    from anomalib_kd_base.export import ProvenanceExportMixin

    write = ProvenanceExportMixin.to_torch

    def recording_to_torch(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        with (out / f"exports_rank{_rank()}.txt").open("a") as log:
            log.write("torch\n")
        return write(self, *args, **kwargs)

    ProvenanceExportMixin.to_torch = recording_to_torch


def main(name: str, root: Path, out: Path) -> None:
    seed_everything(SEED)
    record_torch_exports(out)
    torch.set_num_threads(1)
    model = build_model(name)
    initial = {key: value.detach().clone() for key, value in model.state_dict().items()}

    draws: list[float] = []  # what this rank synthesised / drew, in order
    if name == "aand":
        hook = model.synthesizer.register_forward_hook(lambda _m, _i, out: draws.append(float(out[1].sum())))
    else:
        next_exemplars = model._next_exemplars  # noqa: SLF001

        def recording_next_exemplars(batch=None) -> torch.Tensor:  # noqa: ANN001
            images = next_exemplars(batch)
            draws.append(float(images.double().sum()))
            return images

        model._next_exemplars = recording_next_exemplars  # noqa: SLF001

    recorder = EvalRecorder()
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", filename="model")
    engine = Engine(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        default_root_dir=out / "work",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder, checkpoint],
        plugins=[RecordingCheckpointIO(out)],
    )
    datamodule = build_datamodule(root)
    engine.fit(model, datamodule=datamodule)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    checkpoint_path = engine.trainer.checkpoint_callback.best_model_path
    test = engine.test(model, datamodule=datamodule)
    if name == "aand":
        hook.remove()  # the export pickles the model
    else:
        del model._next_exemplars  # noqa: SLF001
    exported = engine.export(model, "torch")
    torch.save(
        {
            "rank": engine.trainer.global_rank,
            "world_size": engine.trainer.world_size,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "initial": initial,
            "state": state,
            "checkpoint": checkpoint_path,
            "default_root_dir": engine.trainer.default_root_dir,
            "exported": str(exported),
            "test": test,
            "evaluated": recorder.paths,
            "scores": recorder.scores,
            "draws": draws,
            "stream_seed_cleared": model.kd_random.seed is None,
        },
        out / f"rank{engine.trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
