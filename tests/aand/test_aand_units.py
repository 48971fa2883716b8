"""AAND unit tests: one per equation / component, on hand-built tensors with known answers."""

from __future__ import annotations

import math
import socket

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_aand import Aand, AandModel
from anomalib_aand.components import (
    AnomalySynthesizer,
    AttributeScalingResidualGenerator,
    MatchingGuidedResidualGate,
    ResidualAnomalyAmplification,
    foreground_mask,
    otsu_threshold,
)
from anomalib_aand.loss import (
    AandAmplificationLoss,
    AandDistillationLoss,
    amplification_loss,
    gate_focal_loss,
    hard_kd_loss,
    pairwise_hinge_mean,
)


def tiny_aand(**kwargs) -> Aand:
    params = {
        "backbone": "resnet18",
        "pre_trained": False,
        "memory_size": 4,
        "stage1_epochs": 1,
        "stage2_epochs": 1,
        "pre_processor": Aand.configure_pre_processor(image_size=(64, 64)),
    }
    params.update(kwargs)
    return Aand(**params)


# ---------------------------------------------------------------- gate (Eq. 2-4)
def test_gate_weights_sum_to_one_and_gate_is_anomaly_share() -> None:
    torch.manual_seed(0)
    gate = MatchingGuidedResidualGate(channels=8, memory_size=3, temperature=0.2)
    features = torch.randn(2, 8, 5, 4)
    weights = gate.memory_weights(features)
    assert weights.shape == (2, 6, 5, 4)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, 5, 4))
    w_a, logits = gate(features)
    # Eq. 4: w^a = sum of the anomaly weights = 1 - sum of the normal weights
    torch.testing.assert_close(w_a[:, 0], weights[:, 3:].sum(dim=1))
    torch.testing.assert_close(w_a[:, 0], 1 - weights[:, :3].sum(dim=1))
    torch.testing.assert_close(torch.sigmoid(logits), w_a)
    assert float(w_a.min()) >= 0 and float(w_a.max()) <= 1


def test_gate_matches_query_to_nearest_memory() -> None:
    """A query equal to an anomaly item gets a gate close to 1, one equal to a normal item close to 0."""
    gate = MatchingGuidedResidualGate(channels=4, memory_size=1, temperature=0.05)
    gate.projection = torch.nn.Identity()  # q = F + p_c; use a zero position encoding below
    gate.position_encoding = lambda h, w, like: torch.zeros(1, 4, h, w)  # type: ignore[method-assign]
    with torch.no_grad():
        gate.memory.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))  # normal, anomaly
    features = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]).view(2, 4, 1, 1)
    w_a, _ = gate(features)
    expected_anomaly = 1 / (1 + math.exp(-1 / 0.05))  # softmax of (0, 1/tau)
    torch.testing.assert_close(w_a.flatten(), torch.tensor([1 - expected_anomaly, expected_anomaly]))


def test_gate_uses_position_encoding() -> None:
    """Eq. 2 adds p_c: a spatially constant feature map must give position-dependent queries."""
    torch.manual_seed(0)
    gate = MatchingGuidedResidualGate(channels=8, memory_size=2)
    constant = torch.ones(1, 8, 4, 4)
    sim = gate.similarity(constant)
    assert not torch.allclose(sim[..., 0, 0], sim[..., 3, 3])
    encoding = gate.position_encoding(4, 4, constant)
    assert encoding.shape == (1, 8, 4, 4)
    assert not torch.allclose(encoding[..., 0, 0], encoding[..., 2, 1])


# ---------------------------------------------------------------- generator (Eq. 5) and Eq. 1 / 6
def test_residual_generator_is_tanh_scaled_features() -> None:
    torch.manual_seed(0)
    generator = AttributeScalingResidualGenerator(channels=6)
    features = torch.randn(2, 6, 3, 3) * 10
    residual = generator(features)
    torch.testing.assert_close(residual, torch.tanh(generator.projection(features)) * features)
    assert bool((residual.abs() <= features.abs() + 1e-6).all())  # tanh in (-1, 1) scales each channel


