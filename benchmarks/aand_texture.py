"""Issue 18 diagnosis: AAND vs RD localisation on a regular high-contrast texture (generated brick wall).

Proxy-teacher experiment (random-init resnet18 whose BatchNorm statistics are calibrated on the training
images with :func:`anomalib_kd_tools.proxy.calibrate_batchnorm`; never ImageNet). For each seed it builds ONE
teacher and ONE initial student (bottleneck + decoder) and trains, from the same starting point:

* ``RD``: anomalib's ``ReverseDistillationModel`` (L_KD on ``F_T``, Adam 0.005 / (0.5, 0.99), as anomalib's RD);
* ``AAND``: ``anomalib_aand.Aand`` through its own stage-1 / stage-2 loss methods and optimisers (the code
  path of ``training_step``), with a generated DTD-like texture folder as anomaly source;
* ``AAND stage1=0``: the AAND student (L_KD + L_HKD, AAND's schedule) on the vanilla teacher.

Every trained AAND is also evaluated with the gate forced to 0 (``F_A = F_T``, same student) and with the
ground-truth gate (test mask pooled with the model's label rule: an oracle, for diagnosis only).

Reported per model: image AUROC, pixel AUROC, AUPRO (FPR <= 0.3), the map's mortar/brick ratio on normal
test images (the issue's symptom: peaks on the bright mortar lines), and per level k: the gate's
false-positive rate (w^a > 0.5 on normal-image positions), its rate on mortar and brick positions, its
true-positive rate on the defects, the gated-residual energy |w^a Delta|^2 and the raw |Delta|^2 on normal
vs anomalous positions, each level's share of the summed map and each level's own pixel AUROC.

    OMP_NUM_THREADS=1 python benchmarks/aand_texture.py --out /tmp/aand_texture --seeds 0 1 2

Writes ``<out>/rows.jsonl`` (one row per seed x model) and ``<out>/summary.md``. Numbers on this generated
texture with a proxy teacher say nothing about MVTec AD with ImageNet weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F  # noqa: N812

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from anomalib_kd_tools.benchmark.ablation import accepted_kwargs  # noqa: E402
from anomalib_kd_tools.proxy import calibrate_batchnorm  # noqa: E402
from anomalib_kd_tools.synthetic import make_mvtec_like_dataset, make_texture_folder  # noqa: E402

DEFAULT_DEFECTS = ("foreign", "tint", "hole", "scratch")
MORTAR_GREY = 0.6  # mortar ~0.84 grey, bricks ~0.38: a fixed cut separates them on the generated wall


# ---------------------------------------------------------------------------------------------- data
def load_images(paths: list[Path]) -> torch.Tensor:
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_dataset(root: Path, category: str) -> dict[str, torch.Tensor | list[str]]:
    base = root / category
    train = load_images(sorted((base / "train" / "good").glob("*.png")))
    images, masks, labels, kinds = [], [], [], []
    for kind_dir in sorted((base / "test").iterdir()):
        for path in sorted(kind_dir.glob("*.png")):
            image = load_images([path])[0]
            if kind_dir.name == "good":
                mask = torch.zeros(image.shape[-2:], dtype=torch.bool)
            else:
                mask_path = base / "ground_truth" / kind_dir.name / f"{path.stem}_mask.png"
                mask = torch.from_numpy(np.asarray(Image.open(mask_path)) > 127)
            images.append(image)
            masks.append(mask)
            labels.append(int(kind_dir.name != "good"))
            kinds.append(kind_dir.name)
    return {
        "train": train,
        "test": torch.stack(images),
        "mask": torch.stack(masks),
        "label": torch.tensor(labels),
        "kind": kinds,
    }


def mortar_mask(images: torch.Tensor) -> torch.Tensor:
    """Bright mortar lines of the generated wall: grey level > MORTAR_GREY, ``(B, H, W)`` bool."""
    grey = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    return grey > MORTAR_GREY


# ---------------------------------------------------------------------------------------------- models
def build_aand(args: argparse.Namespace, texture_dir: Path | None, **overrides):  # noqa: ANN201
    from anomalib_aand import Aand

    params = {
        "backbone": "resnet18",
        "pre_trained": False,
        "stage1_epochs": args.aand_stages[0],
        "stage2_epochs": args.aand_stages[1],
        "anomaly_source_path": str(texture_dir) if texture_dir is not None else None,
        "foreground": "none",  # a texture: the whole image (what foreground="auto" picks for textures)
        "pre_processor": Aand.configure_pre_processor(image_size=(args.size, args.size)),
        "evaluator": False,
        "visualizer": False,
        "post_processor": False,
    }
    params.update(overrides)
    accepted = accepted_kwargs(Aand)  # its own and the base's (pre_processor, ...): Aand passes **components on
    return Aand(**{k: v for k, v in params.items() if accepted is None or k in accepted})


def structured_first_layer(conv: torch.nn.Conv2d, seed: int) -> None:
    """Replace a random first conv by a fixed bank of oriented Gabor / colour-opponent filters (a teacher with
    structured low-level features that a test can build; deeper layers stay random)."""
    out_c, in_c, k, _ = conv.weight.shape
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(k) - (k - 1) / 2, torch.arange(k) - (k - 1) / 2, indexing="ij")
    filters = []
    for i in range(out_c):
        theta = math.pi * (i % 8) / 8
        freq = (0.12, 0.22, 0.35)[(i // 8) % 3]
        phase = (0.0, math.pi / 2)[(i // 24) % 2]
        u = xs * math.cos(theta) + ys * math.sin(theta)
        gabor = torch.exp(-(xs**2 + ys**2) / (2 * (k / 4) ** 2)) * torch.cos(2 * math.pi * freq * u + phase)
        gabor = gabor - gabor.mean()
        colour = torch.randn(in_c, generator=gen) if i >= 48 else torch.ones(in_c)
        filt = colour.view(in_c, 1, 1) * gabor
        filters.append(filt / filt.norm().clamp_min(1e-6))
    with torch.no_grad():
        conv.weight.copy_(torch.stack(filters))


def calibrate(encoder: torch.nn.Module, images: torch.Tensor, batch: int) -> None:
    calibrate_batchnorm(encoder, [images[i : i + batch] for i in range(0, len(images), batch)])


def batches(n: int, batch: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen)
    for start in range(0, n - batch + 1 if n >= batch else 1, batch):
        yield order[start : start + batch]


def train_rd(rd, images: torch.Tensor, epochs: int, batch: int, gen: torch.Generator, hkd: int = 0) -> float:
    """anomalib RD's recipe; ``hkd > 0`` adds AAND's L_HKD (top-``hkd``) to RD's loss (a diagnostic variant)."""
    from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss

    from anomalib_aand.loss import hard_kd_loss

    rd_loss = ReverseDistillationLoss()

    def loss_fn(teacher, student):  # noqa: ANN001, ANN202
        loss = rd_loss(teacher, student)
        return loss + hard_kd_loss(teacher, student, hkd) if hkd else loss

    optimizer = torch.optim.Adam(
        [*rd.decoder.parameters(), *rd.bottleneck.parameters()], lr=0.005, betas=(0.5, 0.99)
    )  # anomalib RD's configure_optimizers
    rd.train()
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        for idx in batches(len(images), batch, gen):
            loss = loss_fn(*rd(images[idx]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    rd.eval()
    return float(loss.detach())


def train_aand(model, images: torch.Tensor, batch: int, gen: torch.Generator) -> dict[str, float]:
    """Both stages through the model's own loss methods, optimisers and schedulers (training_step's path)."""
    optimizers, schedulers = model.configure_optimizers()
    model.train()
    last: dict[str, float] = {}
    for stage, epochs in ((1, model.stage1_epochs), (2, model.stage2_epochs)):
        model._set_trainable(stage)  # noqa: SLF001
        for _ in range(epochs):
            for idx in batches(len(images), batch, gen):
                losses = model.stage1_losses(images[idx]) if stage == 1 else model.stage2_losses(images[idx])
                optimizers[stage - 1].zero_grad(set_to_none=True)
                losses["loss"].backward()
                optimizers[stage - 1].step()
                last = {f"s{stage}_{k}": float(v) for k, v in losses.items()}
            schedulers[stage - 1].step()
    model.eval()
    return last


# ---------------------------------------------------------------------------------------------- evaluation
def metrics(maps: torch.Tensor, scores: torch.Tensor, data: dict) -> dict[str, float]:
    from anomalib.metrics.aupro import _AUPRO
    from anomalib.metrics.auroc import _AUROC

    image = _AUROC()
    image.update(scores, data["label"])
    pixel = _AUROC()
    pixel.update(maps.flatten(), data["mask"].flatten().int())
    aupro = _AUPRO(fpr_limit=0.3)
    aupro.update(maps, data["mask"].int())
    normal = data["label"] == 0
    mortar = data["mortar"][normal]
    normal_maps = maps[normal]
    top = normal_maps.flatten(1).quantile(0.99, dim=1).view(-1, 1, 1)
    return {
        "image_auroc": float(image.compute()),
        "pixel_auroc": float(pixel.compute()),
        "aupro": float(aupro.compute()),
        "mortar_over_brick": float(normal_maps[mortar].mean() / normal_maps[~mortar].mean()),
        "top1pct_on_mortar": float((normal_maps >= top)[mortar].sum() / (normal_maps >= top).sum()),
        "mortar_area": float(mortar.float().mean()),
        "defect_over_normal": float(maps[data["mask"]].mean() / normal_maps.mean()),
    }


def level_maps(teacher: list[torch.Tensor], student: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    out = []
    for t, s in zip(teacher, student, strict=True):
        d = (1 - F.cosine_similarity(s, t)).unsqueeze(1)
        out.append(F.interpolate(d, size=(size, size), mode="bilinear", align_corners=True)[:, 0])
    return out


def pixel_auroc(values: torch.Tensor, mask: torch.Tensor) -> float:
    from anomalib.metrics.auroc import _AUROC

    m = _AUROC()
    m.update(values.flatten(), mask.flatten().int())
    return float(m.compute())


@torch.no_grad()
def evaluate_rd(rd, data: dict, batch: int) -> dict[str, float]:
    rd.eval()
    maps, scores, per_level = [], [], []
    for i in range(0, len(data["input"]), batch):
        x = data["input"][i : i + batch]
        t = list(rd.encoder(x).values())
        s = rd.decoder(rd.bottleneck(t))
        m = rd.anomaly_map_generator(s, t)[:, 0]
        maps.append(m)
        scores.append(m.flatten(1).amax(1))
        per_level.append(level_maps(t, s, m.shape[-1]))
    maps, scores = torch.cat(maps), torch.cat(scores)
    row = metrics(maps, scores, data)
    levels = [torch.cat([p[k] for p in per_level]) for k in range(3)]
    total = sum(levels)
    for k, lv in enumerate(levels, start=1):
        row[f"map_share_l{k}"] = float((lv.flatten(1).mean(1) / total.flatten(1).mean(1)).mean())
        row[f"level_pixel_auroc_l{k}"] = pixel_auroc(lv, data["mask"])
        row[f"normal_err_l{k}"] = float(lv[data["label"] == 0].mean())
    return row


@torch.no_grad()
def evaluate_aand(model, data: dict, batch: int, gate: str = "predicted") -> dict[str, float]:
    """``gate``: ``"predicted"`` (Eq. 1), ``"zero"`` (F_A = F_T, same student) or ``"oracle"`` (gt mask)."""
    net = model.model
    net.eval()
    maps, scores = [], []
    per_level: list[list[torch.Tensor]] = []
    stats: dict[str, list[torch.Tensor]] = {}

    def add(name: str, values: torch.Tensor) -> None:
        stats.setdefault(name, []).append(values.detach().flatten().float())

    for i in range(0, len(data["input"]), batch):
        x = data["input"][i : i + batch]
        mask = data["mask"][i : i + batch].float().unsqueeze(1)
        mortar = data["mortar"][i : i + batch].float().unsqueeze(1)
        normal_image = (data["label"][i : i + batch] == 0).view(-1, 1, 1, 1)
        vanilla = net.teacher_features(x)
        sizes = [tuple(v.shape[-2:]) for v in vanilla]
        labels = [model.level_labels(mask, s) for s in sizes]
        if gate == "zero":
            weights = [torch.zeros_like(v[:, :1]) for v in vanilla]
        elif gate == "oracle":
            weights = [lab.to(v.dtype) for lab, v in zip(labels, vanilla, strict=True)]
        else:
            weights = None
        advanced, gates, _, residuals = net.amplify(vanilla, weights)
        student = net.student_features(advanced)
        m = net.anomaly_map_generator(student, advanced)[:, 0]
        maps.append(m)
        scores.append(m.flatten(1).amax(1))
        per_level.append(level_maps(advanced, student, m.shape[-1]))
        for k, (g, r, lab, size) in enumerate(zip(gates, residuals, labels, sizes, strict=True), start=1):
            w = g if weights is None else weights[k - 1]
            mortar_k = F.adaptive_avg_pool2d(mortar, size)
            clean = F.adaptive_avg_pool2d(mask, size) == 0  # no defect pixel in the patch
            n_img = normal_image.expand_as(g)
            add(f"gate_normal_l{k}", g[n_img])
            on_mortar, on_brick = mortar_k >= 0.25, mortar_k == 0  # >= 1/4 mortar pixels / none
            add(f"gate_mortar_l{k}", g[n_img & on_mortar])
            add(f"gate_brick_l{k}", g[n_img & on_brick])
            add(f"gate_anomalous_l{k}", g[lab])
            add(f"gate_clean_defective_l{k}", g[clean & ~n_img])
            energy = ((w * r) ** 2).mean(1, keepdim=True)
            raw = (r**2).mean(1, keepdim=True)
            add(f"energy_normal_l{k}", energy[n_img])
            add(f"energy_anomalous_l{k}", energy[lab])
            add(f"energy_mortar_l{k}", energy[n_img & on_mortar])
            add(f"energy_brick_l{k}", energy[n_img & on_brick])
            add(f"raw_normal_l{k}", raw[n_img])
            add(f"raw_anomalous_l{k}", raw[lab])
            add(f"feat_normal_l{k}", (vanilla[k - 1] ** 2).mean(1, keepdim=True)[n_img])
            # how far the advanced teacher moves normal features: 1 - cos(F_A, F_T)
            shift = (1 - F.cosine_similarity(advanced[k - 1], vanilla[k - 1], dim=1)).unsqueeze(1)
            add(f"shift_normal_l{k}", shift[n_img])
            add(f"shift_anomalous_l{k}", shift[lab])
    maps, scores = torch.cat(maps), torch.cat(scores)
    row = metrics(maps, scores, data)
    cat = {k: torch.cat(v) if v else torch.empty(0) for k, v in stats.items()}
    levels = [torch.cat([p[k] for p in per_level]) for k in range(3)]
    total = sum(levels)

    def mean(name: str) -> float:
        return float(cat[name].mean()) if cat[name].numel() else float("nan")

    for k in range(1, 4):
        row[f"gate_fpr_l{k}"] = float((cat[f"gate_normal_l{k}"] > 0.5).float().mean())
        row[f"gate_fpr_mortar_l{k}"] = float((cat[f"gate_mortar_l{k}"] > 0.5).float().mean()) if cat[f"gate_mortar_l{k}"].numel() else float("nan")
        row[f"gate_fpr_brick_l{k}"] = float((cat[f"gate_brick_l{k}"] > 0.5).float().mean()) if cat[f"gate_brick_l{k}"].numel() else float("nan")
        row[f"gate_tpr_l{k}"] = float((cat[f"gate_anomalous_l{k}"] > 0.5).float().mean()) if cat[f"gate_anomalous_l{k}"].numel() else float("nan")
        row[f"gate_mean_normal_l{k}"] = mean(f"gate_normal_l{k}")
        row[f"gate_mean_anomalous_l{k}"] = mean(f"gate_anomalous_l{k}")
        row[f"gate_mean_mortar_l{k}"] = mean(f"gate_mortar_l{k}")
        row[f"gate_mean_brick_l{k}"] = mean(f"gate_brick_l{k}")
        row[f"energy_normal_l{k}"] = mean(f"energy_normal_l{k}")
        row[f"energy_anomalous_l{k}"] = mean(f"energy_anomalous_l{k}")
        row[f"residual_ratio_l{k}"] = mean(f"energy_anomalous_l{k}") / max(mean(f"energy_normal_l{k}"), 1e-12)
        row[f"energy_mortar_over_brick_l{k}"] = mean(f"energy_mortar_l{k}") / max(mean(f"energy_brick_l{k}"), 1e-12)
        row[f"raw_ratio_l{k}"] = mean(f"raw_anomalous_l{k}") / max(mean(f"raw_normal_l{k}"), 1e-12)
        row[f"shift_normal_l{k}"] = mean(f"shift_normal_l{k}")
        row[f"shift_anomalous_l{k}"] = mean(f"shift_anomalous_l{k}")
        row[f"energy_over_feat_normal_l{k}"] = mean(f"energy_normal_l{k}") / max(mean(f"feat_normal_l{k}"), 1e-12)
        lv = levels[k - 1]
        row[f"map_share_l{k}"] = float((lv.flatten(1).mean(1) / total.flatten(1).mean(1)).mean())
        row[f"level_pixel_auroc_l{k}"] = pixel_auroc(lv, data["mask"])
        row[f"normal_err_l{k}"] = float(lv[data["label"] == 0].mean())
    return row


@torch.no_grad()
def synthetic_gate(model, train: torch.Tensor, batch: int, seed: int) -> dict[str, float]:
    """Gate on stage-1 pseudo-anomalies of the training images (what the gate was trained on)."""
    net = model.model
    mean, std = model._normalisation(train)  # noqa: SLF001
    torch.manual_seed(seed + 2000)
    hits: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(train), batch):
        x = train[i : i + batch]
        augmented, mask, _ = model.synthesizer((x * std + mean).clamp(0, 1))
        vanilla = net.teacher_features((augmented - mean) / std)
        _, gates, _, _ = net.amplify(vanilla)
        for k, g in enumerate(gates, start=1):
            lab = model.level_labels(mask, tuple(g.shape[-2:]))
            clean = F.adaptive_avg_pool2d(mask, tuple(g.shape[-2:])) == 0
            hits.setdefault(f"syn_tpr_l{k}", []).append((g[lab] > 0.5).float())
            hits.setdefault(f"syn_fpr_l{k}", []).append((g[clean] > 0.5).float())
    return {k: float(torch.cat(v).mean()) if torch.cat(v).numel() else float("nan") for k, v in hits.items()}


# ---------------------------------------------------------------------------------------------- main
def code_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "anomalib_aand").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def run_seed(seed: int, args: argparse.Namespace, data: dict, texture_dir: Path | None, out: Path) -> list[dict]:
    from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode
    from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel

    rows = []
    torch.manual_seed(seed)
    aand = build_aand(args, texture_dir)
    if args.teacher == "gabor":
        structured_first_layer(aand.model.encoder.feature_extractor.conv1, seed)
    transform = aand.pre_processor.transform
    data["input"] = transform(data["test"])
    train = transform(data["train"])
    calibrate(aand.model.encoder, train, args.batch)
    teacher_state = {k: v.clone() for k, v in aand.model.encoder.state_dict().items()}
    student_state = {
        "bottleneck": {k: v.clone() for k, v in aand.model.bottleneck.state_dict().items()},
        "decoder": {k: v.clone() for k, v in aand.model.decoder.state_dict().items()},
    }
    common = {"seed": seed, "teacher": args.teacher, "size": args.size, "n_train": len(train), "code": code_hash()}

    def emit(row: dict) -> None:
        row = {**common, **row}
        rows.append(row)
        with (out / "rows.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        keys = ("image_auroc", "pixel_auroc", "aupro", "mortar_over_brick")
        print(f"[seed {seed}] {row['model']:<22} " + "  ".join(f"{k}={row[k]:.3f}" for k in keys), flush=True)

    if "RD" in args.models:
        rd = ReverseDistillationModel(
            backbone="resnet18",
            input_size=(args.size, args.size),
            layers=["layer1", "layer2", "layer3"],
            anomaly_map_mode=AnomalyMapGenerationMode.ADD,
            pre_trained=False,
        )
        rd.encoder.load_state_dict(teacher_state)
        rd.bottleneck.load_state_dict(student_state["bottleneck"])
        rd.decoder.load_state_dict(student_state["decoder"])
        rd.encoder.requires_grad_(False)
        start = time.perf_counter()
        loss = train_rd(rd, train, args.rd_epochs, args.batch, torch.Generator().manual_seed(seed))
        emit({"model": "RD", "train_s": time.perf_counter() - start, "final_loss": loss, **evaluate_rd(rd, data, args.batch)})

    if "RD+HKD" in args.models:
        rd = ReverseDistillationModel(
            backbone="resnet18",
            input_size=(args.size, args.size),
            layers=["layer1", "layer2", "layer3"],
            anomaly_map_mode=AnomalyMapGenerationMode.ADD,
            pre_trained=False,
        )
        rd.encoder.load_state_dict(teacher_state)
        rd.bottleneck.load_state_dict(student_state["bottleneck"])
        rd.decoder.load_state_dict(student_state["decoder"])
        rd.encoder.requires_grad_(False)
        start = time.perf_counter()
        loss = train_rd(rd, train, args.rd_epochs, args.batch, torch.Generator().manual_seed(seed), hkd=10)
        emit({"model": "RD+HKD", "train_s": time.perf_counter() - start, "final_loss": loss, **evaluate_rd(rd, data, args.batch)})

    if "AAND default-init" in args.models:
        # initialisation ablation: PyTorch's default conv init and memory randn/sqrt(C) (the pre-issue-14 init)
        torch.manual_seed(seed)
        alt = build_aand(args, texture_dir)
        alt.model.encoder.load_state_dict(teacher_state)
        alt.model.bottleneck.load_state_dict(student_state["bottleneck"])
        alt.model.decoder.load_state_dict(student_state["decoder"])
        torch.manual_seed(seed + 500)
        for raa in alt.model.raa:
            for module in raa.modules():
                if isinstance(module, torch.nn.Conv2d):
                    module.reset_parameters()
            with torch.no_grad():
                raa.gate.memory.copy_(torch.randn_like(raa.gate.memory) / raa.gate.memory.shape[1] ** 0.5)
        torch.manual_seed(seed + 1000)
        start = time.perf_counter()
        losses = train_aand(alt, train, args.batch, torch.Generator().manual_seed(seed))
        losses.update(synthetic_gate(alt, train, args.batch, seed))
        train_s = time.perf_counter() - start
        for gate in ("predicted", "zero"):
            name = "AAND default-init" if gate == "predicted" else f"AAND default-init gate={gate}"
            emit({"model": name, "train_s": train_s, **losses, **evaluate_aand(alt, data, args.batch, gate)})

    if "AAND" in args.models:
        torch.manual_seed(seed + 1000)  # the synthesis stream
        start = time.perf_counter()
        losses = train_aand(aand, train, args.batch, torch.Generator().manual_seed(seed))
        train_s = time.perf_counter() - start
        assert all(torch.equal(v, aand.model.encoder.state_dict()[k]) for k, v in teacher_state.items())
        torch.save(aand.model.state_dict(), out / f"aand_seed{seed}.pt")
        losses.update(synthetic_gate(aand, train, args.batch, seed))
        for gate in ("predicted", "zero", "oracle"):
            name = "AAND" if gate == "predicted" else f"AAND gate={gate}"
            emit({"model": name, "train_s": train_s, **losses, **evaluate_aand(aand, data, args.batch, gate)})

    if "AAND stage1=0" in args.models:
        torch.manual_seed(seed)
        plain = build_aand(args, texture_dir, stage1_epochs=0)
        plain.model.encoder.load_state_dict(teacher_state)
        plain.model.bottleneck.load_state_dict(student_state["bottleneck"])
        plain.model.decoder.load_state_dict(student_state["decoder"])
        # RAA kept for the bookkeeping; the gate is forced to 0 so F_A = F_T in training and evaluation
        for raa in plain.model.raa:
            torch.nn.init.zeros_(raa.generator.projection[-1].weight)
            torch.nn.init.zeros_(raa.generator.projection[-1].bias)
        start = time.perf_counter()
        losses = train_aand(plain, train, args.batch, torch.Generator().manual_seed(seed))
        emit({"model": "AAND stage1=0", "train_s": time.perf_counter() - start, **losses,
              **evaluate_aand(plain, data, args.batch, "zero")})
    return rows


def gate_curve(seed: int, args: argparse.Namespace, data: dict, texture_dir: Path | None, out: Path) -> list[dict]:
    """Stage 1 only: gate statistics after ``args.curve`` cumulative steps (synthetic and real defects)."""
    torch.manual_seed(seed)
    aand = build_aand(args, texture_dir)
    if args.teacher == "gabor":
        structured_first_layer(aand.model.encoder.feature_extractor.conv1, seed)
    transform = aand.pre_processor.transform
    data["input"] = transform(data["test"])
    train = transform(data["train"])
    calibrate(aand.model.encoder, train, args.batch)
    optimizers, _ = aand.configure_optimizers()
    aand.train()
    aand._set_trainable(1)  # noqa: SLF001
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1000)
    rows, done = [], 0
    for target in sorted(set(args.curve)):
        while done < target:
            for idx in batches(len(train), args.batch, gen):
                if done >= target:
                    break
                losses = aand.stage1_losses(train[idx])
                optimizers[0].zero_grad(set_to_none=True)
                losses["loss"].backward()
                optimizers[0].step()
                done += 1
        aand.eval()
        row = {"model": "stage1 curve", "seed": seed, "teacher": args.teacher, "size": args.size, "steps": done,
               **{f"s1_{k}": float(v) for k, v in losses.items()}, **synthetic_gate(aand, train, args.batch, seed)}
        ev = evaluate_aand(aand, data, args.batch, "predicted")  # student untrained: only the gate keys matter
        row.update({k: v for k, v in ev.items() if k.startswith(("gate_", "residual_ratio", "energy_over", "raw_ratio"))})
        rows.append(row)
        with (out / "curve.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"[seed {seed} {args.teacher}] steps={done} " + " ".join(
            f"{k}={row[k]:.3f}" for k in row if k.startswith(("syn_", "gate_fpr_l", "gate_tpr_l", "gate_mean_normal_l", "gate_mean_anomalous_l"))), flush=True)
        aand.train()
    return rows


