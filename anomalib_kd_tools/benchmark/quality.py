"""``anomalib-kd-benchmark quality``: Patchcore, ReverseDistillation, Aand and MemKD on the same data and seeds.

The grid's cells (:mod:`.generator`), each in its own child process (:mod:`.runner`, :mod:`.job`), write into
``--output``: ``results.csv`` (a row per finished cell, appended at once; a re-run skips the cells in it, and
``run_config.json`` refuses other settings), ``results.md`` / ``results.png`` / ``heatmaps.png``
(:mod:`.quality_report`, or :mod:`.ablation_report` with ``--ablation``), ``paper_comparison.csv``
(:mod:`.paper_results`) and ``logs/``. The protocol and the columns: docs/benchmarks.md ("The package's runner").
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib_kd_tools.benchmark import ablation, ablation_report, paper_results, quality_report, runner, schema
from anomalib_kd_tools.benchmark.generator import GENERATED_CATEGORY, MODELS, Cell, make_cells
from anomalib_kd_tools.benchmark.schema import ABLATION_COLUMNS, COLUMNS, LABELS, METRICS

DESCRIPTION = "Side-by-side benchmark of Patchcore, ReverseDistillation, Aand and MemKD (same data, seeds)."
EPILOG = "Paper numbers need ImageNet weights (--pre-trained) and MVTec AD / VisA (--dataset-root)."
# Settings that change the numbers of a cell: a results.csv made with other values must not be extended.
RUN_CONFIG_KEYS = (
    "dataset_kind", "dataset", "image_size", "backbone", "pre_trained", "epochs", "aand_stage_epochs", "batch_size",
    "coreset_ratio", "val_split", "val_split_ratio", "split_seed", "openvino", "throughput_batch", "threads",
    "generated_spec", "schedule_scale",
    # ablation mode (.ablation); absent from older run configs, where they mean "off"
    "ablation", "proxy_teacher", "texture_dir", "texture_spec", "aand_foreground",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------- options
def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset-root", type=Path, help="MVTec-layout folder: <root>/<category>/{train,test,...}")
    data.add_argument("--generated", action="store_true", help="generate a small MVTec-layout dataset (labelled)")
    parser.add_argument("--categories", nargs="+", help="categories under --dataset-root (default: all found)")
    parser.add_argument("--dataset-name", choices=("auto", "mvtec", "visa", "none"), default="auto",
                        help="which paper numbers results.md / paper_comparison.csv show beside the measured ones "
                        "(default auto: MVTec AD or VisA when every category is one of its names; none: no comparison)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 (0 1 2 with --ablation)")
    parser.add_argument("--backbone", help="one backbone for all four models (default: wide_resnet50_2 for "
                        "Patchcore/RD, wide_resnet50_2.tv_in1k for Aand/MemKD)")
    parser.add_argument("--pre-trained", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, help="epochs of RD and MemKD (default: 200 and 100, the papers')")
    parser.add_argument("--aand-stage-epochs", nargs=2, type=int, metavar=("S1", "S2"),
                        help="Aand's stage lengths (default: 100 120)")
    parser.add_argument("--schedule-scale", type=float, default=1.0, help="one factor for every model's own schedule "
                        "(papers' epochs x factor, at least 1; e.g. 0.1: RD 20, MemKD 10, Aand 10+12 epochs); "
                        "--epochs / --aand-stage-epochs take precedence")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--coreset-ratio", type=float, default=0.1, help="Patchcore coreset sampling ratio")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--val-split", choices=("from_test", "synthetic"), default="from_test")
    parser.add_argument("--val-split-ratio", type=float, default=0.3)
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the validation split (fixed per run)")
    parser.add_argument("--output", type=Path, default=Path("runs/anomalib-kd-benchmark"))
    parser.add_argument("--devices", default="auto", help="auto | cpu | N (first N GPUs) | i,j (these GPUs)")
    parser.add_argument("--openvino", action=argparse.BooleanOptionalAction, default=None, help="default: if installed")
    parser.add_argument("--heatmaps", type=int, default=4, help="anomalous test images in heatmaps.png (rows; the "
                        "first seed's models as columns); 0: none")
    parser.add_argument("--timing-runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--throughput-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, help="CPU threads per cell (torch and OpenVINO; default: torch's "
                        "default). On a shared or busy CPU, 1 avoids thread oversubscription that can inflate "
                        "latencies many times")
    generated = parser.add_argument_group("generated data (--generated)")
    generated.add_argument("--n-train", type=int, default=32)
    generated.add_argument("--n-test-good", type=int, default=8)
    generated.add_argument("--n-test-per-defect", type=int, default=4)
    ablation.add_arguments(parser)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks across options and the run-dependent defaults (seeds, defects, OpenVINO when installed)."""
    if args.image_size % 32 or args.image_size < 64:  # noqa: PLR2004
        parser.error("--image-size must be a multiple of 32 and at least 64")
    if not 0 < args.schedule_scale <= 1:
        parser.error("--schedule-scale must be in (0, 1]")
    ablation.check_arguments(parser, args)
    if args.openvino is None:
        import importlib.util

        args.openvino = importlib.util.find_spec("openvino") is not None


