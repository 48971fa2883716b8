"""What the papers' metrics add to test time: anomalib's default test metrics against the models' default evaluator.

Times ``update`` over a test set of ``--images`` images (anomaly maps at ``--size`` px, one rectangular defect on
every other image, random maps) plus one ``compute``, for anomalib's default test metrics (image / pixel AUROC and
F1) and for ``KDModelBase.configure_evaluator()`` (those plus image / pixel AUPR and pixel AUPRO at FPR 0.3). Only
the metrics are timed: the model's forward pass is the same for both. Prints a markdown table::

    OMP_NUM_THREADS=2 python benchmarks/metrics_cost.py --images 150 --size 256
"""

from __future__ import annotations

import argparse
import time

import torch
from anomalib.data import ImageBatch
from anomalib.models.components import AnomalibModule

from anomalib_kd_base.model import KDModelBase


def _batches(images: int, size: int, batch: int) -> list[ImageBatch]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for start in range(0, images, batch):
        n = min(batch, images - start)
        mask = torch.zeros(n, size, size, dtype=torch.bool)
        for i in range(0, n, 2):
            top, left = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            mask[i, top : top + size // 8, left : left + size // 6] = True
        amap = torch.rand(n, size, size, generator=generator) + 0.5 * mask.float()
        score = amap.flatten(1).amax(dim=1)
        label = mask.flatten(1).any(dim=1)
        out.append(ImageBatch(image=torch.zeros(n, 3, 1, 1), gt_mask=mask, gt_label=label, anomaly_map=amap,
                              pred_score=score, pred_label=score > 1.2, pred_mask=amap > 1.2))  # fmt: skip
    return out


def _time(metrics: list, batches: list[ImageBatch]) -> float:
    start = time.perf_counter()
    for metric in metrics:
        metric.reset()
        for batch in batches:
            metric.update(batch)
        metric.compute()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=150, help="test images (an MVTec AD category has 40-170)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    batches = _batches(args.images, args.size, args.batch)
    rows = []
    for name, evaluator in (("anomalib default", AnomalibModule.configure_evaluator()),
                            ("papers' metrics (default here)", KDModelBase.configure_evaluator())):  # fmt: skip
        metrics = list(evaluator.test_metrics)
        seconds = min(_time(metrics, batches) for _ in range(args.repeats))
        rows.append((name, ", ".join(m.name for m in metrics), seconds))
    print(f"| evaluator ({args.images} images, {args.size} px, {torch.get_num_threads()} threads) | metrics | seconds |")
    print("|---|---|---|")
    for name, names, seconds in rows:
        print(f"| {name} | {names} | {seconds:.2f} |")
    print(f"\nadded by AUPR + AUPRO: {rows[1][2] - rows[0][2]:.2f} s per test run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
