"""INT8 probe: what NNCF post-training quantization does to Aand (and to RD / MemKD as controls).

Proxy-teacher experiment (random-init backbone whose BatchNorm statistics are re-estimated on the training images,
:func:`anomalib_kd_tools.proxy.calibrate_proxy_teacher`; never ImageNet). For each model it

1. trains briefly on generated data (:func:`anomalib_kd_tools.synthetic.make_mvtec_like_dataset`), no validation
   (the post-processor's normalisation is switched off, so scores and maps are the raw ones: no clamping ties);
2. exports the whole AnomalibModule to ONNX, builds OpenVINO FP32 (``INFERENCE_PRECISION_HINT=f32``) and INT8
   (:func:`anomalib_kd_base.quantization.quantize_model`, calibrated on the training images) and measures, on the
   same test images: image AUROC (map max), pixel AUROC, anomaly-map error of INT8 vs FP32 (max and mean |diff| over
   the FP32 map's range) and bs1 latency (1 OpenVINO thread);
3. localises the damage two ways:

   * *scopes*: INT8 again with more of the graph kept in float (``--variants``): Aand's RAA gates
     (``raa.*.gate``), residual generators (``raa.*.generator``), the gated residual ``F_T + w^a * Delta`` alone
     (the Mul/Add ops whose innermost module is ``raa.k``), the whole RAA, the teacher (``encoder``), the student
     (``bottleneck`` + ``decoder``);
   * *tensors*: the baseline INT8 and FP32 graphs get extra outputs (per level ``F_T``, ``w^a``, gate logits,
     ``Delta``, ``w^a * Delta``, ``F_A``, ``F_S``); their relative errors are reported, and the model's own map head
     (``model.model.anomaly_map_generator``) is re-run on *mixed* inputs: FP32 ``F_A`` with INT8 ``F_S`` and the
     reverse, and for Aand ``F_A`` recomposed as ``F_T + w^a * Delta`` with one factor taken from INT8 at a time.

    OMP_NUM_THREADS=1 python benchmarks/int8_probe.py --out runs/int8_probe

Writes ``<out>/rows.jsonl`` (one row per model x variant, plus tensor and mix rows) and ``<out>/summary.md``.
Generated data and a proxy teacher: the figures compare precisions with each other, not methods.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

MODELS = ("Aand", "ReverseDistillation", "MemKD")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCOPE_KEY = "pkg.torch.onnx.name_scopes"
#: extra float scopes tried per model (added to the map head + post-processor); "raa.k" = the gated-residual ops only
VARIANTS = {
    "Aand": ["gate", "generator", "raa.k", "raa", "encoder", "bottleneck+decoder"],
    "ReverseDistillation": ["encoder", "bottleneck+decoder"],
    "MemKD": ["encoder", "bottleneck+decoder"],
}


# ---------------------------------------------------------------------------------------------- data
def load_test(root: Path, category: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test images (N, 3, H, W) in [0, 1], labels (N,), masks (N, H, W) (zeros for good images)."""
    paths = sorted((root / category / "test").rglob("*.png"))
    images, labels, masks = [], [], []
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255
        images.append(image)
        defect = path.parent.name
        labels.append(defect != "good")
        if defect == "good":
            masks.append(np.zeros(image.shape[1:], dtype=bool))
        else:
            mask_path = root / category / "ground_truth" / defect / f"{path.stem}_mask.png"
            masks.append(np.asarray(Image.open(mask_path).convert("L")) > 127)
    return np.stack(images), np.array(labels), np.stack(masks)


def load_train(root: Path, category: str) -> np.ndarray:
    paths = sorted((root / category / "train").rglob("*.png"))
    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255 for p in paths])


# ---------------------------------------------------------------------------------------------- metrics
def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(torch.as_tensor(scores, dtype=torch.float32).reshape(-1),
                              torch.as_tensor(labels).reshape(-1).int()))  # fmt: skip


