"""The grid of the ``quality`` benchmark: one cell is one (model or ablation variant, category, seed).

The grid is expanded by anomalib's own grid helper
(:func:`anomalib.pipelines.components.utils.get_iterator_from_grid_dict`, what its ``BenchmarkJobGenerator``
expands a ``benchmark:`` config with), category-major so that early results cover every model.

anomalib's ``JobGenerator`` is not subclassed: its ``generate_jobs`` yields ``Job`` objects that hold a built
model and datamodule (``get_model`` / ``get_datamodule`` in the parent process), while a cell here is a small,
picklable description that is built into a model only in its own child process (:mod:`.job`), and must be
comparable with the rows of a ``results.csv`` to resume a run (:attr:`Cell.key`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from anomalib_kd_tools.benchmark.schema import MODELS

GENERATED_CATEGORY = "widget"


@dataclass(frozen=True, order=True)
class Cell:
    """One unit of the grid: a model trained and evaluated on one category with one seed."""

    model: str
    category: str
    seed: int

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.model, self.category, self.seed)

    @property
    def name(self) -> str:
        return f"{self.model}/{self.category}/seed{self.seed}"

    @property
    def slug(self) -> str:
        model = re.sub(r"[^A-Za-z0-9.+-]+", "-", self.model)  # ablation variants: "AAND stage1=0"
        return f"{model}_{self.category}_seed{self.seed}"


def make_cells(models: Sequence[str], categories: Sequence[str], seeds: Sequence[int]) -> list[Cell]:
    """All (model, category, seed) cells, category-major (then seed, then model) so early results cover every model."""
    from anomalib.pipelines.components.utils import get_iterator_from_grid_dict

    grid = {"category": {"grid": list(categories)}, "seed": {"grid": list(seeds)}, "model": {"grid": list(models)}}
    if not (models and categories and seeds):
        return []
    return [Cell(c["model"], c["category"], c["seed"]) for c in get_iterator_from_grid_dict(grid)]


__all__ = ["GENERATED_CATEGORY", "MODELS", "Cell", "make_cells"]
