"""Both models evaluate with the papers' metrics by default (AUROC, F1, AUPR and PRO at an FPR limit of 0.3)."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.metrics import AUPRO

from anomalib_aand import Aand
from anomalib_memkd import MemKD

EXPECTED = {
    "image_AUROC", "image_F1Score", "image_AUPR",
    "pixel_AUROC", "pixel_F1Score", "pixel_AUPR", "pixel_AUPRO",
}  # fmt: skip


@pytest.mark.parametrize("cls", [Aand, MemKD])
def test_default_evaluator_has_the_papers_metrics(cls: type) -> None:
    params = {"backbone": "resnet18", "pre_trained": False, "pre_processor": cls.configure_pre_processor((64, 64))}
    if cls is Aand:
        params.update(memory_size=4, anomaly_source_path=None)
    model = cls(**params)
    metrics = {metric.name: metric for metric in model.evaluator.test_metrics}
    assert set(metrics) == EXPECTED
    aupro = metrics["pixel_AUPRO"]
    assert isinstance(aupro, AUPRO)
    assert float(aupro.fpr_limit) == pytest.approx(0.3)  # the PRO limit of both papers (Bergmann et al.)
    # image metrics read the image score, pixel metrics the map: a swapped field would score the wrong tensor
    assert metrics["image_AUPR"].fields == ["pred_score", "gt_label"]
    assert metrics["pixel_AUPR"].fields == ["anomaly_map", "gt_mask"]
    assert aupro.fields == ["anomaly_map", "gt_mask"]


def test_default_pixel_aupro_scores_a_perfect_and_a_useless_map() -> None:
    """The configured AUPRO is a working metric on a batch: 1 for the mask itself, low for an inverted map."""
    metric = {m.name: m for m in Aand.configure_evaluator().test_metrics}["pixel_AUPRO"]
    mask = torch.zeros(2, 32, 32, dtype=torch.bool)
    mask[0, 4:12, 4:12] = True
    mask[1, 20:28, 8:16] = True
    batch = ImageBatch(image=torch.rand(2, 3, 32, 32), gt_mask=mask, anomaly_map=mask.float())
    metric.update(batch)
    assert float(metric.compute()) == pytest.approx(1.0, abs=1e-3)
    metric.reset()
    metric.update(ImageBatch(image=torch.rand(2, 3, 32, 32), gt_mask=mask, anomaly_map=1.0 - mask.float()))
    assert float(metric.compute()) < 0.1
