"""The anomalib.models entry points are visible to stock anomalib, cheaply, and can be switched off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run_python(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_entry_points_are_declared() -> None:
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="anomalib.models")}
    assert names.get("Aand") == "anomalib_aand:Aand"
    assert names.get("MemKD") == "anomalib_memkd:MemKD"


def test_fresh_interpreter_importing_only_anomalib_sees_aand() -> None:
    code = (
        "import json, anomalib.models as m\n"
        "a = m.get_model('aand', backbone='resnet18', pre_trained=False)\n"
        "b = m.get_model({'class_path': 'Aand', 'init_args': {'backbone': 'resnet18', 'pre_trained': False}})\n"
        "print(json.dumps([type(a).__module__, type(b).__name__, 'aand' in m.list_models(), hasattr(m, 'Aand')]))"
    )
    assert json.loads(run_python(code)) == ["anomalib_aand.lightning_model", "Aand", True, True]


def test_plugin_imported_before_anomalib_models_is_still_registered() -> None:
    code = (
        "import json, warnings\n"
        "warnings.simplefilter('error', UserWarning)\n"
        "import anomalib_aand\n"
        "import anomalib.models as m\n"
        "print(json.dumps([m.Aand is anomalib_aand.Aand, 'aand' in m.list_models()]))"
    )
    assert json.loads(run_python(code)) == [True, True]


def test_autoload_can_be_switched_off() -> None:
    code = "import json, anomalib.models as m; print(json.dumps(['aand' in m.list_models(), hasattr(m, 'Aand')]))"
    assert json.loads(run_python(code, ANOMALIB_KD_AUTOLOAD="0")) == [False, False]


def test_startup_hook_imports_nothing_but_itself() -> None:
    """No start-up cost beyond one tiny module: compare sys.modules with the hook on and off."""
    code = "import json, sys; print(json.dumps(sorted(sys.modules)))"
    with_hook = set(json.loads(run_python(code)))
    without = set(json.loads(run_python(code, ANOMALIB_KD_AUTOLOAD="0")))
    assert with_hook - without == set()  # the module is imported in both cases; only the finder differs
    assert "anomalib_kd_autoload" in with_hook
    assert not any(name.startswith(("anomalib", "importlib.metadata", "importlib.abc")) and name != "anomalib_kd_autoload" for name in with_hook)


@pytest.mark.parametrize("name", ["Aand", "anomalib_aand.Aand"])
def test_cli_resolves_model_names(name: str) -> None:
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "anomalib"), "train", "--model", name, "--print_config"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: anomalib_aand.Aand" in result.stdout
