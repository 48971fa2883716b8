"""ONNX / OpenVINO parity of MemKD with a bottleneck-block decoder: the eager model's folded 1x1 recall.

The recall block folds the read into its first convolution (:meth:`RecallBlock.forward_memory`); a bottleneck-block
decoder (resnet50 / WideResNet50-2: 1x1 first convolution) takes the ``baddbmm_`` branch, a basic-block one
(resnet18, the other export tests) the 3x3 ``conv2d`` branch. Exported graphs never fold (their kernels stay
constants), so the eager 1x1 fold and the exported plain path compute the same function by two routes: this test
checks that they agree on the exported graphs, and that the eager reference really went through ``baddbmm_``.

resnet50 (the smallest bottleneck decoder anomalib's RD builds; the same block types and 1x1 fold as WideResNet50-2,
at half its recall width), random init, 64 px, one epoch (three optimiser steps) and its validation, which sets the
thresholds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anomalib.engine import Engine
from anomalib.models.components.backbone.resnet_decoder import DecoderBottleneck
from anomalib_memkd import MemKD
from anomalib_memkd.components.memory import _exporting
from conftest import mvtec_datamodule

pytestmark = pytest.mark.integration

SIZE = 64
F32 = {"INFERENCE_PRECISION_HINT": "f32"}  # OpenVINO's CPU plugin runs f32 IRs in bf16 by default on this CPU


def test_bottleneck_decoder_export_matches_the_eager_1x1_fold(dataset_root: Path, tmp_path: Path, monkeypatch) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    ov = pytest.importorskip("openvino")

    torch.manual_seed(0)
    model = MemKD(backbone="resnet50", pre_trained=False, memory_size=8, num_exemplars=4, epochs=1,
                  pre_processor=MemKD.configure_pre_processor(image_size=(SIZE, SIZE)))  # fmt: skip
    blocks = [getattr(model.model.decoder, stage)[1] for stage in ("layer1", "layer2", "layer3")]
    assert all(isinstance(block.block, DecoderBottleneck) for block in blocks)
    assert all(block.block.conv1.kernel_size == (1, 1) for block in blocks)
    datamodule = mvtec_datamodule(dataset_root)
    engine = Engine(accelerator="cpu", devices=1, default_root_dir=tmp_path / "fit", logger=False,
                    enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    engine.fit(model, datamodule=datamodule)
    model.eval()
    post = model.post_processor
    assert torch.isfinite(post.image_threshold) and torch.isfinite(post.pixel_threshold)

    images = next(iter(datamodule.test_dataloader())).image[:4]
    # the eager reference: every recall through the folded 1x1 branch (one in-place baddbmm_ per memory)
    calls: list[tuple[int, ...]] = []
    original = torch.Tensor.baddbmm_

    traced: list[tuple[int, ...]] = []  # calls while torch.export traces the graph

    def spy(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        (traced if _exporting() else calls).append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "baddbmm_", spy)
    with torch.no_grad():
        expected = model(images)
    channels = [block.block.conv1.out_channels for block in blocks]
    assert [shape[1] for shape in calls] == channels, calls  # the three stages, each folded once
    assert all(block.folds_recall(8, images.shape[0] * 16) for block in blocks)
    calls.clear()

    reference_map = expected.anomaly_map.numpy()
    value_range = float(reference_map.max() - reference_map.min())
    assert value_range > 1e-3 and np.isfinite(reference_map).all()  # a map that varies: parity is informative

    onnx_path = model.to_onnx(tmp_path / "onnx", input_size=(SIZE, SIZE))
    # anomalib runs one eager probe forward (output names) before torch.export; the traced graph must not fold
    assert not traced, f"the exported graph folded the recall: {traced}"
    graph = onnx.load(str(onnx_path)).graph
    constants = {init.name: init for init in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert convs and all(node.input[1] in constants for node in convs), "a convolution kernel is computed at run time"
    # the plain path: each recall block's first convolution takes cat[query, recall], 2C channels, as a constant
    kernels = {tuple(constants[node.input[1]].dims) for node in convs}
    for block in blocks:
        conv = block.block.conv1
        assert (conv.out_channels, conv.in_channels, 1, 1) in kernels, (conv, sorted(kernels))

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
    onnx_error = float(np.abs(outputs["anomaly_map"] - reference_map).max()) / value_range
    assert onnx_error <= 1e-4, f"ONNX Runtime map differs by {onnx_error:.2e} of its range"
    np.testing.assert_allclose(outputs["pred_score"].reshape(-1), expected.pred_score.numpy().reshape(-1), atol=1e-4)
    np.testing.assert_array_equal(outputs["pred_label"].reshape(-1), expected.pred_label.numpy().reshape(-1))

    # what model.to_openvino does after its own to_onnx (ov.convert_model of the ONNX file), without a second export
    compiled = ov.Core().compile_model(ov.convert_model(str(onnx_path)), "CPU", F32)
    result = {key.any_name: value for key, value in compiled(images.numpy()).items()}
    ov_error = float(np.abs(result["anomaly_map"].reshape(reference_map.shape) - reference_map).max()) / value_range
    assert ov_error <= 1e-4, f"OpenVINO f32 map differs by {ov_error:.2e} of its range"
    # the normalised score divides by the validation scores' spread, which a one-epoch model keeps small: the map's
    # 1e-4 of its range can move it by ~2e-4 (measured 1.5e-4 with Eq. 10's sum); labels must be identical
    np.testing.assert_allclose(result["pred_score"].reshape(-1), expected.pred_score.numpy().reshape(-1), atol=1e-3)
    np.testing.assert_array_equal(result["pred_label"].reshape(-1), expected.pred_label.numpy().reshape(-1))
