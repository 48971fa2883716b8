"""The one timer of every subcommand: :class:`torch.utils.benchmark.Timer` (its clock synchronises CUDA; CPU and
OpenVINO calls read ``timeit.default_timer``), for a fixed number of calls.

``Timer.timeit`` adds two warm-up calls and reports a block's mean, ``blocked_autorange`` picks the count; the options
fix both (``--warmup`` untimed calls, then each timed call alone, for medians and percentiles), so :class:`CallTimer`
builds that on ``Timer._timeit(number)``, the primitive every ``Timer`` method uses.
"""

from __future__ import annotations

import logging
import timeit
from collections.abc import Callable
from typing import Any

import torch

# Importing torch.utils.benchmark looks for a CUDA toolkit (for C++ timers, unused here) and logs "No CUDA runtime is
# found" on a machine that has one installed but no GPU: not this command's message, so it is kept out of its output.
_cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
_level = _cpp_extension_log.level
_cpp_extension_log.setLevel(logging.ERROR)
from torch.utils.benchmark import Timer  # noqa: E402

_cpp_extension_log.setLevel(_level)


class CallTimer(Timer):
    """``call()`` timed by ``torch.utils.benchmark.Timer`` at this process's thread count (Timer's default is 1)."""

    def __init__(self, call: Callable[[], Any], cuda: bool = False) -> None:
        clock = {} if cuda else {"timer": timeit.default_timer}  # Timer's default clock synchronises the GPU
        super().__init__("call()", globals={"call": call}, num_threads=torch.get_num_threads(), **clock)

    def once(self) -> float:
        """Seconds of one call."""
        return self._timeit(1)

    def calls(self, runs: int, warmup: int = 0) -> list[float]:
        """Seconds of each of ``runs`` calls after ``warmup`` untimed ones."""
        if warmup:
            self._timeit(warmup)
        return [self._timeit(1) for _ in range(runs)]
