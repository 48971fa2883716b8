"""The one report writer (anomalib_kd_tools.benchmark.report): same header for every subcommand, CSV round trip, PNG.

No model is trained here: each subcommand's table writer gets a few hand-made rows (the end-to-end runs are in
test_benchmark.py, test_edge_benchmark.py and test_speed_benchmark.py).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from anomalib_kd_tools.benchmark import ablation, ablation_report, cli, edge, quality_report, report, schema, speed

HEADER = re.compile(
    r"# (?P<title>[^\n]+)\n"
    r"\n"
    r"- Hardware: CPU: [^\n]+ \(\d+ logical CPUs[^\n]*\); [^\n]+\n"
    r"- Date: (?P<date>[^\n;]+); versions: (?P<versions>anomalib \d[^\n]*)\n",
)


def _quality_row(model: str, seed: int) -> dict:
    row = {key: 0.5 for key in schema.NUMERIC}
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
    texts["ablation"] = ablation_report.write_markdown(tmp_path / "ablation.md", ablation_rows, config, variants, {})

    edge_rows = [
        {"model": m, "backend": b, "p50_ms": p50, "p95_ms": 1.5 * p50, "throughput": 100 / p50, "image_auroc": 0.75}
        | {"pixel_auroc": 0.7, "size_mb": 40.0, "params_M": 11.0, "fit_s": 3.0}
        for m, scale in (("Aand", 1.2), ("ReverseDistillation", 1.0))
        for b, p50 in (("torch", 10.0 * scale), ("ov-fp32", 8.0 * scale))
    ]
    edge.add_ratios(edge_rows)
    (tmp_path / "edge").mkdir()
    edge_argv = ["--quick", "--output", str(tmp_path / "edge")]
    texts["edge"] = edge.write_tables(tmp_path / "edge", edge_rows, cli.parse(["edge", *edge_argv]), edge_argv, 10)

    train = [{"config": c, "step_s": t, "peak_bytes": 2e8} for c, t in (("rd", 0.5), ("memkd", 0.6))]
    inference = [
        {"model": m, "variant": "eager-fp32", "batch": 1, "ms": ms, "img_per_s": 1000 / ms, "vs_rd_eager": ms / 20}
        for m, ms in (("ReverseDistillation", 20.0), ("MemKD", 21.0))
    ]
    speed_argv = ["--quick", "--device", "cpu", "--output", str(tmp_path / "speed")]
    args = cli.parse(["speed", *speed_argv])
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
    edge_csv = schema.read_csv(tmp_path / "edge" / "edge.csv", ["p50_ms", "latency_vs_rd"])
    aand = edge_csv.set_index(["model", "backend"]).loc["Aand", "torch"]
    assert aand["latency_vs_rd"] == pytest.approx(1.2) and aand["p50_ms"] == 12.0
    # every table is a pipe table (pandas' to_markdown), its cells as written
    assert "| Aand | torch | 12.0 | 18.0 | 8.3 | 1.20 |" in texts["edge"]
    assert "\n| model | category | seeds | image AUROC | pixel AUROC | AUPRO | image F1 | latency bs1 ms |" in texts["quality"]


def test_csv_round_trips(tmp_path: Path) -> None:
    rows = [
        {"name": "a", "x": 1 / 3, "n": 7, "missing": math.nan, "none": None},
        {"name": "b", "x": 1e-300, "n": -2, "missing": 2.5, "extra": "only here", "json": {"k": [1]}},
    ]
    schema.write_csv(tmp_path / "t.csv", rows)
    back = schema.read_csv(tmp_path / "t.csv", ["x", "n", "missing"])
    assert list(back.columns) == ["name", "x", "n", "missing", "none", "extra", "json"]  # every key, in order
    assert list(back.x) == [1 / 3, 1e-300]  # floats exactly
    assert list(back.n) == [7.0, -2.0]
    assert "\r\na,0.3333333333333333,7,,,,\r\n" in (tmp_path / "t.csv").read_bytes().decode()  # ints stay ints
    assert math.isnan(back.missing[0]) and back.missing[1] == 2.5
    assert back.none[0] == "" and back.extra[1] == "only here" and back.extra[0] == ""
    assert back.json[1] == '{"k": [1]}'
    # the resumable CSV: rows appended one by one, 6 significant digits, header once
    path = tmp_path / "results.csv"
    for row in rows:
        schema.append_row(path, row, ["name", "x", "missing"])
    appended = schema.read_csv(path, ["x", "missing"])
    assert path.read_text().count("name,x,missing") == 1
    assert list(appended.x) == [float(f"{1 / 3:.6g}"), 1e-300]
    assert math.isnan(appended.missing[0])
    assert schema.read_csv(tmp_path / "absent.csv").empty and schema.read_results(tmp_path / "absent.csv").empty


def test_mean_std_and_png(tmp_path: Path) -> None:
    import pandas as pd

    rows = pd.DataFrame({"model": ["a"] * 3 + ["b", "c"], "seed": [0, 1, 2, 0, 0], "x": [1.0, math.nan, 3.0, 0.5, math.nan]})
    stats = schema.aggregate(rows, ["model"], ["x"])["x"]
    assert tuple(stats.loc["a"]) == (2.0, pytest.approx(math.sqrt(2)), 2)
    assert schema.format_mean_std(*stats.loc["b"]) == "0.500"
    assert schema.format_mean_std(*stats.loc["c"]) == "–"
    values = pd.DataFrame({"x": [1.0, 2.0], "y": [3.0, math.nan]}, index=["a", "b"])
    errors = pd.DataFrame({"x": [0.1, math.nan], "y": [0.0, 0.0]}, index=["a", "b"])
    bars = report.Bars(values, "v", errors=errors)
    points = pd.DataFrame({"x": [1.0, math.nan], "x_error": [0.1, 0], "y": [0.5, 1], "y_error": [math.nan, 0]})
    scatter = report.Scatter(points.set_axis(["x", "gone"]), "ms", "AUROC", xlog=True)
    report.write_png(tmp_path / "p.png", [bars, scatter], "title")
    png = (tmp_path / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


# ---------------------------------------------------------------------------------------------- interrupted runs
TINY_QUALITY = ["--generated", "--image-size", "64", "--n-train", "4", "--n-test-good", "2", "--n-test-per-defect", "1"]
TINY_QUALITY += ["--backbone", "resnet18", "--no-pre-trained", "--no-openvino", "--devices", "cpu"]


def test_interrupted_quality_run_writes_the_tables_of_the_finished_cells(tmp_path: Path, monkeypatch) -> None:
    """No training: the first cell 'finishes' with a hand-made row, the second is interrupted (as by a cap)."""
    from anomalib_kd_tools.benchmark import cli, runner
    from anomalib_kd_tools.benchmark.generator import GENERATED_CATEGORY

    terminated = []

    class FakeCell:
        def __init__(self, spec: dict, device: str, run_dir: Path, log_path: Path) -> None:  # noqa: ARG002
            self.spec = spec

        def poll(self) -> dict:
            if self.spec["model"] == "Aand":
                raise KeyboardInterrupt  # what SIGINT / SIGTERM (cli.sigterm_as_interrupt) raise in the parent
            row = _quality_row(self.spec["model"], self.spec["seed"]) | {"category": GENERATED_CATEGORY}
            return {"ok": True, "row": row, "elapsed": 1.0}

        def terminate(self) -> None:
            terminated.append(self.spec["model"])

        def cleanup(self) -> None:
            pass

    monkeypatch.setattr(runner, "CellProcess", FakeCell)
    out = tmp_path / "q"
    code = cli.main(["quality", *TINY_QUALITY, "--models", "Patchcore", "Aand", "--output", str(out)])
    assert code == 130 and terminated == ["Aand"]
    assert list(schema.read_results(out / "results.csv").model) == ["Patchcore"]
    md = (out / "results.md").read_text()
    assert report.INTERRUPTED in md
    assert f"| Patchcore | {GENERATED_CATEGORY} | 0 |" in md and "| Aand |" not in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_speed_run_writes_the_tables_of_what_is_done(tmp_path: Path, monkeypatch) -> None:
    """No training: the first configuration's child 'returns' a row, the second is interrupted."""
    import json
    import subprocess
    from types import SimpleNamespace

    calls = []

    def fake_run(command: list[str], **kwargs) -> SimpleNamespace:  # noqa: ARG001
        config = command[command.index("--child") + 1]
        calls.append(config)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return SimpleNamespace(returncode=0, stdout=json.dumps({"config": config, "step_s": 0.5, "peak_bytes": 1e8}))

    monkeypatch.setattr(subprocess, "run", fake_run)
    out = tmp_path / "s"
    argv = ["--quick", "--device", "cpu", "--output", str(out)]
    assert speed.run(cli.parse(["speed", *argv]), argv) == 130
    assert calls == ["rd", "aand-s1"]
    md = (out / "speed.md").read_text()
    assert report.INTERRUPTED in md and "| rd | 0.500 | 0.10 |" in md
    assert list(schema.read_csv(out / "speed_train.csv").config) == ["rd"]
    assert json.loads((out / "speed.json").read_text())["train"][0]["step_s"] == 0.5
    assert not (out / "speed_inference.csv").exists()  # interrupted before the inference part


