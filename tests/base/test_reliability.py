"""Issue 16: exact resume, bad data caught before training, clear checkpoint / schedule messages.

Resume acceptance: one uninterrupted fit writes a checkpoint at every epoch end; fits resumed from those checkpoints
(AAND in stage 1, at the stage boundary and in stage 2; MemKD after epoch 1 of 2) must end with bit-identical parameters,
buffers and test metrics. Three ways to write and resume, each tested at those points: the Engine's checkpoints
(``ModelCheckpoint``), Lightning's documented ``trainer.save_checkpoint`` after a fit stopped with
``trainer.should_stop``, and the stock CLI's ``--ckpt_path`` (in process; one run also as the installed command).
Tiny settings: resnet18 random init, 64 px, memory_size 4, 8 training images.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything
from anomalib.callbacks.checkpoint import ModelCheckpoint

from conftest import CATEGORY, mvtec_datamodule

SIZE = 64


def _aand(**kwargs):
    from anomalib_aand import Aand

    params = {
        "backbone": "resnet18",
        "pre_trained": False,
        "memory_size": 4,
        "stage1_epochs": 2,
        "stage2_epochs": 2,
        "anomaly_source_path": None,
        "pre_processor": Aand.configure_pre_processor(image_size=(SIZE, SIZE)),
    }
    params.update(kwargs)
    return Aand(**params)


def _memkd(**kwargs):
    from anomalib_memkd import MemKD

    params = {
        "backbone": "resnet18",
        "pre_trained": False,
        "memory_size": 4,
        "num_exemplars": 4,
        "epochs": 2,
        "pre_processor": MemKD.configure_pre_processor(image_size=(SIZE, SIZE)),
    }
    params.update(kwargs)
    return MemKD(**params)


BUILDERS = {"aand": _aand, "memkd": _memkd}


def _engine(workdir: Path, **kwargs) -> Engine:
    params = {
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": workdir,
        "logger": False,
        "enable_progress_bar": False,
    }
    params.update(kwargs)
    return Engine(**params)


@pytest.fixture(scope="module")
def resume_data(make_dataset) -> Path:
    return make_dataset("resume", n_train=8, n_test_good=2, n_test_per_defect=1)


def _state(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _test_metrics(engine: Engine, model, root: Path) -> dict[str, float]:
    results = engine.test(model, datamodule=mvtec_datamodule(root), verbose=False)
    return {key: float(value) for key, value in results[0].items()}


@pytest.fixture(scope="module")
def runs(resume_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """``runs(name)``: one full fit per model, with a checkpoint at every epoch end (what an interrupted run leaves)."""
    cache: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name not in cache:
            workdir = tmp_path_factory.mktemp(f"resume_{name}")
            seed_everything(0)
            model = BUILDERS[name]()
            every_epoch = ModelCheckpoint(dirpath=workdir / "epochs", filename="epoch{epoch}", save_top_k=-1,
                                          every_n_epochs=1, auto_insert_metric_name=False)  # fmt: skip
            engine = _engine(workdir, callbacks=[every_epoch])
            engine.fit(model, datamodule=mvtec_datamodule(resume_data))
            final = _state(model)
            metrics = _test_metrics(engine, model, resume_data)
            checkpoints = {int(p.stem.removeprefix("epoch")): p for p in (workdir / "epochs").glob("epoch*.ckpt")}
            cache[name] = {"name": name, "state": final, "metrics": metrics, "checkpoints": checkpoints,
                           "root": resume_data}  # fmt: skip
        return cache[name]

    return run


@pytest.fixture(params=["aand", "memkd"])
def uninterrupted(request, runs) -> dict:
    return runs(request.param)


RESUME_POINTS = {
    # checkpoint after epoch e -> resumed fit starts at epoch e + 1 (AAND: stage1_epochs=2, stage2_epochs=2)
    "aand": {"in stage 1": 0, "at the stage boundary": 1, "in stage 2": 2},
    "memkd": {"after epoch 1 of 2": 0},
}


def _resume(uninterrupted, epoch: int, tmp_path: Path):
    seed_everything(123)  # a different global state: the checkpoint alone must determine the continuation
    model = BUILDERS[uninterrupted["name"]]()
    engine = _engine(tmp_path)
    engine.fit(model, datamodule=mvtec_datamodule(uninterrupted["root"]), ckpt_path=uninterrupted["checkpoints"][epoch])
    return engine, model


def test_resume_at_every_epoch_boundary_is_bit_identical(uninterrupted, tmp_path: Path, caplog) -> None:
    reference = uninterrupted["state"]
    for where, epoch in RESUME_POINTS[uninterrupted["name"]].items():
        with caplog.at_level(logging.WARNING):
            engine, model = _resume(uninterrupted, epoch, tmp_path / f"e{epoch}")
        assert "written inside epoch" not in caplog.text  # end-of-epoch checkpoints resume exactly, no warning
        state = _state(model)
        assert state.keys() == reference.keys()
        different = [key for key in reference if not torch.equal(state[key], reference[key])]
        assert not different, f"resumed {where}: {len(different)} tensors differ, e.g. {different[:3]}"
        metrics = _test_metrics(engine, model, uninterrupted["root"])
        assert metrics.keys() == uninterrupted["metrics"].keys()
        for key, value in uninterrupted["metrics"].items():
            assert metrics[key] == value or (math.isnan(value) and math.isnan(metrics[key])), (where, key)


def test_checkpoint_holds_the_run_random_state(uninterrupted) -> None:
    from anomalib_kd_base.distributed import RankRandomness

    checkpoint = torch.load(uninterrupted["checkpoints"][0], map_location="cpu", weights_only=True)
    state = checkpoint["callbacks"][RankRandomness().state_key]  # the callback's state_dict, stored by Lightning
    assert state["world_size"] == 1 and len(state["ranks"]) == 1
    own = state["ranks"][0]
    assert isinstance(state["base_seed"], int) and isinstance(own["stream"]["seed"], int)
    if uninterrupted["name"] == "aand":  # the synthesis stream has run: its generator state is saved
        assert own["stream"]["cpu"].dtype == torch.uint8
    else:  # MemKD's exemplar loader position (ResumableCycle)
        assert own["cycles"]["exemplars"]["drawn"] >= 1
    expected = {"aand": "anomalib_aand.Aand", "memkd": "anomalib_memkd.MemKD"}[uninterrupted["name"]]
    assert checkpoint["anomalib_kd_model"] == expected


# ---------------------------------------------------------------------------------------------- manual save
def _differences(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> str:
    """'' when ``state`` equals ``reference`` bit for bit, else how many tensors differ and by how much at most."""
    assert state.keys() == reference.keys()
    different = [key for key in reference if not torch.equal(state[key], reference[key])]
    if not different:
        return ""
    delta = max(float((state[key].double() - reference[key].double()).abs().max()) for key in different)
    return f"{len(different)} tensors differ (max |delta| {delta:.3g}), e.g. {different[:3]}"


class _StopAfter(Callback):
    """A user's callback that ends the fit after epoch ``epoch`` with ``trainer.should_stop``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


