"""Unit tests of MemKD: one per equation / component, on hand-built tensors with known answers."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from torch import nn

from anomalib.data import ImageBatch, InferenceBatch
from anomalib.models.components.backbone.resnet_decoder import get_decoder
from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss
from anomalib_memkd import (
    MemKD,
    MemKDLoss,
    MemKDModel,
    NRMemory,
    RecallBlock,
    get_memory_decoder,
    normality_memorization_loss,
    orthogonality_loss,
)

from conftest import memory_with_items as _memory  # noqa: E402
from conftest import positions_as_map as _as_map  # noqa: E402

SIZE = 64


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


# --------------------------------------------------------------------------- optimised recall = plain Eq. 5-9
def _plain_weights(features: torch.Tensor, items: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 5 / Eq. 8 written out: ``softmax_l(cos(F(:, j), item_l) / tau)``, shape ``(B, HW, L)``."""
    positions = features.flatten(2).transpose(1, 2)  # (B, HW, C)
    unit_positions, unit_items = nn.functional.normalize(positions, dim=-1), nn.functional.normalize(items, dim=-1)
    cos = torch.einsum("bnc,lc->bnl", unit_positions, unit_items)
    return torch.softmax(cos / tau, dim=-1)


def _plain_read(features: torch.Tensor, items: torch.Tensor, values: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 6 / Eq. 9 written out: ``sum_l w_{l,j} v_l`` as a ``(B, C, H, W)`` map."""
    read = torch.einsum("bnl,lc->bcn", _plain_weights(features, items, tau), values)
    return read.reshape(features.shape)


@pytest.mark.parametrize("tau", [1.0, 0.1, 0.37])
@pytest.mark.parametrize("path", ["eager", "chunked-norms", "export-layout", "autograd"])
def test_recall_and_reconstruction_are_the_plain_formulas(
    tau: float, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalib_memkd.components import memory as memory_module

    if path == "chunked-norms":  # sum the squared norms over chunks of 8 channels, as for a large map
        monkeypatch.setattr(memory_module, "_NORM_CHUNK_ELEMENTS", 64)
    if path == "export-layout":  # the (B, HW, L) similarity product that exported graphs use
        monkeypatch.setattr(memory_module, "_exporting", lambda: True)
    torch.manual_seed(0)
    shape = (2, 20, 3, 5)
    memory = NRMemory(num_items=7, channels=shape[1], temperature=tau)
    features = torch.randn(shape) * torch.rand(shape[0], 1, *shape[2:]) * 3  # positions of different norms
    # without gradients the softmax runs in place in the product's buffer; with them, the functional softmax
    with torch.set_grad_enabled(path == "autograd"):
        torch.testing.assert_close(memory.key_weights(features), _plain_weights(features, memory.keys, tau))
        torch.testing.assert_close(memory.read_weights(features), memory.key_weights(features).transpose(1, 2))
        torch.testing.assert_close(memory.value_weights(features), _plain_weights(features, memory.values, tau))
        torch.testing.assert_close(memory(features), _plain_read(features, memory.keys, memory.values, tau))
        reconstruction = _plain_read(features, memory.values, memory.values, tau)
        torch.testing.assert_close(memory.reconstruct(features), reconstruction)


def test_chunked_squared_norms_are_the_sum_of_squares(monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalib_memkd.components import memory as memory_module

    torch.manual_seed(0)
    shapes = ((3, 20, 16), (1, 9, 64), (2, 8, 4), (3, 5, 7))  # 3 chunks of <= 8 channels, 2, one, one
    for threshold in (memory_module._NORM_CHUNK_ELEMENTS, 64):  # the real chunk size and a forced small one
        monkeypatch.setattr(memory_module, "_NORM_CHUNK_ELEMENTS", threshold)
        for shape in shapes:
            flat = torch.randn(shape, dtype=torch.float64)
            torch.testing.assert_close(memory_module.squared_norms(flat), (flat * flat).sum(dim=1))
    # at the real threshold a 16 x 256 x 64 x 64 map is summed over chunks of 32 channels
    monkeypatch.setattr(memory_module, "_NORM_CHUNK_ELEMENTS", 1 << 21)
    calls, split = [], torch.Tensor.split
    monkeypatch.setattr(torch.Tensor, "split", lambda self, size, dim=0: calls.append(size) or split(self, size, dim))
    flat = torch.zeros(1, 1, 1).expand(16, 256, 4096)  # no 64 MiB allocation
    memory_module.squared_norms(flat)
    assert calls == [32]


def _recall_block(arch: str, stage: str = "layer3") -> RecallBlock:
    block = getattr(get_memory_decoder(arch), stage)[1]
    for module in block.modules():  # non-trivial BatchNorm statistics and affine parameters
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return block


# basic block (3x3 first convolution): folds at L = 10, C = 64; not at L = 100 > 1.125 C (plain path);
# bottleneck (1x1 first convolution): always folds
FOLD_CASES = [("resnet18", 10, True), ("resnet18", 100, False), ("resnet50", 10, True)]


@pytest.mark.parametrize(("arch", "num_items", "folds"), FOLD_CASES)
@pytest.mark.parametrize(("training", "channels_last"), [(False, False), (True, False), (False, True)])
def test_folded_recall_block_is_the_block_on_the_concatenation(
    arch: str, num_items: int, folds: bool, training: bool, channels_last: bool
) -> None:
    """``forward_memory(q, M)`` (the read folded into the first convolution) = anomalib's block on cat[q, M(q)],
    also in the channels-last layout of the fast path (another branch of the folded 1x1 product)."""
    torch.manual_seed(0)
    block = _recall_block(arch).train(training)
    channels = block.block.conv1.in_channels // 2
    memory = NRMemory(num_items, channels, temperature=0.1)
    query = torch.relu(torch.randn(2, channels, 8, 8))
    if channels_last:
        block = block.to(memory_format=torch.channels_last)
        query = query.contiguous(memory_format=torch.channels_last)
    assert block.folds_recall(num_items, positions=2 * 8 * 8) is folds
    with torch.no_grad():
        expected = block(query, memory(query))  # anomalib's forward on torch.cat([query, recall])
        torch.testing.assert_close(block.forward_memory(query, memory), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("arch", "num_items", "folds"), FOLD_CASES)
def test_folded_recall_block_has_the_gradients_of_the_concatenation(arch: str, num_items: int, folds: bool) -> None:
    """Training: the same gradients reach the keys, the values, the query and the block's weights either way."""
    torch.manual_seed(0)
    block = _recall_block(arch).train()
    channels = block.block.conv1.in_channels // 2
    memory = NRMemory(num_items, channels, temperature=0.1)
    query = torch.relu(torch.randn(2, channels, 8, 8)).requires_grad_()
    direction = torch.randn(2, channels, 8, 8)
    assert block.folds_recall(num_items, positions=2 * 8 * 8) is folds
    tensors = {"query": query, "keys": memory.keys, "values": memory.values, "conv1": block.block.conv1.weight,
               "bn1": block.block.bn1.weight}  # fmt: skip

    def gradients(output: torch.Tensor) -> dict[str, torch.Tensor]:
        grads = torch.autograd.grad((output * direction).sum(), list(tensors.values()))
        return dict(zip(tensors, grads, strict=True))

    expected = gradients(block(query, memory(query)))
    folded = gradients(block.forward_memory(query, memory))
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(folded[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_decoder_recall_is_the_block_on_the_concatenation(arch: str) -> None:
    """The decoder's fused path (NR memories) = the same decoder given plain ``query -> read`` callables."""
    torch.manual_seed(0)
    decoder = get_memory_decoder(arch).eval()
    memories = [NRMemory(size, channels, 0.1) for size, channels in zip((10, 20, 30), decoder.memory_channels)]
    plain = [lambda query, memory=memory: memory(query) for memory in memories]
    batch = torch.randn(2, 512 * decoder.block_expansion, 2, 2)
    with torch.no_grad():
        fused_features, fused_queries = decoder.decode(batch, memories)
        plain_features, plain_queries = decoder.decode(batch, plain)
    for fused, expected in zip(fused_features + fused_queries, plain_features + plain_queries, strict=True):
        assert fused.shape == expected.shape
        assert (fused - expected).abs().max() <= 1e-5 * expected.abs().max()  # float rounding of a deep stack


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
    # per element: A = (12 * 1 + 12 * 4) / 24 = 2.5, B = 9 / 4 = 2.25
    mean = normality_memorization_loss([target_a, target_b], [recon_a, recon_b], reduction="mean")
    assert mean.item() == pytest.approx(4.75)
    with pytest.raises(ValueError, match="reduction"):
        normality_memorization_loss([target_a], [recon_a], reduction="max")


def test_loss_reports_both_nm_reductions_and_uses_the_configured_one() -> None:
    torch.manual_seed(4)
    teacher, student = [torch.randn(2, 4, 8, 8)], [torch.randn(2, 4, 8, 8)]
    memories, targets = [NRMemory(5, 4, temperature=0.1)], [torch.randn(3, 4, 8, 8)]
    by_mean = MemKDLoss(nm_reduction="mean")(teacher, student, memories, targets)
    by_sum = MemKDLoss(nm_reduction="sum")(teacher, student, memories, targets)
    torch.testing.assert_close(by_mean.nm_sum, by_sum.nm_sum)
    torch.testing.assert_close(by_mean.nm_mean, by_sum.nm_mean)
    torch.testing.assert_close(by_mean.nm_sum, by_mean.nm_mean * 4 * 8 * 8)  # sum = C*H*W x per-element mean
    torch.testing.assert_close(by_mean.nm, by_mean.nm_mean)
    torch.testing.assert_close(by_sum.nm, by_sum.nm_sum)
    torch.testing.assert_close(by_sum.loss - by_mean.loss, 0.1 * (by_sum.nm_sum - by_mean.nm_mean))
    assert MemKDLoss().nm_reduction == "sum"
    # no memories ("memory off"): plain KD
    plain = MemKDLoss()(teacher, student, [], None)
    torch.testing.assert_close(plain.loss, ReverseDistillationLoss()(teacher, student))
    assert plain.nm.item() == plain.orth.item() == 0.0


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
    # the default form of the function and of MemKDLoss / MemKD is the absolute one
    assert inspect.signature(orthogonality_loss).parameters["form"].default == "abs"
    assert MemKDLoss().orth_form == "abs"


@pytest.mark.parametrize(
    ("form", "orthogonal", "aligned", "anti_aligned", "half"),
    [
        ("abs", 0.0, 1.0, 1.0, 0.5),  # |cos|: 0 iff pairwise orthogonal
        ("signed", 0.0, 1.0, -1.0, 0.5),  # cos, Eq. 5's similarity
        ("distance", 1.0, 0.0, 2.0, 0.5),  # 1 - cos, Eq. 1's distance
    ],
)
def test_orthogonality_loss_forms_by_hand(form: str, orthogonal: float, aligned: float, anti_aligned: float,
                                          half: float) -> None:  # fmt: skip
    """The three readings of Eq. 7's ``d`` on orthogonal, aligned, anti-aligned and half-matching key/value sets."""
    keys = torch.eye(6)[:3]
    assert orthogonality_loss([keys], [torch.eye(6)[3:] * 4], form).item() == pytest.approx(orthogonal, abs=1e-6)
    same = torch.tensor([[1.0, 2.0, 3.0]]).repeat(3, 1)
    assert orthogonality_loss([same], [2 * same], form).item() == pytest.approx(aligned, abs=1e-6)
    assert orthogonality_loss([same], [-same], form).item() == pytest.approx(anti_aligned, abs=1e-6)
    two = torch.eye(2)  # cos matrix = identity: mean cos = mean |cos| = 1/2, mean (1 - cos) = 1/2
    assert orthogonality_loss([two], [two], form).item() == pytest.approx(half, abs=1e-6)
    # MemKDLoss and MemKD pass the form through
    memories = [NRMemory(3, 6)]
    with torch.no_grad():
        memories[0].keys.copy_(same.repeat(1, 2))
        memories[0].values.copy_(-same.repeat(1, 2))
    teacher, student = [torch.randn(1, 6, 2, 2)], [torch.randn(1, 6, 2, 2)]
    assert MemKDLoss(orth_form=form)(teacher, student, memories).orth.item() == pytest.approx(anti_aligned, abs=1e-6)
    pre = MemKD.configure_pre_processor(image_size=(SIZE, SIZE))
    assert MemKD(backbone="resnet18", pre_trained=False, pre_processor=pre, orth_form=form).loss.orth_form == form


def test_orthogonality_gradient_step_follows_the_form() -> None:
    """One gradient step from a 45-degree key/value pair: |cos| and cos shrink the cosine, 1 - cos grows it."""
    torch.manual_seed(0)
    start_key, start_value = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    moved = {}
    for form in ("abs", "signed", "distance"):
        key, value = start_key.clone().requires_grad_(), start_value.clone().requires_grad_()
        orthogonality_loss([key], [value], form).backward()
        with torch.no_grad():
            moved[form] = float(torch.cosine_similarity(key - 0.1 * key.grad, value - 0.1 * value.grad))
    start = float(torch.cosine_similarity(start_key, start_value))
    assert moved["abs"] < start and moved["signed"] < start and moved["distance"] > start
    # from an anti-aligned pair, only |cos| moves towards orthogonality (signed drives it further, to -1)
    key, value = torch.tensor([[1.0, 0.2]], requires_grad=True), torch.tensor([[-1.0, 0.0]], requires_grad=True)
    orthogonality_loss([key], [value], "abs").backward()
    with torch.no_grad():
        after = float(torch.cosine_similarity(key - 0.1 * key.grad, value - 0.1 * value.grad))
    assert abs(after) < abs(float(torch.cosine_similarity(key, value)))


def test_orthogonality_loss_rejects_unknown_forms() -> None:
    with pytest.raises(ValueError, match="orth_form"):
        orthogonality_loss([torch.eye(2)], [torch.eye(2)], "squared")
    with pytest.raises(ValueError, match="orth_form"):
        MemKDLoss(orth_form="cos")


def test_total_loss_is_eq11(torch_model: MemKDModel) -> None:
    torch.manual_seed(1)
    teacher = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    student = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    memories = [NRMemory(5, 4), NRMemory(5, 6)]
    targets = [torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4)]
    out = MemKDLoss(lambda_nm=0.25, lambda_orth=2.0)(teacher, student, memories, targets)
    kd = ReverseDistillationLoss()(teacher, student)
    reconstructions = [m.reconstruct(t) for m, t in zip(memories, targets, strict=True)]
    nm = normality_memorization_loss(targets, reconstructions, reduction="sum")  # MemKDLoss's default (Eq. 10)
    orth = orthogonality_loss([m.keys for m in memories], [m.values for m in memories])
    torch.testing.assert_close(out.kd, kd)
    torch.testing.assert_close(out.nm, nm)
    torch.testing.assert_close(out.orth, orth)
    torch.testing.assert_close(out.loss, kd + 0.25 * nm + 2.0 * orth)
    without_exemplars = MemKDLoss()(teacher, student, memories, None)
    assert without_exemplars.nm.item() == 0.0


# --------------------------------------------------------------------------- architecture
@pytest.mark.parametrize(("arch", "expansion"), [("resnet18", 1), ("resnet50", 4)])
def test_each_decoder_stage_recalls_after_its_first_block(arch: str, expansion: int) -> None:
    """Memory i sits inside decoder stage i after the up-sampling block, where the student has teacher level i's
    channels; the stage's second block takes [query, recall] (2C) and its identity path is the query."""
    reference = get_decoder(arch)
    decoder = get_memory_decoder(arch)
    assert decoder.memory_channels == (64 * expansion, 128 * expansion, 256 * expansion)  # teacher order
    for name, c_out in (("layer1", 256 * expansion), ("layer2", 128 * expansion), ("layer3", 64 * expansion)):
        stage, plain = getattr(decoder, name), getattr(reference, name)
        assert len(stage) == len(plain)
        first = stage[0]
        assert first.upsample[0].out_channels == c_out
        assert first.conv1.in_channels == plain[0].conv1.in_channels  # RD's stage input, unchanged
        recall = stage[1]
        assert isinstance(recall, RecallBlock)
        assert type(recall.block) is type(plain[1])
        assert recall.block.conv1.in_channels == 2 * c_out
        assert all(block.conv1.in_channels == c_out for block in list(stage)[2:])
        # identity path = the query: with a zero branch the block returns relu(query)
        query, recall_map = torch.randn(2, c_out, 3, 3), torch.randn(2, c_out, 3, 3)
        last_bn = recall.block.bn3 if hasattr(recall.block, "bn3") else recall.block.bn2
        with torch.no_grad():
            weight = last_bn.weight.clone()
            last_bn.weight.zero_()
            last_bn.bias.zero_()
            recall.eval()
            torch.testing.assert_close(recall(query, recall_map), torch.relu(query))
            last_bn.weight.copy_(weight)


def test_memories_serve_the_teacher_levels(torch_model: MemKDModel) -> None:
    channels = [memory.channels for memory in torch_model.memories]
    assert channels == [64, 128, 256] == list(torch_model.encoder.out_dims)  # memory m <-> teacher layers[m]
    assert all(memory.num_items == 10 for memory in torch_model.memories)
    names = {name for name, _ in torch_model.named_parameters()}
    assert {"memories.0.keys", "memories.0.values", "memories.2.values"} <= names
    per_memory = MemKDModel("resnet18", input_size=(SIZE, SIZE), pre_trained=False, memory_size=(100, 50, 10))
    assert [memory.num_items for memory in per_memory.memories] == [100, 50, 10]  # (L_1, L_2, L_3), Tab. 4b order
    with pytest.raises(ValueError, match="memory_size"):
        MemKDModel("resnet18", input_size=(SIZE, SIZE), pre_trained=False, memory_size=(50, 50))


def test_queries_have_the_shapes_of_their_teacher_levels(torch_model: MemKDModel) -> None:
    torch_model.eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    queries = torch_model.memory_queries(images)
    with torch.no_grad():
        teacher = list(torch_model.encoder(images).values())
    assert [q.shape for q in queries] == [t.shape for t in teacher]


def test_every_nel_target_is_the_teacher_feature_of_its_level(torch_model: MemKDModel) -> None:
    torch.manual_seed(2)
    torch_model.train()
    images, exemplars = torch.randn(2, 3, SIZE, SIZE), torch.randn(3, 3, SIZE, SIZE)
    out = torch_model(images, exemplars)
    assert [f.shape for f in out.student_features] == [f.shape for f in out.teacher_features]
    assert [tuple(f.shape) for f in out.teacher_features] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    with torch.no_grad():
        teacher_exemplars = list(torch_model.encoder(exemplars).values())
        teacher_images = list(torch_model.encoder(images).values())
    for memory, target, expected in zip(torch_model.memories, out.exemplar_features, teacher_exemplars, strict=True):
        torch.testing.assert_close(target, expected)  # fixed teacher feature of the memory's level
        assert target.shape[1] == memory.channels
        assert not target.requires_grad
    for got, expected in zip(out.teacher_features, teacher_images, strict=True):
        torch.testing.assert_close(got, expected)
    assert not torch_model.encoder.training  # the teacher stays in eval mode


def test_exemplar_pass_leaves_the_bottleneck_and_student_alone(torch_model: MemKDModel) -> None:
    """The exemplars change neither the student's output nor any BatchNorm statistic of bottleneck / decoder."""
    import copy

    torch.manual_seed(3)
    torch_model.train()
    images, exemplars = torch.randn(2, 3, SIZE, SIZE), torch.randn(5, 3, SIZE, SIZE) * 3
    reference = copy.deepcopy(torch_model)
    with_exemplars = torch_model(images, exemplars)
    without = reference(images)
    for got, expected in zip(with_exemplars.student_features, without.student_features, strict=True):
        torch.testing.assert_close(got, expected)
    for part in ("bottleneck", "decoder"):
        state, state_ref = getattr(torch_model, part).state_dict(), getattr(reference, part).state_dict()
        buffers = [key for key in state if "running_" in key or "num_batches_tracked" in key]
        assert buffers
        for key in buffers:
            torch.testing.assert_close(state[key], state_ref[key], msg=f"{part}.{key} changed")


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
    assert state["model.memories.1.keys"].shape == (7, 128)  # memory 1 serves teacher layer2


def test_default_model_is_the_paper_configuration() -> None:
    model = MemKD(pre_trained=False)
    assert model.hparams.backbone == "wide_resnet50_2.tv_in1k"  # torchvision ImageNet-V1 weights (RD's)
    assert inspect.signature(MemKD).parameters["pre_trained"].default is True
    assert tuple(model.hparams.layers) == ("layer1", "layer2", "layer3")  # K = 3
    assert model.num_exemplars == 16  # N
    assert model.loss.lambda_nm == 0.1  # lambda_1
    assert model.loss.lambda_orth == 0.1  # lambda_2
    assert model.lr == 0.005
    assert model.epochs == 100
    assert model.trainer_arguments["max_epochs"] == 100
    assert tuple(model.input_size) == (256, 256)
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["lr"] == 0.005
    # L = 50 for each of the three memories, at the channels of WRN50's layer1/2/3 (0.72 MB of keys + values)
    assert [(m.num_items, m.channels) for m in model.model.memories] == [(50, 256), (50, 512), (50, 1024)]
    assert sum(m.keys.numel() + m.values.numel() for m in model.model.memories) * 4 == 716_800
    assert model.model.use_memory
    # the paper's formulas: no temperature (tau = 1) in Eq. 5/8, Eq. 10's sum (0.1 / "mean" are options,
    # docs/memkd.md "Addressing evidence")
    assert all(m.temperature == 1.0 for m in model.model.memories)
    assert model.loss.nm_reduction == "sum"
    assert model.loss.orth_form == "abs"  # Eq. 7 read as mean |cos| (orthogonality), docs/memkd.md row 3
    assert model.betas == (0.5, 0.999)  # RD's: the paper gives none


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


# --------------------------------------------------------------------------- Eq. 3-4
def _bilinear_align_corners(grid: np.ndarray, size: int) -> np.ndarray:
    """Hand-written bilinear up-sampling with align_corners=True (corner pixels map onto corner pixels)."""
    h, w = grid.shape
    out = np.empty((size, size))
    for y in range(size):
        sy = y * (h - 1) / (size - 1) if h > 1 else 0.0
        y0 = min(int(np.floor(sy)), h - 1)
        y1, ty = min(y0 + 1, h - 1), sy - y0
        for x in range(size):
            sx = x * (w - 1) / (size - 1) if w > 1 else 0.0
            x0 = min(int(np.floor(sx)), w - 1)
            x1, tx = min(x0 + 1, w - 1), sx - x0
            out[y, x] = (
                (1 - ty) * (1 - tx) * grid[y0, x0]
                + (1 - ty) * tx * grid[y0, x1]
                + ty * (1 - tx) * grid[y1, x0]
                + ty * tx * grid[y1, x1]
            )
    return out


def _gaussian_blur(image: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    radius = int(4.0 * sigma + 0.5)  # kernel 2 * 16 + 1 = 33 taps at sigma 4
    taps = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
    taps /= taps.sum()
    padded = np.pad(image, radius, mode="reflect")
    rows = np.stack([np.convolve(row, taps, mode="valid") for row in padded])
    return np.stack([np.convolve(col, taps, mode="valid") for col in rows.T]).T


def test_anomaly_map_is_eq3_eq4_by_hand(torch_model: MemKDModel) -> None:
    """Eq. 3-4: per level 1 - cos over channels, bilinear up-sampling, SUM over the three levels, Gaussian sigma=4."""
    rng = np.random.default_rng(0)
    sizes = [(16, 16), (8, 8), (4, 4)]
    students = [rng.normal(size=(3, *s)) for s in sizes]
    teachers = [rng.normal(size=(3, *s)) for s in sizes]
    levels = []
    for s, t in zip(students, teachers, strict=True):
        cosine = (s * t).sum(0) / (np.linalg.norm(s, axis=0) * np.linalg.norm(t, axis=0))
        levels.append(_bilinear_align_corners(1 - cosine, SIZE))
    expected = _gaussian_blur(sum(levels))
    got = torch_model.anomaly_map_generator(
        [torch.tensor(s, dtype=torch.float32)[None] for s in students],
        [torch.tensor(t, dtype=torch.float32)[None] for t in teachers],
    )
    assert got.shape == (1, 1, SIZE, SIZE)
    np.testing.assert_allclose(got[0, 0].numpy(), expected, rtol=1e-4, atol=1e-5)
    # the comparison tells the alternatives apart: a dropped level, or multiplying the levels
    assert np.abs(_gaussian_blur(levels[0] + levels[1]) - expected).max() > 0.1
    assert np.abs(_gaussian_blur(levels[0] * levels[1] * levels[2]) - expected).max() > 0.1


def test_model_forward_anomaly_map_is_eq3_eq4_of_its_features(torch_model: MemKDModel) -> None:
    """The eval forward's map is Eq. 3-4 of the model's own teacher and decoded student features, all three levels.

    Teacher ``[layer1, layer2, layer3]`` and student ``[c, b, a]`` come from the model's public pieces
    (``encoder``, ``bottleneck``, ``decode``); the hand computation is the one above (1 - cos per level, bilinear
    up-sampling with align_corners=True as anomalib's ``AnomalyMapGenerator`` does, sum, Gaussian sigma = 4).
    A forward that dropped, swapped or multiplied levels would not match.
    """
    torch.manual_seed(3)
    images = torch.rand(2, 3, SIZE, SIZE)
    was_training = torch_model.training
    torch_model.eval()
    try:
        with torch.no_grad():
            teacher = list(torch_model.encoder(images).values())
            student = torch_model.decode(torch_model.bottleneck(teacher))
            got = torch_model(images).anomaly_map
    finally:
        torch_model.train(was_training)
    assert [f.shape[-1] for f in teacher] == [16, 8, 4] and [f.shape for f in student] == [f.shape for f in teacher]
    assert got.shape == (2, 1, SIZE, SIZE)
    for index in range(images.shape[0]):
        levels = []
        for s, t in zip(student, teacher, strict=True):
            s, t = s[index].double().numpy(), t[index].double().numpy()
            norms = np.maximum(np.linalg.norm(s, axis=0), 1e-8) * np.maximum(np.linalg.norm(t, axis=0), 1e-8)
            levels.append(_bilinear_align_corners(1 - (s * t).sum(0) / norms, SIZE))
        expected = _gaussian_blur(sum(levels))
        np.testing.assert_allclose(got[index, 0].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_cli_parses_one_memory_size_per_memory() -> None:
    """jsonargparse (the anomalib CLI) accepts ``--model.memory_size [100,50,10]`` (Tab. 4b) as well as one int."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MemKD, "model")
    common = ["--model.backbone", "resnet18", "--model.pre_trained", "false"]
    for value, sizes in (("[100,50,10]", [100, 50, 10]), ("8", [8, 8, 8])):
        config = parser.parse_args([*common, "--model.memory_size", value])
        model = parser.instantiate_classes(config).model
        assert [memory.num_items for memory in model.model.memories] == sizes


# --------------------------------------------------------------------------- ablation switches
def test_ablation_keyword_arguments() -> None:
    """The benchmark's ablation builds MemKD with these keywords (INTERFACES.md)."""
    pre = MemKD.configure_pre_processor(image_size=(SIZE, SIZE))
    model = MemKD(backbone="resnet18", pre_trained=False, pre_processor=pre, lambda_nm=0.0, temperature=1.0,
                  nm_reduction="sum", use_memory=True)  # fmt: skip
    assert model.loss.lambda_nm == 0.0
    assert model.loss.nm_reduction == "sum"
    assert all(m.temperature == 1.0 for m in model.model.memories)
    with pytest.raises(ValueError, match="nm_reduction"):
        MemKD(backbone="resnet18", pre_trained=False, pre_processor=pre, nm_reduction="median")


def test_exemplars_exclude_the_current_batch() -> None:
    """The exemplar filter drops drawn images whose path is in the batch and keeps N of the rest."""
    model = MemKD(
        backbone="resnet18",
        pre_trained=False,
        num_exemplars=3,
        pre_processor=MemKD.configure_pre_processor(image_size=(SIZE, SIZE)),
    )
    paths = [f"/data/{i}.png" for i in range(6)]
    images = torch.stack([torch.full((3, SIZE, SIZE), float(i) / 10) for i in range(6)])
    drawn = ImageBatch(image=images, image_path=paths)
    model._exemplar_iterator = iter([drawn])  # noqa: SLF001
    model._exemplars_per_step = 3  # noqa: SLF001
    batch = ImageBatch(image=images[[0, 2]], image_path=[paths[0], paths[2]])
    exemplars = model._next_exemplars(batch)  # noqa: SLF001
    expected = model.pre_processor.transform(images[[1, 3, 4]])
    torch.testing.assert_close(exemplars, expected)


class _Indices(torch.utils.data.Dataset):
    """``len`` items, item ``i`` is ``i``; collated into a tensor (a stand-in for a training set)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        return index

    @staticmethod
    def collate_fn(items: list[int]) -> torch.Tensor:
        return torch.tensor(items)


def test_exemplar_stream_resumes_exactly_with_loader_workers() -> None:
    """With ``num_workers > 0`` (persistent workers) a resumed exemplar stream continues the uninterrupted one.

    A new loader iterator draws its workers' base seed from the loader's generator. An uninterrupted fit keeps one
    iterator (persistent workers); a resumed fit restores the sampler's generator and starts a new iterator. If the
    loader shared the sampler's generator, that draw would shift every later permutation after the resume.
    """
    from types import SimpleNamespace

    model = MemKD(
        backbone="resnet18",
        pre_trained=False,
        num_exemplars=2,
        pre_processor=MemKD.configure_pre_processor(image_size=(SIZE, SIZE)),
    )
    # 8 images, batch 2: each draw holds N + B = 4 images, 2 draws per pass over the training set
    datamodule = SimpleNamespace(train_data=_Indices(8), train_batch_size=2, num_workers=1, external_collate_fn=None)
    model._trainer = SimpleNamespace(datamodule=datamodule)  # noqa: SLF001
    model.kd_random.start(1234)  # what fit start does (anomalib_kd_base.distributed.RankRandomness)
    draws = 6  # three passes
    for stop in (1, 2, 3):  # inside pass 1, at the end of pass 1, inside pass 2
        cycle = model._build_exemplar_iterator()  # noqa: SLF001
        assert cycle.loader.num_workers == 1 and cycle.loader.persistent_workers
        reference = [next(cycle) for _ in range(stop)]
        state = cycle.state_dict()  # what a checkpoint written here holds
        reference += [next(cycle) for _ in range(draws - stop)]
        del cycle
        model.kd_random.pending_cycles = {"exemplars": state}  # what a resumed fit's start leaves
        resumed = model._build_exemplar_iterator()  # noqa: SLF001
        continued = [next(resumed) for _ in range(draws - stop)]
        del resumed
        assert all(torch.equal(a, b) for a, b in zip(continued, reference[stop:], strict=True)), stop
    passes = [torch.cat(reference[i : i + 2]).sort().values for i in (0, 2, 4)]
    assert all(torch.equal(p, torch.arange(8)) for p in passes)  # every pass is a permutation of the training set


def test_warns_once_when_exemplars_cannot_be_kept_out_of_the_batch(caplog) -> None:
    """No ``image_path`` in the batch, or no ``train_batch_size``: one warning each, not one per step."""
    import logging
    from types import SimpleNamespace

    model = MemKD(
        backbone="resnet18",
        pre_trained=False,
        num_exemplars=2,
        pre_processor=MemKD.configure_pre_processor(image_size=(SIZE, SIZE)),
    )
    images = torch.rand(4, 3, SIZE, SIZE)
    drawn = ImageBatch(image=images, image_path=[f"/data/{i}.png" for i in range(4)])
    model._exemplar_iterator = iter([drawn, drawn, drawn])  # noqa: SLF001
    model._exemplars_per_step = 2  # noqa: SLF001
    with caplog.at_level(logging.WARNING, logger="anomalib_memkd"):
        model._next_exemplars(ImageBatch(image=images[:2], image_path=drawn.image_path[:2]))  # noqa: SLF001
        assert "may include images of the current batch" not in caplog.text  # paths known: excluded, no warning
        for _ in range(2):
            model._next_exemplars(ImageBatch(image=images[:2]))  # noqa: SLF001
    assert caplog.text.count("training batch has no image_path") == 1
    caplog.clear()
    datamodule = SimpleNamespace(train_data=_Indices(8), num_workers=0)  # no train_batch_size
    model._trainer = SimpleNamespace(datamodule=datamodule)  # noqa: SLF001
    with caplog.at_level(logging.WARNING, logger="anomalib_memkd"):
        model._build_exemplar_iterator()  # noqa: SLF001
        model._build_exemplar_iterator()  # noqa: SLF001
    assert caplog.text.count("has no train_batch_size") == 1


def test_read_weights_under_autocast_are_a_float32_softmax() -> None:
    """The fast path's bf16 autocast keeps the softmax in float32 (the in-place float32 softmax is not taken)."""
    torch.manual_seed(0)
    memory = NRMemory(num_items=7, channels=16, temperature=0.1)
    query = torch.randn(2, 16, 4, 4)
    with torch.inference_mode():
        expected = memory.read_weights(query)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            weights = memory.read_weights(query)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 16))
    torch.testing.assert_close(weights, expected, atol=2e-2, rtol=0)  # bf16 product, float32 softmax
