"""The one report writer (anomalib_kd_tools.benchmark.report): same header for every subcommand, CSV round trip, PNG.

No model is trained here: each subcommand's table writer gets a few hand-made rows (the end-to-end runs are in
test_benchmark.py, test_edge_benchmark.py and test_speed_benchmark.py).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from anomalib_kd_tools.benchmark import ablation, edge, job, quality_report, report, speed

HEADER = re.compile(
    r"# (?P<title>[^\n]+)\n"
    r"\n"
    r"- Hardware: CPU: [^\n]+ \(\d+ logical CPUs[^\n]*\); [^\n]+\n"
    r"- Date: (?P<date>[^\n;]+); versions: (?P<versions>anomalib \d[^\n]*)\n",
)


def _quality_row(model: str, seed: int) -> dict:
    row = {key: 0.5 for key in job.NUMERIC}
    row.update(dataset_kind="generated", dataset="generated", category="widget", model=model, seed=seed)
    row.update(threads=1.0, backbone="resnet18", weights_tag="random-init", schedule="1 epoch", device="cpu")
    row.update(device_name="cpu", n_train=8.0, n_val=3.0, n_test=7.0, memory_kind="cpu_peak_rss")
    row.update(finished_at="2026-12-02T01:00:00", variant=f"{model}", mechanism="{}", mechanism_status="absent")
    return row


def _outputs(tmp_path: Path) -> dict[str, str]:
    """The markdown of quality, its ablation mode, edge and speed, each from its own writer."""
    rows = [_quality_row(m, s) for m in ("Aand", "MemKD") for s in (0, 1)]
    config = {"dataset_kind": "generated", "generated_spec": {"n_train": 8}, "image_size": 64, "pre_trained": False}
    texts = {"quality": quality_report.write_markdown(tmp_path / "results.md", rows, config)}
    variants = [v for v in ablation.variants_of("memkd") if v.name == "MemKD"]
    ablation_rows = [r for r in rows if r["model"] == "MemKD"]
    texts["ablation"] = ablation.write_markdown(tmp_path / "ablation.md", ablation_rows, config, variants, {})

    edge_rows = [
        {"model": m, "backend": b, "p50_ms": p50, "p95_ms": 1.5 * p50, "throughput": 100 / p50, "image_auroc": 0.75}
        | {"params_M": 11.0, "fit_s": 3.0}
        for m, scale in (("Aand", 1.2), ("ReverseDistillation", 1.0))
        for b, p50 in (("torch", 10.0 * scale), ("ov-fp32", 8.0 * scale))
    ]
    edge.add_ratios(edge_rows)
    (tmp_path / "edge").mkdir()
    edge_argv = ["--quick", "--output", str(tmp_path / "edge")]
    texts["edge"] = edge.write_tables(tmp_path / "edge", edge_rows, edge.parse_args(edge_argv), edge_argv, 10)

    train = [{"config": c, "step_s": t, "peak_bytes": 2e8} for c, t in (("rd", 0.5), ("memkd", 0.6))]
    inference = [
        {"model": m, "variant": "eager-fp32", "batch": 1, "ms": ms, "img_per_s": 1000 / ms, "vs_rd_eager": ms / 20}
        for m, ms in (("ReverseDistillation", 20.0), ("MemKD", 21.0))
    ]
    speed_argv = ["--quick", "--device", "cpu", "--output", str(tmp_path / "speed")]
    args = speed.parse_args(speed_argv)
    derived = {"memkd_epoch_vs_rd": 1.2}
    texts["speed"] = speed.write_tables(tmp_path / "speed", train, derived, inference, args, speed_argv)
    return texts


def test_every_subcommand_writes_the_same_header(tmp_path: Path) -> None:
    texts = _outputs(tmp_path)
    headers = {name: HEADER.match(text) for name, text in texts.items()}
    assert all(headers.values()), {name: text[:400] for name, text in texts.items() if not headers[name]}
    assert len({h["versions"] for h in headers.values()}) == 1  # one versions line, written by one function
    assert headers["quality"]["date"] == headers["ablation"]["date"] == "cells finished 2026-12-02 01:00 UTC"
    for name in ("edge", "speed"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", headers[name]["date"]), headers[name]["date"]
        assert f"- Command: `anomalib-kd-benchmark {name} --quick" in texts[name]
    # each writer also wrote its CSV and PNG next to the markdown, and the markdown file is the returned text
    assert (tmp_path / "edge" / "edge.md").read_text() == texts["edge"]
    assert (tmp_path / "speed" / "speed.md").read_text() == texts["speed"]
    for png in (tmp_path / "edge" / "edge.png", tmp_path / "speed" / "speed.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    edge_csv = report.read_csv(tmp_path / "edge" / "edge.csv", ["p50_ms", "latency_vs_rd"])
    aand = next(r for r in edge_csv if r["model"] == "Aand" and r["backend"] == "torch")
    assert aand["latency_vs_rd"] == pytest.approx(1.2) and aand["p50_ms"] == 12.0


def test_csv_round_trips(tmp_path: Path) -> None:
    rows = [
        {"name": "a", "x": 1 / 3, "n": 7, "missing": math.nan, "none": None},
        {"name": "b", "x": 1e-300, "n": -2, "missing": 2.5, "extra": "only here"},
    ]
    report.write_csv(tmp_path / "t.csv", rows)
    back = report.read_csv(tmp_path / "t.csv", ["x", "n", "missing"])
    assert list(back[0]) == ["name", "x", "n", "missing", "none", "extra"]  # every key, in order of appearance
    assert [r["x"] for r in back] == [1 / 3, 1e-300]  # floats exactly
    assert [r["n"] for r in back] == [7.0, -2.0]
    assert math.isnan(back[0]["missing"]) and back[1]["missing"] == 2.5
    assert back[0]["none"] == "" and back[1]["extra"] == "only here" and back[0]["extra"] == ""
    # the resumable CSV: rows appended one by one, 6 significant digits, header once
    path = tmp_path / "results.csv"
    for row in rows:
        report.append_row(path, row, ["name", "x", "missing"])
    appended = report.read_csv(path, ["x", "missing"])
    assert path.read_text().count("name,x,missing") == 1
    assert [r["x"] for r in appended] == [float(f"{1 / 3:.6g}"), 1e-300]
    assert math.isnan(appended[0]["missing"])
    assert report.read_csv(tmp_path / "absent.csv") == []


def test_mean_std_and_png(tmp_path: Path) -> None:
    assert report.mean_std([1.0, math.nan, 3.0]) == (2.0, pytest.approx(math.sqrt(2)), 2)
    assert report.format_mean_std(report.mean_std([0.5])) == "0.500"
    assert report.format_mean_std(report.mean_std([])) == "–"
    bars = report.Bars(["a", "b"], {"x": [(1.0, 0.1), (2.0, math.nan)], "y": [(3.0, 0.0), (math.nan, 0.0)]}, "v")
    scatter = report.Scatter({"x": (1.0, 0.1, 0.5, math.nan), "gone": (math.nan, 0, 1, 0)}, "ms", "AUROC", xlog=True)
    report.write_png(tmp_path / "p.png", [bars, scatter], "title")
    png = (tmp_path / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
