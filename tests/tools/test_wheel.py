"""The package installs from its wheel: build, ``twine check``, a fresh venv without the checkout, the stock CLI.

What the tests do, all under ``tmp_path`` (nothing is written into the checkout, no ``dist/`` is left behind):

1. ``python -m build --outdir <tmp>`` the standard way: an isolated build environment with hatchling (from PyPI or
   pip's cache, like ``scripts/setup_env.sh``), the sdist first and the wheel built *from the sdist*, so a file
   missing from the sdist breaks the wheel build. ``python -m twine check --strict`` on both (README.md as the
   long description renders). The sdist holds what the docs test reads (``.ci/run``, ``scripts/``, ``docs/``,
   ``examples/``, ``hook/``, ``tests/``, ``pyproject.toml``): ``tests/test_docs.py`` is run inside the unpacked sdist.
2. A fresh virtual environment (``python -m venv``, with its own pip) and, inside it, ``pip install --no-deps
   --no-index <the wheel>``: anomalib-kd's own code, its ``anomalib.models`` entry points, console scripts and the
   ``anomalib_kd_autoload`` start-up hook come from the wheel alone.
3. The stock ``anomalib train --model Aand`` and ``--model MemKD`` on a tiny generated dataset (resnet18, random
   init, 64 px, one epoch per stage) and ``anomalib export --export_type openvino`` of the MemKD checkpoint, all run
   by the fresh venv's interpreter from a working directory outside the checkout.

**What is shared, and why.** Installing torch, anomalib, OpenVINO, ... afresh takes minutes and needs the index, so
the fresh venv borrows the *third-party* packages already installed in the test venv: a ``.pth`` file in the fresh
venv's site-packages names one directory, a farm of symbolic links to every entry of the test venv's site-packages
*except* the files of the installed anomalib-kd distribution itself (the entries its ``RECORD`` lists: its
``.dist-info`` with its entry points, the editable install's ``_editable_impl_anomalib_kd.pth`` that puts the
checkout on ``sys.path``, and the copy of ``anomalib_kd_autoload.py`` / ``.pth``) and without ``__pycache__`` and
``.pth`` files. A path line of a ``.pth`` only appends that directory to ``sys.path``; the ``.pth`` files inside it
are not processed, and the farm holds none anyway. Linking the whole site-packages directory would already keep the
checkout off ``sys.path``, but it would leave the checkout's ``anomalib_kd-0.1.0.dist-info`` (its entry points and
metadata) and its ``anomalib_kd_autoload.py`` visible behind the wheel's, so a file or an entry point missing from
the wheel could be masked; the farm leaves no second copy. The ``.pth`` is written *after* pip has installed the
wheel, so pip sees an empty environment and never touches the test venv. The interpreter is the same CPython (the
fresh venv is made by the test venv's python), which the borrowed compiled extensions need.

**How isolation is verified.** In the fresh venv (cwd ``tmp_path``, ``PYTHONPATH`` unset) ``anomalib_aand``,
``anomalib_memkd``, ``anomalib_kd_base``, ``anomalib_kd_tools`` and ``anomalib_kd_autoload`` resolve inside the
fresh venv's site-packages, the only ``anomalib-kd`` distribution found is the wheel's and the ``anomalib.models``
entry points come from it, no ``sys.path`` entry lies in the checkout, and no imported module's file (symbolic
links resolved) lies in the checkout outside the test venv's site-packages (where the borrowed third-party
packages live). The same module check runs at the exit of every CLI process (the launcher below prints it), so the
models that ``anomalib train`` trained and ``anomalib export`` exported are the wheel's.

The fresh venv has no ``anomalib`` console script (anomalib is not installed into it, only borrowed), so the test
writes the one ``pip install anomalib`` would write (``anomalib = anomalib.cli.cli:main``) into its ``bin/``; it
calls anomalib's CLI unmodified, and only adds the report at exit.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from anomalib_kd_tools.synthetic import make_mvtec_like_dataset

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DIST = "anomalib-kd"
PACKAGES = ("anomalib_aand", "anomalib_memkd", "anomalib_kd_base", "anomalib_kd_tools")
#: what the docs test (tests/test_docs.py) and CI read, besides the packages
SDIST_MEMBERS = (
    "pyproject.toml", "README.md", "LICENSE", ".ci/run", "scripts/run_tests.sh", "scripts/setup_env.sh",
    "docs/development.md", "examples/foreground_preview.py", "hook/anomalib_kd_autoload.py",
    "hook/anomalib_kd_autoload.pth", "tests/test_docs.py", "tests/conftest.py", "configs/memkd.yaml",
    "anomalib_kd_base/weights.py", "anomalib_kd_tools/benchmark/data/papers.csv",
)  # fmt: skip
SIZE = 64
CATEGORY = "widget"

# Where anomalib-kd's modules come from, and any imported module whose file lies in the checkout outside the test
# venv's site-packages. Run in the fresh venv: by the isolation test, and at exit of every CLI process.
WHERE = """
import json, os, sys
def _anomalib_kd_where(repo, shared):
    own = ("anomalib_aand", "anomalib_memkd", "anomalib_kd_base", "anomalib_kd_tools", "anomalib_kd_autoload")
    where = {name: getattr(sys.modules.get(name), "__file__", None) for name in own}
    inside = lambda path, root: path == root or path.startswith(root + os.sep)
    leaked = sorted(
        str(module.__file__) for module in list(sys.modules.values())
        if getattr(module, "__file__", None)
        and inside(os.path.realpath(module.__file__), repo)
        and not inside(os.path.realpath(module.__file__), shared)
    )
    print("ANOMALIB_KD_WHERE " + json.dumps({"modules": where, "from_checkout": leaked}), file=sys.stderr, flush=True)
