"""MemKD's NR memory at work: selective recall (temperature), the memory on the eval path, the addressing figures
of ``anomalib_kd_tools.mechanisms.memkd_mechanism_report`` and the memory-off ablation. Tiny tensors and untrained resnet18 models, 64 px."""

from __future__ import annotations

import math

import pytest
import torch

from anomalib.data import ImageBatch
from anomalib.models.components.backbone.resnet_decoder import ResNetDecoder, get_decoder
from anomalib_kd_tools.mechanisms import memkd_mechanism_report
from anomalib_memkd import MemKD, MemKDModel, NRMemory

from conftest import memory_with_items as _memory  # noqa: E402
from conftest import positions_as_map as _as_map  # noqa: E402

SIZE = 64


# --------------------------------------------------------------------------- memory on the eval path
def test_memory_is_on_the_eval_path() -> None:
    """Values always change the eval map; keys change it far more when tau = 0.1 makes addressing selective.

    At tau = 1 the read is nearly the mean of the values whatever the keys, so replacing the keys moves the map a
    little; at tau = 0.1 the same replacement changes which values are read (measured 4-17x the tau = 1 effect).
    """
    torch.manual_seed(5)
    model = MemKDModel("resnet18", input_size=(SIZE, SIZE), pre_trained=False, memory_size=10).eval()
    images = torch.rand(2, 3, SIZE, SIZE)

    def effect(index: int, name: str, temperature: float) -> float:
        """Largest change of the eval map when ``memories[index].<name>`` is replaced by a fixed random draw."""
        for memory in model.memories:
            memory.temperature = temperature
        parameter = getattr(model.memories[index], name)
        saved = parameter.clone()
        base = model(images).anomaly_map
        parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(10 + index)))
        changed = model(images).anomaly_map
        parameter.copy_(saved)
        torch.testing.assert_close(model(images).anomaly_map, base)
        return float((changed - base).abs().max())

    with torch.no_grad():
        for index in range(len(model.memories)):
            assert effect(index, "values", 0.1) > 1e-4, f"memory {index} values not on the eval path"
            selective, uniform = effect(index, "keys", 0.1), effect(index, "keys", 1.0)
            assert selective > 2 * uniform, f"memory {index}: keys' effect {selective:.2e} (tau 0.1), {uniform:.2e} (1)"


def test_temperature_makes_recall_selective() -> None:
    """Orthogonal keys, query = key 1: tau = 1 gives e / (e + L - 1), tau = 0.1 gives e^10 / (e^10 + L - 1)."""
    keys = torch.eye(8)
    query = _as_map(keys[1:2])
    for tau in (1.0, 0.1):
        memory = _memory(keys, torch.randn(8, 8), temperature=tau)
        expected = math.exp(1 / tau) / (math.exp(1 / tau) + 7)
        assert memory.key_weights(query)[0, 0, 1].item() == pytest.approx(expected, rel=1e-5)
        stats = memory.addressing_statistics(query)
        assert stats["peak"].item() == pytest.approx(expected, rel=1e-5)


