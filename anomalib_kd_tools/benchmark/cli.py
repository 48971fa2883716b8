"""``anomalib-kd-benchmark``: one command, three subcommands, one report writer.

::

    anomalib-kd-benchmark quality [...]   # side-by-side grid: Patchcore, RD, Aand, MemKD (+ --ablation)
    anomalib-kd-benchmark edge [...]      # CPU latency / throughput / AUROC per precision (torch, OpenVINO)
    anomalib-kd-benchmark speed [...]     # training step, memory and inference of AAND / MemKD relative to RD

Without a subcommand the arguments are ``quality``'s: ``anomalib-kd-benchmark --generated ...`` is
``anomalib-kd-benchmark quality --generated ...`` (the command before the subcommands existed).
``python -m anomalib_kd_tools.benchmark`` is the same command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from anomalib_kd_tools.benchmark import edge, quality, speed

COMMANDS = {"quality": quality, "edge": edge, "speed": speed}
HELP = {
    "quality": "side-by-side grid of Patchcore, ReverseDistillation, Aand and MemKD, or the --ablation variants",
    "edge": "CPU latency, throughput and image AUROC per precision (torch, OpenVINO FP32 / FP16 / INT8 / default)",
    "speed": "training step time, peak memory and inference latency (eager, fast path, OpenVINO) relative to RD",
}
EPILOG = (
    "Without a subcommand the arguments are quality's (backward compatible): "
    "'anomalib-kd-benchmark --generated ...' runs 'anomalib-kd-benchmark quality --generated ...'. "
    "Each subcommand writes CSV, markdown and PNG tables into its --output; "
    "'anomalib-kd-benchmark SUBCOMMAND --help' lists its options."
)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command's parser and the parser of each subcommand."""
    parser = argparse.ArgumentParser(
        prog="anomalib-kd-benchmark",
        description="Benchmarks of AAND and MemKD beside anomalib's models: quality, edge (CPU precisions), speed.",
        epilog=EPILOG,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="{quality,edge,speed}")
    parsers = {}
    for name, module in COMMANDS.items():
        sub = subparsers.add_parser(name, help=HELP[name], description=module.DESCRIPTION)
        module.add_arguments(sub)
        parsers[name] = sub
    parsers["quality"].epilog = quality.EPILOG
    return parser, parsers


def with_subcommand(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``quality`` in front when it names no subcommand (and is not a request for the top help)."""
    argv = list(argv)
    if argv[:1] and (argv[0] in COMMANDS or argv[0] in ("-h", "--help")):
        return argv
    return ["quality", *argv]


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The parsed and checked options (``args.command`` names the subcommand); exits on bad arguments."""
    parser, parsers = build_parser()
    args = parser.parse_args(with_subcommand(argv))
    COMMANDS[args.command].check_arguments(parsers[args.command], args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--run-cell"]:  # a quality cell's child process (runner.CellProcess)
        from anomalib_kd_tools.benchmark.job import cell_entry

        return cell_entry(argv[1], argv[2])
    full = with_subcommand(argv)
    args = parse(full)
    return COMMANDS[args.command].run(args, full[1:])


__all__ = ["COMMANDS", "build_parser", "main", "parse"]