#: fits stopped after these epochs (AAND 2 + 2 epochs: in stage 1, at the stage boundary, in stage 2; MemKD 2 epochs)
STOPS = {"aand": (0, 1, 2), "memkd": (0,)}


@pytest.fixture(scope="module")
def stopped_runs(runs, tmp_path_factory: pytest.TempPathFactory):
    """``stopped_runs(name)``: the uninterrupted run as a chain of fits, each stopped after an epoch of STOPS, saved
    with ``trainer.save_checkpoint`` once ``fit`` returned, and resumed from that file by the next fit."""
    cache: dict[str, dict] = {}

    def chain(name: str) -> dict:
        if name not in cache:
            run, workdir = runs(name), tmp_path_factory.mktemp(f"stopped_{name}")
            stopped, checkpoints, checkpoint = {}, {}, None
            for epoch in STOPS[name]:
                seed_everything(0 if checkpoint is None else 123)  # the first fit starts like the uninterrupted one
                model = BUILDERS[name]()
                engine = _engine(workdir / f"fit{epoch}", callbacks=[_StopAfter(epoch)])
                engine.fit(model, datamodule=mvtec_datamodule(run["root"]), ckpt_path=checkpoint)
                stopped[epoch] = _state(model)
                checkpoint = checkpoints[epoch] = workdir / f"manual{epoch}.ckpt"
                engine.trainer.save_checkpoint(checkpoint)  # Lightning's documented way, after the fit returned
            seed_everything(123)
            model = BUILDERS[name]()
            _engine(workdir / "last").fit(model, datamodule=mvtec_datamodule(run["root"]), ckpt_path=checkpoint)
            cache[name] = {"run": run, "stopped": stopped, "checkpoints": checkpoints, "final": _state(model)}
        return cache[name]

    return chain


