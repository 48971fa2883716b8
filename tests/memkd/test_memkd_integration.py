"""End-to-end tests of MemKD with anomalib: fit, test, predict, checkpoints, export, CLI, registry.

All models are tiny: ResNet18 teacher without pretrained weights, 64 px images, a few steps.
MemKD's ``trainer_arguments`` set ``max_epochs=model.epochs`` (anomalib lets them override the
Engine's); the tests bound the short fits with ``max_steps``.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalib.engine import Engine
from anomalib_memkd import MemKD
from conftest import CATEGORY, mvtec_datamodule

SIZE = 64
BATCH = 4
TRAIN_IMAGES = 12  # conftest's dataset_root
STEPS_PER_EPOCH = TRAIN_IMAGES // BATCH


def _model(**kwargs) -> MemKD:
    params = {
        "backbone": "resnet18",
        "pre_trained": False,
        "memory_size": 10,
        "num_exemplars": 4,
        "pre_processor": MemKD.configure_pre_processor(image_size=(SIZE, SIZE)),
    }
    params.update(kwargs)
    return MemKD(**params)


def _engine(root: Path, **kwargs) -> Engine:
    params = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "default_root_dir": root,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    params.update(kwargs)
    return Engine(**params)


def _memory_tensors(model: MemKD) -> list[torch.Tensor]:
    return [t.detach().clone() for m in model.model.memories for t in (m.keys, m.values)]


def _scores(predictions) -> torch.Tensor:
    return torch.cat([batch.pred_score.flatten() for batch in predictions])


@pytest.fixture(scope="module")
def trained(dataset_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """One short fit (two epochs, validation after each), shared by the tests below."""
    torch.manual_seed(0)
    model = _model()
    initial = _memory_tensors(model)
    steps: list[dict] = []  # per training step: exemplar count, overlap with the batch
    builds: list[int] = []
    original_next, original_build = model._next_exemplars, model._build_exemplar_iterator  # noqa: SLF001

    def next_spy(batch=None) -> torch.Tensor:
        exemplars = original_next(batch)
        # batch.image is pre-processed by the PreProcessor callback, the exemplars by MemKD: compare them directly
        same = (exemplars[:, None] - batch.image[None].to(exemplars)).flatten(2).abs().amax(-1) == 0
        steps.append({"count": exemplars.shape[0], "overlap": int(same.any(dim=1).sum())})
        return exemplars

    def build_spy():
        builds.append(1)
        return original_build()

    model._next_exemplars, model._build_exemplar_iterator = next_spy, build_spy  # noqa: SLF001
    engine = _engine(tmp_path_factory.mktemp("memkd_fit"), max_steps=2 * STEPS_PER_EPOCH)
    datamodule = mvtec_datamodule(dataset_root, batch_size=BATCH)
    engine.fit(model, datamodule=datamodule)
    return {"model": model, "engine": engine, "datamodule": datamodule, "initial": initial, "steps": steps,
            "builds": builds}  # fmt: skip


@pytest.mark.integration
def test_fit_trains_the_memories(trained) -> None:
    model, engine = trained["model"], trained["engine"]
    assert engine.trainer.global_step == 2 * STEPS_PER_EPOCH
    metrics = engine.trainer.callback_metrics
    for key in ("train_loss", "train/kd", "train/nm", "train/nm_sum", "train/nm_mean", "train/orth"):
        assert math.isfinite(float(metrics[key])), key
    # both L_NM figures are logged; the loss uses Eq. 10's sum (default nm_reduction="sum")
    assert float(metrics["train/nm"]) == pytest.approx(float(metrics["train/nm_sum"]))
    assert float(metrics["train/nm_sum"]) > 10 * float(metrics["train/nm_mean"])
    # the total is Eq. 11 of the logged (epoch-mean) terms
    expected = metrics["train/kd"] + 0.1 * metrics["train/nm"] + 0.1 * metrics["train/orth"]
    assert float(metrics["train_loss"]) == pytest.approx(float(expected), rel=1e-4)
    after = _memory_tensors(model)
    names = [f"memories.{i}.{kind}" for i in range(3) for kind in ("keys", "values")]
    for name, before, now in zip(names, trained["initial"], after, strict=True):
        assert not torch.equal(before, now), f"{name} did not change during training"


@pytest.mark.integration
def test_exemplars_stay_out_of_the_batch_and_reuse_one_loader(trained) -> None:
    steps = trained["steps"]
    assert len(steps) == 2 * STEPS_PER_EPOCH
    assert all(step["count"] == 4 for step in steps)  # N = 4 of 12 training images, batch 4: N + B <= 12
    assert sum(step["overlap"] for step in steps) == 0
    assert trained["builds"] == [1]  # one exemplar loader for the two epochs


def test_exemplar_loader_keeps_its_workers(dataset_root: Path) -> None:
    from types import SimpleNamespace

    datamodule = mvtec_datamodule(dataset_root, batch_size=BATCH, num_workers=2)
    datamodule.setup()
    model = _model()
    model._trainer = SimpleNamespace(datamodule=datamodule)  # noqa: SLF001 - only what the loader builder reads
    try:
        model._build_exemplar_iterator()  # noqa: SLF001 - builds the loader, starts no worker yet
    finally:
        model._trainer = None  # noqa: SLF001
    loader = model._exemplar_loader  # noqa: SLF001
    assert loader.persistent_workers
    assert loader.num_workers == 2
    assert loader.batch_size == 4 + BATCH  # N + B: N remain once the batch's own images are dropped


@pytest.mark.integration
def test_empty_training_set_gets_memkd_message(make_dataset, tmp_path: Path) -> None:
    root = make_dataset("memkd_empty_train", n_train=0)
    with pytest.raises(ValueError, match="MemKD needs normal training images.*empty"):
        _engine(tmp_path, max_steps=1).fit(_model(), datamodule=mvtec_datamodule(root, batch_size=2))


@pytest.mark.integration
def test_test_predict_and_checkpoint_round_trip(trained, tmp_path: Path) -> None:
    model, engine, datamodule = trained["model"], trained["engine"], trained["datamodule"]
    results = engine.test(model, datamodule=datamodule)
    for key in ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"):
        assert key in results[0]
        assert math.isfinite(results[0][key]), key

    predictions = engine.predict(model, datamodule=datamodule)
    scores = _scores(predictions)
    assert scores.numel() == len(datamodule.test_data)
    assert torch.isfinite(scores).all()
    assert predictions[0].anomaly_map.shape[-2:] == (SIZE, SIZE)

    checkpoint = engine.best_model_path
    assert checkpoint and Path(checkpoint).is_file()
    reloaded = MemKD.load_from_checkpoint(checkpoint)  # weights_only=True in anomalib 2.7
    assert tuple(reloaded.model.input_size) == (SIZE, SIZE)  # not the 256 px default
    for before, after in zip(_memory_tensors(model), _memory_tensors(reloaded), strict=True):
        assert torch.equal(before, after)
    reloaded_scores = _scores(_engine(tmp_path).predict(reloaded, datamodule=datamodule))
    torch.testing.assert_close(reloaded_scores, scores, rtol=0, atol=0)

    # the Engine can also test straight from the checkpoint file
    from_ckpt = _engine(tmp_path / "ckpt").test(_model(), datamodule=datamodule, ckpt_path=checkpoint)
    assert from_ckpt[0]["image_AUROC"] == pytest.approx(results[0]["image_AUROC"])


@pytest.mark.integration
def test_export_onnx_and_openvino_match_torch(trained, tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    openvino = pytest.importorskip("openvino")
    model = trained["model"].eval()
    datamodule = trained["datamodule"]
    images = next(iter(datamodule.test_dataloader())).image[:2]
    with torch.no_grad():
        expected = model(images)  # pre-processor + model + post-processor, as exported

    onnx_path = model.to_onnx(tmp_path / "onnx", input_size=(SIZE, SIZE))
    session = onnxruntime.InferenceSession(str(onnx_path))
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
    np.testing.assert_allclose(outputs["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4)
    np.testing.assert_allclose(outputs["pred_score"].reshape(-1), expected.pred_score.numpy().reshape(-1), atol=1e-4)

    xml_path = model.to_openvino(tmp_path / "openvino", input_size=(SIZE, SIZE))
    compiled = openvino.Core().compile_model(str(xml_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = {key.any_name: value for key, value in compiled(images.numpy()).items()}
    np.testing.assert_allclose(result["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-3)


@pytest.mark.integration
def test_exemplar_count_is_clamped_to_the_training_set(make_dataset, tmp_path: Path, caplog) -> None:
    root = make_dataset("memkd_small_train", n_train=3, image_size=96)  # the pre-processor resizes to 64
    model = _model(num_exemplars=50)
    drawn: list[int] = []
    original = model._next_exemplars  # noqa: SLF001

    def spy(batch=None) -> torch.Tensor:
        exemplars = original(batch)
        drawn.append(exemplars.shape[0])
        # the pre-processor's transform (resize to 64 px + ImageNet normalisation) was applied
        assert exemplars.shape[-2:] == (SIZE, SIZE)
        assert exemplars.min() < 0
        return exemplars

    model._next_exemplars = spy  # noqa: SLF001
    with caplog.at_level(logging.WARNING, logger="anomalib_memkd"):
        _engine(tmp_path, max_steps=2, limit_val_batches=0).fit(
            model,
            datamodule=mvtec_datamodule(root, batch_size=2),
        )
    # 3 training images, batch 2: one image is outside each batch of 2, two outside the last batch of 1
    assert "num_exemplars=50 exceeds the 1 training images outside a batch of 2" in caplog.text
    assert drawn == [1, 1]


@pytest.mark.integration
def test_fit_without_datamodule_explains_num_exemplars(dataset_root: Path, tmp_path: Path) -> None:
    datamodule = mvtec_datamodule(dataset_root, batch_size=BATCH)
    datamodule.setup()
    with pytest.raises(RuntimeError, match="num_exemplars=4.*datamodule"):
        _engine(tmp_path, max_steps=1).fit(_model(), train_dataloaders=datamodule.train_dataloader())


def _run(code_or_args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(code_or_args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.integration
def test_registry_in_a_fresh_interpreter(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import warnings
        warnings.filterwarnings("error", message="anomalib-kd")  # the hook must load MemKD cleanly
        from anomalib_memkd import MemKD  # imported before anomalib.models: the circular case
        import anomalib.models
        from anomalib.models import get_model, list_models
        assert anomalib.models.MemKD is MemKD
        kwargs = {"backbone": "resnet18", "pre_trained": False}
        assert "mem_k_d" in list_models(), sorted(list_models())
        assert "MemKD" in list_models("pascal")
        for name in ("memkd", "MemKD", "mem_k_d", "mem_kd"):
            assert type(get_model(name, **kwargs)) is MemKD, name
        model = get_model({"class_path": "MemKD", "init_args": kwargs})
        assert type(model) is MemKD
        print("OK")
        """,
    )
    result = _run([sys.executable, "-c", code], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


@pytest.mark.integration
def test_stock_cli_trains_memkd(dataset_root: Path, tmp_path: Path) -> None:
    anomalib_cli = Path(sys.executable).with_name("anomalib")
    command = [str(anomalib_cli)] if anomalib_cli.exists() else [sys.executable, "-m", "anomalib.cli.cli"]
    command += [
        "train",
        "--model", "MemKD",
        "--model.backbone", "resnet18",
        "--model.pre_trained", "false",
        "--model.memory_size", "10",
        "--model.num_exemplars", "4",
        "--model.epochs", "1",
        "--model.pre_processor.class_path", "anomalib.pre_processing.PreProcessor",
        "--model.pre_processor.init_args.transform.class_path", "torchvision.transforms.v2.Resize",
        "--model.pre_processor.init_args.transform.init_args.size", f"[{SIZE},{SIZE}]",
        "--data", "anomalib.data.MVTecAD",
        "--data.root", str(dataset_root),
        "--data.category", CATEGORY,
        "--data.train_batch_size", str(BATCH),
        "--data.eval_batch_size", str(BATCH),
        "--data.num_workers", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--default_root_dir", str(tmp_path / "results"),
    ]  # fmt: skip
    result = _run(command, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    output = result.stdout + result.stderr
    assert "image_AUROC" in output
    assert list((tmp_path / "results").rglob("model.ckpt")), "no checkpoint written"


def test_config_file_parses(tmp_path: Path) -> None:
    config = Path(__file__).resolve().parents[2] / "configs" / "memkd.yaml"
    anomalib_cli = Path(sys.executable).with_name("anomalib")
    if not anomalib_cli.exists():
        pytest.skip("anomalib console script not found next to the interpreter")
    result = _run([str(anomalib_cli), "train", "--config", str(config), "--print_config"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MemKD" in result.stdout
    assert "epochs: 100" in result.stdout
    assert "category: bottle" in result.stdout
    # the config is the paper's recipe: Eq. 5/8 without temperature, Eq. 10's sum, batch 16, and it equals the
    # constructor's defaults (the batch size belongs to the datamodule)
    import yaml

    printed = yaml.safe_load(result.stdout)
    init = printed["model"]["init_args"]
    assert init["temperature"] == 1.0 and init["nm_reduction"] == "sum" and init["orth_form"] == "abs"
    assert init["memory_size"] == 50 and init["num_exemplars"] == 16 and init["lr"] == 0.005
    assert init["lambda_nm"] == init["lambda_orth"] == 0.1 and init["backbone"] == "wide_resnet50_2.tv_in1k"
    assert printed["data"]["init_args"]["train_batch_size"] == 16
    defaults = {name: parameter.default for name, parameter in inspect.signature(MemKD).parameters.items()}
    as_python = {name: tuple(value) if isinstance(value, list) else value for name, value in init.items()}
    differs = {name for name, value in as_python.items() if name in defaults and defaults[name] != value}
    assert differs == set(), differs
