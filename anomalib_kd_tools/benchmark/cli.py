"""``anomalib-kd-benchmark quality | edge | speed`` (also ``python -m anomalib_kd_tools.benchmark``).

Without a subcommand the arguments are ``quality``'s (the command before the subcommands existed).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

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
        epilog = getattr(module, "EPILOG", None)
        parsers[name] = subparsers.add_parser(name, help=HELP[name], description=module.DESCRIPTION, epilog=epilog)
        module.add_arguments(parsers[name])
    return parser, parsers


def with_subcommand(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``quality`` in front when it is empty or starts with an option other than ``-h`` / ``--help``;
    another first word (``qualty``) is left for :func:`parse` to report."""
    argv = list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        return ["quality", *argv]
    return argv


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM raises ``KeyboardInterrupt`` like SIGINT does, so that a subcommand stopped by ``timeout``, a
    scheduler or ``kill`` writes its tables from what is done, as after Ctrl-C (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:  # noqa: ARG001
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The parsed and checked options (``args.command`` names the subcommand); exits on bad arguments."""
    parser, parsers = build_parser()
    full = with_subcommand(argv)
    if full[0] not in COMMANDS and not full[0].startswith("-"):
        parser.error(f"unknown subcommand {full[0]!r} (choose from {', '.join(COMMANDS)})")
    args = parser.parse_args(full)
    COMMANDS[args.command].check_arguments(parsers[args.command], args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--run-cell"]:  # a quality cell's child process (runner.CellProcess)
        from anomalib_kd_tools.benchmark.job import cell_entry

        return cell_entry(argv[1], argv[2])
    full = with_subcommand(argv)
    args = parse(full)
    with sigterm_as_interrupt():  # each subcommand catches KeyboardInterrupt, writes its tables and returns 130
        return COMMANDS[args.command].run(args, full[1:])
