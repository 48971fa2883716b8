"""Published numbers of the AAND and MemKD papers, and of their RD baseline, beside the benchmark's measured ones.

The papers' numbers are the packaged ``data/papers.csv`` (:func:`papers`; one number per line, in percent as
printed, with the transcription notes), converted once to the benchmark's fractions (:func:`percent_to_fraction`).
For Aand, MemKD and RD, each published image AUROC, pixel AUROC or AUPRO (the papers' PRO: FPR <= 0.3, as anomalib's
``AUPRO(fpr_limit=0.3)``) stands beside the measured mean over seeds with Δ = measured - paper (:func:`compare`).
Per-category numbers exist only for VisA image AUROC; a dataset mean gets a Δ only when every category ran for
every seed. RD's two published sources (AAND Table II / III, MemKD Table 1) disagree and both are kept, labelled;
:func:`protocol_differences` names what in the run differs from the papers' protocol. docs/benchmarks.md ("Paper
numbers beside measured ones") has the rest.
"""

from __future__ import annotations

import math
import re
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import pandas as pd

from anomalib_kd_tools.benchmark import report, schema
from anomalib_kd_tools.benchmark.job import PAPER_AAND_STAGES

MEAN = "mean"  # the category of a dataset mean
# anomalib's category names (anomalib.data.datasets.image.mvtecad.CATEGORIES / visa.CATEGORIES; a test keeps them
# equal). Written out here so that the report needs no anomalib import.
MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
    "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4",
    "pipe_fryum",
)  # fmt: skip
DATASETS = {"mvtec": ("MVTec AD", MVTEC_CATEGORIES), "visa": ("VisA", VISA_CATEGORIES)}
COMPARED_METRICS = ("image_auroc", "pixel_auroc", "aupro")  # the benchmark's metrics the papers report, in order
MODEL_ORDER = ("Aand", "MemKD", "ReverseDistillation")  # the papers' models, in report order
# The papers' protocol (AAND Sec. IV-B, MemKD Sec. 5.2): WideResNet50 ImageNet teacher, 256 x 256, batch 16
# (anomalib_kd_base.model.PAPER_BATCH_SIZE, imported where it is used: that module imports anomalib), AAND 100 + 120
# epochs (job.PAPER_AAND_STAGES), MemKD 100 epochs; RD's own paper trains 200 epochs (the benchmark's default).
PAPER_IMAGE_SIZE = 256
CSV_COLUMNS = (
    "dataset", "model", "category", "metric", "measured", "measured_std", "n_seeds", "n_categories", "paper", "delta",
    "source", "note",
)  # fmt: skip


# ------------------------------------------------------------------------------------------ published entries
@cache
def papers() -> pd.DataFrame:
    """Every transcribed number (``data/papers.csv``): source, dataset, model, category as printed, metric,
    percent as printed and kind (``value``, ``printed mean``, ``repeat``, ``gain``)."""
    with (files(__package__) / "data" / "papers.csv").open(encoding="utf-8") as file:
        return pd.read_csv(file, comment="#", dtype={"percent": float})


def percent_to_fraction(percent: float) -> float:
    """A paper's percentage (99.5) as the benchmark's fraction (0.995)."""
    if not 0.0 <= percent <= 100.0:  # noqa: PLR2004
        msg = f"not a percentage: {percent}"
        raise ValueError(msg)
    return percent / 100.0


def anomalib_category(name: str) -> str:
    """anomalib's name of a category as a paper prints it: "metal nut" -> metal_nut, "chewing gum" -> chewinggum,
    "maca- roni1" -> macaroni1, "pipe fryum" -> pipe_fryum, "Metal Nut" -> metal_nut."""
    key = re.sub(r"-\s+", "", name.strip().lower())  # undo the layout's hyphenation
    key = re.sub(r"[\s-]+", "_", key)
    if key == "chewing_gum":  # anomalib (and the VisA release) spell it without a separator
        return "chewinggum"
    if key not in MVTEC_CATEGORIES + VISA_CATEGORIES:
        msg = f"unknown MVTec AD / VisA category {name!r}"
        raise ValueError(msg)
    return key


