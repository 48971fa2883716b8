"""The side-by-side heat-map figure: one colour scale per image row, shared by every model's map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_kd_tools.heatmaps import draw_side_by_side, row_scales


def _maps() -> dict[str, list[np.ndarray]]:
    low = [np.full((8, 8), 0.1), np.full((8, 8), 0.4)]
    high = [np.full((8, 8), 0.9), np.full((8, 8), 0.5)]
    high[0][0, 0] = 2.0
    low[1][0, 0] = -1.0
    return {"A": low, "B": high}


def test_each_row_has_one_scale_over_all_models() -> None:
    # row 0: min over both models 0.1 (A), max 2.0 (B); row 1: min -1.0 (A), max 0.5 (B): not per model, not global
    assert row_scales(_maps()) == [(pytest.approx(0.1), pytest.approx(2.0)), (pytest.approx(-1.0), pytest.approx(0.5))]
    flat = {"A": [np.zeros((2, 2))], "B": [np.zeros((2, 2))]}
    low, high = row_scales(flat)[0]
    assert high > low  # a constant row still gets a valid scale


def test_figure_has_a_column_per_model_and_a_row_per_image(tmp_path: Path) -> None:
    images = [np.random.default_rng(k).random((8, 8, 3)) for k in range(2)]
    masks = [np.eye(8), np.zeros((8, 8))]
    one_model = draw_side_by_side(images, masks, {"A": _maps()["A"]}, tmp_path / "one.png")
    two_models = draw_side_by_side(images, masks, _maps(), tmp_path / "two.png", row_labels=["x", "y"], title="t")
    wide_one, tall_one = Image.open(one_model).size
    wide_two, _ = Image.open(two_models).size
    assert wide_two > wide_one * 1.15  # one more column
    assert tall_one > 100
    with pytest.raises(ValueError, match="same number"):
        draw_side_by_side(images, masks[:1], _maps(), tmp_path / "bad.png")
