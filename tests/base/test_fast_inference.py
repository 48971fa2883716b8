"""The opt-in fast inference path: really low precision inside, float32 map head, exports unaffected."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalib_kd_base.fast import fast_dtype, inference_autocast

SIZE = 64


def _module(name: str, fast: bool):
    torch.manual_seed(0)
    if name == "aand":
        from anomalib_aand import Aand

        return Aand(backbone="resnet18", pre_trained=False, memory_size=8, fast_inference=fast,
                    pre_processor=Aand.configure_pre_processor(image_size=(SIZE, SIZE)))  # fmt: skip
    from anomalib_memkd import MemKD

    return MemKD(backbone="resnet18", pre_trained=False, memory_size=8, fast_inference=fast,
                 pre_processor=MemKD.configure_pre_processor(image_size=(SIZE, SIZE)))  # fmt: skip


def test_fast_dtype_per_device() -> None:
    assert fast_dtype(torch.device("cpu")) == torch.bfloat16
    assert fast_dtype(torch.device("cuda")) == torch.float16
    with inference_autocast(False, torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    with inference_autocast(True, torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("name", ["aand", "memkd"])
def test_fast_path_runs_networks_in_low_precision_and_the_head_in_float32(name: str) -> None:
    reference_module = _module(name, fast=False).eval()
    fast_module = _module(name, fast=True).eval()
    fast_module.model.load_state_dict(reference_module.model.state_dict())
    decoder = fast_module.model.decoder
    seen: list[torch.dtype] = []
    handle = decoder.register_forward_hook(lambda _m, _i, out: seen.extend(t.dtype for t in out))
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = reference_module.model(images)
        actual = fast_module.model(images)
    handle.remove()
    assert seen and all(dtype == torch.bfloat16 for dtype in seen), seen  # the option really changes precision
    assert actual.anomaly_map.dtype == torch.float32 and actual.pred_score.dtype == torch.float32
    span = expected.anomaly_map.max() - expected.anomaly_map.min()
    error = float((actual.anomaly_map - expected.anomaly_map).abs().max() / span)
    assert 0 < error < 0.05, error  # bf16 features, float32 cosine: close but not bit-identical


@pytest.mark.parametrize("name", ["aand", "memkd"])
def test_fast_option_does_not_change_the_exported_graph(name: str, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    reference_module = _module(name, fast=False).eval()
    fast_module = _module(name, fast=True).eval()
    fast_module.model.load_state_dict(reference_module.model.state_dict())
    images = np.random.default_rng(0).random((2, 3, SIZE, SIZE), dtype=np.float32)
    outputs = {}
    for label, module in {"fp32": reference_module, "fast": fast_module}.items():
        path = module.to_onnx(tmp_path / label, input_size=(SIZE, SIZE))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        outputs[label] = dict(zip(names, session.run(None, {"input": images}), strict=True))
        import onnx

        elem_types = {init.data_type for init in onnx.load(str(path)).graph.initializer}
        assert onnx.TensorProto.BFLOAT16 not in elem_types and onnx.TensorProto.FLOAT16 not in elem_types
    np.testing.assert_allclose(outputs["fast"]["anomaly_map"], outputs["fp32"]["anomaly_map"], atol=1e-5)
