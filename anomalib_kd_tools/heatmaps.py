"""Side-by-side heat maps: the same test images, their ground truth, and each model's anomaly map.

:func:`draw_side_by_side` writes one PNG whose rows are test images and whose columns are the image, its
ground-truth mask, and one column per model. Each row has **one colour scale** shared by all the models' maps of
that image (the row's minimum and maximum over the models), so a reader compares where, and how strongly, each model
responds to the same defect. The maps should be comparable quantities; the benchmark passes anomalib's
post-processed maps, which every model normalises the same way (its validation threshold maps to 0.5), not the raw
distances, whose units differ between PatchCore and the distillation models.

matplotlib (anomalib's own dependency, Agg backend) draws it; nothing here is model code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def row_scales(maps: Mapping[str, Sequence[np.ndarray]]) -> list[tuple[float, float]]:
    """``(low, high)`` of each row: the minimum and maximum over every model's map of that image."""
    rows = len(next(iter(maps.values())))
    scales = []
    for row in range(rows):
        low = min(float(np.min(per_model[row])) for per_model in maps.values())
        high = max(float(np.max(per_model[row])) for per_model in maps.values())
        scales.append((low, high if high > low else low + 1e-6))
    return scales


def draw_side_by_side(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    maps: Mapping[str, Sequence[np.ndarray]],
    path: str | Path,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write the grid PNG to ``path`` and return it.

    Args:
        images: ``N`` images, ``(H, W, 3)`` (or ``(H, W)``) in ``[0, 1]``.
        masks: their ``N`` ground-truth masks ``(H, W)`` (any size; shown as they are).
        maps: model name -> its ``N`` anomaly maps ``(h, w)``, in column order; each row gets one colour scale.
        path: the PNG to write (parent folders are created).
        row_labels: one label per row (e.g. ``"brick / foreign"``), shown on the left.
        title: a caption above the grid.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(images)
    if count == 0 or len(masks) != count or any(len(per_model) != count for per_model in maps.values()):
        msg = f"need the same number (> 0) of images, masks and maps per model, got {len(images)}, {len(masks)}, " + str(
            {name: len(per_model) for name, per_model in maps.items()}
        )
        raise ValueError(msg)
    names = list(maps)
    columns = 2 + len(names)
    fig, axes = plt.subplots(count, columns, figsize=(1.9 * columns, 1.9 * count + (0.5 if title else 0.2)),
                             squeeze=False)  # fmt: skip
    for row, (low, high) in enumerate(row_scales(maps)):
        stack = [np.asarray(maps[name][row], dtype=np.float32) for name in names]
        panels = [(np.clip(images[row], 0, 1), "image", {}), (np.asarray(masks[row], dtype=np.float32), "ground truth",
                  {"cmap": "gray", "vmin": 0, "vmax": 1})]  # fmt: skip
        panels += [(m, name, {"cmap": "jet", "vmin": low, "vmax": high}) for name, m in zip(names, stack, strict=True)]
        for col, (data, header, style) in enumerate(panels):
            axis = axes[row][col]
            image = axis.imshow(data, **style)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(header, fontsize=9)
            if col == 0 and row_labels is not None:
                axis.set_ylabel(row_labels[row], fontsize=8)
        fig.colorbar(image, ax=list(axes[row][2:]), fraction=0.02, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


__all__ = ["draw_side_by_side", "row_scales"]
