"""One cell of ``quality`` in its own child process (:func:`cell_entry`): build, train, validate, test and time.

anomalib's ``Engine``, ``MVTecAD`` datamodule, pre-processors, metrics and ``to_openvino`` do the work. Not its
``BenchmarkJob``: that fits with the Engine's defaults (validation during fit, checkpoint selection, normalised
metrics) and returns the test metrics only, while a cell fits without validation or checkpoint selection, computes
AUROC / AUPRO on the raw scores before the post-processor, and times and measures the same model.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from anomalib_kd_tools.benchmark.report import cpu_name
from anomalib_kd_tools.benchmark.schema import MODELS
from anomalib_kd_tools.benchmark.timing import CallTimer
from anomalib_kd_tools.proxy import PROXY_TEACHER

# Paper / reference schedule lengths (epochs). Patchcore: one pass (anomalib pins max_epochs=1).
PAPER_EPOCHS = {"ReverseDistillation": 200, "MemKD": 100}
PAPER_AAND_STAGES = (100, 120)
DEFAULT_BACKBONE = {
    "Patchcore": "wide_resnet50_2",  # anomalib's defaults (timm's default tag)
    "ReverseDistillation": "wide_resnet50_2",
    "Aand": "wide_resnet50_2.tv_in1k",  # torchvision ImageNet-V1 weights, as in the papers
    "MemKD": "wide_resnet50_2.tv_in1k",
}


def weights_tag(backbone: str, pre_trained: bool, model: Any = None) -> str:  # noqa: ANN401
    """The timm tag the teacher's weights come from, or ``random-init``."""
    provenance = getattr(getattr(model, "model", None), "teacher_provenance", None)
    if isinstance(provenance, dict) and provenance.get("weights_tag"):
        return str(provenance["weights_tag"])
    from anomalib_kd_base.weights import resolve_weights_tag

    return resolve_weights_tag(backbone) if pre_trained else "random-init"


def build_model(spec: dict[str, Any]):  # noqa: ANN201
    """The cell's model, extra Engine arguments for training, its backbone name and schedule description.

    ``spec["overrides"]`` (ablation variants) are constructor keywords applied last; ``spec["texture_dir"]`` is
    Aand's ``anomaly_source_path`` unless an override sets it.
    """
    from anomalib.metrics import Evaluator, F1Score

    from anomalib_kd_tools.benchmark.ablation import model_class

    name = spec["model"]
    if name not in MODELS:
        msg = f"unknown model {name!r}; choose from {MODELS}"
        raise ValueError(msg)
    epochs = spec["epochs"] or scaled(PAPER_EPOCHS.get(name, 1), spec)
    if name == "Patchcore":
        kwargs = {"coreset_sampling_ratio": spec["coreset_ratio"]}
    elif name == "Aand":
        stages = spec["aand_stage_epochs"] or [scaled(paper, spec) for paper in PAPER_AAND_STAGES]
        kwargs = dict(zip(("stage1_epochs", "stage2_epochs"), stages, strict=True))
        if spec.get("texture_dir"):
            kwargs["anomaly_source_path"] = spec["texture_dir"]
    else:  # RD's trainer_arguments do not pin max_epochs, so the Engine's value is its schedule
        kwargs = {"epochs": epochs} if name == "MemKD" else {}
    kwargs.update(spec.get("overrides") or {})
    cls, backbone = model_class(name), spec["backbone"] or DEFAULT_BACKBONE[name]
    evaluator = Evaluator(test_metrics=[F1Score(fields=["pred_label", "gt_label"], prefix="image_")])
    pre_processor = cls.configure_pre_processor(image_size=(spec["image_size"], spec["image_size"]))
    common = {"backbone": backbone, "pre_trained": spec["pre_trained"], "evaluator": evaluator, "visualizer": False}
    model = cls(**common, **kwargs, pre_processor=pre_processor)
    if name == "Patchcore":
        schedule = f"1 pass (coreset {kwargs['coreset_sampling_ratio']:g})"
    elif name == "Aand":
        schedule = f"{kwargs['stage1_epochs']}+{kwargs['stage2_epochs']} epochs"
    else:
        n = kwargs.get("epochs", epochs)
        schedule = f"{n} epoch{'' if n == 1 else 's'}"
    return model, {"max_epochs": epochs} if name == "ReverseDistillation" else {}, backbone, schedule


