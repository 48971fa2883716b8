"""Teacher weights for air-gapped machines: local files, the offline error, provenance in checkpoints and exports."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from anomalib_aand import Aand, AandModel
from anomalib_kd_base import weights as kdw
from anomalib_kd_base.export import read_onnx_metadata, read_openvino_metadata, read_torch_metadata
from anomalib_kd_tools import weights as weights_cli
from anomalib_memkd import MemKD, MemKDModel

from conftest import CATEGORY, mvtec_datamodule

SIZE = 64


# ---------------------------------------------------------------------------------------------- helpers
def random_backbone_state(arch: str = "resnet18", seed: int = 123) -> dict[str, torch.Tensor]:
    """A randomly initialised timm classification model's state dict, batch-norm statistics randomised too
    (fresh models all have zero means / unit variances, which would make a "loaded" check vacuous)."""
    torch.manual_seed(seed)
    state = timm.create_model(arch, pretrained=False).state_dict()
    for name, tensor in state.items():
        if name.endswith("running_mean"):
            tensor.normal_()
        elif name.endswith("running_var"):
            tensor.uniform_(0.5, 2.0)
        elif name.endswith("num_batches_tracked"):
            tensor.fill_(seed)
    return {name: tensor.contiguous() for name, tensor in state.items()}


def write_weights(path: Path, state: dict[str, torch.Tensor], fmt: str = "safetensors") -> Path:
    if fmt == "safetensors":
        save_file(state, str(path))
    elif fmt == "pth":
        torch.save(state, path)
    elif fmt == "pth-wrapped":  # a training checkpoint: {"state_dict": {"model.<name>": ...}, "epoch": ...}
        torch.save({"epoch": 3, "state_dict": {f"model.{name}": tensor for name, tensor in state.items()}}, path)
    else:  # pragma: no cover
        raise ValueError(fmt)
    return path


def assert_teacher_equals(extractor: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    teacher = extractor.feature_extractor.state_dict()
    assert len(teacher) > 50
    for name, tensor in teacher.items():
        assert tensor.dtype == state[name].dtype, name
        assert torch.equal(tensor, state[name]), f"teacher tensor {name} differs from the file"


def small_model(cls: type, **kwargs):
    params = {"backbone": "resnet18", "pre_trained": False, "memory_size": 4}
    params["pre_processor"] = cls.configure_pre_processor(image_size=(SIZE, SIZE))
    if cls is Aand:
        params.update(stage1_epochs=0, stage2_epochs=1)
    else:
        params.update(num_exemplars=4, epochs=1)
    params.update(kwargs)
    return cls(**params)


class NetworkUsed(ConnectionRefusedError):
    """Raised by the patched socket functions (an OSError, like a real refused connection)."""


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every socket connection / DNS lookup raises and is recorded."""
    attempts: list[str] = []

    def refuse(name: str):
        def _refuse(*args, **kwargs):
            attempts.append(f"{name}{args[:2]}")
            raise NetworkUsed(f"network disabled in this test ({name})")

        return _refuse

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    with pytest.raises(NetworkUsed):  # the patch is in force
        socket.create_connection(("huggingface.co", 443), timeout=1)
    attempts.clear()
    return attempts


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face / torch hub cache, so cached weights on the machine cannot leak into a test."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))
    return cache


def set_hub_offline(monkeypatch: pytest.MonkeyPatch, offline: bool) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", offline)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = random_backbone_state()
    return write_weights(tmp_path_factory.mktemp("weights") / "teacher.safetensors", state), state


# ---------------------------------------------------------------------------------------------- defaults / tags
def test_default_teacher_is_the_papers_torchvision_weights() -> None:
    for cls in (Aand, MemKD):
        assert inspect.signature(cls).parameters["backbone"].default == "wide_resnet50_2.tv_in1k"
        assert inspect.signature(cls).parameters["backbone_weights"].default is None
    assert kdw.resolve_weights_tag("wide_resnet50_2.tv_in1k") == "wide_resnet50_2.tv_in1k"
    # the bare name resolves to other weights (timm's default tag), which is why the tag is explicit
    assert kdw.resolve_weights_tag("wide_resnet50_2") == "wide_resnet50_2.racm_in1k"
    assert timm.models.get_pretrained_cfg("wide_resnet50_2.tv_in1k").url.startswith("https://download.pytorch.org")


