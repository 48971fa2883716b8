"""AAND's paper recipe and wiring: each test fails if the piece it names is wired wrongly.

Recipe (defaults, DTD command, foreground presets, fit-start warnings, argument validation, help texts) and
wiring (predicted gate at inference / as stage-2 target, ground-truth gate in stage 1, gradient paths of L_A
and the focal loss, Eq. 14 by hand, no autograd into the RAA from the stage-2 target, initialisation).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import math
import tomllib
from pathlib import Path

import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.pre_processing import PreProcessor
from torch.nn import functional as F  # noqa: N812
from torchvision.transforms.v2 import Resize
from torchvision.transforms.v2 import functional as TF  # noqa: N812

from anomalib_aand import Aand, AandModel
from anomalib_aand import lightning_model as aand_module
from anomalib_kd_tools.mechanisms import aand_mechanism_report
from anomalib_aand.components import FOREGROUND_PRESETS, foreground_mask, foreground_preset
from anomalib_aand.components import synthesis
from anomalib_kd_tools import dtd
from anomalib_kd_tools.synthetic import make_texture_folder

REPO = Path(__file__).resolve().parents[2]


def tiny(**kwargs) -> Aand:
    params = {
        "backbone": "resnet18",
        "pre_trained": False,
        "memory_size": 4,
        "stage1_epochs": 1,
        "stage2_epochs": 1,
        "anomaly_source_path": None,
        "pre_processor": Aand.configure_pre_processor(image_size=(64, 64)),
    }
    params.update(kwargs)
    return Aand(**params)


@pytest.fixture(scope="module")
def model() -> Aand:
    torch.manual_seed(0)
    return tiny()


def block_mask(batch: int = 2, size: int = 64) -> torch.Tensor:
    """A synthetic-anomaly mask with anomalous patches at every level (a 32x32 block, and a 16x16 one)."""
    mask = torch.zeros(batch, 1, size, size)
    mask[0, :, :32, :32] = 1
    mask[1:, :, 32:48, 16:32] = 1
    return mask


def fixed_synthesis(model: Aand, mask: torch.Tensor, monkeypatch) -> None:
    """Replace the random synthesis by a known mask (the perturbation: brighten the masked pixels)."""

    def synthesise(images: torch.Tensor):
        return (images + 0.5 * mask).clamp(0, 1), mask, torch.ones_like(mask)

    monkeypatch.setattr(model.synthesizer, "forward", synthesise)


# ================================================================== paper defaults
def test_every_paper_hyper_parameter_is_the_default() -> None:
    defaults = {name: p.default for name, p in inspect.signature(Aand.__init__).parameters.items()}
    assert defaults["margin"] == 0.3  # alpha, Eq. 8
    assert defaults["memory_size"] == 50  # L
    assert defaults["hard_samples"] == 10  # K_h, Eq. 11
    assert defaults["gate_temperature"] == 0.2  # tau
    assert defaults["lr"] == 0.005
    assert tuple(defaults["betas"]) == (0.5, 0.999)
    assert (defaults["stage1_epochs"], defaults["stage2_epochs"]) == (100, 120)
    assert tuple(defaults["lr_milestones"]) == (0.8, 0.9) and defaults["lr_gamma"] == 0.2
    assert tuple(defaults["layers"]) == ("layer1", "layer2", "layer3")  # K = 3
    assert defaults["backbone"] == "wide_resnet50_2.tv_in1k"  # torchvision ImageNet-V1 WRN50-2
    assert defaults["pre_trained"] is True
    assert (defaults["focal_alpha"], defaults["focal_gamma"], defaults["label_threshold"]) == (0.8, 2.0, 0.3)
    assert defaults["amplification_weight"] == 1.0  # Eq. 9 as written
    assert defaults["foreground"] == "auto"
    assert defaults["anomaly_source_path"] == "./datasets/dtd/images"
    assert aand_module.PAPER_BATCH_SIZE == 16 and aand_module.PAPER_LR == defaults["lr"]
    # 256 px, no centre crop, ImageNet normalisation
    transforms = Aand.configure_pre_processor().transform.transforms
    resize = [t for t in transforms if isinstance(t, Resize)]
    assert len(resize) == 1 and list(resize[0].size) == [256, 256]
    assert [type(t).__name__ for t in transforms] == ["Resize", "Normalize"]
    # Eq. 14: sum over levels (ADD), Gaussian sigma = 4
    model_defaults = {name: p.default for name, p in inspect.signature(AandModel.__init__).parameters.items()}
    assert model_defaults["sigma"] == 4
    assert model_defaults["input_size"] == (256, 256)
    # the README's examples train at the paper's batch size
    readme = (REPO / "README.md").read_text()
    assert "--data.train_batch_size 16" in readme and "train_batch_size=16" in readme


def test_default_pre_processor_resizes_bicubically_like_the_reference() -> None:
    """256 px bicubic (the reference's training and test resize), not anomalib's bilinear default."""
    from torchvision.transforms.v2 import InterpolationMode, Resize
    from torchvision.transforms.v2 import functional as TF  # noqa: N812

    resize = next(t for t in Aand.configure_pre_processor().transform.transforms if isinstance(t, Resize))
    assert resize.size == [256, 256] and resize.interpolation == InterpolationMode.BICUBIC and resize.antialias
    image = torch.rand(1, 3, 100, 100)
    out = tiny().pre_processor.transform(image)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    bicubic = (TF.resize(image, [64, 64], interpolation=InterpolationMode.BICUBIC, antialias=True) - mean) / std
    bilinear = (TF.resize(image, [64, 64], antialias=True) - mean) / std
    torch.testing.assert_close(out, bicubic)
    assert (out - bilinear).abs().max() > 1e-2


def test_tests_run_outside_the_repository() -> None:
    """conftest's autouse fixture: relative defaults (./datasets/dtd/images) never see the developer's repo root."""
    assert REPO not in (Path.cwd(), *Path.cwd().parents)
    assert not list(Path.cwd().iterdir())
    assert aand_module.texture_folder_problem(aand_module.DTD_IMAGES) is not None  # no DTD here


def test_configs_state_the_paper_recipe() -> None:
    import yaml

    config = yaml.safe_load((REPO / "configs" / "aand.yaml").read_text())
    init = config["model"]["init_args"]
    assert init["anomaly_source_path"] == "./datasets/dtd/images"
    assert init["foreground"] == "auto"
    assert config["data"]["init_args"]["train_batch_size"] == 16
    for name in ("mvtec.yaml", "visa.yaml"):
        grid = yaml.safe_load((REPO / "configs" / "benchmark" / name).read_text())
        assert grid["benchmark"]["data"]["init_args"]["train_batch_size"] == 16
        # the grid's Aand runs its defaults (DTD at ./datasets/dtd/images, foreground="auto"): nothing overrides them
        (entry,) = [e for e in grid["benchmark"]["model"]["grid"] if e["class_path"].split(".")[-1] == "Aand"]
        overridden = {"anomaly_source_path", "foreground", "foreground_threshold"} & set(entry.get("init_args") or {})
        assert not overridden, f"{name} overrides Aand's recipe defaults {overridden}"


# ================================================================== argument validation and --help
@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.0},
        {"lr": -1e-3},
        {"betas": (0.5,)},
        {"betas": (1.0, 0.999)},
        {"betas": (0.5, -0.1)},
        {"lr_milestones": (0.8, 1.0)},
        {"lr_milestones": (0.0, 0.9)},
        {"foreground": "edges"},
    ],
)
def test_invalid_optimiser_and_foreground_arguments_fail_at_construction(kwargs) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        tiny(**kwargs)


def _arguments_without_help(cls: type) -> list[str]:
    """Constructor arguments of ``cls`` that the jsonargparse parser (the anomalib CLI) gives no help text.

    jsonargparse fills an undocumented argument's help with the placeholder ``"_EMPTY_HELP_"``, so that counts as
    missing, like ``None`` and ``""``.
    """
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(cls, "model")
    helps = {action.dest: action.help for action in parser._actions}  # noqa: SLF001
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)  # **components: the base's, tested there
    parameters = inspect.signature(cls.__init__).parameters
    names = [name for name, p in parameters.items() if name != "self" and p.kind not in variadic]
    return [name for name in names if helps.get(f"model.{name}") in {None, "", "_EMPTY_HELP_"}]


def test_every_constructor_argument_has_help_text() -> None:
    """jsonargparse (the anomalib CLI) reads the docstring's Args: one entry per argument."""

    class Toy:
        def __init__(self, documented: int = 1, undocumented: int = 2) -> None:
            """Toy.

            Args:
                documented: has its entry.
            """

    assert _arguments_without_help(Toy) == ["undocumented"]  # the check sees a missing entry
    from anomalib_memkd import MemKD

    for cls in (Aand, MemKD):
        missing = _arguments_without_help(cls)
        assert not missing, f"{cls.__name__}: no --help text for {missing}"


# ================================================================== texture source (DTD)
def _fake_download(calls: list, layout_root: str = "dtd"):
    def download_and_extract(root: Path, info) -> None:
        calls.append((Path(root), info))
        for name in ("banded", "zigzagged"):
            folder = Path(root) / layout_root / "images" / name
            folder.mkdir(parents=True)
            (folder / f"{name}_0001.jpg").write_bytes(b"\xff\xd8 fake jpeg")
        (Path(root) / layout_root / "labels").mkdir()

    return download_and_extract


def test_dtd_command_downloads_with_anomalib_helpers_into_root_images(tmp_path, monkeypatch, capsys) -> None:
    from anomalib.models.image.draem.lightning_model import DTD_DOWNLOAD_INFO as ANOMALIB_DTD

    calls: list = []
    monkeypatch.setattr(dtd, "download_and_extract", _fake_download(calls))
    root = tmp_path / "datasets" / "dtd"
    images = dtd.main(["--root", str(root)])
    assert len(calls) == 1
    target, info = calls[0]
    assert target == root
    assert (info.url, info.hashsum) == (ANOMALIB_DTD.url, ANOMALIB_DTD.hashsum)  # anomalib's archive and hash
    assert images == root / "images"
    assert sorted(p.name for p in images.iterdir()) == ["banded", "zigzagged"]
    assert not (root / "dtd").exists() and (root / "labels").is_dir()  # the archive's dtd/ folder is flattened
    assert str(images) in capsys.readouterr().out
    # already there: no second download
    monkeypatch.setattr(dtd, "download_and_extract", lambda *a: pytest.fail("downloaded again"))
    assert dtd.download_dtd(root) == images


def test_dtd_command_is_a_package_script() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["anomalib-kd-dtd"] == "anomalib_kd_tools.dtd:main"


def test_texture_source_resolution(tmp_path) -> None:
    """Default DTD folder absent -> fallback + warning text; None -> warning; a given bad folder -> error at fit."""
    with contextlib.chdir(tmp_path):
        default = tiny(anomaly_source_path=aand_module.DTD_IMAGES)
        assert default.synthesizer.generator.anomaly_source_paths == []
        assert "anomalib-kd-dtd --root ./datasets/dtd" in default.check_texture_source()
        assert "anomaly_source_path=None" in tiny().check_texture_source()
        assert tiny(stage1_epochs=0).check_texture_source() is None  # no stage 1, no synthesis
        missing = tiny(anomaly_source_path=str(tmp_path / "nowhere"))  # constructs (a checkpoint must load) ...
        with pytest.raises(ValueError, match="not a directory"):
            missing.check_texture_source()  # ... but a fit stops before training
        textures = make_texture_folder(tmp_path / "datasets" / "dtd" / "images", n_classes=2, n_per_class=2, size=32)
        assert Path(textures) == tmp_path / "datasets" / "dtd" / "images"
        found = tiny(anomaly_source_path=aand_module.DTD_IMAGES)  # the default folder now exists: used
        assert found.check_texture_source() is None
        assert len(found.synthesizer.generator.anomaly_source_paths) == 4
        # the default is recognised by path, not by spelling: an absent absolute form warns, it is no error
        (tmp_path / "datasets").rename(tmp_path / "moved")
        spelled = tiny(anomaly_source_path=str(tmp_path / "datasets" / "dtd" / "images"))
        assert "when the model was built" in spelled.check_texture_source()


def test_texture_folder_with_upper_case_suffixes_is_an_error_at_fit_start(tmp_path) -> None:
    """anomalib's generator globs lower-case suffixes: *.JPG files pass the folder check but give no texture."""
    folder = make_texture_folder(tmp_path / "textures", n_classes=1, n_per_class=2, size=32)
    for image in Path(folder).rglob("*.jpg"):
        image.rename(image.with_suffix(".JPG"))
    model = tiny(anomaly_source_path=str(folder))
    assert model.synthesizer.generator.anomaly_source_paths == []
    with pytest.raises(ValueError, match=r"(?s)textures.*lower-case suffixes"):
        model.check_texture_source()


# ================================================================== foreground presets
MVTEC = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
         "toothbrush", "transistor", "wood", "zipper")  # fmt: skip