def scaled(epochs: int, spec: dict[str, Any]) -> int:
    """A paper's epoch count times the run's ``schedule_scale`` (rounded, at least 1)."""
    return max(1, round(epochs * (spec.get("schedule_scale") or 1.0)))


def auroc(values: Any, targets: Any, pixel: bool = False) -> float:  # noqa: ANN401
    """anomalib's image AUROC of ``values`` (higher = more anomalous; one per image) against the 0/1 ``targets``, or
    with ``pixel`` its pixel AUROC of maps against masks of the same size: the quality cells' metrics, edge's too."""
    import torch
    from anomalib.metrics import AUROC

    fields = ["anomaly_map", "gt_mask"] if pixel else ["pred_score", "gt_label"]
    targets = torch.as_tensor(targets).int()
    targets = targets if pixel else targets.reshape(-1)
    values = torch.as_tensor(values).detach().float().reshape(targets.shape)
    metric = AUROC(fields=fields)
    metric.update(SimpleNamespace(**dict(zip(fields, (values, targets), strict=True))))
    return float(metric.compute())


def _raw_metrics_callback():  # noqa: ANN202
    """A callback computing image AUROC, pixel AUROC and AUPRO on the raw (un-normalised) test outputs."""
    import torch
    from anomalib.metrics import AUPRO, AUROC
    from lightning.pytorch import Callback

    class RawTestMetrics(Callback):
        """Runs before the model's post-processor (trainer callbacks precede the model's own callbacks)."""

        def __init__(self) -> None:
            self.image_auroc = AUROC(fields=["pred_score", "gt_label"])
            self.pixel_auroc = AUROC(fields=["anomaly_map", "gt_mask"])
            self.aupro = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.3)

        def on_test_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            callbacks = list(trainer.callbacks)
            post = pl_module.post_processor
            mine = next(i for i, c in enumerate(callbacks) if c is self)
            theirs = next((i for i, c in enumerate(callbacks) if c is post), None)
            if theirs is not None and theirs < mine:
                msg = "RawTestMetrics must run before the post-processor to see raw scores"
                raise RuntimeError(msg)

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, ARG002
            anomaly_map = outputs.anomaly_map.detach().float().cpu()
            score = outputs.pred_score
            score = torch.amax(anomaly_map, dim=(-2, -1)) if score is None else score.detach().float().cpu()
            raw = SimpleNamespace(  # the batch fields the metrics read
                pred_score=score.reshape(-1),
                gt_label=outputs.gt_label.detach().cpu().reshape(-1).int(),
                anomaly_map=anomaly_map.reshape(anomaly_map.shape[0], *anomaly_map.shape[-2:]),
                gt_mask=outputs.gt_mask.detach().cpu().reshape(anomaly_map.shape[0], *outputs.gt_mask.shape[-2:]),
            )
            for metric in (self.image_auroc, self.pixel_auroc, self.aupro):
                metric.update(raw)

        def results(self) -> dict[str, float]:
            return {name: float(getattr(self, name).compute()) for name in ("image_auroc", "pixel_auroc", "aupro")}

    return RawTestMetrics()


