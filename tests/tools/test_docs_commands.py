"""Documented commands that no other test runs, run here on tiny settings (see tests/test_docs.py).

* ``bash scripts/demo.sh`` (README): the script installs, then hands over to ``anomalib-kd-demo``; the demo runs
  here with tiny epochs and must write metrics and heat maps for both models.
* ``python benchmarks/memkd_addressing.py`` (docs/memkd.md): one configuration, one epoch, one seed.
* ``python benchmarks/aand_texture.py --probe`` / ``--curve`` (docs/aand_texture_diagnosis.md): one seed, tiny set.
* ``anomalib export ... --compression_type FP16`` (docs/export.md): the stock CLI, in process, on a tiny checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_demo_script_runs_the_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bash scripts/demo.sh` = setup_env.sh, then `anomalib-kd-demo "$@"`; the demo itself end to end, tiny."""
    lines = [line.strip() for line in (REPO / "scripts" / "demo.sh").read_text().splitlines()]
    assert any("scripts/setup_env.sh" in line for line in lines)
    assert lines[-1] == 'exec "$venv/bin/anomalib-kd-demo" "$@"'
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["anomalib-kd-demo"] == "anomalib_kd_tools.demo:main"

    from anomalib_kd_tools import demo

    out = tmp_path / "demo_output"
    demo.main([
        "--output", str(out), "--image-size", "64", "--n-train", "6", "--batch-size", "4",
        "--stage1-epochs", "1", "--stage2-epochs", "1", "--memkd-epochs", "1", "--exemplars", "2",
    ])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert [run["model"] for run in summary["runs"]] == ["Aand", "MemKD"]
    for run in summary["runs"]:
        assert 0.0 <= run["image_AUROC"] <= 1.0 and 0.0 <= run["pixel_AUROC"] <= 1.0, run
        assert run["heat_maps"] and list(Path(run["heat_maps"]).rglob("*.png")), run
        assert Path(run["checkpoint"]).is_file(), run
    printed = capsys.readouterr().out
    assert "| Aand |" in printed and "| MemKD |" in printed  # the table the README's results come from


def test_metrics_cost_benchmark_runs(tmp_path: Path) -> None:
    """`python benchmarks/metrics_cost.py` (docs/training.md): both evaluators timed, the papers' one has 3 more metrics."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "metrics_cost.py"), "--images", "6", "--size", "32", "--batch", "4",
         "--repeats", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| anomalib default", "| papers'"))]
    assert len(rows) == 2
    assert rows[0].count("_") == 4 and "pixel_AUPRO" in rows[1] and "image_AUPR" in rows[1]


def test_memkd_addressing_script_runs(tmp_path: Path) -> None:
    """`python benchmarks/memkd_addressing.py --configs ... --seeds ... --epochs ...`, one tiny configuration."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "memkd_addressing.py"), "--configs", "t1.0:sum",
         "--seeds", "0", "--epochs", "1", "--ntrain", "4", "--work", str(tmp_path / "work")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "work" / "results.jsonl").read_text().splitlines()]
    assert [(row["tau"], row["reduction"]) for row in rows] == [(1.0, "sum")]  # "t<tau>:<L_NM reduction>"
    for row in rows:
        assert 0.0 <= row["image_AUROC"] <= 1.0
        # the addressing figures of the docs' table: peak read weight per memory, at least uniform (1/L)
        peaks = [value for key, value in row.items() if key.startswith("peak_weight_m")]
        assert len(peaks) == 3 and all(peak >= 1 / 50 - 1e-6 for peak in peaks), row


def _aand_texture():
    spec = importlib.util.spec_from_file_location("aand_texture", REPO / "benchmarks" / "aand_texture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_TEXTURE = ["--seeds", "0", "--size", "64", "--n-train", "4", "--n-test-good", "2", "--n-test-per-defect", "1",
                "--defects", "foreign", "tint", "--batch", "4"]  # fmt: skip


def test_aand_texture_probe_mode_runs(tmp_path: Path) -> None:
    """`benchmarks/aand_texture.py --probe` (the diagnosis' linear-probe table), Gabor teacher, tiny set."""
    out = tmp_path / "run"
    assert _aand_texture().main(["--out", str(out), *TINY_TEXTURE, "--teacher", "gabor", "--probe"]) == 0
    (row,) = [json.loads(line) for line in (out / "probe.jsonl").read_text().splitlines()]
    assert (row["model"], row["teacher"]) == ("linear probe", "gabor")
    for k in (1, 2, 3):
        assert 0.0 <= row[f"probe_synthetic_auroc_l{k}"] <= 1.0, row
        assert 0.0 < row[f"positive_rate_l{k}"] < 1.0, row  # pseudo-anomalies were drawn, not every patch


def test_aand_texture_curve_mode_runs(tmp_path: Path) -> None:
    """`benchmarks/aand_texture.py --curve N ...` (the diagnosis' stage-1 gate curve), random proxy, tiny set."""
    out = tmp_path / "run"
    assert _aand_texture().main(["--out", str(out), *TINY_TEXTURE, "--teacher", "random", "--curve", "2", "1"]) == 0
    rows = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert [row["steps"] for row in rows] == [1, 2]  # cumulative, sorted
    for row in rows:
        assert all(0.0 <= row[f"gate_fpr_l{k}"] <= 1.0 for k in (1, 2, 3)), row


def test_stock_cli_exports_fp16(dataset_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`anomalib export ... --export_type openvino --compression_type FP16` (docs/export.md), in process.

    The INT8_PTQ line of the same doc calibrates on MVTec AD (marked ``needs: data``); its recipe is tested through
    the Python API in tests/base/test_export.py.
    """
    import torch
    from anomalib.cli.cli import main as anomalib_main
    from anomalib.engine import Engine

    from anomalib_memkd import MemKD
    from conftest import mvtec_datamodule

    pytest.importorskip("openvino")
    torch.manual_seed(0)
    model = MemKD(backbone="resnet18", pre_trained=False, memory_size=4, num_exemplars=4, epochs=1,
                  pre_processor=MemKD.configure_pre_processor(image_size=(64, 64)))  # fmt: skip
    engine = Engine(accelerator="cpu", devices=1, default_root_dir=tmp_path / "fit", logger=False,
                    enable_progress_bar=False, max_epochs=1)  # fmt: skip
    engine.fit(model, datamodule=mvtec_datamodule(dataset_root))
    callback = engine.trainer.checkpoint_callback
    checkpoint = callback.best_model_path or callback.last_model_path
    root = tmp_path / "export"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", [
        "anomalib", "export", "--model", "MemKD", "--model.backbone", "resnet18", "--model.pre_trained", "false",
        "--model.memory_size", "4", "--model.num_exemplars", "4", "--ckpt_path", checkpoint,
        "--export_type", "openvino", "--input_size", "[64,64]", "--compression_type", "FP16",
        "--export_root", str(root),
    ])  # fmt: skip
    anomalib_main()
    (xml,) = root.rglob("model.xml")
    text = xml.read_text()
    assert 'element_type="f16"' in text and 'element_type="f32"' in text  # FP16 weights, FP32 inputs / outputs
    assert "FakeQuantize" not in text
