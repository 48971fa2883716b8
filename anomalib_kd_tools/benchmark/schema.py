"""The data layer of every table (pandas): the columns and metrics, the CSV files, mean ± std over seeds.

Shared by the quality job (a row of :data:`COLUMNS`), the runner's resumable ``results.csv``, the reports and the
paper table; docs/benchmarks.md shows another table of the same rows in a few lines. Statistics skip ``nan``; the
std is the sample std. CSV cells: a float as ``repr`` (or ``digits`` significant digits), empty for ``nan`` /
``None``, JSON for a dict or list, so a file read back gives the numbers written.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

MODELS = ("Patchcore", "ReverseDistillation", "Aand", "MemKD")  # the side-by-side models, in report order
METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1")
SPEED = ("latency_bs1_ms", "throughput_ips", "ov_latency_bs1_ms", "ov_throughput_ips")
NUMERIC = (*METRICS, *SPEED, "peak_memory_mb", "params_m", "trainable_params_m", "state_mb", "train_time_s")
COUNTS = ("image_size", "n_train", "n_val", "n_test", "throughput_batch", "threads")  # read as numbers too
COLUMNS = (  # results.csv
    "dataset_kind", "dataset", "category", "model", "seed", *NUMERIC, "memory_kind", "throughput_batch", "threads",
    "backbone", "weights_tag", "image_size", "schedule", "val_split", "n_train", "n_val", "n_test", "device",
    "device_name", "finished_at",
)  # fmt: skip
# An ablation's results.csv: the cell is (variant, category, seed); ``model`` stays the model class.
ABLATION_COLUMNS = (*COLUMNS[:4], "variant", *COLUMNS[4:], "teacher", "overrides", "mechanism_status", "mechanism")
LABELS = {  # table headers
    "image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO", "image_f1": "image F1",
    "latency_bs1_ms": "latency bs1 ms", "throughput_ips": "img/s", "ov_latency_bs1_ms": "OV latency bs1 ms",
    "ov_throughput_ips": "OV img/s", "peak_memory_mb": "peak mem MB", "params_m": "params M",
    "trainable_params_m": "trainable params M", "state_mb": "state MB", "train_time_s": "train s",
}  # fmt: skip
DIGITS = {key: 3 for key in METRICS} | dict.fromkeys((*SPEED, "train_time_s"), 1)  # decimals in the tables
DIGITS |= {"peak_memory_mb": 0, "state_mb": 0, "params_m": 2, "trainable_params_m": 2}
DASH = "–"  # a missing value in a table


# ---------------------------------------------------------------------------------------------- CSV
def csv_value(value: Any, digits: int | None = None) -> Any:  # noqa: ANN401
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return repr(float(value)) if digits is None else f"{value:.{digits}g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return "" if value is None else value


def _cells(rows: pd.DataFrame | Iterable[Mapping[str, Any]], columns: Sequence[str] | None, digits: int | None):
    frame = rows.astype(object) if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), dtype=object)
    if columns is not None:
        frame = frame.reindex(columns=list(columns))
    return frame.map(lambda value: csv_value(value, digits))


def write_csv(path: Path, rows: pd.DataFrame | Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None,
              digits: int | None = None) -> None:  # fmt: skip
    """The whole table (``columns``: every key, in order of appearance, by default)."""
    _cells(rows, columns, digits).to_csv(path, index=False, lineterminator="\r\n")


def append_row(path: Path, row: Mapping[str, Any], columns: Sequence[str] = COLUMNS, digits: int | None = 6) -> None:
    """Append one row (header on first write), flushed to disk at once: a crash keeps every finished row."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="", encoding="utf-8") as file:
        _cells([row], columns, digits).to_csv(file, index=False, header=new, lineterminator="\r\n")
        file.flush()
        os.fsync(file.fileno())


def read_csv(path: Path, numeric: Iterable[str] = ()) -> pd.DataFrame:
    """A CSV written here: text as text (empty cells ``""``), the ``numeric`` columns as floats (empty: ``nan``)."""
    if not Path(path).exists():
        return pd.DataFrame()
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in dict.fromkeys(numeric):
        if column in frame:
            frame[column] = frame[column].replace("", "nan").astype(float)
    return frame


