"""The docs' result tables agree with the per-seed rows committed next to them (docs/results/*.csv)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"


def test_every_results_csv_has_per_seed_rows() -> None:
    files = sorted(RESULTS.glob("*.csv"))
    assert files, "docs/results/ holds the per-seed rows of the docs' tables"
    for path in files:
        table = pd.read_csv(path)
        assert "seed" in table.columns and len(table) > 0, path.name
        assert table["seed"].nunique() >= 2, f"{path.name}: one seed is no spread"


def _doc_rows(doc: str, heading: str) -> list[list[str]]:
    """The body rows of the first table under ``heading`` in ``doc`` (up to the next heading)."""
    text = (REPO / doc).read_text()
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return rows[2:]  # header and rule


def _number(cell: str) -> float:
    return float(cell.replace("−", "-").replace("+", ""))


#: docs/aand.md's split table: each row's label -> (CSV run of its AAND / AAND gate=zero columns, CSV run of its RD).
#: The last row compares the long stage 1 with RD trained for 80 epochs, the AAND run's total: two different runs.
TEXTURE_MARGIN_ROWS = {
    "random-init proxy, AAND 10 + 20 epochs (RD 20)": (
        "random proxy, RD 20, AAND 10 + 20",
        "random proxy, RD 20, AAND 10 + 20",
    ),
    "Gabor first layer, same budget": ("gabor proxy, RD 20, AAND 10 + 20", "gabor proxy, RD 20, AAND 10 + 20"),
    "random-init proxy, AAND 60 + 20 epochs (RD 80)": (
        "random proxy, RD 20, AAND 60 + 20",
        "random proxy, RD 80, AAND 10 + 20",
    ),
}


def test_aand_doc_texture_margin_table_is_the_csv() -> None:
    """docs/aand.md's RD / gate forced to 0 / AAND means and the split AAND - RD = recipe + amplification, from the
    CSV, each row from the runs that TEXTURE_MARGIN_ROWS names."""
    table = pd.read_csv(RESULTS / "aand_texture_margin.csv")
    means = table.groupby(["run", "model"])["pixel_auroc"].mean()
    seeds = table.groupby(["run", "model"])["seed"].nunique()
    rows = _doc_rows("docs/aand.md", "### Margin over RD on a brick wall: stage-2 recipe and amplification")
    assert [row[0] for row in rows] == list(TEXTURE_MARGIN_ROWS)
    used = {run for pair in TEXTURE_MARGIN_ROWS.values() for run in pair}
    assert used == set(table["run"]), "every run in the CSV is in the table, and only those"
    for row in rows:
        aand_run, rd_run = TEXTURE_MARGIN_ROWS[row[0]]
        keys = [(rd_run, "RD"), (aand_run, "AAND gate=zero"), (aand_run, "AAND")]
        assert all(seeds[key] == 3 for key in keys), row
        expected = [means[key] for key in keys]
        shown = [_number(cell) for cell in row[1:4]]
        assert shown == pytest.approx(expected, abs=6e-4), row
        total, recipe, amplification = (_number(v) for v in re.split(r"=|\s\+\s", row[4]) if v.strip())
        rd, zero, aand = expected
        assert total == pytest.approx(aand - rd, abs=1e-3), row
        assert recipe == pytest.approx(zero - rd, abs=1e-3), row
        assert amplification == pytest.approx(aand - zero, abs=1e-3), row
        assert total == pytest.approx(recipe + amplification, abs=1e-9), f"{row}: the split adds up as printed"


#: docs/aand_texture_diagnosis.md's run labels -> the CSV's ``run``
DIAGNOSIS_RUNS = {
    "random proxy (calibrated), RD 20, AAND 10 + 20 epochs": "random proxy, RD 20, AAND 10 + 20",
    "random proxy (calibrated), RD 80 epochs": "random proxy, RD 80, AAND 10 + 20",
    "random proxy (calibrated), AAND 60 + 20 epochs": "random proxy, RD 20, AAND 60 + 20",
    "Gabor proxy (calibrated), RD 20, AAND 10 + 20 epochs": "gabor proxy, RD 20, AAND 10 + 20",
}


def _mean_std(cell: str) -> tuple[float, float]:
    mean, std = cell.split("±")
    return _number(mean), _number(std)


def test_texture_diagnosis_tables_are_the_csv() -> None:
    """The diagnosis' per-seed / mean ± sample-std table and its gate table, from the same CSV."""
    table = pd.read_csv(RESULTS / "aand_texture_margin.csv")
    rows = _doc_rows("docs/aand_texture_diagnosis.md", "## Structured proxy, longer stage 1")
    metrics = [row for row in rows if len(row) == 6 and row[0] in DIAGNOSIS_RUNS]
    gates = [row for row in rows if len(row) == 5 and row[0] in DIAGNOSIS_RUNS]
    shown = {(DIAGNOSIS_RUNS[row[0]], row[1].removesuffix(" (80 epochs)")) for row in metrics}
    assert shown == set(table.groupby(["run", "model"]).groups), "one row per (run, model) of the CSV"
    for row in metrics:
        sel = table[(table["run"] == DIAGNOSIS_RUNS[row[0]]) & (table["model"] == row[1].removesuffix(" (80 epochs)"))]
        sel = sel.sort_values("seed")
        assert [_number(v) for v in row[2].split("/")] == pytest.approx(list(sel["pixel_auroc"]), abs=6e-4), row
        for cell, column in zip(row[3:], ("pixel_auroc", "image_auroc", "aupro"), strict=True):
            assert _mean_std(cell) == pytest.approx((sel[column].mean(), sel[column].std()), abs=6e-4), (row, column)
    assert {DIAGNOSIS_RUNS[row[0]] for row in gates} == set(table.loc[table["model"] == "AAND", "run"])
    for row in gates:
        sel = table[(table["run"] == DIAGNOSIS_RUNS[row[0]]) & (table["model"] == "AAND")].sort_values("seed")
        for k, cell in enumerate(row[1:4], 1):
            assert [_number(v) for v in cell.split("/")] == pytest.approx(list(sel[f"gate_tpr_l{k}"]), abs=6e-3), row
        fpr = [sel[f"gate_fpr_l{k}"].max() for k in (1, 2, 3)]
        assert [_number(v) for v in row[4].split("/")] == pytest.approx(fpr, abs=6e-4), row


