"""``anomalib-kd-benchmark edge``: CPU latency, throughput, size and AUROC per precision, four models side by side.

The models are trained briefly on generated data, the *whole* AnomalibModule is exported, and each back-end -
``torch`` (eager fp32), ``ov-fp32`` (``INFERENCE_PRECISION_HINT=f32``), ``ov-fp16`` (FP16-compressed IR),
``ov-int8`` (NNCF PTQ, scoring in float: :func:`anomalib_kd_base.quantization.quantize_model`) and ``ov-default``
(bf16 where the CPU has it) - is timed and scored (:func:`.job.auroc`, as ``quality``) into ``edge.md`` /
``.csv`` / ``.png`` / ``.json``; docs/benchmarks.md ("Edge benchmark") has the measured tables.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from anomalib_kd_tools.benchmark import report, schema
from anomalib_kd_tools.benchmark.timing import CallTimer

if TYPE_CHECKING:
    import numpy as np

MODELS = ("Aand", "MemKD", "ReverseDistillation", "Patchcore")
BACKENDS = ("torch", "ov-fp32", "ov-fp16", "ov-int8", "ov-default")
DESCRIPTION = (
    "Edge benchmark: CPU latency / throughput, size, image and pixel AUROC per precision, four models side by side."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--backbone", default="wide_resnet50_2", help="same architecture for all four models")
    parser.add_argument("--pre-trained", action="store_true", help="ImageNet weights (needs them locally or network)")
    parser.add_argument("--proxy-teacher", action="store_true", help="random-init teachers whose BatchNorm "
                        "statistics are calibrated on the training images before each fit (anomalib_kd_tools.proxy; "
                        "never ImageNet)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=24)
    parser.add_argument("--n-test-good", type=int, default=10)
    parser.add_argument("--n-test-per-defect", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3, help="RD and MemKD epochs; AAND gets 1 + (epochs - 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--int8-float-scopes", nargs="+", default=[], metavar="SCOPE", help="sub-modules kept in "
                        "float under INT8 besides the scoring (e.g. raa: Aand's amplification)")
    parser.add_argument("--runs", type=int, default=20, help="timed bs1 calls per back-end")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--throughput-batch", type=int, default=16)
    parser.add_argument("--throughput-runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("runs/edge"))
    parser.add_argument("--quick", action="store_true", help="resnet18, 64 px, tiny data and few runs (smoke test)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--quick``: the tiny smoke-test settings."""
    if args.proxy_teacher and args.pre_trained:
        parser.error("--proxy-teacher calibrates a random-init teacher: drop --pre-trained")
    if args.quick:
        args.backbone, args.image_size, args.n_train, args.n_test_good, args.n_test_per_defect = "resnet18", 64, 8, 4, 2
        args.epochs, args.batch_size, args.runs, args.warmup = 2, 4, 3, 1
        args.throughput_batch, args.throughput_runs = 4, 1


def build_model(name: str, args: argparse.Namespace):
    """The model and its extra Engine arguments. One pre-processor for all four: anomalib's default (antialiased
    bilinear resize, ImageNet normalisation), so that the back-ends compare the models and not their resizes."""
    from anomalib.models.components import AnomalibModule

    from anomalib_kd_tools.benchmark.ablation import model_class

    pre_processor = AnomalibModule.configure_pre_processor((args.image_size, args.image_size))
    common = {"backbone": args.backbone, "pre_trained": args.pre_trained, "pre_processor": pre_processor}
    kwargs = {
        "Aand": {"stage1_epochs": 1, "stage2_epochs": max(1, args.epochs - 1)},
        "MemKD": {"epochs": args.epochs, "num_exemplars": min(16, args.n_train)},
        "Patchcore": {"layers": ("layer2", "layer3"), "coreset_sampling_ratio": 0.1},
    }.get(name, {})
    return model_class(name)(**common, **kwargs), {"max_epochs": args.epochs} if name == "ReverseDistillation" else {}