def read_results(path: Path) -> pd.DataFrame:
    """``results.csv`` of ``quality`` (or of an ablation): numbers parsed, ``seed`` an int; no file, no rows."""
    frame = read_csv(path, (*NUMERIC, *COUNTS))
    if frame.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    return frame.astype({"seed": int})


def cell_keys(rows: pd.DataFrame) -> list[tuple[str, str, int]]:
    """The cell of each row: (variant or model, category, seed)."""
    names = rows["model"]
    if "variant" in rows:  # an ablation's cell is its variant
        names = rows["variant"].where(rows["variant"].astype(bool), names)
    return list(zip(names, rows["category"], rows["seed"].astype(int), strict=True))


# ---------------------------------------------------------------------------------------------- statistics
def rank(name: str, order: Sequence[str] = MODELS) -> str:
    """Sort key: the names of ``order`` in that order, any other after them by name."""
    return f"{order.index(name) if name in order else len(order):03d} {name}"


def aggregate(rows: pd.DataFrame, by: Sequence[str] = ("category", "model"), columns: Sequence[str] = NUMERIC, *,
              over_categories: bool = False,
              order: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:  # fmt: skip
    """Mean, sample std and count of the finite values of ``columns`` over seeds per ``by`` group.

    Columns ``(column, "mean" | "std" | "n")`` and ``("seeds", "n")`` (the seeds of the group); ``over_categories``:
    per seed the mean over the group's categories first. Sorted by ``by``, each level in ``order[level]`` order
    (default: :data:`MODELS` for ``model``), other names after them by name.
    """
    by, columns = list(by), list(columns)
    rows = pd.DataFrame(rows)
    if over_categories:
        rows = rows.groupby([*by, "seed"], sort=False)[columns].mean().reset_index()
    groups = rows.groupby(by, sort=False)
    stats = groups[columns].agg(["mean", "std", "count"]).rename(columns={"count": "n"}, level=1)
    stats["seeds", "n"] = groups["seed"].nunique()
    order = {"model": MODELS} if order is None else order
    return stats.sort_index(key=lambda index: index.map(lambda name: rank(name, order.get(index.name, ()))))


def format_mean_std(mean: float, std: float, n: int, digits: int = 3) -> str:
    """``0.800 ± 0.100``; the mean only for one value (or no std); :data:`DASH` for none."""
    if n == 0 or math.isnan(mean):
        return DASH
    if n == 1 or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt(value: float | None, digits: int = 3) -> str:
    return DASH if value is None or math.isnan(value) else f"{value:.{digits}f}"


def fmt_int(value: float | None) -> str:
    return DASH if value is None or math.isnan(value) else str(int(value))


def formatted_values(rows: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """``rows``' ``columns`` as text (:func:`fmt` with :data:`DIGITS` decimals) under their :data:`LABELS`."""
    return pd.DataFrame({LABELS[c]: [fmt(value, DIGITS[c]) for value in rows[c]] for c in columns}, index=rows.index)


def formatted(stats: pd.DataFrame, digits: Mapping[str, int] | None = None) -> pd.DataFrame:
    """``mean ± std`` strings of every statistic of :func:`aggregate` (decimals: ``digits``, else :data:`DIGITS`)."""
    digits = {**DIGITS, **(digits or {})}
    names = [c for c in dict.fromkeys(stats.columns.get_level_values(0)) if c != "seeds"]
    cells = {c: [format_mean_std(*stat, digits.get(c, 3)) for stat in stats[c][["mean", "std", "n"]].to_numpy()]
             for c in names}  # fmt: skip
    return pd.DataFrame(cells, index=stats.index)


def mean_std_table(rows: pd.DataFrame, by: Sequence[str] = ("model",), columns: Sequence[str] = METRICS, *,
                   over_categories: bool = False, labels: Mapping[str, str] | None = None,
                   order: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:  # fmt: skip
    """The table of :func:`aggregate`: the ``by`` keys, ``seeds``, then ``mean ± std`` strings under the
    :data:`LABELS` headers (``labels`` overrides some)."""
    stats = aggregate(rows, by, columns, over_categories=over_categories, order=order)
    table = formatted(stats).rename(columns={**LABELS, **(labels or {})})
    table.insert(0, "seeds", stats["seeds", "n"])
    return table.reset_index()
