"""The one report writer of ``anomalib-kd-benchmark``: CSV, markdown and PNG for ``quality``, ``edge`` and ``speed``.

Every subcommand writes its tables through this module; the subcommand decides what the rows and panels are:

* CSV: :func:`write_csv` (a whole table), :func:`append_row` (one row, flushed to disk at once: the resumable
  ``results.csv`` of ``quality``) and :func:`read_csv` (numbers parsed, empty cells become ``nan``). A float is
  written as ``repr`` (or with ``digits`` significant digits), ``nan`` / ``None`` as an empty cell, so a table
  read back with :func:`read_csv` gives the numbers that were written.
* markdown: :func:`header` gives every table the same header - a ``# title`` line, then ``- Hardware:``,
  ``- Date: ...; versions: ...``, the tool's own setting lines and the command; :func:`table` renders a
  markdown table; :func:`write_text` writes the file.
* PNG: :class:`Bars` and :class:`Scatter` panels drawn side by side by :func:`write_png` (matplotlib, Agg).
  anomalib's visualisation helpers (:mod:`anomalib.utils.visualization`) draw images, anomaly maps and
  per-image metric plots, not bar charts over models, so the figure code lives here.

Statistics shared by the reports: :func:`mean_std` (mean, sample std and count of the finite values) and
:func:`format_mean_std`.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERSIONED_PACKAGES = ("anomalib", "torch", "lightning", "timm", "openvino", "anomalib-kd")


# ---------------------------------------------------------------------------------------------- the header
def versions() -> str:
    """``anomalib 2.7.0, torch ..., ...``: the installed versions of the packages that change the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for package in VERSIONED_PACKAGES:
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            continue
    return ", ".join(parts)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(gpus: Iterable[str] = (), threads: int | None = None, no_gpu: str = "no GPU") -> str:
    """``CPU: <name> (<n> logical CPUs[, <t> torch threads]); GPU: <names>`` (or ``; <no_gpu>``)."""
    gpus = sorted(set(gpus))
    cpu = f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs" + (f", {threads} torch threads" if threads else "") + ")"
    return f"{cpu}; GPU: {', '.join(gpus)}" if gpus else f"{cpu}; {no_gpu}"


def today() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


INTERRUPTED = "**Interrupted** (Ctrl-C, or a cap's SIGINT / SIGTERM): these tables hold only what finished before"


def header(
    title: str,
    hardware: str,
    date: str,
    facts: Sequence[str] = (),
    command: str | None = None,
    interrupted: bool = False,
) -> list[str]:
    """The header of every table: title, hardware, date and versions, then ``facts`` (after :data:`INTERRUPTED` for a
    run that was stopped early) and the command."""
    lines = [f"# {title}", "", f"- Hardware: {hardware}", f"- Date: {date}; versions: {versions()}"]
    lines += [f"- {fact}" for fact in ([INTERRUPTED] if interrupted else []) + list(facts)]
    if command:
        lines.append(f"- Command: `{command}`")
    return [*lines, ""]


