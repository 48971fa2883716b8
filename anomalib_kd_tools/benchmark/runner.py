"""Where the cells of ``quality`` run: ``--devices`` to device slots (:func:`resolve_devices`), one cell per device at
a time (:func:`run_schedule`), each in a fresh process that sees only its GPU (:class:`CellProcess`).

Not anomalib's ``ParallelRunner`` / ``SerialRunner``: their ``ProcessPoolExecutor`` workers are reused from job to
job (a cell needs a fresh process, for its own peak memory and seeding untouched by an earlier cell, that sees
exactly one GPU, so it gives the same numbers wherever it runs), they gather the results at the end (a crash loses
every finished job; here each row is appended to ``results.csv`` at once and a re-run resumes), and on one GPU or the
CPU they run serially in the parent process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from anomalib_kd_tools.benchmark.generator import Cell


def resolve_devices(spec: str, cuda_count: int | None = None) -> list[str]:
    """``auto`` | ``cpu`` | ``N`` | ``i,j,...`` -> device slots: ``["cpu"]`` or ``["cuda:0", "cuda:1", ...]``."""
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count()
    spec = str(spec).strip().lower()
    if spec == "cpu" or (spec == "auto" and cuda_count == 0):
        return ["cpu"]
    if spec == "auto":
        return [f"cuda:{i}" for i in range(cuda_count)]
    if "," in spec or spec.startswith("cuda:"):
        indices = [int(part.removeprefix("cuda:")) for part in spec.split(",") if part.strip()]
    else:
        count = int(spec)
        if count < 1:
            msg = f"--devices {spec}: need at least one device"
            raise ValueError(msg)
        indices = list(range(count))
    missing = [i for i in indices if i >= cuda_count]
    if missing or len(set(indices)) != len(indices):
        msg = f"--devices {spec}: {cuda_count} CUDA GPU(s) visible, cannot use {indices}"
        raise ValueError(msg)
    return [f"cuda:{i}" for i in indices]


def run_schedule(cells: Iterable[Cell], devices: Sequence[str], start: Callable[[Cell, str], Any],
                 on_start: Callable[[Cell, str], None] | None = None,
                 on_finish: Callable[[Cell, str, Any], None] | None = None,
                 poll_interval: float = 0.2) -> None:  # fmt: skip
    """Run ``cells`` with at most one cell per device at a time, in order, until all are done: ``start(cell,
    device)`` returns a handle whose ``poll()`` is ``None`` while it runs, then the outcome ``on_finish`` gets."""
    pending = deque(cells)
    running: dict[str, tuple[Cell, Any]] = {}
    while pending or running:
        for device in devices:
            if device not in running and pending:
                cell = pending.popleft()
                running[device] = (cell, start(cell, device))
                if on_start is not None:
                    on_start(cell, device)
        ended = False
        for device, (cell, handle) in list(running.items()):
            outcome = handle.poll()
            if outcome is not None:
                del running[device]
                ended = True
                if on_finish is not None:
                    on_finish(cell, device, outcome)
        if not ended and running:
            time.sleep(poll_interval)


def child_visible_devices(device: str, parent_visible: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a cell on ``device`` (an index among the GPUs this process sees)."""
    if not device.startswith("cuda"):
        return ""  # CPU cells see no GPU
    index = int(device.removeprefix("cuda:"))
    visible = [part.strip() for part in (parent_visible or "").split(",") if part.strip()]
    return visible[index] if visible else str(index)


class CellProcess:
    """A cell running in its own Python process, pinned to one device through ``CUDA_VISIBLE_DEVICES``."""

    def __init__(self, spec: dict[str, Any], device: str, run_dir: Path, log_path: Path) -> None:
        self.spec_path = run_dir / f"{spec['slug']}.spec.json"
        self.result_path = run_dir / f"{spec['slug']}.result.json"
        self.result_path.unlink(missing_ok=True)
        self.spec_path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
        self.log_path = log_path
        env = os.environ.copy()
        env["CUDA_VISIBLE_DEVICES"] = child_visible_devices(device, os.environ.get("CUDA_VISIBLE_DEVICES"))
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        env.setdefault("PYTHONHASHSEED", "0")
        if spec.get("threads"):
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
        self.started = time.perf_counter()
        self._log = log_path.open("w", encoding="utf-8")
        command = [sys.executable, "-m", "anomalib_kd_tools.benchmark", "--run-cell", str(self.spec_path)]
        command.append(str(self.result_path))
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)  # noqa: S603

    def poll(self) -> dict[str, Any] | None:
        code = self.process.poll()
        if code is None:
            return None
        self._log.close()
        elapsed = time.perf_counter() - self.started
        if code == 0 and self.result_path.exists():
            return {"ok": True, "row": json.loads(self.result_path.read_text(encoding="utf-8")), "elapsed": elapsed}
        tail = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        return {"ok": False, "error": f"exit code {code}", "tail": tail, "elapsed": elapsed}

    def cleanup(self) -> None:
        self.spec_path.unlink(missing_ok=True)
        self.result_path.unlink(missing_ok=True)

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()
