"""The one report writer of every subcommand: the same markdown header (:func:`header`), markdown tables
(pandas' ``to_markdown``: :func:`markdown`) and PNG panels (:class:`Bars`, :class:`Scatter`, :func:`write_png`).

The figure code lives here because anomalib's visualisation helpers draw images, anomaly maps and per-image metric
plots, not bar charts over models.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import DataRow, TableFormat

from anomalib_kd_tools.benchmark import schema

VERSIONED_PACKAGES = ("anomalib", "torch", "lightning", "timm", "openvino", "anomalib-kd")


def versions() -> str:
    """``anomalib 2.7.0, torch ..., ...``: the installed versions of the packages that change the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for package in VERSIONED_PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            parts.append(f"{package} {version(package)}")
    return ", ".join(parts)


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware(gpus: Iterable[str] = (), threads: int | None = None, no_gpu: str = "no GPU") -> str:
    """``CPU: <name> (<n> logical CPUs[, <t> torch threads]); GPU: <names>`` (or ``; <no_gpu>``)."""
    gpus = sorted(set(gpus))
    cpu = f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs" + (f", {threads} torch threads" if threads else "") + ")"
    return f"{cpu}; GPU: {', '.join(gpus)}" if gpus else f"{cpu}; {no_gpu}"


def today() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


INTERRUPTED = "**Interrupted** (Ctrl-C, or a cap's SIGINT / SIGTERM): these tables hold only what finished before"


def header(title: str, hardware: str, date: str, facts: Sequence[str] = (), command: str | None = None,
           interrupted: bool = False) -> list[str]:  # fmt: skip
    """The header of every table: title, hardware, date and versions, then ``facts`` (after :data:`INTERRUPTED` for a
    run that was stopped early) and the command."""
    lines = [f"# {title}", "", f"- Hardware: {hardware}", f"- Date: {date}; versions: {versions()}"]
    lines += [f"- {fact}" for fact in ([INTERRUPTED] if interrupted else []) + list(facts)]
    if command:
        lines.append(f"- Command: `{command}`")
    return [*lines, ""]


_ROW = DataRow("|", "|", "|")
# tabulate's "pipe" table without its column alignment: cells as written and a plain ``|---|`` rule under the header
PIPE = TableFormat(None, lambda widths, _: "|" + "---|" * len(widths), None, None, _ROW, _ROW, 1, None)


def markdown(frame: pd.DataFrame) -> list[str]:
    """The lines of a markdown table of ``frame`` (pandas' ``to_markdown``, no index): every cell as ``str`` gives it
    (no number reformatting, no padding), under a ``|---|---|`` rule."""
    cells = frame.astype(object).map(str)
    text = cells.to_markdown(index=False, tablefmt=PIPE, stralign=None, numalign=None, disable_numparse=True)
    return text.splitlines()


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a markdown table of ``rows`` under ``columns``."""
    return markdown(pd.DataFrame(list(rows), columns=list(columns)))


def formatted(rows: Iterable[Mapping[str, Any]], columns: Mapping[str, tuple[str, str]]) -> list[str]:
    """The lines of a markdown table of ``rows``: under each header of ``columns`` a row's ``key`` as ``format``
    gives it (``{header: (key, format)}``), an empty cell where the row has no ``key``."""
    return table(columns, [[spec.format(row[k]) if k in row else "" for k, spec in columns.values()] for row in rows])


def write_text(path: Path, lines: Sequence[str]) -> str:
    """Write ``lines`` (a markdown document) to ``path``; returns the text."""
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text, encoding="utf-8")
    return text


def write_json(path: Path, data: Any, indent: int | None = 2) -> None:  # noqa: ANN401
    """``data`` as JSON (the machine-readable twin of a markdown table; ``nan`` is written as ``NaN``)."""
    Path(path).write_text(json.dumps(data, indent=indent), encoding="utf-8")


@dataclass
class Bars:
    """Grouped bars: one group per row of ``values`` (x labels: its index), one bar per column (the series), with
    the same cells of ``errors`` as error bars (``nan`` or no ``errors``: none)."""

    values: pd.DataFrame
    ylabel: str
    errors: pd.DataFrame | None = None
    title: str = ""
    ylim: tuple[float, float] | None = None
    log: bool = False

    @classmethod
    def of(cls, stats: pd.DataFrame, columns: Sequence[str], ylabel: str, **options: Any) -> Bars:  # noqa: ANN401
        """Bars of :func:`.schema.aggregate`'s ``stats``: a group per column (under its :data:`.schema.LABELS` name),
        a bar per row of ``stats`` (its mean, with the std as the error bar)."""
        mean, std = (stats.xs(stat, axis=1, level=1)[list(columns)].T for stat in ("mean", "std"))
        return cls(mean.rename(index=schema.LABELS), ylabel, errors=std.rename(index=schema.LABELS), **options)


@dataclass
class Scatter:
    """Named points (``points``' index) at ``x`` / ``y`` with ``x_error`` / ``y_error`` bars (``nan``: none)."""

    points: pd.DataFrame  # columns x, x_error, y, y_error
    xlabel: str
    ylabel: str
    title: str = ""
    xlog: bool = False


def _draw_bars(ax: Any, panel: Bars) -> None:  # noqa: ANN401
    errors = None if panel.errors is None else panel.errors.astype(float).fillna(0.0)
    values = panel.values.astype(float)
    values.plot.bar(ax=ax, yerr=errors, capsize=3, width=0.8, rot=0, logy=panel.log, legend=False)
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    ax.set_ylabel(panel.ylabel)
    ax.set_xlabel("")
    if len(values.columns):
        ax.legend(fontsize=8, ncol=len(values.columns), loc="upper center", bbox_to_anchor=(0.5, -0.07))
    ax.grid(axis="y", alpha=0.3)


def _draw_scatter(ax: Any, panel: Scatter) -> None:  # noqa: ANN401
    points = panel.points[["x", "x_error", "y", "y_error"]].astype(float).fillna({"x_error": 0.0, "y_error": 0.0})
    for name, (x, x_error, y, y_error) in points.iterrows():
        if math.isnan(x) or math.isnan(y):
            continue
        ax.errorbar(x, y, xerr=x_error, yerr=y_error, fmt="o", capsize=3, label=name)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if panel.xlog:
        ax.set_xscale("log")
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)


def write_png(path: Path, panels: Sequence[Bars | Scatter], title: str,
              panel_size: tuple[float, float] = (6.5, 4.8)) -> None:  # fmt: skip
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