# ---------------------------------------------------------------------------------------------- numbers
def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (``nan`` for a single value) and count of the finite values."""
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not finite:
        return math.nan, math.nan, 0
    std = statistics.stdev(finite) if len(finite) > 1 else math.nan
    return statistics.fmean(finite), std, len(finite)


def format_mean_std(stat: tuple[float, float, int], digits: int = 3) -> str:
    mean, std, n = stat
    if n == 0:
        return "–"
    if n == 1 or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def fmt_int(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else str(int(value))


# ---------------------------------------------------------------------------------------------- markdown
def table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table: header, separator and one line per row (cells converted with ``str``)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def write_text(path: Path, lines: Sequence[str]) -> str:
    """Write ``lines`` (a markdown document) to ``path``; returns the text."""
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text, encoding="utf-8")
    return text


def write_json(path: Path, data: Any, indent: int | None = 2) -> None:  # noqa: ANN401
    """``data`` as JSON (the machine-readable twin of a markdown table; ``nan`` is written as ``NaN``)."""
    Path(path).write_text(json.dumps(data, indent=indent), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- CSV
def csv_value(value: Any, digits: int | None = None) -> Any:  # noqa: ANN401
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return repr(value) if digits is None else f"{value:.{digits}g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return "" if value is None else value


def write_csv(
    path: Path,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str] | None = None,
    digits: int | None = None,
) -> None:
    """The whole table (``columns``: the first row's keys by default, then any other key in order of appearance)."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    with Path(path).open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: csv_value(row.get(key), digits) for key in columns})


def append_row(path: Path, row: dict[str, Any], columns: Sequence[str], digits: int | None = 6) -> None:
    """Append one row (header on first write), flushed to disk at once: a crash keeps every finished row."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(columns), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({key: csv_value(row.get(key), digits) for key in columns})
        file.flush()
        os.fsync(file.fileno())


def read_csv(path: Path, numeric: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Rows of a CSV written here; the ``numeric`` columns parsed as floats (empty cells become ``nan``)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    numeric = tuple(numeric)
    for row in rows:
        for key in numeric:
            value = row.get(key, "")
            row[key] = float(value) if value not in ("", None) else math.nan
    return rows


# ---------------------------------------------------------------------------------------------- PNG
@dataclass
class Bars:
    """Grouped bars: one group per label along x, one bar per series, with error bars (``nan``: none)."""

    labels: Sequence[str]
    series: dict[str, Sequence[tuple[float, float]]]  # name -> (value, error) per label
    ylabel: str
    title: str = ""
    ylim: tuple[float, float] | None = None
    log: bool = False


@dataclass
class Scatter:
    """Named points with x / y error bars (``nan``: none), each annotated with its name."""

    points: dict[str, tuple[float, float, float, float]]  # name -> (x, x error, y, y error)
    xlabel: str
    ylabel: str
    title: str = ""
    xlog: bool = False


def _error(value: float) -> float:
    return 0.0 if value is None or math.isnan(value) else value


def _draw_bars(ax: Any, panel: Bars) -> None:  # noqa: ANN401
    names = list(panel.series)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = panel.series[name]
        means = [v for v, _ in values]
        errors = [_error(e) for _, e in values]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(panel.labels))]
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=name)
    ax.set_xticks(range(len(panel.labels)), list(panel.labels))
    if panel.log:
        ax.set_yscale("log")
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    ax.set_ylabel(panel.ylabel)
    if names:
        ax.legend(fontsize=8, ncol=max(1, len(names)), loc="upper center", bbox_to_anchor=(0.5, -0.07))
    ax.grid(axis="y", alpha=0.3)


def _draw_scatter(ax: Any, panel: Scatter) -> None:  # noqa: ANN401
    for name, (x, x_error, y, y_error) in panel.points.items():
        if math.isnan(x) or math.isnan(y):
            continue
        ax.errorbar(x, y, xerr=_error(x_error), yerr=_error(y_error), fmt="o", capsize=3, label=name)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if panel.xlog:
        ax.set_xscale("log")
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)


def write_png(
    path: Path,
    panels: Sequence[Bars | Scatter],
    title: str,
    panel_size: tuple[float, float] = (6.5, 4.8),
) -> None:
    """The panels side by side under ``title`` (the table's hardware / setting line), at 110 dpi."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(panel_size[0] * len(panels), panel_size[1]), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        (_draw_bars if isinstance(panel, Bars) else _draw_scatter)(ax, panel)
        if panel.title:
            ax.set_title(panel.title, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = [
    "Bars",
    "Scatter",
    "append_row",
    "format_mean_std",
    "hardware",
    "header",
    "mean_std",
    "read_csv",
    "table",
    "write_csv",
    "write_png",
    "write_text",
]
