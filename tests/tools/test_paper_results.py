"""The papers' published numbers (paper_results and its packaged data/papers.csv) and their place in the report."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest

from anomalib_kd_tools.benchmark import cli, generator, quality, quality_report, schema
from anomalib_kd_tools.benchmark import paper_results as pr

ROUNDING = 0.05 + 1e-9  # the papers print one decimal: a printed mean is within 0.05 of the true mean


# ------------------------------------------------------------------------------------------ transcription
def _number(source: str, dataset: str, model: str, category: str, metric: str) -> float:
    table = pr.papers()
    match = table[(table.source == source) & (table.dataset == dataset) & (table.model == model)
                  & (table.category == category) & (table.metric == metric) & (table.kind != "gain")]  # fmt: skip
    assert len(match) == 1, (source, dataset, model, category, metric)
    return float(match.percent.iloc[0])


def test_the_transcription_is_packaged_data() -> None:
    """data/papers.csv: one number per line with its source and kind, read through importlib.resources."""
    from importlib.resources import files

    text = (files("anomalib_kd_tools.benchmark") / "data" / "papers.csv").read_text(encoding="utf-8")
    assert text.count("\n# AAND paper, TABLE II ") == 1 and "# MemKD paper, Table 1 " in text  # the notes are kept
    table = pr.papers()
    assert list(table.columns) == ["source", "dataset", "model", "category", "metric", "percent", "kind"]
    assert set(table.kind) == {"value", "printed mean", "repeat", "gain"} and table.percent.between(0, 100).all()
    assert set(table.dataset) == set(pr.DATASETS) and set(table.model) <= {"Aand", "MemKD", "ReverseDistillation"}
    assert not table.duplicated(["source", "dataset", "model", "category", "metric"]).any()
    assert len(table) == 86


def test_per_category_rows_average_to_the_printed_mean_and_to_table_ii() -> None:
    """AAND Table III: each row's 12 categories average to its printed mean, which is Table II's VisA I-AUC."""
    table = pr.papers()
    table_iii = table[table.source == "AAND Table III"]
    for model, rows in table_iii.groupby("model"):
        values = rows[rows.kind == "value"]
        assert tuple(pr.anomalib_category(c) for c in values.category) == pr.VISA_CATEGORIES, model  # column order
        printed_mean = _number("AAND Table III", "visa", model, "mean", "image_auroc")
        assert abs(values.percent.mean() - printed_mean) <= ROUNDING, (model, values.percent.mean())
        assert printed_mean == _number("AAND Table II", "visa", model, "mean", "image_auroc"), model
    # the text's per-category gains (a check the mean cannot make)
    gains = table[(table.kind == "gain") & (table.source == "AAND Sec. IV-C text")]
    assert len(gains) == 2
    for category, gain in zip(gains.category, gains.percent, strict=True):
        aand, rd = (_number("AAND Table III", "visa", m, category, "image_auroc") for m in ("Aand", "ReverseDistillation"))
        assert aand - rd == pytest.approx(gain, abs=1e-9), category


def test_numbers_repeated_in_other_tables_agree() -> None:
    table = pr.papers()
    repeats = table[table.kind == "repeat"]
    assert len(repeats) == 8 + 15
    for entry in repeats.itertuples():
        source = "AAND Table II" if entry.source.startswith("AAND") else "MemKD Table 1(a)"
        assert entry.dataset == "mvtec" or source == "AAND Table II"
        assert _number(source, entry.dataset, entry.model, "mean", entry.metric) == entry.percent, entry
    gains = table[(table.kind == "gain") & (table.source == "MemKD Sec. 5.3 text")]
    assert len(gains) == 3
    for entry in gains.itertuples():
        source = "MemKD Table 1(a)" if entry.dataset == "mvtec" else "MemKD Table 1(b)"
        memkd, rd = (_number(source, entry.dataset, m, "mean", entry.metric) for m in ("MemKD", "ReverseDistillation"))
        assert memkd - rd == pytest.approx(entry.percent, abs=1e-9), entry


def test_category_names_are_anomalibs() -> None:
    from anomalib.data.datasets.image import mvtecad, visa

    assert pr.MVTEC_CATEGORIES == tuple(mvtecad.CATEGORIES)
    assert pr.VISA_CATEGORIES == tuple(visa.CATEGORIES)
    assert pr.anomalib_category("metal nut") == "metal_nut"
    assert pr.anomalib_category("Metal Nut") == "metal_nut"
    assert pr.anomalib_category("maca- roni1") == "macaroni1"
    assert pr.anomalib_category("chewing gum") == "chewinggum"
    assert pr.anomalib_category("pipe fryum") == "pipe_fryum"
    with pytest.raises(ValueError, match="unknown"):
        pr.anomalib_category("widget")


def test_percentages_become_fractions() -> None:
    assert pr.percent_to_fraction(99.5) == pytest.approx(0.995)
    with pytest.raises(ValueError, match="percentage"):
        pr.percent_to_fraction(995.0)
    entries = list(pr.published("visa").itertuples())
    for entry in entries:
        assert entry.value == pytest.approx(entry.percent / 100) and 0.5 < entry.value <= 1.0
    pcb1 = [e for e in entries if e.model == "Aand" and e.category == "pcb1"]
    assert [(e.metric, e.value, e.source) for e in pcb1] == [("image_auroc", pytest.approx(0.984), "AAND Table III")]
    assert not any(e.category == pr.MEAN and e.source == "AAND Table III" for e in entries)  # its printed mean: no
    # MVTec AD: dataset means only, AP columns left out, RD from both papers
    mvtec = list(pr.published("mvtec").itertuples())
    assert {e.category for e in mvtec} == {pr.MEAN}
    assert {e.metric for e in mvtec} == set(pr.COMPARED_METRICS)
    rd = {(e.source, e.metric): e.percent for e in mvtec if e.model == "ReverseDistillation"}
    assert rd[("AAND Table II", "image_auroc")] == 98.5 and rd[("MemKD Table 1(a)", "image_auroc")] == 98.4
    assert len(mvtec) == 3 + 3 + 3 + 3  # Aand, RD (AAND), MemKD, RD (MemKD)


# ------------------------------------------------------------------------------------------ the report
def _row(model: str, category: str, seed: int, image: float, pixel: float, aupro: float, kind: str = "folder"):
    row = {key: math.nan for key in schema.NUMERIC}
    row.update(
        dataset_kind=kind,
        dataset="/data/MVTecAD" if kind == "folder" else "generated",
        category=category,
        model=model,
        seed=seed,
        image_auroc=image,
        pixel_auroc=pixel,
        aupro=aupro,
        image_f1=0.9,
        latency_bs1_ms=10.0,
        threads=1.0,
        backbone="wide_resnet50_2.tv_in1k",
        weights_tag="tv_in1k",
        schedule="100 epochs",
        device="cpu",
        device_name="cpu",
        n_train=10.0,
        n_val=3.0,
        n_test=7.0,
        finished_at="2026-12-02T01:00:00",
    )
    return row


CONFIG = {
    "dataset_kind": "folder",
    "dataset": "/data/MVTecAD",
    "dataset_name": "auto",
    "image_size": 256,
    "batch_size": 16,
    "pre_trained": True,
    "epochs": None,
    "aand_stage_epochs": None,
    "val_split": "synthetic",
    "val_split_ratio": 0.3,
    "split_seed": 0,
}


def _section(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## Paper numbers beside measured ones"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_markdown_and_csv_show_the_delta_for_mvtec_rows(tmp_path: Path) -> None:
    # one MVTec category only: the paper's mean is shown, without a delta
    rows = [_row("Aand", "metal_nut", s, 0.98 + 0.01 * s, 0.97, 0.9) for s in (0, 1)]
    section = _section(quality_report.write_markdown(tmp_path / "one.md", rows, CONFIG))
    assert "(MVTec AD)" in section[0]
    table = [_cells(line) for line in section if line.startswith("| Aand |")]
    image = next(c for c in table if c[2] == "image AUROC")
    assert image[:6] == ["Aand", "mean", "image AUROC", "0.985 ± 0.007", "0.995", "–"]
    assert "1 of 15 categories" in image[7]

    # all 15 categories, two seeds: delta = measured mean - paper (fractions)
    rows = [
        _row(model, c, s, 0.98 + 0.01 * s, 0.97, 0.9)
        for model in ("Aand", "MemKD", "ReverseDistillation", "Patchcore")
        for c in pr.MVTEC_CATEGORIES
        for s in (0, 1)
    ]
    text = quality_report.write_markdown(tmp_path / "all.md", rows, {**CONFIG, "image_size": 128})
    section = _section(text)
    assert any("image size 128 px" in line for line in section)  # the protocol differences are named
    table = {(c[0], c[2], c[6]): c for c in (_cells(line) for line in section[1:]) if len(c) == 8 and c[1] == "mean"}
    assert table[("Aand", "image AUROC", "AAND Table II")][3:6] == ["0.985 ± 0.007", "0.995", "-0.010"]
    assert table[("Aand", "pixel AUROC", "AAND Table II")][3:6] == ["0.970 ± 0.000", "0.984", "-0.014"]
    assert table[("MemKD", "AUPRO", "MemKD Table 1(a)")][3:6] == ["0.900 ± 0.000", "0.945", "-0.045"]
    assert table[("ReverseDistillation", "image AUROC", "AAND Table II")][4:6] == ["0.985", "+0.000"]
    assert table[("ReverseDistillation", "image AUROC", "MemKD Table 1(a)")][4:6] == ["0.984", "+0.001"]
    assert not any(key[0] == "Patchcore" for key in table)  # only the papers' three models

    path = tmp_path / "paper_comparison.csv"
    assert pr.write_csv(path, rows, CONFIG)
    with path.open(newline="") as file:
        records = list(csv.DictReader(file))
    assert list(records[0]) == list(pr.CSV_COLUMNS)
    assert len(records) == 12
    memkd = next(r for r in records if r["model"] == "MemKD" and r["metric"] == "image_auroc")
    assert float(memkd["paper"]) == pytest.approx(0.996)
    assert float(memkd["delta"]) == pytest.approx(0.985 - 0.996)
    assert memkd["n_categories"] == "15" and memkd["n_seeds"] == "2"


def test_visa_is_compared_per_category() -> None:
    rows = [_row("Aand", "pcb1", 0, 0.97, 0.99, 0.93), _row("ReverseDistillation", "pipe_fryum", 0, 0.99, 0.98, 0.9)]
    records = pr.compare(rows, {**CONFIG, "dataset": "/data/visa_pytorch"}).to_dict("records")
    per_category = {(r["model"], r["category"], r["metric"]): r for r in records if r["category"] != pr.MEAN}
    assert set(per_category) == {("Aand", "pcb1", "image_auroc"), ("ReverseDistillation", "pipe_fryum", "image_auroc")}
    assert per_category[("Aand", "pcb1", "image_auroc")]["delta"] == pytest.approx(0.97 - 0.984)
    assert per_category[("ReverseDistillation", "pipe_fryum", "image_auroc")]["delta"] == pytest.approx(0.99 - 0.995)
    assert all(math.isnan(r["delta"]) for r in records if r["category"] == pr.MEAN)  # 1 of 12 categories


def test_nothing_for_generated_or_unknown_data(tmp_path: Path) -> None:
    generated = [_row(m, generator.GENERATED_CATEGORY, 0, 0.9, 0.9, 0.9, kind="generated") for m in generator.MODELS]
    config = {**CONFIG, "dataset_kind": "generated", "dataset": "generated"}
    text = quality_report.write_markdown(tmp_path / "g.md", generated, config)
    assert "Paper numbers" not in text
    stale = tmp_path / "paper_comparison.csv"
    stale.write_text("old")
    assert not pr.write_csv(stale, generated, config) and not stale.exists()
    # generated data named like an MVTec category is still generated
    assert pr.compare([{**generated[2], "category": "bottle"}], {**config, "dataset_name": "mvtec"}).empty
    # a user folder whose categories are neither MVTec AD's nor VisA's, or --dataset-name none
    assert pr.markdown_lines([_row("Aand", "widget", 0, 0.9, 0.9, 0.9)], CONFIG) == []
    assert pr.markdown_lines([_row("Aand", "bottle", 0, 0.9, 0.9, 0.9)], {**CONFIG, "dataset_name": "none"}) == []
    assert pr.detect_dataset(["bottle", "candle"]) is None
    assert pr.detect_dataset(["candle", "pcb4"]) == "visa"


def test_dataset_name_option() -> None:
    assert cli.parse(["quality", "--dataset-root", "x"]).dataset_name == "auto"
    assert cli.parse(["quality", "--dataset-root", "x", "--dataset-name", "visa"]).dataset_name == "visa"
    assert "dataset_name" not in quality.RUN_CONFIG_KEYS  # changing it only changes the report


def test_protocol_differences_name_what_differs_from_the_papers() -> None:
    paper = {**CONFIG, "backbone": None, "aand_stage_epochs": [100, 120]}
    assert pr.protocol_differences(paper) == []
    differences = pr.protocol_differences({**paper, "pre_trained": False, "aand_stage_epochs": [5, 5], "epochs": 3})
    assert any("not ImageNet" in d for d in differences)
    assert any("Aand stages 5+5" in d for d in differences) and any("--epochs 3" in d for d in differences)
    assert any("whole test set" in d for d in pr.protocol_differences({**paper, "val_split": "from_test"}))


def test_a_mean_needs_every_category_for_every_seed() -> None:
    rows = [_row("MemKD", c, 0, 0.99, 0.98, 0.95) for c in pr.MVTEC_CATEGORIES]
    rows.append(_row("MemKD", "bottle", 1, 0.99, 0.98, 0.95))  # seed 1 has one category only
    records = pr.compare(rows, CONFIG).to_dict("records")
    assert records and all(math.isnan(r["delta"]) and "not every seed" in r["note"] for r in records)
    complete = pr.compare(rows[:-1], CONFIG).to_dict("records")
    assert {r["metric"]: round(r["delta"], 6) for r in complete} == {
        "image_auroc": round(0.99 - 0.996, 6),
        "pixel_auroc": round(0.98 - 0.982, 6),
        "aupro": round(0.95 - 0.945, 6),
    }
