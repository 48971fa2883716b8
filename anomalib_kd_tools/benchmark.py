"""Side-by-side benchmark: Patchcore, ReverseDistillation, Aand and MemKD on the same data and seeds.

``anomalib-kd-benchmark`` (or ``python -m anomalib_kd_tools.benchmark``) runs a grid of cells - one cell is one
(model, category, seed) - and writes to ``--output``:

* ``results.csv`` - one row per finished cell, appended as soon as the cell ends. A re-run with the same
  ``--output`` skips the cells already in it (resumable); ``run_config.json`` guards against mixing settings.
* ``results.md`` - mean ± std over seeds per model and category (and over categories), then the raw rows, under a
  header naming the dataset kind (``generated`` or a user folder), the hardware, the date and the versions.
* ``results.png`` - bars per metric per model (mean ± std over seeds) and inference latency vs image AUROC.
* ``paper_comparison.csv`` (MVTec AD / VisA only, ``--dataset-name``) - the AAND / MemKD papers' published numbers
  for Aand, MemKD and RD beside the measured ones, with the delta; also a section of ``results.md``
  (:mod:`anomalib_kd_tools.paper_results`).
* ``logs/<model>_<category>_seed<k>.log`` - each cell's own output.

Data: ``--dataset-root DIR`` (MVTec AD layout: ``DIR/<category>/train/good``, ``test/<defect>``,
``ground_truth/<defect>``; ``--categories`` picks some) or ``--generated`` (a small MVTec-layout dataset written
by :func:`anomalib_kd_tools.synthetic.make_mvtec_like_dataset` into ``--output``/data; every output says "generated").

Protocol (the same for the four models):

* Each cell runs in a fresh child process, seeds itself from its own seed only (``seed_everything(seed,
  workers=True)``) and runs with deterministic algorithms (``Trainer(deterministic="warn")``, cuDNN benchmark
  off, ``CUBLAS_WORKSPACE_CONFIG``), so a cell gives the same numbers wherever it is placed.
* Training: the models' own schedules (paper defaults: Patchcore one pass to fill its memory bank,
  ReverseDistillation 200 epochs, MemKD 100, Aand 100 + 120), scaled with ``--epochs`` / ``--aand-stage-epochs``.
  No validation during training and no checkpoint selection: the last epoch is the model.
* Validation, only for the image / pixel thresholds and the normalisation statistics of anomalib's
  post-processor: ``--val-split from_test`` (default) holds out a label-stratified ``--val-split-ratio`` share of
  the test images with a fixed ``--split-seed`` (the same images for every model and seed) and the metrics are
  computed on the remaining test images only; ``synthetic`` instead uses anomalib's Perlin-noise anomalies on a
  held-out share of the training images and keeps the whole test set. anomalib's default (validation = test set)
  is not offered: its thresholds would be chosen on the test labels.
* Metrics on the test images: image AUROC, pixel AUROC and AUPRO (FPR limit 0.3) on the models' *raw* scores and
  anomaly maps (before anomalib's min-max normalisation, whose clamp to [0, 1] depends on the validation
  statistics and creates ties), image F1 of the thresholded labels (threshold from the validation split).
* Speed: the whole ``AnomalibModule.forward`` (pre-processing + model + post-processing) in eval mode under
  ``torch.inference_mode`` on a float32 ``[B, 3, S, S]`` batch of test images: latency at batch size 1 (median of
  ``--timing-runs`` calls after ``--warmup`` calls) and throughput at batch size ``--throughput-batch`` (images/s,
  median batch time). With OpenVINO installed (``--openvino``) the same module is exported with
  ``to_openvino`` and timed on the CPU with ``INFERENCE_PRECISION_HINT=f32`` (without it the CPU plugin may run
  bf16 silently).
* Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` of the cell; on CPU the peak resident set size of
  the cell's process, which includes the Python / torch / anomalib runtime (~0.9 GB) and whatever the C allocator
  keeps after a free (glibc sometimes keeps GBs after Patchcore's coreset loop: the same cell measured 1.2 GB in
  one run and 5 GB in another; the other columns do not vary like this).
* Parameter count of the torch model (frozen teacher included; Patchcore's memory bank is a buffer, counted in
  ``state_mb``), training wall time (``Engine.fit``), seed, backbone and the resolved weights tag.

Devices (``--devices``): ``auto`` uses every visible CUDA GPU (else the CPU), ``N`` the first N GPUs, ``0,2`` those
GPUs, ``cpu`` the CPU. Cells run one per GPU at a time, each in its own process with ``CUDA_VISIBLE_DEVICES`` set
to its GPU; on the CPU they run one after the other.

Numbers on generated data with random-init backbones only show that the pipeline works and how fast it is;
paper numbers need ImageNet weights (``--pre-trained``, the default) and MVTec AD / VisA.

``--ablation aand|memkd|all`` runs the ablation variants instead of ``--models`` (cells are (variant, category,
seed); ``--proxy-teacher``, ``--texture-dir``, ``--defects``: see :mod:`anomalib_kd_tools.ablation`).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalib_kd_tools import ablation, paper_results

MODELS = ("Patchcore", "ReverseDistillation", "Aand", "MemKD")
# Paper / reference schedule lengths (epochs). Patchcore: one pass (anomalib pins max_epochs=1).
PAPER_EPOCHS = {"ReverseDistillation": 200, "MemKD": 100}
PAPER_AAND_STAGES = (100, 120)
DEFAULT_BACKBONE = {
    "Patchcore": "wide_resnet50_2",  # anomalib's defaults (timm's default tag)
    "ReverseDistillation": "wide_resnet50_2",
    "Aand": "wide_resnet50_2.tv_in1k",  # torchvision ImageNet-V1 weights, as in the papers
    "MemKD": "wide_resnet50_2.tv_in1k",
}
GENERATED_CATEGORY = "widget"
METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1")
METRIC_LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO", "image_f1": "image F1"}
NUMERIC = (
    *METRICS,
    "latency_bs1_ms",
    "throughput_ips",
    "ov_latency_bs1_ms",
    "ov_throughput_ips",
    "peak_memory_mb",
    "params_m",
    "trainable_params_m",
    "state_mb",
    "train_time_s",
)
COLUMNS = (
    "dataset_kind",
    "dataset",
    "category",
    "model",
    "seed",
    *NUMERIC,
    "memory_kind",
    "throughput_batch",
    "threads",
    "backbone",
    "weights_tag",
    "image_size",
    "schedule",
    "val_split",
    "n_train",
    "n_val",
    "n_test",
    "device",
    "device_name",
    "finished_at",
)
# Settings that change the numbers of a cell: a results.csv made with other values must not be extended.
RUN_CONFIG_KEYS = (
    "dataset_kind",
    "dataset",
    "image_size",
    "backbone",
    "pre_trained",
    "epochs",
    "aand_stage_epochs",
    "batch_size",
    "coreset_ratio",
    "val_split",
    "val_split_ratio",
    "split_seed",
    "openvino",
    "throughput_batch",
    "threads",
    "generated_spec",
    # ablation mode (anomalib_kd_tools.ablation); absent from older run configs, where they mean "off"
    "ablation",
    "proxy_teacher",
    "texture_dir",
    "texture_spec",
    "aand_foreground",
)
# An ablation's results.csv: the cell is (variant, category, seed); ``model`` stays the model class.
ABLATION_COLUMNS = (*COLUMNS[:4], "variant", *COLUMNS[4:], "teacher", "overrides", "mechanism_status", "mechanism")


# ---------------------------------------------------------------------------------------------- the grid
@dataclass(frozen=True, order=True)
class Cell:
    """One unit of the grid: a model trained and evaluated on one category with one seed."""

    model: str
    category: str
    seed: int

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.model, self.category, self.seed)

    @property
    def name(self) -> str:
        return f"{self.model}/{self.category}/seed{self.seed}"

    @property
    def slug(self) -> str:
        model = re.sub(r"[^A-Za-z0-9.+-]+", "-", self.model)  # ablation variants: "AAND stage1=0"
        return f"{model}_{self.category}_seed{self.seed}"


def make_cells(models: Sequence[str], categories: Sequence[str], seeds: Sequence[int]) -> list[Cell]:
    """All (model, category, seed) cells, category-major so that early results cover every model."""
    return [Cell(m, c, s) for c in categories for s in seeds for m in models]


def resolve_devices(spec: str, cuda_count: int | None = None) -> list[str]:
    """``auto`` | ``cpu`` | ``N`` | ``i,j,...`` -> device slots: ``["cpu"]`` or ``["cuda:0", "cuda:1", ...]``."""
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count()
    spec = str(spec).strip().lower()
    if spec == "cpu" or (spec == "auto" and cuda_count == 0):
        return ["cpu"]
    if spec == "auto":
        return [f"cuda:{i}" for i in range(cuda_count)]
    if "," in spec or spec.startswith("cuda:"):
        indices = [int(part.removeprefix("cuda:")) for part in spec.split(",") if part.strip()]
    else:
        count = int(spec)
        if count < 1:
            msg = f"--devices {spec}: need at least one device"
            raise ValueError(msg)
        indices = list(range(count))
    missing = [i for i in indices if i >= cuda_count]
    if missing or len(set(indices)) != len(indices):
        msg = f"--devices {spec}: {cuda_count} CUDA GPU(s) visible, cannot use {indices}"
        raise ValueError(msg)
    return [f"cuda:{i}" for i in indices]


def run_schedule(
    cells: Iterable[Cell],
    devices: Sequence[str],
    start: Callable[[Cell, str], Any],
    on_start: Callable[[Cell, str], None] | None = None,
    on_finish: Callable[[Cell, str, Any], None] | None = None,
    poll_interval: float = 0.2,
) -> None:
    """Run ``cells`` with at most one cell per device at a time, in order, until all are done.

    ``start(cell, device)`` launches a cell and returns a handle whose ``poll()`` returns ``None`` while the
    cell runs and its outcome when it has ended; ``on_finish(cell, device, outcome)`` gets that outcome.
    """
    pending = deque(cells)
    running: dict[str, tuple[Cell, Any]] = {}
    while pending or running:
        for device in devices:
            if device not in running and pending:
                cell = pending.popleft()
                running[device] = (cell, start(cell, device))
                if on_start is not None:
                    on_start(cell, device)
        ended = False
        for device, (cell, handle) in list(running.items()):
            outcome = handle.poll()
            if outcome is not None:
                del running[device]
                ended = True
                if on_finish is not None:
                    on_finish(cell, device, outcome)
        if not ended and running:
            time.sleep(poll_interval)


# ---------------------------------------------------------------------------------------------- results files
def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of ``results.csv`` with numbers parsed (missing values become ``nan``)."""
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        row["seed"] = int(row["seed"])
        for key in (*NUMERIC, "image_size", "n_train", "n_val", "n_test", "throughput_batch", "threads"):
            value = row.get(key, "")
            row[key] = float(value) if value not in ("", None) else math.nan
    return rows