VISA = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
        "pcb4", "pipe_fryum")  # fmt: skip


#: every preset of the public reference implementation (grayscale, Gaussian blur sigma 8, binary threshold)
REFERENCE_PRESETS = {
    **dict.fromkeys(("carpet", "grid", "leather", "tile", "wood", "transistor"), ("none", None)),
    **dict.fromkeys(("capsule", "screw", "zipper"), ("dark", 150 / 255)),
    **dict.fromkeys(("hazelnut", "metal_nut", "pill", "toothbrush"), ("bright", 50 / 255)),
    **dict.fromkeys(("bottle", "cable"), ("disk", None)),
    **dict.fromkeys(("candle", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1"), ("bright", 150 / 255)),
    **dict.fromkeys(("pcb2", "pcb3", "pipe_fryum"), ("bright", 100 / 255)),
    "pcb4": ("bright", 50 / 255),
    "capsules": ("dark", 100 / 255),
}


def test_foreground_presets_cover_mvtec_and_visa_with_the_reference_values() -> None:
    assert set(REFERENCE_PRESETS) == set(MVTEC) | set(VISA)
    for name, (strategy, threshold) in REFERENCE_PRESETS.items():
        assert foreground_preset(name) == (strategy, threshold, True), name
    assert foreground_preset("Screw ") == ("dark", 150 / 255, True)  # case / whitespace of the datamodule's name
    assert foreground_preset("my_part") == ("none", None, False)
    assert foreground_preset(None) == ("none", None, False)


def test_foreground_masks_disk_inverted_threshold_and_blur() -> None:
    disk = foreground_mask(torch.zeros(1, 3, 100, 100), "disk")
    assert disk[0, 0, 50, 50] == 1 and disk[0, 0, 0, 0] == 0 and disk[0, 0, 50, 3] == 0 and disk[0, 0, 50, 8] == 1
    assert float(disk.mean()) == pytest.approx(math.pi * 0.45**2, abs=0.01)
    grey = torch.full((2, 3, 16, 16), 140 / 255)
    grey[1] = 160 / 255
    inverted = foreground_mask(grey, *foreground_preset("screw")[:2])
    assert inverted[0].all() and not inverted[1].any()  # "dark": foreground below 150/255
    # the grey level is blurred (the reference's sigma 8 px at 256 px) before thresholding: a bright speck is not
    # foreground, and the sigma scales with the image height
    assert synthesis.FOREGROUND_BLUR_SIGMA == 8.0 and synthesis.FOREGROUND_BLUR_REFERENCE_SIZE == 256
    speck = torch.zeros(1, 3, 32, 32)
    speck[..., 16, 16] = 1.0
    assert not foreground_mask(speck, "bright", 0.5).any()
    assert foreground_mask(speck, "bright", 0.5, blur_sigma=0.01)[0, 0, 16, 16] == 1
    # a 6 x 6 bright square at 256 px: sigma 8 blurs it below half its level (sigma 2 would keep its centre)
    square = torch.zeros(1, 3, 256, 256)
    square[..., 125:131, 125:131] = 1.0
    assert not foreground_mask(square, "bright", 0.5).any()
    assert foreground_mask(square, "bright", 0.5, blur_sigma=2.0).any()
    # the same square scaled to 64 px (1.5 px) with the scaled sigma 2: still removed
    small = torch.zeros(1, 3, 64, 64)
    small[..., 31:33, 31:33] = 1.0
    assert not foreground_mask(small, "bright", 0.5).any()


def test_auto_foreground_follows_the_datamodule_category(caplog) -> None:
    class Datamodule:
        def __init__(self, category: str, train_batch_size: int = 16) -> None:
            self.category, self.train_batch_size = category, train_batch_size

    model = tiny()
    assert model.synthesizer.foreground == "none"  # until the category is known
    caplog.set_level(logging.INFO, logger=aand_module.__name__)
    model._check_recipe(Datamodule("screw"))  # noqa: SLF001
    assert (model.synthesizer.foreground, model.synthesizer.foreground_threshold) == ("dark", 150 / 255)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("batch size" in m for m in warnings)  # 16: no batch warning
    caplog.clear()
    model._check_recipe(Datamodule("bottle", train_batch_size=4), world_size=4)  # noqa: SLF001  4 x 4 = 16
    assert model.synthesizer.foreground == "disk"
    assert not any("batch size" in r.getMessage() for r in caplog.records)
    model._check_recipe(Datamodule("bottle", train_batch_size=32))  # noqa: SLF001
    assert sum("batch size 32" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    tiny(lr=0.01)._check_recipe(Datamodule("bottle", train_batch_size=32))  # noqa: SLF001  user chose an lr
    assert not any("batch size" in r.getMessage() for r in caplog.records)
    explicit = tiny(foreground="bright", foreground_threshold=0.3)
    explicit._check_recipe(Datamodule("screw"))  # noqa: SLF001
    assert (explicit.synthesizer.foreground, explicit.synthesizer.foreground_threshold) == ("bright", 0.3)


def test_foreground_preview_example_writes_a_png(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("foreground_preview", REPO / "examples" / "foreground_preview.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--out", str(tmp_path / "fg.png"), "--size", "64", "--count", "2", "--category", "pill"])
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (128, 64)  # two 64 px tiles in a row


def test_auto_foreground_logs_a_threshold_it_cannot_use(caplog) -> None:
    model = tiny(foreground="auto", foreground_threshold=0.4)
    with caplog.at_level(logging.WARNING, logger=aand_module.__name__):
        assert model.resolve_foreground("bottle") == ("disk", None)  # bottle: centred disk, no threshold
    assert "foreground_threshold=0.4 is ignored" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=aand_module.__name__):
        assert model.resolve_foreground("capsule") == ("dark", 0.4)  # a thresholded preset takes it: no warning
    assert "ignored" not in caplog.text


# ================================================================== normalisation, no autograd into the RAA
def test_normalisation_falls_back_to_identity_without_normalize() -> None:
    plain = tiny(pre_processor=PreProcessor(transform=Resize((64, 64))))
    mean, std = plain._normalisation(torch.zeros(1))  # noqa: SLF001
    assert torch.equal(mean.flatten(), torch.zeros(1)) and torch.equal(std.flatten(), torch.ones(1))
    mean, std = tiny()._normalisation(torch.zeros(1))  # noqa: SLF001
    torch.testing.assert_close(mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(std.flatten(), torch.tensor([0.229, 0.224, 0.225]))


def test_training_forward_target_does_not_backpropagate_into_the_raa(model: Aand) -> None:
    net = model.model
    net.raa.requires_grad_(True)
    net.train()
    try:
        advanced, student = net(torch.randn(2, 3, 64, 64))
    finally:
        net.eval()
    assert all(not features.requires_grad for features in advanced)
    model.loss(advanced, student)[0].backward()
    assert all(p.grad is None for p in net.raa.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.decoder.parameters())
    model.zero_grad(set_to_none=True)


# ================================================================== wiring of Eq. 1, 6, 9 and 14
def _advanced_by_hand(net: AandModel, images: torch.Tensor, weights: list[torch.Tensor] | None = None):
    vanilla = net.teacher_features(images)
    out = []
    for k, (raa, features) in enumerate(zip(net.raa, vanilla, strict=True)):
        gate, _ = raa.gate(features)
        weight = gate if weights is None else weights[k]
        out.append(features + weight * raa.generator(features))
    return vanilla, out


@torch.no_grad()
def test_inference_uses_the_predicted_gate_and_eq14_by_hand(model: Aand) -> None:
    """Eval map = Gaussian(sigma 4) of sum_k Up(1 - cos(F_A_k, F_S_k)) with F_A = F_T + w^a * Delta (predicted gate)."""
    torch.manual_seed(1)
    net = model.model.eval()
    images = torch.randn(2, 3, 64, 64)
    vanilla, advanced = _advanced_by_hand(net, images)
    student = net.student_features(advanced)
    levels = [
        F.interpolate(
            (1 - F.cosine_similarity(a, s, dim=1)).unsqueeze(1), size=(64, 64), mode="bilinear", align_corners=True
        )
        for a, s in zip(advanced, student, strict=True)
    ]

    def smooth(summed: torch.Tensor) -> torch.Tensor:
        return TF.gaussian_blur(summed, kernel_size=[33, 33], sigma=[4.0, 4.0])  # 2 * int(4 sigma + 0.5) + 1

    out = net(images)
    expected = smooth(sum(levels))
    torch.testing.assert_close(out.anomaly_map, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.pred_score.flatten(), expected.flatten(1).amax(dim=1))
    for k in range(3):  # a dropped level would be caught: each level moves the map by far more than the tolerance
        without_k = smooth(sum(level for j, level in enumerate(levels) if j != k))
        assert (out.anomaly_map - without_k).abs().max() > 1e-2
    # ... and the features really are the advanced ones: with F_T the map is different
    vanilla_map = net.anomaly_map_generator(net.student_features(vanilla), vanilla)
    assert (out.anomaly_map - vanilla_map).abs().max() > 1e-3


def test_stage2_target_is_the_predicted_gate_advanced_teacher(model: Aand, monkeypatch) -> None:
    captured = {}
    original = model.loss.forward

    def spy(teacher, student):
        captured["teacher"] = [t.detach().clone() for t in teacher]
        return original(teacher, student)

    monkeypatch.setattr(model.loss, "forward", spy)
    torch.manual_seed(2)
    images = torch.randn(2, 3, 64, 64)
    model.stage2_losses(images)
    with torch.no_grad():
        vanilla, advanced = _advanced_by_hand(model.model, images)
    for target, expected, plain in zip(captured["teacher"], advanced, vanilla, strict=True):
        torch.testing.assert_close(target, expected)
        assert (target - plain).abs().max() > 1e-4  # not F_T


def test_stage1_gates_the_residual_with_the_ground_truth(model: Aand, monkeypatch) -> None:
    """Eq. 6: in stage 1, F_A = F_T + M_k * Delta with the pooled synthetic mask, not the predicted gate."""
    mask = block_mask()
    fixed_synthesis(model, mask, monkeypatch)
    captured = {}

    def spy(advanced, vanilla, logits, anomalous, normal):
        captured.update(advanced=[a.detach() for a in advanced], anomalous=anomalous)
        zero = advanced[0].sum() * 0
        return zero, zero, zero

    monkeypatch.setattr(model.amplification_loss, "forward", spy)
    torch.manual_seed(3)
    images = torch.randn(2, 3, 64, 64)
    model.stage1_losses(images)
    mean, std = model._normalisation(images)  # noqa: SLF001
    augmented = ((images * std + mean).clamp(0, 1) + 0.5 * mask).clamp(0, 1)
    with torch.no_grad():
        vanilla = model.model.teacher_features((augmented - mean) / std)
        labels = [model.level_labels(mask, tuple(v.shape[-2:])).float() for v in vanilla]
        _, by_gt = _advanced_by_hand(model.model, (augmented - mean) / std, labels)
        _, by_gate = _advanced_by_hand(model.model, (augmented - mean) / std)
    for k in range(3):
        assert labels[k].any() and not labels[k].all()
        assert torch.equal(captured["anomalous"][k], labels[k].bool())
        torch.testing.assert_close(captured["advanced"][k], by_gt[k])
        assert (captured["advanced"][k] - by_gate[k]).abs().max() > 1e-4  # the predicted gate would differ


def test_l_a_normal_patches_use_the_label_rule_on_the_foreground(model: Aand, monkeypatch) -> None:
    """L_A's normal set = non-anomalous patches whose pooled foreground share exceeds 0.3 (the reference's rule)."""
    mask = block_mask()
    foreground = torch.zeros_like(mask)
    foreground[:, :, :32, :32] = 1  # share 1 at every level
    foreground[:, :, :32, 32:] = (torch.arange(32) % 4 < 2).float().view(-1, 1)  # share 0.5: in by > 0.3, out by > 0.5
    foreground[:, :, 32:, :32] = (torch.arange(32) % 8 < 2).float().view(-1, 1)  # share 0.25 (levels 2, 3): out
    # (the bottom-right quadrant has no foreground at all)

    def synthesise(images: torch.Tensor):
        return (images + 0.5 * mask).clamp(0, 1), mask, foreground

    monkeypatch.setattr(model.synthesizer, "forward", synthesise)
    captured = {}

    def spy(advanced, vanilla, logits, anomalous, normal):
        captured.update(anomalous=anomalous, normal=normal)
        zero = advanced[0].sum() * 0
        return zero, zero, zero

    monkeypatch.setattr(model.amplification_loss, "forward", spy)
    model.stage1_losses(torch.randn(2, 3, 64, 64))
    for anomalous, normal in zip(captured["anomalous"], captured["normal"], strict=True):
        share = F.adaptive_avg_pool2d(foreground, tuple(normal.shape[-2:]))
        torch.testing.assert_close(normal, ~anomalous & (share > 0.3))
        assert (normal & (share <= 0.5)).any()  # the 0.5 share is normal: a "> 0.5" rule would drop it
        assert not (normal & (share < 0.3)).any()


def test_stage2_student_reads_the_advanced_teacher(model: Aand, monkeypatch) -> None:
    """Stage 2 feeds the bottleneck + decoder F_A (Sec. III-C: "Its output normal features F_A^n are then passed to
    a one-class bottleneck"), not the vanilla F_T: a swap would train the student on the wrong teacher."""
    captured = {}
    original = model.model.bottleneck.forward

    def spy(features):
        captured["input"] = [f.detach().clone() for f in features]
        return original(features)

    monkeypatch.setattr(model.model.bottleneck, "forward", spy)
    torch.manual_seed(4)
    images = torch.randn(2, 3, 64, 64)
    model.stage2_losses(images)
    with torch.no_grad():
        vanilla, advanced = _advanced_by_hand(model.model, images)
    for given, expected, plain in zip(captured["input"], advanced, vanilla, strict=True):
        torch.testing.assert_close(given, expected)
        assert (given - plain).abs().max() > 1e-4  # not F_T
    captured.clear()
    with torch.no_grad():
        model.model.eval()(images)  # and the eval path (Eq. 13) reads the same advanced features
    for given, expected in zip(captured["input"], advanced, strict=True):
        torch.testing.assert_close(given, expected)


def test_generator_learns_from_l_a_and_gate_from_focal(model: Aand, monkeypatch) -> None:
    fixed_synthesis(model, block_mask(), monkeypatch)
    model._set_trainable(1)  # noqa: SLF001
    try:
        torch.manual_seed(4)
        losses = model.stage1_losses(torch.randn(2, 3, 64, 64))
        for raa in model.model.raa:
            generator, gate = list(raa.generator.parameters()), list(raa.gate.parameters())
            from_l_a = torch.autograd.grad(losses["amplification"], generator + gate, retain_graph=True, allow_unused=True)
            assert all(g is not None and g.abs().sum() > 0 for g in from_l_a[: len(generator)])  # L_A -> generator
            assert all(g is None or g.abs().sum() == 0 for g in from_l_a[len(generator) :])  # gt gate: not the gate
            from_focal = torch.autograd.grad(losses["focal"], generator + gate, retain_graph=True, allow_unused=True)
            assert all(g is None for g in from_focal[: len(generator)])
            assert all(g is not None and g.abs().sum() > 0 for g in from_focal[len(generator) :])  # focal -> gate
        total = torch.autograd.grad(losses["loss"], [model.model.raa[0].generator.projection[0].weight])[0]
        assert total.abs().sum() > 0  # and the total loss of Eq. 9 carries L_A (weight 1)
    finally:
        model._set_trainable(2)  # noqa: SLF001


def test_focal_loss_gets_the_anomalous_labels_not_the_complement_of_the_normal_set() -> None:
    """Eq. 9's focal term is ``sum_k FL(w^a_k, anomalous_k)``; the L_A normal set (foreground only) is smaller than
    ``~anomalous``, so a focal loss fed ``~normal`` would differ."""
    from anomalib_aand.loss import AandAmplificationLoss, gate_focal_loss

    torch.manual_seed(0)
    shapes = [(2, 8, 6, 6), (2, 16, 3, 3)]
    advanced = [torch.randn(*shape) for shape in shapes]
    vanilla = [torch.randn(*shape) for shape in shapes]
    logits = [torch.randn(shape[0], 1, *shape[2:]) for shape in shapes]
    anomalous = [torch.rand(shape[0], 1, *shape[2:]) > 0.6 for shape in shapes]
    normal = [~labels & (torch.rand(labels.shape) > 0.5) for labels in anomalous]  # a foreground subset
    assert all(bool((n != ~a).any()) for n, a in zip(normal, anomalous, strict=True))
    _, focal, _ = AandAmplificationLoss()(advanced, vanilla, logits, anomalous, normal)
    expected = sum(gate_focal_loss(lg, a, 0.8, 2.0) for lg, a in zip(logits, anomalous, strict=True))
    wrong = sum(gate_focal_loss(lg, ~n, 0.8, 2.0) for lg, n in zip(logits, normal, strict=True))
    torch.testing.assert_close(focal, expected)  # summed over levels, not averaged
    assert not torch.isclose(focal, wrong)


# ================================================================== initialisation (matched to the reference)
def test_memory_items_and_mlps_use_the_reference_initialisation() -> None:
    torch.manual_seed(0)
    model = AandModel(backbone="resnet18", input_size=(64, 64), pre_trained=False, memory_size=50)
    for raa, channels in zip(model.raa, model.encoder.out_dims, strict=True):
        norms = raa.gate.memory.detach().norm(dim=1)
        assert norms.mean() == pytest.approx(math.sqrt(channels), rel=0.1)  # randn, not randn / sqrt(C)
        for mlp in (raa.gate.projection, raa.generator.projection):
            for conv in (m for m in mlp if isinstance(m, torch.nn.Conv2d)):
                # biases keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as in the reference (weights only)
                bound = 1 / math.sqrt(conv.in_channels)
                assert conv.bias.abs().max() <= bound and conv.bias.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.3)
                fan_out = conv.out_channels  # 1x1 kernels
                assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)


# ================================================================== mechanism report (benchmark interface)
@torch.no_grad()
def test_mechanism_report_by_hand(model: Aand) -> None:
    torch.manual_seed(5)
    images = torch.rand(3, 3, 64, 64)
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[1, :32, :32] = True
    masks[2, 40:56, 8:40] = True
    labels = torch.tensor([False, True, True])
    batches = [
        ImageBatch(image=images[:2], gt_mask=masks[:2], gt_label=labels[:2]),
        ImageBatch(image=images[2:], gt_mask=masks[2:], gt_label=labels[2:]),
    ]
    model.eval()
    report = aand_mechanism_report(model, batches)

    x, m = model.pre_processor.transform(images, masks)
    vanilla = model.model.teacher_features(x)
    advanced, gates, _, residuals = model.model.amplify(vanilla)
    student = model.model.student_features(advanced)
    shares = []
    for k in range(3):
        pooled = model.level_labels(m.float().unsqueeze(1), tuple(residuals[k].shape[-2:]))[:, 0]
        energy = ((gates[k] * residuals[k]) ** 2).mean(dim=1)
        expected = energy[pooled].mean() / energy[~pooled].mean()
        assert report[f"residual_ratio_l{k + 1}"] == pytest.approx(float(expected), rel=1e-4)
        assert report[f"gate_fpr_l{k + 1}"] == pytest.approx(float((gates[k][0] > 0.5).float().mean()))  # image 0
        up = F.interpolate(
            (1 - F.cosine_similarity(advanced[k], student[k])).unsqueeze(1), (64, 64), mode="bilinear", align_corners=True
        )
        shares.append(up.flatten(1).sum(dim=1))
    shares = torch.stack(shares, dim=1)
    shares = shares / shares.sum(dim=1, keepdim=True)
    for k in range(3):
        assert report[f"map_share_l{k + 1}"] == pytest.approx(float(shares[:, k].mean()), rel=1e-4)
    # a loader of normal images without masks works too (NaN where no anomalous position exists)
    normal_only = aand_mechanism_report(model, [ImageBatch(image=images[:1], gt_label=torch.tensor([False]))])
    assert math.isnan(normal_only["residual_ratio_l1"]) and 0 <= normal_only["gate_fpr_l1"] <= 1
