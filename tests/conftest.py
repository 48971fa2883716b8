"""Shared fixtures: tiny generated MVTec-layout datasets and fast defaults for CPU tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never let a test reach the Hugging Face hub; every model in the tests uses pre_trained=False.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from anomalib_kd_tools.synthetic import make_mvtec_like_dataset  # noqa: E402

CATEGORY = "widget"


@pytest.fixture(scope="session", autouse=True)
def _session_working_directory(tmp_path_factory: pytest.TempPathFactory):
    """Module- and session-scoped fixtures (shared trained models) run outside the repository too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("cwd_session"))
        yield


@pytest.fixture(autouse=True)
def _isolated_working_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own empty working directory.

    Relative defaults (AAND's ``anomaly_source_path="./datasets/dtd/images"``, lightning's ``./results``) then never
    see what a developer keeps in the repository root (e.g. a downloaded DTD). Tests reach repository files through
    ``Path(__file__)``, never through the working directory.
    """
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small RGB dataset, 64 px: 12 train, 4 good + 2 per defect type in test."""
    root = tmp_path_factory.mktemp("synthetic_rgb")
    make_mvtec_like_dataset(root, category=CATEGORY, image_size=64, n_train=12, n_test_good=4, n_test_per_defect=2)
    return root


@pytest.fixture(scope="session")
def make_dataset(tmp_path_factory: pytest.TempPathFactory):
    """Factory for datasets with other settings (grayscale, RGBA, empty train set, ...)."""

    def _make(name: str, **kwargs) -> Path:
        root = tmp_path_factory.mktemp(name)
        params = {"category": CATEGORY, "image_size": 64, "n_train": 8, "n_test_good": 2, "n_test_per_defect": 1}
        params.update(kwargs)
        return make_mvtec_like_dataset(root, **params)

    return _make


def mvtec_datamodule(root: Path, batch_size: int = 4, **kwargs):
    """anomalib's own MVTecAD datamodule on a generated folder (no download: the folder exists)."""
    from anomalib.data import MVTecAD

    params = {
        "root": root,
        "category": CATEGORY,
        "train_batch_size": batch_size,
        "eval_batch_size": batch_size,
        "num_workers": 0,
        "seed": 0,
    }
    params.update(kwargs)
    return MVTecAD(**params)


def memory_with_items(keys, values, temperature: float = 1.0):  # noqa: ANN001, ANN201
    """An NR memory of MemKD holding exactly the given ``(L, C)`` keys and values."""
    import torch

    from anomalib_memkd.components.memory import NRMemory

    memory = NRMemory(num_items=keys.shape[0], channels=keys.shape[1], temperature=temperature)
    with torch.no_grad():
        memory.keys.copy_(keys)
        memory.values.copy_(values)
    return memory


def positions_as_map(vectors):  # noqa: ANN001, ANN201
    """``(P, C)`` position vectors -> ``(1, C, 1, P)`` feature map (position j = column j)."""
    return vectors.t().reshape(1, vectors.shape[1], 1, vectors.shape[0])
