"""Proxy teacher for machines without ImageNet weights: BatchNorm statistics calibrated on the data.

A random-init teacher whose BatchNorm running statistics are re-estimated on the *training* images produces
features that are normalised like a trained network's (no weight is learned; nothing is ImageNet). It is an
honest stand-in for experiments about the methods on a machine that cannot download weights; every number
obtained with it must be called a *proxy* result, never an ImageNet one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


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


__all__ = ["calibrate_batchnorm"]
