"""Export of both models for edge inference: torch, ONNX, OpenVINO FP32 / FP16 / INT8, with parity.

Each model is trained briefly (resnet18, random init, 64 px); its thresholds come from validation. Parity is
measured on *held-out* generated images (another seed): the validation images set the adaptive threshold exactly at
one of their own scores, so labels of those images sit on a tie that any rounding can flip.

The exports are made with ``input_size=(64, 64)`` but take any input size (the resize is inside the graph): FP32
parity is checked at 64x64 and on 100x100, 200x150 and 90x130 frames.

Tolerances (anomaly-map max |difference| relative to the map's range, against the Lightning model), written down in
docs/export.md (section Parity) with the figures measured on these models:

* torch export, ONNX Runtime, OpenVINO FP32 (``INFERENCE_PRECISION_HINT=f32``): <= 1e-4, identical labels
* OpenVINO FP16 IR: <= 5e-3 (measured ~5e-4)
* OpenVINO INT8 weight compression (``CompressionType.INT8``): <= 2e-2 (measured ~4e-3)
* OpenVINO INT8 post-training quantization (``INT8_PTQ``, :mod:`anomalib_kd_base.quantization`): <= 0.25 (measured
  0.03-0.13 on these barely trained tiny models), and at least 80 % identical labels
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.deploy import CompressionType, ExportType
from anomalib.engine import Engine
from PIL import Image

from conftest import CATEGORY, mvtec_datamodule

pytestmark = pytest.mark.integration

onnx = pytest.importorskip("onnx")
ov = pytest.importorskip("openvino")
ort = pytest.importorskip("onnxruntime")

SIZE = 64
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def _build(name: str):
    if name == "aand":
        from anomalib_aand import Aand

        return Aand(
            backbone="resnet18",
            pre_trained=False,
            memory_size=8,
            stage1_epochs=1,
            stage2_epochs=2,
            pre_processor=Aand.configure_pre_processor(image_size=(SIZE, SIZE)),
        )
    from anomalib_memkd import MemKD

    return MemKD(
        backbone="resnet18",
        pre_trained=False,
        memory_size=8,
        num_exemplars=4,
        epochs=3,
        pre_processor=MemKD.configure_pre_processor(image_size=(SIZE, SIZE)),
    )


CLI_MODEL_ARGS = {
    "aand": ["--model", "Aand", "--model.memory_size", "8"],
    "memkd": ["--model", "MemKD", "--model.memory_size", "8", "--model.num_exemplars", "4"],
}


@pytest.fixture(scope="module", params=["aand", "memkd"])
def trained(request, dataset_root: Path, tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    name = request.param
    workdir = tmp_path_factory.mktemp(f"export_{name}")
    model = _build(name)
    engine = Engine(accelerator="cpu", devices=1, default_root_dir=workdir, logger=False, enable_progress_bar=False)
    datamodule = mvtec_datamodule(dataset_root)
    engine.fit(model, datamodule=datamodule)
    ckpt = engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    model.eval()
    return {"name": name, "model": model, "engine": engine, "datamodule": datamodule, "ckpt": Path(ckpt)}


@pytest.fixture(scope="module")
def held_out(make_dataset) -> dict[str, np.ndarray]:
    """Images the models never saw (neither training nor validation), in [0, 1], NCHW float32."""
    root = make_dataset("parity", n_train=1, n_test_good=4, n_test_per_defect=2, seed=1234)
    paths = sorted((root / CATEGORY / "test").rglob("*.png"))
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255 for p in paths])
    return {"images": images, "paths": paths}


@pytest.fixture(scope="module")
def reference(trained, held_out) -> dict[str, np.ndarray]:
    """Predictions of the Lightning model itself (pre-processor + model + post-processor)."""
    with torch.no_grad():
        predictions = trained["model"](torch.from_numpy(held_out["images"]))
    return {name: value.numpy() for name, value in predictions._asdict().items() if value is not None}


def _export(trained, tmp_path: Path, export_type: ExportType, compression: CompressionType | None = None) -> Path:
    return trained["engine"].export(
        trained["model"],
        export_type,
        export_root=tmp_path,
        input_size=(SIZE, SIZE),
        compression_type=compression,
        datamodule=trained["datamodule"] if compression == CompressionType.INT8_PTQ else None,
    )


@pytest.fixture(scope="module")
def int8_ptq(trained, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One INT8_PTQ export of the trained model (made while its validation / test loaders raise: calibration reads the
    training images only) and one ONNX export, shared by the INT8 tests."""
    workdir = tmp_path_factory.mktemp(f"int8_{trained['name']}")
    datamodule = trained["datamodule"]

    def forbidden(*_args, **_kwargs):
        raise AssertionError("INT8 calibration must not read the validation/test split")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datamodule, "val_dataloader", forbidden)
        patch.setattr(datamodule, "test_dataloader", forbidden)
        xml_path = _export(trained, workdir / "ptq", ExportType.OPENVINO, CompressionType.INT8_PTQ)
    return {"xml": xml_path, "onnx": _export(trained, workdir / "onnx", ExportType.ONNX)}


