"""The tables of an ablation run (``anomalib-kd-benchmark quality --ablation``): ``results.md`` and ``results.png``.

Aggregation over seeds per (variant, category) of the metrics and of the models' ``mechanism_report`` figures
(:func:`summarise`), and the content of the two files; the files themselves, the header every table shares and the
markdown tables are :mod:`.report`'s, the header lines of a quality run :mod:`.quality_report`'s. The variants and
options are :mod:`.ablation`'s.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib_kd_tools.benchmark import quality_report, report
from anomalib_kd_tools.benchmark.ablation import ABLATIONS, TEXTURES, Variant, ablation_of, teacher_label
from anomalib_kd_tools.benchmark.job import METRIC_LABELS, NUMERIC

ABLATION_METRICS = ("image_auroc", "pixel_auroc", "aupro")


# ---------------------------------------------------------------------------------------------- aggregation
def figures_of(row: dict[str, Any]) -> dict[str, float]:
    """The mechanism figures of a ``results.csv`` row (its ``mechanism`` JSON object; ``null`` becomes ``nan``)."""
    text = row.get("mechanism") or ""
    if not text:
        return {}
    return {k: (math.nan if v is None else float(v)) for k, v in json.loads(text).items()}


def natural_key(key: str) -> list[Any]:
    """Sort key that orders ``m2`` before ``m10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def summarise(rows: Sequence[dict[str, Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    """Per (variant, category): mean / std / n over seeds of the metrics and of every mechanism figure."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["category"]), []).append(row)
    order = {name: i for i, name in enumerate(variants)}
    out = []
    for (variant, category), members in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0])):
        figures = [figures_of(r) for r in members]
        keys = sorted({k for f in figures for k in f}, key=natural_key)
        out.append(
            {
                "variant": variant,
                "category": category,
                "seeds": sorted(int(r["seed"]) for r in members),
                "schedule": members[0].get("schedule", ""),
                "status": sorted({str(r.get("mechanism_status", "")) for r in members}),
                **{k: report.mean_std(r[k] for r in members) for k in NUMERIC},
                "figures": {k: report.mean_std(f.get(k, math.nan) for f in figures) for k in keys},
            },
        )
    return out


def over_categories(rows: Sequence[dict[str, Any]], variant: str, metric: str) -> tuple[float, float, int]:
    """Mean / std / n over seeds of the per-seed mean over categories of one variant's metric."""
    by_seed: dict[int, list[float]] = {}
    for row in rows:
        if row["variant"] == variant:
            by_seed.setdefault(int(row["seed"]), []).append(row[metric])
    return report.mean_std(report.mean_std(values)[0] for values in by_seed.values())


# ---------------------------------------------------------------------------------------------- results.md / .png
def _texture_line(config: dict[str, Any]) -> str:
    if config.get("texture_spec"):
        return f"generated DTD-like folder (`make_texture_folder`, {config['texture_spec']}) - not DTD"
    return f"`{config['texture_dir']}`" if config.get("texture_dir") else "none"


def _overrides(overrides: dict[str, Any]) -> str:
    shown = {k: ("<textures>" if v == TEXTURES else v) for k, v in overrides.items()}
    return ", ".join(f"`{k}={v!r}`" for k, v in shown.items()) or "defaults"


def _by_ablation(variants: Sequence[Variant], skipped: dict[str, list[str]]) -> dict[str, tuple[list[str], dict]]:
    """Per ablation (in :data:`ABLATIONS` order): its variants that ran and its skipped ones."""
    listed: dict[str, list[str]] = {}
    for variant in variants:
        listed.setdefault(ablation_of(variant.name), []).append(variant.name)
    out = {}
    for name in ABLATIONS:
        skipped_here = {v.name: skipped[v.name] for v in ABLATIONS[name] if v.name in skipped}
        if listed.get(name) or skipped_here:
            out[name] = (listed.get(name, []), skipped_here)
    return out


def write_markdown(
    path: Path,
    rows: Sequence[dict[str, Any]],
    config: dict[str, Any],
    variants: Sequence[Variant],
    skipped: dict[str, list[str]],
) -> str:
    """``results.md`` of an ablation run: per ablation a metrics table and a mechanism-figures table."""
    seeds = sorted({int(r["seed"]) for r in rows})
    spec = config.get("generated_spec") or {}
    ms = report.format_mean_std
    lines = report.header(
        f"Ablation ({config.get('ablation')}): same data, same seeds",
        quality_report.hardware_line(rows),
        quality_report.finished_line(rows),
        [
            f"Dataset: {quality_report.dataset_line(rows, config)}",
            f"Test defects: {', '.join(spec.get('defects', [])) or 'the dataset’s own'}"
            + (f"; product: {spec['product']}" if spec.get("product") else ""),
            f"Teacher: **{teacher_label(config)}**; backbone {config.get('backbone') or 'model default'}; image size "
            f"{config.get('image_size')} px; batch size {config.get('batch_size')}; "
            f"seeds: {', '.join(map(str, seeds))}",
            f"AAND textures (`anomaly_source_path`): {_texture_line(config)}; AAND foreground: "
            f"{config.get('aand_foreground') or 'model default'}",
            "Values: mean ± sample std over seeds; metrics on the raw scores of the test images outside the "
            "validation split",
        ],
        interrupted=bool(config.get("interrupted")),
    )
    overrides = {v.name: v.overrides for v in variants}
    metric_columns = [METRIC_LABELS[m] for m in ABLATION_METRICS]
    for name, (listed, skipped_here) in _by_ablation(variants, skipped).items():
        summaries = summarise([r for r in rows if r["variant"] in listed], listed)
        lines += [f"## {name}: metrics", ""]
        lines += report.table(
            ["variant", "overrides", "category", "seeds", *metric_columns, "schedule", "train s"],
            [
                *(
                    [s["variant"], _overrides(overrides.get(s["variant"], {})), s["category"], len(s["seeds"])]
                    + [ms(s[m]) for m in ABLATION_METRICS]
                    + [s["schedule"], ms(s["train_time_s"], 1)]
                    for s in summaries
                ),
                *(
                    [variant, f"skipped: the constructor has no `{'`, `'.join(missing)}`", *[""] * 7]
                    for variant, missing in skipped_here.items()
                ),
            ],
        )
        keys = sorted({k for s in summaries for k in s["figures"]}, key=natural_key)
        lines += ["", f"## {name}: mechanism figures (`mechanism_report` on the test images)", ""]
        if keys:
            lines += report.table(
                ["variant", "category", *keys],
                (
                    [s["variant"], s["category"]] + [ms(s["figures"].get(k, (math.nan, math.nan, 0))) for k in keys]
                    for s in summaries
                ),
            )
        notes = {f"{s['variant']}: {', '.join(x for x in s['status'] if x != 'ok')}" for s in summaries}
        notes = sorted(n for n in notes if not n.endswith(": "))
        if not keys:
            lines.append("No figures: the model has no `mechanism_report` or it returned none.")
        if notes:
            lines += ["", "Status: " + "; ".join(notes)]
        lines.append("")
    lines += ["## Raw rows (results.csv)", ""]
    lines += report.table(
        ["variant", "category", "seed", *metric_columns, "train s", "mechanism"],
        (
            [r["variant"], r["category"], r["seed"], *(report.fmt(r[m]) for m in ABLATION_METRICS)]
            + [report.fmt(r["train_time_s"], 1), r.get("mechanism_status", "")]
            for r in sorted(rows, key=lambda r: (r["variant"], r["category"], r["seed"]))
        ),
    )
    if config.get("dataset_kind") == "generated":
        lines += [
            "",
            f"Generated data and a {teacher_label(config)}: these numbers test whether each mechanism moves the "
            "metrics on this data; they are not the papers' MVTec AD / VisA results.",
        ]
    return report.write_text(path, lines)


def write_plot(
    path: Path,
    rows: Sequence[dict[str, Any]],
    config: dict[str, Any],
    variants: Sequence[Variant],
    skipped: dict[str, list[str]],
) -> bool:
    """``results.png`` of an ablation run: per ablation, bars of each variant's image AUROC, pixel AUROC and AUPRO
    (mean ± std over seeds of the mean over categories). Writes nothing and returns ``False`` without rows."""
    measured = {r["variant"] for r in rows}
    panels = []
    for name, (listed, _) in _by_ablation(variants, skipped).items():
        shown = [v for v in listed if v in measured]
        if shown:
            series = {v: [over_categories(rows, v, m)[:2] for m in ABLATION_METRICS] for v in shown}
            labels = [METRIC_LABELS[m] for m in ABLATION_METRICS]
            panels.append(report.Bars(labels, series, "score (mean ± std over seeds)", title=name, ylim=(0, 1.05)))
    if not panels:
        return False
    kind = "GENERATED data (not MVTec AD)" if config.get("dataset_kind") == "generated" else str(config.get("dataset"))
    title = f"Ablation: {kind}, {teacher_label(config)}, {config.get('image_size')} px - {quality_report.hardware_line(rows)}"
    report.write_png(path, panels, title)
    return True


__all__ = ["figures_of", "natural_key", "summarise", "write_markdown", "write_plot"]
