"""``anomalib-kd-benchmark speed``: speed and memory of AAND and MemKD relative to anomalib's RD, in one run.

Training: one child process per ``--configs`` entry (each peak-memory figure its own), the median step time and peak
memory, then the ratios to RD (:func:`derive`). Inference of RD, AAND and MemKD at bs1 and ``--batch-size``: eager
float32 in alternating rounds (:func:`interleaved_eager_times`), the models' fast path, OpenVINO FP32 on the CPU.
Written into ``speed.md`` / ``_train.csv`` / ``_inference.csv`` / ``.png`` / ``.json``; what each configuration and
column is, and the measured tables: docs/benchmarks.md ("Speed and memory").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from anomalib_kd_tools.benchmark import report, schema
from anomalib_kd_tools.benchmark.timing import CallTimer

TRAIN_CONFIGS = ("rd", "aand-s1", "aand-s1-sub", "aand-s2", "memkd")
INFERENCE_MODELS = ("ReverseDistillation", "Aand", "MemKD")
DESCRIPTION = "Speed and memory of AAND and MemKD relative to anomalib's Reverse Distillation, measured in one run."
RATIO_TARGETS = {  # derive()'s ratios: title, target
    "aand_s1_peak_vs_rd": ("AAND stage-1 (exact L_A) peak memory / RD", 1.5),
    "aand_schedule_vs_rd_200": ("AAND 100+120 epochs / RD 200 epochs (from step times)", 1.3),
    "memkd_epoch_vs_rd": ("MemKD epoch / RD epoch", 1.5),
}
INFERENCE_COLUMNS = {  # header: (row key, format) of the inference table
    "inference": ("model", "{}"), "variant": ("variant", "{}"), "batch": ("batch", "{}"),
    "ms / batch": ("ms", "{:.1f}"), "img/s": ("img_per_s", "{:.1f}"), "/ RD eager": ("vs_rd_eager", "{:.3f}"),
    "/ RD eager (paired rounds)": ("vs_rd_eager_paired", "{:.3f}"), "GFLOP / image": ("gflop_per_image", "{:.1f}"),
    "/ RD GFLOP": ("flop_ratio", "{:.3f}"), "page faults / call": ("minor_faults_per_call", "{:.0f}"),
    "map error vs fp32 (of range)": ("map_err_vs_fp32", "{:.1e}"),
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--exemplars", type=int, default=16, help="MemKD's N")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per configuration")
    parser.add_argument("--runs", type=int, default=10, help="timed inference calls per configuration")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--only", choices=("train", "inference"), default=None)
    parser.add_argument("--configs", nargs="+", default=list(TRAIN_CONFIGS), choices=TRAIN_CONFIGS)
    parser.add_argument("--output", type=Path, default=Path("runs/speed"))
    parser.add_argument("--models", nargs="+", default=list(INFERENCE_MODELS), choices=INFERENCE_MODELS,
                        help="inference models (ReverseDistillation is always timed: the ratios are to it)")
    parser.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO inference rows")
    parser.add_argument("--quick", action="store_true", help="resnet18, 64 px, bs 4, 1 step (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:  # noqa: ARG001
    """``--quick``: the tiny smoke-test settings; ``--device`` defaults to CUDA when available."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.backbone, args.image_size, args.batch_size = "resnet18", 64, 4
        args.exemplars, args.steps, args.runs = 4, 1, 3


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return report.hardware([torch.cuda.get_device_name(0)])
    return report.hardware(threads=torch.get_num_threads())


def rss_bytes() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def pre_processor(cls, size: int):
    return cls.configure_pre_processor(image_size=(size, size))


