"""On-the-fly anomaly synthesis for AAND stage 1 (paper Sec. III-B, "Anomaly synthesis").

Perlin-noise masks and perturbations come from anomalib's :class:`PerlinAnomalyGenerator`
(scales ``2^0..2^5``, rotation +-90 deg, threshold 0.5, DRAEM-style augmenters, an optional texture
folder such as DTD). AAND additionally restricts each anomaly to the foreground of the product:
the pseudo-anomaly mask is the intersection of the Perlin mask and a foreground mask obtained by
grey-level thresholding. The foreground strategies (:func:`foreground_mask`):

* ``"none"``: the whole image is foreground (textures, and any category without a preset);
* ``"bright"``: foreground = blurred grey level above the threshold (object brighter than background);
* ``"dark"``: foreground = blurred grey level below the threshold (the "inverted" binary threshold);
* ``"disk"``: a centred disk of radius ``DISK_RADIUS`` x H (round products photographed from above).

The grey level is blurred before thresholding with a Gaussian of ``FOREGROUND_BLUR_SIGMA`` = 8 px, the public
reference implementation's sigma at its 256 px (kernel ``2 * round(3 sigma) + 1`` = 49 px), which closes pin-holes and
specular speckles in the mask. At another pre-processed size the sigma scales with the image height
(``8 * H / 256``), so the mask is smoothed over the same share of the product (a choice: the reference only runs at
256 px). The threshold is a fixed value in ``[0, 1]``, or Otsu's per image when ``None``.

``foreground="auto"`` (the model's default) picks the strategy and threshold per category name with
:func:`foreground_preset` from :data:`FOREGROUND_PRESETS`. All values are the public reference implementation's
(grayscale, Gaussian blur, binary threshold, per category):

* MVTec AD: the five textures (carpet, grid, leather, tile, wood) use the whole image; capsule, screw and zipper are
  thresholded *inverted* at 150/255 (``"dark"``); hazelnut, metal_nut, pill and toothbrush at 50/255 (``"bright"``:
  the products lie on a black background); bottle and cable are a centred disk of radius 0.45 H; transistor uses the
  whole image (its "misplaced" / "missing" defects lie on the board around the part, so no region may be excluded).
* VisA: candle, cashew, chewinggum, fryum, macaroni1, macaroni2 and pcb1 are ``"bright"`` above 150/255; pcb2, pcb3
  and pipe_fryum ``"bright"`` above 100/255; pcb4 ``"bright"`` above 50/255; capsules is the inverted threshold at
  100/255 (``"dark"``). Check your own images with ``examples/foreground_preview.py``.
* any other name: the whole image (the model logs a notice).

Everything runs on the batch's device. Images are expected in ``[0, 1]``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from torch import nn
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import functional as TF  # noqa: N812

FOREGROUND_STRATEGIES = ("none", "bright", "dark", "disk")
#: ``Aand(foreground="auto")`` resolves to one of :data:`FOREGROUND_STRATEGIES` with :func:`foreground_preset`
AUTO_FOREGROUND = "auto"
#: standard deviation (pixels of a 256 px image; scaled with the height) of the Gaussian blur before thresholding
FOREGROUND_BLUR_SIGMA = 8.0
#: image height at which :data:`FOREGROUND_BLUR_SIGMA` applies unscaled (the reference's input size)
FOREGROUND_BLUR_REFERENCE_SIZE = 256
#: radius of the ``"disk"`` strategy as a fraction of the image height
DISK_RADIUS = 0.45

MVTEC_AD_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip

_WHOLE = ("none", None)
_BRIGHT_50 = ("bright", 50 / 255)
_BRIGHT_100 = ("bright", 100 / 255)
_BRIGHT_150 = ("bright", 150 / 255)
_DARK_100 = ("dark", 100 / 255)
_DARK_150 = ("dark", 150 / 255)
_DISK = ("disk", None)
#: category name -> ``(strategy, threshold)``; see the module docstring for where each value comes from
FOREGROUND_PRESETS: dict[str, tuple[str, float | None]] = {
    # MVTec AD textures: the whole image
    "carpet": _WHOLE, "grid": _WHOLE, "leather": _WHOLE, "tile": _WHOLE, "wood": _WHOLE,
    # MVTec AD objects
    "capsule": _DARK_150, "screw": _DARK_150, "zipper": _DARK_150,
    "hazelnut": _BRIGHT_50, "metal_nut": _BRIGHT_50, "pill": _BRIGHT_50, "toothbrush": _BRIGHT_50,
    "bottle": _DISK, "cable": _DISK,
    "transistor": _WHOLE,
    # VisA
    "candle": _BRIGHT_150, "cashew": _BRIGHT_150, "chewinggum": _BRIGHT_150, "fryum": _BRIGHT_150,
    "macaroni1": _BRIGHT_150, "macaroni2": _BRIGHT_150, "pcb1": _BRIGHT_150,
    "pcb2": _BRIGHT_100, "pcb3": _BRIGHT_100, "pipe_fryum": _BRIGHT_100,
    "pcb4": _BRIGHT_50,
    "capsules": _DARK_100,
}  # fmt: skip


def foreground_preset(category: str | None) -> tuple[str, float | None, bool]:
    """``(strategy, threshold, known)`` of ``foreground="auto"`` for a datamodule category name.

    Unknown (or missing) names give the whole image with ``known=False`` (the caller logs a notice).
    """
    key = str(category).strip().lower() if category is not None else ""
    if key in FOREGROUND_PRESETS:
        strategy, threshold = FOREGROUND_PRESETS[key]
        return strategy, threshold, True
    return "none", None, False


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
    blur_sigma: float | None = None,
) -> torch.Tensor:
    """Binary foreground mask ``(B, 1, H, W)`` of images in ``[0, 1]`` (see module docstring).

    ``strategy="auto"`` is resolved by the model (per category); here it must be one of ``FOREGROUND_STRATEGIES``.
    ``blur_sigma`` in pixels of ``images``; ``None`` = :data:`FOREGROUND_BLUR_SIGMA` scaled to the image height.
    """
    if strategy not in FOREGROUND_STRATEGIES:
        msg = f"foreground strategy must be one of {FOREGROUND_STRATEGIES}, got {strategy!r}"
        raise ValueError(msg)
    batch, _, height, width = images.shape
    if strategy == "none":
        return torch.ones(batch, 1, height, width, device=images.device, dtype=images.dtype)
    if strategy == "disk":
        rows = torch.arange(height, device=images.device, dtype=images.dtype) - (height - 1) / 2
        cols = torch.arange(width, device=images.device, dtype=images.dtype) - (width - 1) / 2
        inside = rows.view(-1, 1) ** 2 + cols.view(1, -1) ** 2 <= (DISK_RADIUS * height) ** 2
        return inside.to(images.dtype).expand(batch, 1, height, width).clone()
    gray = TF.rgb_to_grayscale(images) if images.shape[1] == 3 else images[:, :1]
    if blur_sigma is None:
        blur_sigma = FOREGROUND_BLUR_SIGMA * height / FOREGROUND_BLUR_REFERENCE_SIZE
    kernel = 2 * int(3 * blur_sigma + 0.5) + 1
    gray = TF.gaussian_blur(gray, kernel_size=[kernel, kernel], sigma=[blur_sigma, blur_sigma])
    if threshold is None:
        thr = otsu_threshold(gray[:, 0]).view(batch, 1, 1, 1)
    else:
        thr = torch.full((batch, 1, 1, 1), float(threshold), device=images.device, dtype=images.dtype)
    mask = gray > thr if strategy == "bright" else gray < thr
    return mask.to(images.dtype)


def texture_folder_problem(anomaly_source_path: str | Path | None) -> str | None:
    """Why ``anomaly_source_path`` cannot serve as a texture folder (``None`` when it can, or when it is ``None``)."""
    if anomaly_source_path is None:
        return None
    source = Path(anomaly_source_path)
    if not source.is_dir():
        return (
            f"anomaly_source_path {str(source)!r} is not a directory (DTD: run `anomalib-kd-dtd --root ./datasets/dtd` "
            "and pass ./datasets/dtd/images)"
        )
    if not any(path.suffix.lower() in IMG_EXTENSIONS for path in source.rglob("*") if path.is_file()):
        return (
            f"anomaly_source_path {str(source)!r} contains no images "
            f"(looked for {', '.join(IMG_EXTENSIONS)}); give a texture folder such as DTD or None"
        )
    return None


class AnomalySynthesizer(nn.Module):
    """Perlin anomalies restricted to the foreground.

    Args:
        anomaly_source_path: optional folder of texture images (e.g. DTD) used as anomaly content;
            ``None`` uses anomalib's Perlin-noise texture. A folder without images is an error.
        probability: probability that an image receives an anomaly (the rest stay clean).
        blend_range: range of the perturbation's opacity ``1 - beta`` inside the mask (``beta`` is
            the weight of the original image, drawn in ``[0, 0.8)`` by default).
        foreground: foreground strategy, one of ``FOREGROUND_STRATEGIES`` (see :func:`foreground_mask`); the
            model resolves ``"auto"`` per category and calls :meth:`set_foreground`.
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
        low, high = blend_range
        if not 0.0 <= low <= high <= 1.0:
            msg = f"blend_range must satisfy 0 <= low <= high <= 1, got {blend_range}"
            raise ValueError(msg)
        problem = texture_folder_problem(anomaly_source_path)
        if problem is not None:
            raise ValueError(problem)
        self.probability = probability
        self.blend_range = (float(low), float(high))
        self.set_foreground(foreground, foreground_threshold)
        self.max_attempts = max_attempts
        self.generator = PerlinAnomalyGenerator(
            anomaly_source_path=anomaly_source_path,
            probability=1.0,
            blend_factor=self.blend_range,
            rotation_range=(-90, 90),
        )

    def set_foreground(self, strategy: str, threshold: float | None = None) -> None:
        """Set the foreground strategy and threshold (validated) used by the next batches."""
        if strategy not in FOREGROUND_STRATEGIES:
            msg = f"foreground must be one of {(*FOREGROUND_STRATEGIES, AUTO_FOREGROUND)}, got {strategy!r}"
            raise ValueError(msg)
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            msg = f"foreground_threshold must be in [0, 1] or None, got {threshold}"
            raise ValueError(msg)
        self.foreground = strategy
        self.foreground_threshold = threshold

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