def linear_probe(seed: int, args: argparse.Namespace, data: dict, texture_dir: Path | None, out: Path) -> dict:
    """How separable are stage-1 pseudo-anomalies in the (proxy) teacher's features? A per-level logistic probe.

    Two synthesis draws on the training images; the probe (standardised features, class-balanced BCE, Adam, 300
    steps) is fit on the first half of the patches and scored (AUROC) on the second half and on the real test
    defects (labels: the model's pooled-mask rule). A gate (an MLP + memory matching on the same features)
    can only do as well as the features allow.
    """
    from anomalib.metrics.auroc import _AUROC

    torch.manual_seed(seed)
    aand = build_aand(args, texture_dir)
    if args.teacher == "gabor":
        structured_first_layer(aand.model.encoder.feature_extractor.conv1, seed)
    train = aand.pre_processor.transform(data["train"])
    test = aand.pre_processor.transform(data["test"])
    calibrate(aand.model.encoder, train, args.batch)
    mean, std = aand._normalisation(train)  # noqa: SLF001
    torch.manual_seed(seed + 5)
    feats, labs = [[] for _ in range(3)], [[] for _ in range(3)]
    with torch.no_grad():
        for _ in range(2):
            augmented, mask, _ = aand.synthesizer((train * std + mean).clamp(0, 1))
            for k, v in enumerate(aand.model.teacher_features((augmented - mean) / std)):
                feats[k].append(v.permute(0, 2, 3, 1).reshape(-1, v.shape[1]))
                labs[k].append(aand.level_labels(mask, tuple(v.shape[-2:])).reshape(-1))
        real = aand.model.teacher_features(test)
    row = {"model": "linear probe", "seed": seed, "teacher": args.teacher, "size": args.size}
    for k in range(3):
        x, y = torch.cat(feats[k]), torch.cat(labs[k]).float()
        mu, sd = x.mean(0), x.std(0) + 1e-6
        x = (x - mu) / sd
        half = len(x) // 2
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.05)
        pos = y[:half].mean().clamp_min(1e-6)
        for _ in range(300):
            loss = F.binary_cross_entropy_with_logits(x[:half] @ w + b, y[:half], pos_weight=(1 - pos) / pos)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            auroc = _AUROC()
            auroc.update(x[half:] @ w + b, y[half:].int())
            row[f"probe_synthetic_auroc_l{k + 1}"] = float(auroc.compute())
            v = real[k]
            lab = aand.level_labels(data["mask"].float().unsqueeze(1), tuple(v.shape[-2:])).reshape(-1)
            score = ((v.permute(0, 2, 3, 1).reshape(-1, v.shape[1]) - mu) / sd) @ w + b
            auroc = _AUROC()
            auroc.update(score, lab.int())
            row[f"probe_real_auroc_l{k + 1}"] = float(auroc.compute())
            row[f"positive_rate_l{k + 1}"] = float(y.mean())
    with (out / "probe.jsonl").open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def summarise(rows: list[dict], path: Path) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["| model | seeds | image AUROC | pixel AUROC | AUPRO | map mortar/brick (normal) |", "|---|---|---|---|---|---|"]
    for name in models:
        sel = [r for r in rows if r["model"] == name]

        def ms(key: str) -> str:
            v = np.array([r[key] for r in sel], dtype=float)
            return f"{v.mean():.3f} ± {v.std():.3f}"

        lines.append(f"| {name} | {len(sel)} | {ms('image_auroc')} | {ms('pixel_auroc')} | {ms('aupro')} | {ms('mortar_over_brick')} |")
    per_level = ["gate_fpr", "gate_fpr_mortar", "gate_fpr_brick", "gate_tpr", "residual_ratio",
                 "energy_mortar_over_brick", "raw_ratio", "shift_normal", "shift_anomalous", "energy_over_feat_normal", "map_share",
                 "level_pixel_auroc", "normal_err"]
    lines += ["", "| model | quantity | l1 | l2 | l3 |", "|---|---|---|---|---|"]
    for name in models:
        sel = [r for r in rows if r["model"] == name]
        for q in per_level:
            if f"{q}_l1" not in sel[0]:
                continue
            cells = []
            for k in (1, 2, 3):
                v = np.array([r[f"{q}_l{k}"] for r in sel], dtype=float)
                cells.append(f"{np.nanmean(v):.3g}")
            lines.append(f"| {name} | {q} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--n-train", type=int, default=32)
    p.add_argument("--n-test-good", type=int, default=8)
    p.add_argument("--n-test-per-defect", type=int, default=4)
    p.add_argument("--defects", nargs="+", default=list(DEFAULT_DEFECTS))
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rd-epochs", type=int, default=20)
    p.add_argument("--aand-stages", type=int, nargs=2, default=[10, 20])
    p.add_argument("--models", nargs="+", default=["RD", "AAND", "AAND stage1=0"])
    p.add_argument("--teacher", choices=["random", "gabor"], default="random",
                   help="random: random-init resnet18 (BN calibrated); gabor: same, first conv = fixed Gabor bank")
    p.add_argument("--no-textures", action="store_true", help="AAND synthesis without the texture folder")
    p.add_argument("--probe", action="store_true", help="only the linear probe of pseudo-anomalies per level")
    p.add_argument("--curve", type=int, nargs="+", default=None,
                   help="only stage 1: report the gate after these cumulative numbers of steps")
    p.add_argument("--results-csv", type=Path, default=None,
                   help="append the per-seed rows (run, model, seed, image/pixel AUROC, AUPRO, gate TPR/FPR) to this CSV")
    return p.parse_args(argv)