def load_split(dataset: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # noqa: ANN401
    """``(images [N, 3, H, W] in [0, 1], labels [N], masks [N, H, W])`` of an anomalib dataset as its items give them
    (after a fit, resized with the masks to the model's input size by the pre-processor; empty masks for good images)."""
    import numpy as np

    items = [dataset[i] for i in range(len(dataset))]
    images = np.stack([item.image.numpy() for item in items])
    masks = np.stack([item.gt_mask.numpy().reshape(images.shape[-2:]) > 0 for item in items])
    return images, np.array([bool(item.gt_label) for item in items]), masks


def measure(call, outputs_of, data: tuple, args: argparse.Namespace) -> dict[str, float]:  # noqa: ANN001
    """Latency, throughput, image and pixel AUROC of ``call`` on the test ``data`` (``outputs_of``: a call's output
    -> ``(scores, maps)`` as arrays)."""
    import numpy as np

    from anomalib_kd_tools.benchmark.job import auroc

    images, labels, masks = data
    single = images[:1]
    latencies = pd.Series(CallTimer(lambda: call(single)).calls(args.runs, args.warmup))
    batch = np.concatenate([images] * (args.throughput_batch // len(images) + 1))[: args.throughput_batch]
    batch_times = pd.Series(CallTimer(lambda: call(batch)).calls(args.throughput_runs, 1))
    scores, maps = zip(*(outputs_of(call(images[i : i + 1])) for i in range(len(images))), strict=True)
    return {
        "p50_ms": 1000 * latencies.median(),
        "p95_ms": 1000 * latencies.quantile(0.95, interpolation="nearest"),  # a measured call, not an interpolation
        "throughput": args.throughput_batch / batch_times.median(),
        "image_auroc": auroc(np.concatenate(scores), labels),  # anomalib's AUROC, as in quality
        "pixel_auroc": auroc(np.concatenate(maps), masks, pixel=True),  # maps and masks: the input size
    }


def benchmark_model(name: str, args: argparse.Namespace, data_root: Path, work: Path) -> list[dict]:
    import numpy as np
    import openvino as ov
    import torch
    from lightning.pytorch import seed_everything

    from anomalib_kd_base.quantization import FLOAT_SCOPES, calibration_batches, quantize_model
    from anomalib_kd_tools.fit import cpu_engine, folder_datamodule

    seed_everything(args.seed, workers=True)
    model, engine_kwargs = build_model(name, args)
    datamodule = folder_datamodule(data_root, "widget", args.batch_size, args.seed)
    if args.proxy_teacher:
        from anomalib_kd_tools.proxy import calibrate_proxy_teacher

        datamodule.setup()
        calibrate_proxy_teacher(model, datamodule.train_data, args.batch_size)
    engine = cpu_engine(work / name, enable_progress_bar=False, **engine_kwargs)
    start = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    fit_s = time.perf_counter() - start
    model.eval()
    datamodule.setup()
    data, train_images = load_split(datamodule.test_data), load_split(datamodule.train_data)[0]
    size = (args.image_size, args.image_size)
    params = sum(p.numel() for p in model.model.parameters())
    state_mb = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**20
    rows = []

    def record(backend: str, call, outputs_of, size_mb: float) -> None:  # noqa: ANN001
        try:
            metrics = measure(call, outputs_of, data, args)
        except Exception as error:  # noqa: BLE001 - one failing back-end must not lose the other rows
            print(f"  {name:<20} {backend:<10} FAILED: {type(error).__name__}: {str(error)[:300]}", flush=True)
            metrics = dict.fromkeys(("p50_ms", "p95_ms", "throughput", "image_auroc", "pixel_auroc"), float("nan"))
        rows.append({"model": name, "backend": backend, "params_M": params / 1e6, "size_mb": size_mb, "fit_s": fit_s,
                     **metrics})  # fmt: skip
        print(f"  {name:<20} {backend:<10} p50 {metrics['p50_ms']:8.1f} ms  p95 {metrics['p95_ms']:8.1f} ms  "
              f"{metrics['throughput']:7.1f} img/s  AUROC {metrics['image_auroc']:.3f} / "
              f"{metrics['pixel_auroc']:.3f}", flush=True)  # fmt: skip

    def arrays(scores, maps) -> tuple:  # noqa: ANN001
        return np.asarray(scores, dtype=np.float32).reshape(-1), np.asarray(maps, dtype=np.float32)

    if "torch" in args.backends:

        @torch.inference_mode()
        def torch_call(batch: np.ndarray):
            return model(torch.from_numpy(batch))

        record("torch", torch_call, lambda out: arrays(out.pred_score.float(), out.anomaly_map.float()), state_mb)

    ov_backends = [b for b in args.backends if b.startswith("ov-")]
    if ov_backends:
        with tempfile.TemporaryDirectory() as tmp:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                onnx_path = model.to_onnx(tmp, input_size=size)
            core = ov.Core()
            variants = {}
            if {"ov-fp32", "ov-default"} & set(ov_backends):
                variants["fp32"] = ov.convert_model(str(onnx_path))
            if "ov-fp16" in ov_backends:
                fp16_path = Path(tmp) / "fp16.xml"
                ov.save_model(ov.convert_model(str(onnx_path)), fp16_path, compress_to_fp16=True)
                variants["fp16"] = core.read_model(str(fp16_path))
            if "ov-int8" in ov_backends:
                calibration = calibration_batches([torch.from_numpy(train_images)], size)
                try:
                    # the networks in INT8, the scoring in float: the distillation models' map head; Patchcore's
                    # nearest-neighbour search against its memory bank, everything after the feature pooling
                    tail = ("feature_pooler", *FLOAT_SCOPES) if name == "Patchcore" else FLOAT_SCOPES
                    scopes = (*FLOAT_SCOPES, *args.int8_float_scopes)
                    variants["int8"] = quantize_model(onnx_path, calibration, scopes, tail_scopes=tail)
                except Exception as error:  # noqa: BLE001 - reported as a failed row
                    print(f"  {name:<20} INT8 quantization FAILED: {type(error).__name__}: {str(error)[:300]}")
                    ov_backends = [b for b in ov_backends if b != "ov-int8"]
            sizes = {}
            for variant, ir in variants.items():  # the IR as saved (xml + bin), what a device stores
                xml = Path(tmp) / f"size_{variant}.xml"
                ov.save_model(ir, xml, compress_to_fp16=variant == "fp16")
                sizes[variant] = (xml.stat().st_size + xml.with_suffix(".bin").stat().st_size) / 2**20
            for backend in ov_backends:
                variant = "fp32" if backend == "ov-default" else backend[3:]
                config = {} if backend == "ov-default" else {"INFERENCE_PRECISION_HINT": "f32"}
                call = OpenVINOCall(core, variants[variant], config)
                record(backend, call, lambda out: arrays(out["pred_score"], out["anomaly_map"]), sizes[variant])
    return rows


class OpenVINOCall:
    """Compiled model per batch size. An export whose batch dimension came out static (anomalib's Patchcore export
    can specialise it) is reshaped to the batch size asked for; outputs are returned by name."""

    def __init__(self, core, model, config: dict) -> None:
        self.core, self.model, self.config, self.compiled = core, model, config, {}

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        size = batch.shape[0]
        if size not in self.compiled:
            model = self.model
            batch_dim = model.input(0).get_partial_shape()[0]
            if batch_dim.is_static and batch_dim.get_length() != size:
                model = model.clone()
                try:
                    model.reshape({model.input(0).any_name: list(batch.shape)})
                except RuntimeError:  # Patchcore's export at 256 px: its shapes do not re-infer for another batch
                    self.compiled[size] = None  # the batch runs as consecutive calls of the static batch size
            if self.compiled.get(size, False) is not None:
                self.compiled[size] = self.core.compile_model(model, "CPU", self.config)
        compiled = self.compiled[size]
        if compiled is None:
            import numpy as np

            step = self.model.input(0).get_partial_shape()[0].get_length()
            parts = [self(batch[i : i + step]) for i in range(0, size, step)]
            return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        result = compiled(batch)
        return {output.any_name: result[output] for output in compiled.outputs}


def add_ratios(rows: list[dict]) -> None:
    by_key = {(r["model"], r["backend"]): r for r in rows}
    for row in rows:
        rd = by_key.get(("ReverseDistillation", row["backend"]))
        row["latency_vs_rd"] = row["p50_ms"] / rd["p50_ms"] if rd else float("nan")
        fp32 = by_key.get((row["model"], "ov-fp32"))
        row["speedup_vs_ov_fp32"] = fp32["p50_ms"] / row["p50_ms"] if fp32 else float("nan")
        row["auroc_drop_vs_ov_fp32"] = fp32["image_auroc"] - row["image_auroc"] if fp32 else float("nan")
        row["pixel_drop_vs_ov_fp32"] = fp32["pixel_auroc"] - row["pixel_auroc"] if fp32 else float("nan")


COLUMNS = {  # header: (row key, format) of edge.md's table
    "model": ("model", "{}"), "back-end": ("backend", "{}"), "bs1 p50 ms": ("p50_ms", "{:.1f}"),
    "bs1 p95 ms": ("p95_ms", "{:.1f}"), "img/s (bs{tb})": ("throughput", "{:.1f}"),
    "latency / RD": ("latency_vs_rd", "{:.2f}"), "speed-up vs ov-fp32": ("speedup_vs_ov_fp32", "{:.2f}"),
    "image AUROC": ("image_auroc", "{:.3f}"),
    "AUROC drop vs ov-fp32": ("auroc_drop_vs_ov_fp32", "{:+.3f}"), "pixel AUROC": ("pixel_auroc", "{:.3f}"),
    "pixel drop vs ov-fp32": ("pixel_drop_vs_ov_fp32", "{:+.3f}"), "size MB": ("size_mb", "{:.1f}"),
    "params (M)": ("params_M", "{:.1f}"), "fit s": ("fit_s", "{:.0f}"),
}  # fmt: skip


def plot(path: Path, rows: pd.DataFrame, title: str) -> None:
    """``edge.png``: bs1 p50 latency (log scale) and image AUROC per back-end, one bar per model."""
    backends = [b for b in BACKENDS if b in set(rows.backend)]
    models = list(dict.fromkeys(rows.model))

    def values(key: str) -> pd.DataFrame:
        return rows.pivot(index="backend", columns="model", values=key).reindex(index=backends, columns=models)

    panels = [
        report.Bars(values("p50_ms"), "latency, batch 1, p50 (ms, log scale)", log=True),
        report.Bars(values("image_auroc"), "image AUROC", ylim=(0, 1.05)),
        report.Bars(values("pixel_auroc"), "pixel AUROC", ylim=(0, 1.05)),
    ]
    report.write_png(path, panels, title)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from anomalib_kd_tools.synthetic import make_mvtec_like_dataset

    args.output.mkdir(parents=True, exist_ok=True)
    data_root = args.output / "data"
    if not (data_root / "widget").exists():
        sizes = {key: getattr(args, key) for key in ("image_size", "n_train", "n_test_good", "n_test_per_defect")}
        make_mvtec_like_dataset(data_root, category="widget", seed=args.seed, **sizes)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            print(f"[{name}] training and measuring ...", flush=True)
            rows.extend(benchmark_model(name, args, data_root, Path(work)))
    add_ratios(rows)
    n_test = len(list((data_root / "widget" / "test").rglob("*.png")))
    table = write_tables(args.output, rows, args, argv, n_test)
    print("\n" + table)
    return 0


def write_tables(output: Path, rows: list[dict], args: argparse.Namespace, argv: Sequence[str], n_test: int) -> str:
    """``edge.md`` (report header + table), ``edge.csv``, ``edge.png`` and ``edge.json`` in ``output``."""
    import torch

    from anomalib_kd_tools.proxy import PROXY_TEACHER

    weights = "ImageNet" if args.pre_trained else PROXY_TEACHER if args.proxy_teacher else "random init"
    setting = (
        f"{args.backbone} ({weights}), {args.image_size} px, generated data ({args.n_train} train / {n_test} test "
        f"images), seed {args.seed}; bs1 over {args.runs} runs, throughput at batch {args.throughput_batch}"
    )
    hardware = report.hardware(threads=torch.get_num_threads())
    header = report.header(
        "Edge benchmark: CPU latency, throughput, size, image and pixel AUROC per precision",
        hardware,
        report.today(),
        [f"Setting: {setting}"],
        command=" ".join(["anomalib-kd-benchmark", "edge", *argv]),
    )
    columns = {title.format(tb=args.throughput_batch): spec for title, spec in COLUMNS.items()}
    text = report.write_text(output / "edge.md", [*header, *report.formatted(rows, columns)])
    schema.write_csv(output / "edge.csv", rows)
    plot(output / "edge.png", pd.DataFrame(rows), f"{setting} - {hardware}")
    report.write_json(output / "edge.json", {"header": "\n".join(header), "rows": rows})
    return text
