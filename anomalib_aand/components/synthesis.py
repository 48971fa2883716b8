"""On-the-fly anomaly synthesis for AAND stage 1 (paper Sec. III-B, "Anomaly synthesis").

Perlin-noise masks and perturbations come from anomalib's :class:`PerlinAnomalyGenerator`
(scales ``2^0..2^5``, rotation +-90 deg, threshold 0.5, DRAEM-style augmenters, an optional texture
folder such as DTD). AAND additionally restricts each anomaly to the foreground of the product:
the pseudo-anomaly mask is the intersection of the Perlin mask and a foreground mask obtained by
grey-level thresholding. The foreground strategy is configurable:

* ``"none"`` (default, safe for every category and for textures): the whole image is foreground;
* ``"bright"``: foreground = blurred grey level above the threshold (object brighter than background);
* ``"dark"``: foreground = blurred grey level below the threshold.

The threshold is Otsu's, per image, unless a fixed value in ``[0, 1]`` is given.

Everything runs on the batch's device. Images are expected in ``[0, 1]``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from torch import nn
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import functional as TF  # noqa: N812

FOREGROUND_STRATEGIES = ("none", "bright", "dark")


def otsu_threshold(gray: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu's threshold of each image in ``gray`` (``(B, H, W)`` in ``[0, 1]``); returns ``(B,)``."""
    batch = gray.shape[0]
    index = (gray.clamp(0, 1) * (bins - 1)).round().long().reshape(batch, -1)
    hist = torch.zeros(batch, bins, device=gray.device, dtype=torch.float64)
    hist.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float64))
    prob = hist / hist.sum(dim=1, keepdim=True)
    levels = torch.arange(bins, device=gray.device, dtype=torch.float64)
    omega = prob.cumsum(dim=1)  # weight of the class "<= t"
    mu = (prob * levels).cumsum(dim=1)
    mu_total = mu[:, -1:]
    between = (mu_total * omega - mu) ** 2 / (omega * (1 - omega)).clamp_min(1e-12)
    return (between.argmax(dim=1).to(gray.dtype) + 0.5) / (bins - 1)


def foreground_mask(
    images: torch.Tensor,
    strategy: str = "none",
    threshold: float | None = None,
    blur_sigma: float = 2.0,
) -> torch.Tensor:
    """Binary foreground mask ``(B, 1, H, W)`` of images in ``[0, 1]`` (see module docstring)."""
    if strategy not in FOREGROUND_STRATEGIES:
        msg = f"foreground strategy must be one of {FOREGROUND_STRATEGIES}, got {strategy!r}"
        raise ValueError(msg)
    batch, _, height, width = images.shape
    if strategy == "none":
        return torch.ones(batch, 1, height, width, device=images.device, dtype=images.dtype)
    gray = TF.rgb_to_grayscale(images) if images.shape[1] == 3 else images[:, :1]
    kernel = 2 * int(3 * blur_sigma + 0.5) + 1
    gray = TF.gaussian_blur(gray, kernel_size=[kernel, kernel], sigma=[blur_sigma, blur_sigma])
    if threshold is None:
        thr = otsu_threshold(gray[:, 0]).view(batch, 1, 1, 1)
    else:
        thr = torch.full((batch, 1, 1, 1), float(threshold), device=images.device, dtype=images.dtype)
    mask = gray > thr if strategy == "bright" else gray < thr
    return mask.to(images.dtype)


class AnomalySynthesizer(nn.Module):
    """Perlin anomalies restricted to the foreground.

    Args:
        anomaly_source_path: optional folder of texture images (e.g. DTD) used as anomaly content;
            ``None`` uses anomalib's Perlin-noise texture. A folder without images is an error.
        probability: probability that an image receives an anomaly (the rest stay clean).
        blend_range: range of the perturbation's opacity ``1 - beta`` inside the mask (``beta`` is
            the weight of the original image, drawn in ``[0, 0.8)`` by default).
        foreground: foreground strategy, see :func:`foreground_mask`.
        foreground_threshold: fixed grey-level threshold in ``[0, 1]``; ``None`` = Otsu per image.
        max_attempts: redraws of an empty mask (e.g. Perlin blob entirely in the background).
    """

    def __init__(
        self,
        anomaly_source_path: str | Path | None = None,
        probability: float = 0.8,
        blend_range: tuple[float, float] = (0.2, 1.0),
        foreground: str = "none",
        foreground_threshold: float | None = None,
        max_attempts: int = 10,
    ) -> None:
        super().__init__()
        if not 0.0 <= probability <= 1.0:
            msg = f"anomaly_probability must be in [0, 1], got {probability}"
            raise ValueError(msg)
        if foreground not in FOREGROUND_STRATEGIES:
            msg = f"foreground must be one of {FOREGROUND_STRATEGIES}, got {foreground!r}"
            raise ValueError(msg)
        if foreground_threshold is not None and not 0.0 <= foreground_threshold <= 1.0:
            msg = f"foreground_threshold must be in [0, 1] or None, got {foreground_threshold}"
            raise ValueError(msg)
        low, high = blend_range
        if not 0.0 <= low <= high <= 1.0:
            msg = f"blend_range must satisfy 0 <= low <= high <= 1, got {blend_range}"
            raise ValueError(msg)
        if anomaly_source_path is not None:
            source = Path(anomaly_source_path)
            if not source.is_dir():
                msg = f"anomaly_source_path {str(source)!r} is not a directory"
                raise ValueError(msg)
            if not any(path.suffix.lower() in IMG_EXTENSIONS for path in source.rglob("*") if path.is_file()):
                msg = (
                    f"anomaly_source_path {str(source)!r} contains no images "
                    f"(looked for {', '.join(IMG_EXTENSIONS)}); give a texture folder such as DTD or None"
                )
                raise ValueError(msg)
        self.probability = probability
        self.blend_range = (float(low), float(high))
        self.foreground = foreground
        self.foreground_threshold = foreground_threshold
        self.max_attempts = max_attempts
        self.generator = PerlinAnomalyGenerator(
            anomaly_source_path=anomaly_source_path,
            probability=1.0,
            blend_factor=self.blend_range,
            rotation_range=(-90, 90),
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(augmented, anomaly_mask, foreground)``; masks are ``(B, 1, H, W)`` in {0, 1}."""
        batch, _, height, width = images.shape
        device = images.device
        foreground = foreground_mask(images, self.foreground, self.foreground_threshold)
        augmented = images.clone()
        masks = torch.zeros(batch, 1, height, width, device=device, dtype=images.dtype)
        sources = self.generator.anomaly_source_paths
        for i in range(batch):
            if torch.rand(1).item() >= self.probability:
                continue
            for _ in range(self.max_attempts):
                source = sources[int(torch.randint(len(sources), (1,)).item())] if sources else None
                perturbation, mask = self.generator.generate_perturbation(height, width, device, source)
                mask = mask.permute(2, 0, 1).to(images.dtype) * foreground[i]  # Perlin mask ∩ foreground
                if mask.any():
                    break
            else:
                continue  # no anomaly could be placed on this image's foreground: keep it clean
            perturbation = perturbation.permute(2, 0, 1).to(images.dtype)
            low, high = self.blend_range
            opacity = low + (high - low) * torch.rand(1, device=device, dtype=images.dtype)
            augmented[i] = images[i] * (1 - mask) + mask * (opacity * perturbation + (1 - opacity) * images[i])
            masks[i] = mask
        return augmented.clamp(0, 1), masks, foreground
