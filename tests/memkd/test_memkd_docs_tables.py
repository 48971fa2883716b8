"""MemKD's addressing tables (docs/memkd.md, README) are the means of the per-seed rows in docs/results."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
CSV = REPO / "docs" / "results" / "memkd_addressing.csv"
FIGURES = ("peak_over_uniform", "entropy_ratio", "recall_dev")
CONFIG = re.compile(r"τ = (?P<tau>[\d.]+), (?:L_NM )?(?P<reduction>sum|mean)")


def _rows(text: str, heading: str) -> list[list[str]]:
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[2:]]


def _numbers(cell: str) -> list[float]:
    return [float(value) for value in re.findall(r"-?\d+\.\d+", cell)]


def _check(shown_cell: str, exact: list[float]) -> None:
    shown = _numbers(shown_cell)
    assert len(shown) == len(exact), (shown_cell, exact)
    for value, truth in zip(shown, exact, strict=True):
        assert _close_text(value, truth, shown_cell), (shown_cell, exact)


def _close_text(value: float, truth: float, cell: str) -> bool:
    # the number of decimals as written in the cell (float() drops trailing zeros)
    written = next(token for token in re.findall(r"-?\d+\.\d+", cell) if float(token) == value)
    digits = len(written.split(".")[1])
    return abs(value - truth) <= 0.5 * 10**-digits + 1e-9


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    rows = pd.read_csv(CSV)
    assert set(rows["phase"]) == {"random", "before", "after"}
    assert rows.groupby(["tau", "nm_reduction", "phase"])["seed"].nunique().min() >= 3
    return rows


def _mean(table: pd.DataFrame, tau: float, reduction: str, phase: str, column: str) -> float:
    chosen = table[(table["tau"] == tau) & (table["nm_reduction"] == reduction) & (table["phase"] == phase)]
    assert len(chosen) >= 3, (tau, reduction, phase)
    return float(chosen[column].mean())


def _std(table: pd.DataFrame, tau: float, reduction: str, column: str) -> float:
    chosen = table[(table["tau"] == tau) & (table["nm_reduction"] == reduction) & (table["phase"] == "after")]
    return float(chosen[column].std())


def test_docs_addressing_table_is_the_csv(table: pd.DataFrame) -> None:
    rows = _rows((REPO / "docs" / "memkd.md").read_text(), "Mean over seeds 0, 1, 2")
    assert len(rows) == 6
    for row in rows:
        match = CONFIG.search(row[0])
        assert match, row
        tau, reduction, phase = float(match["tau"]), match["reduction"], row[1]
        chosen = table[(table["tau"] == tau) & (table["nm_reduction"] == reduction) & (table["phase"] == phase)]
        assert int(row[2]) == chosen["seed"].nunique()
        for cell, name in zip(row[3:6], FIGURES, strict=True):
            _check(cell, [_mean(table, tau, reduction, phase, f"{name}_m{m}") for m in range(3)])
        for cell, metric in zip(row[6:8], ("image_AUROC", "pixel_AUROC"), strict=True):
            if phase == "after":
                _check(cell, [_mean(table, tau, reduction, phase, metric), _std(table, tau, reduction, metric)])
            else:
                assert cell == "–", row


def test_readme_addressing_claim_is_what_the_csv_shows(table: pd.DataFrame) -> None:
    """The README's one-line claim (trained recall addresses like random keys, at both τ) holds in the rows."""
    readme = (REPO / "README.md").read_text()
    line = readme.split("**MemKD's memory**", 1)[1].split("\n- ", 1)[0]
    assert "like random keys" in line and "docs/memkd.md#addressing-evidence" in line, line
    assert "## Addressing evidence" in (REPO / "docs" / "memkd.md").read_text()
    for tau, reduction in ((1.0, "sum"), (0.1, "mean")):
        for m in range(3):
            after = _mean(table, tau, reduction, "after", f"peak_over_uniform_m{m}")
            random = _mean(table, tau, reduction, "random", f"peak_over_uniform_m{m}")
            assert abs(after - random) <= 0.15 * random, (tau, reduction, m, after, random)
