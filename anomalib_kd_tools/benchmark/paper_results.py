"""Published numbers of the AAND and MemKD papers, and of their RD baseline, beside the benchmark's measured ones.

``anomalib-kd-benchmark quality`` on MVTec AD or VisA adds a section "Paper numbers beside measured ones" to
``results.md`` and writes ``paper_comparison.csv``: for Aand, MemKD and ReverseDistillation, each number the papers
publish for a metric the benchmark measures (image AUROC, pixel AUROC, AUPRO), the measured mean over seeds, and
``delta = measured - paper``.

What the papers publish (transcribed below, each block with its table):

* AAND (Tang et al., "Advancing Pre-trained Teacher: Towards Robust Feature Discrepancy for Anomaly Detection"):
  Table II - dataset means of I-AUC / P-AUC / PRO on MVTec AD and VisA for AAND ("Ours") and "RD [3] (baseline)";
  Table III - VisA image AUROC per category for AAND and "RD [3]". There is no per-category MVTec AD table.
* MemKD (Gu et al., "Remembering Normality: Memory-guided Knowledge Distillation for Unsupervised Anomaly
  Detection"): Table 1(a) MVTec AD and 1(b) VisA - dataset means of I-AUC, I-AP, P-AUC, P-AP, P-PRO for MemKD
  ("Ours") and "RD [8]". No per-category table for MVTec AD or VisA.

So a per-category comparison exists only for VisA image AUROC (Aand, RD); everything else is compared on the
dataset mean, which is shown with a delta only when the measured rows cover every category of the dataset (for
every seed), because a mean over a subset of the categories is not the paper's mean.

RD has two published sources (both are kept, labelled): AAND Table II / III and MemKD Table 1. They disagree,
most on VisA (AAND: 96.2 / 98.6 / 93.4, MemKD: 96.0 / 90.1 / 70.9 for I-AUC / P-AUC / PRO).

Units: the papers print percentages with one decimal; the benchmark measures fractions in [0, 1]. Every number is
stored as printed (percent) and converted once by :func:`percent_to_fraction`; the report shows fractions, so a
|delta| below 0.0005 is within the papers' rounding.

Metrics: the papers' "PRO" (both cite Bergmann et al., "Uninformed Students", CVPR 2020) is the area under the
per-region-overlap curve up to a false-positive rate of 0.3, normalised - the benchmark's ``aupro`` (anomalib
``AUPRO(fpr_limit=0.3)``). The papers' AP columns (I-AP, P-AP) are transcribed but not compared: the benchmark does
not measure them.

Known inconsistencies in the MemKD text (the tables are transcribed as printed):
Table 3 is captioned "on MPDD" but repeats Table 1(b)'s VisA numbers (PaDiM 89.1 / 30.9 / 85.9, PatchCore
95.1 / 40.1 / 91.2, Baseline 96.0 / 27.7 / 70.9, Ours 97.6 / 44.1 / 94.9). Table 1(b) is taken as VisA, as its
caption says: its PaDiM, PatchCore and DRAEM columns equal the VisA numbers of AAND Table II. The text's "1.1%"
image-AP gain over RD on VisA does not match Table 1(b) (98.6 - 96.5 = 2.1), nor its "3.9%" P-PRO lead over the
second best (94.9 - 91.2 = 3.7).
Not used: AAND Table I (VisA I-AUC 96.2 for RD, 97.8 for AAND "for fair comparison, the training of the student
model is set consistent" - another setting than Table II's 98.1), the ablation tables, and the MVTec3D-RGB / MPDD /
Eyecandies tables (datasets the benchmark does not run).

The measured side follows the benchmark's protocol, not necessarily the paper's: :func:`protocol_differences` lists
what differs (teacher weights, image size, scaled schedules, the validation images held out of the test set).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalib_kd_tools.benchmark import report
from anomalib_kd_tools.benchmark.job import PAPER_AAND_STAGES

MEAN = "mean"  # the category of a dataset mean

# anomalib's category names (anomalib.data.datasets.image.mvtecad.CATEGORIES / visa.CATEGORIES; a test keeps them
# equal). Written out here so that the report needs no anomalib import.
MVTEC_CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
VISA_CATEGORIES = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)
DATASETS = {"mvtec": ("MVTec AD", MVTEC_CATEGORIES), "visa": ("VisA", VISA_CATEGORIES)}
# The benchmark's metrics that the papers also report, in report order.
COMPARED_METRICS = ("image_auroc", "pixel_auroc", "aupro")
METRIC_LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO"}
# The papers' protocol (AAND Sec. IV-B, MemKD Sec. 5.2): WideResNet50 ImageNet teacher, 256 x 256, batch 16
# (anomalib_kd_base.model.PAPER_BATCH_SIZE, imported where it is used: that module imports anomalib), AAND 100 + 120
# epochs (job.PAPER_AAND_STAGES), MemKD 100 epochs; RD's own paper trains 200 epochs (the benchmark's default).
PAPER_IMAGE_SIZE = 256

# ------------------------------------------------------------------------------------------ the papers' numbers
# All values in percent, exactly as printed. Metric keys are the benchmark's: image_auroc = I-AUC,
# pixel_auroc = P-AUC, aupro = PRO / P-PRO; image_ap = I-AP, pixel_ap = P-AP (not measured by the benchmark).

# AAND paper, TABLE II "Anomaly detection and localization performance on the MVTec AD, VISA and MvTec3D-RGB
# dataset", columns I-AUC, P-AUC, PRO; rows "Ours" (AAND) and "RD [3] (baseline)" (CVPR'22). MvTec3D-RGB not used.
AAND_TABLE_II = {
    "mvtec": {
        "Aand": {"image_auroc": 99.5, "pixel_auroc": 98.4, "aupro": 95.0},
        "ReverseDistillation": {"image_auroc": 98.5, "pixel_auroc": 98.3, "aupro": 94.0},
    },
    "visa": {
        "Aand": {"image_auroc": 98.1, "pixel_auroc": 99.0, "aupro": 94.8},
        "ReverseDistillation": {"image_auroc": 96.2, "pixel_auroc": 98.6, "aupro": 93.4},
    },
}

# AAND paper, TABLE III "I-AUC for anomaly detection performance of all object categories on the challenging VisA
# dataset". Column headers as printed ("maca- roni1" is hyphenated by the layout), then the printed "mean".
AAND_TABLE_III_COLUMNS = (
    "candle",
    "capsules",
    "cashew",
    "chewing gum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe fryum",
)
AAND_TABLE_III = {  # model: (per-category values in column order, printed mean)
    "Aand": ((98.4, 92.3, 98.0, 99.7, 98.0, 99.6, 95.2, 98.4, 98.9, 98.7, 99.9, 99.9), 98.1),  # row "Ours"
    "ReverseDistillation": ((95.3, 90.7, 97.0, 99.1, 96.5, 96.5, 90.6, 97.0, 96.9, 95.5, 99.5, 99.5), 96.2),  # "RD [3]"
}
# AAND Sec. IV-C text: "a 1.6% improvement in the 'capsules' category, a 4.6% improvement in the 'macarnoni2'
# category" - Table III's AAND minus RD (the second-best there), in percentage points. Consistency test only.
AAND_TEXT_GAINS_OVER_RD = {"capsules": 1.6, "macaroni2": 4.6}

# AAND paper, TABLE VI row "(d) Our AAND" and TABLE VII row "(c) ARG w/ tanh" (the full method) repeat Table II's
# AAND I-AUC / PRO. Not reported; kept for the consistency test only.
AAND_REPEATS = {
    "Table VI (d)": {"mvtec": {"image_auroc": 99.5, "aupro": 95.0}, "visa": {"image_auroc": 98.1, "aupro": 94.8}},
    "Table VII (c)": {"mvtec": {"image_auroc": 99.5, "aupro": 95.0}, "visa": {"image_auroc": 98.1, "aupro": 94.8}},
}

# MemKD paper, Table 1 "Quantitative results for anomaly detection and localization on (a) MVTec AD, (b) VisA and
# (c) MPDD"; rows I-AUC, I-AP, P-AUC, P-AP, P-PRO; columns "RD [8]" (KD based) and "Ours" (MemKD). (c) not used.
MEMKD_TABLE_1 = {
    "mvtec": {  # Table 1(a)
        "MemKD": {"image_auroc": 99.6, "image_ap": 99.9, "pixel_auroc": 98.2, "pixel_ap": 59.6, "aupro": 94.5},
        "ReverseDistillation": {
            "image_auroc": 98.4,
            "image_ap": 99.5,
            "pixel_auroc": 97.8,
            "pixel_ap": 58.0,
            "aupro": 93.9,
        },
    },
    "visa": {  # Table 1(b)
        "MemKD": {"image_auroc": 97.6, "image_ap": 98.6, "pixel_auroc": 98.4, "pixel_ap": 44.1, "aupro": 94.9},
        "ReverseDistillation": {
            "image_auroc": 96.0,
            "image_ap": 96.5,
            "pixel_auroc": 90.1,
            "pixel_ap": 27.7,
            "aupro": 70.9,
        },
    },
}

# MemKD paper, MVTec AD (the ablations are on MVTec AD, Sec. 5.4): Table 4(a) first row (baseline = RD) and last row
# (all components), Table 4(b) row L = 50/50/50, Table 5 rows "RD [8]" and "MemRD" repeat Table 1(a)'s
# I-AUC / P-AUC / P-PRO. Kept for the consistency test only.
MEMKD_REPEATS = {
    "Table 4(a) baseline": ("ReverseDistillation", {"image_auroc": 98.4, "pixel_auroc": 97.8, "aupro": 93.9}),
    "Table 4(a) all": ("MemKD", {"image_auroc": 99.6, "pixel_auroc": 98.2, "aupro": 94.5}),
    "Table 4(b) 50/50/50": ("MemKD", {"image_auroc": 99.6, "pixel_auroc": 98.2, "aupro": 94.5}),
    "Table 5 RD": ("ReverseDistillation", {"image_auroc": 98.4, "pixel_auroc": 97.8, "aupro": 93.9}),
    "Table 5 MemRD": ("MemKD", {"image_auroc": 99.6, "pixel_auroc": 98.2, "aupro": 94.5}),
}
# MemKD Sec. 5.3 text: MemKD "outperforms ... RD ... by 1.2%, 0.4% on MVTec AD, 1.6%, [1.1%] on VisA ... for image
# AUC and AP" - (dataset, metric): stated gain in percentage points; the VisA image-AP "1.1%" is left out (see above).
MEMKD_TEXT_GAINS_OVER_RD = {("mvtec", "image_auroc"): 1.2, ("mvtec", "image_ap"): 0.4, ("visa", "image_auroc"): 1.6}


# ------------------------------------------------------------------------------------------ published entries
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


@dataclass(frozen=True)
class Published:
    """One published number: ``percent`` as printed; ``value`` as the benchmark's fraction."""

    dataset: str  # "mvtec" | "visa"
    model: str  # the benchmark's model name
    category: str  # anomalib's category name, or MEAN
    metric: str  # the benchmark's metric key
    percent: float
    source: str  # "AAND Table III", "MemKD Table 1(b)", ...

    @property
    def value(self) -> float:
        return percent_to_fraction(self.percent)


