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


def _readme_rows(heading: str) -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    return rows[2:]  # header and rule


def _number(cell: str) -> float:
    return float(cell.replace("−", "-").replace("+", ""))


def test_readme_texture_margin_table_is_the_csv() -> None:
    """README's RD / gate forced to 0 / AAND means and the split AAND - RD = recipe + amplification, from the CSV."""
    table = pd.read_csv(RESULTS / "aand_texture_margin.csv")
    means = table.groupby(["run", "model"], sort=False)["pixel_auroc"].mean().unstack()
    rows = _readme_rows("### AAND on a textured product")
    assert len(rows) == len(means) == 3
    for row, (_, mean) in zip(rows, means.iterrows(), strict=True):
        rd, zero, aand = (_number(cell) for cell in row[1:4])
        assert (rd, zero, aand) == pytest.approx((mean["RD"], mean["AAND gate=zero"], mean["AAND"]), abs=5e-4), row
        total, recipe, amplification = (_number(v) for v in re.split(r"=|\s\+\s", row[4].replace(" ", " ")) if v.strip())
        assert total == pytest.approx(mean["AAND"] - mean["RD"], abs=1e-3)
        assert recipe == pytest.approx(mean["AAND gate=zero"] - mean["RD"], abs=1e-3)
        assert amplification == pytest.approx(mean["AAND"] - mean["AAND gate=zero"], abs=1e-3)