def _timing_batches(datamodule: Any, size: int, batch: int):  # noqa: ANN401, ANN202
    """float32 ``[1, 3, S, S]`` and ``[batch, 3, S, S]`` test images in [0, 1] (cycled when fewer)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    dataset = datamodule.test_data
    images = []
    for i in range(min(batch, len(dataset))):
        image = dataset[i].image.float()
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        images.append(F.interpolate(image[None, :3], size=(size, size), mode="bilinear", antialias=True)[0])
    stacked = torch.stack(images).clamp(0, 1)
    big = stacked.repeat(math.ceil(batch / len(stacked)), 1, 1, 1)[:batch].contiguous()
    return stacked[:1].contiguous(), big


def _speed(call: Callable[[Any], Any], one: Any, many: Any, spec: dict, cuda: bool = False, prefix: str = "") -> dict:  # noqa: ANN401
    """``{prefix}latency_bs1_ms`` (median) and ``{prefix}throughput_ips`` of ``call`` on the two timing batches."""
    latency = statistics.median(CallTimer(lambda: call(one), cuda).calls(spec["timing_runs"], spec["warmup"]))
    batch_time = statistics.median(CallTimer(lambda: call(many), cuda).calls(max(3, spec["timing_runs"] // 4), 1))
    return {f"{prefix}latency_bs1_ms": 1000 * latency, f"{prefix}throughput_ips": spec["throughput_batch"] / batch_time}


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Train, validate (thresholds only), test and time one cell; returns its ``results.csv`` row."""
    import resource
    import shutil
    import tempfile

    import torch
    from anomalib.callbacks.checkpoint import ModelCheckpoint
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    cuda = spec["device"].startswith("cuda") and torch.cuda.is_available()
    if spec["device"].startswith("cuda") and not cuda:
        msg = f"cell assigned to {spec['device']} but CUDA is not available in the child process"
        raise RuntimeError(msg)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    seed_everything(spec["seed"], workers=True)

    datamodule = MVTecAD(root=spec["dataset_root"], category=spec["category"], train_batch_size=spec["batch_size"],
                         eval_batch_size=spec["batch_size"], num_workers=spec["num_workers"],
                         val_split_mode=spec["val_split"], val_split_ratio=spec["val_split_ratio"],
                         seed=spec["split_seed"])  # fmt: skip
    model, fit_kwargs, backbone, schedule = build_model(spec)
    proxy_images = 0
    if spec.get("proxy_teacher"):
        from anomalib_kd_tools.proxy import calibrate_proxy_teacher

        datamodule.setup()
        proxy_images = calibrate_proxy_teacher(model, datamodule.train_data, spec["batch_size"])
    work = Path(tempfile.mkdtemp(prefix="cell_", dir=spec["work_dir"]))
    try:
        common = {"accelerator": "gpu" if cuda else "cpu", "devices": 1, "default_root_dir": work, "logger": False,
                  "enable_progress_bar": False, "enable_model_summary": False, "deterministic": "warn"}  # fmt: skip

        def no_checkpoints() -> list:
            # anomalib adds a checkpoint callback unless one is given: this one saves nothing (last epoch is used).
            return [ModelCheckpoint(dirpath=work / "ckpt", save_top_k=0, save_last=False)]

        # 1) training: no validation loop during fit, no checkpoint selection.
        fit_engine = Engine(**common, limit_val_batches=0, callbacks=no_checkpoints(), **fit_kwargs)
        start = time.perf_counter()
        fit_engine.fit(model, datamodule=datamodule)
        train_time = time.perf_counter() - start

        # 2) validation split -> post-processor thresholds / normalisation; 3) test on the remaining images.
        raw = _raw_metrics_callback()
        eval_engine = Engine(**common, callbacks=[*no_checkpoints(), raw])
        eval_engine.validate(model, datamodule=datamodule, verbose=False)
        test_results = eval_engine.test(model, datamodule=datamodule, verbose=False)[0]
        metrics = raw.results()
        metrics["image_f1"] = float(test_results["image_F1Score"])

        # 4) speed of the whole AnomalibModule.forward.
        device = torch.device("cuda:0" if cuda else "cpu")
        model = model.to(device).eval()
        one, many = _timing_batches(datamodule, spec["image_size"], spec["throughput_batch"])
        one, many = one.to(device), many.to(device)
        with torch.inference_mode():
            row: dict[str, Any] = {**metrics, **_speed(model, one, many, spec, cuda)}
        row.update(ov_latency_bs1_ms=math.nan, ov_throughput_ips=math.nan)
        if spec["openvino"]:
            row.update(_openvino_speed(model, one.cpu(), many.cpu(), spec, work))
        if spec.get("heatmaps"):
            path = Path(spec["heatmap_dir"]) / f"{spec['slug']}.npz"
            save_heatmaps(model, datamodule.test_data, spec["heatmaps"], path, spec["category"])
        if spec.get("variant"):  # ablation cell: the model's own mechanism figures on the test images
            from anomalib_kd_tools.benchmark.ablation import mechanism_figures

            figures, status = mechanism_figures(model.to(device), datamodule.test_dataloader())
            row.update(variant=spec["variant"], overrides=json.dumps(spec.get("overrides") or {}))
            row.update(mechanism=json.dumps(figures), mechanism_status=status)
            row["teacher"] = PROXY_TEACHER if proxy_images else ("ImageNet" if spec["pre_trained"] else "random init")

        params = list(model.model.parameters())
        state_bytes = sum(t.numel() * t.element_size() for t in (*params, *model.model.buffers()))
        if cuda:
            peak_mb, memory_kind = torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
        else:
            peak_mb, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"
        row.update({key: spec[key] for key in ("dataset_kind", "category", "model", "seed", "image_size", "device")})
        row.update(
            dataset=spec["dataset_label"], peak_memory_mb=peak_mb, memory_kind=memory_kind,
            params_m=sum(p.numel() for p in params) / 1e6,
            trainable_params_m=_trainable_params(fit_engine.trainer.optimizers) / 1e6, state_mb=state_bytes / 2**20,
            train_time_s=train_time,
            throughput_batch=spec["throughput_batch"], threads=torch.get_num_threads(), backbone=backbone,
            weights_tag=PROXY_TEACHER if proxy_images else weights_tag(backbone, spec["pre_trained"], model),
            schedule=schedule, val_split=f"{spec['val_split']}:{spec['val_split_ratio']:g}",
            n_train=len(datamodule.train_data), n_val=len(datamodule.val_data), n_test=len(datamodule.test_data),
            device_name=torch.cuda.get_device_name(0) if cuda else cpu_name(),
            finished_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )  # fmt: skip
        return row
    finally:
        shutil.rmtree(work, ignore_errors=True)