# ---------------------------------------------------------------------------------------------- data and settings
def _prepare_data(args: argparse.Namespace) -> tuple[Path, list[str], dict[str, Any]]:
    """Dataset root, categories and the run-config entries describing the data (nothing is written yet)."""
    if args.generated:
        sizes = {key: getattr(args, key) for key in ("image_size", "n_train", "n_test_good", "n_test_per_defect")}
        spec = {"category": GENERATED_CATEGORY, **sizes, "seed": 0, **ablation.generated_extras(args)}
        root = (args.output / "data").resolve()
        categories = spec.get("products") or [GENERATED_CATEGORY]  # one category per product, named after it
        return root, categories, {"dataset_kind": "generated", "dataset": "generated", "generated_spec": spec}
    root = args.dataset_root.resolve()
    found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir()) if root.is_dir() else []
    categories = args.categories or found
    missing = [c for c in categories if c not in found]
    if not categories or missing:
        msg = f"{root}: no MVTec-layout category folder{'s ' + str(missing) if missing else 's'} (<category>/train)"
        raise SystemExit(msg)
    return root, categories, {"dataset_kind": "folder", "dataset": str(root), "generated_spec": None}


def _write_generated(root: Path, spec: dict[str, Any]) -> None:
    """Write the generated dataset unless the same one is already there."""
    from anomalib_kd_tools.synthetic import make_mvtec_like_dataset

    marker = root / "generated.json"
    if not marker.exists() or json.loads(marker.read_text(encoding="utf-8")) != spec:
        options = {key: value for key, value in spec.items() if key != "products"}
        if "defects" in options:
            options["defects"] = tuple(options["defects"])
        for product in spec.get("products") or [None]:  # one category per product, or the default widget
            named = {"category": product, "product": product} if product else {}
            make_mvtec_like_dataset(root, **{**options, **named})
        marker.write_text(json.dumps(spec), encoding="utf-8")


def _same_setting(key: str, old: Any, new: Any) -> bool:  # noqa: ANN401
    if key == "schedule_scale":  # absent from run configs written before the option: the papers' schedules
        return (old or 1.0) == (new or 1.0)
    if key in ablation.RUN_CONFIG_DEFAULT_OFF:  # a run config written before these keys existed means "off"
        return (old or None) == (new or None)
    return old == new


