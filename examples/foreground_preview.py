"""Preview AAND's foreground mask on your own images before training.

AAND places its synthetic anomalies inside ``Perlin mask ∩ foreground`` (paper Sec. III-B). With
``foreground="auto"`` (the default) the foreground strategy comes from the datamodule's category name; this
script shows, for a folder of images, exactly the mask the model would use (same resize, blur and threshold),
drawn over the images with anomalib's visualisation helpers, so you can check a preset or choose
``--model.foreground`` / ``--model.foreground_threshold`` for a category without one::

    python examples/foreground_preview.py --images ./datasets/MVTecAD/screw/train/good --category screw
    python examples/foreground_preview.py --images my_parts/ --strategy bright --threshold 0.2 --out parts.png
    python examples/foreground_preview.py            # offline: on a generated MVTec-like folder

The foreground is filled in green; the title of each tile gives the strategy, the threshold and the share of the
image that is foreground. A good mask covers the whole product and as little background as possible; when in
doubt, ``--strategy none`` (whole image) is the safe choice.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from anomalib.visualization.image.functional import (
    add_text_to_image,
    create_image_grid,
    overlay_images,
    visualize_image,
    visualize_mask,
)
from PIL import Image
from torchvision.transforms.v2 import functional as TF  # noqa: N812

from anomalib_aand.components.synthesis import FOREGROUND_STRATEGIES, foreground_mask, foreground_preset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def load_images(folder: Path, count: int, size: int) -> tuple[list[Path], torch.Tensor]:
    """The first ``count`` images of ``folder`` (sorted), resized like AAND's pre-processor, in [0, 1]."""
    paths = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not paths:
        msg = f"no images in {folder}"
        raise SystemExit(msg)
    tensors = [
        TF.resize(TF.to_image(Image.open(path).convert("RGB")), [size, size], antialias=True) for path in paths
    ]
    return paths, TF.to_dtype(torch.stack(tensors), torch.float32, scale=True)


def preview(images: torch.Tensor, strategy: str, threshold: float | None, title: str) -> Image.Image:
    """One tile per image: the image with the foreground filled in green (anomalib helpers only)."""
    masks = foreground_mask(images, strategy, threshold)
    tiles = []
    for image, mask in zip(images, masks, strict=True):
        base = visualize_image(image)
        fill = visualize_mask(mask[0], mode="fill", color=(0, 255, 0), alpha=0.4)
        contour = visualize_mask(mask[0], mode="contour", color=(255, 255, 0))
        tile = overlay_images(base, [fill, contour], alpha=[1.0, 1.0]).convert("RGB")
        share = float(mask.mean())
        tiles.append(add_text_to_image(tile, f"{title}  fg {share:.0%}", size=max(10, image.shape[-1] // 20)))
    return create_image_grid(tiles, nrow=min(4, len(tiles)))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="folder of images (default: a generated MVTec-like folder)")
    parser.add_argument("--category", default=None, help="category name for foreground='auto' (e.g. screw)")
    parser.add_argument("--strategy", choices=FOREGROUND_STRATEGIES, help="explicit strategy instead of a preset")
    parser.add_argument("--threshold", type=float, default=None, help="grey-level threshold in [0, 1]")
    parser.add_argument("--size", type=int, default=256, help="pre-processed image size (AAND: 256)")
    parser.add_argument("--count", type=int, default=8, help="number of images to show")
    parser.add_argument("--out", type=Path, default=Path("foreground_preview.png"), help="PNG to write")
    args = parser.parse_args(argv)

    if args.images is None:
        from anomalib_kd_tools.synthetic import make_mvtec_like_dataset

        with tempfile.TemporaryDirectory(prefix="aand_fg_") as tmp:
            make_mvtec_like_dataset(tmp, category="widget", image_size=args.size, n_train=args.count)
            _, images = load_images(Path(tmp) / "widget" / "train" / "good", args.count, args.size)
        source = "a generated MVTec-like folder"
        if args.strategy is None and args.category is None:
            args.strategy = "bright"  # the generated product is a disc on a darker background
    else:
        _, images = load_images(args.images, args.count, args.size)
        source = str(args.images)
    if args.strategy is not None:
        strategy, threshold = args.strategy, args.threshold
        title = f"{strategy} {'Otsu' if threshold is None else f'{threshold:.3f}'}"
    else:
        strategy, threshold, known = foreground_preset(args.category)
        threshold = args.threshold if args.threshold is not None and strategy in {"bright", "dark"} else threshold
        title = f"auto:{args.category}{'' if known else ' (no preset)'} -> {strategy}"
        if threshold is not None:
            title += f" {threshold * 255:.0f}/255"
    grid = preview(images, strategy, threshold, title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out} ({len(images)} images from {source})")  # noqa: T201
    return args.out


if __name__ == "__main__":
    main()
