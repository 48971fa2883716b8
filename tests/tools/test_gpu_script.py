"""``benchmarks/gpu.sh``: its commands parse with the real CLI and hold the agreed GPU settings; no CUDA, no run."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from anomalib_kd_tools.benchmark import cli

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.sh"
MODULE = "anomalib_kd_tools.benchmark"
SETUP_S = 30  # what the script spends outside the two capped steps, at most


def test_gpu_script_worst_case_fits_eight_minutes() -> None:
    """The defaults as written in the script (not only as the dry run prints them): caps + kill graces + set-up."""
    text = SCRIPT.read_text(encoding="utf-8")

    def default(name: str) -> int:
        match = re.search(rf'\$\{{{name}:-(\d+)\}}', text)
        assert match, f"gpu.sh has no default for {name}"
        return int(match.group(1))

    caps = [default("QUALITY_TIMEOUT"), default("SPEED_TIMEOUT")]
    kill = default("KILL_AFTER")
    assert text.count('timeout -s INT -k "$kill_after"') == 3  # capped() and the two dry-run lines use the same grace
    assert sum(cap + kill for cap in caps) + SETUP_S <= 8 * 60


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
        assert tokens[:4] == ["timeout", "-s", "INT", "-k"] and int(tokens[4]) > 0 and int(tokens[5]) > 0  # capped
        assert tokens[6:9] == [sys.executable, "-m", MODULE]
        args = cli.parse(tokens[9:])  # the real parser: a renamed or removed flag fails here
        parsed[args.command] = args
    assert sorted(parsed) == ["quality", "speed"]
    # worst case of each step: its cap, then SIGKILL after the -k grace; + 30 s of set-up (CUDA probe, nvidia-smi)
    assert sum(int(tokens[5]) + int(tokens[4]) for tokens in commands) + SETUP_S <= 8 * 60

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


def test_gpu_script_reports_a_broken_install_not_missing_cuda(tmp_path: Path) -> None:
    fake = tmp_path / "python"  # an interpreter whose install is broken: the import fails
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    result = _script(tmp_path, PYTHON=str(fake))
    assert result.returncode == 2
    assert "cannot import torch" in result.stderr and "No module named 'torch'" in result.stderr
    assert "no CUDA" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_script_runs_from_the_repo_root(tmp_path: Path) -> None:
    """Started from elsewhere, the script works in the repo root; a relative OUTPUT stays relative to the caller."""
    fake = tmp_path / "python"  # records the directory the script runs its interpreter in
    fake.write_text(f"#!/bin/sh\npwd > {tmp_path / 'cwd.txt'}\nexit 1\n")
    fake.chmod(0o755)
    result = subprocess.run(
        ["bash", str(SCRIPT), "rel-out"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHON": str(fake), "DRY_RUN": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"(output: {tmp_path / 'rel-out'})" in result.stdout
    result = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "PYTHON": str(fake)}, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert (tmp_path / "cwd.txt").read_text().strip() == str(SCRIPT.parents[1])