def test_raa_uses_ground_truth_weight_when_given_and_gate_otherwise() -> None:
    torch.manual_seed(0)
    raa = ResidualAnomalyAmplification(channels=8, memory_size=2)
    features = torch.randn(1, 8, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    advanced, gate, _, residual = raa(features, mask)
    torch.testing.assert_close(advanced, features + mask * residual)  # Eq. 6
    torch.testing.assert_close(advanced[..., 2:, :], features[..., 2:, :])  # normal patches unchanged
    advanced_pred, gate_pred, _, _ = raa(features)
    torch.testing.assert_close(advanced_pred, features + gate_pred * residual)  # Eq. 1


# ---------------------------------------------------------------- focal loss
def test_focal_loss_value() -> None:
    logits = torch.zeros(2)  # p = 0.5
    target = torch.tensor([1.0, 0.0])
    # FL = -alpha_t (1 - p_t)^gamma log p_t ; alpha_t = 0.8 for positives, 0.2 for negatives
    expected = (0.8 * 0.25 * math.log(2) + 0.2 * 0.25 * math.log(2)) / 2
    assert gate_focal_loss(logits, target, alpha=0.8, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)
    confident = gate_focal_loss(torch.tensor([8.0]), torch.tensor([1.0]))
    assert confident.item() < 1e-6  # easy examples are down-weighted by (1 - p_t)^gamma


# ---------------------------------------------------------------- anomaly amplification loss (Eq. 7-8)
def test_margin_hinge_value_and_gradient() -> None:
    normal = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    vanilla_anomalous = torch.tensor([[1.0, 0.0]])
    advanced = torch.tensor([[0.6, 0.8]], requires_grad=True)
    loss = pairwise_hinge_mean(advanced, vanilla_anomalous, normal, margin=0.3)
    # pair 1: max(0.6, 1.0 - 0.3) = 0.7 (margin wins); pair 2: max(0.8, 0.0 - 0.3) = 0.8
    assert loss.item() == pytest.approx(0.75)
    loss.backward()
    # only pair 2 passes gradient, d(a_hat . n2)/d a_hat = n2, / (N_a N_n) = 2 ; projected by normalize
    a = advanced.detach()
    expected_hat_grad = torch.tensor([[0.0, 0.5]])
    norm = a.norm()
    expected = (expected_hat_grad - (expected_hat_grad * a).sum() * a / norm**2) / norm
    torch.testing.assert_close(advanced.grad, expected)


def test_exact_streamed_loss_equals_full_matrix() -> None:
    torch.manual_seed(0)
    adv = torch.randn(37, 16, requires_grad=True)
    van_a = torch.randn(37, 16)
    van_n = torch.randn(53, 16)
    streamed = pairwise_hinge_mean(adv, van_a, van_n, 0.3, chunk_elements=53 * 5)  # 5 rows per chunk
    streamed.backward()
    grad_streamed = adv.grad.clone()
    adv.grad = None
    a, r, n = F.normalize(adv, dim=1), F.normalize(van_a, dim=1), F.normalize(van_n, dim=1)
    full = torch.maximum(a @ n.t(), r @ n.t() - 0.3).mean()
    full.backward()
    torch.testing.assert_close(streamed, full)
    torch.testing.assert_close(grad_streamed, adv.grad)


def test_amplification_loss_selects_patch_sets_and_subsample_mode() -> None:
    torch.manual_seed(0)
    advanced = torch.randn(2, 8, 4, 4, requires_grad=True)
    vanilla = torch.randn(2, 8, 4, 4)
    anomalous = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    anomalous[0, 0, :2, :2] = True
    normal = ~anomalous
    exact = amplification_loss(advanced, vanilla, anomalous, normal, 0.3, "exact")
    rows = advanced.permute(0, 2, 3, 1).reshape(-1, 8)
    van_rows = vanilla.permute(0, 2, 3, 1).reshape(-1, 8)
    sel = anomalous.reshape(-1)
    manual = pairwise_hinge_mean(rows[sel], van_rows[sel], van_rows[~sel], 0.3)
    torch.testing.assert_close(exact, manual)
    # subsample with caps above the set sizes is the exact loss
    torch.testing.assert_close(amplification_loss(advanced, vanilla, anomalous, normal, 0.3, "subsample"), exact)
    # with caps of 1 x 1 it is one pair's hinge value
    one = amplification_loss(advanced, vanilla, anomalous, normal, 0.3, "subsample", max_anomalous=1, max_normal=1)
    a, r, n = F.normalize(rows[sel], dim=1), F.normalize(van_rows[sel], dim=1), F.normalize(van_rows[~sel], dim=1)
    pair_values = torch.maximum(a @ n.t(), r @ n.t() - 0.3).flatten()
    assert torch.isclose(pair_values, one.detach()).any()
    with pytest.raises(ValueError, match="exact"):
        amplification_loss(advanced, vanilla, anomalous, normal, mode="approximate")


@pytest.mark.parametrize("case", ["no_anomaly", "no_normal"])
def test_empty_patch_sets_give_finite_zero_loss(case: str) -> None:
    advanced = [torch.randn(2, 8, 4, 4, requires_grad=True)]
    vanilla = [torch.randn(2, 8, 4, 4)]
    logits = [torch.zeros(2, 1, 4, 4, requires_grad=True)]
    full = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    anomalous = [~full] if case == "no_anomaly" else [full]
    normal = [full] if case == "no_anomaly" else [~full]
    total, focal, l_a = AandAmplificationLoss()(advanced, vanilla, logits, anomalous, normal)
    assert torch.isfinite(total) and l_a.item() == 0.0 and torch.isfinite(focal)
    total.backward()
    assert torch.isfinite(advanced[0].grad).all() and torch.isfinite(logits[0].grad).all()


def test_stage1_labels_threshold_pooled_mask() -> None:
    model = tiny_aand()
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 0, :2] = 1  # top-left 2x2 block: 50 % anomalous; top-right: 0 %
    mask[..., 0:2, 2] = 1  # top-right block: 50 %
    mask[..., 2, 0] = 1  # bottom-left block: 25 % -> below 0.3
    labels = model.level_labels(mask, (2, 2))
    assert labels.flatten().tolist() == [True, True, False, False]


