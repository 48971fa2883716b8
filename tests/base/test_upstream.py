"""Each workaround of ``anomalib_kd_base.upstream`` against the anomalib / Lightning internals it relies on.

A failure here means an upstream release changed such an internal: the message names the workaround and the version
it was written against. Nothing else in the base touches private upstream API (checked statically below).
"""

from __future__ import annotations

import ast
import inspect
import logging
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.strategies import StrategyRegistry
from torch.utils.data import DataLoader

from anomalib_kd_base import upstream

BASE = Path(upstream.__file__).parent


def _changed(workaround: str, what: str) -> str:
    return (
        f"upstream.{workaround} (written against {upstream.WRITTEN_AGAINST}) relies on {what}, which this "
        "anomalib / Lightning no longer has: update or drop the workaround (docs/limitations.md lists them)."
    )


def _trainer(tmp_path: Path, **kwargs) -> Trainer:
    params = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
              "enable_model_summary": False, "enable_checkpointing": False, "default_root_dir": tmp_path}  # fmt: skip
    return Trainer(**{**params, **kwargs})


# ---------------------------------------------------------------------------------------------- anomalib
def test_engine_hook_names_the_unused_parameters_strategy_and_warns_about_the_schedule(caplog) -> None:
    from anomalib_aand import Aand
    from anomalib_memkd import MemKD

    assert hasattr(Engine, "_setup_trainer"), _changed("install_engine_hook", "Engine._setup_trainer")
    original = inspect.unwrap(Engine._setup_trainer)  # noqa: SLF001
    assert list(inspect.signature(original).parameters) == ["self", "model"], _changed(
        "install_engine_hook", "Engine._setup_trainer(self, model)"
    )
    engine = Engine(strategy="ddp", max_epochs=7, accelerator="cpu", devices=1, logger=False)
    assert isinstance(getattr(getattr(engine, "_cache", None), "args", None), dict), _changed(
        "install_engine_hook", "Engine._cache.args (the Trainer arguments of _TrainerArgumentsCache)"
    )
    small = {"backbone": "resnet18", "pre_trained": False}
    aand = Aand(**small, memory_size=4, stage1_epochs=1, stage2_epochs=1, anomaly_source_path=None)
    assert getattr(Engine._setup_trainer, "_anomalib_kd", False)  # noqa: SLF001 - installed by the model
    with caplog.at_level(logging.WARNING):
        engine._setup_trainer(aand)  # noqa: SLF001
    args = engine._cache.args  # noqa: SLF001
    assert args["strategy"] == "ddp_find_unused_parameters_true" and args["max_epochs"] == 2  # noqa: PLR2004
    assert "Aand sets its own schedule: --trainer.max_epochs=7 is replaced by max_epochs=2" in caplog.text
    assert StrategyRegistry["ddp_find_unused_parameters_true"]["init_params"]["find_unused_parameters"] is True
    memkd = Engine(strategy="ddp", accelerator="cpu", devices=1, logger=False)
    memkd._setup_trainer(MemKD(**small, epochs=1))  # noqa: SLF001
    assert memkd._cache.args["strategy"] == "ddp"  # noqa: SLF001 - MemKD uses every parameter in every step


# ---------------------------------------------------------------------------------------------- Lightning
def test_default_root_dir_can_be_set(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path / "own")
    assert hasattr(trainer, "_default_root_dir"), _changed("set_default_root_dir", "Trainer._default_root_dir")
    assert upstream.set_default_root_dir(trainer, tmp_path / "rank0")
    assert trainer.default_root_dir == str(tmp_path / "rank0"), _changed(
        "set_default_root_dir", "Trainer.default_root_dir reading Trainer._default_root_dir"
    )


class _SeenLoaders(Callback):
    def __init__(self) -> None:
        self.datasets: dict[str, list] = {}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self.datasets.setdefault(trainer.state.fn, []).append(trainer.val_dataloaders.dataset)


