"""The tables of ``quality --ablation``: ``results.md`` (per ablation the metrics and the mechanism figures of the
rows' ``mechanism`` JSON, mean ± std over seeds) and ``results.png``; the variants are :mod:`.ablation`'s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from anomalib_kd_tools.benchmark import quality_report, report, schema
from anomalib_kd_tools.benchmark.ablation import ABLATIONS, TEXTURES, Variant, ablation_of, teacher_label
from anomalib_kd_tools.benchmark.schema import LABELS

ABLATION_METRICS = ("image_auroc", "pixel_auroc", "aupro")


def natural_key(key: str) -> list[Any]:
    """Sort key that orders ``m2`` before ``m10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def figures(rows: pd.DataFrame) -> pd.DataFrame:
    """The mechanism figures of each row (its ``mechanism`` JSON object; ``null`` becomes ``nan``), one column per
    figure in natural order (``m2`` before ``m10``), indexed like ``rows``."""
    parsed = [json.loads(text) if text else {} for text in rows.get("mechanism", pd.Series("", index=rows.index))]
    frame = pd.DataFrame(parsed, index=rows.index, dtype=float)
    return frame[sorted(frame.columns, key=natural_key)]


def _texture_line(config: dict[str, Any]) -> str:
    if config.get("texture_spec"):
        return f"generated DTD-like folder (`make_texture_folder`, {config['texture_spec']}) - not DTD"
    return f"`{config['texture_dir']}`" if config.get("texture_dir") else "none"


def _overrides(overrides: dict[str, Any]) -> str:
    shown = {k: ("<textures>" if v == TEXTURES else v) for k, v in overrides.items()}
    return ", ".join(f"`{k}={v!r}`" for k, v in shown.items()) or "defaults"


def _by_ablation(variants: Sequence[Variant], skipped: dict[str, list[str]]) -> dict[str, tuple[list[str], dict]]:
    """Per ablation (in :data:`ABLATIONS` order): its variants that ran and its skipped ones."""
    out = {}
    for name, members in ABLATIONS.items():
        listed = [v.name for v in variants if ablation_of(v.name) == name]
        skipped_here = {v.name: skipped[v.name] for v in members if v.name in skipped}
        if listed or skipped_here:
            out[name] = (listed, skipped_here)
    return out


def write_markdown(path: Path, rows: pd.DataFrame | Sequence[dict[str, Any]], config: dict[str, Any],
                   variants: Sequence[Variant], skipped: dict[str, list[str]]) -> str:  # fmt: skip
    """``results.md`` of an ablation run: per ablation a metrics table and a mechanism-figures table."""
    rows = pd.DataFrame(rows)
    seeds = sorted(set(rows.seed.astype(int)))
    spec = config.get("generated_spec") or {}
    lines = report.header(
        f"Ablation ({config.get('ablation')}): same data, same seeds",
        quality_report.hardware_line(rows),
        quality_report.finished_line(rows),
        [
            f"Dataset: {quality_report.dataset_line(rows, config)}",
            f"Test defects: {', '.join(spec.get('defects', [])) or 'the dataset’s own'}",
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
    by, metric_columns = ["variant", "category"], ["seeds", *(LABELS[m] for m in ABLATION_METRICS)]
    for name, (listed, skipped_here) in _by_ablation(variants, skipped).items():
        members = rows[rows.variant.isin(listed)]
        measured = members.join(figures(members))
        keys = [k for k in measured.columns if k not in rows.columns]
        order = {"variant": listed}
        stats = schema.mean_std_table(measured, by, [*ABLATION_METRICS, "train_time_s", *keys], order=order)
        table = stats.join(members.groupby(by).schedule.first(), on=by)
        table.insert(1, "overrides", [_overrides(overrides.get(v, {})) for v in table.variant])
        table = table[["variant", "overrides", "category", *metric_columns, "schedule", "train s"]].astype(object)
        skipped_rows = [[variant, f"skipped: the constructor has no `{'`, `'.join(missing)}`", *[""] * 7]
                        for variant, missing in skipped_here.items()]  # fmt: skip
        table = pd.concat([table, pd.DataFrame(skipped_rows, columns=table.columns, dtype=object)])
        lines += [f"## {name}: metrics", "", *report.markdown(table)]
        lines += ["", f"## {name}: mechanism figures (`mechanism_report` on the test images)", ""]
        no_figures = "No figures: the model has no `mechanism_report` or it returned none."
        lines += report.markdown(stats[[*by, *keys]]) if keys else [no_figures]
        status = members.groupby(by).mechanism_status.agg(lambda s: ", ".join(sorted(set(s) - {"ok"})))
        notes = sorted({f"{variant}: {text}" for (variant, _), text in status.items() if text})
        if notes:
            lines += ["", "Status: " + "; ".join(notes)]
        lines.append("")
    lines += ["## Raw rows (results.csv)", ""]
    raw = rows.sort_values(["variant", "category", "seed"])
    values = schema.formatted_values(raw, (*ABLATION_METRICS, "train_time_s"))
    raw_table = pd.concat([raw[["variant", "category", "seed"]], values], axis=1)
    lines += report.markdown(raw_table.assign(mechanism=raw.get("mechanism_status", "")))
    if config.get("dataset_kind") == "generated":
        lines += ["", f"Generated data and a {teacher_label(config)}: these numbers test whether each mechanism "
                  "moves the metrics on this data; they are not the papers' MVTec AD / VisA results."]
    return report.write_text(path, lines)


def write_plot(path: Path, rows: pd.DataFrame | Sequence[dict[str, Any]], config: dict[str, Any],
               variants: Sequence[Variant], skipped: dict[str, list[str]]) -> bool:  # fmt: skip
    """``results.png`` of an ablation run: per ablation, bars of each variant's image AUROC, pixel AUROC and AUPRO
    (mean ± std over seeds of the mean over categories). Writes nothing and returns ``False`` without rows."""
    rows = pd.DataFrame(rows)
    panels = []
    for name, (listed, _) in _by_ablation(variants, skipped).items():
        shown = [v for v in listed if v in set(rows.get("variant", ()))]
        if shown:
            members, order = rows[rows.variant.isin(shown)], {"variant": shown}
            stats = schema.aggregate(members, ["variant"], ABLATION_METRICS, over_categories=True, order=order)
            panels.append(report.Bars.of(stats, ABLATION_METRICS, quality_report.SCORES, title=name, ylim=(0, 1.05)))
    if panels:
        report.write_png(path, panels, f"Ablation: {quality_report.plot_title(rows, config)}")
    return bool(panels)