def test_addressing_statistics_by_hand() -> None:
    keys = torch.eye(4)
    values = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    memory = _memory(keys, values, temperature=1.0)
    query = _as_map(torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    stats = memory.addressing_statistics(query)
    w0 = torch.softmax(torch.tensor([0.0, 0.0, 1.0, 0.0]), 0)  # position 0: cos = e_2
    w1 = torch.full((4,), 0.25)  # position 1: equal cosines -> uniform
    torch.testing.assert_close(stats["peak"][0], torch.stack([w0.max(), w1.max()]))
    entropy0 = -(w0 * w0.log()).sum() / math.log(4)
    torch.testing.assert_close(stats["entropy_ratio"][0], torch.stack([entropy0, torch.tensor(1.0)]))
    mean_v = values.mean(0)
    read0 = w0 @ values
    dev0 = (read0 - mean_v).norm() / read0.norm()
    torch.testing.assert_close(stats["recall_dev"][0], torch.stack([dev0, torch.tensor(0.0)]), atol=1e-6, rtol=1e-5)


def _raw_batches(count: int = 2, size: int = 80) -> list[ImageBatch]:
    torch.manual_seed(6)
    batches = []
    for _ in range(count):
        mask = torch.zeros(2, size, size, dtype=torch.bool)
        mask[1, 10:30, 10:30] = True
        batches.append(
            ImageBatch(image=torch.rand(2, 3, size, size), gt_mask=mask, gt_label=torch.tensor([False, True])),
        )
    return batches


def test_mechanism_report_matches_the_addressing_of_the_preprocessed_queries() -> None:
    torch.manual_seed(7)
    model = MemKD(
        backbone="resnet18",
        pre_trained=False,
        memory_size=(10, 20, 30),
        pre_processor=MemKD.configure_pre_processor(image_size=(SIZE, SIZE)),
    ).eval()
    batches = _raw_batches()  # 80 px raw images: the report must resize + normalise them itself
    report = memkd_mechanism_report(model, batches)
    peaks, entropies, deviations = [[], [], []], [[], [], []], [[], [], []]
    for batch in batches:
        images = model.pre_processor.transform(batch.image)
        for m, (memory, query) in enumerate(zip(model.model.memories, model.model.memory_queries(images), strict=True)):
            stats = memory.addressing_statistics(query)
            peaks[m].append(stats["peak"].flatten())
            entropies[m].append(stats["entropy_ratio"].flatten())
            deviations[m].append(stats["recall_dev"].flatten())
    for m, size in enumerate((10, 20, 30)):
        assert report[f"peak_weight_m{m}"] == pytest.approx(float(torch.cat(peaks[m]).mean()), rel=1e-5)
        assert report[f"entropy_ratio_m{m}"] == pytest.approx(float(torch.cat(entropies[m]).mean()), rel=1e-5)
        assert report[f"recall_dev_m{m}"] == pytest.approx(float(torch.cat(deviations[m]).mean()), rel=1e-5)
        assert report[f"uniform_peak_m{m}"] == pytest.approx(1 / size)
        assert 1 / size <= report[f"peak_weight_m{m}"] <= 1
        assert 0 <= report[f"entropy_ratio_m{m}"] <= 1
    assert all(isinstance(value, float) for value in report.values())
    # a memory whose values are all equal recalls their mean whatever the query: deviation 0
    with torch.no_grad():
        model.model.memories[0].values.copy_(torch.randn(1, 64).expand(10, -1))
    assert memkd_mechanism_report(model, batches[:1])["recall_dev_m0"] == pytest.approx(0.0, abs=1e-5)


# --------------------------------------------------------------------------- memory off
def test_memory_off_is_plain_rd_with_memkd_recipe() -> None:
    model = MemKD(
        backbone="resnet18",
        pre_trained=False,
        use_memory=False,
        pre_processor=MemKD.configure_pre_processor(image_size=(SIZE, SIZE)),
    )
    net = model.model
    assert type(net.decoder) is ResNetDecoder
    reference = get_decoder("resnet18")
    assert [p.shape for p in net.decoder.parameters()] == [p.shape for p in reference.parameters()]
    assert len(net.memories) == 0
    net.train()
    out = net(torch.randn(2, 3, SIZE, SIZE), torch.randn(2, 3, SIZE, SIZE))
    assert out.exemplar_features is None
    losses = model.loss(out.teacher_features, out.student_features, net.memories, out.exemplar_features)
    assert losses.nm.item() == 0.0
    assert losses.orth.item() == 0.0
    torch.testing.assert_close(losses.loss, losses.kd)
    assert memkd_mechanism_report(model, _raw_batches(1)) == {}
    net.eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, SIZE, SIZE)).anomaly_map.shape == (1, 1, SIZE, SIZE)
