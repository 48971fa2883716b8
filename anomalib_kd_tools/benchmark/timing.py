"""The one timing loop of ``anomalib-kd-benchmark``: ``warmup`` untimed calls, then ``runs`` timed ones.

Used by ``quality`` (:mod:`.job`: latency and throughput of a cell), ``edge`` (every back-end) and ``speed`` (the
OpenVINO rows). ``speed``'s training steps and its interleaved eager rounds time their own calls: the first resets
the peak-memory counters between warm-up and timing, the second alternates the models within each round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def time_calls(call: Callable[[], Any], runs: int, warmup: int = 0, sync: Callable[[], None] | None = None) -> list[float]:
    """Seconds of each of ``runs`` calls of ``call()`` after ``warmup`` untimed ones; ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs after the warm-up and after each timed call, inside its timing."""
    for _ in range(warmup):
        call()
    if sync is not None:
        sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return times


__all__ = ["time_calls"]
