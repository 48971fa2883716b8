"""``anomalib-kd-benchmark quality``: stock ``anomalib benchmark`` configs, the offline runner, placement, resuming.

The runner is exercised end to end on tiny settings (generated 64 px data, ResNet18 without pretrained weights,
one epoch, one CPU thread): the four models once with seed 0 (``quality`` subcommand), then Patchcore with seeds 0
and 1 into the same output without a subcommand (seed 0 is skipped, seed 1 runs), then the first command again
(everything is skipped). One cell is then run again in this process and must reproduce the numbers of its
child-process run exactly.
"""

from __future__ import annotations

import csv
import math
import statistics
import subprocess
import sys
import threading
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from anomalib_kd_tools.benchmark import cli, generator, job, main, quality, quality_report, report, runner, schema

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "benchmark"
FOUR = ["Patchcore", "ReverseDistillation", "Aand", "MemKD"]
TINY = [
    "--generated",
    "--image-size", "64",
    "--n-train", "8",
    "--n-test-good", "4",
    "--n-test-per-defect", "2",
    "--backbone", "resnet18",
    "--no-pre-trained",
    "--epochs", "1",
    "--aand-stage-epochs", "1", "1",
    "--batch-size", "4",
    "--coreset-ratio", "0.05",
    "--num-workers", "0",
    "--no-openvino",
    "--devices", "cpu",
    "--threads", "1",
    "--timing-runs", "2",
    "--warmup", "1",
    "--throughput-batch", "2",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------- stock configs
@pytest.mark.parametrize(
    ("name", "datamodule", "categories"),
    [("mvtec.yaml", "MVTecAD", 15), ("visa.yaml", "Visa", 12)],
)
def test_stock_benchmark_config_expands_to_the_grid(name: str, datamodule: str, categories: int, monkeypatch) -> None:
    """anomalib's own job generator turns the YAML into 4 models x categories x 3 seeds jobs."""
    import anomalib.pipelines.benchmark.generator as generator_module
    from anomalib.pipelines.benchmark import Benchmark
    from anomalib.pipelines.benchmark.generator import BenchmarkJobGenerator

    config = yaml.safe_load((CONFIGS / name).read_text())
    assert config["accelerator"] == ["cuda"]
    # Building 180 WideResNet models (and fetching their weights) is the run's job, not the test's: record
    # the model specs the generator passes to get_model and resolve each distinct one below.
    seen_models: list[dict] = []

    def record_model(spec: dict) -> str:
        seen_models.append(dict(spec))
        return spec["class_path"]

    monkeypatch.setattr(generator_module, "get_model", record_model)
    jobs = list(BenchmarkJobGenerator(accelerator="cuda").generate_jobs(config["benchmark"], None))

    assert len(jobs) == 4 * categories * 3
    assert sorted({job.model for job in jobs}) == sorted(FOUR)
    assert sorted({job.seed for job in jobs}) == [0, 1, 2]
    cells = {(job.model, job.datamodule.category, job.seed) for job in jobs}
    assert len(cells) == len(jobs)  # every (model, category, seed) exactly once
    for stock_job in jobs:
        assert type(stock_job.datamodule).__name__ == datamodule
        assert stock_job.datamodule.val_split_mode.value == "from_test"  # thresholds never set on the test images
        assert stock_job.datamodule.train_batch_size == 16
        assert stock_job.flat_cfg["seed"] == stock_job.seed

    # The four class paths resolve by bare name through anomalib's get_model (the plugin autoload hook for
    # Aand / MemKD); tiny init args keep this fast and offline.
    from anomalib.models import get_model

    for class_path in FOUR:
        model = get_model({"class_path": class_path}, backbone="resnet18", pre_trained=False)
        assert type(model).__name__ == class_path
    # paper defaults, and no per-model init_args: anomalib's BenchmarkJob.collect() needs the same keys in every job
    assert all(set(spec) == {"class_path"} for spec in seen_models)
    # The stock pipeline would run the jobs serially without several GPUs (and reject unknown accelerators).
    runners = Benchmark._setup_runners(config)  # noqa: SLF001
    assert len(runners) == 1


# ---------------------------------------------------------------------------------------------- placement
class _FakeRun:
    """A cell that ends after ``polls`` polls; records which cells run concurrently on which device."""

    def __init__(self, cell: generator.Cell, device: str, log: dict, polls: int) -> None:
        self.cell, self.device, self.log, self.left = cell, device, log, polls
        with log["lock"]:
            assert device not in log["busy"], f"{device} got {cell.name} while running {log['busy'].get(device)}"
            log["busy"][device] = cell.name
            log["max_parallel"] = max(log["max_parallel"], len(log["busy"]))
            log["placed"].append((cell.name, device))

    def poll(self):
        self.left -= 1
        if self.left > 0:
            return None
        del self.log["busy"][self.device]
        return {"ok": True, "cell": self.cell.name}


@pytest.mark.parametrize("devices", [["cuda:0", "cuda:1", "cuda:2"], ["cpu"]])
def test_schedule_runs_one_cell_per_device_at_a_time(devices: list[str]) -> None:
    cells = generator.make_cells(FOUR, ["a", "b"], [0, 1])  # 16 cells
    log = {"lock": threading.Lock(), "busy": {}, "max_parallel": 0, "placed": []}
    finished = []
    durations = iter([3, 1, 4, 1, 5, 2, 6, 2, 3, 5, 1, 2, 4, 1, 1, 3])

    runner.run_schedule(
        cells,
        devices,
        start=lambda cell, device: _FakeRun(cell, device, log, next(durations)),
        on_finish=lambda cell, device, outcome: finished.append((cell.name, device, outcome["cell"])),
        poll_interval=0,
    )

    names = [cell.name for cell in cells]
    assert sorted(name for name, _ in log["placed"]) == sorted(names)  # each cell started exactly once
    assert sorted(name for name, _, _ in finished) == sorted(names)  # ... and finished exactly once
    assert all(name == outcome for name, _, outcome in finished)  # outcomes go to the right cell
    assert log["max_parallel"] == len(devices)  # every device is kept busy, never two cells on one
    assert {device for _, device in log["placed"]} == set(devices)
    assert [name for name, _ in log["placed"]] == names  # cells start in grid order


def test_resolve_devices() -> None:
    assert runner.resolve_devices("auto", cuda_count=0) == ["cpu"]
    assert runner.resolve_devices("auto", cuda_count=3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert runner.resolve_devices("cpu", cuda_count=4) == ["cpu"]
    assert runner.resolve_devices("2", cuda_count=4) == ["cuda:0", "cuda:1"]
    assert runner.resolve_devices("1,3", cuda_count=4) == ["cuda:1", "cuda:3"]
    for bad in ("5", "0", "1,1", "1,4"):
        with pytest.raises(ValueError):  # noqa: PT011
            runner.resolve_devices(bad, cuda_count=4)
    # a cell process sees exactly its GPU, also when this process was itself restricted to some GPUs
    assert runner.child_visible_devices("cuda:1", None) == "1"
    assert runner.child_visible_devices("cuda:1", "2,3") == "3"
    assert runner.child_visible_devices("cuda:0", "GPU-uuid-a,GPU-uuid-b") == "GPU-uuid-a"
    assert runner.child_visible_devices("cpu", "0,1") == ""


def test_mean_std_and_aggregation() -> None:
    import pandas as pd

    rows = []
    for seed, (auroc, latency) in enumerate([(0.9, 10.0), (0.8, 14.0), (0.7, 12.0)]):
        row = {key: math.nan for key in schema.NUMERIC}
        row.update(model="Aand", category="x", seed=seed, image_auroc=auroc, latency_bs1_ms=latency)
        row.update(backbone="b", weights_tag="t", schedule="s")
        rows.append(row)
    rows.append({**rows[0], "category": "y", "image_auroc": 0.5})
    rows = pd.DataFrame(rows)
    summary = schema.aggregate(rows).droplevel("model")
    mean, std, n = summary.loc["x", "image_auroc"]
    assert (n, mean, std) == (3, pytest.approx(0.8), pytest.approx(statistics.stdev([0.9, 0.8, 0.7])))
    assert summary.loc["x", ("pixel_auroc", "n")] == 0  # all-nan column: no values
    assert summary.loc["x", ("seeds", "n")] == 3
    cells = schema.formatted(summary)
    assert cells.loc["x", "image_auroc"] == "0.800 ± 0.100"
    assert cells.loc["y", "image_auroc"] == "0.500"  # one seed: no std
    assert cells.loc["x", "latency_bs1_ms"] == "12.0 ± 2.0" and cells.loc["x", "pixel_auroc"] == "–"
    # over categories: per seed the mean over categories, then mean / std over seeds (seed 0 has x and y)
    overall = schema.aggregate(rows, ["model"], over_categories=True).loc["Aand"]
    per_seed = [(0.9 + 0.5) / 2, 0.8, 0.7]
    assert overall["image_auroc", "mean"] == pytest.approx(statistics.fmean(per_seed))
    assert overall["image_auroc", "std"] == pytest.approx(statistics.stdev(per_seed))


def test_the_side_by_side_table_is_one_call() -> None:
    """What a README table needs: mean ± std per model over seeds, models in report order, as markdown."""
    import pandas as pd

    values = {"MemKD": (0.9, 0.7), "Patchcore": (0.95, 0.97), "Aand": (0.8, 0.8), "Other": (0.5, 0.6)}
    rows = pd.DataFrame(
        [{"model": m, "category": c, "seed": s, "image_auroc": v[s], "latency_bs1_ms": 10.0 + s}
         for m, v in values.items() for c in ("a", "b") for s in (0, 1)],
    )  # fmt: skip
    table = schema.mean_std_table(rows, ["model"], ["image_auroc", "latency_bs1_ms"], over_categories=True)
    assert list(table.columns) == ["model", "seeds", "image AUROC", "latency bs1 ms"]
    assert list(table.model) == ["Patchcore", "Aand", "MemKD", "Other"]  # schema.MODELS order, others after
    memkd = table.set_index("model").loc["MemKD"]
    assert memkd["image AUROC"] == f"0.800 ± {statistics.stdev([0.9, 0.7]):.3f}" and memkd["seeds"] == 2
    assert memkd["latency bs1 ms"] == f"10.5 ± {statistics.stdev([10.0, 11.0]):.1f}"
    lines = report.markdown(table)
    assert lines[0] == "| model | seeds | image AUROC | latency bs1 ms |"
    assert lines[2] == "| Patchcore | 2 | 0.960 ± 0.014 | 10.5 ± 0.7 |" and len(lines) == 6


def test_the_timer_makes_the_calls_it_is_asked_for() -> None:
    """torch.utils.benchmark.Timer under the options' counts: warm-up calls untimed, then one time per call."""
    import time

    from anomalib_kd_tools.benchmark.timing import CallTimer

    calls = []
    times = CallTimer(lambda: (calls.append(1), time.sleep(0.002))).calls(runs=4, warmup=3)
    assert len(calls) == 7 and len(times) == 4
    assert all(0.002 <= t < 0.5 for t in times)
    timer = CallTimer(lambda: calls.append(1))
    assert timer.calls(0, warmup=2) == [] and len(calls) == 9 and timer.once() > 0 and len(calls) == 10


def test_image_auroc_is_anomalibs_and_matches_the_rank_statistic() -> None:
    """edge and quality share job.auroc (anomalib's AUROC); ties count one half, as in sklearn."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    labels = np.array([0, 0, 0, 1, 1, 0, 1], dtype=bool)
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.2, 0.9], dtype=np.float32)  # one tie across the classes
    pairs = [(p, n) for p in scores[labels] for n in scores[~labels]]
    by_hand = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert job.auroc(scores, labels) == pytest.approx(by_hand, abs=1e-6) == roc_auc_score(labels, scores)
    assert job.auroc(-scores, labels) == pytest.approx(1 - by_hand, abs=1e-6)
    # pixel AUROC (edge): maps [N, 1, H, W] or [N, H, W] against masks [N, H, W], every pixel a sample
    rng = np.random.default_rng(0)
    masks = rng.random((3, 8, 8)) > 0.7
    maps = (masks + rng.normal(0, 0.8, masks.shape)).astype(np.float32)
    expected = roc_auc_score(masks.reshape(-1), maps.reshape(-1))
    assert 0.6 < expected < 0.95  # neither trivial nor chance: a swap of maps and masks would not give it
    assert job.auroc(maps[:, None], masks, pixel=True) == pytest.approx(expected, abs=1e-6)
    assert job.auroc(maps, masks, pixel=True) == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------------------- end to end
def _csv(path: Path) -> list[dict]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bench")
    first = main(["quality", *TINY, "--output", str(out), "--models", *FOUR, "--seeds", "0"])
    after_first = (out / "results.csv").read_bytes()
    second = main([*TINY, "--output", str(out), "--models", "Patchcore", "--seeds", "0", "1"])
    return {"out": out, "codes": (first, second), "after_first": after_first}


@pytest.mark.integration
def test_cli_quality_subcommand(runs) -> None:
    """The quality subcommand (then the same without a subcommand) writes results.csv, results.md and results.png."""
    out = runs["out"]
    assert runs["codes"] == (0, 0)
    rows = _csv(out / "results.csv")
    assert list(rows[0]) == list(schema.COLUMNS)
    assert sorted((r["model"], r["seed"]) for r in rows) == sorted(
        [(m, "0") for m in FOUR] + [("Patchcore", "1")],
    )
    for row in rows:
        assert row["dataset_kind"] == "generated"
        assert row["category"] == generator.GENERATED_CATEGORY
        for metric in schema.METRICS:
            assert 0.0 <= float(row[metric]) <= 1.0, (row["model"], metric, row[metric])
        for key in ("latency_bs1_ms", "throughput_ips", "peak_memory_mb", "params_m", "train_time_s", "state_mb"):
            value = float(row[key])
            assert math.isfinite(value) and value > 0, (row["model"], key, value)
        assert row["ov_latency_bs1_ms"] == ""  # --no-openvino
        assert row["memory_kind"] == "cpu_peak_rss"
        assert row["backbone"] == "resnet18"
        assert row["weights_tag"] == "random-init"
        assert row["threads"] == "1"
        assert row["device"] == "cpu"
        assert row["val_split"] == "from_test:0.3"
        # the validation images are held out of the test set: 4 good + 6 defective test images in total
        assert int(row["n_val"]) > 0 and int(row["n_val"]) + int(row["n_test"]) == 10
    by_model = {r["model"]: r for r in rows if r["seed"] == "0"}
    assert float(by_model["Patchcore"]["trainable_params_m"]) == 0
    assert float(by_model["Aand"]["trainable_params_m"]) > 0
    assert by_model["ReverseDistillation"]["schedule"] == "1 epoch"  # --epochs reaches RD via the Engine
    assert by_model["Aand"]["schedule"] == "1+1 epochs"

    md = (out / "results.md").read_text()
    assert "generated" in md and "NOT MVTec AD" in md
    assert "random init" in md
    patchcore = [float(r["image_auroc"]) for r in rows if r["model"] == "Patchcore"]
    expected = f"{statistics.fmean(patchcore):.3f} ± {statistics.stdev(patchcore):.3f}"
    line = next(ln for ln in md.splitlines() if ln.startswith("| Patchcore | widget | 2 |"))
    assert line.split(" | ")[3] == expected
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not list((out / "cells").glob("*.json"))  # finished cells leave no spec / result files
    # heat maps: the first seed's cells save the same test images for every model, post-processed maps in [0, 1]
    saved = {p.stem for p in (out / "heatmaps").glob("*.npz")}
    assert saved == {f"{m}_widget_seed0" for m in FOUR}  # Patchcore seed 1 (second command) saves none
    first = np.load(out / "heatmaps" / "Patchcore_widget_seed0.npz")
    families = [Path(p).parent.name for p in first["paths"]]
    assert len(families) == 4 and set(families) <= {"scratch", "stain", "hole"}
    assert families[0] != families[1]  # one defect family after the other
    for model in FOUR[1:]:
        other = np.load(out / "heatmaps" / f"{model}_widget_seed0.npz")
        assert list(other["paths"]) == list(first["paths"])
        assert other["maps"].min() >= 0 and other["maps"].max() <= 1
        assert not np.allclose(other["maps"], first["maps"])  # each model's own map
    assert (out / "heatmaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_rerun_skips_finished_cells(runs, capsys) -> None:
    out = runs["out"]
    # the second command only added Patchcore seed 1: seed 0 was skipped, the first rows are untouched
    assert (out / "results.csv").read_bytes().startswith(runs["after_first"])
    logs = {p.name: p.stat().st_mtime_ns for p in (out / "logs").iterdir()}
    before = (out / "results.csv").read_bytes()
    capsys.readouterr()

    assert main([*TINY, "--output", str(out), "--models", *FOUR, "--seeds", "0"]) == 0

    printed = capsys.readouterr().out
    assert "(0 to run)" in printed
    assert all(f"skip {m}/widget/seed0" in printed for m in FOUR)
    assert (out / "results.csv").read_bytes() == before  # nothing trained, nothing appended
    assert {p.name: p.stat().st_mtime_ns for p in (out / "logs").iterdir()} == logs  # no cell process started
    # a different setting must not be mixed into the same results
    data_spec = (out / "data" / "generated.json").read_text()
    assert main([*TINY, "--output", str(out), "--seeds", "0", "--image-size", "96"]) == 2
    assert (out / "data" / "generated.json").read_text() == data_spec  # refused before touching the data


@pytest.mark.integration
def test_a_cell_gives_the_same_numbers_wherever_it_runs(runs, tmp_path: Path) -> None:
    """Aand seed 0 again, in this process instead of a child: identical metrics (seeded, deterministic)."""
    import torch

    out = runs["out"]
    reference = next(r for r in _csv(out / "results.csv") if r["model"] == "Aand" and r["seed"] == "0")
    config = __import__("json").loads((out / "run_config.json").read_text())
    spec = {
        "model": "Aand",
        "category": generator.GENERATED_CATEGORY,
        "seed": 0,
        "slug": "Aand_widget_seed0",
        "device": "cpu",
        "dataset_root": str(out / "data"),
        "dataset_kind": "generated",
        "dataset_label": "generated",
        "work_dir": str(tmp_path),
        **{k: config[k] for k in quality.RUN_CONFIG_KEYS if k not in {"dataset_kind", "dataset"}},
        "openvino": True,  # the OpenVINO path too, here where it costs one export
        "num_workers": 0,
        "timing_runs": 2,
        "warmup": 1,
    }
    threads = torch.get_num_threads()
    try:
        row = job.run_cell(spec)
    finally:
        torch.set_num_threads(threads)
    for metric in schema.METRICS:
        assert float(f"{row[metric]:.6g}") == float(reference[metric]), metric
    assert row["params_m"] == pytest.approx(float(reference["params_m"]), rel=1e-5)
    assert math.isfinite(row["ov_latency_bs1_ms"]) and row["ov_latency_bs1_ms"] > 0
    assert math.isfinite(row["ov_throughput_ips"]) and row["ov_throughput_ips"] > 0
    assert list(tmp_path.iterdir()) == []  # the cell's scratch folder (checkpoint dir, OpenVINO IR) is removed


def test_entry_points() -> None:
    module = import_module("anomalib_kd_tools.benchmark")
    assert callable(module.main)
    result = subprocess.run(
        [sys.executable, "-m", "anomalib_kd_tools.benchmark", "quality", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--generated" in result.stdout and "--seeds" in result.stdout
    top = subprocess.run(
        [sys.executable, "-m", "anomalib_kd_tools.benchmark", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "{quality,edge,speed}" in top and "Without a subcommand the arguments are quality's" in top
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("anomalib-kd-benchmark") == "anomalib_kd_tools.benchmark:main"


def test_no_subcommand_means_quality(tmp_path: Path) -> None:
    """``anomalib-kd-benchmark --generated ...`` parses exactly like ``... quality --generated ...``."""
    argv = [*TINY, "--output", str(tmp_path), "--seeds", "0", "1"]
    plain, explicit = cli.parse(argv), cli.parse(["quality", *argv])
    assert plain.command == explicit.command == "quality"
    assert vars(plain) == vars(explicit)
    assert cli.parse(["speed", "--quick", "--device", "cpu"]).command == "speed"
    with pytest.raises(SystemExit):
        cli.parse(["edge", "--generated"])  # a quality option is not an edge option


def test_a_mistyped_subcommand_is_reported_as_such(capsys) -> None:
    """Only an empty argv or one that starts with an option means quality: a typo is not read as quality's args."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["qualty", "--generated"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "unknown subcommand 'qualty'" in error and "--dataset-root" not in error
    assert cli.with_subcommand([]) == ["quality"]
    assert cli.with_subcommand(["--generated"]) == ["quality", "--generated"]
    assert cli.with_subcommand(["--help"]) == ["--help"]  # the command's own help


# ---------------------------------------------------------------------------------------------- ablation mode
from anomalib_kd_tools import mechanisms, proxy  # noqa: E402
from anomalib_kd_tools.benchmark import ablation, ablation_report  # noqa: E402

def test_ablation_variants_follow_the_agreed_interface() -> None:
    """The variants the model code is written against (INTERFACES): names, model classes, overrides."""
    expected = {
        "AAND": ("Aand", {"anomaly_source_path": ablation.TEXTURES}),
        "AAND stage1=0": ("Aand", {"anomaly_source_path": ablation.TEXTURES, "stage1_epochs": 0}),
        "AAND no L_A": ("Aand", {"anomaly_source_path": ablation.TEXTURES, "amplification_weight": 0.0}),
        "AAND no fg mask": ("Aand", {"anomaly_source_path": ablation.TEXTURES, "foreground": "none"}),
        "AAND no textures": ("Aand", {"anomaly_source_path": None}),
        "MemKD": ("MemKD", {}),
        "MemKD no memory": ("MemKD", {"use_memory": False}),
        "MemKD no NEL": ("MemKD", {"lambda_nm": 0.0}),
        "MemKD tau=0.1": ("MemKD", {"temperature": 0.1}),
        "MemKD L_NM sum": ("MemKD", {"nm_reduction": "sum"}),
        "MemKD L_NM mean": ("MemKD", {"nm_reduction": "mean"}),
    }
    variants = ablation.variants_of("all")
    assert {v.name: (v.model, v.overrides) for v in variants} == expected
    assert [v.name for v in ablation.variants_of("aand")] == list(expected)[:5]  # as configured first
    assert ablation.variants_of("memkd")[0].name == "MemKD"
    resolved = variants[0].resolved("/textures")
    assert resolved == {"anomaly_source_path": "/textures"}
    assert variants[4].resolved("/textures") == {"anomaly_source_path": None}  # "no textures" stays None
    # the slug of a variant is a safe file name; the four models keep theirs
    assert generator.Cell("AAND stage1=0", "widget", 1).slug == "AAND-stage1-0_widget_seed1"
    assert generator.Cell("MemKD", "widget", 0).slug == "MemKD_widget_seed0"


def test_variants_whose_keywords_the_model_lacks_are_skipped(monkeypatch) -> None:
    class Narrow:
        def __init__(self, lambda_nm: float = 0.1, temperature: float = 1.0) -> None: ...

    class Open:
        def __init__(self, **kwargs) -> None: ...

    monkeypatch.setattr(ablation, "model_class", lambda name: Narrow if name == "MemKD" else Open)
    runnable, skipped = ablation.split_runnable(ablation.variants_of("all"))
    assert skipped == {
        "MemKD no memory": ["use_memory"],
        "MemKD L_NM sum": ["nm_reduction"],
        "MemKD L_NM mean": ["nm_reduction"],
    }
    assert [v.name for v in runnable] == [v.name for v in ablation.variants_of("all") if v.name not in skipped]


def test_keywords_passed_on_as_kwargs_are_followed_to_the_base() -> None:
    """``Aand`` / ``MemKD`` take ``**components`` for the base: their own and the base's keywords count, no others."""
    from anomalib_memkd import MemKD

    accepted = ablation.accepted_kwargs(MemKD)
    assert accepted is not None and {"use_memory", "temperature", "pre_processor", "visualizer"} <= accepted
    typo = ablation.Variant("MemKD typo", "MemKD", {"use_memori": False, "pre_processor": True})
    assert ablation.missing_kwargs(typo, MemKD) == ["use_memori"]

    class Open:
        def __init__(self, **kwargs) -> None: ...

    assert ablation.accepted_kwargs(Open) is None and ablation.missing_kwargs(typo, Open) == []


def test_ablation_defects_prefer_families_unlike_the_synthesis() -> None:
    assert ablation.default_ablation_defects(("scratch", "stain", "hole")) == ("scratch", "hole")
    assert ablation.default_ablation_defects(("scratch", "stain", "hole", "foreign", "tint")) == ("foreign", "tint")
    assert set(ablation.default_ablation_defects()) <= set(ablation.available_defects())
    from anomalib_kd_tools import synthetic

    assert set(synthetic.DEFECT_TYPES) <= set(ablation.available_defects())


def test_run_config_keys_of_the_ablation_mean_off_when_absent() -> None:
    """An output written before the ablation keys existed still resumes; a real change is refused."""
    for key in ablation.RUN_CONFIG_DEFAULT_OFF:
        assert key in quality.RUN_CONFIG_KEYS
        assert quality._same_setting(key, None, None if key != "proxy_teacher" else False)  # noqa: SLF001
    assert not quality._same_setting("proxy_teacher", None, True)  # noqa: SLF001
    assert not quality._same_setting("ablation", "aand", "memkd")  # noqa: SLF001
    assert not quality._same_setting("threads", None, 0)  # noqa: SLF001 - old keys compare exactly


@pytest.mark.parametrize("name", ["Patchcore", "ReverseDistillation", "Aand", "MemKD"])
def test_proxy_teacher_calibrates_the_teachers_batchnorm(name: str, dataset_root: Path) -> None:
    """BN statistics of the teacher's network become the training images' (pre-processed like training batches).

    anomalib's TimmFeatureExtractor switches a frozen network to eval mode in its forward, so calibrating the
    extractor instead of the network inside it would leave reset (0 / 1) statistics: the first BatchNorm's running
    mean must equal the hand-computed mean of conv1's output, averaged over the calibration batches.
    """
    import torch

    from conftest import mvtec_datamodule

    spec = {"model": name, "image_size": 64, "backbone": "resnet18", "pre_trained": False, "coreset_ratio": 0.1}
    spec.update(epochs=1, aand_stage_epochs=[1, 1])
    model, *_ = job.build_model(spec)
    network = proxy.teacher_network(model)
    expected_module = model.model.feature_extractor if name == "Patchcore" else model.model.encoder
    assert network is expected_module.feature_extractor  # the timm network inside anomalib's extractor
    datamodule = mvtec_datamodule(dataset_root)
    datamodule.setup()
    data = datamodule.train_data
    with torch.no_grad():
        batch_means, batch_vars = [], []
        for start in (0, 4, 8):
            images = model.pre_processor.transform(torch.stack([data[i].image for i in range(start, start + 4)]))
            out = network.conv1(images)
            batch_means.append(out.mean(dim=(0, 2, 3)))
            batch_vars.append(out.var(dim=(0, 2, 3), unbiased=True))
    state = torch.random.get_rng_state()

    assert proxy.calibrate_proxy_teacher(model, data, batch_size=4) == 12

    assert torch.equal(torch.random.get_rng_state(), state)  # the fit's seeded random stream is untouched
    bn = network.bn1
    torch.testing.assert_close(bn.running_mean, torch.stack(batch_means).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, torch.stack(batch_vars).mean(0), rtol=1e-4, atol=1e-5)
    assert not network.training and bn.momentum is not None  # left as a frozen teacher


class _FakeReportModel:
    def __init__(self, result=None, error: Exception | None = None) -> None:
        self.training, self.result, self.error, self.seen = True, result, error, None

    def eval(self):
        self.training = False
        return self


def _fake_report(model: _FakeReportModel, dataloader):
    import torch

    model.seen = (dataloader, model.training, torch.is_grad_enabled())
    if model.error is not None:
        raise model.error
    return model.result


def test_mechanism_figures_are_flat_floats_and_tolerate_absence() -> None:
    import torch

    from anomalib_aand import Aand
    from anomalib_memkd import MemKD

    model = _FakeReportModel({"residual_ratio_l1": torch.tensor(2.5), "gate_fpr_l1": 0.25, "note": "text"})
    figures, status = ablation.mechanism_figures(model, "the-loader", _fake_report)
    assert (figures, status) == ({"residual_ratio_l1": 2.5, "gate_fpr_l1": 0.25}, "ok")
    assert model.seen == ("the-loader", False, False)  # the test loader as given, eval mode, no grad
    assert ablation.mechanism_figures(object(), None) == ({}, "absent")  # the tools have no report for it
    figures, status = ablation.mechanism_figures(_FakeReportModel(error=KeyError("gt_mask")), None, _fake_report)
    assert figures == {} and status.startswith("error: KeyError")
    assert mechanisms.has_mechanism_report(Aand) and mechanisms.has_mechanism_report(MemKD)
    with pytest.raises(TypeError, match="no mechanism report for object"):
        mechanisms.mechanism_report(object(), [])


def _ablation_row(variant: str, seed: int, auroc: float, figures: dict) -> dict:
    row = {key: math.nan for key in schema.NUMERIC}
    row.update(model="MemKD", variant=variant, category="widget", seed=seed, image_auroc=auroc)
    row.update(schedule="1 epoch", mechanism=__import__("json").dumps(figures), mechanism_status="ok")
    row.update(threads=1.0, device="cpu", device_name="cpu", finished_at="2026-01-01T00:00:00")
    return row


def test_ablation_markdown_aggregates_metrics_and_mechanism_figures(tmp_path: Path) -> None:
    values = {"MemKD": [(0.9, 0.30), (0.7, 0.50)], "MemKD no NEL": [(0.6, 0.10), (0.8, math.nan)]}
    rows = [
        _ablation_row(v, seed, auroc, {"peak_weight_m0": peak, "recall_dev_m10": 1.0})
        for v, pairs in values.items()
        for seed, (auroc, peak) in enumerate(pairs)
    ]
    variants = [v for v in ablation.variants_of("memkd") if v.name in values]
    config = {"ablation": "memkd", "proxy_teacher": True, "pre_trained": False, "dataset_kind": "generated"}
    config["generated_spec"] = {"defects": ["foreign", "tint"], "n_train": 8}
    text = ablation_report.write_markdown(tmp_path / "r.md", rows, config, variants, {"MemKD no memory": ["use_memory"]})
    assert text == (tmp_path / "r.md").read_text()
    assert ablation.PROXY_TEACHER in text and "ImageNet" not in text
    assert "foreign, tint" in text
    metric_line = next(ln for ln in text.splitlines() if ln.startswith("| MemKD | defaults |"))
    auroc = schema.format_mean_std(statistics.fmean([0.9, 0.7]), statistics.stdev([0.9, 0.7]), 2)
    assert metric_line.split(" | ")[4] == auroc
    assert "| MemKD no memory | skipped: the constructor has no `use_memory` |" in text
    header = next(ln for ln in text.splitlines() if ln.startswith("| variant | category | peak"))
    assert header.split(" | ")[2:] == ["peak_weight_m0", "recall_dev_m10 |"]  # generic keys, natural order
    section = text.split("mechanism figures")[1].split("## Raw rows")[0]
    figure_lines = {ln.split(" | ")[0][2:]: ln.split(" | ") for ln in section.splitlines() if "| widget | " in ln}
    assert figure_lines["MemKD"][2] == schema.format_mean_std(0.4, statistics.stdev([0.3, 0.5]), 2)
    assert figure_lines["MemKD no NEL"][2] == "0.100"  # NaN seeds are left out of the mean


@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory: pytest.TempPathFactory):
    """Both ablations end to end, tiny, one seed, proxy teacher; the cells run in this process (the child
    process path is the benchmark's own, tested above) after a JSON round trip of their specs."""
    import json

    import torch

    class InProcess:
        def __init__(self, spec, device, run_dir, log_path) -> None:
            spec = json.loads(json.dumps(spec))
            threads = torch.get_num_threads()
            try:
                self.outcome = {"ok": True, "row": json.loads(json.dumps(job.run_cell(spec))), "elapsed": 0.0}
            finally:
                torch.set_num_threads(threads)
            log_path.write_text("in process\n")

        def poll(self):
            return self.outcome

        def cleanup(self) -> None: ...

    out = tmp_path_factory.mktemp("ablation")
    argv = [*TINY, "--output", str(out), "--ablation", "all", "--seeds", "0", "--proxy-teacher"]
    argv += ["--aand-foreground", "bright"]
    patch = pytest.MonkeyPatch()
    patch.setattr(runner, "CellProcess", InProcess)
    try:
        code = main(argv)
    finally:
        patch.undo()
    return {"out": out, "code": code, "argv": argv}


@pytest.mark.integration
def test_ablation_runs_both_models_end_to_end(ablation_run, capsys) -> None:
    import inspect
    import json

    out = ablation_run["out"]
    assert ablation_run["code"] == 0
    expected_runnable, expected_skipped = [], []
    for variant in ablation.variants_of("all"):
        accepted = inspect.signature(ablation.model_class(variant.model)).parameters
        (expected_runnable if all(k in accepted for k in variant.overrides) else expected_skipped).append(variant)
    rows = _csv(out / "results.csv")
    assert list(rows[0]) == list(schema.ABLATION_COLUMNS)
    assert sorted(r["variant"] for r in rows) == sorted(v.name for v in expected_runnable)
    md = (out / "results.md").read_text()
    for variant in expected_skipped:
        assert f"| {variant.name} | skipped" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # bars per variant, by ablation_report
    textures = out / "textures"
    assert len(list(textures.glob("*/*.jpg"))) > 0
    config = json.loads((out / "run_config.json").read_text())
    assert config["generated_spec"]["defects"] == list(ablation.default_ablation_defects())
    folders = sorted(p.name for p in (out / "data" / "widget" / "test").iterdir())
    assert folders == sorted(["good", *config["generated_spec"]["defects"]])
    for row in rows:
        variant = next(v for v in expected_runnable if v.name == row["variant"])
        assert row["model"] == variant.model
        overrides = json.loads(row["overrides"])
        expected = variant.resolved(str(textures.resolve()))
        if variant.model == "Aand" and "foreground" not in variant.overrides:
            expected["foreground"] = "bright"
        assert overrides == expected
        assert row["teacher"] == row["weights_tag"] == ablation.PROXY_TEACHER
        for metric in ("image_auroc", "pixel_auroc", "aupro"):
            assert 0.0 <= float(row[metric]) <= 1.0, (row["variant"], metric)
        has_report = mechanisms.has_mechanism_report(ablation.model_class(variant.model))
        assert row["mechanism_status"] == ("ok" if has_report else "absent"), (row["variant"], row["mechanism_status"])
        figures = json.loads(row["mechanism"])
        if has_report and variant.overrides.get("use_memory") is not False:
            assert figures and all(isinstance(v, float) for v in figures.values())
            assert f"| {min(figures, key=ablation_report.natural_key)} |" in md  # its mechanism table
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["AAND stage1=0"]["schedule"] == "0+1 epochs"  # the override reached the constructor
    assert by_variant["AAND"]["schedule"] == "1+1 epochs"
    assert ablation.PROXY_TEACHER in md and "ImageNet" not in md
    # resumable: the same command again runs nothing; other settings are refused
    before = (out / "results.csv").read_bytes()
    capsys.readouterr()
    assert main(ablation_run["argv"]) == 0
    assert "(0 to run)" in capsys.readouterr().out
    assert (out / "results.csv").read_bytes() == before
    assert main([*ablation_run["argv"], "--aand-foreground", "none"]) == 2


def test_ablation_arguments_are_checked(tmp_path: Path) -> None:
    base = ["quality", "--output", str(tmp_path), "--devices", "cpu"]
    with pytest.raises(SystemExit):
        cli.parse([*base, "--generated", "--ablation", "memkd", "--proxy-teacher"])  # proxy needs random init
    with pytest.raises(SystemExit):
        cli.parse([*base, "--dataset-root", str(tmp_path), "--ablation", "aand"])  # AAND needs textures
    with pytest.raises(SystemExit):
        cli.parse([*base, "--generated", "--defects", "no-such-defect"])
    args = cli.parse([*base, "--generated", "--ablation", "memkd", "--no-pre-trained", "--proxy-teacher"])
    assert args.seeds == [0, 1, 2] and tuple(args.defects) == ablation.default_ablation_defects()
    assert cli.parse([*base, "--generated"]).seeds == [0]  # the benchmark's own default is unchanged
    assert cli.parse([*base, "--generated"]).defects is None


def test_schedule_scale_scales_every_models_own_schedule() -> None:
    spec = {"schedule_scale": 0.1}
    assert job.scaled(job.PAPER_EPOCHS["ReverseDistillation"], spec) == 20
    assert job.scaled(job.PAPER_EPOCHS["MemKD"], spec) == 10
    assert [job.scaled(e, spec) for e in job.PAPER_AAND_STAGES] == [10, 12]
    assert job.scaled(100, {"schedule_scale": 0.001}) == 1  # at least one epoch
    assert job.scaled(200, {}) == 200  # absent: the papers' schedules
    base = {"image_size": 64, "backbone": "resnet18", "pre_trained": False, "coreset_ratio": 0.1, "epochs": None}
    built = {
        name: job.build_model({**base, "model": name, "aand_stage_epochs": None, "schedule_scale": 0.1})
        for name in ("ReverseDistillation", "Aand", "MemKD")
    }
    assert built["ReverseDistillation"][1] == {"max_epochs": 20}
    assert (built["Aand"][0].stage1_epochs, built["Aand"][0].stage2_epochs) == (10, 12)
    assert built["MemKD"][3] == "10 epochs"


def test_generated_products_are_one_category_each(tmp_path: Path) -> None:
    base = ["quality", "--output", str(tmp_path), "--devices", "cpu", "--generated", "--image-size", "64"]
    args = cli.parse([*base, "--product", "brick", "grain", "--n-train", "2", "--n-test-good", "1"])
    root, categories, config = quality._prepare_data(args)
    assert categories == ["brick", "grain"]
    quality._write_generated(root, config["generated_spec"])
    for category in categories:
        assert len(list((root / category / "train" / "good").glob("*.png"))) == 2
    brick = np.asarray(Image.open(root / "brick" / "train" / "good" / "000.png"), dtype=np.float32)
    grain = np.asarray(Image.open(root / "grain" / "train" / "good" / "000.png"), dtype=np.float32)
    assert np.abs(brick - grain).mean() > 5  # each category holds its own product
    _, default, _ = quality._prepare_data(cli.parse(base))
    assert default == [generator.GENERATED_CATEGORY]
    for bad in (["--product", "brick", "brick"], ["--product", "nothing"], ["--schedule-scale", "0"]):
        with pytest.raises(SystemExit):
            cli.parse([*base, *bad])


def test_heatmap_figure_needs_the_same_images_for_every_model(tmp_path: Path) -> None:
    import pandas as pd

    rows = pd.DataFrame([{"model": m, "category": c, "seed": 0} for m in FOUR for c in ("brick", "grain")])

    def save(model: str, category: str, paths: list[str], value: float) -> None:
        folder = tmp_path / "heatmaps"
        folder.mkdir(exist_ok=True)
        np.savez(folder / f"{model}_{category}_seed0.npz", images=np.zeros((len(paths), 8, 8, 3), np.float16),
                 masks=np.zeros((len(paths), 8, 8), np.uint8), maps=np.full((len(paths), 8, 8), value, np.float32),
                 labels=np.asarray([f"{category} / x"] * len(paths)), paths=np.asarray(paths))  # fmt: skip

    for k, model in enumerate(FOUR):
        save(model, "brick", ["b/1.png", "b/2.png"], k / 4)
        save(model, "grain", ["g/1.png"] if model != "MemKD" else ["g/other.png"], k / 4)
    png = tmp_path / "heatmaps.png"
    assert quality_report.write_heatmaps(png, rows, {"dataset_kind": "generated"}, 4)
    one_category = Image.open(png).size
    save("MemKD", "grain", ["g/1.png"], 0.5)  # now grain has the same images for every model: one more row
    assert quality_report.write_heatmaps(png, rows, {"dataset_kind": "generated"}, 4)
    assert Image.open(png).size[1] > one_category[1] * 1.3
    assert not quality_report.write_heatmaps(png, rows.assign(seed=1), {"dataset_kind": "generated"}, 4)