def _openvino_outputs(xml_path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    compiled = ov.Core().compile_model(str(xml_path), "CPU", F32)
    result = compiled(images)
    return {output.any_name: result[output] for output in compiled.outputs}


def _map_error(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    expected = reference["anomaly_map"]
    actual = outputs["anomaly_map"].reshape(expected.shape)
    return float(np.abs(actual - expected).max() / (expected.max() - expected.min()))


def _labels(outputs: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(outputs["pred_label"]).reshape(-1).astype(bool)


def test_reference_is_informative(trained, reference) -> None:
    """Parity on a constant map would prove nothing: the reference varies and its thresholds are set."""
    post = trained["model"].post_processor
    assert torch.isfinite(post.image_threshold) and torch.isfinite(post.pixel_threshold)
    anomaly_map = reference["anomaly_map"]
    assert anomaly_map.shape[-2:] == (SIZE, SIZE)
    assert anomaly_map.max() - anomaly_map.min() > 0.1


def test_eval_graph_is_dynamic_in_size_and_static_in_control_flow(trained, tmp_path: Path) -> None:
    """Any input H x W (the resize is in the graph); no data-dependent control flow; constant convolution kernels."""
    path = _export(trained, tmp_path, ExportType.ONNX)  # exported with input_size=(64, 64), as a user would
    graph = onnx.load(str(path)).graph
    op_types = {node.op_type for node in graph.node}
    assert not op_types & {"If", "Loop", "Scan"}, op_types
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 3
    assert dims[2].dim_param and dims[3].dim_param, "height / width must be dynamic"
    assert "Resize" in op_types
    # the resize of the paper's recipe: AAND's reference resizes bicubically, MemKD keeps anomalib's bilinear
    modes = {attr.s.decode() for node in graph.node if node.op_type == "Resize" for attr in node.attribute if attr.name == "mode"}
    assert ("cubic" in modes) == (trained["name"] == "aand"), modes  # the map's up-sampling is linear for both
    constants = {init.name for init in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    convs = [node for node in graph.node if node.op_type in {"Conv", "ConvTranspose"}]
    assert convs
    assert all(node.input[1] in constants for node in convs), "a convolution kernel is computed at run time"
    assert {"ReduceMax"} <= op_types  # image score = max of the map, inside the graph


#: camera frames of other sizes than the model's 64 px, one of them non-square (H x W)
FRAME_SIZES = [(100, 100), (200, 150), (90, 130)]


def _frames(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    frames = torch.nn.functional.interpolate(torch.from_numpy(images), size=size, mode="bilinear", antialias=True)
    return frames.clamp(0, 1).numpy().astype(np.float32)


def test_torch_onnx_openvino_fp32_match_lightning(trained, held_out, tmp_path: Path, monkeypatch) -> None:
    """Exports at input_size=(64, 64) take frames of any size and match the Lightning model on them."""
    from anomalib.deploy import OpenVINOInferencer, TorchInferencer

    # torch export through anomalib's TorchInferencer (pickle: needs TRUST_REMOTE_CODE=1)
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    torch_path = _export(trained, tmp_path / "torch", ExportType.TORCH)
    inferencer = TorchInferencer(torch_path, device="cpu")
    onnx_path = _export(trained, tmp_path / "onnx", ExportType.ONNX)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    xml_path = _export(trained, tmp_path / "openvino", ExportType.OPENVINO)
    monkeypatch.chdir(tmp_path)  # OpenVINOInferencer writes its compile cache to ./openvino_cache
    ov_inferencer = OpenVINOInferencer(xml_path, device="CPU", config=F32)

    for size in [(SIZE, SIZE), *FRAME_SIZES]:
        images = held_out["images"] if size == (SIZE, SIZE) else _frames(held_out["images"], size)
        with torch.no_grad():
            predictions = trained["model"](torch.from_numpy(images))
        reference = {name: value.numpy() for name, value in predictions._asdict().items() if value is not None}
        assert reference["anomaly_map"].max() - reference["anomaly_map"].min() > 0.1

        torch_out = inferencer.predict(torch.from_numpy(images))
        torch_out = {"anomaly_map": torch_out.anomaly_map.detach().numpy(), "pred_label": torch_out.pred_label.numpy()}
        names = [o.name for o in session.get_outputs()]
        onnx_out = dict(zip(names, session.run(None, {"input": images}), strict=True))
        ov_out = ov_inferencer.predict(images)
        ov_out = {"anomaly_map": ov_out.anomaly_map, "pred_label": ov_out.pred_label}

        for backend, outputs in {"torch": torch_out, "onnxruntime": onnx_out, "openvino-fp32": ov_out}.items():
            error = _map_error(outputs, reference)
            assert error <= 1e-4, f"{backend} at {size}: anomaly map differs by {error:.2e} of its range"
            np.testing.assert_array_equal(_labels(outputs), _labels(reference), err_msg=f"{backend} at {size}")
        np.testing.assert_allclose(onnx_out["pred_score"].reshape(-1), reference["pred_score"].reshape(-1), atol=1e-4)


def test_static_export_is_still_available(trained, tmp_path: Path) -> None:
    """``dynamic_spatial=False``: anomalib's static input (for runtimes that need fixed shapes)."""
    path = trained["model"].to_onnx(tmp_path, input_size=(SIZE, SIZE), dynamic_spatial=False)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]


@pytest.mark.parametrize(
    ("compression", "map_tolerance", "min_label_agreement"),
    [
        (CompressionType.FP16, 5e-3, 0.9),
        (CompressionType.INT8, 2e-2, 0.8),
        (CompressionType.INT8_PTQ, 0.25, 0.8),
    ],
    ids=["fp16", "int8-weights", "int8-ptq"],
)
def test_reduced_precision_within_tolerance(
    trained,
    held_out,
    reference,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    compression: CompressionType,
    map_tolerance: float,
    min_label_agreement: float,
) -> None:
    if compression == CompressionType.INT8_PTQ:
        xml_path = request.getfixturevalue("int8_ptq")["xml"]
    else:
        xml_path = _export(trained, tmp_path, ExportType.OPENVINO, compression)
    outputs = _openvino_outputs(xml_path, held_out["images"])
    error = _map_error(outputs, reference)
    agreement = float((_labels(outputs) == _labels(reference)).mean())
    print(f"{trained['name']} {compression.value}: map error {error:.2e} of range, label agreement {agreement:.2f}")
    assert error <= map_tolerance
    assert agreement >= min_label_agreement
    if compression == CompressionType.FP16:
        weights = [op for op in ov.Core().read_model(str(xml_path)).get_ops() if op.get_type_name() == "Constant"]
        assert any(op.get_element_type() == ov.Type.f16 for op in weights), "FP16 IR holds no f16 constant"


def test_int8_ptq_quantizes_networks_not_the_anomaly_map_head(int8_ptq) -> None:
    """Calibration uses training images only (the ``int8_ptq`` export is made while the validation / test loaders
    raise); FakeQuantize sits in the networks, never in the map head."""
    from anomalib_kd_base.quantization import float_node_names

    xml_path, onnx_path = int8_ptq["xml"], int8_ptq["onnx"]
    head = set(float_node_names(onnx_path))
    assert len(head) > 10  # the map head and post-processor were found by their module scopes

    quantized = ov.Core().read_model(str(xml_path))
    fake_quantize = [op for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize"]
    assert len(fake_quantize) > 10, "the networks were not quantized"
    for op in fake_quantize:
        consumers = {target.get_node().get_friendly_name() for out in op.outputs() for target in out.get_target_inputs()}
        assert not consumers & head, f"{op.get_friendly_name()} quantizes the input of {consumers & head}"


def _downstream(model, names) -> list:
    """The ops of the OpenVINO ``model`` computed from the ops named ``names`` (their consumers, transitively)."""
    by_name = {op.get_friendly_name(): op for op in model.get_ops()}
    stack, seen, found = [by_name[name] for name in names if name in by_name], set(), []
    while stack:
        for output in stack.pop().outputs():
            for target in output.get_target_inputs():
                node = target.get_node()
                if node.get_friendly_name() not in seen:
                    seen.add(node.get_friendly_name())
                    found.append(node)
                    stack.append(node)
    return found


def test_int8_ptq_keeps_everything_after_the_map_head_in_float(int8_ptq) -> None:
    """No FakeQuantize anywhere downstream of the map head, including the ops OpenVINO renamed (the blur takes the
    output's name ``anomaly_map``, the sum of the up-sampled levels becomes ``Add_<n>``). Matched by ONNX node name
    only, NNCF put 8-bit quantizers on the up-sampled levels and on the blur's input."""
    from anomalib_kd_base.quantization import float_node_names

    xml_path, onnx_path = int8_ptq["xml"], int8_ptq["onnx"]
    head = float_node_names(onnx_path, ("anomaly_map_generator",))
    quantized = ov.Core().read_model(str(xml_path))
    after = _downstream(quantized, head)
    assert any(op.get_friendly_name() == "anomaly_map" for op in after), "the map head was not found in the IR"
    fake_quantize = [op.get_friendly_name() for op in after if op.get_type_name() == "FakeQuantize"]
    assert not fake_quantize, f"quantizers inside / after the map head: {fake_quantize}"


def test_int8_float_scopes_match_the_exported_graph(int8_ptq) -> None:
    """Each float scope matches ONNX nodes (a renamed sub-module would silently send its ops back to INT8), and
    ``float_op_names`` holds every op that OpenVINO computes from the map head, the renamed ones included."""
    from anomalib_kd_base.quantization import FLOAT_SCOPES, float_node_names, float_op_names

    onnx_path = int8_ptq["onnx"]
    for scope in FLOAT_SCOPES:
        assert len(float_node_names(onnx_path, (scope,))) >= 2, f"float scope {scope!r} matches no ONNX node"
    model = ov.convert_model(str(onnx_path))
    names = set(float_op_names(model, onnx_path))
    onnx_names = {node.name for node in onnx.load(str(onnx_path)).graph.node}
    after = {op.get_friendly_name() for op in _downstream(model, float_node_names(onnx_path, ("anomaly_map_generator",)))}
    assert after <= names, f"ops computed from the map head left out of the float scopes: {sorted(after - names)}"
    assert after - onnx_names, "no renamed op downstream of the head: the case float_op_names covers did not occur"
    outside = (names & onnx_names) - set(float_node_names(onnx_path))  # e.g. the image score: the map's maximum
    assert outside <= after, f"ONNX nodes neither in the scopes nor computed from the head: {sorted(outside - after)}"


def test_patchcore_int8_keeps_its_nearest_neighbour_scoring_in_float(dataset_root: Path, tmp_path: Path) -> None:
    """The edge benchmark's recipe for Patchcore: only the backbone is quantized; nothing computed from the feature
    pooling (embedding, distances to the memory bank, map, score) gets a quantizer. With the map head alone in
    float, the distances were quantized and image AUROC moved by 0.29 on the edge smoke run."""
    from anomalib.models import Patchcore

    from anomalib_kd_base.quantization import FLOAT_SCOPES, calibration_batches, float_node_names, quantize_model

    torch.manual_seed(0)
    model = Patchcore(backbone="resnet18", pre_trained=False, coreset_sampling_ratio=0.5,
                      pre_processor=Patchcore.configure_pre_processor(image_size=(SIZE, SIZE)))  # fmt: skip
    engine = Engine(accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    datamodule = mvtec_datamodule(dataset_root)
    engine.fit(model, datamodule=datamodule)
    onnx_path = model.to_onnx(tmp_path / "onnx", input_size=(SIZE, SIZE))
    images = calibration_batches([torch.rand(4, 3, SIZE, SIZE)], (SIZE, SIZE))
    quantized = quantize_model(onnx_path, images, tail_scopes=("feature_pooler", *FLOAT_SCOPES))
    after = _downstream(quantized, float_node_names(onnx_path, ("feature_pooler",)))
    assert any(op.get_type_name() == "MatMul" for op in after), "the distances to the memory bank were not found"
    fake_quantize = [op.get_friendly_name() for op in after if op.get_type_name() == "FakeQuantize"]
    assert not fake_quantize, f"quantizers after the feature pooling: {fake_quantize}"
    backbone = quantized.get_ops()
    assert sum(op.get_type_name() == "FakeQuantize" for op in backbone) > 5  # the backbone itself is INT8


def test_int8_ptq_without_datamodule_is_a_clear_error(trained, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="training images"):
        trained["model"].to_openvino(tmp_path, input_size=(SIZE, SIZE), compression_type=CompressionType.INT8_PTQ)


def _anomalib(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).with_name("anomalib")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRUST_REMOTE_CODE": "1"}
    return subprocess.run([str(cli), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("export_type", ["torch", "onnx", "openvino"])
def test_stock_cli_exports_from_checkpoint(trained, tmp_path: Path, export_type: str) -> None:
    result = _anomalib(
        "export",
        *CLI_MODEL_ARGS[trained["name"]],
        "--model.backbone", "resnet18",
        "--model.pre_trained", "false",
        "--export_type", export_type,
        "--ckpt_path", str(trained["ckpt"]),
        "--input_size", f"[{SIZE},{SIZE}]",
        "--export_root", str(tmp_path / "export"),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    suffix = {"torch": ".pt", "onnx": ".onnx", "openvino": ".xml"}[export_type]
    exported = list((tmp_path / "export").rglob(f"model{suffix}"))
    assert exported, f"no {suffix} file written"
    if export_type == "openvino":
        compiled = ov.Core().compile_model(str(exported[0]), "CPU", F32)
        names = {output.any_name for output in compiled.outputs}
        assert {"anomaly_map", "pred_score", "pred_label"} <= names
        frame = np.random.default_rng(0).random((1, 3, 90, 130), dtype=np.float32)  # not the 64 px export size
        assert compiled(frame)[compiled.output("anomaly_map")].shape[-2:] == (SIZE, SIZE)


def test_stock_cli_predicts_a_folder_and_writes_heat_maps(trained, held_out, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for index, path in enumerate(held_out["paths"][:4]):
        Image.open(path).save(folder / f"image_{index}.png")
    result = _anomalib(
        "predict",
        *CLI_MODEL_ARGS[trained["name"]],
        "--model.backbone", "resnet18",
        "--model.pre_trained", "false",
        "--ckpt_path", str(trained["ckpt"]),
        "--data", str(folder),
        "--default_root_dir", str(tmp_path / "results"),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = sorted(p.name for p in (tmp_path / "results").rglob("image_*.png"))
    assert written == [f"image_{i}.png" for i in range(4)], written
    heat_map = np.asarray(Image.open(next((tmp_path / "results").rglob("image_0.png"))))
    assert heat_map.ndim == 3 and heat_map.std() > 0