# ---------------------------------------------------------------------------------------------- loading files
@pytest.mark.parametrize(
    ("cls", "fmt"),
    [(Aand, "safetensors"), (Aand, "pth"), (MemKD, "safetensors"), (MemKD, "pth"), (MemKD, "pth-wrapped")],
)
def test_weights_file_loads_bit_for_bit(cls: type, fmt: str, tmp_path: Path, no_network: list[str]) -> None:
    state = random_backbone_state(seed=7)
    path = write_weights(tmp_path / f"teacher.{'safetensors' if fmt == 'safetensors' else 'pth'}", state, fmt)
    model = small_model(cls, pre_trained=True, backbone_weights=str(path))
    assert_teacher_equals(model.model.encoder, state)
    provenance = model.model.teacher_provenance
    assert provenance["weights_source"] == "file"
    assert provenance["weights_file"] == path.name
    assert provenance["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert provenance["weights_sha256_of"] == "file"
    assert provenance["teacher_sha256"] == kdw.state_dict_sha256(model.model.encoder.feature_extractor.state_dict())
    # a model built without the file has a different teacher, so the equality above is not a coincidence
    other = small_model(cls).model.encoder.feature_extractor.state_dict()
    assert not torch.equal(other["conv1.weight"], state["conv1.weight"])
    assert not torch.equal(other["layer3.1.bn2.running_var"], state["layer3.1.bn2.running_var"])
    assert no_network == []


def test_torchvision_checkpoint_is_accepted(tmp_path: Path) -> None:
    """torchvision's ResNet state dicts (e.g. the original wide_resnet50_2-95faca4d.pth) have timm's names."""
    import torchvision

    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = write_weights(tmp_path / "resnet18-torchvision.pth", state, "pth")
    model = MemKDModel("resnet18", input_size=(SIZE, SIZE), pre_trained=True, backbone_weights=str(path))
    assert_teacher_equals(model.encoder, state)
    assert model.teacher_provenance["weights_tag"] == path.name  # no tag recorded in a plain .pth


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    state = random_backbone_state()
    del state["layer2.0.downsample.1.running_var"]
    path = write_weights(tmp_path / "missing.safetensors", state)
    with pytest.raises(ValueError, match=r"'layer2\.0\.downsample\.1\.running_var' \(shape \(128,\)\) is missing"):
        small_model(Aand, pre_trained=True, backbone_weights=str(path))


def test_missing_first_tensor_is_named(tmp_path: Path) -> None:
    state = random_backbone_state()
    del state["conv1.weight"]  # "layer1.0.conv1.weight" still ends in it: must not be taken for a prefix
    path = write_weights(tmp_path / "no_stem.safetensors", state)
    with pytest.raises(ValueError, match=r"tensor 'conv1\.weight' \(shape \(64, 3, 7, 7\)\) is missing"):
        kdw.build_teacher("resnet18", ["layer1", "layer2", "layer3"], backbone_weights=path)


def test_wrong_shape_is_named_with_both_shapes(tmp_path: Path) -> None:
    state = random_backbone_state()
    state["layer3.1.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    path = write_weights(tmp_path / "shape.pth", state, "pth")
    with pytest.raises(ValueError, match=r"'layer3\.1\.conv2\.weight' has shape \(256, 256, 1, 1\) in the file, "
                       r"the teacher expects \(256, 256, 3, 3\)"):
        small_model(MemKD, pre_trained=True, backbone_weights=str(path))


def test_first_problem_in_module_order_is_reported(tmp_path: Path) -> None:
    state = random_backbone_state()
    del state["layer3.0.conv1.weight"]
    state["layer1.1.bn1.weight"] = torch.ones(3)
    path = write_weights(tmp_path / "two_problems.safetensors", state)
    with pytest.raises(ValueError, match=r"'layer1\.1\.bn1\.weight' has shape \(3,\)"):
        kdw.build_teacher("resnet18", ["layer1", "layer2", "layer3"], backbone_weights=path)


def test_file_of_another_architecture_is_refused(weights_file) -> None:
    path, _ = weights_file
    # resnet34 has three blocks in layer1: the first tensor resnet18 lacks is named
    with pytest.raises(ValueError, match=r"'layer1\.2\.conv1\.weight' \(shape \(64, 64, 3, 3\)\) is missing"):
        kdw.build_teacher("resnet34", ["layer1", "layer2", "layer3"], backbone_weights=path)
    # wide_resnet50_2 (default teacher): same names, other shapes
    with pytest.raises(ValueError, match=r"'conv1\.weight'|'layer1\.0\.conv1\.weight'|'layer1\.0\.conv3\.weight'"):
        kdw.build_teacher("wide_resnet50_2.tv_in1k", ["layer1", "layer2", "layer3"], backbone_weights=path)


def test_ambiguous_prefix_is_refused(tmp_path: Path) -> None:
    state = random_backbone_state()
    both = {f"{prefix}.{name}": tensor.clone() for prefix in ("student", "teacher") for name, tensor in state.items()}
    path = write_weights(tmp_path / "two_copies.safetensors", both)
    with pytest.raises(ValueError, match=r"ambiguous.*'student\.', 'teacher\.'"):
        kdw.build_teacher("resnet18", ["layer1", "layer2", "layer3"], backbone_weights=path)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_training_checkpoint_is_unwrapped_by_timms_loader(wrapper: str, tmp_path: Path) -> None:
    """timm's load_state_dict: the checkpoint's weights under 'state_dict' / 'model' (not its EMA copy), with the
    DDP 'module.' prefix stripped; other entries (epoch, optimizer) are ignored."""
    state = random_backbone_state(seed=17)
    ema = {name: torch.zeros_like(tensor) for name, tensor in state.items()}
    wrapped = {f"module.{name}": tensor for name, tensor in state.items()}
    path = tmp_path / "train.pth"
    torch.save({"epoch": 2, wrapper: wrapped, "state_dict_ema": ema}, path)
    extractor, provenance = kdw.build_teacher("resnet18", ["layer1", "layer2", "layer3"], backbone_weights=path)
    assert_teacher_equals(extractor, state)
    assert provenance["weights_tag"] == "train.pth"


class NotAllowedInWeightsOnly:
    """A pickled object that torch.load(weights_only=True) refuses."""


@pytest.mark.parametrize("content", ["pickle", "garbage"])
def test_unreadable_pth_is_refused_with_weights_only(content: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.pth"
    if content == "pickle":
        torch.save({"conv1.weight": torch.zeros(1), "config": NotAllowedInWeightsOnly()}, path)
    else:
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"could not be read as a PyTorch state dict with torch\.load\(weights_only="):
        kdw.build_teacher("resnet18", ["layer1"], backbone_weights=path)


def test_features_only_names_are_matched_to_the_classification_file(tmp_path: Path) -> None:
    """timm's features_only ConvNeXt calls its stem 'stem_0' / 'stages_1' where the classification file has 'stem.0'."""
    torch.manual_seed(21)
    state = timm.create_model("convnext_atto", pretrained=False).state_dict()
    path = write_weights(tmp_path / "convnext.safetensors", state)
    extractor, _ = kdw.build_teacher("convnext_atto", ["stages.1", "stages.2"], backbone_weights=path)
    teacher = extractor.feature_extractor.state_dict()
    assert "stem_0.weight" in teacher and "stem.0.weight" not in teacher
    for name, tensor in teacher.items():
        assert torch.equal(tensor, state[name if name in state else name.replace("_", ".", 1)]), name


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*anomalib-kd-weights export"):
        small_model(Aand, pre_trained=True, backbone_weights=str(tmp_path / "nowhere.safetensors"))


# ---------------------------------------------------------------------------------------------- network
def test_no_network_access_when_a_file_is_given(
    weights_file, no_network: list[str], empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pre_trained=True + backbone_weights, with the hub *online*: neither timm's loader nor a socket is used."""
    set_hub_offline(monkeypatch, offline=False)
    asked: list[str] = []

    def no_pretrained_loading(*args, **kwargs):
        asked.append("timm.load_pretrained")
        raise AssertionError("timm was asked for pretrained weights")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_pretrained_loading)
    path, state = weights_file
    for cls in (Aand, MemKD):
        model = small_model(cls, pre_trained=True, backbone_weights=str(path))
        assert_teacher_equals(model.model.encoder, state)
    assert asked == []
    assert no_network == []
    assert list(empty_hub_cache.iterdir()) == []


@pytest.mark.parametrize("cls", [Aand, MemKD])
def test_offline_without_weights_fails_fast_with_the_two_ways_out(
    cls: type, no_network: list[str], empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_hub_offline(monkeypatch, offline=True)
    with pytest.raises(RuntimeError) as raised:
        small_model(cls, pre_trained=True)
    message = str(raised.value)
    assert "Could not load the pretrained teacher weights 'resnet18.a1_in1k'" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "backbone_weights=" in message and "--model.backbone_weights" in message
    assert "anomalib-kd-weights export --backbone resnet18" in message
    assert "pre_trained=False" in message and "--model.pre_trained false" in message
    assert isinstance(raised.value.__cause__, OSError)  # the hub's own error, chained
    assert no_network == []  # offline mode: no connection attempt, hence no retries


@pytest.mark.parametrize("cls", [Aand, MemKD])
def test_no_network_without_hf_hub_offline_fails_after_one_probe(
    cls: type, no_network: list[str], empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: huggingface_hub retried its connection (20 s to 131 s) before the error. Now: one short HTTP probe of
    the hub, then the cache only, then the error with the two ways out."""
    set_hub_offline(monkeypatch, offline=False)
    with pytest.raises(RuntimeError) as raised:
        small_model(cls, pre_trained=True)
    message = str(raised.value)
    assert "did not answer within the ANOMALIB_KD_HUB_TIMEOUT probe" in message
    assert "backbone_weights=" in message and "pre_trained=False" in message
    assert len(no_network) == 1, no_network  # the probe; huggingface_hub itself never connected (no retries)
    import huggingface_hub.constants as hf_constants

    assert hf_constants.HF_HUB_OFFLINE is False and os.environ["HF_HUB_OFFLINE"] == "0"  # offline mode was scoped


def test_unrelated_errors_are_not_disguised_as_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    set_hub_offline(monkeypatch, offline=True)
    with pytest.raises(RuntimeError, match="Unknown model") as raised:
        kdw.build_teacher("no_such_net", ["layer1"], pre_trained=True)
    assert "backbone_weights" not in str(raised.value)


def test_hf_cache_works_offline(no_network: list[str], empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 with the tag's weights in the local Hugging Face cache: loaded from there."""
    set_hub_offline(monkeypatch, offline=True)
    state = random_backbone_state(seed=11)
    snapshot = empty_hub_cache / "models--timm--resnet18.a1_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    save_file(state, str(snapshot / "model.safetensors"))

    model = MemKDModel("resnet18", input_size=(SIZE, SIZE), pre_trained=True)
    assert_teacher_equals(model.encoder, state)
    provenance = model.teacher_provenance
    assert provenance["weights_source"] == "timm"
    assert provenance["weights_tag"] == "resnet18.a1_in1k"
    assert provenance["weights_sha256_of"] == "state_dict"
    assert provenance["weights_sha256"] == provenance["teacher_sha256"]
    assert no_network == []


def cache_hub_weights(cache: Path, state: dict[str, torch.Tensor], filename: str = "model.safetensors") -> Path:
    """resnet18.a1_in1k's weights in a Hugging Face cache, laid out as huggingface_hub writes it."""
    repo = cache / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    path = repo / "snapshots" / ("0" * 40) / filename
    path.parent.mkdir(parents=True)
    save_file(state, str(path)) if filename.endswith(".safetensors") else torch.save(state, path)
    return path


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_cached_weights_load_online_without_probe_or_network(
    filename: str, no_network: list[str], empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_HUB_OFFLINE unset, the weights in the cache: huggingface_hub's try_to_load_from_cache finds them, and the
    teacher loads from there with neither the probe nor any connection (timm's hub loader runs cache-only)."""
    import huggingface_hub.constants as hf_constants

    set_hub_offline(monkeypatch, offline=False)
    probes: list[object] = []

    def probe(*args, **kwargs) -> bool:
        probes.append(kwargs)
        raise AssertionError("the hub was probed although the weights are cached")

    monkeypatch.setattr(kdw, "hub_reachable", probe)
    assert kdw.cached_weights("resnet18.a1_in1k") is None
    state = random_backbone_state(seed=13)
    path = cache_hub_weights(empty_hub_cache, state, filename)
    assert kdw.cached_weights("resnet18.a1_in1k") == str(path)
    assert kdw.cached_weights("resnet18.tv_in1k") is None  # another tag, another repository

    model = MemKDModel("resnet18", input_size=(SIZE, SIZE), pre_trained=True)
    assert_teacher_equals(model.encoder, state)
    assert model.teacher_provenance["weights_source"] == "timm"
    assert model.teacher_provenance["weights_tag"] == "resnet18.a1_in1k"
    assert probes == [] and no_network == []
    assert hf_constants.HF_HUB_OFFLINE is False  # the cache-only mode was scoped


def test_uncached_weights_probe_the_tags_repository(
    no_network: list[str], empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not in the cache: the probe asks for the repository timm would download from, then only the cache is tried."""
    set_hub_offline(monkeypatch, offline=False)
    probes: list[str] = []
    monkeypatch.setattr(kdw, "hub_reachable", lambda timeout=None, repo_id="": probes.append(repo_id) or False)
    with pytest.raises(RuntimeError, match="did not answer within the ANOMALIB_KD_HUB_TIMEOUT probe"):
        kdw.build_teacher("resnet18.tv_in1k", ["layer1"], pre_trained=True)
    assert probes == ["timm/resnet18.tv_in1k"]
    assert no_network == []


def test_hub_probe_is_bounded_and_needs_an_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """hub_reachable: one HEAD through huggingface_hub's session, in a daemon thread, so a hang ends at the timeout."""
    import threading
    import time
    from types import SimpleNamespace

    import huggingface_hub.constants as hf_constants

    def session(head):
        monkeypatch.setattr(kdw, "get_session", lambda: SimpleNamespace(head=head))

    release = threading.Event()
    session(lambda url, timeout: release.wait(60))
    start = time.monotonic()
    assert kdw.hub_reachable(timeout=0.2) is False
    assert time.monotonic() - start < 5
    release.set()

    def refused(url: str, timeout: float) -> None:
        raise NetworkUsed("refused")

    session(refused)
    assert kdw.hub_reachable(timeout=1) is False
    session(lambda url, timeout: SimpleNamespace(status_code=502))  # a proxy's error page is not the hub
    assert kdw.hub_reachable(timeout=1) is False
    asked: list[tuple[str, float]] = []
    session(lambda url, timeout: asked.append((url, timeout)) or SimpleNamespace(status_code=200))
    monkeypatch.setattr(hf_constants, "ENDPOINT", "https://hub.example/")
    monkeypatch.setenv("ANOMALIB_KD_HUB_TIMEOUT", "2.5")
    assert kdw.hub_reachable(repo_id="timm/resnet18.tv_in1k") is True
    assert asked == [("https://hub.example/api/models/timm/resnet18.tv_in1k", 2.5)]


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("cls", [Aand, MemKD])
def test_checkpoint_reloads_without_weights_file_or_network(
    cls: type,
    dataset_root: Path,
    tmp_path: Path,
    empty_hub_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from anomalib.engine import Engine

    state = random_backbone_state(seed=5)
    path = write_weights(tmp_path / "teacher.safetensors", state)
    model = small_model(cls, pre_trained=True, backbone_weights=str(path))
    engine = Engine(accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
                    enable_progress_bar=False, max_steps=1)  # fmt: skip
    engine.fit(model, datamodule=mvtec_datamodule(dataset_root))
    ckpt = tmp_path / "model.ckpt"
    engine.trainer.save_checkpoint(ckpt)
    recorded = model.teacher_provenance
    assert recorded["weights_source"] == "file"
    assert recorded["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    path.unlink()  # the file stayed on the training machine

    set_hub_offline(monkeypatch, offline=True)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("network used"))
    reloaded = cls.load_from_checkpoint(ckpt)  # hparams: pre_trained=True, backbone_weights=<gone>
    assert reloaded.hparams["backbone_weights"] == str(path)
    assert_teacher_equals(reloaded.model.encoder, state)
    assert reloaded.model.teacher_provenance == recorded
    assert reloaded.teacher_provenance["teacher_sha256"] == recorded["teacher_sha256"]
    # outside load_from_checkpoint the missing file is still an error (no silent random teacher)
    with pytest.raises(FileNotFoundError):
        small_model(cls, pre_trained=True, backbone_weights=str(path))


# ---------------------------------------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def file_built_aand(weights_file) -> Aand:
    path, _ = weights_file
    return small_model(Aand, pre_trained=True, backbone_weights=str(path)).eval()


def expected_metadata(model) -> dict[str, str]:
    record = {"model": type(model).__name__, **model.teacher_provenance}
    return {f"anomalib_kd.{key}": value for key, value in record.items()}


def test_torch_and_onnx_exports_carry_provenance(file_built_aand: Aand, weights_file, tmp_path: Path) -> None:
    path, _ = weights_file
    expected = expected_metadata(file_built_aand)
    assert expected["anomalib_kd.weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert expected["anomalib_kd.weights_file"] == "teacher.safetensors"

    pt_path = file_built_aand.to_torch(tmp_path)
    assert read_torch_metadata(pt_path) == expected
    assert isinstance(torch.load(pt_path, weights_only=False)["model"], Aand)  # what TorchInferencer reads

    onnx_path = file_built_aand.to_onnx(tmp_path, input_size=(SIZE, SIZE))
    assert read_onnx_metadata(onnx_path) == expected


def test_openvino_export_carries_provenance_and_keeps_fp16(file_built_aand: Aand, tmp_path: Path) -> None:
    ov = pytest.importorskip("openvino")
    from anomalib.deploy import CompressionType
    from anomalib.models.components.base.export_mixin import ExportMixin

    xml_path = file_built_aand.to_openvino(tmp_path / "ours", input_size=(SIZE, SIZE),
                                           compression_type=CompressionType.FP16)  # fmt: skip
    assert read_openvino_metadata(xml_path) == expected_metadata(file_built_aand)
    assert ov.Core().read_model(xml_path).get_rt_info(["anomalib_kd", "weights_source"]).astype(str) == "file"
    # adding the metadata leaves the weights exactly as anomalib's own FP16 export writes them
    plain = ExportMixin.to_openvino(file_built_aand, tmp_path / "plain", input_size=(SIZE, SIZE),
                                    compression_type=CompressionType.FP16)  # fmt: skip
    assert xml_path.with_suffix(".bin").read_bytes() == plain.with_suffix(".bin").read_bytes()

    def constant_types(path: Path) -> list[str]:
        return sorted(str(op.get_output_element_type(0)) for op in ov.Core().read_model(path).get_ops()
                      if op.get_type_name() == "Constant")  # fmt: skip

    assert constant_types(xml_path) == constant_types(plain)
    assert constant_types(xml_path).count("<Type: 'float16'>") > 20  # the weights are FP16


def test_memkd_torch_export_carries_provenance(weights_file, tmp_path: Path) -> None:
    path, _ = weights_file
    model = small_model(MemKD, pre_trained=True, backbone_weights=str(path))
    metadata = read_torch_metadata(model.to_torch(tmp_path))
    assert metadata["anomalib_kd.model"] == "MemKD"
    assert metadata["anomalib_kd.weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- console script / CLI
def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip


def test_weights_command_round_trip(tmp_path: Path) -> None:
    """`anomalib-kd-weights export` (random resnet18, no download), then both models load it bit for bit."""
    script = Path(sys.executable).with_name("anomalib-kd-weights")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "anomalib_kd_tools.weights"]
    output = tmp_path / "r18.safetensors"
    result = _run([*command, "export", "--backbone", "resnet18", "--no-pretrained", "--output", str(output)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    digest = hashlib.sha256(output.read_bytes()).hexdigest()
    assert f"{digest}  r18.safetensors" in result.stdout
    state = load_file(str(output))
    assert "fc.weight" in state and "layer4.1.conv2.weight" in state  # the full classification model
    for cls in (Aand, MemKD):
        model = small_model(cls, pre_trained=True, backbone_weights=str(output))
        assert_teacher_equals(model.model.encoder, state)
        assert model.model.teacher_provenance["weights_tag"] == "random-init"  # read from the file's header

    assert weights_cli.main(["verify", str(output), "--backbone", "resnet18"]) == 0
    assert weights_cli.main(["verify", str(output), "--backbone", "resnet34"]) == 1


def test_stock_cli_trains_from_a_weights_file_offline(dataset_root: Path, weights_file, tmp_path: Path) -> None:
    """`anomalib train --model MemKD --model.backbone_weights FILE` with pre_trained=true, hub offline, empty cache."""
    path, _ = weights_file
    anomalib_cli = Path(sys.executable).with_name("anomalib")
    command = [str(anomalib_cli)] if anomalib_cli.exists() else [sys.executable, "-m", "anomalib.cli.cli"]
    command += [
        "train",
        "--model", "MemKD",
        "--model.backbone", "resnet18",
        "--model.pre_trained", "true",
        "--model.backbone_weights", str(path),
        "--model.memory_size", "4",
        "--model.num_exemplars", "4",
        "--model.epochs", "1",
        "--model.pre_processor.class_path", "anomalib.pre_processing.PreProcessor",
        "--model.pre_processor.init_args.transform.class_path", "torchvision.transforms.v2.Resize",
        "--model.pre_processor.init_args.transform.init_args.size", f"[{SIZE},{SIZE}]",
        "--data", "anomalib.data.MVTecAD",
        "--data.root", str(dataset_root),
        "--data.category", CATEGORY,
        "--data.train_batch_size", "4",
        "--data.eval_batch_size", "4",
        "--data.num_workers", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--default_root_dir", str(tmp_path / "results"),
    ]  # fmt: skip
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_home"), "TORCH_HOME": str(tmp_path / "th")}
    result = _run(command, tmp_path, env)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    checkpoints = list((tmp_path / "results").rglob("*.ckpt"))
    assert checkpoints, "no checkpoint written"
    checkpoint = torch.load(checkpoints[0], map_location="cpu", weights_only=False)
    record = checkpoint["anomalib_kd_teacher"]
    assert record["weights_source"] == "file"
    assert record["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert checkpoint["hyper_parameters"]["backbone_weights"] == str(path)
    assert json.dumps(record)  # plain strings only (safe for weights_only loading)