def published(dataset: str) -> list[Published]:
    """Every published number for ``dataset`` ("mvtec" / "visa") of a metric in :data:`COMPARED_METRICS`."""
    out = []
    for model, values in AAND_TABLE_II[dataset].items():
        out += [Published(dataset, model, MEAN, m, v, "AAND Table II") for m, v in values.items()]
    if dataset == "visa":
        for model, (values, _) in AAND_TABLE_III.items():
            out += [
                Published(dataset, model, anomalib_category(c), "image_auroc", v, "AAND Table III")
                for c, v in zip(AAND_TABLE_III_COLUMNS, values, strict=True)
            ]
    table = "MemKD Table 1(a)" if dataset == "mvtec" else "MemKD Table 1(b)"
    for model, values in MEMKD_TABLE_1[dataset].items():
        out += [Published(dataset, model, MEAN, m, v, table) for m, v in values.items()]
    return [p for p in out if p.metric in COMPARED_METRICS]


# ------------------------------------------------------------------------------------------ which dataset
def detect_dataset(categories: Sequence[str]) -> str | None:
    """"mvtec" / "visa" when every category is one of that dataset's (anomalib's names), else ``None``."""
    names = set(categories)
    for key, (_, known) in DATASETS.items():
        if names and names <= set(known):
            return key
    return None