# --------------------------------------------------------------------------------------------- training (child)
def build_step(config: str, args: argparse.Namespace, device: torch.device):
    """Return ``(step, extra)`` where ``step(images)`` runs one optimisation step."""
    from anomalib_kd_tools.benchmark.ablation import model_class

    name = {"rd": "ReverseDistillation", "memkd": "MemKD"}.get(config, "Aand")
    kwargs = {"Aand": {"amplification_pairs": "subsample" if config == "aand-s1-sub" else "exact"},
              "MemKD": {"num_exemplars": args.exemplars}}.get(name, {})  # fmt: skip
    cls = model_class(name)
    module = cls(backbone=args.backbone, pre_trained=False, **kwargs, pre_processor=pre_processor(cls, args.image_size))
    module.to(device).train()
    extra: dict = {}

    def decoder() -> list:
        return [*module.model.bottleneck.parameters(), *module.model.decoder.parameters()]

    if config == "rd":
        from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss

        loss_fn = ReverseDistillationLoss()
        optimizer = torch.optim.Adam(decoder(), lr=0.005, betas=(0.5, 0.999))

        def loss_of(images: torch.Tensor) -> torch.Tensor:
            return loss_fn(*module.model(images))

    elif name == "Aand":
        module.model.encoder.eval()
        stage = 1 if config.startswith("aand-s1") else 2
        module._set_trainable(stage)  # noqa: SLF001 - what the Lightning hook does at the stage's first epoch
        params = module.model.raa.parameters() if stage == 1 else decoder()
        optimizer = torch.optim.Adam(params, lr=0.005, betas=(0.5, 0.999))
        extra = {"synthesis_s": [], "module": module}

        def loss_of(images: torch.Tensor) -> torch.Tensor:
            if stage == 1:
                mean, std = module._normalisation(images)  # noqa: SLF001
                raw = (images * std + mean).clamp(0, 1)
                extra["synthesis_s"].append(CallTimer(lambda: module.synthesizer(raw), device.type == "cuda").once())
            return (module.stage1_losses if stage == 1 else module.stage2_losses)(images)["loss"]

    else:
        optimizer = module.configure_optimizers()
        exemplars = torch.randn(args.exemplars, 3, args.image_size, args.image_size, device=device)

        def loss_of(images: torch.Tensor) -> torch.Tensor:
            out = module.model(images, exemplars)
            features = (out.teacher_features, out.student_features, module.model.memories, out.exemplar_features)
            return module.loss(*features).loss

    def step(images: torch.Tensor) -> None:
        loss = loss_of(images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, extra


def run_child(config: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    step, extra = build_step(config, args, device)
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    module = extra.pop("module", None)
    if module is not None:  # AAND normalises like the pre-processor
        mean, std = module._normalisation(images)  # noqa: SLF001
        images = (images - mean) / std
    step(images)  # warm-up (allocator, oneDNN / cuDNN kernels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    baseline = rss_bytes()
    times = CallTimer(lambda: step(images), device.type == "cuda").calls(args.steps)
    result = {"config": config, "step_s": statistics.median(times)}
    cpu_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline  # ru_maxrss is in KiB
    result["peak_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else max(0, cpu_peak)
    if extra.get("synthesis_s"):
        result["synthesis_s"] = statistics.median(extra["synthesis_s"][1:] or extra["synthesis_s"])
    if config == "aand-s1" and module is not None:
        from anomalib_kd_tools.mechanisms import aand_amplification_modes

        result.update(aand_amplification_modes(module, images))
    return result


def train_table(args: argparse.Namespace, results: list[dict] | None = None) -> list[dict]:
    """One child process per configuration; each finished configuration is appended to ``results`` at once (an
    interrupted run keeps those)."""
    results = [] if results is None else results
    options = ("backbone", "image_size", "batch_size", "exemplars", "steps", "device", "seed")  # what a child needs
    for config in args.configs:
        command = [sys.executable, "-m", "anomalib_kd_tools.benchmark", "speed", "--child", config]
        command += [word for key in options for word in (f"--{key.replace('_', '-')}", str(getattr(args, key)))]
        print(f"[train] {config} ...", flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"training benchmark {config} failed")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def derive(results: Sequence[dict]) -> dict:
    """The ratios to RD of the speed issue, from the training rows there are."""
    by = {r["config"]: r for r in results}
    derived = {}
    if "rd" in by:
        rd = by["rd"]
        if "aand-s1" in by:
            derived["aand_s1_peak_vs_rd"] = by["aand-s1"]["peak_bytes"] / max(rd["peak_bytes"], 1)
        if {"aand-s1", "aand-s2"} <= by.keys():
            aand = 100 * by["aand-s1"]["step_s"] + 120 * by["aand-s2"]["step_s"]
            derived["aand_schedule_vs_rd_200"] = aand / (200 * rd["step_s"])
        if "memkd" in by:
            derived["memkd_epoch_vs_rd"] = by["memkd"]["step_s"] / rd["step_s"]
    return derived


# --------------------------------------------------------------------------------------------- inference
def inference_table(args: argparse.Namespace, rows: list[dict] | None = None) -> list[dict]:
    """The inference rows, appended to ``rows`` as they are measured; the ratios to RD are filled in also when the
    run is interrupted (``nan`` where RD's row is missing)."""
    from anomalib_kd_tools.benchmark.ablation import model_class

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    wanted = {"ReverseDistillation", *getattr(args, "models", INFERENCE_MODELS)}
    classes = {name: model_class(name) for name in INFERENCE_MODELS if name in wanted}
    modules = {name: cls(backbone=args.backbone, pre_trained=False, pre_processor=pre_processor(cls, args.image_size))
               for name, cls in classes.items()}  # fmt: skip
    rows = [] if rows is None else rows
    # eager fp32 latency: every model timed in the same rounds, alternating (see interleaved_eager_times)
    eager: dict[tuple[str, int], list[float]] = {}
    try:
        _measure_inference(modules, eager, rows, args, device)
    finally:
        _ratios_to_rd(rows, eager)
    return rows


def _measure_inference(modules: dict, eager: dict, rows: list[dict], args: argparse.Namespace, device: torch.device):
    """Time every module (``eager`` receives the interleaved rounds' times) and append its rows to ``rows``."""
    networks = {name: module.model.to(device).eval() for name, module in modules.items()}
    faults: dict[tuple[str, int], list[int]] = {}
    for batch_size in (1, args.batch_size):
        images = torch.randn(batch_size, 3, args.image_size, args.image_size, device=device)
        calls_faults: dict[str, list[int]] = {}
        for name, times in interleaved_eager_times(networks, images, args.runs, device, calls_faults).items():
            eager[(name, batch_size)] = times
            faults[(name, batch_size)] = calls_faults[name]
    for name, module in modules.items():
        model = module.model.to(device).eval()
        for batch_size in (1, args.batch_size):
            images = torch.randn(batch_size, 3, args.image_size, args.image_size, device=device)
            fast_path, reference = hasattr(model, "set_fast_inference"), None
            for label in ("eager-fp32", "fast") if fast_path else ("eager-fp32",):
                if fast_path:
                    model.set_fast_inference(label == "fast")
                with torch.inference_mode():
                    out = model(images)  # warm-up; its map is the one compared with float32
                    if label == "eager-fp32":  # timed in the interleaved rounds
                        times = list(eager[(name, batch_size)])
                    else:
                        times = CallTimer(lambda: model(images), device.type == "cuda").calls(args.runs, warmup=1)
                row = {"model": name, "variant": label, "batch": batch_size, "ms": 1000 * statistics.median(times)}
                if label == "eager-fp32":
                    row["gflop_per_image"] = gflop_per_image(model, images[:1])
                    if device.type == "cpu":  # the allocator's cost: fresh large tensors are fresh pages
                        row["minor_faults_per_call"] = statistics.median(faults[(name, batch_size)])
                row["img_per_s"] = batch_size / statistics.median(times)
                if reference is None:
                    reference = out.anomaly_map.float()
                else:
                    span = (reference.max() - reference.min()).clamp_min(1e-12)
                    row["map_err_vs_fp32"] = float((out.anomaly_map.float() - reference).abs().max() / span)
                rows.append(row)
            if hasattr(model, "set_fast_inference"):
                model.set_fast_inference(False)
        if device.type == "cpu" and not getattr(args, "no_openvino", False):
            rows.extend(openvino_rows(name, module, args))


def _ratios_to_rd(rows: list[dict], eager: dict[tuple[str, int], list[float]]) -> None:
    rd = {(r["variant"], r["batch"]): r["ms"] for r in rows if r["model"] == "ReverseDistillation"}
    for row in rows:
        base = rd.get(("eager-fp32", row["batch"]))
        row["vs_rd_eager"] = row["ms"] / base if base else float("nan")
        if row["variant"] == "eager-fp32" and ("ReverseDistillation", row["batch"]) in eager:
            pairs = zip(eager[(row["model"], row["batch"])], eager[("ReverseDistillation", row["batch"])], strict=True)
            row["vs_rd_eager_paired"] = statistics.median(t / t_rd for t, t_rd in pairs)


def interleaved_eager_times(networks: dict[str, torch.nn.Module], images: torch.Tensor, runs: int, device: torch.device,
                            faults: dict[str, list[int]] | None = None) -> dict[str, list[float]]:  # fmt: skip
    """Eager fp32 latency (seconds) of every network on ``images``, ``runs`` rounds of one call per network.

    The calls alternate, in an order rotated every round, so that a change of load on a shared machine hits every
    network alike and the ratios to RD hold. ``faults`` receives each network's minor page faults per call: a fresh
    large tensor is a fresh mapping, whose faults can cost more than the arithmetic (docs/benchmarks.md).
    """
    names = list(networks)
    times: dict[str, list[float]] = {name: [] for name in names}
    if faults is not None:
        faults.update({name: [] for name in names})
    for network in networks.values():
        if hasattr(network, "set_fast_inference"):
            network.set_fast_inference(False)
    timers = {name: CallTimer(lambda network=network: network(images), device.type == "cuda")
              for name, network in networks.items()}  # fmt: skip
    with torch.inference_mode():
        for timer in timers.values():
            timer.calls(0, warmup=2)  # warm-up (allocator, oneDNN / cuDNN kernels)
        for round_index in range(runs):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                times[name].append(timers[name].once())
                if faults is not None:
                    faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return times


def gflop_per_image(model: torch.nn.Module, image: torch.Tensor) -> float:
    """Floating-point operations of one eval forward (``torch.utils.flop_counter``): the profile evidence for
    latency ratios - a model that does more arithmetic than RD cannot be as fast as RD in the same runtime."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(image)
    return counter.get_total_flops() / 1e9


def openvino_rows(name: str, module, args: argparse.Namespace) -> list[dict]:
    try:
        import openvino as ov
    except ImportError:
        return []
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_path = module.to_onnx(tmp, input_size=(args.image_size, args.image_size))
        compiled = ov.Core().compile_model(str(onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        for batch_size in (1, args.batch_size):
            images = torch.rand(batch_size, 3, args.image_size, args.image_size).numpy()
            median = statistics.median(CallTimer(lambda images=images: compiled(images)).calls(args.runs, warmup=2))
            rows.append({"model": name, "variant": "openvino-fp32 (whole module)", "batch": batch_size,
                         "ms": 1000 * median, "img_per_s": batch_size / median})  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------- report
def markdown(train: list[dict], derived: dict, inference: list[dict], args: argparse.Namespace,
             argv: Sequence[str], interrupted: bool = False) -> list[str]:  # fmt: skip
    """The lines of ``speed.md``: the report header, the training and ratio tables, the inference table."""
    lines = report.header(
        "Speed benchmark: AAND and MemKD relative to ReverseDistillation (training step, memory, inference)",
        hardware(args.device),
        report.today(),
        [f"Setting: {args.backbone} (random init), {args.image_size} px, training bs {args.batch_size}, "
         f"MemKD N={args.exemplars}; device {args.device}"],  # fmt: skip
        command=" ".join(["anomalib-kd-benchmark", "speed", *argv]),
        interrupted=interrupted,
    )
    if train:
        unit = "peak GPU memory (GB)" if args.device.startswith("cuda") else "step peak RSS increase (GB)"
        shares = [{"share": row["synthesis_s"] / row["step_s"]} if "synthesis_s" in row else {} for row in train]
        rows = [{**row, "gb": row["peak_bytes"] / 1e9, **share} for row, share in zip(train, shares, strict=True)]
        columns = {"training": ("config", "{}"), "step s": ("step_s", "{:.3f}"), unit: ("gb", "{:.2f}")}
        lines += [*report.formatted(rows, {**columns, "synthesis share": ("share", "{:.0%}")}), ""]
        ratios = [[title, f"{derived[key]:.2f}", f"<= {target}", "yes" if derived[key] <= target else "NO"]
                  for key, (title, target) in RATIO_TARGETS.items() if key in derived]  # fmt: skip
        lines += report.table(["ratio", "measured", "target", "met"], ratios)
        exact = next((r for r in train if "l_a_exact" in r), None)
        if exact:
            lines += ["", (f"L_A on one stage-1 batch ({exact['anomalous_patches']} anomalous patches over 3 levels): "
                           f"exact {exact['l_a_exact']:.4f}, subsampled {exact['l_a_subsample_mean']:.4f} "
                           f"± {exact['l_a_subsample_std']:.4f} (5 draws)")]  # fmt: skip
        lines.append("")
    if inference:
        rd = [r for r in inference if r["model"] == "ReverseDistillation" and "gflop_per_image" in r]
        rd_flops = rd[0]["gflop_per_image"] if rd else None
        rows = [{**r, "flop_ratio": r["gflop_per_image"] / rd_flops} if "gflop_per_image" in r and rd_flops else r
                for r in inference]  # fmt: skip
        lines += report.formatted(rows, INFERENCE_COLUMNS)
    return lines


def plot(path: Path, train: list[dict], inference: list[dict], title: str) -> None:
    """``speed.png``: training step time and peak memory per configuration, inference latency at batch 1."""
    panels: list = []
    if train:
        steps = pd.DataFrame(train).set_index("config")
        panels.append(report.Bars(steps[["step_s"]].rename(columns={"step_s": "step"}), "training step (s)"))
        memory = (steps[["peak_bytes"]] / 1e9).rename(columns={"peak_bytes": "peak"})
        panels.append(report.Bars(memory, "training step peak memory (GB)"))
    single = pd.DataFrame(inference)
    single = single[single.batch == 1] if len(single) else single
    if len(single):
        latency = single.pivot(index="variant", columns="model", values="ms")
        latency = latency.reindex(index=list(dict.fromkeys(single.variant)), columns=list(dict.fromkeys(single.model)))
        panels.append(report.Bars(latency, "inference latency, batch 1 (ms, log scale)", log=True))
    if panels:
        report.write_png(path, panels, title)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
    warnings.filterwarnings("ignore")
    if args.child:
        print(json.dumps(run_child(args.child, args)))
        return 0
    train: list[dict] = []
    inference: list[dict] = []
    interrupted = False
    try:
        if args.only in (None, "train"):
            train_table(args, train)
        if args.only in (None, "inference"):
            print("[inference] ...", flush=True)
            inference_table(args, inference)
    except KeyboardInterrupt:  # Ctrl-C, or SIGINT / SIGTERM from a cap (cli.sigterm_as_interrupt)
        interrupted = True
        print("[speed] interrupted: writing the tables of what is done", file=sys.stderr, flush=True)
    table = write_tables(args.output, train, derive(train), inference, args, argv, interrupted=interrupted)
    print("\n" + table)
    return 130 if interrupted else 0


def write_tables(output: Path, train: list[dict], derived: dict, inference: list[dict], args: argparse.Namespace,
                 argv: Sequence[str], interrupted: bool = False) -> str:  # fmt: skip
    """``speed.md`` (report header + tables), ``speed_train.csv``, ``speed_inference.csv``, ``speed.png`` and
    ``speed.json`` in ``output``; returns the markdown."""
    output.mkdir(parents=True, exist_ok=True)
    text = report.write_text(output / "speed.md", markdown(train, derived, inference, args, argv, interrupted))
    if train:
        schema.write_csv(output / "speed_train.csv", train)
    if inference:
        schema.write_csv(output / "speed_inference.csv", inference)
    setting = f"{args.backbone} (random init), {args.image_size} px, bs {args.batch_size}"
    plot(output / "speed.png", train, inference, f"{setting} - {hardware(args.device)}")
    report.write_json(output / "speed.json", {"train": train, "derived": derived, "inference": inference}, indent=None)
    return text
