"""Smoke test of ``anomalib-kd-benchmark edge`` on tiny settings: it runs, and its table is internally consistent."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
pytest.importorskip("openvino")
pytest.importorskip("nncf")


def test_cli_edge_subcommand(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "anomalib_kd_tools.benchmark", "edge", "--quick",
        "--models", "Aand", "ReverseDistillation", "--proxy-teacher",
        "--backends", "torch", "ov-fp32", "ov-int8",
        "--output", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with (tmp_path / "edge.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["model"], r["backend"]) for r in rows} == {
        (m, b) for m in ("Aand", "ReverseDistillation") for b in ("torch", "ov-fp32", "ov-int8")
    }
    by_key = {(r["model"], r["backend"]): r for r in rows}
    for (model, backend), row in by_key.items():
        p50, p95 = float(row["p50_ms"]), float(row["p95_ms"])
        assert 0 < p50 <= p95
        assert float(row["throughput"]) > 0
        assert 0.0 <= float(row["image_auroc"]) <= 1.0
        assert 0.0 <= float(row["pixel_auroc"]) <= 1.0
        assert float(row["size_mb"]) > 0
        rd = by_key[("ReverseDistillation", backend)]
        assert math.isclose(float(row["latency_vs_rd"]), p50 / float(rd["p50_ms"]), rel_tol=1e-6)
        fp32 = by_key[(model, "ov-fp32")]
        assert math.isclose(float(row["speedup_vs_ov_fp32"]), float(fp32["p50_ms"]) / p50, rel_tol=1e-6)
    for model in ("Aand", "ReverseDistillation"):  # the INT8 IR stores 8-bit weights: under a third of FP32's file
        assert float(by_key[(model, "ov-int8")]["size_mb"]) < float(by_key[(model, "ov-fp32")]["size_mb"]) / 3
        fp32 = by_key[(model, "ov-fp32")]
        assert math.isclose(float(fp32["pixel_auroc"]), float(by_key[(model, "torch")]["pixel_auroc"]), abs_tol=1e-3)
    table = (tmp_path / "edge.md").read_text()
    assert "generated data" in table and "proxy teacher" in table
    assert table.count("\n| Aand |") == 3
    assert table in result.stdout  # printed as well as written
    assert "- Command: `anomalib-kd-benchmark edge --quick" in table
    png = (tmp_path / "edge.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_static_batch_that_cannot_be_reshaped_runs_as_consecutive_calls() -> None:
    """anomalib 2.7's Patchcore export at 256 px has a static batch OpenVINO cannot re-infer for another size: a batch
    of 6 then runs as three calls of the static batch of 2, in order, instead of failing every OpenVINO row."""
    import numpy as np

    from anomalib_kd_tools.benchmark.edge import OpenVINOCall

    class Dim:
        is_static = True

        def get_length(self) -> int:
            return 2

    class Input:
        any_name = "input"

        def get_partial_shape(self) -> list:
            return [Dim()]

    class Model:
        def input(self, index: int) -> Input:
            return Input()

        def clone(self) -> "Model":
            return self

        def reshape(self, shapes: dict) -> None:
            raise RuntimeError("Check 'TRShape::merge_into(output_shape, in_copy)' failed")

    class Output:
        any_name = "pred_score"

    class Compiled:
        outputs = [Output()]
        calls: list[int] = []

        def __call__(self, batch: np.ndarray) -> dict:
            assert len(batch) == 2
            self.calls.append(len(batch))
            return {self.outputs[0]: batch.reshape(len(batch), -1).sum(axis=1)}

    class Core:
        def compile_model(self, model: Model, device: str, config: dict) -> Compiled:
            return Compiled()

    call = OpenVINOCall(Core(), Model(), {})
    batch = np.random.default_rng(0).random((6, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(call(batch)["pred_score"], batch.reshape(6, -1).sum(axis=1), rtol=1e-6)
    assert Compiled.calls == [2, 2, 2]


def test_edge_reads_every_test_image_with_its_label_and_mask(tmp_path: Path) -> None:
    """edge scores each image of the test folder once, with its label and mask, as anomalib's MVTecAD reads them."""
    import numpy as np

    from anomalib_kd_tools.benchmark.edge import load_split
    from anomalib_kd_tools.fit import folder_datamodule
    from anomalib_kd_tools.synthetic import make_mvtec_like_dataset

    sizes = {"image_size": 32, "n_train": 4, "n_test_good": 3, "n_test_per_defect": 2}
    make_mvtec_like_dataset(tmp_path, category="widget", seed=0, **sizes)
    datamodule = folder_datamodule(tmp_path, "widget", 2, 0)
    datamodule.setup()
    images, labels, masks = load_split(datamodule.test_data)
    files = sorted((tmp_path / "widget" / "test").rglob("*.png"))
    assert images.shape == (len(files), 3, 32, 32) and images.dtype == np.float32
    assert 0.0 <= images.min() < images.max() <= 1.0
    assert labels.dtype == bool and labels.sum() == sum(f.parent.name != "good" for f in files) > 0
    assert masks.shape == (len(files), 32, 32) and masks.dtype == bool
    assert not masks[~labels].any() and all(mask.any() for mask in masks[labels])
    assert len(load_split(datamodule.train_data)[0]) == 4