def resolve_dataset(rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> str | None:
    """The dataset to compare with: none for generated data or ``--dataset-name none``; ``mvtec`` / ``visa`` as
    given; ``auto`` (default) detects it from the measured categories."""
    if config.get("dataset_kind") == "generated":
        return None
    name = config.get("dataset_name") or "auto"
    if name == "none":
        return None
    if name in DATASETS:
        return name
    return detect_dataset(sorted({r["category"] for r in rows}))


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
def _finite(values: Any) -> list[float]:  # noqa: ANN401
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def compare(rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per published number whose model (and category) was measured: measured mean over seeds (for a
    dataset mean: of the per-seed category mean), std, n seeds, n categories, paper value (fraction), delta
    (measured - paper; ``None`` for a mean over fewer categories than the dataset has), source, note."""
    dataset = resolve_dataset(rows, config)
    if dataset is None:
        return []
    all_categories = DATASETS[dataset][1]
    out = []
    for entry in published(dataset):
        members = [r for r in rows if r["model"] == entry.model and r["category"] in all_categories]
        if entry.category != MEAN:
            members = [r for r in members if r["category"] == entry.category]
        if not members:
            continue
        by_seed: dict[int, dict[str, float]] = {}
        for r in members:
            values = _finite([r.get(entry.metric)])
            if values:
                by_seed.setdefault(int(r["seed"]), {})[r["category"]] = values[0]
        if not by_seed:
            continue
        per_seed = [statistics.fmean(cats.values()) for cats in by_seed.values()]
        covered = {c for cats in by_seed.values() for c in cats}
        complete = entry.category != MEAN or all(len(cats) == len(all_categories) for cats in by_seed.values())
        measured = statistics.fmean(per_seed)
        note = ""
        if len(covered) < len(all_categories) and entry.category == MEAN:
            note = f"measured over {len(covered)} of {len(all_categories)} categories: not the paper's mean, no Δ"
        elif not complete:
            note = f"not every seed covers all {len(all_categories)} categories: no Δ"
        out.append(
            {
                "dataset": dataset,
                "model": entry.model,
                "category": entry.category,
                "metric": entry.metric,
                "measured": measured,
                "measured_std": statistics.stdev(per_seed) if len(per_seed) > 1 else math.nan,
                "n_seeds": len(per_seed),
                "n_categories": len(covered),
                "paper": entry.value,
                "delta": measured - entry.value if complete else None,
                "source": entry.source,
                "note": note,
            },
        )
    order = {m: i for i, m in enumerate(("Aand", "MemKD", "ReverseDistillation"))}
    cat_order = {c: i for i, c in enumerate(all_categories)}
    out.sort(
        key=lambda r: (
            order.get(r["model"], 9),
            r["category"] == MEAN,
            cat_order.get(r["category"], 0),
            COMPARED_METRICS.index(r["metric"]),
            r["source"],
        ),
    )
    return out


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3f}"


def markdown_lines(rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> list[str]:
    """The ``results.md`` section (a list of lines, leading blank line included); ``[]`` when there is nothing to
    compare (generated data, another dataset, or none of Aand / MemKD / ReverseDistillation measured)."""
    records = compare(rows, config)
    if not records:
        return []
    dataset = records[0]["dataset"]
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

    def measured(r: dict[str, Any]) -> str:
        return f"{r['measured']:.3f}" + ("" if math.isnan(r["measured_std"]) else f" ± {r['measured_std']:.3f}")

    lines += report.table(
        ["model", "category", "metric", "measured", "paper", "Δ", "source", "note"],
        (
            [r["model"], r["category"], METRIC_LABELS[r["metric"]], measured(r), f"{r['paper']:.3f}"]
            + [_signed(r["delta"]), r["source"], r["note"]]
            for r in records
        ),
    )
    return lines


CSV_COLUMNS = (
    "dataset",
    "model",
    "category",
    "metric",
    "measured",
    "measured_std",
    "n_seeds",
    "n_categories",
    "paper",
    "delta",
    "source",
    "note",
)


def write_csv(path: Path, rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> bool:
    """``paper_comparison.csv`` (fractions, like ``results.csv``); when there is nothing to compare, writes nothing
    (and removes a stale file from an earlier run into the same folder) and returns ``False``."""
    records = compare(rows, config)
    if not records:
        path.unlink(missing_ok=True)
        return False
    report.write_csv(path, records, CSV_COLUMNS, digits=6)
    return True
