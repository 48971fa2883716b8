"""The tables of ``quality``: ``results.md``, ``results.png`` and ``heatmaps.png`` from the ``results.csv`` rows.

The statistics are :mod:`.schema`'s, the files :mod:`.report`'s; the header lines and the figures' title of a
quality run are also the ablation report's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from anomalib_kd_tools.benchmark import ablation, paper_results, report, schema
from anomalib_kd_tools.benchmark.generator import GENERATED_CATEGORY
from anomalib_kd_tools.benchmark.schema import METRICS

MEAN_COLUMNS = (*METRICS, *schema.SPEED, "peak_memory_mb", "params_m", "train_time_s")  # the mean ± std table
OVER_CATEGORIES = (*METRICS, "latency_bs1_ms", "train_time_s")
RAW_COLUMNS = (*METRICS, "latency_bs1_ms", "peak_memory_mb", "train_time_s")
SCORES = "score (mean ± std over seeds)"


def hardware_line(rows: pd.DataFrame) -> str:
    gpus = rows.loc[rows["device"].astype(str).str.startswith("cuda"), "device_name"]
    return report.hardware(gpus, no_gpu="no GPU (all cells ran on the CPU)")


def finished_line(rows: pd.DataFrame) -> str:
    """``cells finished <first> to <last> UTC`` from the rows' ``finished_at``."""
    stamps = sorted(str(s) for s in rows.get("finished_at", pd.Series(dtype=str)).dropna() if s)
    if not stamps:
        return "cells finished ?"
    first, last = stamps[0][:16].replace("T", " "), stamps[-1][:16].replace("T", " ")
    return f"cells finished {first} UTC" if first == last else f"cells finished {first} to {last} UTC"


def dataset_line(rows: pd.DataFrame, config: dict[str, Any]) -> str:
    if config.get("dataset_kind") == "generated":
        spec = config.get("generated_spec") or {}
        return (
            "**generated** data (`anomalib_kd_tools.synthetic.make_mvtec_like_dataset`, categories "
            f"{', '.join(f'`{c}`' for c in spec.get('products') or [GENERATED_CATEGORY])}, {spec.get('n_train', '?')} "
            f"train / {spec.get('n_test_good', '?')} good + "
            f"{spec.get('n_test_per_defect', '?')} per defect type test images) - NOT MVTec AD or VisA: these numbers "
            "say nothing about the papers' results"
        )
    return f"user folder `{config.get('dataset')}` (MVTec layout), categories: {', '.join(sorted(set(rows.category)))}"


def plot_title(rows: pd.DataFrame, config: dict[str, Any]) -> str:
    kind = "GENERATED data (not MVTec AD)" if config.get("dataset_kind") == "generated" else str(config.get("dataset"))
    return f"{kind}, {ablation.teacher_label(config)}, {config.get('image_size')} px - {hardware_line(rows)}"


def _memory_line(rows: pd.DataFrame) -> str:
    kinds = set(rows.get("memory_kind", ()))
    parts = []
    if "cuda_max_allocated" in kinds:
        parts.append("GPU cells: `torch.cuda.max_memory_allocated` (tensors only)")
    if "cpu_peak_rss" in kinds:
        parts.append("CPU cells: peak resident set size of the cell's process, which includes the Python / torch / "
                     "anomalib runtime (~0.9 GB) and memory the C allocator keeps after it was freed, so it can differ "
                     "between runs of the same cell (seen: Patchcore's coreset loop at 1.2 or 5 GB)")
    return "; ".join(parts)


