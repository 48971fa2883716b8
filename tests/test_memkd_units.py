"""Unit tests of MemKD: one per equation / component, on hand-built tensors with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from anomalib.data import InferenceBatch
from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss
from anomalib_memkd import (
    MemKD,
    MemKDLoss,
    MemKDModel,
    NRMemory,
    get_memory_decoder,
    normality_memorization_loss,
    orthogonality_loss,
)

SIZE = 64


def _memory(keys: torch.Tensor, values: torch.Tensor, temperature: float = 1.0) -> NRMemory:
    memory = NRMemory(num_items=keys.shape[0], channels=keys.shape[1], temperature=temperature)
    with torch.no_grad():
        memory.keys.copy_(keys)
        memory.values.copy_(values)
    return memory


def _as_map(vectors: torch.Tensor) -> torch.Tensor:
    """``(P, C)`` position vectors -> ``(1, C, 1, P)`` feature map (position j = column j)."""
    return vectors.t().reshape(1, vectors.shape[1], 1, vectors.shape[0])


@pytest.fixture(scope="module")
def torch_model() -> MemKDModel:
    torch.manual_seed(0)
    return MemKDModel("resnet18", input_size=(SIZE, SIZE), pre_trained=False, memory_size=10)


# --------------------------------------------------------------------------- NR memory, Eq. 5-6
def test_read_weights_are_a_softmax_over_items() -> None:
    torch.manual_seed(0)
    memory = NRMemory(num_items=7, channels=16)
    query = torch.randn(2, 16, 3, 5)
    weights = memory.key_weights(query)
    assert weights.shape == (2, 15, 7)
    assert torch.all(weights > 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 15))
    # the read is the weighted sum of the values, reshaped to the query's shape
    read = memory(query)
    assert read.shape == query.shape
    expected = torch.einsum("bnl,lc->bcn", weights, memory.values).reshape(query.shape)
    torch.testing.assert_close(read, expected)


def test_read_weights_match_eq5_by_hand_at_paper_temperature() -> None:
    # Orthogonal keys 3 * e_0..e_3 in R^6, query = 5 * e_1 (cosine ignores both scales):
    # cos = [0, 1, 0, 0] -> w = [1, e, 1, 1] / (e + 3)  (temperature 1, the paper).
    keys = 3 * torch.eye(4, 6)
    values = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    memory = _memory(keys, values)
    query = _as_map(5 * keys[1:2])
    e = math.e
    expected_w = torch.tensor([1.0, e, 1.0, 1.0]) / (e + 3)
    torch.testing.assert_close(memory.key_weights(query)[0, 0], expected_w)
    torch.testing.assert_close(memory(query)[0, :, 0, 0], expected_w @ values)


def test_query_equal_to_key_recalls_its_value() -> None:
    torch.manual_seed(0)
    keys = torch.eye(5, 8) * 3.0  # well-separated (orthogonal) keys
    values = torch.randn(5, 8)
    memory = _memory(keys, values, temperature=0.02)
    query = _as_map(keys[[3, 0, 4]])  # positions asking for items 3, 0, 4
    read = memory(query)[0, :, 0, :].t()  # (positions, C)
    torch.testing.assert_close(read, values[[3, 0, 4]], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- NEL, Eq. 8-9
def test_exemplar_reconstruction_addresses_values_not_keys() -> None:
    torch.manual_seed(0)
    keys = torch.eye(8)[:4]  # keys span e_0..e_3
    values = torch.eye(8)[4:] * 2.0  # values span e_4..e_7: every key is orthogonal to every value
    memory = _memory(keys, values, temperature=0.02)
    features = _as_map(values[[2, 1]])  # exemplar positions equal to values 2 and 1

    # Eq. 8: weights from cos(feature, v_l); one-hot at this temperature
    weights = memory.value_weights(features)[0]
    torch.testing.assert_close(weights, torch.eye(4)[[2, 1]], atol=1e-6, rtol=0)
    reconstruction = memory.reconstruct(features)
    torch.testing.assert_close(reconstruction, features, atol=1e-6, rtol=1e-5)

    # Key addressing would see a feature orthogonal to every key: uniform weights, mean value.
    read = memory(features)[0, :, 0, :].t()
    torch.testing.assert_close(read, values.mean(0).expand(2, -1))

    # The keys play no part in Eq. 8-9: changing them changes nothing.
    with torch.no_grad():
        memory.keys.copy_(torch.randn(4, 8))
    torch.testing.assert_close(memory.reconstruct(features), reconstruction)


def test_exemplar_reconstruction_weights_match_eq8_by_hand() -> None:
    values = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-0.5, 0.0]])
    memory = _memory(torch.randn(3, 2), values)
    feature = _as_map(torch.tensor([[2.0, 2.0]]))  # 45 degrees: cos = [s, s, -s], s = 1/sqrt(2), whatever the norms
    s = 1 / math.sqrt(2)
    expected_w = torch.softmax(torch.tensor([s, s, -s]), dim=0)
    torch.testing.assert_close(memory.value_weights(feature)[0, 0], expected_w)
    torch.testing.assert_close(memory.reconstruct(feature)[0, :, 0, 0], expected_w @ values)


def test_memory_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="temperature"):
        NRMemory(4, 8, temperature=0.0)
    with pytest.raises(ValueError, match="num_items"):
        NRMemory(0, 8)


# --------------------------------------------------------------------------- losses
def test_normality_memorization_loss_is_eq10_summed_over_memories() -> None:
    # memory A: N=2 exemplars of C*H*W = 3*2*2 = 12 elements; errors 1 and 2 everywhere
    target_a = torch.zeros(2, 3, 2, 2)
    recon_a = torch.stack([torch.ones(3, 2, 2), 2 * torch.ones(3, 2, 2)])
    # (1/N) sum_n ||.||^2 = (12 * 1 + 12 * 4) / 2 = 30
    assert normality_memorization_loss([target_a], [recon_a]).item() == pytest.approx(30.0)
    # memory B: one exemplar, a single error of 3 at one position -> 9
    target_b = torch.zeros(1, 4, 1, 1)
    recon_b = torch.tensor([3.0, 0.0, 0.0, 0.0]).reshape(1, 4, 1, 1)
    assert normality_memorization_loss([target_a, target_b], [recon_a, recon_b]).item() == pytest.approx(39.0)


def test_orthogonality_loss_is_mean_absolute_key_value_cosine() -> None:
    keys = torch.eye(6)[:3]
    assert orthogonality_loss([keys], [torch.eye(6)[3:] * 4]).item() == pytest.approx(0.0)  # orthogonal
    aligned = torch.tensor([[1.0, 2.0, 3.0]]).repeat(3, 1)
    assert orthogonality_loss([aligned], [2 * aligned]).item() == pytest.approx(1.0)  # aligned
    assert orthogonality_loss([aligned], [-aligned]).item() == pytest.approx(1.0)  # anti-aligned
    # keys e0, e1 against values e0, e1: cos matrix = identity -> mean |cos| = 2 / 4
    two = torch.eye(2)
    assert orthogonality_loss([two], [two]).item() == pytest.approx(0.5)
    # summed over memories
    assert orthogonality_loss([two, aligned], [two, -aligned]).item() == pytest.approx(1.5)


def test_total_loss_is_eq11(torch_model: MemKDModel) -> None:
    torch.manual_seed(1)
    teacher = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    student = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    memories = [NRMemory(5, 4), NRMemory(5, 6)]
    targets = [torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4)]
    out = MemKDLoss(lambda_nm=0.25, lambda_orth=2.0)(teacher, student, memories, targets)
    kd = ReverseDistillationLoss()(teacher, student)
    nm = normality_memorization_loss(targets, [m.reconstruct(t) for m, t in zip(memories, targets, strict=True)])
    orth = orthogonality_loss([m.keys for m in memories], [m.values for m in memories])
    torch.testing.assert_close(out.kd, kd)
    torch.testing.assert_close(out.nm, nm)
    torch.testing.assert_close(out.orth, orth)
    torch.testing.assert_close(out.loss, kd + 0.25 * nm + 2.0 * orth)
    without_exemplars = MemKDLoss()(teacher, student, memories, None)
    assert without_exemplars.nm.item() == 0.0


# --------------------------------------------------------------------------- architecture
@pytest.mark.parametrize(("arch", "expansion"), [("resnet18", 1), ("resnet50", 4)])
def test_decoder_stages_take_query_plus_recall(arch: str, expansion: int) -> None:
    decoder = get_memory_decoder(arch)
    c_bottleneck, c_layer3, c_layer2 = 512 * expansion, 256 * expansion, 128 * expansion
    assert decoder.memory_channels == (c_bottleneck, c_layer3, c_layer2)
    for stage, c_in, c_out in (
        (decoder.layer1, c_bottleneck, c_layer3),
        (decoder.layer2, c_layer3, c_layer2),
        (decoder.layer3, c_layer2, 64 * expansion),
    ):
        first = stage[0]
        assert first.conv1.in_channels == 2 * c_in
        assert first.upsample[0].in_channels == 2 * c_in  # identity branch too
        assert first.upsample[0].out_channels == c_out
        # later blocks of a stage are unchanged
        assert all(block.conv1.in_channels == c_out for block in list(stage)[1:])


def test_memories_are_placed_after_bottleneck_and_stages_1_2(torch_model: MemKDModel) -> None:
    channels = [memory.channels for memory in torch_model.memories]
    assert channels == [512, 256, 128]
    assert all(memory.num_items == 10 for memory in torch_model.memories)
    names = {name for name, _ in torch_model.named_parameters()}
    assert {"memories.0.keys", "memories.0.values", "memories.2.values"} <= names


def test_training_forward_shapes_and_exemplar_targets(torch_model: MemKDModel) -> None:
    torch.manual_seed(2)
    torch_model.train()
    images, exemplars = torch.randn(2, 3, SIZE, SIZE), torch.randn(3, 3, SIZE, SIZE)
    out = torch_model(images, exemplars)
    assert [f.shape for f in out.student_features] == [f.shape for f in out.teacher_features]
    assert [tuple(f.shape) for f in out.teacher_features] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    assert [tuple(f.shape) for f in out.exemplar_features] == [(3, 512, 2, 2), (3, 256, 4, 4), (3, 128, 8, 8)]
    assert not out.exemplar_features[0].requires_grad  # detached bottleneck embedding

    # M1 <- teacher layer3, M2 <- teacher layer2 of the exemplars; teacher features of the batch.
    teacher_exemplars = list(torch_model.encoder(exemplars).values())
    teacher_images = list(torch_model.encoder(images).values())
    torch.testing.assert_close(out.exemplar_features[1], teacher_exemplars[2])
    torch.testing.assert_close(out.exemplar_features[2], teacher_exemplars[1])
    for got, expected in zip(out.teacher_features, teacher_images, strict=True):
        torch.testing.assert_close(got, expected)
    assert not torch_model.encoder.training  # the teacher stays in eval mode


def test_bottleneck_sees_batch_and_exemplars_separately(torch_model: MemKDModel) -> None:
    """M0's target is the bottleneck embedding of the exemplars alone; the student decodes the batch's own embedding
    (training-mode batch norm normalises each with its own statistics, as RD does for the batch)."""
    import copy

    torch.manual_seed(3)
    torch_model.train()
    images, exemplars = torch.randn(2, 3, SIZE, SIZE), torch.randn(3, 3, SIZE, SIZE)
    reference = copy.deepcopy(torch_model)
    out = torch_model(images, exemplars)
    with torch.no_grad():
        exemplar_embedding = reference.bottleneck(list(reference.encoder(exemplars).values()))
        student = reference.decoder(reference.bottleneck(list(reference.encoder(images).values())), reference.memories)
    torch.testing.assert_close(out.exemplar_features[0], exemplar_embedding)
    for got, expected in zip(out.student_features, student, strict=True):
        torch.testing.assert_close(got, expected)


def test_eval_forward_returns_inference_batch(torch_model: MemKDModel) -> None:
    torch_model.eval()
    with torch.no_grad():
        out = torch_model(torch.rand(3, 3, SIZE, SIZE))
    assert isinstance(out, InferenceBatch)
    assert out.pred_score.shape == (3,)
    assert out.anomaly_map.shape == (3, 1, SIZE, SIZE)
    torch.testing.assert_close(out.pred_score, out.anomaly_map.flatten(1).amax(1))
    assert torch.all(out.anomaly_map >= 0)


def test_grayscale_and_rgba_inputs(torch_model: MemKDModel) -> None:
    torch_model.eval()
    gray = torch.rand(2, 1, SIZE, SIZE)
    rgba = torch.rand(2, 4, SIZE, SIZE)
    with torch.no_grad():
        out_gray = torch_model(gray)
        out_rgb = torch_model(gray.repeat(1, 3, 1, 1))
        out_rgba = torch_model(rgba)
        out_rgb_of_rgba = torch_model(rgba[:, :3])
    torch.testing.assert_close(out_gray.anomaly_map, out_rgb.anomaly_map)
    torch.testing.assert_close(out_rgba.anomaly_map, out_rgb_of_rgba.anomaly_map)
    with pytest.raises(ValueError, match="channel"):
        torch_model(torch.rand(1, 2, SIZE, SIZE))


def test_bad_sizes_raise(torch_model: MemKDModel) -> None:
    torch_model.eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        torch_model(torch.rand(1, 3, 48, 64))
    with pytest.raises(ValueError, match="pre-processor"):
        MemKD(backbone="resnet18", pre_trained=False, pre_processor=MemKD.configure_pre_processor(image_size=(100, 96)))
    with pytest.raises(ValueError, match="Input size is required"):
        MemKD(backbone="resnet18", pre_trained=False, pre_processor=False)
    with pytest.raises(ValueError, match="three"):
        MemKDModel("resnet18", input_size=(SIZE, SIZE), layers=("layer1", "layer2"), pre_trained=False)


# --------------------------------------------------------------------------- gradients
def _train_losses(model: MemKDModel):
    torch.manual_seed(3)
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(torch.randn(2, 3, SIZE, SIZE), torch.randn(2, 3, SIZE, SIZE))
    return MemKDLoss()(out.teacher_features, out.student_features, model.memories, out.exemplar_features)


def test_normality_memorization_gradients_reach_values_only(torch_model: MemKDModel) -> None:
    losses = _train_losses(torch_model)
    (0.1 * losses.nm).backward()
    for memory in torch_model.memories:
        assert memory.values.grad is not None
        assert memory.values.grad.abs().sum() > 0
        assert memory.keys.grad is None
    assert all(p.grad is None for p in torch_model.decoder.parameters())
    assert all(p.grad is None for p in torch_model.bottleneck.parameters())


def test_orthogonality_gradients_reach_keys_and_values(torch_model: MemKDModel) -> None:
    losses = _train_losses(torch_model)
    (0.1 * losses.orth).backward()
    for memory in torch_model.memories:
        assert memory.keys.grad is not None
        assert memory.keys.grad.abs().sum() > 0
        assert memory.values.grad.abs().sum() > 0


def test_distillation_gradients_reach_the_memories(torch_model: MemKDModel) -> None:
    losses = _train_losses(torch_model)
    losses.kd.backward()
    for memory in torch_model.memories:
        assert memory.keys.grad.abs().sum() > 0  # the recall is part of the student
        assert memory.values.grad.abs().sum() > 0
    assert all(p.grad is None for p in torch_model.encoder.parameters())  # frozen teacher


# --------------------------------------------------------------------------- Lightning module
def test_lightning_module_contract() -> None:
    model = MemKD(
        backbone="resnet18",
        pre_trained=False,
        memory_size=7,
        lr=0.01,
        betas=(0.6, 0.9),
        epochs=7,
        pre_processor=MemKD.configure_pre_processor(image_size=(SIZE, SIZE)),
    )
    assert model.trainer_arguments == {"gradient_clip_val": 0, "num_sanity_val_steps": 0, "max_epochs": 7}
    assert model.learning_type.value == "one_class"
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["lr"] == 0.01
    assert optimizer.defaults["betas"] == (0.6, 0.9)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for memory in model.model.memories:
        assert id(memory.keys) in optimised
        assert id(memory.values) in optimised
    assert all(id(p) in optimised for p in model.model.decoder.parameters())
    assert all(id(p) in optimised for p in model.model.bottleneck.parameters())
    assert not any(id(p) in optimised for p in model.model.encoder.parameters())
    state = model.state_dict()
    assert state["model.memories.1.keys"].shape == (7, 256)


def test_default_model_is_the_paper_configuration() -> None:
    model = MemKD(pre_trained=False)
    assert model.hparams.backbone == "wide_resnet50_2.tv_in1k"
    assert model.num_exemplars == 16
    assert model.loss.lambda_nm == 0.1
    assert model.loss.lambda_orth == 0.1
    assert tuple(model.input_size) == (256, 256)
    assert [(m.num_items, m.channels) for m in model.model.memories] == [(50, 2048), (50, 1024), (50, 512)]
    assert model.model.decoder.layer1[0].conv1.in_channels == 2 * 2048


def test_exemplars_need_a_datamodule() -> None:
    model = MemKD(
        backbone="resnet18",
        pre_trained=False,
        num_exemplars=5,
        pre_processor=MemKD.configure_pre_processor(image_size=(SIZE, SIZE)),
    )
    with pytest.raises(RuntimeError, match="num_exemplars=5.*datamodule"):
        model._next_exemplars()  # noqa: SLF001


def test_memory_is_a_module_with_parameters() -> None:
    memory = NRMemory(3, 4)
    assert isinstance(memory, nn.Module)
    assert {name for name, _ in memory.named_parameters()} == {"keys", "values"}
