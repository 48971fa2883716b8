"""The grid of ``quality``: one cell is one (model or ablation variant, category, seed), expanded by anomalib's grid
helper (``get_iterator_from_grid_dict``, as its ``BenchmarkJobGenerator`` expands a ``benchmark:`` config).

anomalib's ``JobGenerator`` is not subclassed: its jobs hold a model and datamodule built in the parent process,
while a cell is a small description, built into a model only in its own child process (:mod:`.job`) and comparable
with the rows of a ``results.csv`` to resume a run (:attr:`Cell.key`).
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
    return [Cell(c["model"], c["category"], c["seed"]) for c in get_iterator_from_grid_dict(grid)]