def published(dataset: str) -> pd.DataFrame:
    """Every published number for ``dataset`` ("mvtec" / "visa") of a metric in :data:`COMPARED_METRICS`: model,
    category (anomalib's name, or :data:`MEAN`), metric, ``percent`` as printed, ``value`` as the benchmark's
    fraction, source."""
    table = papers()
    table = table[(table.dataset == dataset) & (table.kind == "value") & table.metric.isin(COMPARED_METRICS)].copy()
    table["category"] = [c if c == MEAN else anomalib_category(c) for c in table.category]
    table["value"] = table.percent.map(percent_to_fraction)
    return table[["dataset", "model", "category", "metric", "percent", "value", "source"]].reset_index(drop=True)


# ------------------------------------------------------------------------------------------ which dataset
def detect_dataset(categories: Any) -> str | None:  # noqa: ANN401
    """"mvtec" / "visa" when every category is one of that dataset's (anomalib's names), else ``None``."""
    names = set(categories)
    for key, (_, known) in DATASETS.items():
        if names and names <= set(known):
            return key
    return None


def resolve_dataset(rows: pd.DataFrame, config: dict[str, Any]) -> str | None:
    """The dataset to compare with: none for generated data or ``--dataset-name none``; ``mvtec`` / ``visa`` as
    given; ``auto`` (default) detects it from the measured categories."""
    if config.get("dataset_kind") == "generated":
        return None
    name = config.get("dataset_name") or "auto"
    if name == "none":
        return None
    if name in DATASETS:
        return name
    return detect_dataset(pd.DataFrame(rows)["category"])


def protocol_differences(config: dict[str, Any]) -> list[str]:
    """What in this run's settings differs from the papers' protocol (so a delta may not mean a failed reproduction)."""
    from anomalib_kd_base.model import PAPER_BATCH_SIZE

    out = []
    if not config.get("pre_trained", True) or config.get("proxy_teacher"):
        out.append("the teacher is not ImageNet-pre-trained")
    backbone = config.get("backbone")
    if backbone and not str(backbone).startswith("wide_resnet50_2"):
        out.append(f"backbone {backbone} (papers: WideResNet50)")
    if config.get("image_size") not in (None, PAPER_IMAGE_SIZE):
        out.append(f"image size {config['image_size']} px (papers: {PAPER_IMAGE_SIZE})")
    if config.get("batch_size") not in (None, PAPER_BATCH_SIZE):
        out.append(f"batch size {config['batch_size']} (papers: {PAPER_BATCH_SIZE})")
    if config.get("epochs") is not None:
        out.append(f"--epochs {config['epochs']} for RD and MemKD (papers: RD 200, MemKD 100)")
    stages = config.get("aand_stage_epochs")
    if stages is not None and tuple(stages) != PAPER_AAND_STAGES:
        out.append(f"Aand stages {stages[0]}+{stages[1]} epochs (paper: {PAPER_AAND_STAGES[0]}+{PAPER_AAND_STAGES[1]})")
    if config.get("val_split", "from_test") == "from_test":
        out.append(
            f"metrics on the test images left after holding out {config.get('val_split_ratio', 0.3)} of them for "
            "validation (papers: the whole test set; `--val-split synthetic` keeps it whole)",
        )
    return out


