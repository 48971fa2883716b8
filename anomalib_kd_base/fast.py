"""Opt-in fast inference path shared by the two models.

``fast_inference=True`` runs the eval-mode networks under ``torch.autocast`` (float16 on CUDA, bfloat16 on CPU) with
channels-last weights; the anomaly-map head stays float32 (``1 - cos`` of two nearly equal feature vectors is a small
difference that half precision would quantise away). Training and exports always see the float32 graph.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _exporting() -> bool:
    if (is_exporting := getattr(getattr(torch, "compiler", None), "is_exporting", None)) is not None and is_exporting():
        return True
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


def fast_dtype(device: torch.device) -> torch.dtype:
    """Autocast dtype of the fast path on ``device``: float16 on CUDA, bfloat16 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def inference_autocast(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the fast path, or a no-op when disabled or while exporting."""
    if not enabled or _exporting():
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=fast_dtype(device))


def set_channels_last(module: nn.Module, enabled: bool) -> None:
    """Convolution weights in channels-last (NHWC) layout for the fast path, back to contiguous otherwise."""
    module.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
