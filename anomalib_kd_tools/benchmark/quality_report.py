"""The tables of ``anomalib-kd-benchmark quality``: ``results.md`` and ``results.png`` from the ``results.csv`` rows.

Aggregation over seeds (:func:`aggregate`, per model and category; :func:`aggregate_over_categories`, per model) and
the content of the two files; the files themselves are written by :mod:`.report` (the header every table shares,
markdown tables, the figure). The header lines of a quality run (:func:`hardware_line`, :func:`finished_line`,
:func:`dataset_line`) are also the ablation report's (:mod:`.ablation_report`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib_kd_tools.benchmark import ablation, paper_results, report
from anomalib_kd_tools.benchmark.generator import GENERATED_CATEGORY, model_order
from anomalib_kd_tools.benchmark.job import METRIC_LABELS, METRICS, NUMERIC


# ---------------------------------------------------------------------------------------------- aggregation
def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, category): mean / std / n over seeds of every numeric column, in model order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["category"]), []).append(row)
    out = []
    for (model, category), members in sorted(groups.items(), key=lambda kv: (kv[0][1], model_order(kv[0][0]))):
        summary: dict[str, Any] = {
            "model": model,
            "category": category,
            "seeds": sorted(int(r["seed"]) for r in members),
            "backbone": members[0]["backbone"],
            "weights_tag": members[0]["weights_tag"],
            "schedule": members[0]["schedule"],
        }
        for key in NUMERIC:
            summary[key] = report.mean_std(r[key] for r in members)
        out.append(summary)
    return out


def aggregate_over_categories(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model: for each seed the mean over categories, then mean / std / n over seeds."""
    per_model: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for row in rows:
        per_model.setdefault(row["model"], {}).setdefault(int(row["seed"]), []).append(row)
    out = []
    for model in sorted(per_model, key=model_order):
        by_seed = per_model[model]
        summary: dict[str, Any] = {"model": model, "seeds": sorted(by_seed)}
        for key in NUMERIC:
            per_seed = [report.mean_std(r[key] for r in members)[0] for members in by_seed.values()]
            summary[key] = report.mean_std(per_seed)
        summary["categories"] = sorted({r["category"] for members in by_seed.values() for r in members})
        out.append(summary)
    return out


# ---------------------------------------------------------------------------------------------- results.md / .png
def hardware_line(rows: Sequence[dict[str, Any]]) -> str:
    gpus = {r["device_name"] for r in rows if str(r.get("device", "")).startswith("cuda")}
    return report.hardware(gpus, no_gpu="no GPU (all cells ran on the CPU)")


def finished_line(rows: Sequence[dict[str, Any]]) -> str:
    """``cells finished <first> to <last> UTC`` from the rows' ``finished_at``."""
    stamps = sorted(str(r.get("finished_at", "")) for r in rows if r.get("finished_at"))
    if not stamps:
        return "cells finished ?"
    first, last = stamps[0][:16].replace("T", " "), stamps[-1][:16].replace("T", " ")
    return f"cells finished {first} UTC" if first == last else f"cells finished {first} to {last} UTC"