def append_row(path: Path, row: dict[str, Any], columns: Sequence[str] = COLUMNS) -> None:
    """Append one finished cell to ``results.csv`` (header on first write), flushed to disk at once."""
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({key: _csv_value(row.get(key)) for key in columns})
        file.flush()
        os.fsync(file.fileno())


def _csv_value(value: Any) -> Any:  # noqa: ANN401
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def row_key(row: dict[str, Any]) -> tuple[str, str, int]:
    """The cell of a row: (variant or model, category, seed)."""
    return (row.get("variant") or row["model"], row["category"], int(row["seed"]))


def done_keys(rows: Iterable[dict[str, Any]]) -> set[tuple[str, str, int]]:
    return {row_key(row) for row in rows}


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (``nan`` for a single value) and count of the finite values."""
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not finite:
        return math.nan, math.nan, 0
    std = statistics.stdev(finite) if len(finite) > 1 else math.nan
    return statistics.fmean(finite), std, len(finite)


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, category): mean / std / n over seeds of every numeric column, in model order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["category"]), []).append(row)
    out = []
    for (model, category), members in sorted(groups.items(), key=lambda kv: (kv[0][1], _model_order(kv[0][0]))):
        summary: dict[str, Any] = {
            "model": model,
            "category": category,
            "seeds": sorted(int(r["seed"]) for r in members),
            "backbone": members[0]["backbone"],
            "weights_tag": members[0]["weights_tag"],
            "schedule": members[0]["schedule"],
        }
        for key in NUMERIC:
            summary[key] = mean_std(r[key] for r in members)
        out.append(summary)
    return out


def aggregate_over_categories(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model: for each seed the mean over categories, then mean / std / n over seeds."""
    per_model: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for row in rows:
        per_model.setdefault(row["model"], {}).setdefault(int(row["seed"]), []).append(row)
    out = []
    for model in sorted(per_model, key=_model_order):
        by_seed = per_model[model]
        summary: dict[str, Any] = {"model": model, "seeds": sorted(by_seed)}
        for key in NUMERIC:
            per_seed = [mean_std(r[key] for r in members)[0] for members in by_seed.values()]
            summary[key] = mean_std(per_seed)
        summary["categories"] = sorted({r["category"] for members in by_seed.values() for r in members})
        out.append(summary)
    return out