# ---------------------------------------------------------------------------------------------- the run
def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:  # noqa: ARG001 - the command is not reported
    """Run the grid (resuming), then write the tables; 0, 1 (failed cells), 2 (other settings) or 130 (interrupted by
    Ctrl-C, SIGINT or SIGTERM: the running cells are stopped, the tables hold the finished ones)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    args.output.mkdir(parents=True, exist_ok=True)
    root, categories, data_config = _prepare_data(args)
    variants, skipped, ablation_config = ablation.plan(args, args.output)
    options = ("image_size", "backbone", "pre_trained", "epochs", "aand_stage_epochs", "schedule_scale", "batch_size",
               "coreset_ratio", "val_split", "val_split_ratio", "split_seed", "openvino", "throughput_batch", "threads")
    config = {**data_config, **{key: getattr(args, key) for key in options}}
    config["dataset_name"] = args.dataset_name  # report only (not in RUN_CONFIG_KEYS: it changes no cell's numbers)
    config.update(ablation_config)
    config_path = args.output / "run_config.json"
    if config_path.exists():
        previous = json.loads(config_path.read_text(encoding="utf-8"))
        changed = [key for key in RUN_CONFIG_KEYS if not _same_setting(key, previous.get(key), config.get(key))]
        if changed:
            console.print(f"[red]{args.output} holds results made with other settings ({', '.join(changed)}); "
                          "use another --output.[/red]")
            return 2
    config_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    if args.generated:
        _write_generated(root, data_config["generated_spec"])
    ablation.write_textures(config)

    csv_path, run_dir, log_dir = args.output / "results.csv", args.output / "cells", args.output / "logs"
    for folder in (run_dir, log_dir):
        folder.mkdir(exist_ok=True)
    devices = runner.resolve_devices(args.devices)
    by_name = {v.name: v for v in variants}
    cells = make_cells(list(by_name), categories, args.seeds)
    for name, missing in skipped.items():
        console.print(f"[yellow]skip variant {name}: the model's constructor has no {', '.join(missing)}[/yellow]")
    finished = set(schema.cell_keys(schema.read_results(csv_path)))
    todo = [c for c in cells if c.key not in finished]
    for cell in (c for c in cells if c.key in finished):
        console.print(f"skip {cell.name} (already in {csv_path.name})")
    kind = "GENERATED data" if args.generated else f"folder {root}"
    console.print(f"{len(cells)} cells ({len(todo)} to run) on {', '.join(devices)}; {kind}; "
                  f"{ablation.teacher_label(config)}; logs in {log_dir}")

    def spec_of(cell: Cell, device: str) -> dict[str, Any]:
        variant = by_name[cell.model]
        extra = {"variant": variant.name, "overrides": variant.resolved(config["texture_dir"])}
        return {
            "model": variant.model, **(extra if args.ablation else {}), "category": cell.category, "seed": cell.seed,
            "slug": cell.slug, "device": device, "dataset_root": str(root), "dataset_kind": data_config["dataset_kind"],
            "dataset_label": data_config["dataset"], "work_dir": str(run_dir.resolve()),
            **{k: config[k] for k in RUN_CONFIG_KEYS if k in config and k not in {"dataset_kind", "dataset"}},
            **{key: getattr(args, key) for key in ("num_workers", "timing_runs", "warmup")},
            "heatmaps": 0 if args.ablation or cell.seed != min(args.seeds) else args.heatmaps,
            "heatmap_dir": str((args.output / "heatmaps").resolve()),
        }  # fmt: skip

    failures: list[str] = []
    running: dict[str, tuple[Cell, Any]] = {}
    columns = (TextColumn("[bold]benchmark"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.description}"), console=console, transient=False) as progress:
        task = progress.add_task("", total=len(cells), completed=len(cells) - len(todo))

        def describe() -> None:
            names = ", ".join(f"{c.name} [{d}]" for d, (c, _) in running.items())
            progress.update(task, description=f"running {names}" if names else "")

        def start(cell: Cell, device: str) -> Any:  # noqa: ANN401 - a runner.CellProcess
            handle = runner.CellProcess(spec_of(cell, device), device, run_dir, log_dir / f"{cell.slug}.log")
            running[device] = (cell, handle)
            return handle

        def on_finish(cell: Cell, device: str, outcome: dict[str, Any]) -> None:
            _, handle = running.pop(device)
            if outcome["ok"]:
                row = outcome["row"]
                schema.append_row(csv_path, row, ABLATION_COLUMNS if args.ablation else COLUMNS)
                handle.cleanup()
                progress.console.print(
                    f"done {cell.name} on {device} in {outcome['elapsed']:.0f} s: "
                    + ", ".join(f"{LABELS[m]} {row[m]:.3f}" for m in METRICS)
                    + f", latency {row['latency_bs1_ms']:.1f} ms",
                )
            else:
                failures.append(cell.name)
                progress.console.print(f"[red]FAILED {cell.name} on {device} ({outcome['error']}):[/red]")
                for line in outcome["tail"]:
                    progress.console.print(f"    {line}", markup=False, highlight=False)
            progress.advance(task)
            describe()

        interrupted = False
        try:
            runner.run_schedule(todo, devices, start, on_start=lambda c, d: describe(), on_finish=on_finish)
        except KeyboardInterrupt:  # Ctrl-C, or SIGINT / SIGTERM from a cap (cli.sigterm_as_interrupt)
            interrupted = True
            for _, handle in running.values():
                handle.terminate()
            console.print("[yellow]interrupted; writing the tables of the finished cells (results.csv); "
                          "re-run to resume[/yellow]")

    rows = schema.read_results(csv_path)
    wanted = {c.key for c in cells}
    rows = rows[[key in wanted for key in schema.cell_keys(rows)]]
    config["interrupted"] = interrupted  # report only: the tables say they are partial
    markdown, png = args.output / "results.md", args.output / "results.png"
    if len(rows) and args.ablation:
        text = ablation_report.write_markdown(markdown, rows, config, variants, skipped)
        ablation_report.write_plot(png, rows, config, variants, skipped)
    elif len(rows):
        text = quality_report.write_markdown(markdown, rows, config)
        quality_report.write_plot(png, rows, config)
        if args.heatmaps and quality_report.write_heatmaps(args.output / "heatmaps.png", rows, config, args.heatmaps):
            console.print(f"wrote {args.output / 'heatmaps.png'}")
        if paper_results.write_csv(args.output / "paper_comparison.csv", rows, config):
            console.print(f"wrote {args.output / 'paper_comparison.csv'} (paper numbers beside measured ones)")
    if len(rows):
        console.print(text, markup=False, highlight=False)
        console.print(f"wrote {csv_path}, {markdown}, {png}")
    if failures:
        console.print(f"[red]{len(failures)} cell(s) failed: {', '.join(failures)} (see {log_dir})[/red]")
    return 130 if interrupted else int(bool(failures))
