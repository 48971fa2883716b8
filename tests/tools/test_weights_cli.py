"""`anomalib-kd-weights` (anomalib_kd_tools.weights): entry point, flags and help, output and error messages.

The end-to-end round trip (console script, then both models load the file) is
tests/base/test_weights.py::test_weights_command_round_trip, which the README's and docs' command blocks cite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from anomalib_kd_tools import weights as weights_cli

DEFAULT = "wide_resnet50_2.tv_in1k"
# (option strings, dest, default, required, nargs, type, help), as the command had them in anomalib_kd_base.weights
EXPORT = [
    (("--backbone",), "backbone", DEFAULT, False, None, None, f"timm name with tag (default {DEFAULT})"),
    (("--output", "-o"), "output", None, True, None, None, "output file: .safetensors (recommended) or .pth"),
    (("--no-pretrained",), "no_pretrained", False, False, 0, None,
     "write a randomly initialised backbone instead (no download; for tests)"),
    (("--seed",), "seed", 0, False, None, int, "seed of --no-pretrained (default 0)"),
]  # fmt: skip
VERIFY = [
    ((), "file", None, True, None, None, ".safetensors / .pth / .pt file"),
    (("--backbone",), "backbone", DEFAULT, False, None, None, f"timm name (default {DEFAULT})"),
    (("--layers",), "layers", ["layer1", "layer2", "layer3"], False, "+", None, "teacher layers (default layer1-3)"),
]


def options(parser: argparse.ArgumentParser) -> list[tuple]:
    return [
        (tuple(a.option_strings), a.dest, a.default, a.required, a.nargs, a.type, a.help)
        for a in parser._actions  # noqa: SLF001 - argparse keeps its arguments here
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))  # noqa: SLF001
    ]


def test_console_script_points_to_the_tools_layer() -> None:
    (script,) = entry_points(group="console_scripts", name="anomalib-kd-weights")
    assert script.value == "anomalib_kd_tools.weights:main"
    assert script.load() is weights_cli.main


def test_flags_and_help_are_unchanged() -> None:
    parser = weights_cli.build_parser()
    assert parser.prog == "anomalib-kd-weights"
    assert parser.description == (
        "Teacher weights for offline / air-gapped machines: `export` writes them on a connected machine, "
        "`verify` checks a file against a backbone (no network). Use the file with backbone_weights=FILE "
        "(CLI: --model.backbone_weights FILE)."
    )
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    assert commands.required and list(commands.choices) == ["export", "verify"]
    assert {a.dest: a.help for a in commands._choices_actions} == {  # noqa: SLF001
        "export": "download a timm backbone's weights and write them to a file",
        "verify": "load a weights file into a teacher and print its provenance",
    }
    assert options(commands.choices["export"]) == EXPORT
    assert options(commands.choices["verify"]) == VERIFY
    with pytest.raises(SystemExit) as raised:
        weights_cli.main([])
    assert raised.value.code == 2  # argparse: a command is required


def test_export_and_verify_print_what_they_did(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "r18.pth"
    assert weights_cli.main(["export", "--backbone", "resnet18", "--no-pretrained", "-o", str(output)]) == 0
    digest = hashlib.sha256(output.read_bytes()).hexdigest()
    size = output.stat().st_size / 2**20
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {output} ({size:.1f} MiB), weights random-init",
        f"{digest}  r18.pth",
        "offline: anomalib train --model Aand --model.backbone resnet18 --model.backbone_weights r18.pth ...",
    ]
    assert "fc.weight" in torch.load(output, weights_only=True)  # the full classification model

    assert weights_cli.main(["verify", str(output), "--backbone", "resnet18", "--layers", "layer1", "layer2"]) == 0
    provenance = json.loads(capsys.readouterr().out)
    assert provenance["weights_source"] == "file" and provenance["weights_tag"] == "r18.pth"  # no header in a .pth
    assert provenance["weights_sha256"] == digest

    assert weights_cli.main(["verify", str(tmp_path / "gone.safetensors")]) == 1
    assert capsys.readouterr().err.startswith(f"error: backbone_weights file {str(tmp_path / 'gone.safetensors')!r}")


def test_export_without_network_names_the_ways_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("network used"))
    assert weights_cli.main(["export", "--backbone", "resnet18", "--output", str(tmp_path / "r18.safetensors")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: Could not download the weights 'resnet18.a1_in1k' (backbone='resnet18'): ")
    assert "Run this on a machine that reaches huggingface.co (unset HF_HUB_OFFLINE)" in error
    assert "HTTPS_PROXY; HF_ENDPOINT selects a hub mirror." in error
    assert not (tmp_path / "r18.safetensors").exists()