def _model_order(model: str) -> tuple[int, str]:
    return (MODELS.index(model) if model in MODELS else len(MODELS), model)


def format_mean_std(stat: tuple[float, float, int], digits: int = 3) -> str:
    mean, std, n = stat
    if n == 0:
        return "–"
    if n == 1 or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# ---------------------------------------------------------------------------------------------- report
def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for package in ("anomalib", "torch", "lightning", "timm", "openvino", "anomalib-kd"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            continue
    return ", ".join(parts)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_line(rows: Sequence[dict[str, Any]]) -> str:
    gpus = sorted({r["device_name"] for r in rows if str(r.get("device", "")).startswith("cuda")})
    cpu = f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs)"
    return f"{cpu}; GPU: {', '.join(gpus)}" if gpus else f"{cpu}; no GPU (all cells ran on the CPU)"


def _dataset_line(rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> str:
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


def write_markdown(path: Path, rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> str:
    """``results.md``: header, mean ± std per model and category, mean over categories, raw rows."""
    weights = ablation.teacher_label(config)
    speed = "`AnomalibModule.forward` (pre-processing + model + post-processing), eval, `torch.inference_mode`"
    tb = config.get("throughput_batch", 16)
    threads = sorted({_int(r["threads"]) for r in rows})
    lines = [
        "# Side-by-side benchmark: Patchcore, ReverseDistillation, Aand, MemKD",
        "",
        f"- Dataset: {_dataset_line(rows, config)}",
        f"- Hardware: {hardware_line(rows)}",
        f"- Date: cells finished {_when(rows)}; versions: {_versions()}",
        f"- Teacher weights: {weights}; image size {config.get('image_size')} px; batch size "
        f"{config.get('batch_size')}; seeds: {', '.join(str(s) for s in sorted({r['seed'] for r in rows}))}",
        f"- Validation (thresholds / normalisation only): `{config.get('val_split')}` "
        f"(ratio {config.get('val_split_ratio')}, split seed {config.get('split_seed')}); no checkpoint selection "
        "(last epoch); AUROC / AUPRO on raw scores, F1 with the validation threshold",
        f"- Speed: {speed}; latency at batch 1 (median), throughput at batch {tb}; CPU threads: "
        f"{', '.join(threads)}; OpenVINO: FP32 IR on the CPU with `INFERENCE_PRECISION_HINT=f32`",
        f"- Peak memory: {_memory_line(rows)}",
        "- Values: mean ± sample std over seeds (a single seed shows the value only)",
        "",
    ]
    header = (
        "| model | category | seeds | image AUROC | pixel AUROC | AUPRO | image F1 | latency bs1 ms | "
        f"img/s bs{tb} | OV latency bs1 ms | OV img/s bs{tb} | peak mem MB | params M | train s | backbone | weights |"
    )
    lines += ["## Mean ± std over seeds", "", header, "|" + "---|" * 16]
    for s in aggregate(rows):
        lines.append(
            f"| {s['model']} | {s['category']} | {len(s['seeds'])} | "
            + " | ".join(format_mean_std(s[m]) for m in METRICS)
            + f" | {format_mean_std(s['latency_bs1_ms'], 1)} | {format_mean_std(s['throughput_ips'], 1)}"
            + f" | {format_mean_std(s['ov_latency_bs1_ms'], 1)} | {format_mean_std(s['ov_throughput_ips'], 1)}"
            + f" | {format_mean_std(s['peak_memory_mb'], 0)} | {format_mean_std(s['params_m'], 2)}"
            + f" | {format_mean_std(s['train_time_s'], 1)} | {s['backbone']} | {s['weights_tag']} |"
        )
    categories = {r["category"] for r in rows}
    if len(categories) > 1:
        lines += [
            "",
            f"## Mean over {len(categories)} categories (mean ± std over seeds of the per-seed category mean)",
            "",
            "| model | seeds | image AUROC | pixel AUROC | AUPRO | image F1 | latency bs1 ms | train s |",
            "|" + "---|" * 8,
        ]
        for s in aggregate_over_categories(rows):
            lines.append(
                f"| {s['model']} | {len(s['seeds'])} | "
                + " | ".join(format_mean_std(s[m]) for m in METRICS)
                + f" | {format_mean_std(s['latency_bs1_ms'], 1)} | {format_mean_std(s['train_time_s'], 1)} |"
            )
    lines += paper_results.markdown_lines(rows, config)
    lines += [
        "",
        "## Raw rows (results.csv)",
        "",
        "| model | category | seed | image AUROC | pixel AUROC | AUPRO | image F1 | latency bs1 ms | peak mem MB | "
        "train s | schedule | device | n train/val/test |",
        "|" + "---|" * 13,
    ]
    for r in sorted(rows, key=lambda r: (r["category"], _model_order(r["model"]), r["seed"])):
        lines.append(
            f"| {r['model']} | {r['category']} | {r['seed']} | "
            + " | ".join(_fmt(r[m], 3) for m in METRICS)
            + f" | {_fmt(r['latency_bs1_ms'], 1)} | {_fmt(r['peak_memory_mb'], 0)} | {_fmt(r['train_time_s'], 1)}"
            + f" | {r['schedule']} | {r['device']} | {_int(r['n_train'])}/{_int(r['n_val'])}/{_int(r['n_test'])} |"
        )
    if config.get("dataset_kind") == "generated":
        lines += [
            "",
            "Generated data: these numbers check the pipeline and measure speed; paper numbers need ImageNet "
            "weights and MVTec AD / VisA (see the README, section Benchmark).",
        ]
    text = "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


def _when(rows: Sequence[dict[str, Any]]) -> str:
    stamps = sorted(str(r.get("finished_at", "")) for r in rows if r.get("finished_at"))
    if not stamps:
        return "?"
    first, last = stamps[0][:16].replace("T", " "), stamps[-1][:16].replace("T", " ")
    return f"{first} UTC" if first == last else f"{first} to {last} UTC"


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


def _fmt(value: float, digits: int) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _int(value: float) -> str:
    return "–" if value is None or math.isnan(value) else str(int(value))


def write_plot(path: Path, rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> None:
    """``results.png``: bars per metric per model (mean ± std over seeds) and latency vs image AUROC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = aggregate_over_categories(rows)
    fig, (ax_bars, ax_scatter) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(1, len(summaries))
    for i, s in enumerate(summaries):
        means = [s[m][0] for m in METRICS]
        stds = [0.0 if math.isnan(s[m][1]) else s[m][1] for m in METRICS]
        xs = [j + (i - (len(summaries) - 1) / 2) * width for j in range(len(METRICS))]
        ax_bars.bar(xs, means, width, yerr=stds, capsize=3, label=s["model"])
    ax_bars.set_xticks(range(len(METRICS)), [METRIC_LABELS[m] for m in METRICS])
    ax_bars.set_ylim(0, 1.05)
    ax_bars.set_ylabel("score (mean ± std over seeds)")
    ax_bars.legend(fontsize=8, ncol=max(1, len(summaries)), loc="upper center", bbox_to_anchor=(0.5, -0.07))
    ax_bars.grid(axis="y", alpha=0.3)
    for s in summaries:
        (lat, lat_std, _), (auc, auc_std, _) = s["latency_bs1_ms"], s["image_auroc"]
        if math.isnan(lat) or math.isnan(auc):
            continue
        ax_scatter.errorbar(
            lat,
            auc,
            xerr=0 if math.isnan(lat_std) else lat_std,
            yerr=0 if math.isnan(auc_std) else auc_std,
            fmt="o",
            capsize=3,
            label=s["model"],
        )
        ax_scatter.annotate(s["model"], (lat, auc), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax_scatter.set_xscale("log")
    ax_scatter.set_xlabel("latency, batch 1, torch (ms, log scale)")
    ax_scatter.set_ylabel("image AUROC")
    ax_scatter.grid(alpha=0.3)
    kind = "GENERATED data (not MVTec AD)" if config.get("dataset_kind") == "generated" else str(config.get("dataset"))
    weights = ablation.teacher_label(config)
    fig.suptitle(f"{kind}, {weights}, {config.get('image_size')} px - {hardware_line(rows)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- one cell (child)
def weights_tag(backbone: str, pre_trained: bool, model: Any = None) -> str:  # noqa: ANN401
    """The timm tag the teacher's weights come from, or ``random-init``."""
    provenance = getattr(getattr(model, "model", None), "teacher_provenance", None)
    if isinstance(provenance, dict) and provenance.get("weights_tag"):
        return str(provenance["weights_tag"])
    if not pre_trained:
        return "random-init"
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(backbone)
    except Exception:  # noqa: BLE001 - unknown names are reported when the model is built
        return backbone
    return f"{cfg.architecture}.{cfg.tag}" if cfg is not None and getattr(cfg, "tag", None) else backbone


def build_model(spec: dict[str, Any]):  # noqa: ANN201
    """The cell's model, extra Engine arguments for training, its backbone name and schedule description.

    ``spec["overrides"]`` (ablation variants) are constructor keywords applied last; ``spec["texture_dir"]`` is
    Aand's ``anomaly_source_path`` unless an override sets it.
    """
    from anomalib.metrics import Evaluator, F1Score

    name = spec["model"]
    size = (spec["image_size"], spec["image_size"])
    backbone = spec["backbone"] or DEFAULT_BACKBONE[name]
    evaluator = Evaluator(test_metrics=[F1Score(fields=["pred_label", "gt_label"], prefix="image_")])
    common = {"backbone": backbone, "pre_trained": spec["pre_trained"], "evaluator": evaluator, "visualizer": False}
    overrides = dict(spec.get("overrides") or {})
    if name == "Patchcore":
        from anomalib.models import Patchcore

        kwargs = {"coreset_sampling_ratio": spec["coreset_ratio"], **overrides}
        model = Patchcore(**common, **kwargs, pre_processor=Patchcore.configure_pre_processor(image_size=size))
        return model, {}, backbone, f"1 pass (coreset {kwargs['coreset_sampling_ratio']:g})"
    if name == "ReverseDistillation":
        from anomalib.models import ReverseDistillation

        epochs = spec["epochs"] or PAPER_EPOCHS[name]
        pre_processor = ReverseDistillation.configure_pre_processor(image_size=size)
        model = ReverseDistillation(**common, **overrides, pre_processor=pre_processor)
        # RD's trainer_arguments do not pin max_epochs, so the Engine's value is the schedule.
        return model, {"max_epochs": epochs}, backbone, _epochs(epochs)
    if name == "Aand":
        from anomalib_aand import Aand

        stage1, stage2 = spec["aand_stage_epochs"] or PAPER_AAND_STAGES
        kwargs = {"stage1_epochs": stage1, "stage2_epochs": stage2}
        if spec.get("texture_dir"):
            kwargs["anomaly_source_path"] = spec["texture_dir"]
        kwargs.update(overrides)
        model = Aand(**common, **kwargs, pre_processor=Aand.configure_pre_processor(image_size=size))
        return model, {}, backbone, f"{kwargs['stage1_epochs']}+{kwargs['stage2_epochs']} epochs"
    if name == "MemKD":
        from anomalib_memkd import MemKD

        kwargs = {"epochs": spec["epochs"] or PAPER_EPOCHS[name], **overrides}
        model = MemKD(**common, **kwargs, pre_processor=MemKD.configure_pre_processor(image_size=size))
        return model, {}, backbone, _epochs(kwargs["epochs"])
    msg = f"unknown model {name!r}; choose from {MODELS}"
    raise ValueError(msg)


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _raw_metrics_callback():  # noqa: ANN202
    """A callback computing image AUROC, pixel AUROC and AUPRO on the raw (un-normalised) test outputs."""
    import torch
    from anomalib.metrics import AUPRO, AUROC
    from lightning.pytorch import Callback

    class RawTestMetrics(Callback):
        """Runs before the model's post-processor (trainer callbacks precede the model's own callbacks)."""

        def __init__(self) -> None:
            self.image_auroc = AUROC(fields=["pred_score", "gt_label"])
            self.pixel_auroc = AUROC(fields=["anomaly_map", "gt_mask"])
            self.aupro = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.3)

        def on_test_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            callbacks = list(trainer.callbacks)
            post = pl_module.post_processor
            mine = next(i for i, c in enumerate(callbacks) if c is self)
            theirs = next((i for i, c in enumerate(callbacks) if c is post), None)
            if theirs is not None and theirs < mine:
                msg = "RawTestMetrics must run before the post-processor to see raw scores"
                raise RuntimeError(msg)

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, ARG002
            anomaly_map = outputs.anomaly_map.detach().float().cpu()
            score = outputs.pred_score
            score = torch.amax(anomaly_map, dim=(-2, -1)) if score is None else score.detach().float().cpu()
            raw = _Fields(
                pred_score=score.reshape(-1),
                gt_label=outputs.gt_label.detach().cpu().reshape(-1).int(),
                anomaly_map=anomaly_map.reshape(anomaly_map.shape[0], *anomaly_map.shape[-2:]),
                gt_mask=outputs.gt_mask.detach().cpu().reshape(anomaly_map.shape[0], *outputs.gt_mask.shape[-2:]),
            )
            for metric in (self.image_auroc, self.pixel_auroc, self.aupro):
                metric.update(raw)

        def results(self) -> dict[str, float]:
            return {
                "image_auroc": float(self.image_auroc.compute()),
                "pixel_auroc": float(self.pixel_auroc.compute()),
                "aupro": float(self.aupro.compute()),
            }

    return RawTestMetrics()


@dataclass
class _Fields:
    pred_score: Any
    gt_label: Any
    anomaly_map: Any
    gt_mask: Any


def _timing_batches(datamodule: Any, size: int, batch: int):  # noqa: ANN401, ANN202
    """float32 ``[1, 3, S, S]`` and ``[batch, 3, S, S]`` test images in [0, 1] (cycled when fewer)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    dataset = datamodule.test_data
    images = []
    for i in range(min(batch, len(dataset))):
        image = dataset[i].image.float()
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        images.append(F.interpolate(image[None, :3], size=(size, size), mode="bilinear", antialias=True)[0])
    stacked = torch.stack(images).clamp(0, 1)
    big = stacked.repeat(math.ceil(batch / len(stacked)), 1, 1, 1)[:batch].contiguous()
    return stacked[:1].contiguous(), big


def _time(call: Callable[[], Any], runs: int, warmup: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        call()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Train, validate (thresholds only), test and time one cell; returns its ``results.csv`` row."""
    import resource
    import shutil
    import tempfile

    import torch
    from anomalib.callbacks.checkpoint import ModelCheckpoint
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    cuda = spec["device"].startswith("cuda") and torch.cuda.is_available()
    if spec["device"].startswith("cuda") and not cuda:
        msg = f"cell assigned to {spec['device']} but CUDA is not available in the child process"
        raise RuntimeError(msg)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    seed_everything(spec["seed"], workers=True)

    datamodule = MVTecAD(
        root=spec["dataset_root"],
        category=spec["category"],
        train_batch_size=spec["batch_size"],
        eval_batch_size=spec["batch_size"],
        num_workers=spec["num_workers"],
        val_split_mode=spec["val_split"],
        val_split_ratio=spec["val_split_ratio"],
        seed=spec["split_seed"],
    )
    model, fit_kwargs, backbone, schedule = build_model(spec)
    proxy_images = 0
    if spec.get("proxy_teacher"):
        from anomalib_kd_tools.ablation import calibrate_proxy_teacher

        datamodule.setup()
        proxy_images = calibrate_proxy_teacher(model, datamodule.train_data, spec["batch_size"])
    accelerator = "gpu" if cuda else "cpu"
    work = Path(tempfile.mkdtemp(prefix="cell_", dir=spec["work_dir"]))
    try:
        common = {
            "accelerator": accelerator,
            "devices": 1,
            "default_root_dir": work,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "deterministic": "warn",
        }

        def no_checkpoints() -> list:
            # anomalib adds a checkpoint callback unless one is given: this one saves nothing (last epoch is used).
            return [ModelCheckpoint(dirpath=work / "ckpt", save_top_k=0, save_last=False)]

        # 1) training: no validation loop during fit, no checkpoint selection.
        fit_engine = Engine(**common, limit_val_batches=0, callbacks=no_checkpoints(), **fit_kwargs)
        start = time.perf_counter()
        fit_engine.fit(model, datamodule=datamodule)
        train_time = time.perf_counter() - start

        # 2) validation split -> post-processor thresholds / normalisation; 3) test on the remaining images.
        raw = _raw_metrics_callback()
        eval_engine = Engine(**common, callbacks=[*no_checkpoints(), raw])
        eval_engine.validate(model, datamodule=datamodule, verbose=False)
        test_results = eval_engine.test(model, datamodule=datamodule, verbose=False)[0]
        metrics = raw.results()
        metrics["image_f1"] = float(test_results["image_F1Score"])

        # 4) speed of the whole AnomalibModule.forward.
        device = torch.device("cuda:0" if cuda else "cpu")
        model = model.to(device).eval()
        one, many = _timing_batches(datamodule, spec["image_size"], spec["throughput_batch"])
        one, many = one.to(device), many.to(device)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        with torch.inference_mode():
            latency = _time(lambda: model(one), spec["timing_runs"], spec["warmup"], sync)
            batch_time = _time(lambda: model(many), max(3, spec["timing_runs"] // 4), 1, sync)
        row: dict[str, Any] = {
            **metrics,
            "latency_bs1_ms": 1000 * latency,
            "throughput_ips": spec["throughput_batch"] / batch_time,
            "ov_latency_bs1_ms": math.nan,
            "ov_throughput_ips": math.nan,
        }
        if spec["openvino"]:
            row.update(_openvino_speed(model, one.cpu(), many.cpu(), spec, work))
        if spec.get("variant"):  # ablation cell: the model's own mechanism figures on the test images
            from anomalib_kd_tools.ablation import PROXY_TEACHER, mechanism_figures

            figures, status = mechanism_figures(model.to(device), datamodule.test_dataloader())
            row.update(variant=spec["variant"], overrides=json.dumps(spec.get("overrides") or {}))
            row.update(mechanism=json.dumps(figures), mechanism_status=status)
            row["teacher"] = PROXY_TEACHER if proxy_images else ("ImageNet" if spec["pre_trained"] else "random init")

        params = list(model.model.parameters())
        state_bytes = sum(t.numel() * t.element_size() for t in (*params, *model.model.buffers()))
        if cuda:
            peak_mb, memory_kind = torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
        else:
            peak_mb, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"
        row.update(
            {
                "dataset_kind": spec["dataset_kind"],
                "dataset": spec["dataset_label"],
                "category": spec["category"],
                "model": spec["model"],
                "seed": spec["seed"],
                "peak_memory_mb": peak_mb,
                "memory_kind": memory_kind,
                "params_m": sum(p.numel() for p in params) / 1e6,
                "trainable_params_m": _trainable_params(fit_engine.trainer.optimizers) / 1e6,
                "state_mb": state_bytes / 2**20,
                "train_time_s": train_time,
                "throughput_batch": spec["throughput_batch"],
                "threads": torch.get_num_threads(),
                "backbone": backbone,
                "weights_tag": _proxy_label() if proxy_images else weights_tag(backbone, spec["pre_trained"], model),
                "image_size": spec["image_size"],
                "schedule": schedule,
                "val_split": f"{spec['val_split']}:{spec['val_split_ratio']:g}",
                "n_train": len(datamodule.train_data),
                "n_val": len(datamodule.val_data),
                "n_test": len(datamodule.test_data),
                "device": spec["device"],
                "device_name": torch.cuda.get_device_name(0) if cuda else cpu_name(),
                "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            },
        )
        return row
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _proxy_label() -> str:
    from anomalib_kd_tools.ablation import PROXY_TEACHER

    return PROXY_TEACHER


def _trainable_params(optimizers: Sequence[Any]) -> int:
    """Parameters the training optimisers updated (0 for Patchcore, which has none)."""
    seen: dict[int, int] = {}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                seen[id(p)] = p.numel()
    return sum(seen.values())


def _openvino_speed(model: Any, one: Any, many: Any, spec: dict[str, Any], work: Path) -> dict[str, float]:  # noqa: ANN401
    import warnings

    import openvino as ov
    import torch

    model = model.cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xml = model.to_openvino(work / "openvino", input_size=(spec["image_size"], spec["image_size"]))
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if spec.get("threads"):
        config["INFERENCE_NUM_THREADS"] = spec["threads"]
    compiled = ov.Core().compile_model(str(xml), "CPU", config)
    one_np, many_np = one.numpy(), many.numpy()
    with torch.inference_mode():
        latency = _time(lambda: compiled(one_np), spec["timing_runs"], spec["warmup"], lambda: None)
        batch_time = _time(lambda: compiled(many_np), max(3, spec["timing_runs"] // 4), 1, lambda: None)
    return {"ov_latency_bs1_ms": 1000 * latency, "ov_throughput_ips": spec["throughput_batch"] / batch_time}


def _cell_entry(spec_path: str, result_path: str) -> int:
    """Child-process entry: run the cell described in ``spec_path`` and write its row to ``result_path``."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    row = run_cell(spec)
    tmp = Path(result_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(row), encoding="utf-8")
    tmp.replace(result_path)
    return 0


# ---------------------------------------------------------------------------------------------- parent
def child_visible_devices(device: str, parent_visible: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a cell on ``device`` (an index among the GPUs this process sees)."""
    if not device.startswith("cuda"):
        return ""  # CPU cells see no GPU
    index = int(device.removeprefix("cuda:"))
    visible = [part.strip() for part in (parent_visible or "").split(",") if part.strip()]
    return visible[index] if visible else str(index)


class CellProcess:
    """A cell running in its own Python process, pinned to one device through ``CUDA_VISIBLE_DEVICES``."""

    def __init__(self, spec: dict[str, Any], device: str, run_dir: Path, log_path: Path) -> None:
        self.spec_path = run_dir / f"{spec['slug']}.spec.json"
        self.result_path = run_dir / f"{spec['slug']}.result.json"
        self.result_path.unlink(missing_ok=True)
        self.spec_path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
        self.log_path = log_path
        env = os.environ.copy()
        env["CUDA_VISIBLE_DEVICES"] = child_visible_devices(device, os.environ.get("CUDA_VISIBLE_DEVICES"))
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        env.setdefault("PYTHONHASHSEED", "0")
        if spec.get("threads"):
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
        self.started = time.perf_counter()
        self._log = log_path.open("w", encoding="utf-8")
        self.process = subprocess.Popen(  # noqa: S603 - our own module with our own arguments
            [sys.executable, "-m", "anomalib_kd_tools.benchmark", "--run-cell", str(self.spec_path), str(self.result_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def poll(self) -> dict[str, Any] | None:
        code = self.process.poll()
        if code is None:
            return None
        self._log.close()
        elapsed = time.perf_counter() - self.started
        if code == 0 and self.result_path.exists():
            return {"ok": True, "row": json.loads(self.result_path.read_text(encoding="utf-8")), "elapsed": elapsed}
        tail = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        return {"ok": False, "error": f"exit code {code}", "tail": tail, "elapsed": elapsed}

    def cleanup(self) -> None:
        self.spec_path.unlink(missing_ok=True)
        self.result_path.unlink(missing_ok=True)

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="anomalib-kd-benchmark",
        description="Side-by-side benchmark of Patchcore, ReverseDistillation, Aand and MemKD (same data, seeds).",
        epilog="Paper numbers need ImageNet weights (--pre-trained) and MVTec AD / VisA (--dataset-root).",
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset-root", type=Path, help="MVTec-layout folder: <root>/<category>/{train,test,...}")
    data.add_argument("--generated", action="store_true", help="generate a small MVTec-layout dataset (labelled)")
    parser.add_argument("--categories", nargs="+", help="categories under --dataset-root (default: all found)")
    parser.add_argument(
        "--dataset-name",
        choices=("auto", "mvtec", "visa", "none"),
        default="auto",
        help="which paper numbers results.md / paper_comparison.csv show beside the measured ones (default auto: "
        "MVTec AD or VisA when every category is one of its names; none: no comparison)",
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 (0 1 2 with --ablation)")
    parser.add_argument(
        "--backbone",
        help="one backbone for all four models (default: wide_resnet50_2 for Patchcore/RD, "
        "wide_resnet50_2.tv_in1k for Aand/MemKD)",
    )
    parser.add_argument("--pre-trained", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, help="epochs of RD and MemKD (default: 200 and 100, the papers')")
    parser.add_argument(
        "--aand-stage-epochs",
        nargs=2,
        type=int,
        metavar=("S1", "S2"),
        help="Aand's stage lengths (default: 100 120)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--coreset-ratio", type=float, default=0.1, help="Patchcore coreset sampling ratio")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--val-split", choices=("from_test", "synthetic"), default="from_test")
    parser.add_argument("--val-split-ratio", type=float, default=0.3)
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the validation split (fixed per run)")
    parser.add_argument("--output", type=Path, default=Path("runs/anomalib-kd-benchmark"))
    parser.add_argument("--devices", default="auto", help="auto | cpu | N (first N GPUs) | i,j (these GPUs)")
    parser.add_argument("--openvino", action=argparse.BooleanOptionalAction, default=None, help="default: if installed")
    parser.add_argument("--timing-runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--throughput-batch", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads per cell (torch and OpenVINO; default: torch's default). On a shared or busy CPU, "
        "1 avoids thread oversubscription that can inflate latencies many times",
    )
    generated = parser.add_argument_group("generated data (--generated)")
    generated.add_argument("--n-train", type=int, default=32)
    generated.add_argument("--n-test-good", type=int, default=8)
    generated.add_argument("--n-test-per-defect", type=int, default=4)
    ablation.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.image_size % 32 or args.image_size < 64:  # noqa: PLR2004
        parser.error("--image-size must be a multiple of 32 and at least 64")
    ablation.check_arguments(parser, args)
    if args.openvino is None:
        import importlib.util

        args.openvino = importlib.util.find_spec("openvino") is not None
    return args


def _prepare_data(args: argparse.Namespace) -> tuple[Path, list[str], dict[str, Any]]:
    """Dataset root, categories and the run-config entries describing the data (nothing is written yet)."""
    if args.generated:
        spec = {
            "category": GENERATED_CATEGORY,
            "image_size": args.image_size,
            "n_train": args.n_train,
            "n_test_good": args.n_test_good,
            "n_test_per_defect": args.n_test_per_defect,
            "seed": 0,
            **ablation.generated_extras(args),
        }
        root = (args.output / "data").resolve()
        return root, [GENERATED_CATEGORY], {"dataset_kind": "generated", "dataset": "generated", "generated_spec": spec}
    root = args.dataset_root.resolve()
    found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir()) if root.is_dir() else []
    categories = args.categories or found
    missing = [c for c in categories if c not in found]
    if not categories or missing:
        msg = f"{root}: no MVTec-layout category folder{'s ' + str(missing) if missing else 's'} (<category>/train)"
        raise SystemExit(msg)
    return root, categories, {"dataset_kind": "folder", "dataset": str(root), "generated_spec": None}


def _write_generated(root: Path, spec: dict[str, Any]) -> None:
    """Write the generated dataset unless the same one is already there."""
    from anomalib_kd_tools.synthetic import make_mvtec_like_dataset

    marker = root / "generated.json"
    if not marker.exists() or json.loads(marker.read_text(encoding="utf-8")) != spec:
        make_mvtec_like_dataset(root, **spec)
        marker.write_text(json.dumps(spec), encoding="utf-8")


def _same_setting(key: str, old: Any, new: Any) -> bool:  # noqa: ANN401
    if key in ablation.RUN_CONFIG_DEFAULT_OFF:  # a run config written before these keys existed means "off"
        return (old or None) == (new or None)
    return old == new


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--run-cell"]:
        return _cell_entry(argv[1], argv[2])
    args = parse_args(argv)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    args.output.mkdir(parents=True, exist_ok=True)
    root, categories, data_config = _prepare_data(args)
    variants, skipped, ablation_config = ablation.plan(args, args.output)
    config = {
        **data_config,
        "image_size": args.image_size,
        "backbone": args.backbone,
        "pre_trained": args.pre_trained,
        "epochs": args.epochs,
        "aand_stage_epochs": args.aand_stage_epochs,
        "batch_size": args.batch_size,
        "coreset_ratio": args.coreset_ratio,
        "val_split": args.val_split,
        "val_split_ratio": args.val_split_ratio,
        "split_seed": args.split_seed,
        "openvino": args.openvino,
        "throughput_batch": args.throughput_batch,
        "threads": args.threads,
        "dataset_name": args.dataset_name,  # report only (not in RUN_CONFIG_KEYS: it changes no cell's numbers)
        **ablation_config,
    }
    config_path = args.output / "run_config.json"
    if config_path.exists():
        previous = json.loads(config_path.read_text(encoding="utf-8"))
        changed = [k for k in RUN_CONFIG_KEYS if not _same_setting(k, previous.get(k), config.get(k))]
        if changed:
            console.print(
                f"[red]{args.output} holds results made with other settings ({', '.join(changed)}); "
                "use another --output.[/red]",
            )
            return 2
    config_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    if args.generated:
        _write_generated(root, data_config["generated_spec"])
    ablation.write_textures(config)

    csv_path, run_dir, log_dir = args.output / "results.csv", args.output / "cells", args.output / "logs"
    run_dir.mkdir(exist_ok=True)
    log_dir.mkdir(exist_ok=True)
    devices = resolve_devices(args.devices)
    by_name = {v.name: v for v in variants}
    cells = make_cells(list(by_name), categories, args.seeds)
    for name, missing in skipped.items():
        console.print(f"[yellow]skip variant {name}: the model's constructor has no {', '.join(missing)}[/yellow]")
    finished = done_keys(read_rows(csv_path))
    todo = [c for c in cells if c.key not in finished]
    for cell in cells:
        if cell.key in finished:
            console.print(f"skip {cell.name} (already in {csv_path.name})")
    kind = "GENERATED data" if args.generated else f"folder {root}"
    console.print(
        f"{len(cells)} cells ({len(todo)} to run) on {', '.join(devices)}; {kind}; "
        f"{ablation.teacher_label(config)}; logs in {log_dir}",
    )

    def spec_of(cell: Cell, device: str) -> dict[str, Any]:
        variant = by_name[cell.model]
        extra = {"variant": variant.name, "overrides": variant.resolved(config["texture_dir"])}
        return {
            "model": variant.model,
            **(extra if args.ablation else {}),
            "category": cell.category,
            "seed": cell.seed,
            "slug": cell.slug,
            "device": device,
            "dataset_root": str(root),
            "dataset_kind": data_config["dataset_kind"],
            "dataset_label": data_config["dataset"],
            "work_dir": str(run_dir.resolve()),
            **{k: config[k] for k in RUN_CONFIG_KEYS if k in config and k not in {"dataset_kind", "dataset"}},
            "num_workers": args.num_workers,
            "timing_runs": args.timing_runs,
            "warmup": args.warmup,
        }

    failures: list[str] = []
    running: dict[str, tuple[Cell, CellProcess]] = {}
    with Progress(
        TextColumn("[bold]benchmark"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("", total=len(cells), completed=len(cells) - len(todo))

        def describe() -> None:
            names = ", ".join(f"{c.name} [{d}]" for d, (c, _) in running.items())
            progress.update(task, description=f"running {names}" if names else "")

        def start(cell: Cell, device: str) -> CellProcess:
            handle = CellProcess(spec_of(cell, device), device, run_dir, log_dir / f"{cell.slug}.log")
            running[device] = (cell, handle)
            return handle

        def on_finish(cell: Cell, device: str, outcome: dict[str, Any]) -> None:
            _, handle = running.pop(device)
            if outcome["ok"]:
                row = outcome["row"]
                append_row(csv_path, row, ABLATION_COLUMNS if args.ablation else COLUMNS)
                handle.cleanup()
                progress.console.print(
                    f"done {cell.name} on {device} in {outcome['elapsed']:.0f} s: "
                    + ", ".join(f"{METRIC_LABELS[m]} {row[m]:.3f}" for m in METRICS)
                    + f", latency {row['latency_bs1_ms']:.1f} ms",
                )
            else:
                failures.append(cell.name)
                progress.console.print(f"[red]FAILED {cell.name} on {device} ({outcome['error']}):[/red]")
                for line in outcome["tail"]:
                    progress.console.print(f"    {line}", markup=False, highlight=False)
            progress.advance(task)
            describe()

        try:
            run_schedule(todo, devices, start, on_start=lambda c, d: describe(), on_finish=on_finish)
        except KeyboardInterrupt:
            for _, handle in running.values():
                handle.terminate()
            console.print("[yellow]interrupted; finished cells are in results.csv, re-run to resume[/yellow]")
            return 130

    rows = [r for r in read_rows(csv_path) if row_key(r) in {c.key for c in cells}]
    if rows and args.ablation:
        text = ablation.write_markdown(args.output / "results.md", rows, config, variants, skipped)
        console.print(text, markup=False, highlight=False)
        console.print(f"wrote {csv_path}, {args.output / 'results.md'}")
    elif rows:
        text = write_markdown(args.output / "results.md", rows, config)
        write_plot(args.output / "results.png", rows, config)
        if paper_results.write_csv(args.output / "paper_comparison.csv", rows, config):
            console.print(f"wrote {args.output / 'paper_comparison.csv'} (paper numbers beside measured ones)")
        console.print(text, markup=False, highlight=False)
        console.print(f"wrote {csv_path}, {args.output / 'results.md'}, {args.output / 'results.png'}")
    if failures:
        console.print(f"[red]{len(failures)} cell(s) failed: {', '.join(failures)} (see {log_dir})[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