def test_sigterm_raises_keyboard_interrupt_inside_the_command() -> None:
    import os
    import signal
    import time

    from anomalib_kd_tools.benchmark import cli

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), cli.sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)  # without the handler this would end the test process
        time.sleep(5)  # the handler raises during the sleep
    assert signal.getsignal(signal.SIGTERM) == before


def test_ablation_png_has_one_panel_per_ablation(tmp_path: Path, monkeypatch) -> None:
    rows = []
    for variant, model in (("AAND", "Aand"), ("AAND no L_A", "Aand"), ("MemKD", "MemKD")):
        for seed, auroc in ((0, 0.6), (1, 0.8)):
            rows.append(_quality_row(model, seed) | {"variant": variant, "image_auroc": auroc})
    variants = [v for v in ablation.variants_of("all") if v.name in {"AAND", "AAND no L_A", "MemKD"}]
    drawn = {}
    monkeypatch.setattr(report, "write_png", lambda path, panels, title: drawn.update(panels=panels, title=title))
    assert ablation_report.write_plot(tmp_path / "r.png", rows, {"dataset_kind": "generated"}, variants, {})
    aand, memkd = drawn["panels"]
    assert (aand.title, memkd.title) == ("aand", "memkd")
    assert list(aand.values.columns) == ["AAND", "AAND no L_A"] and list(memkd.values.columns) == ["MemKD"]
    assert list(aand.values.index) == ["image AUROC", "pixel AUROC", "AUPRO"]
    mean, std = aand.values["AAND"].iloc[0], aand.errors["AAND"].iloc[0]  # image AUROC: mean ± std over the seeds
    assert mean == pytest.approx(0.7) and std == pytest.approx(math.sqrt(0.02))
    assert not ablation_report.write_plot(tmp_path / "none.png", [], {}, variants, {})