def test_val_dataloaders_are_those_of_the_running_loop(tmp_path: Path) -> None:
    """No workaround: the exact distributed evaluation reads the public ``trainer.val_dataloaders``.

    Lightning 2.6 resets every loop's loaders when a run attaches its data, so inside a ``trainer.validate()``
    after a fit the property names the validate loop's loader, not the fit loop's.
    """
    fit_data, validate_data = RandomDataset(32, 4), RandomDataset(32, 4)
    seen = _SeenLoaders()
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[seen])
    model = BoringModel()
    trainer.fit(model, DataLoader(RandomDataset(32, 4), batch_size=2), DataLoader(fit_data, batch_size=2))
    trainer.validate(model, DataLoader(validate_data, batch_size=2))
    assert all(data is fit_data for data in seen.datasets["fit"])
    assert seen.datasets["validate"] and all(data is validate_data for data in seen.datasets["validate"]), (
        "trainer.val_dataloaders gives the fit loop's loader inside a later trainer.validate(): DistributedEvaluation "
        "needs the validate loop's (trainer.validate_loop._combined_loader) through a workaround in upstream.py"
    )


def test_checkpoint_position_reads_the_fit_loop_state(tmp_path: Path) -> None:
    def position(**kwargs) -> tuple:
        trainer = _trainer(tmp_path, limit_train_batches=3, limit_val_batches=1, **kwargs)
        trainer.fit(BoringModel())
        trainer.save_checkpoint(tmp_path / "model.ckpt")
        checkpoint = torch.load(tmp_path / "model.ckpt", map_location="cpu", weights_only=False)
        loop = checkpoint["loops"]["fit_loop"]
        for key in ("epoch_progress", "epoch_loop.batch_progress"):
            assert "current" in loop[key], _changed("checkpoint_position", f"checkpoint['loops']['fit_loop'][{key!r}]")
        return upstream.checkpoint_position(checkpoint)

    assert position(max_epochs=2) == (2, None), _changed("checkpoint_position", "epoch_progress.current.processed")
    assert position(max_steps=1) == (1, (0, 1)), _changed(
        "checkpoint_position", "epoch_loop.batch_progress (completed, is_last_batch) of a mid-epoch checkpoint"
    )


# ---------------------------------------------------------------------------------------------- one module
def _private_upstream_uses(path: Path) -> list[str]:
    """Private attributes of other objects (``x._y``, ``getattr(x, "_y")``) and private imports in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            own = isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"}
            if not own and node.attr != "_asdict":  # namedtuple's public API
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in {"getattr", "hasattr", "setattr"}:
            name = node.args[1] if len(node.args) > 1 else None
            if isinstance(name, ast.Constant) and str(name.value).startswith("_"):
                found.append(f"{path.name}:{node.lineno} {node.func.id}(..., {name.value!r})")
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level and node.module != "__future__":
            private = [alias.name for alias in node.names if alias.name.startswith("_")]
            if private or any(part.startswith("_") for part in node.module.split(".")):
                found.append(f"{path.name}:{node.lineno} from {node.module} import {private}")
    return found


def test_private_upstream_api_only_in_upstream_py() -> None:
    others = [path for path in sorted(BASE.glob("*.py")) if path.name != "upstream.py"]
    uses = [use for path in others for use in _private_upstream_uses(path)]
    assert not uses, f"private anomalib / Lightning API outside anomalib_kd_base/upstream.py: {uses}"
    assert _private_upstream_uses(BASE / "upstream.py")  # the scan does see them where they are


@pytest.mark.parametrize("name", ["install_engine_hook", "set_default_root_dir", "checkpoint_position"])
def test_each_workaround_is_documented(name: str) -> None:
    doc = inspect.getdoc(getattr(upstream, name)) or ""
    assert len(doc) > 80, f"upstream.{name} must say why it exists"  # noqa: PLR2004
    limitations = (BASE.parent / "docs" / "limitations.md").read_text()
    assert f"upstream.{name}" in limitations or f"`{name}`" in limitations, f"docs/limitations.md does not list {name}"