def write_markdown(path: Path, rows: pd.DataFrame | Sequence[dict[str, Any]], config: dict[str, Any]) -> str:
    """``results.md``: header, mean ± std per model and category, mean over categories, raw rows."""
    rows = pd.DataFrame(rows)
    speed = "`AnomalibModule.forward` (pre-processing + model + post-processing), eval, `torch.inference_mode`"
    tb = config.get("throughput_batch", 16)
    threads = sorted({schema.fmt_int(t) for t in rows["threads"]})
    lines = report.header(
        "Side-by-side benchmark: Patchcore, ReverseDistillation, Aand, MemKD",
        hardware_line(rows),
        finished_line(rows),
        [
            f"Dataset: {dataset_line(rows, config)}",
            f"Teacher weights: {ablation.teacher_label(config)}; image size {config.get('image_size')} px; batch size "
            f"{config.get('batch_size')}; seeds: {', '.join(str(s) for s in sorted(set(rows.seed)))}",
            f"Validation (thresholds / normalisation only): `{config.get('val_split')}` "
            f"(ratio {config.get('val_split_ratio')}, split seed {config.get('split_seed')}); no checkpoint selection "
            "(last epoch); AUROC / AUPRO on raw scores, F1 with the validation threshold",
            f"Speed: {speed}; latency at batch 1 (median), throughput at batch {tb}; CPU threads: "
            f"{', '.join(threads)}; OpenVINO: FP32 IR on the CPU with `INFERENCE_PRECISION_HINT=f32`",
            f"Peak memory: {_memory_line(rows)}",
            "Values: mean ± sample std over seeds (a single seed shows the value only)",
        ],
        interrupted=bool(config.get("interrupted")),
    )
    batch = {"throughput_ips": f"img/s bs{tb}", "ov_throughput_ips": f"OV img/s bs{tb}"}
    table = schema.mean_std_table(rows, ["category", "model"], MEAN_COLUMNS, labels=batch)
    first = rows.groupby(["category", "model"])[["backbone", "weights_tag"]].first()
    table = table.join(first, on=["category", "model"]).rename(columns={"weights_tag": "weights"})
    lines += ["## Mean ± std over seeds", ""]
    lines += report.markdown(table[["model", *table.columns.drop("model")]])  # model, category, ...
    categories = set(rows.category)
    if len(categories) > 1:
        title = f"## Mean over {len(categories)} categories (mean ± std over seeds of the per-seed category mean)"
        lines += ["", title, ""]
        lines += report.markdown(schema.mean_std_table(rows, ["model"], OVER_CATEGORIES, over_categories=True))
    lines += paper_results.markdown_lines(rows, config)
    lines += ["", "## Raw rows (results.csv)", ""]
    raw = rows.sort_values(["category", "model", "seed"], key=lambda c: c.map(schema.rank) if c.name == "model" else c)
    raw_table = pd.concat([raw[["model", "category", "seed"]], schema.formatted_values(raw, RAW_COLUMNS)], axis=1)
    raw_table[["schedule", "device"]] = raw[["schedule", "device"]]
    splits = raw[["n_train", "n_val", "n_test"]].to_numpy()
    raw_table["n train/val/test"] = ["/".join(map(schema.fmt_int, split)) for split in splits]
    lines += report.markdown(raw_table)
    if config.get("dataset_kind") == "generated":
        lines += ["", "Generated data: these numbers check the pipeline and measure speed; paper numbers need "
                  "ImageNet weights and MVTec AD / VisA (see docs/benchmarks.md)."]
    return report.write_text(path, lines)


def write_plot(path: Path, rows: pd.DataFrame | Sequence[dict[str, Any]], config: dict[str, Any]) -> None:
    """``results.png``: bars per metric per model (mean ± std over seeds) and latency vs image AUROC."""
    rows = pd.DataFrame(rows)
    stats = schema.aggregate(rows, ["model"], [*METRICS, "latency_bs1_ms"], over_categories=True)
    bars = report.Bars.of(stats, METRICS, SCORES, ylim=(0, 1.05))
    points = pd.DataFrame({"x": stats["latency_bs1_ms", "mean"], "x_error": stats["latency_bs1_ms", "std"]})
    points[["y", "y_error"]] = stats["image_auroc"][["mean", "std"]].to_numpy()
    scatter = report.Scatter(points, "latency, batch 1, torch (ms, log scale)", "image AUROC", xlog=True)
    report.write_png(path, [bars, scatter], plot_title(rows, config))


def write_heatmaps(path: Path, rows: pd.DataFrame, config: dict[str, Any], count: int) -> bool:
    """``heatmaps.png``: ``count`` test images (one category after the other) as rows, their ground truth and each
    model's post-processed map of the first seed as columns, one colour scale per row
    (:func:`anomalib_kd_tools.heatmaps.draw_side_by_side`), from the cells' ``heatmaps/<slug>.npz``
    (:func:`.job.save_heatmaps`). ``False`` when no category has the maps of every model."""
    import numpy as np

    from anomalib_kd_tools.benchmark.generator import Cell
    from anomalib_kd_tools.heatmaps import draw_side_by_side

    rows = pd.DataFrame(rows)
    seed = int(rows.seed.min())
    models = sorted(set(rows.model), key=schema.rank)
    per_category = []
    for category in dict.fromkeys(rows.category):
        files = [path.parent / "heatmaps" / f"{Cell(m, category, seed).slug}.npz" for m in models]
        if all(f.exists() for f in files):
            loaded = [dict(np.load(f)) for f in files]
            if all(list(d["paths"]) == list(loaded[0]["paths"]) for d in loaded):  # the same images for every model
                per_category.append(loaded)
    depth = max((len(c[0]["paths"]) for c in per_category), default=0)
    picks = [(c, k) for k in range(depth) for c in per_category if k < len(c[0]["paths"])][:count]
    if not picks:
        return False
    images = [c[0]["images"][k].astype(np.float32) for c, k in picks]
    masks = [c[0]["masks"][k] for c, k in picks]
    maps = {model: [c[i]["maps"][k] for c, k in picks] for i, model in enumerate(models)}
    kind = "generated data, not MVTec AD" if config.get("dataset_kind") == "generated" else str(config.get("dataset"))
    title = (f"{ablation.teacher_label(config)}, {kind}, seed {seed}: post-processed maps (validation threshold = "
             "0.5), one colour scale per row")
    draw_side_by_side(images, masks, maps, path, row_labels=[str(c[0]["labels"][k]) for c, k in picks], title=title)
    return True