def dataset_line(rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> str:
    if config.get("dataset_kind") == "generated":
        spec = config.get("generated_spec") or {}
        return (
            "**generated** data (`anomalib_kd_tools.synthetic.make_mvtec_like_dataset`, category "
            f"`{GENERATED_CATEGORY}`, {spec.get('n_train', '?')} train / {spec.get('n_test_good', '?')} good + "
            f"{spec.get('n_test_per_defect', '?')} per defect type test images) - NOT MVTec AD or VisA: these numbers "
            "say nothing about the papers' results"
        )
    categories = sorted({r["category"] for r in rows})
    return f"user folder `{config.get('dataset')}` (MVTec layout), categories: {', '.join(categories)}"


def _memory_line(rows: Sequence[dict[str, Any]]) -> str:
    kinds = {r.get("memory_kind") for r in rows}
    parts = []
    if "cuda_max_allocated" in kinds:
        parts.append("GPU cells: `torch.cuda.max_memory_allocated` (tensors only)")
    if "cpu_peak_rss" in kinds:
        parts.append(
            "CPU cells: peak resident set size of the cell's process, which includes the Python / torch / anomalib "
            "runtime (~0.9 GB) and memory the C allocator keeps after it was freed, so it can differ between runs "
            "of the same cell (seen: Patchcore's coreset loop at 1.2 or 5 GB)",
        )
    return "; ".join(parts)


def write_markdown(path: Path, rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> str:
    """``results.md``: header, mean ± std per model and category, mean over categories, raw rows."""
    fmt, ms = report.fmt, report.format_mean_std
    speed = "`AnomalibModule.forward` (pre-processing + model + post-processing), eval, `torch.inference_mode`"
    tb = config.get("throughput_batch", 16)
    threads = sorted({report.fmt_int(r["threads"]) for r in rows})
    lines = report.header(
        "Side-by-side benchmark: Patchcore, ReverseDistillation, Aand, MemKD",
        hardware_line(rows),
        finished_line(rows),
        [
            f"Dataset: {dataset_line(rows, config)}",
            f"Teacher weights: {ablation.teacher_label(config)}; image size {config.get('image_size')} px; batch size "
            f"{config.get('batch_size')}; seeds: {', '.join(str(s) for s in sorted({r['seed'] for r in rows}))}",
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
    columns = ["model", "category", "seeds", "image AUROC", "pixel AUROC", "AUPRO", "image F1", "latency bs1 ms"]
    columns += [f"img/s bs{tb}", "OV latency bs1 ms", f"OV img/s bs{tb}", "peak mem MB", "params M", "train s"]
    lines += ["## Mean ± std over seeds", ""]
    lines += report.table(
        [*columns, "backbone", "weights"],
        (
            [s["model"], s["category"], len(s["seeds"]), *(ms(s[m]) for m in METRICS), ms(s["latency_bs1_ms"], 1)]
            + [ms(s["throughput_ips"], 1), ms(s["ov_latency_bs1_ms"], 1), ms(s["ov_throughput_ips"], 1)]
            + [ms(s["peak_memory_mb"], 0), ms(s["params_m"], 2), ms(s["train_time_s"], 1), s["backbone"]]
            + [s["weights_tag"]]
            for s in aggregate(rows)
        ),
    )
    categories = {r["category"] for r in rows}
    if len(categories) > 1:
        title = f"## Mean over {len(categories)} categories (mean ± std over seeds of the per-seed category mean)"
        lines += ["", title, ""]
        lines += report.table(
            ["model", "seeds", "image AUROC", "pixel AUROC", "AUPRO", "image F1", "latency bs1 ms", "train s"],
            (
                [s["model"], len(s["seeds"]), *(ms(s[m]) for m in METRICS)]
                + [ms(s["latency_bs1_ms"], 1), ms(s["train_time_s"], 1)]
                for s in aggregate_over_categories(rows)
            ),
        )
    lines += paper_results.markdown_lines(rows, config)
    lines += ["", "## Raw rows (results.csv)", ""]
    n = report.fmt_int
    lines += report.table(
        ["model", "category", "seed", "image AUROC", "pixel AUROC", "AUPRO", "image F1", "latency bs1 ms"]
        + ["peak mem MB", "train s", "schedule", "device", "n train/val/test"],
        (
            [r["model"], r["category"], r["seed"], *(fmt(r[m], 3) for m in METRICS), fmt(r["latency_bs1_ms"], 1)]
            + [fmt(r["peak_memory_mb"], 0), fmt(r["train_time_s"], 1), r["schedule"], r["device"]]
            + [f"{n(r['n_train'])}/{n(r['n_val'])}/{n(r['n_test'])}"]
            for r in sorted(rows, key=lambda r: (r["category"], model_order(r["model"]), r["seed"]))
        ),
    )
    if config.get("dataset_kind") == "generated":
        lines += [
            "",
            "Generated data: these numbers check the pipeline and measure speed; paper numbers need ImageNet "
            "weights and MVTec AD / VisA (see docs/benchmarks.md).",
        ]
    return report.write_text(path, lines)


def write_plot(path: Path, rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> None:
    """``results.png``: bars per metric per model (mean ± std over seeds) and latency vs image AUROC."""
    summaries = aggregate_over_categories(rows)
    bars = report.Bars(
        labels=[METRIC_LABELS[m] for m in METRICS],
        series={s["model"]: [s[m][:2] for m in METRICS] for s in summaries},
        ylabel="score (mean ± std over seeds)",
        ylim=(0, 1.05),
    )
    scatter = report.Scatter(
        points={s["model"]: (*s["latency_bs1_ms"][:2], *s["image_auroc"][:2]) for s in summaries},
        xlabel="latency, batch 1, torch (ms, log scale)",
        ylabel="image AUROC",
        xlog=True,
    )
    kind = "GENERATED data (not MVTec AD)" if config.get("dataset_kind") == "generated" else str(config.get("dataset"))
    title = f"{kind}, {ablation.teacher_label(config)}, {config.get('image_size')} px - {hardware_line(rows)}"
    report.write_png(path, [bars, scatter], title)


__all__ = ["aggregate", "aggregate_over_categories", "write_markdown", "write_plot"]