#: the per-seed columns that ``--results-csv`` appends (the docs' tables are computed from them)
RESULT_COLUMNS = ["run", "teacher", "rd_epochs", "aand_stage1_epochs", "aand_stage2_epochs", "model", "seed",
                  "image_auroc", "pixel_auroc", "aupro", *(f"gate_{q}_l{k}" for q in ("tpr", "fpr") for k in (1, 2, 3)),
                  "code"]  # fmt: skip


def append_results(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    """Append the per-seed rows to ``path`` (header written once), with the run's teacher and schedule."""
    import pandas as pd

    stage1, stage2 = args.aand_stages
    frame = pd.DataFrame(rows).assign(
        run=f"{args.teacher} proxy, RD {args.rd_epochs}, AAND {stage1} + {stage2}",
        rd_epochs=args.rd_epochs, aand_stage1_epochs=stage1, aand_stage2_epochs=stage2,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.reindex(columns=RESULT_COLUMNS).to_csv(path, mode="a", header=not path.exists(), index=False, float_format="%.4f")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data_root = out / "data"
    make_mvtec_like_dataset(
        data_root, category="brick", product="brick", image_size=args.size, n_train=args.n_train,
        n_test_good=args.n_test_good, n_test_per_defect=args.n_test_per_defect, defects=tuple(args.defects),
        seed=args.data_seed,
    )
    texture_dir = None if args.no_textures else make_texture_folder(out / "textures", n_classes=5, size=args.size)
    data = load_dataset(data_root, "brick")
    data["mortar"] = mortar_mask(data["test"])
    (out / "command.txt").write_text(" ".join(sys.argv) + "\n")
    snapshot = out / "anomalib_aand_snapshot"  # the AAND code this run imported (it is edited concurrently)
    for path in sorted((ROOT / "anomalib_aand").rglob("*.py")):
        target = snapshot / path.relative_to(ROOT / "anomalib_aand")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    rows = []
    if args.probe:
        for seed in args.seeds:
            linear_probe(seed, args, data, texture_dir, out)
        return 0
    if args.curve:
        for seed in args.seeds:
            gate_curve(seed, args, data, texture_dir, out)
        return 0
    for seed in args.seeds:
        rows += run_seed(seed, args, data, texture_dir, out)
    print(summarise(rows, out / "summary.md"))
    if args.results_csv is not None:
        append_results(rows, args, args.results_csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