"""

# The console script `pip install anomalib` writes (anomalib = anomalib.cli.cli:main), plus the report at exit.
LAUNCHER = """#!{python}
import atexit
import sys
{where}
atexit.register(_anomalib_kd_where, {repo!r}, {shared!r})
from anomalib.cli.cli import main
if __name__ == "__main__":
    sys.argv[0] = "anomalib"
    sys.exit(main())
"""


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{args[:4]}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _where(result: subprocess.CompletedProcess) -> dict:
    lines = [line for line in result.stderr.splitlines() if line.startswith("ANOMALIB_KD_WHERE ")]
    assert lines, result.stderr[-3000:]
    return json.loads(lines[-1].split(" ", 1)[1])


def _installed_distribution() -> importlib.metadata.Distribution:
    """The anomalib-kd that the test venv runs (the checkout's editable install in CI)."""
    return importlib.metadata.distribution(DIST)


def _shared_site_packages() -> Path:
    return Path(_installed_distribution().locate_file("")).resolve()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("build")
    pytest.importorskip("twine")
    out = tmp_path_factory.mktemp("dist")
    dist_existed = (REPO / "dist").exists()
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], cwd=out)
    assert (REPO / "dist").exists() == dist_existed, "the build wrote dist/ into the checkout"
    wheels, sdists = sorted(out.glob("anomalib_kd-*.whl")), sorted(out.glob("anomalib_kd-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0], "out": out}


@pytest.fixture(scope="module")
def fresh(built: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A fresh venv with the wheel installed, borrowing the test venv's third-party packages (module docstring)."""
    root = tmp_path_factory.mktemp("fresh")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    env.update({"PYTHONNOUSERSITE": "1", "HF_HUB_OFFLINE": "1", "VIRTUAL_ENV": str(venv)})
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # the README's `pip install dist/anomalib_kd-*.whl`, offline and without dependencies (they are borrowed below)
    pip = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check"]
    _run([*pip, str(built["wheel"])], cwd=root, env=env)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root, env=env).stdout.strip())  # fmt: skip
    assert (site / "anomalib_kd_autoload.pth").is_file(), sorted(p.name for p in site.iterdir())

    # the farm: every entry of the test venv's site-packages but anomalib-kd's own files, __pycache__ and .pth files
    shared = _shared_site_packages()
    own = {Path(str(file)).parts[0] for file in _installed_distribution().files or ()}
    farm = root / "shared_site_packages"
    farm.mkdir()
    for entry in shared.iterdir():
        if entry.name in own or entry.name == "__pycache__" or entry.suffix == ".pth":
            continue
        (farm / entry.name).symlink_to(entry)
    assert not list(farm.glob("anomalib_kd*")), "the checkout's distribution is visible in the farm"
    (site / "_test_shared_third_party.pth").write_text(f"{farm}\n")

    launcher = venv / "bin" / "anomalib"
    launcher.write_text(LAUNCHER.format(python=python, where=WHERE, repo=str(REPO), shared=str(shared)))
    launcher.chmod(0o755)
    return {"venv": venv, "python": python, "site": site, "farm": farm, "shared": shared, "env": env, "root": root}


def test_sdist_and_wheel_build_and_pass_twine_check(built: dict[str, Path], tmp_path: Path) -> None:
    _run([sys.executable, "-m", "twine", "check", "--strict", str(built["wheel"]), str(built["sdist"])], cwd=tmp_path)

    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = set(wheel.namelist())
        entry_points = wheel.read("anomalib_kd-0.1.0.dist-info/entry_points.txt").decode()
    assert {"anomalib_kd_autoload.py", "anomalib_kd_autoload.pth"} <= names
    assert {f"{package}/__init__.py" for package in PACKAGES} <= names
    assert "anomalib_kd_tools/benchmark/data/papers.csv" in names
    assert "Aand = anomalib_aand:Aand" in entry_points and "MemKD = anomalib_memkd:MemKD" in entry_points

    with tarfile.open(built["sdist"]) as sdist:
        members = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
        sdist.extractall(tmp_path, filter="data")
    missing = [name for name in SDIST_MEMBERS if name not in members]
    assert not missing, f"not in the sdist: {missing}"
    assert not [name for name in members if name.startswith(("dist/", ".venv/", "runs/"))]
    # the docs test passes on the unpacked sdist: every file it reads (and every test a doc names) is in the sdist
    unpacked = next(tmp_path.glob("anomalib_kd-*"))
    _run([sys.executable, "-m", "pytest", "tests/test_docs.py", "-q", "-p", "no:cacheprovider"], cwd=unpacked)


def test_wheel_installs_into_a_fresh_venv_without_the_checkout(fresh: dict, tmp_path: Path) -> None:
    code = WHERE + f"""
import importlib, importlib.metadata as md
from packaging.requirements import Requirement
for name in ("anomalib_aand", "anomalib_memkd", "anomalib_kd_base", "anomalib_kd_tools", "anomalib_kd_autoload"):
    importlib.import_module(name)
import anomalib.models
assert anomalib.models.Aand.__name__ == "Aand" and anomalib.models.MemKD.__name__ == "MemKD"
from anomalib.models import get_model
assert type(get_model("MemKD", backbone="resnet18", pre_trained=False)).__name__ == "MemKD"
from anomalib_kd_tools.benchmark.paper_results import papers
assert len(papers()) > 0  # package data (benchmark/data/papers.csv) is in the wheel
dists = [str(d.locate_file("")) for d in md.distributions() if d.metadata["Name"] == "{DIST}"]
models = {{ep.name: str(ep.dist.locate_file("")) for ep in md.entry_points(group="anomalib.models")}}
scripts = {{}}
for ep in md.entry_points(group="console_scripts"):
    if ep.dist.metadata["Name"] == "{DIST}":
        scripts[ep.name] = ep.load().__module__
unmet = []
for line in md.requires("{DIST}"):
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({{"extra": "openvino"}}):
        continue
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        version = None
    if version is None or not req.specifier.contains(version, prereleases=True):
        unmet.append(f"{{req}} (found {{version}})")
print("ANOMALIB_KD_INFO " + json.dumps({{"path": sys.path, "dists": dists, "models": models, "scripts": scripts,
                                         "unmet": unmet}}), file=sys.stderr)
_anomalib_kd_where({str(REPO)!r}, {str(fresh["shared"])!r})
"""
    result = _run([str(fresh["python"]), "-c", code], cwd=tmp_path, env=fresh["env"], timeout=180)
    info = json.loads(next(line for line in result.stderr.splitlines() if line.startswith("ANOMALIB_KD_INFO "))[17:])
    where = _where(result)
    site = str(fresh["site"])

    for name, file in where["modules"].items():
        assert file is not None and file.startswith(site + os.sep), (name, file)
        assert not os.path.realpath(file).startswith(str(REPO) + os.sep), (name, file)
    assert where["from_checkout"] == [], where["from_checkout"]
    assert not [p for p in info["path"] if p and os.path.realpath(p).startswith(str(REPO) + os.sep)], info["path"]
    assert str(fresh["farm"]) in info["path"]
    assert info["dists"] == [site], info["dists"]  # the wheel's distribution, and only it
    assert info["models"] == dict.fromkeys(("Aand", "MemKD"), info["dists"][0]), info["models"]
    scripts = {"anomalib-kd-demo", "anomalib-kd-weights", "anomalib-kd-benchmark", "anomalib-kd-dtd"}
    assert set(info["scripts"]) == scripts, info["scripts"]
    assert all((fresh["venv"] / "bin" / script).is_file() for script in info["scripts"])
    # the wheel's own requirements (and its openvino extra) are what the borrowed packages provide
    assert info["unmet"] == [], info["unmet"]


def test_stock_cli_trains_both_models_from_the_wheel_and_exports(fresh: dict, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    data = make_mvtec_like_dataset(
        tmp_path / "data", category=CATEGORY, image_size=SIZE, n_train=8, n_test_good=2, n_test_per_defect=1
    )
    anomalib = str(fresh["venv"] / "bin" / "anomalib")
    common = [
        "--model.backbone", "resnet18",
        "--model.pre_trained", "false",
        "--model.pre_processor.class_path", "anomalib.pre_processing.PreProcessor",
        "--model.pre_processor.init_args.transform.class_path", "torchvision.transforms.v2.Resize",
        "--model.pre_processor.init_args.transform.init_args.size", f"[{SIZE},{SIZE}]",
        "--data", "anomalib.data.MVTecAD",
        "--data.root", str(data),
        "--data.category", CATEGORY,
        "--data.train_batch_size", "4",
        "--data.eval_batch_size", "4",
        "--data.num_workers", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--logging.log_graph", "false",
    ]  # fmt: skip
    models = {
        "Aand": ["--model", "Aand", "--model.memory_size", "4",
                 "--model.stage1_epochs", "1", "--model.stage2_epochs", "1"],
        "MemKD": ["--model", "MemKD", "--model.memory_size", "4", "--model.num_exemplars", "4", "--model.epochs", "1"],
    }
    checkpoints = {}
    for name, args in models.items():
        results = tmp_path / "results" / name
        result = _run([anomalib, "train", *args, *common, "--default_root_dir", str(results)], tmp_path, fresh["env"])
        where = _where(result)
        assert where["modules"]["anomalib_kd_autoload"].startswith(str(fresh["site"]) + os.sep), where
        assert where["modules"][f"anomalib_{name.lower()}"].startswith(str(fresh["site"]) + os.sep), where
        assert where["from_checkout"] == [], where["from_checkout"]
        assert "image_AUROC" in result.stdout + result.stderr
        checkpoints[name] = next(results.rglob("model.ckpt"))
        assert f"/{name}/MVTecAD/{CATEGORY}/" in str(checkpoints[name])

    result = _run(
        [
            anomalib, "export", *models["MemKD"][:6],
            "--model.backbone", "resnet18",
            "--model.pre_trained", "false",
            "--export_type", "openvino",
            "--ckpt_path", str(checkpoints["MemKD"]),
            "--input_size", f"[{SIZE},{SIZE}]",
            "--export_root", str(tmp_path / "export"),
        ],
        tmp_path,
        fresh["env"],
    )  # fmt: skip
    assert _where(result)["from_checkout"] == []
    exported = list((tmp_path / "export").rglob("model.xml"))
    assert exported and exported[0].with_suffix(".bin").is_file(), sorted((tmp_path / "export").rglob("*"))