@pytest.mark.parametrize("name", ["aand", "memkd"])
def test_manual_save_after_a_stopped_fit_resumes_bit_identically(stopped_runs, name: str) -> None:
    """``trainer.save_checkpoint("manual.ckpt")`` after ``trainer.should_stop``, then ``fit(ckpt_path=...)``: exact.

    Before, that checkpoint held no random state (the streams ended with the fit, before the save): a resumed AAND
    ended max |delta param| 2.2 away from the uninterrupted run, while the Engine's checkpoint of the same epoch
    resumed exactly. Each resumed fit is compared where it stops, and the last one at the end of the schedule.
    """
    chain = stopped_runs(name)
    for epoch, state in chain["stopped"].items():
        checkpoint = torch.load(chain["run"]["checkpoints"][epoch], map_location="cpu", weights_only=True)
        difference = _differences(state, checkpoint["state_dict"])
        assert not difference, f"after epoch {epoch}: {difference}"
    difference = _differences(chain["final"], chain["run"]["state"])
    assert not difference, f"at the end: {difference}"


CLI_MODEL_ARGS = {
    "aand": ["--model", "Aand", "--model.memory_size", "4", "--model.stage1_epochs", "2", "--model.stage2_epochs", "2",
             "--model.anomaly_source_path", "null"],
    "memkd": ["--model", "MemKD", "--model.memory_size", "4", "--model.num_exemplars", "4", "--model.epochs", "2"],
}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "epoch"),
    [("aand", 0), ("aand", 1), ("aand", 2), ("memkd", 0)],
    ids=["aand-in stage 1", "aand-at the stage boundary", "aand-in stage 2", "memkd"],
)
def test_stock_cli_ckpt_path_resumes_bit_identically(stopped_runs, name: str, epoch: int, tmp_path: Path) -> None:
    """``anomalib train ... --ckpt_path <file>`` (anomalib's CLI class, in this process) continues exactly.

    The checkpoints are the manual saves above: the model is built by jsonargparse from the flags, and the state
    of the run reaches the callbacks through the checkpoint alone. The installed command is run once below.
    """
    from anomalib.cli.cli import AnomalibCLI

    chain = stopped_runs(name)
    seed_everything(123)
    cli = AnomalibCLI([
        "train", *CLI_MODEL_ARGS[name],
        "--model.backbone", "resnet18", "--model.pre_trained", "false",
        "--model.pre_processor", str(_size_snippet(tmp_path, SIZE)),
        "--data", "anomalib.data.MVTecAD", "--data.root", str(chain["run"]["root"]), "--data.category", CATEGORY,
        "--data.num_workers", "0", "--data.train_batch_size", "4", "--data.eval_batch_size", "4", "--data.seed", "0",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--logging.log_graph", "false",
        "--default_root_dir", str(tmp_path / "results"), "--ckpt_path", str(chain["checkpoints"][epoch]),
    ])  # fmt: skip
    difference = _differences(_state(cli.model), chain["run"]["state"])
    assert not difference, difference