def map_metrics(maps: np.ndarray, reference: np.ndarray | None, labels: np.ndarray, masks: np.ndarray) -> dict:
    """Image AUROC (map max, the models' score), pixel AUROC and the error against ``reference`` (FP32)."""
    maps = maps.reshape(masks.shape)
    row = {"image_auroc": auroc(maps.reshape(len(maps), -1).max(1), labels), "pixel_auroc": auroc(maps, masks)}
    if reference is not None:
        reference = reference.reshape(masks.shape)
        span = float(reference.max() - reference.min())
        diff = np.abs(maps - reference)
        row.update(map_err_max=float(diff.max() / span), map_err_mean=float(diff.mean() / span))
        score, ref_score = maps.reshape(len(maps), -1).max(1), reference.reshape(len(maps), -1).max(1)
        row["score_err_max"] = float(np.abs(score - ref_score).max() / (ref_score.max() - ref_score.min()))
    return row


# ---------------------------------------------------------------------------------------------- models
def build_model(name: str, args: argparse.Namespace):
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    size = (args.image_size, args.image_size)
    pre_processor = PreProcessor(transform=Compose([Resize(size, antialias=True), Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
    common = {"backbone": args.backbone, "pre_trained": False, "pre_processor": pre_processor}
    if name == "Aand":
        from anomalib_aand import Aand

        return Aand(**common, stage1_epochs=args.aand_stage1, stage2_epochs=args.aand_stage2), {}
    if name == "MemKD":
        from anomalib_memkd import MemKD

        return MemKD(**common, epochs=args.epochs, num_exemplars=min(16, args.n_train)), {}
    from anomalib.models import ReverseDistillation

    return ReverseDistillation(**common), {"max_epochs": args.epochs}


def train(name: str, args: argparse.Namespace, data_root: Path, work: Path):
    from anomalib.callbacks.checkpoint import ModelCheckpoint
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_kd_tools.proxy import calibrate_proxy_teacher

    seed_everything(args.seed, workers=True)
    model, engine_kwargs = build_model(name, args)
    datamodule = MVTecAD(root=data_root, category="widget", train_batch_size=args.batch_size,
                         eval_batch_size=args.batch_size, num_workers=0, seed=args.seed)  # fmt: skip
    datamodule.setup()
    seen = calibrate_proxy_teacher(model, datamodule.train_data, args.batch_size)
    engine = Engine(accelerator="cpu", devices=1, default_root_dir=work / name, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0,
                    callbacks=[ModelCheckpoint(dirpath=work / name / "ckpt", save_top_k=0, save_last=False)],
                    **engine_kwargs)  # fmt: skip
    start = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    model.eval()
    model.post_processor.enable_normalization = False  # raw scores / maps in the export
    return model, seen, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- ONNX graph
def graph_nodes(onnx_path: Path) -> list[dict]:
    import onnx

    nodes = []
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        metadata = {prop.key: prop.value for prop in node.metadata_props}
        raw = metadata.get(SCOPE_KEY)
        path = [str(p) for p in ast.literal_eval(raw)] if raw else []
        modules = [p for p in path[:-1] if p]  # qualified module names, outermost first; the last entry is the op
        nodes.append({"name": node.name, "op": node.op_type, "modules": modules, "inner": modules[-1] if modules else "",
                      "inputs": list(node.input), "outputs": list(node.output)})  # fmt: skip
    return nodes


def in_scope(node: dict, scope: str) -> bool:
    return scope in {part for module in node["modules"] for part in module.split(".")}


def extra_float_nodes(nodes: list[dict], variant: str) -> list[str]:
    """ONNX node names of ``variant`` (see VARIANTS) on top of the map head."""
    if variant == "raa.k":  # the gated residual F_T + w^a * Delta only: ops directly in model.raa.<k>
        return [n["name"] for n in nodes if n["inner"].split(".")[-2:-1] == ["raa"]]
    scopes = variant.split("+")
    return [n["name"] for n in nodes if any(in_scope(n, s) for s in scopes)]


def probe_tensors(nodes: list[dict]) -> dict[str, str]:
    """``{label: ONNX tensor name}``: the head's inputs (teacher side ``T`` / student side ``S`` per level) and,
    for Aand, per level ``F_T``, gate, logit, ``Delta``, ``w^a * Delta``, ``F_A``."""
    head = [n for n in nodes if in_scope(n, "anomaly_map_generator")]
    produced_by = {out: n for n in nodes for out in n["outputs"]}
    head_names = {n["name"] for n in head}
    tensors: dict[str, str] = {}
    side_inputs = []
    for node in head:
        for tensor in node["inputs"]:
            producer = produced_by.get(tensor)
            if producer is None or producer["name"] in head_names or tensor in side_inputs:
                continue
            side_inputs.append(tensor)
    for tensor in side_inputs:
        producer = produced_by[tensor]
        side = "S" if in_scope(producer, "decoder") or in_scope(producer, "bottleneck") else "T"
        tensors[f"{side}?{tensor}"] = tensor  # level assigned later, from the spatial size
    for node in nodes:
        inner = node["inner"].split(".")
        if "raa" not in inner:
            continue
        level = inner[inner.index("raa") + 1]
        if inner[-1] == level and node["op"] == "Add":
            tensors[f"F_A{level}"] = node["outputs"][0]
            mul = [n for n in nodes if n["inner"] == node["inner"] and n["op"] == "Mul"][0]
            tensors[f"wDelta{level}"] = mul["outputs"][0]
            tensors[f"F_T{level}"] = next(t for t in node["inputs"] if t != mul["outputs"][0])
        elif inner[-1] == "gate" and node["op"] == "Sigmoid":
            tensors[f"gate{level}"] = node["outputs"][0]
        elif inner[-1] == "gate" and node["op"] == "Sub":
            tensors[f"logit{level}"] = node["outputs"][0]
        elif inner[-1] == "generator" and node["op"] == "Mul":
            tensors[f"Delta{level}"] = node["outputs"][0]
    return tensors


# ---------------------------------------------------------------------------------------------- OpenVINO
def compile_model(model, threads: int = 1):
    import openvino as ov

    return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})


def run_images(compiled, images: np.ndarray) -> dict[str, np.ndarray]:
    """bs1 over all images; outputs stacked along the batch axis, by (any) tensor name."""
    outputs: dict[str, list] = {}
    for image in images:
        result = compiled(image[None])
        for output in compiled.outputs:
            outputs.setdefault(output.any_name, []).append(result[output])
    return {name: np.concatenate(values) for name, values in outputs.items()}


def latency_ms(compiled, image: np.ndarray, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        compiled(image[None])
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        compiled(image[None])
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def with_outputs(model, tensor_names: list[str]):
    """A clone of the OpenVINO model with the named tensors as extra outputs (names not found are skipped)."""
    clone = model.clone()
    by_name = {}
    for op in clone.get_ops():
        for output in op.outputs():
            for name in output.get_names():
                by_name[name] = output
    found = [name for name in tensor_names if name in by_name]
    clone.add_outputs([by_name[name] for name in found])
    return clone, found


def quantize_with_extra(onnx_path: Path, calibration: list[np.ndarray], variant: str, nodes: list[dict]):
    """:func:`quantize_model`'s recipe with ``variant`` kept in float too: module scopes (``"gate"``,
    ``"bottleneck+decoder"``) through :func:`float_op_names`, ``"raa.k"`` as ONNX node names."""
    import nncf
    import openvino as ov

    from anomalib_kd_base.quantization import FLOAT_SCOPES, float_op_names, quantize_model

    if variant == "head":
        return quantize_model(onnx_path, calibration)
    model = ov.convert_model(str(onnx_path))
    if variant == "raa.k":
        names = set(float_op_names(model, onnx_path)) | set(extra_float_nodes(nodes, variant))
    else:
        names = set(float_op_names(model, onnx_path, (*FLOAT_SCOPES, *variant.split("+"))))
    return nncf.quantize(model, nncf.Dataset(list(calibration)), subset_size=len(calibration),
                         ignored_scope=nncf.IgnoredScope(names=sorted(names), validate=False))  # fmt: skip


def fake_quantize_after(model, head: list[str]) -> list[str]:
    """FakeQuantize ops downstream of any op named like a map-head ONNX node (none when the head stayed float)."""
    by_name = {op.get_friendly_name(): op for op in model.get_ops()}
    stack = [by_name[name] for name in head if name in by_name]
    seen: set[str] = set()
    found = []
    while stack:
        op = stack.pop()
        for output in op.outputs():
            for target in output.get_target_inputs():
                node = target.get_node()
                if node.get_friendly_name() in seen:
                    continue
                seen.add(node.get_friendly_name())
                if node.get_type_name() == "FakeQuantize":
                    found.append(node.get_friendly_name())
                stack.append(node)
    return found


def head_inputs(labelled: dict[str, str], outputs: dict[str, np.ndarray]) -> tuple[list, list]:
    """The head's teacher-side and student-side inputs (levels by spatial size, largest first)."""
    sides = []
    for side in ("T", "S"):
        keys = [k for k in labelled if k.startswith(f"{side}?") and outputs.get(labelled[k], np.zeros(0)).ndim == 4]
        sides.append([outputs[labelled[k]] for k in sorted(keys, key=lambda k: -outputs[labelled[k]].shape[-1])])
    return sides[0], sides[1]


def head_map(model, teacher: list[np.ndarray], student: list[np.ndarray]) -> np.ndarray:
    """The model's own map head (``model.model.anomaly_map_generator``, float32 torch) on the given features."""
    with torch.no_grad():
        return model.model.anomaly_map_generator([torch.from_numpy(s) for s in student],
                                                 [torch.from_numpy(t) for t in teacher]).numpy()  # fmt: skip


def fake_quantized_inputs(model, nodes: list[dict]) -> dict[str, int]:
    """Per (innermost module, consumer op type): how many inputs a FakeQuantize feeds (the INT8 placement)."""
    inner = {n["name"]: n["inner"] for n in nodes}
    counts: dict[str, int] = {}
    for op in model.get_ops():
        if op.get_type_name() != "FakeQuantize":
            continue
        for target in op.output(0).get_target_inputs():
            consumer = target.get_node()
            name = consumer.get_friendly_name()
            key = f"{inner.get(name, '?')}:{consumer.get_type_name()}"
            counts[key] = counts.get(key, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------- probe
def probe_model(name: str, args: argparse.Namespace, data_root: Path, work: Path, emit) -> None:
    import nncf
    import openvino as ov

    from anomalib_kd_base.quantization import FLOAT_SCOPES, calibration_batches, float_node_names, quantize_model

    model, seen, fit_s = train(name, args, data_root, work)
    images, labels, masks = load_test(data_root, "widget")
    size = (args.image_size, args.image_size)
    print(f"[{name}] fit {fit_s:.0f} s (proxy teacher calibrated on {seen} images)", flush=True)
    with torch.no_grad():
        eager = model(torch.from_numpy(images)).anomaly_map.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_path = Path(model.to_onnx(work / f"{name}_onnx", input_size=size))
    nodes = graph_nodes(onnx_path)
    calibration = calibration_batches([torch.from_numpy(load_train(data_root, "widget"))], size)
    head = float_node_names(onnx_path, FLOAT_SCOPES)

    fp32_model = ov.convert_model(str(onnx_path))
    fp32 = compile_model(fp32_model)
    start = time.perf_counter()
    fp32_out = run_images(fp32, images)
    reference = fp32_out["anomaly_map"]
    base = {"model": name, "fit_s": fit_s, "proxy_images": seen}
    emit({**base, "kind": "variant", "variant": "torch eager", **map_metrics(eager, reference, labels, masks)})
    emit({**base, "kind": "variant", "variant": "ov-fp32", "latency_ms": latency_ms(fp32, images[0], args.runs),
          **map_metrics(reference, reference, labels, masks)})  # fmt: skip
    print(f"[{name}] fp32 {time.perf_counter() - start:.0f} s", flush=True)

    variants = ["before", "head", *[v for v in VARIANTS[name] if v in args.variants]]
    int8_models = {}
    for variant in variants:
        start = time.perf_counter()
        extra = [] if variant in {"before", "head"} else extra_float_nodes(nodes, variant)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if variant == "before":  # the recipe before the fix: ONNX node names of the map head only
                ignored = nncf.IgnoredScope(names=head, validate=False)
                quantized = quantize_model(onnx_path, calibration, ignored_scope=ignored)
            else:
                quantized = quantize_with_extra(onnx_path, calibration, variant, nodes)
        quantize_s = time.perf_counter() - start
        compiled = compile_model(quantized)
        outputs = run_images(compiled, images)
        label = {"before": "ov-int8, before the fix: head by ONNX node names",
                 "head": "ov-int8: head (quantize_model)"}.get(variant, f"ov-int8: head + {variant}")  # fmt: skip
        row = {**base, "kind": "variant", "variant": label, "extra_float_nodes": len(extra), "quantize_s": quantize_s,
               "fake_quantize": sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops()),
               "fq_after_head": len(fake_quantize_after(quantized, head)),
               "latency_ms": latency_ms(compiled, images[0], args.runs),
               **map_metrics(outputs["anomaly_map"], reference, labels, masks)}  # fmt: skip
        emit(row)
        if variant in {"before", "head"}:
            int8_models[variant] = quantized
        if variant == "head":
            emit({**base, "kind": "placement", "fake_quantized_inputs": fake_quantized_inputs(quantized, nodes)})
        print(f"[{name}] {row['variant']}: {time.perf_counter() - start:.0f} s", flush=True)

    labelled = probe_tensors(nodes)
    # before the fix: the head, re-run in float on the graph's own head inputs, against the graph's map
    before_probe, _ = with_outputs(int8_models["before"], list(labelled.values()))
    b_out = run_images(compile_model(before_probe), images)
    b_teacher, b_student = head_inputs(labelled, b_out)
    emit({**base, "kind": "mix", "mix": "before the fix: its own T, S through a float head",
          **map_metrics(head_map(model, b_teacher, b_student), reference, labels, masks)})  # fmt: skip

    # tensors of the INT8 graph (quantize_model) against FP32
    fp32_probe, found = with_outputs(fp32_model, list(labelled.values()))
    int8_probe, found_int8 = with_outputs(int8_models["head"], list(labelled.values()))
    missing = sorted(set(labelled.values()) - set(found) - set(found_int8))
    if missing:
        print(f"[{name}] probe tensors not found in OpenVINO: {missing}", flush=True)
    common = [t for t in found if t in found_int8]
    f_out = run_images(compile_model(fp32_probe), images)
    q_out = run_images(compile_model(int8_probe), images)
    values = {}
    for label, tensor in labelled.items():
        if tensor in common and f_out[tensor].ndim == 4:  # feature maps only (the head also reads a shape)
            values[label] = (f_out[tensor], q_out[tensor])
    # level of the head inputs: by spatial size, largest first
    for side in ("T", "S"):
        keys = sorted((k for k in values if k.startswith(f"{side}?")), key=lambda k: -values[k][0].shape[-1])
        for level, key in enumerate(keys):
            values[f"{side}{level}"] = values.pop(key)
    anomalous = labels.astype(bool)
    for label, (f, q) in sorted(values.items()):
        row = {**base, "kind": "tensor", "tensor": label, "shape": list(f.shape[1:])}
        for part, select in (("normal", ~anomalous), ("anomalous", anomalous)):
            ff, qq = f[select], q[select]
            row[f"rel_err_{part}"] = float(np.linalg.norm(qq - ff) / max(np.linalg.norm(ff), 1e-12))
        if label.startswith("gate"):
            small = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(masks[:, None].astype(np.float32)),
                                                            f.shape[-2:]).numpy() > 0.3  # fmt: skip
            normal_pos = np.broadcast_to(~anomalous[:, None, None, None], f.shape)
            for precision, g in (("fp32", f), ("int8", q)):
                row[f"{precision}_gate_normal_images"] = float(g[normal_pos].mean())
                row[f"{precision}_gate_defect_positions"] = float(g[small].mean()) if small.any() else float("nan")
        emit(row)

    # the model's own map head on mixed inputs
    levels = range(3)
    pick = {p: i for i, p in enumerate(("fp32", "int8"))}

    def side(prefix: str, precision: str) -> list[np.ndarray]:
        return [values[f"{prefix}{k}"][pick[precision]] for k in levels]

    if all(f"T{k}" in values and f"S{k}" in values for k in levels):
        mixes = {
            "T fp32, S fp32 (head re-run)": (side("T", "fp32"), side("S", "fp32")),
            "T int8, S int8 (head re-run)": (side("T", "int8"), side("S", "int8")),
            "T fp32, S int8": (side("T", "fp32"), side("S", "int8")),
            "T int8, S fp32": (side("T", "int8"), side("S", "fp32")),
        }
        if all(f"{t}{k}" in values for t in ("F_T", "gate", "Delta") for k in levels):

            def recomposed(ft: str, gate: str, delta: str) -> list[np.ndarray]:
                return [values[f"F_T{k}"][pick[ft]] + values[f"gate{k}"][pick[gate]] * values[f"Delta{k}"][pick[delta]]
                        for k in levels]  # fmt: skip

            mixes["F_A = F_T fp32 + w fp32 * D fp32, S fp32"] = (recomposed("fp32", "fp32", "fp32"), side("S", "fp32"))
            mixes["F_A = F_T int8 + w fp32 * D fp32, S fp32"] = (recomposed("int8", "fp32", "fp32"), side("S", "fp32"))
            mixes["F_A = F_T fp32 + w int8 * D fp32, S fp32"] = (recomposed("fp32", "int8", "fp32"), side("S", "fp32"))
            mixes["F_A = F_T fp32 + w fp32 * D int8, S fp32"] = (recomposed("fp32", "fp32", "int8"), side("S", "fp32"))
            mixes["F_A = F_T int8 + w int8 * D int8, S fp32"] = (recomposed("int8", "int8", "int8"), side("S", "fp32"))
            mixes["F_A = F_T fp32 + w int8 * D fp32, S int8"] = (recomposed("fp32", "int8", "fp32"), side("S", "int8"))
            mixes["F_A = F_T int8 + w fp32 * D int8, S int8"] = (recomposed("int8", "fp32", "int8"), side("S", "int8"))
        for label, (teacher, student) in mixes.items():
            emit({**base, "kind": "mix", "mix": label, **map_metrics(head_map(model, teacher, student), reference, labels, masks)})


# ---------------------------------------------------------------------------------------------- report
def fmt(value, spec: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return spec.format(value)


def summary(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    lines = [
        "# INT8 probe (proxy teacher)", "",
        f"Command: `{command}`", "",
        f"Date: {time.strftime('%Y-%m-%d')}; CPU: {cpu} ({os.cpu_count()} cores), OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', '-')}, OpenVINO 1 inference thread, no GPU.", "",
        f"Setting: {args.backbone} (random init, BatchNorm calibrated on the training images: proxy teacher), "
        f"{args.image_size} px, generated '{args.product}' ({args.n_train} train, {args.n_test_good} good + "
        f"{args.n_test_per_defect} x {len(args.defects)} defective test images: {', '.join(args.defects)}), seed "
        f"{args.seed}; Aand {args.aand_stage1} + {args.aand_stage2} epochs, RD / MemKD {args.epochs}. Raw scores "
        "and maps (post-processor normalisation off); map error = |diff| / range of the OV FP32 map.", "",
    ]  # fmt: skip
    variants = [r for r in rows if r["kind"] == "variant"]
    lines += ["## Precision and float scopes", "",
              "| model | variant | image AUROC | drop vs fp32 | pixel AUROC | drop vs fp32 | map err max | map err mean "
              "| score err max | bs1 ms | FQ nodes | FQ after the head | quantize s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in variants:
        fp32 = next((r for r in variants if r["model"] == row["model"] and r["variant"] == "ov-fp32"), None)
        fp32 = fp32 or {"image_auroc": float("nan"), "pixel_auroc": float("nan")}
        lines.append("| " + " | ".join([
            row["model"], row["variant"], fmt(row["image_auroc"]), fmt(fp32["image_auroc"] - row["image_auroc"], "{:+.3f}"),
            fmt(row["pixel_auroc"]), fmt(fp32["pixel_auroc"] - row["pixel_auroc"], "{:+.3f}"),
            fmt(row.get("map_err_max"), "{:.2e}"), fmt(row.get("map_err_mean"), "{:.2e}"),
            fmt(row.get("score_err_max"), "{:.2e}"), fmt(row.get("latency_ms"), "{:.1f}"),
            fmt(row.get("fake_quantize"), "{}"), fmt(row.get("fq_after_head"), "{}"),
            fmt(row.get("quantize_s"), "{:.0f}"),
        ]) + " |")  # fmt: skip
    tensors = [r for r in rows if r["kind"] == "tensor"]
    if tensors:
        lines += ["", "## Tensors of the baseline INT8 graph vs FP32 (relative L2 error)", "",
                  "| model | tensor | shape | rel err normal images | rel err anomalous images | gate fp32 / int8 "
                  "(normal images) | gate fp32 / int8 (defect positions) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in tensors:
            gates = ["-", "-"]
            if "fp32_gate_normal_images" in row:
                gates = [f"{row['fp32_gate_normal_images']:.3f} / {row['int8_gate_normal_images']:.3f}",
                         f"{fmt(row['fp32_gate_defect_positions'])} / {fmt(row['int8_gate_defect_positions'])}"]  # fmt: skip
            lines.append(f"| {row['model']} | {row['tensor']} | {'x'.join(map(str, row['shape']))} | "
                         f"{row['rel_err_normal']:.3f} | {row['rel_err_anomalous']:.3f} | {gates[0]} | {gates[1]} |")  # fmt: skip
    mixes = [r for r in rows if r["kind"] == "mix"]
    if mixes:
        lines += ["", "## The map head re-run on mixed FP32 / INT8 inputs (T: teacher side, F_A for Aand; S: student)",
                  "", "| model | inputs | image AUROC | pixel AUROC | map err max | map err mean |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for row in mixes:
            lines.append(f"| {row['model']} | {row['mix']} | {row['image_auroc']:.3f} | {row['pixel_auroc']:.3f} | "
                         f"{row['map_err_max']:.2e} | {row['map_err_mean']:.2e} |")  # fmt: skip
    for row in (r for r in rows if r["kind"] == "placement"):
        raa = {k: v for k, v in row["fake_quantized_inputs"].items() if "raa" in k}
        if raa:
            lines += ["", f"FakeQuantize-fed inputs in Aand's RAA (module:op -> count): {json.dumps(raa)}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/int8_probe"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--variants", nargs="*", default=sorted({v for vs in VARIANTS.values() for v in vs}))
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--product", default="widget")
    parser.add_argument("--defects", nargs="+", default=["scratch", "foreign", "tint"])
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--n-test-good", type=int, default=24)
    parser.add_argument("--n-test-per-defect", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3, help="RD and MemKD epochs")
    parser.add_argument("--aand-stage1", type=int, default=1)
    parser.add_argument("--aand-stage2", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", type=int, default=10, help="timed bs1 calls per variant")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("nncf").setLevel(logging.WARNING)
    from anomalib_kd_tools.synthetic import make_mvtec_like_dataset

    args.out.mkdir(parents=True, exist_ok=True)
    command = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " python benchmarks/int8_probe.py " + " ".join(
        argv if argv is not None else sys.argv[1:])  # fmt: skip
    rows: list[dict] = []
    rows_path = args.out / "rows.jsonl"
    rows_path.write_text("")

    def emit(row: dict) -> None:
        rows.append(row)
        with rows_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        (args.out / "summary.md").write_text(summary(rows, args, command))

    with tempfile.TemporaryDirectory() as tmp:
        data_root = Path(tmp) / "data"
        make_mvtec_like_dataset(data_root, category="widget", product=args.product, image_size=args.image_size,
                                n_train=args.n_train, n_test_good=args.n_test_good,
                                n_test_per_defect=args.n_test_per_defect, defects=tuple(args.defects), seed=args.seed)  # fmt: skip
        for name in args.models:
            probe_model(name, args, data_root, Path(tmp), emit)
    print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