# ---------------------------------------------------------------- stage 2 losses (Eq. 10-12)
def test_hard_kd_loss_averages_top_k_distances() -> None:
    teacher = torch.ones(2, 4, 3, 3)
    student = torch.ones(2, 4, 3, 3)
    student[0, :, 0, 0] = -1  # distance 2 at one pixel of image 0
    student[1, :, 1, 1] = -1
    student[1, :, 2, 2] = -1  # two pixels of image 1
    assert hard_kd_loss([teacher], [student], hard_samples=1).item() == pytest.approx(2.0)
    # K_h = 2: image 0 -> (2 + 0)/2 = 1, image 1 -> (2 + 2)/2 = 2; mean over images 1.5
    assert hard_kd_loss([teacher], [student], hard_samples=2).item() == pytest.approx(1.5)
    # summed over levels
    assert hard_kd_loss([teacher, teacher], [student, student], 1).item() == pytest.approx(4.0)


def test_hard_kd_selects_the_largest_distances() -> None:
    torch.manual_seed(0)
    teacher, student = torch.randn(3, 5, 6, 6), torch.randn(3, 5, 6, 6)
    distance = (1 - F.cosine_similarity(teacher, student, dim=1)).flatten(1)
    expected = distance.sort(dim=1, descending=True).values[:, :10].mean()
    torch.testing.assert_close(hard_kd_loss([teacher], [student], 10), expected)
    # K_h larger than the map clamps to all pixels
    torch.testing.assert_close(hard_kd_loss([teacher], [student], 1000), distance.mean())


def test_distillation_loss_is_kd_plus_hkd() -> None:
    torch.manual_seed(0)
    teacher, student = [torch.randn(2, 4, 3, 3)], [torch.randn(2, 4, 3, 3)]
    total, l_kd, l_hkd = AandDistillationLoss(hard_samples=3)(teacher, student)
    flat_t, flat_s = teacher[0].flatten(1), student[0].flatten(1)
    torch.testing.assert_close(l_kd, (1 - F.cosine_similarity(flat_t, flat_s, dim=1)).mean())
    torch.testing.assert_close(total, l_kd + l_hkd)


# ---------------------------------------------------------------- synthesis
def test_otsu_threshold_separates_two_modes() -> None:
    gray = torch.full((1, 10, 10), 0.2)
    gray[:, :, 5:] = 0.8
    thr = otsu_threshold(gray).item()
    assert 0.2 < thr < 0.8


