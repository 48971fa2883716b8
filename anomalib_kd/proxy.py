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
        network: the teacher (e.g. ``model.model.encoder``); its weights are not changed.
        images: one pre-processed ``(B, 3, H, W)`` batch, or an iterable of such batches (e.g. training images).

    Returns:
        The number of images seen. The network is left in eval mode.
    """
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
    return seen


__all__ = ["calibrate_batchnorm"]
