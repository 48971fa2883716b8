"""``benchmarks/memkd_addressing.py`` (docs/memkd.md's before/after addressing table) and its ``--csv`` rows.

The docs' table is the mean of the per-seed rows in docs/results/memkd_addressing.csv, written by the command the
docs show; this runs the same script on a tiny configuration (resnet18, 64 px, two optimiser steps) and checks the
rows it writes: three phases per run (random memory, before training, after training), the addressing figures of
each memory, and that "before" is measured on the untrained model (it differs from "after").
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "memkd_addressing.py"
FIGURES = [f"{name}_m{m}" for name in ("peak_over_uniform", "entropy_ratio", "recall_dev") for m in range(3)]

pytestmark = pytest.mark.integration


def test_addressing_script_writes_random_before_and_after_rows(tmp_path: Path) -> None:
    out_csv = tmp_path / "rows.csv"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--configs", "t0.1:mean", "t1.0:sum:signed", "--seeds", "3",
               "--epochs", "1", "--ntrain", "8", "--batch", "4", "--exemplars", "2", "--n-test-good", "2",
               "--n-test-per-defect", "1", "--work", str(tmp_path / "work"), "--csv", str(out_csv)]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    with out_csv.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        header = reader.fieldnames
    assert header is not None and {"tau", "nm_reduction", "orth_form", "seed", "phase", *FIGURES} <= set(header)
    keys = [(row["tau"], row["nm_reduction"], row["orth_form"], row["seed"], row["phase"]) for row in rows]
    assert keys == [
        (tau, reduction, orth, "3", phase)
        for tau, reduction, orth in (("0.1", "mean", "abs"), ("1.0", "sum", "signed"))
        for phase in ("random", "before", "after")
    ]
    for row in rows:
        figures = {name: float(row[name]) for name in FIGURES}
        assert all(math.isfinite(value) for value in figures.values()), row
        assert all(figures[f"peak_over_uniform_m{m}"] >= 1.0 - 1e-3 for m in range(3)), row  # at least uniform
        assert all(0.0 < figures[f"entropy_ratio_m{m}"] <= 1.0 + 1e-6 for m in range(3)), row
        assert (row["phase"] == "after") == (row["image_AUROC"] != ""), row  # only the trained model is tested
        assert (int(row["steps"]) > 0) == (row["phase"] == "after"), row
        assert row["backbone"] == "resnet18" and row["size"] == "64" and row["batch"] == "4"
    for config in range(2):
        random, before, after = rows[3 * config : 3 * config + 3]
        # "before" is the untrained model: two optimiser steps moved the memories, so the figures moved too
        assert any(before[name] != after[name] for name in FIGURES), (before, after)
        assert float(after["train_kd"]) > 0 and float(after["train_nm_sum"]) > float(after["train_nm_mean"])
    # tau = 0.1 is selective already at random init (random keys), tau = 1 is not: the random phase shows it
    assert float(rows[0]["peak_over_uniform_m0"]) > 2 * float(rows[3]["peak_over_uniform_m0"])

    # the JSON line of each run keeps the after-training figures unprefixed, the other phases prefixed
    lines = [json.loads(line) for line in (tmp_path / "work" / "results.jsonl").read_text().splitlines()]
    assert [(line["tau"], line["reduction"], line["orth_form"]) for line in lines] == [
        (0.1, "mean", "abs"), (1.0, "sum", "signed")
    ]  # fmt: skip
    for line, after in zip(lines, (rows[2], rows[5]), strict=True):
        assert line["peak_over_uniform_m0"] == pytest.approx(float(after["peak_over_uniform_m0"]), abs=1e-4)
        assert "before_peak_over_uniform_m0" in line and "random_peak_over_uniform_m0" in line


def test_bad_configuration_is_refused() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--configs", "0.1-mean"], env=env, capture_output=True,
                            text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode != 0 and "t<tau>:<sum|mean>" in result.stderr
