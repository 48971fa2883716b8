"""The README's side-by-side table is the committed benchmark output: mean ± std over seeds of the per-seed mean over
the generated categories, recomputed from docs/results/side_by_side.csv (the `results.csv` that
`anomalib-kd-benchmark quality` wrote), and its pictures exist where the README links them."""

from __future__ import annotations

from pathlib import Path

from anomalib_kd_tools.benchmark import schema

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["image_auroc", "pixel_auroc", "aupro", "train_time_s", "latency_bs1_ms"]


def _readme_table() -> dict[str, list[str]]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Side by side: PatchCore, RD, Aand and MemKD", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|")][2:]  # fmt: skip
    return {row[0]: row[1:] for row in rows}


def test_readme_side_by_side_table_is_the_benchmark_csv() -> None:
    rows = schema.read_results(REPO / "docs" / "results" / "side_by_side.csv")
    assert set(rows.model) == set(schema.MODELS) and set(rows.seed) == {0, 1, 2}
    assert set(rows.category) == {"widget", "brick", "grain"}
    assert set(rows.weights_tag) == {"proxy teacher (random init, BN calibrated on training images)"}
    assert set(rows.image_size) == {128}
    expected = schema.mean_std_table(rows, ["model"], COLUMNS, over_categories=True).set_index("model")
    readme = _readme_table()
    assert list(readme) == list(schema.MODELS)  # one row per model, in the report's order
    for model, cells in readme.items():
        assert cells == [expected.loc[model, schema.LABELS[c]] for c in COLUMNS], model


def test_readme_links_the_benchmarks_pictures() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    for name in ("side_by_side_heatmaps.png", "side_by_side_bars.png"):
        assert f"(docs/images/{name})" in text
        assert (REPO / "docs" / "images" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