def test_foreground_strategies() -> None:
    image = torch.full((1, 3, 32, 32), 0.1)
    image[..., 8:24, 8:24] = 0.9
    assert foreground_mask(image, "none").all()
    bright = foreground_mask(image, "bright")
    assert bright[..., 16, 16] == 1 and bright[..., 0, 0] == 0
    dark = foreground_mask(image, "dark", threshold=0.5)
    assert dark[..., 16, 16] == 0 and dark[..., 0, 0] == 1
    with pytest.raises(ValueError, match="foreground"):
        foreground_mask(image, "edges")


def test_synthesis_masks_are_binary_inside_foreground_and_change_only_masked_pixels() -> None:
    torch.manual_seed(0)
    images = torch.full((4, 3, 64, 64), 0.1)
    images[..., 16:48, 16:48] = 0.8
    synth = AnomalySynthesizer(probability=1.0, foreground="bright")
    augmented, masks, foreground = synth(images)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert masks.sum() > 0
    assert bool((masks <= foreground).all())
    unchanged = (masks == 0).expand_as(images)
    torch.testing.assert_close(augmented[unchanged], images[unchanged])
    clean, clean_masks, _ = AnomalySynthesizer(probability=0.0)(images)
    assert clean_masks.sum() == 0 and torch.equal(clean, images)


def _constant_perturbation(synth: AnomalySynthesizer, value: float = 1.0) -> None:
    """Every Perlin draw: the whole image is masked, the perturbation is ``value`` everywhere."""

    def generate(height, width, device, source=None):
        del source
        return torch.full((height, width, 3), value, device=device), torch.ones(height, width, 1, device=device)

    synth.generator.generate_perturbation = generate


def test_synthesis_defaults_leave_20_percent_clean_and_blend_beta_below_0_8() -> None:
    """The paper's synthesis constants: 80 % of the images get an anomaly, blended as
    ``beta * I + (1 - beta) * P`` with the original's weight ``beta`` in [0, 0.8) (opacity 1 - beta in (0.2, 1])."""
    model = tiny_aand()
    assert model.synthesizer.probability == 0.8
    assert model.synthesizer.blend_range == (0.2, 1.0)
    torch.manual_seed(0)
    synth = model.synthesizer
    _constant_perturbation(synth, 1.0)
    images = torch.zeros(1000, 3, 4, 4)  # original 0, perturbation 1: a pixel's value is the opacity 1 - beta
    augmented, masks, _ = synth(images)
    anomalous = masks.flatten(1).amax(dim=1) > 0
    assert float(anomalous.float().mean()) == pytest.approx(0.8, abs=0.05)  # 20 % stay clean
    assert torch.equal(augmented[~anomalous], images[~anomalous])
    opacity = augmented[anomalous][:, 0, 0, 0]
    beta = 1 - opacity
    assert float(beta.min()) >= 0.0 and float(beta.max()) < 0.8
    assert float(beta.min()) < 0.05 and float(beta.max()) > 0.75  # the whole range is drawn
    assert float(beta.mean()) == pytest.approx(0.4, abs=0.03)  # uniform


def test_blend_weights_the_original_by_beta_and_the_perturbation_by_one_minus_beta() -> None:
    """Direction of beta: with opacity 0.3 the result is 0.3 * perturbation + 0.7 * image (not the reverse)."""
    synth = AnomalySynthesizer(probability=1.0, blend_range=(0.3, 0.3))
    _constant_perturbation(synth, 1.0)
    images = torch.full((2, 3, 8, 8), 0.5)
    augmented, masks, _ = synth(images)
    assert masks.all()
    torch.testing.assert_close(augmented, torch.full_like(images, 0.3 * 1.0 + 0.7 * 0.5))


def test_texture_folder_without_images_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    for folder in (tmp_path, tmp_path / "missing"):
        with pytest.raises(ValueError, match="anomaly_source_path"):
            AnomalySynthesizer(anomaly_source_path=folder)
        # the model constructs (a checkpoint must load without the textures) and refuses at fit start
        with pytest.raises(ValueError, match="anomaly_source_path"):
            tiny_aand(anomaly_source_path=str(folder)).check_texture_source()


