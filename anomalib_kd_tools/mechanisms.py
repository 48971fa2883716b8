"""Mechanism figures of a trained AAND or MemKD model: what the benchmark's ablation and the docs' diagnoses measure.

* :func:`mechanism_report` - the ablation's figures on a test loader (``anomalib-kd-benchmark quality --ablation``):
  :func:`aand_mechanism_report` (the Fig. 8 residual energy ratio per level, the gate's false-positive rate, each
  level's share of the map) or :func:`memkd_mechanism_report` (the addressing figures of each memory);
  :func:`has_mechanism_report` says whether a model (class) has figures.
* :func:`aand_residual_intensity` - the Fig. 8 quantity on synthetic anomalies and how far ``L_A`` pushes the
  anomalous features from the normal ones (the integration test of AAND's stage 1);
  :func:`aand_amplification_modes` - exact vs subsampled ``L_A`` on the same features (``anomalib-kd-benchmark
  speed``).

Why here, in the tools layer, and not methods of ``Aand`` / ``MemKD``: these are measurements *about* a model,
written for the benchmark, the tests and the docs. No training, inference or export path calls them and a user of
the detectors gets anomaly maps and scores, not these figures; each needs only what the models offer anyway (the
torch network's feature methods, ``pre_processor``, ``synthesizer``, ``level_labels``, the memories'
``addressing_statistics``), so they take the model as their argument and the model classes carry no benchmark code.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812


def _report_of(model_class: type) -> Callable[[Any, Iterable[Any]], dict[str, float]] | None:
    from anomalib_aand import Aand
    from anomalib_memkd import MemKD

    if issubclass(model_class, Aand):
        return aand_mechanism_report
    if issubclass(model_class, MemKD):
        return memkd_mechanism_report
    return None


def has_mechanism_report(model: Any) -> bool:  # noqa: ANN401
    """Whether :func:`mechanism_report` has figures for ``model`` (an instance or a class)."""
    return _report_of(model if isinstance(model, type) else type(model)) is not None


def mechanism_report(model: Any, dataloader: Iterable[Any]) -> dict[str, float]:  # noqa: ANN401
    """The mechanism figures of an ``Aand`` or ``MemKD`` model on ``dataloader`` (raw anomalib batches)."""
    report = _report_of(type(model))
    if report is None:
        msg = f"no mechanism report for {type(model).__name__} (Aand and MemKD have one)"
        raise TypeError(msg)
    return report(model, dataloader)


@torch.no_grad()
def aand_residual_intensity(model: Any, images: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: ANN401
    """Fig. 8 quantity on synthetic anomalies, and what ``L_A`` does to the anomalous features, per level.

    Synthesises anomalies on ``images`` (normalised, like ``batch.image``) with the ``Aand`` model's synthesizer and
    returns ``(K,)`` tensors:

    * ``"anomalous"`` / ``"normal"``: ``1/(N C) sum_i sum_j (w^a Delta)_ij^2`` over that level's anomalous /
      normal patches of the residual *as used* at inference (gated by the predicted gate, Eq. 1);
    * ``"similarity_drop"``: mean ``s(F_T^a, F_T^n) - s(F_A^a, F_T^n)`` over all (anomalous, normal) patch pairs
      with ``F_A^a = F_T^a + Delta^a`` (the ground-truth-gated residual of Eq. 6, the one ``L_A`` trains): how
      far the generator pushes anomalous features away from the normal ones. It stays at its initial value
      when ``L_A`` does not reach the generator.
    """
    mean, std = model._normalisation(images)  # noqa: SLF001 - the pre-processor's statistics, as stage 1 uses them
    augmented, mask, _ = model.synthesizer((images * std + mean).clamp(0, 1))
    vanilla = model.model.teacher_features((augmented - mean) / std)
    _, gates, _, residuals = model.model.amplify(vanilla)
    anomalous, normal, drop = [], [], []
    for features, gate, residual in zip(vanilla, gates, residuals, strict=True):
        labels = model.level_labels(mask, tuple(residual.shape[-2:]))
        energy = ((gate * residual) ** 2).mean(dim=1, keepdim=True)
        nan = energy.new_tensor(float("nan"))
        anomalous.append(energy[labels].mean() if labels.any() else nan)
        normal.append(energy[~labels].mean())
        rows = labels[:, 0]
        vanilla_a = F.normalize(features.permute(0, 2, 3, 1)[rows], dim=1)
        advanced_a = F.normalize((features + residual).permute(0, 2, 3, 1)[rows], dim=1)
        vanilla_n = F.normalize(features.permute(0, 2, 3, 1)[~rows], dim=1)
        if rows.any() and (~rows).any():
            drop.append((vanilla_a @ vanilla_n.t()).mean() - (advanced_a @ vanilla_n.t()).mean())
        else:
            drop.append(nan)
    return {"anomalous": torch.stack(anomalous), "normal": torch.stack(normal), "similarity_drop": torch.stack(drop)}


@torch.no_grad()
def aand_amplification_modes(model: Any, images: torch.Tensor, draws: int = 5) -> dict[str, float]:  # noqa: ANN401
    """Exact vs subsampled ``L_A`` (``draws`` draws) on one synthetic batch of ``images`` (normalised)."""
    from anomalib_aand.loss import amplification_loss

    mean, std = model._normalisation(images)  # noqa: SLF001
    augmented, mask, _ = model.synthesizer((images * std + mean).clamp(0, 1))
    vanilla = model.model.teacher_features((augmented - mean) / std)
    anomalous = [model.level_labels(mask, tuple(f.shape[-2:])) for f in vanilla]
    advanced = model.model.amplify(vanilla, [a.to(vanilla[0].dtype) for a in anomalous])[0]
    margin = model.amplification_loss.margin

    def total(mode: str) -> float:
        levels = zip(advanced, vanilla, anomalous, strict=True)
        return float(sum(amplification_loss(ad, va, an, ~an, margin, mode) for ad, va, an in levels))

    exact = total("exact")
    subsampled = [total("subsample") for _ in range(draws)]
    return {
        "l_a_exact": exact,
        "l_a_subsample_mean": statistics.mean(subsampled),
        "l_a_subsample_std": statistics.pstdev(subsampled),
        "anomalous_patches": int(sum(int(a.sum()) for a in anomalous)),
    }


@torch.no_grad()
def aand_mechanism_report(model: Any, dataloader: Iterable[Any]) -> dict[str, float]:  # noqa: ANN401
    """Mechanism figures of an ``Aand`` model on real test defects (the benchmark's ablation; keys per ``INTERFACES``).

    ``dataloader`` yields raw anomalib ``ImageBatch``es (not pre-processed); each batch is pre-processed here
    like anomalib's ``PreProcessor`` callback does. Per level ``k`` (1-3), with the gt mask pooled to the level
    by ``model.level_labels``:

    * ``residual_ratio_l{k}``: mean ``|w^a * Delta|^2`` (per position, mean over channels) on anomalous positions
      divided by the same on normal positions (all positions not labelled anomalous) - the Fig. 8 quantity on
      real defects; ``residual_energy_anomalous_l{k}`` / ``residual_energy_normal_l{k}`` are its two terms;
    * ``delta_ratio_l{k}``: the same ratio for the ungated residual ``|Delta|^2`` (what the generator alone does);
    * ``gate_fpr_l{k}``: share of the positions of normal images with ``w^a > 0.5``;
    * ``map_share_l{k}``: the level's share of the summed (up-sampled, un-smoothed) Eq. 14 map, mean over images.

    NaN where undefined (e.g. no anomalous position, or no normal image).
    """
    network = model.model
    levels = len(network.raa)
    energy_a, count_a = torch.zeros(levels, dtype=torch.float64), torch.zeros(levels, dtype=torch.float64)
    energy_n, count_n = torch.zeros(levels, dtype=torch.float64), torch.zeros(levels, dtype=torch.float64)
    delta_a, delta_n = torch.zeros(levels, dtype=torch.float64), torch.zeros(levels, dtype=torch.float64)
    gate_fp, gate_total = torch.zeros(levels, dtype=torch.float64), torch.zeros(levels, dtype=torch.float64)
    share_sum, images_seen = torch.zeros(levels, dtype=torch.float64), 0
    for batch in dataloader:
        if batch.gt_mask is None:  # a batch of normal images only
            image = model.pre_processor.transform(batch.image)
            mask = torch.zeros(image.shape[0], *image.shape[-2:], dtype=torch.bool)
        else:
            image, mask = model.pre_processor.transform(batch.image, batch.gt_mask)
        image = image.to(model.device)
        mask = torch.as_tensor(mask).to(model.device)
        if mask.ndim == 4:  # noqa: PLR2004
            mask = mask[:, 0]
        mask = mask.float().unsqueeze(1)
        labels = batch.gt_label
        if labels is None:
            labels = mask.flatten(1).amax(dim=1) > 0
        normal_image = ~torch.as_tensor(labels).to(model.device).bool().flatten()
        vanilla = network.teacher_features(image)
        advanced, gates, _, residuals = network.amplify(vanilla)
        student = network.student_features(advanced)
        level_maps = []
        for k, (gate, residual) in enumerate(zip(gates, residuals, strict=True)):
            anomalous = model.level_labels(mask, tuple(residual.shape[-2:]))[:, 0]  # (B, h, w)
            gated = ((gate * residual) ** 2).mean(dim=1)
            raw = (residual**2).mean(dim=1)
            energy_a[k] += gated[anomalous].double().sum().cpu()
            energy_n[k] += gated[~anomalous].double().sum().cpu()
            delta_a[k] += raw[anomalous].double().sum().cpu()
            delta_n[k] += raw[~anomalous].double().sum().cpu()
            count_a[k] += anomalous.sum().cpu()
            count_n[k] += (~anomalous).sum().cpu()
            normal_gates = gate[:, 0][normal_image]
            gate_fp[k] += (normal_gates > 0.5).sum().cpu()  # noqa: PLR2004
            gate_total[k] += normal_gates.numel()
            distance = 1 - F.cosine_similarity(advanced[k].float(), student[k].float(), dim=1).unsqueeze(1)
            level_maps.append(
                F.interpolate(distance, size=tuple(image.shape[-2:]), mode="bilinear", align_corners=True)
                .flatten(1)
                .sum(dim=1),
            )
        level_sums = torch.stack(level_maps, dim=1).double()  # (B, K)
        share_sum += (level_sums / level_sums.sum(dim=1, keepdim=True).clamp_min(1e-12)).sum(dim=0).cpu()
        images_seen += int(image.shape[0])

    def ratio(num: torch.Tensor, den: torch.Tensor) -> list[float]:
        return [float(n / d) if d > 0 else float("nan") for n, d in zip(num.tolist(), den.tolist(), strict=True)]

    mean_a, mean_n = ratio(energy_a, count_a), ratio(energy_n, count_n)
    raw_a, raw_n = ratio(delta_a, count_a), ratio(delta_n, count_n)
    fpr = ratio(gate_fp, gate_total)
    report: dict[str, float] = {}
    for k in range(levels):
        level = k + 1
        report[f"residual_ratio_l{level}"] = mean_a[k] / mean_n[k] if mean_n[k] > 0 else float("nan")
        report[f"residual_energy_anomalous_l{level}"] = mean_a[k]
        report[f"residual_energy_normal_l{level}"] = mean_n[k]
        report[f"delta_ratio_l{level}"] = raw_a[k] / raw_n[k] if raw_n[k] > 0 else float("nan")
        report[f"gate_fpr_l{level}"] = fpr[k]
        report[f"map_share_l{level}"] = float(share_sum[k] / images_seen) if images_seen else float("nan")
    return report


@torch.no_grad()
def memkd_mechanism_report(model: Any, dataloader: Iterable[Any]) -> dict[str, float]:  # noqa: ANN401
    """Addressing figures of a ``MemKD`` model's three memories on ``dataloader`` (raw anomalib batches, e.g. the
    test loader).

    Each batch is pre-processed as anomalib's ``PreProcessor`` callback does
    (``model.pre_processor.transform(batch.image, batch.gt_mask)``) and run through the eval network up to the
    memory queries. Per memory ``m`` (teacher order, ``memories[m]`` serves ``layers[m]``), means over every
    position of every image:

    * ``peak_weight_m{m}``: the largest read weight (``1/L`` for uniform addressing, 1 for one-hot);
    * ``entropy_ratio_m{m}``: entropy of the read weights / ``log L`` (1 = uniform);
    * ``recall_dev_m{m}``: ``||F^R - mean_l(v_l)|| / ||F^R||`` (0 when the recall is the mean of the values
      whatever the query);
    * ``uniform_peak_m{m}``: ``1/L``, for reference; ``peak_over_uniform_m{m}``: ``peak_weight * L``.

    Returns ``{}`` for ``use_memory=False``.
    """
    network = model.model
    if not network.use_memory:
        return {}
    sums: dict[str, float] = {}
    positions = [0] * len(network.memories)
    transform = getattr(model.pre_processor, "transform", None) if model.pre_processor is not None else None
    was_training = network.training
    network.eval()
    try:
        for batch in dataloader:
            images = batch.image
            if transform is not None:
                mask = getattr(batch, "gt_mask", None)
                images = transform(images, mask)[0] if mask is not None else transform(images)
            queries = network.memory_queries(images.to(model.device))
            for index, (memory, query) in enumerate(zip(network.memories, queries, strict=True)):
                statistics = memory.addressing_statistics(query)
                for name, values in statistics.items():
                    key = f"{name}_m{index}"
                    sums[key] = sums.get(key, 0.0) + float(values.double().sum())
                positions[index] += statistics["peak"].numel()
    finally:
        network.train(was_training)
    report: dict[str, float] = {}
    for index, memory in enumerate(network.memories):
        count = positions[index]
        for name, out in (("peak", "peak_weight"), ("entropy_ratio", "entropy_ratio"), ("recall_dev", "recall_dev")):
            report[f"{out}_m{index}"] = sums.get(f"{name}_m{index}", math.nan) / count if count else math.nan
        report[f"uniform_peak_m{index}"] = 1.0 / memory.num_items
        report[f"peak_over_uniform_m{index}"] = report[f"peak_weight_m{index}"] * memory.num_items
    return report


__all__ = [
    "aand_amplification_modes",
    "aand_mechanism_report",
    "aand_residual_intensity",
    "has_mechanism_report",
    "mechanism_report",
    "memkd_mechanism_report",
]