# ------------------------------------------------------------------------------------------ the comparison
def compare(rows: pd.DataFrame, config: dict[str, Any]) -> pd.DataFrame:
    """One row (:data:`CSV_COLUMNS`) per published number whose model (and category) was measured: measured mean over
    seeds (for a dataset mean: of the per-seed category mean), std, n seeds, n categories, paper value (fraction),
    delta (measured - paper; ``nan`` for a mean over fewer categories than the dataset has), source, note."""
    dataset = resolve_dataset(rows, config)
    if dataset is None:
        return pd.DataFrame(columns=list(CSV_COLUMNS))
    all_categories = DATASETS[dataset][1]
    rows = pd.DataFrame(rows)
    rows = rows[rows.category.isin(all_categories)]
    out = []
    for entry in published(dataset).itertuples():
        members = rows[(rows.model == entry.model) & ((rows.category == entry.category) | (entry.category == MEAN))]
        values = members[["seed", "category", entry.metric]].dropna()
        if values.empty:
            continue
        stats = schema.aggregate(values.assign(model=entry.model), ["model"], [entry.metric], over_categories=True)
        mean, std, n_seeds = stats[entry.metric].iloc[0]
        covered = values.category.nunique()
        complete = entry.category != MEAN or (values.groupby("seed").category.nunique() == len(all_categories)).all()
        note = ""
        if covered < len(all_categories) and entry.category == MEAN:
            note = f"measured over {covered} of {len(all_categories)} categories: not the paper's mean, no Δ"
        elif not complete:
            note = f"not every seed covers all {len(all_categories)} categories: no Δ"
        stats = {"measured": mean, "measured_std": std, "n_seeds": int(n_seeds), "n_categories": covered}
        delta = mean - entry.value if complete else math.nan
        out.append({**entry._asdict(), **stats, "paper": entry.value, "delta": delta, "note": note})  # CSV_COLUMNS
    records = pd.DataFrame(out, columns=list(CSV_COLUMNS))
    key = {  # the papers' models, per-category numbers before the means (in the dataset's order), then the metrics
        "model": lambda c: c.map(lambda m: schema.rank(m, MODEL_ORDER)),
        "category": lambda c: c.map(lambda x: (x == MEAN, all_categories.index(x) if x in all_categories else 0)),
        "metric": lambda c: c.map(COMPARED_METRICS.index),
    }
    return records.sort_values(list(key) + ["source"], key=lambda c: key.get(c.name, lambda c: c)(c), ignore_index=True)


def markdown_lines(rows: pd.DataFrame, config: dict[str, Any]) -> list[str]:
    """The ``results.md`` section (a list of lines, leading blank line included); ``[]`` when there is nothing to
    compare (generated data, another dataset, or none of Aand / MemKD / ReverseDistillation measured)."""
    records = compare(rows, config)
    if records.empty:
        return []
    dataset = records.dataset.iloc[0]
    differences = protocol_differences(config)
    lines = [
        "",
        f"## Paper numbers beside measured ones ({DATASETS[dataset][0]})",
        "",
        "The papers' published numbers (printed in percent, shown here as fractions: 99.5 % = 0.995) next to the "
        "measured mean over seeds; Δ = measured − paper (|Δ| < 0.0005 is within the papers' rounding). Sources: "
        "AAND = Tang et al. (Advancing Pre-trained Teacher), MemKD = Gu et al. (Remembering Normality); RD as "
        "reported by each of them. Per-category numbers are published only for VisA image AUROC (AAND Table III); "
        "the rest are dataset means, with a Δ only when every category was measured.",
        "",
        "- Differences from the papers' protocol: " + ("; ".join(differences) if differences else "none found"),
        "",
    ]
    table = records[["model", "category"]].assign(metric=records.metric.map(schema.LABELS))
    stats = records[["measured", "measured_std", "n_seeds"]].itertuples(index=False)
    table["measured"] = [schema.format_mean_std(*stat) for stat in stats]
    table["paper"] = records.paper.map("{:.3f}".format)
    table["Δ"] = records.delta.map(lambda d: schema.DASH if math.isnan(d) else f"{d:+.3f}")
    table[["source", "note"]] = records[["source", "note"]]
    return [*lines, *report.markdown(table)]


def write_csv(path: Path, rows: pd.DataFrame, config: dict[str, Any]) -> bool:
    """``paper_comparison.csv`` (fractions, like ``results.csv``); when there is nothing to compare, writes nothing
    (and removes a stale file from an earlier run into the same folder) and returns ``False``."""
    records = compare(rows, config)
    if records.empty:
        path.unlink(missing_ok=True)
        return False
    schema.write_csv(path, records, CSV_COLUMNS, digits=6)
    return True
