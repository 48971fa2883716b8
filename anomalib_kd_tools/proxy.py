"""Proxy teacher for machines without ImageNet weights: BatchNorm statistics calibrated on the data.

A random-init teacher whose BatchNorm running statistics are re-estimated on the *training* images produces
features that are normalised like a trained network's (no weight is learned; nothing is ImageNet). It is an
honest stand-in for experiments about the methods on a machine that cannot download weights; every number
obtained with it must be called a *proxy* result, never an ImageNet one.

* :func:`calibrate_batchnorm` - any network, any batches.
* :func:`teacher_network` / :func:`calibrate_proxy_teacher` - the frozen teacher of an anomalib module (Aand, MemKD,
  ReverseDistillation, Patchcore) calibrated on a dataset's training images, as ``anomalib-kd-benchmark quality
  --proxy-teacher`` does in each cell before fitting.
* :data:`PROXY_TEACHER` - the label every output of such a teacher carries.
"""

from __future__ import annotations

from collections.abc import Iterable

from typing import Any

import torch
from torch import nn

PROXY_TEACHER = "proxy teacher (random init, BN calibrated on training images)"


@torch.no_grad()
def calibrate_batchnorm(network: nn.Module, images: torch.Tensor | Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm running mean/var of ``network`` on ``images`` (cumulative average).

    Args:
        network: the teacher (e.g. ``model.model.encoder``; inside anomalib's ``TimmFeatureExtractor`` the timm network
            is calibrated); its weights are not changed.
        images: one pre-processed ``(B, 3, H, W)`` batch, or an iterable of such batches (e.g. training images).

    Returns:
        The number of images seen. The network is left in eval mode.
    """
    # anomalib's TimmFeatureExtractor switches a frozen network to eval mode in its forward, where BatchNorm collects
    # nothing: calibrate the timm network inside it instead
    inner = getattr(network, "feature_extractor", None)
    if isinstance(inner, nn.Module):
        network = inner
    batchnorms = [module for module in network.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    saved = [module.momentum for module in batchnorms]
    for module in batchnorms:
        module.reset_running_stats()
        module.momentum = None  # cumulative moving average over all calibration batches
    network.train()
    seen = 0
    try:
        for batch in [images] if isinstance(images, torch.Tensor) else images:
            network(batch)
            seen += int(batch.shape[0])
    finally:
        for module, momentum in zip(batchnorms, saved, strict=True):
            module.momentum = momentum
        network.eval()
    if seen == 0:
        msg = "calibrate_batchnorm needs at least one image"
        raise ValueError(msg)
    if any(int(module.num_batches_tracked) == 0 for module in batchnorms if module.track_running_stats):
        msg = f"calibrate_batchnorm: the forward of {type(network).__name__} left BatchNorm layers in eval mode"
        raise RuntimeError(msg)
    return seen


def teacher_network(model: Any) -> nn.Module:  # noqa: ANN401
    """The frozen teacher network of an anomalib module: Aand / MemKD / RD ``model.encoder``, Patchcore
    ``model.feature_extractor``; inside anomalib's ``TimmFeatureExtractor`` the timm network itself, because the
    extractor's ``forward`` switches a frozen network to eval mode, where BatchNorm would not collect statistics."""
    torch_model = model.model
    teacher = getattr(torch_model, "encoder", None)
    if teacher is None:
        teacher = getattr(torch_model, "feature_extractor", None)
    if not isinstance(teacher, nn.Module):
        msg = f"{type(model).__name__}: no teacher found (model.encoder / model.feature_extractor)"
        raise TypeError(msg)
    inner = getattr(teacher, "feature_extractor", None)
    return inner if isinstance(inner, nn.Module) else teacher


def calibrate_proxy_teacher(model: Any, dataset: Any, batch_size: int) -> int:  # noqa: ANN401
    """BatchNorm statistics of the teacher re-estimated on all training images, pre-processed like training
    batches (``model.pre_processor.transform``). Reads the dataset in index order without a DataLoader, so the
    seeded random streams of the fit are not consumed. Returns the number of images."""

    def batches():  # noqa: ANN202
        for start in range(0, len(dataset), batch_size):
            images = torch.stack([dataset[i].image for i in range(start, min(start + batch_size, len(dataset)))])
            images = images.float()
            if images.shape[1] == 1:
                images = images.expand(-1, 3, -1, -1)
            yield model.pre_processor.transform(images[:, :3])

    return calibrate_batchnorm(teacher_network(model), batches())


__all__ = ["PROXY_TEACHER", "calibrate_batchnorm", "calibrate_proxy_teacher", "teacher_network"]
