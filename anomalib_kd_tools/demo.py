"""Offline demo: generate an MVTec-layout dataset, train AAND and MemKD on the CPU, test, report.

Nothing is downloaded: the teacher is randomly initialised (``pre_trained=False``), the backbone is
``resnet18`` and images are small, so this shows the pipeline end to end in a few minutes on 2 CPU
cores. The metrics are for the generated data only; paper numbers need ImageNet weights and
MVTec AD / VisA (see docs/benchmarks.md).

    anomalib-kd-demo                     # both models, defaults below
    anomalib-kd-demo --models aand --output demo_output
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _train_and_test(name: str, data_root: Path, output: Path, args: argparse.Namespace) -> dict:
    import torch

    from anomalib_kd_tools.fit import cpu_engine, folder_datamodule

    torch.manual_seed(args.seed)
    image_size = (args.image_size, args.image_size)
    common = {"backbone": args.backbone, "pre_trained": False}
    engine_kwargs: dict = {}
    if name == "aand":
        from anomalib_aand import Aand

        model = Aand(
            **common,
            stage1_epochs=args.stage1_epochs,
            stage2_epochs=args.stage2_epochs,
            pre_processor=Aand.configure_pre_processor(image_size=image_size),
        )
    else:
        from anomalib_memkd import MemKD

        model = MemKD(
            **common,
            num_exemplars=args.exemplars,
            epochs=args.memkd_epochs,
            pre_processor=MemKD.configure_pre_processor(image_size=image_size),
        )
    datamodule = folder_datamodule(data_root, args.category, args.batch_size, args.seed)
    engine = cpu_engine(output / name, **engine_kwargs)
    start = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    fit_s = time.perf_counter() - start
    results = engine.test(model, datamodule=datamodule)[0]
    images_dir = next((p for p in (output / name).rglob("images") if p.is_dir()), None)
    return {
        "model": type(model).__name__,
        "fit_seconds": round(fit_s, 1),
        **{k: round(float(v), 4) for k, v in results.items()},
        "checkpoint": str(engine.best_model_path) if engine.best_model_path else None,
        "heat_maps": str(images_dir) if images_dir else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="anomalib-kd offline demo (generated data, CPU).")
    parser.add_argument("--output", type=Path, default=Path("demo_output"))
    parser.add_argument("--models", nargs="+", default=["aand", "memkd"], choices=["aand", "memkd"])
    parser.add_argument("--category", default="widget")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--stage1-epochs", type=int, default=4)
    parser.add_argument("--stage2-epochs", type=int, default=6)
    parser.add_argument("--memkd-epochs", type=int, default=8)
    parser.add_argument("--exemplars", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from anomalib_kd_tools.synthetic import make_mvtec_like_dataset

    start = time.perf_counter()
    data_root = args.output / "data"
    make_mvtec_like_dataset(
        data_root,
        category=args.category,
        image_size=args.image_size,
        n_train=args.n_train,
        n_test_good=12,
        n_test_per_defect=6,
        seed=args.seed,
    )
    print(f"generated MVTec-layout data in {data_root / args.category}")
    summary = [_train_and_test(name, data_root, args.output, args) for name in args.models]
    total = time.perf_counter() - start

    keys = ["model", "image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score", "fit_seconds"]
    print("\nanomalib-kd demo - generated data (not MVTec AD), random-init resnet18, CPU")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in summary:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    for row in summary:
        print(f"{row['model']}: heat maps in {row['heat_maps']}, checkpoint {row['checkpoint']}")
    (args.output / "summary.json").write_text(json.dumps({"total_seconds": round(total, 1), "runs": summary}, indent=2))
    print(f"total {total:.0f} s; summary written to {args.output / 'summary.json'}")


if __name__ == "__main__":
    main()
