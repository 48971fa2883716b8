"""Issue 18: the generated brick texture, the extra defect families, and AAND on a high-contrast texture."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_kd_tools import synthetic
from anomalib_kd_tools.synthetic import (
    ALL_DEFECT_TYPES,
    DEFECT_TYPES,
    EXTRA_DEFECT_TYPES,
    SyntheticSpec,
    make_mvtec_like_dataset,
)


def _grey(image: np.ndarray) -> np.ndarray:
    return 0.299 * image[..., 0] + 0.587 * image[..., 1] + 0.114 * image[..., 2]


def _pixels_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(np.asarray(Image.open(path)).tobytes())
    return digest.hexdigest()


def test_default_dataset_is_unchanged(tmp_path: Path) -> None:
    """Existing callers (tests, benchmark) get the very same pixels as before the brick / extra-defect options.

    The digest was taken from the generator before issue 18 (decoded pixels, so the PNG encoder does not matter).
    """
    assert DEFECT_TYPES == ("scratch", "stain", "hole")
    assert SyntheticSpec().defects == DEFECT_TYPES
    assert SyntheticSpec().product == "widget"
    root = make_mvtec_like_dataset(tmp_path, image_size=64, n_train=2, n_test_good=1, n_test_per_defect=1)
    assert _pixels_digest(root) == "f0b13910113e9ebfcb3b70d3453612465f267274e9cde38836f6a5252bda1fd7"


def test_brick_is_a_regular_high_contrast_grid_with_jitter() -> None:
    size = 128
    rng = np.random.default_rng(0)
    first, fg = synthetic._brick(rng, size)
    second, _ = synthetic._brick(rng, size)
    assert fg.all()  # a texture: the whole image is foreground
    grey = _grey(first)
    mortar = grey > 0.6
    assert 0.08 < mortar.mean() < 0.35
    assert grey[mortar].mean() - grey[~mortar].mean() > 0.35  # bright mortar lines: high contrast
    # bed joints repeat every size/8 rows: the row profile correlates with itself at that lag, not at half of it
    profile = mortar.mean(axis=1) - mortar.mean()
    period = size // 8

    def corr(lag: int) -> float:
        return float(np.corrcoef(profile[:-lag], profile[lag:])[0, 1])

    assert corr(period) > 0.6
    assert corr(period // 2) < 0.2
    # jitter: two walls differ (phase, offsets, shades) but have the same statistics
    assert np.abs(first - second).mean() > 0.05
    assert abs(_grey(second).mean() - grey.mean()) < 0.05


@pytest.mark.parametrize("kind", EXTRA_DEFECT_TYPES)
def test_extra_defects_change_only_the_masked_pixels(kind: str) -> None:
    rng = np.random.default_rng(1)
    image, fg = synthetic._brick(rng, 128)
    mask = synthetic._defect_mask(rng, 128, kind, fg)
    painted = synthetic._paint_defect(rng, image, mask, kind)
    assert np.array_equal(painted[~mask], image[~mask])
    change = np.abs(painted[mask] - image[mask]).mean()
    assert change > 0.04
    if kind == "tint":  # a colour shift keeps the structure (grey levels stay correlated) but moves the chroma
        assert np.corrcoef(_grey(image)[mask], _grey(painted)[mask])[0, 1] > 0.7
        chroma = painted[mask] - painted[mask].mean(axis=1, keepdims=True)
        original = image[mask] - image[mask].mean(axis=1, keepdims=True)
        assert np.abs(chroma - original).mean() > 0.03
    else:  # foreign: a different texture, unrelated to the wall underneath
        assert abs(np.corrcoef(_grey(image)[mask], _grey(painted)[mask])[0, 1]) < 0.5


def test_brick_dataset_with_extra_defects_has_the_mvtec_layout(tmp_path: Path) -> None:
    root = make_mvtec_like_dataset(
        tmp_path, category="brick", product="brick", image_size=64, n_train=2, n_test_good=1,
        n_test_per_defect=2, defects=("foreign", "tint"),
    )
    base = root / "brick"
    assert len(list((base / "train" / "good").glob("*.png"))) == 2
    for kind in ("foreign", "tint"):
        images = sorted((base / "test" / kind).glob("*.png"))
        masks = sorted((base / "ground_truth" / kind).glob("*_mask.png"))
        assert len(images) == len(masks) == 2
        assert all(np.asarray(Image.open(m)).any() for m in masks)
    assert set(ALL_DEFECT_TYPES) == set(DEFECT_TYPES) | set(EXTRA_DEFECT_TYPES)


def test_grain_is_an_irregular_texture_that_changes_per_image() -> None:
    """The irregular texture: whole-image foreground, structure at every scale, no period, a new pattern per image."""
    size = 128
    rng = np.random.default_rng(0)
    first, fg = synthetic._grain(rng, size)
    second, _ = synthetic._grain(rng, size)
    assert fg.all() and first.shape == (size, size, 3) and 0.0 <= first.min() and first.max() <= 1.0
    grey = _grey(first) - _grey(first).mean()
    assert grey.std() > 0.05  # visible structure, not flat noise
    assert abs(np.corrcoef(_grey(first).ravel(), _grey(second).ravel())[0, 1]) < 0.3  # another pattern per image

    def corr(lag: int) -> float:
        return float(np.corrcoef(grey[:, :-lag].ravel(), grey[:, lag:].ravel())[0, 1])

    # fractal: neighbours correlate strongly, and the correlation only decays with the lag (no period to come back to)
    lags = [1, 2, 4, 8, 16, 32]
    values = [corr(lag) for lag in lags]
    assert values[0] > 0.8
    assert all(a > b for a, b in zip(values, values[1:], strict=False)), values


def test_grain_dataset_has_the_mvtec_layout(tmp_path: Path) -> None:
    root = make_mvtec_like_dataset(tmp_path, category="grain", product="grain", image_size=64, n_train=2, n_test_good=1,
                                   n_test_per_defect=1, defects=("scratch", "foreign", "tint"))  # fmt: skip
    for kind in ("scratch", "foreign", "tint"):
        assert (root / "grain" / "test" / kind / "000.png").is_file()
        assert np.asarray(Image.open(root / "grain" / "ground_truth" / kind / "000_mask.png")).any()


def test_unknown_product_or_defect_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown product"):
        make_mvtec_like_dataset(tmp_path, product="gravel", n_train=1, n_test_good=1, n_test_per_defect=1)
    with pytest.raises(ValueError, match="unknown defect"):
        make_mvtec_like_dataset(tmp_path, defects=("crack",), n_train=1, n_test_good=1, n_test_per_defect=1)


# ---------------------------------------------------------------------------------------------- AAND side
def _tiny_aand(**kwargs):
    import torch

    from anomalib_aand import Aand

    torch.manual_seed(0)
    params = {
        "backbone": "resnet18",
        "pre_trained": False,
        "memory_size": 8,
        "stage1_epochs": 1,
        "stage2_epochs": 1,
        "anomaly_source_path": None,
        "foreground": "none",
        "pre_processor": Aand.configure_pre_processor(image_size=(64, 64)),
        "evaluator": False,
        "visualizer": False,
    }
    params.update(kwargs)
    return Aand(**params)


def test_without_stage1_the_advanced_teacher_is_the_vanilla_teacher() -> None:
    """``stage1_epochs=0`` means RD + HKD on the vanilla teacher: the untrained RAA must not perturb F_T.

    Before issue 18 the untrained gate (w^a about 0.5 everywhere) added half of the untrained residual to every
    feature, in stage 2 and at inference, so the "no anomaly amplification" ablation ran on a perturbed teacher.
    """
    import torch
    from torch.nn import functional as F  # noqa: N812

    images = torch.rand(2, 3, 64, 64)
    plain = _tiny_aand(stage1_epochs=0)
    net = plain.model.eval()
    vanilla = net.teacher_features(images)
    with torch.no_grad():
        advanced, gates, _, residuals = net.amplify(vanilla)
        student = net.student_features(advanced)
        expected = net.anomaly_map_generator(student, vanilla)
        produced = net(images).anomaly_map
        targets = plain.stage2_losses(images)
    for a, v, r in zip(advanced, vanilla, residuals, strict=True):
        assert torch.equal(a, v)
        assert r.abs().sum() > 0  # the RAA exists and is untrained; it is only not applied
    assert all(g.min() >= 0 and g.max() <= 1 for g in gates)
    torch.testing.assert_close(produced, expected)
    assert torch.isfinite(targets["loss"])
    # with a stage 1 the predicted gate is applied (Eq. 1): F_A differs from F_T
    amplified = _tiny_aand(stage1_epochs=1).model.eval()
    vanilla = amplified.teacher_features(images)
    with torch.no_grad():
        advanced = amplified.amplify(vanilla)[0]
    shift = [float((1 - F.cosine_similarity(a, v)).mean()) for a, v in zip(advanced, vanilla, strict=True)]
    assert max(shift) > 1e-4, shift
    # explicit residual weights (stage 1 passes the ground truth) are honoured in both configurations
    with torch.no_grad():
        ones = [torch.ones_like(v[:, :1]) for v in vanilla]
        forced = net.amplify(net.teacher_features(images), ones)[0]
    assert not torch.equal(forced[0], net.teacher_features(images)[0])


def test_texture_diagnosis_runs_and_measures_per_level(tmp_path: Path) -> None:
    """benchmarks/aand_texture.py end to end on a tiny brick set: RD and AAND from one teacher, gate forced to 0."""
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "aand_texture.py"
    spec = importlib.util.spec_from_file_location("aand_texture", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "run"
    code = module.main([
        "--out", str(out), "--seeds", "0", "--size", "64", "--n-train", "4", "--n-test-good", "2",
        "--n-test-per-defect", "1", "--defects", "foreign", "tint", "--batch", "4", "--rd-epochs", "1",
        "--aand-stages", "1", "1", "--models", "RD", "AAND", "--results-csv", str(tmp_path / "results" / "rows.csv"),
    ])
    assert code == 0
    rows = {row["model"]: row for row in map(json.loads, (out / "rows.jsonl").read_text().splitlines())}
    assert set(rows) == {"RD", "AAND", "AAND gate=zero", "AAND gate=oracle"}
    for name, row in rows.items():
        assert 0.0 <= row["pixel_auroc"] <= 1.0, name
        shares = [row[f"map_share_l{k}"] for k in (1, 2, 3)]
        assert abs(sum(shares) - 1.0) < 1e-4, (name, shares)
    aand, zero = rows["AAND"], rows["AAND gate=zero"]
    for k in (1, 2, 3):
        assert 0.0 <= aand[f"gate_fpr_l{k}"] <= 1.0
        assert aand[f"energy_normal_l{k}"] > 0.0
        assert zero[f"energy_normal_l{k}"] == 0.0  # gate forced to 0: no residual reaches F_A
        assert zero[f"shift_normal_l{k}"] < 1e-6  # F_A = F_T
    assert "| RD |" in (out / "summary.md").read_text()
    # --results-csv: the per-seed rows the docs' tables are computed from, with the run's teacher and schedule
    import pandas as pd

    table = pd.read_csv(tmp_path / "results" / "rows.csv")
    assert list(table.columns) == module.RESULT_COLUMNS
    assert sorted(table["model"]) == sorted(rows)
    assert set(table["run"]) == {"random proxy, RD 1, AAND 1 + 1"} and set(table["seed"]) == {0}
    by_model = table.set_index("model")
    for name, row in rows.items():
        assert by_model.loc[name, "pixel_auroc"] == pytest.approx(row["pixel_auroc"], abs=1e-4)