#: the ablation tables' first cells -> the CSV's ``variant`` (docs/aand.md, docs/memkd.md)
ABLATION_ROWS = {
    "aand": {
        "AAND (as configured)": "AAND",
        "`stage1_epochs=0`": "AAND stage1=0",
        "no L_A": "AAND no L_A",
        "no foreground mask": "AAND no fg mask",
        "no textures": "AAND no textures",
    },
    "memkd": {
        "MemKD (defaults: τ = 1, L_NM sum)": "MemKD",
        "no memory (`use_memory=False`)": "MemKD no memory",
        "no NEL (`lambda_nm=0`)": "MemKD no NEL",
        "τ = 0.1": "MemKD tau=0.1",
        "L_NM sum (= default)": "MemKD L_NM sum",
        "L_NM mean": "MemKD L_NM mean",
    },
}


@pytest.mark.parametrize("model", ["aand", "memkd"])
def test_ablation_table_is_the_csv(model: str) -> None:
    """Each ablation row's image / pixel AUROC and AUPRO (mean ± sample std over the seeds) from the CSV."""
    table = pd.read_csv(RESULTS / f"{model}_ablation.csv")
    rows = _doc_rows(f"docs/{model}.md", "## Ablation" if model == "memkd" else "**AAND ablation**")
    assert [row[0] for row in rows] == list(ABLATION_ROWS[model])
    assert set(ABLATION_ROWS[model].values()) == set(table["variant"]), "every variant of the CSV is in the table"
    for row in rows:
        sel = table[table["variant"] == ABLATION_ROWS[model][row[0]]]
        assert sel["seed"].nunique() == 3, row
        for cell, column in zip(row[1:4], ("image_auroc", "pixel_auroc", "aupro"), strict=True):
            shown = _mean_std(cell.replace("*", ""))
            assert shown == pytest.approx((sel[column].mean(), sel[column].std()), abs=6e-4), (row, column)