def test_texture_folder_is_used(tmp_path) -> None:
    from PIL import Image

    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "red.png")
    synth = AnomalySynthesizer(anomaly_source_path=tmp_path, probability=1.0)
    assert len(synth.generator.anomaly_source_paths) == 1
    augmented, masks, _ = synth(torch.zeros(2, 3, 32, 32))
    assert masks.sum() > 0 and augmented.abs().sum() > 0


# ---------------------------------------------------------------- model, stages, shapes
def test_eval_forward_shapes_and_bounds() -> None:
    torch.manual_seed(0)
    model = AandModel(backbone="resnet18", input_size=(64, 64), pre_trained=False, memory_size=4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.anomaly_map.shape == (2, 1, 64, 64)
    assert out.pred_score.shape == (2, 1)
    torch.testing.assert_close(out.pred_score[:, 0], out.anomaly_map.flatten(1).amax(dim=1))
    assert bool((out.anomaly_map >= 0).all())


@pytest.mark.parametrize("channels", [1, 4])
def test_grayscale_and_rgba_tensors(channels: int) -> None:
    model = AandModel(backbone="resnet18", input_size=(64, 64), pre_trained=False, memory_size=4).eval()
    rgb = torch.rand(1, 3, 64, 64)
    other = rgb[:, :1] if channels == 1 else torch.cat([rgb, torch.ones(1, 1, 64, 64)], dim=1)
    expected = rgb[:, :1].expand(-1, 3, -1, -1) if channels == 1 else rgb
    with torch.no_grad():
        torch.testing.assert_close(model(other).anomaly_map, model(expected).anomaly_map)
    with pytest.raises(ValueError, match="channels"):
        model(torch.rand(1, 2, 64, 64))


@pytest.mark.parametrize("size", [(60, 64), (32, 32)])
def test_unservable_image_size_is_a_clear_error(size) -> None:
    with pytest.raises(ValueError, match="image size"):
        tiny_aand(pre_processor=Aand.configure_pre_processor(image_size=size))


def test_only_stage_parameters_receive_gradients_and_optimisers_hold_them() -> None:
    torch.manual_seed(0)
    model = tiny_aand()
    (raa_opt, student_opt), _ = model.configure_optimizers()
    raa_params = {id(p) for p in model.model.raa.parameters()}
    student_params = {id(p) for p in [*model.model.bottleneck.parameters(), *model.model.decoder.parameters()]}
    assert {id(p) for g in raa_opt.param_groups for p in g["params"]} == raa_params
    assert {id(p) for g in student_opt.param_groups for p in g["params"]} == student_params
    images = torch.randn(4, 3, 64, 64)

    def grads() -> dict[str, set[int]]:
        named = {
            "teacher": model.model.encoder.parameters(),
            "raa": model.model.raa.parameters(),
            "student": [*model.model.bottleneck.parameters(), *model.model.decoder.parameters()],
        }
        return {k: {id(p) for p in v if p.grad is not None and p.grad.abs().sum() > 0} for k, v in named.items()}

    model.synthesizer.probability = 1.0
    model._set_trainable(1)
    model.stage1_losses(images)["loss"].backward()
    stage1 = grads()
    assert stage1["raa"] and not stage1["teacher"] and not stage1["student"]
    model.zero_grad(set_to_none=True)
    model._set_trainable(2)
    model.stage2_losses(images)["loss"].backward()
    stage2 = grads()
    assert stage2["student"] and not stage2["teacher"] and not stage2["raa"]
    assert not any(p.requires_grad for p in model.model.raa.parameters())


def test_stage_follows_epoch_and_schedule() -> None:
    model = tiny_aand(stage1_epochs=3, stage2_epochs=5)
    assert model.trainer_arguments["max_epochs"] == 8
    assert model._milestones(100) == [80, 90] and model._milestones(120) == [96, 108]
    with pytest.raises(ValueError, match="stage"):
        tiny_aand(stage2_epochs=0)


def test_no_network_access_when_not_pretrained(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        msg = "network access attempted"
        raise AssertionError(msg)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    model = tiny_aand()
    model.eval()
    with torch.no_grad():
        out = model.model(torch.rand(1, 3, 64, 64))
    assert torch.isfinite(out.anomaly_map).all()
