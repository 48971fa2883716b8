"""``benchmarks/gpu.sh``: its commands parse with the real CLI and hold the agreed GPU settings; no CUDA, no run."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from anomalib_kd_tools.benchmark import cli

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.sh"
MODULE = "anomalib_kd_tools.benchmark"


def _script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable, **env},
        check=False,
    )


def test_gpu_script_dry_run(tmp_path: Path) -> None:
    result = _script(tmp_path, DRY_RUN="1")
    assert result.returncode == 0, result.stdout + result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines() if f"-m {MODULE} " in line]
    parsed = {}
    for tokens in commands:
        assert tokens[:5] == ["timeout", "-s", "INT", "-k", "30"] and int(tokens[5]) > 0  # every step is capped
        assert tokens[6:9] == [sys.executable, "-m", MODULE]
        args = cli.parse(tokens[9:])  # the real parser: a renamed or removed flag fails here
        parsed[args.command] = args
    assert sorted(parsed) == ["quality", "speed"]
    assert sum(int(tokens[5]) for tokens in commands) <= 8 * 60  # the caps keep the whole run inside 8 minutes

    quality = parsed["quality"]
    assert quality.generated and quality.dataset_root is None
    assert quality.backbone == "wide_resnet50_2" and quality.pre_trained is False and not quality.proxy_teacher
    assert quality.image_size == 256
    assert quality.models == ["Patchcore", "ReverseDistillation", "Aand", "MemKD"] and quality.ablation is None
    # scaled schedules: shorter than the papers' (RD 200, MemKD 100, Aand 100 + 120), same proportions for Aand
    assert quality.epochs is not None and 0 < quality.epochs < 100
    stage1, stage2 = quality.aand_stage_epochs
    assert 0 < stage1 < 100 and 0 < stage2 < 120 and stage1 * 120 == stage2 * 100
    assert quality.devices == "auto"

    speed = parsed["speed"]
    assert speed.device == "cuda" and speed.only is None  # training step, memory and inference (fast path inside)
    assert speed.backbone == "wide_resnet50_2" and speed.image_size == 256 and not speed.quick
    assert set(speed.configs) == {"rd", "aand-s1", "aand-s1-sub", "aand-s2", "memkd"}
    # every table under the one output folder
    assert quality.output == tmp_path / "out" / "quality" and speed.output == tmp_path / "out" / "speed"
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_gpu_script_refuses_without_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would run the benchmark")
    result = _script(tmp_path)
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr and "DRY_RUN=1" in result.stderr
    assert not (tmp_path / "out").exists()