def save_heatmaps(model: Any, dataset: Any, count: int, path: Path, category: str) -> None:  # noqa: ANN401
    """Write ``count`` anomalous test images of ``dataset``, their masks and the model's maps to ``path`` (npz).

    The images are the same for every model of a category (sorted by path, one per defect family in turn); the maps
    are the whole ``AnomalibModule.forward``'s, post-processed: each model's validation threshold maps to 0.5, so
    the maps of different models share one scale (:mod:`anomalib_kd_tools.heatmaps`).
    """
    import numpy as np
    import torch

    samples = dataset.samples.reset_index(drop=True)
    by_defect: dict[str, list[int]] = {}
    for i in sorted(range(len(samples)), key=lambda i: str(samples.image_path[i])):
        if int(samples.label_index[i]) == 1:
            by_defect.setdefault(Path(samples.image_path[i]).parent.name, []).append(i)
    depth = max(map(len, by_defect.values()), default=0)
    chosen = [ids[k] for k in range(depth) for ids in by_defect.values() if k < len(ids)][:count]
    images, masks, maps, labels = [], [], [], []
    model.eval()
    for i in chosen:
        item = dataset[i]
        with torch.inference_mode():
            output = model(item.image[None].to(next(model.parameters()).device))
        images.append(item.image[:3].permute(1, 2, 0).cpu().numpy())
        masks.append(item.gt_mask.reshape(item.gt_mask.shape[-2:]).cpu().numpy().astype(np.uint8))
        maps.append(output.anomaly_map.detach().float().cpu().numpy().reshape(output.anomaly_map.shape[-2:]))
        labels.append(f"{category} / {Path(samples.image_path[i]).parent.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=np.asarray(images, dtype=np.float16), masks=np.asarray(masks),
                        maps=np.asarray(maps, dtype=np.float32), labels=np.asarray(labels),
                        paths=np.asarray([str(samples.image_path[i]) for i in chosen]))  # fmt: skip


def _trainable_params(optimizers: Sequence[Any]) -> int:
    """Parameters the training optimisers updated, each once (0 for Patchcore, which has none)."""
    groups = [group for optimizer in optimizers for group in optimizer.param_groups]
    return sum({id(p): p.numel() for group in groups for p in group["params"]}.values())


def _openvino_speed(model: Any, one: Any, many: Any, spec: dict[str, Any], work: Path) -> dict[str, float]:  # noqa: ANN401
    import warnings

    import openvino as ov
    import torch

    model = model.cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xml = model.to_openvino(work / "openvino", input_size=(spec["image_size"], spec["image_size"]))
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if spec.get("threads"):
        config["INFERENCE_NUM_THREADS"] = spec["threads"]
    compiled = ov.Core().compile_model(str(xml), "CPU", config)
    with torch.inference_mode():
        return _speed(compiled, one.numpy(), many.numpy(), spec, prefix="ov_")


def cell_entry(spec_path: str, result_path: str) -> int:
    """Child-process entry: run the cell described in ``spec_path`` and write its row to ``result_path``."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    row = run_cell(spec)
    tmp = Path(result_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(row), encoding="utf-8")
    tmp.replace(result_path)
    return 0