# ---------------------------------------------------------------------------------------------- stock CLI
def _anomalib(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).with_name("anomalib")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([str(cli), *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


def _size_snippet(tmp_path: Path, size: int) -> Path:
    """The shipped 128 px snippet rewritten to another size (the tests train at 64 px)."""
    shipped = Path(__file__).resolve().parents[2] / "configs" / "image_size" / "128.yaml"
    snippet = tmp_path / f"{size}.yaml"
    snippet.write_text(shipped.read_text().replace("128", str(size)))
    return snippet


def test_stock_cli_train_with_ckpt_path_tests_the_final_model(runs, tmp_path: Path) -> None:
    """`anomalib train --ckpt_path <interrupted>`: resumes exactly and reports the final model's metrics.

    Before: Engine.train handed the checkpoint to test too, so the printed metrics were the interrupted
    checkpoint's. Also checks the image-size snippet (``--model.pre_processor configs/image_size/<n>.yaml``) and the
    warning about ``--trainer.max_epochs``.
    """
    run = runs("aand")
    result = _anomalib(
        "train", "--model", "Aand",
        "--model.backbone", "resnet18", "--model.pre_trained", "false", "--model.memory_size", "4",
        "--model.stage1_epochs", "2", "--model.stage2_epochs", "2", "--model.anomaly_source_path", "null",
        "--model.pre_processor", str(_size_snippet(tmp_path, SIZE)),
        "--data", "anomalib.data.MVTecAD", "--data.root", str(run["root"]), "--data.category", CATEGORY,
        "--data.num_workers", "0", "--data.train_batch_size", "4", "--data.eval_batch_size", "4", "--data.seed", "0",
        "--trainer.accelerator", "cpu", "--trainer.max_epochs", "3", "--logging.log_graph", "false",
        "--default_root_dir", str(tmp_path / "results"),
        "--ckpt_path", str(run["checkpoints"][2]),  # written after epoch 2 of 4 (stage 2)
        cwd=tmp_path,
        # the reference fit ran in this process: the same intra-op thread count gives the same summation order,
        # hence bit-identical weights (1 thread there and 2 here differed by ~1e-7 in CI)
        env={"OMP_NUM_THREADS": str(torch.get_num_threads())},
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "is evaluated instead" in output, output[-4000:]
    assert "--model.stage1_epochs / --model.stage2_epochs" in output  # the schedule warning names the model's flags
    # the fit resumed exactly: its checkpoint equals the uninterrupted run's final model
    written = next((tmp_path / "results").rglob("model.ckpt"))
    state = torch.load(written, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(state[key], value) for key, value in run["state"].items())
    # and the printed metrics are the final model's
    import re

    printed = re.search(r"image_AUROC\s*│\s*([0-9.eE+-]+|nan)", output)
    assert printed is not None, output[-3000:]
    assert float(printed.group(1)) == pytest.approx(run["metrics"]["image_AUROC"], abs=1e-6)


def test_engine_train_with_ckpt_path_scores_with_the_final_thresholds(runs, tmp_path: Path) -> None:
    """Engine.train(ckpt_path=<interrupted>) tests the final model with *its* thresholds and normalisation bounds.

    Lightning restores callback states in test as well, and anomalib's post-processor is a callback: before the fix
    the final weights were scored with the interrupted checkpoint's bounds (image AUROC 0.667 instead of 0.333 here).
    """
    run = runs("aand")
    seed_everything(123)
    model = _aand()
    results = _engine(tmp_path).train(model, datamodule=mvtec_datamodule(run["root"]), ckpt_path=run["checkpoints"][2])
    state = _state(model)
    bounds = [key for key in run["state"] if key.startswith("post_processor.")]
    assert bounds  # thresholds and min/max are part of the compared state
    interrupted = torch.load(run["checkpoints"][2], map_location="cpu", weights_only=True)["state_dict"]
    assert any(not torch.equal(interrupted[key], run["state"][key]) for key in bounds)  # the test can tell them apart
    different = [key for key in run["state"] if not torch.equal(state[key], run["state"][key])]
    assert not different, different
    for key, value in run["metrics"].items():
        assert results[0][key] == value or (math.isnan(value) and math.isnan(results[0][key])), key


# ---------------------------------------------------------------------------------------------- mid-epoch
def test_mid_epoch_checkpoint_warns_on_resume(resume_data: Path, tmp_path: Path, caplog) -> None:
    model = _aand(stage1_epochs=1, stage2_epochs=1)
    engine = _engine(tmp_path / "a", max_steps=1)  # stops after batch 1 of 2
    engine.fit(model, datamodule=mvtec_datamodule(resume_data))
    checkpoint = tmp_path / "mid.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    with caplog.at_level(logging.WARNING):
        _engine(tmp_path / "b", max_steps=2).fit(
            _aand(stage1_epochs=1, stage2_epochs=1), datamodule=mvtec_datamodule(resume_data), ckpt_path=checkpoint
        )
    assert "written inside epoch 0, after 1 batches" in caplog.text


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_of_the_other_model_is_named(runs, tmp_path: Path) -> None:
    from anomalib_aand import Aand
    from anomalib_memkd import MemKD

    with pytest.raises(ValueError, match=r"holds a anomalib_memkd\.MemKD model, not Aand.*MemKD\.load_from_checkpoint"):
        Aand.load_from_checkpoint(runs("memkd")["checkpoints"][0])
    # a checkpoint without the record (older versions): recognised by its parameters
    checkpoint = torch.load(runs("aand")["checkpoints"][0], map_location="cpu", weights_only=False)
    del checkpoint["anomalib_kd_model"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    with pytest.raises(ValueError, match=r"holds a Aand \(anomalib_aand\.Aand\) model, not MemKD"):
        MemKD.load_from_checkpoint(old)


def test_checkpoint_image_size_wins_with_a_warning(runs, caplog) -> None:
    from anomalib_aand import Aand

    path = runs("aand")["checkpoints"][0]
    with caplog.at_level(logging.WARNING):
        plain = Aand.load_from_checkpoint(path)  # no size requested: nothing to warn about
    assert "wins" not in caplog.text and tuple(plain.input_size) == (SIZE, SIZE)
    with caplog.at_level(logging.WARNING):
        model = Aand.load_from_checkpoint(path, pre_processor=Aand.configure_pre_processor(image_size=(128, 128)))
    assert "trained at 64x64 but the pre-processor you passed resizes to 128x128; the checkpoint's 64x64 wins" in (
        caplog.text
    )
    assert tuple(model.input_size) == (SIZE, SIZE) and model.model.input_size == (SIZE, SIZE)


# ---------------------------------------------------------------------------------------------- bad data
def _fit_expecting_error(root: Path, tmp_path: Path, match: str) -> None:
    from anomalib_kd_base.checks import DataCheckError

    model = _aand(stage1_epochs=1, stage2_epochs=1)
    steps: list[int] = []
    model.training_step = lambda *a, **k: steps.append(1)  # must never be reached
    with pytest.raises(DataCheckError, match=match):
        _engine(tmp_path).fit(model, datamodule=mvtec_datamodule(root))
    assert steps == []
    assert not list(tmp_path.rglob("*.ckpt"))


def test_truncated_training_image_is_named_before_training(make_dataset, tmp_path: Path) -> None:
    root = make_dataset("truncated", n_train=4)
    image = root / CATEGORY / "train" / "good" / "002.png"
    image.write_bytes(image.read_bytes()[:200])
    _fit_expecting_error(root, tmp_path, r"training .*train/good/002\.png: OSError")


def test_empty_and_corrupt_test_images_are_named_before_training(make_dataset, tmp_path: Path) -> None:
    root = make_dataset("bad_test", n_train=4)
    (root / CATEGORY / "test" / "good" / "000.png").write_bytes(b"")
    (root / CATEGORY / "test" / "hole" / "000.png").write_bytes(b"not a png at all")
    _fit_expecting_error(root, tmp_path, r"(?s)2 file\(s\).*test/good/000\.png: empty file.*test/hole/000\.png")


def test_missing_mask_file_is_named(make_dataset, tmp_path: Path) -> None:
    root = make_dataset("missing_mask", n_train=4)
    next((root / CATEGORY / "ground_truth" / "stain").iterdir()).unlink()
    _fit_expecting_error(root, tmp_path, r"1 anomalous test image\(s\) have no mask.*test/stain/000\.png")


def test_missing_ground_truth_folder_is_named(make_dataset, tmp_path: Path) -> None:
    root = make_dataset("no_ground_truth", n_train=4)
    shutil.rmtree(root / CATEGORY / "ground_truth")
    _fit_expecting_error(root, tmp_path, r"no mask folder: .*ground_truth does not exist")


def test_data_check_switch(monkeypatch) -> None:
    from anomalib_kd_base.resume import data_checks_on

    model = _aand()
    assert data_checks_on(model)
    monkeypatch.setenv("ANOMALIB_KD_DATA_CHECK", "0")
    assert not data_checks_on(model)
    monkeypatch.delenv("ANOMALIB_KD_DATA_CHECK")
    model.data_check = False
    assert not data_checks_on(model)


def test_test_set_without_anomalous_images_reports_nan(runs, make_dataset, tmp_path: Path, caplog) -> None:
    from anomalib_aand import Aand

    root = make_dataset("only_good", n_train=4)
    for folder in (root / CATEGORY / "test").iterdir():
        if folder.name != "good":
            shutil.rmtree(folder)
    shutil.rmtree(root / CATEGORY / "ground_truth")
    model = Aand.load_from_checkpoint(runs("aand")["checkpoints"][0])
    engine = _engine(tmp_path)
    with caplog.at_level(logging.WARNING):
        results = engine.test(model, datamodule=mvtec_datamodule(root), verbose=False)[0]
    assert "no anomalous images" in caplog.text
    assert math.isnan(float(results["image_AUROC"])) and math.isnan(float(results["pixel_AUROC"]))
    # the guard is released: the same model on a normal test set measures AUROC again
    results = engine.test(model, datamodule=mvtec_datamodule(runs("aand")["root"]), verbose=False)[0]
    assert not math.isnan(float(results["image_AUROC"]))


# ---------------------------------------------------------------------------------------------- image-size snippets
@pytest.mark.parametrize("size", [128, 224, 256, 320, 384, 512])
@pytest.mark.parametrize("model", ["aand", "memkd"])
def test_image_size_snippets_build_the_models_own_pre_processor(size: int, model: str) -> None:
    """configs/image_size/<n>.yaml (MemKD, bilinear) and aand_<n>.yaml (Aand, bicubic) parse (as --model.pre_processor
    does) to that model's configure_pre_processor((n, n))."""
    from anomalib.pre_processing import PreProcessor
    from jsonargparse import ArgumentParser

    from anomalib_aand import Aand
    from anomalib_memkd import MemKD

    cls, name = (Aand, f"aand_{size}.yaml") if model == "aand" else (MemKD, f"{size}.yaml")
    path = Path(__file__).resolve().parents[2] / "configs" / "image_size" / name
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--pre_processor", type=PreProcessor)
    import yaml

    # the CLI test above passes a snippet file to the stock CLI; here each file's content is checked
    config = parser.parse_object({"pre_processor": yaml.safe_load(path.read_text())})
    built = parser.instantiate_classes(config).pre_processor
    expected = cls.configure_pre_processor(image_size=(size, size))
    # jsonargparse passes the interpolation through as PIL's integer code (3 = bicubic), which torchvision maps to
    # InterpolationMode.BICUBIC when it resizes; every other setting is the model's own
    assert repr(built.transform).replace("interpolation=3", "interpolation=InterpolationMode.BICUBIC") == repr(
        expected.transform
    )
    image = torch.rand(1, 3, 77, 91)
    assert torch.equal(built.transform(image), expected.transform(image))
