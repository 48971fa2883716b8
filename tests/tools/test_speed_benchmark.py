"""Smoke test of ``anomalib-kd-benchmark speed`` on tiny settings: it runs and its derived ratios are consistent."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from anomalib_kd_tools.benchmark import schema

pytestmark = pytest.mark.integration


def test_cli_speed_subcommand(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "anomalib_kd_tools.benchmark", "speed", "--quick", "--output", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "speed.json").read_text())
    train = {row["config"]: row for row in data["train"]}
    assert set(train) == {"rd", "aand-s1", "aand-s1-sub", "aand-s2", "memkd"}
    assert all(row["step_s"] > 0 and row["peak_bytes"] >= 0 for row in train.values())
    derived = data["derived"]
    rd = train["rd"]
    expected = (100 * train["aand-s1"]["step_s"] + 120 * train["aand-s2"]["step_s"]) / (200 * rd["step_s"])
    assert math.isclose(derived["aand_schedule_vs_rd_200"], expected, rel_tol=1e-9)
    assert math.isclose(derived["memkd_epoch_vs_rd"], train["memkd"]["step_s"] / rd["step_s"], rel_tol=1e-9)
    # below the subsampling caps (1000 x 5000 patches) both modes use every pair: identical L_A
    stage1 = train["aand-s1"]
    assert stage1["anomalous_patches"] > 0
    assert math.isclose(stage1["l_a_exact"], stage1["l_a_subsample_mean"], rel_tol=1e-5)
    assert 0 < stage1["synthesis_s"] < stage1["step_s"]

    inference = data["inference"]
    fast = [row for row in inference if row["variant"] == "fast"]
    assert {row["model"] for row in fast} == {"Aand", "MemKD"}
    assert all(0 < row["map_err_vs_fp32"] < 0.05 for row in fast)
    rd_eager = [row for row in inference if row["model"] == "ReverseDistillation" and row["variant"] == "eager-fp32"]
    assert all(math.isclose(row["vs_rd_eager"], 1.0) for row in rd_eager)
    flops = {row["model"]: row["gflop_per_image"] for row in inference if row["variant"] == "eager-fp32"}
    assert flops["Aand"] > flops["ReverseDistillation"] > 0  # the RAA modules add arithmetic to RD's
    assert flops["MemKD"] > flops["ReverseDistillation"]  # 2C-channel decoder inputs
    # every eager row of the CPU run counts its minor page faults per call (the allocator's share of the latency)
    eager = [row for row in inference if row["variant"] == "eager-fp32"]
    assert eager and all(isinstance(row["minor_faults_per_call"], int | float) and row["minor_faults_per_call"] >= 0
                         for row in eager)  # fmt: skip
    assert "page faults / call" in (tmp_path / "speed.md").read_text()
    table = (tmp_path / "speed.md").read_text()
    assert "AAND stage-1 (exact L_A) peak memory / RD" in table
    assert table in result.stdout  # printed as well as written
    # the CSV tables hold the same numbers as the JSON
    step = schema.read_csv(tmp_path / "speed_train.csv", ["step_s"]).set_index("config").step_s.to_dict()
    assert step == {config: row["step_s"] for config, row in train.items()}
    assert len(schema.read_csv(tmp_path / "speed_inference.csv")) == len(inference)
    assert (tmp_path / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
