"""The package is layered and imports run only downward.

    anomalib_kd_tools  ->  anomalib_aand, anomalib_memkd  ->  anomalib_kd_base  ->  anomalib

Every import statement of every module is checked, including the ones inside functions (a lazy upward import is
still an upward import), and a fresh interpreter checks what importing each model actually loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYER = {"anomalib_kd_base": 1, "anomalib_aand": 2, "anomalib_memkd": 2, "anomalib_kd_tools": 3}


def imported_top_packages(source: str, module: str) -> set[str]:
    """Top-level packages named by the import statements in ``source`` (relative imports resolved to ``module``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside the module's own package
                names.add(module.split(".")[0])
            elif node.module:
                names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and _is_dynamic_import(node.func):
            first = node.args[0]  # importlib.import_module("pkg.mod") / __import__("pkg")
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.add(first.value.split(".")[0])
    return names


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in {"__import__", "import_module"}
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def violations(package: str, source: str, module: str) -> list[str]:
    """Imports of ``module`` (in ``package``) that go up, sideways between the models, or to the old name."""
    out = []
    for name in imported_top_packages(source, module):
        if name == "anomalib_kd":
            out.append(f"{module} imports the removed package anomalib_kd")
        elif name in LAYER and name != package and LAYER[name] >= LAYER[package]:
            out.append(f"{module} (layer {LAYER[package]}) imports {name} (layer {LAYER[name]})")
    return out


def test_the_check_catches_upward_sideways_and_lazy_imports() -> None:
    assert violations("anomalib_kd_base", "def f():\n    from anomalib_aand import Aand\n", "anomalib_kd_base.x")
    assert violations("anomalib_aand", "import anomalib_memkd.loss\n", "anomalib_aand.x")
    assert violations("anomalib_memkd", "from anomalib_kd_tools.benchmark import main\n", "anomalib_memkd.x")
    assert violations("anomalib_aand", "from anomalib_kd.weights import build_teacher\n", "anomalib_aand.x")
    assert not violations("anomalib_aand", "from anomalib_kd_base.weights import build_teacher\n", "anomalib_aand.x")
    assert not violations("anomalib_kd_tools", "from anomalib_aand import Aand\n", "anomalib_kd_tools.x")
    assert not violations("anomalib_kd_base", "from .resume import RunGuardMixin\n", "anomalib_kd_base.distributed")
    assert violations("anomalib_kd_base", "import importlib\nimportlib.import_module('anomalib_memkd')\n", "anomalib_kd_base.x")
    assert violations("anomalib_aand", "__import__('anomalib_kd_tools.demo')\n", "anomalib_aand.x")


@pytest.mark.parametrize("package", sorted(LAYER))
def test_imports_go_only_downward(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no modules found in {package}"
    found = []
    for path in files:
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        found += violations(package, path.read_text(), module)
    assert not found, "\n".join(found)


def test_the_folders_are_the_layers() -> None:
    """``ls`` shows the layers: every Python package at the top of the repository is one of them."""
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LAYER), packages


BASE_MODULES = sorted(
    f"anomalib_kd_base.{p.stem}" for p in (REPO / "anomalib_kd_base").glob("*.py") if p.stem != "__init__"
)


@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [
        (["anomalib_aand"], ("anomalib_kd_tools", "anomalib_memkd", "anomalib_kd")),
        (["anomalib_memkd"], ("anomalib_kd_tools", "anomalib_aand", "anomalib_kd")),
        (BASE_MODULES, ("anomalib_kd_tools", "anomalib_aand", "anomalib_memkd", "anomalib_kd")),
    ],
    ids=["aand", "memkd", "base"],
)
def test_importing_a_layer_loads_nothing_above_it(modules: list[str], forbidden: tuple[str, ...]) -> None:
    assert modules
    code = (
        f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; "
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    # -S: without site-packages' .pth hooks the plugin autoloader (which imports both models) stays out of it.
    env_path = [str(REPO), *[p for p in sys.path if "site-packages" in p]]
    result = subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path[:0] = {env_path!r}; " + code],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
