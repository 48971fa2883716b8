"""Generate a small MVTec-AD-layout dataset offline, for the demo, the tests and benchmarks.

The layout is the one anomalib's :class:`~anomalib.data.MVTecAD` datamodule reads::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png

A "product" is a textured disc (woven stripes + fine grain) on a plain background, with
random position jitter, stripe phase, brightness and colour variation, so the normal class
is not a single image. Defects are drawn on the product: ``scratch`` (thin bright or dark
line segments), ``stain`` (a soft blob of a foreign colour) and ``hole`` (a region where the
weave is replaced by flat background-like paint). Masks are exactly the painted pixels.

It is deliberately a generic, easy dataset: it proves that a pipeline trains, evaluates and
exports end to end. Numbers measured on it say nothing about MVTec AD or VisA.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DEFECT_TYPES = ("scratch", "stain", "hole")


@dataclass(frozen=True)
class SyntheticSpec:
    """What :func:`make_mvtec_like_dataset` writes."""

    category: str = "widget"
    image_size: int = 128
    n_train: int = 32
    n_test_good: int = 8
    n_test_per_defect: int = 4
    defects: tuple[str, ...] = DEFECT_TYPES
    mode: str = "RGB"  # "RGB", "L" (grayscale) or "RGBA"
    seed: int = 0


def _product(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return an ``(H, W, 3)`` float image in [0, 1] and the boolean product (foreground) mask."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    background = np.array([0.18, 0.18, 0.2], dtype=np.float32) + rng.normal(0, 0.01, 3).astype(np.float32)
    image = np.broadcast_to(background, (size, size, 3)).copy()

    cy, cx = 0.5 + rng.uniform(-0.04, 0.04, 2)
    radius = 0.36 + rng.uniform(-0.02, 0.02)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2

    angle = np.pi / 4 + rng.uniform(-0.08, 0.08)
    phase = rng.uniform(0, 2 * np.pi)
    freq = 22.0
    stripes = 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) * np.pi + phase)
    cross = 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * yy - np.sin(angle) * xx) * np.pi + phase / 2)
    weave = 0.55 * stripes + 0.45 * cross
    base = np.array([0.75, 0.6, 0.35], dtype=np.float32) * rng.uniform(0.92, 1.08)
    grain = rng.normal(0, 0.025, (size, size, 1)).astype(np.float32)
    texture = base * (0.65 + 0.35 * weave[..., None]) + grain
    image[disc] = texture[disc]
    image += rng.normal(0, 0.01, image.shape).astype(np.float32)
    return np.clip(image, 0, 1), disc


def _defect_mask(rng: np.random.Generator, size: int, kind: str, fg: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ys, xs = np.nonzero(fg)
    for _ in range(100):
        i = rng.integers(len(ys))
        cy, cx = float(ys[i]), float(xs[i])
        if kind == "scratch":
            theta = rng.uniform(0, np.pi)
            length = size * rng.uniform(0.15, 0.3)
            width = max(1.0, size / 64)
            dx, dy = np.cos(theta), np.sin(theta)
            along = (xx - cx) * dx + (yy - cy) * dy
            across = -(xx - cx) * dy + (yy - cy) * dx
            mask = (np.abs(along) < length / 2) & (np.abs(across) < width)
        else:
            ry, rx = size * rng.uniform(0.05, 0.1, 2)
            wobble = 1 + 0.25 * np.sin(np.arctan2(yy - cy, xx - cx) * rng.integers(2, 5) + rng.uniform(0, 6))
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < wobble**2
        mask &= fg
        if mask.sum() >= max(4, size * size // 1500):
            return mask
    msg = "could not place a defect on the product"
    raise RuntimeError(msg)


def _paint_defect(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, kind: str) -> np.ndarray:
    image = image.copy()
    if kind == "scratch":
        value = 0.95 if rng.random() < 0.5 else 0.05
        image[mask] = value + rng.normal(0, 0.02, (int(mask.sum()), 3))
    elif kind == "stain":
        colour = rng.uniform(0, 1, 3) * np.array([0.4, 0.8, 1.0])
        image[mask] = 0.35 * image[mask] + 0.65 * colour
    elif kind == "hole":
        image[mask] = 0.3 + rng.normal(0, 0.01, (int(mask.sum()), 3))
    else:
        msg = f"unknown defect type {kind!r}; choose from {DEFECT_TYPES}"
        raise ValueError(msg)
    return np.clip(image, 0, 1)


def _save(image: np.ndarray, path: Path, mode: str) -> None:
    array = (image * 255).round().astype(np.uint8)
    pil = Image.fromarray(array, "RGB")
    if mode == "L":
        pil = pil.convert("L")
    elif mode == "RGBA":
        pil = pil.convert("RGBA")
        pil.putalpha(255)
    elif mode != "RGB":
        msg = f"mode must be 'RGB', 'L' or 'RGBA', got {mode!r}"
        raise ValueError(msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)


def make_mvtec_like_dataset(root: str | Path, spec: SyntheticSpec | None = None, **overrides) -> Path:
    """Write an MVTec-layout dataset under ``root/<category>`` and return ``root``.

    Keyword overrides are applied to ``spec`` (e.g. ``n_train=8``). Existing files are
    overwritten; the output depends only on the spec (seeded).
    """
    spec = spec or SyntheticSpec()
    if overrides:
        spec = SyntheticSpec(**{**spec.__dict__, **overrides})
    unknown = set(spec.defects) - set(DEFECT_TYPES)
    if unknown:
        msg = f"unknown defect types {sorted(unknown)}; choose from {DEFECT_TYPES}"
        raise ValueError(msg)
    root = Path(root)
    base = root / spec.category
    rng = np.random.default_rng(spec.seed)
    size = spec.image_size

    for i in range(spec.n_train):
        image, _ = _product(rng, size)
        _save(image, base / "train" / "good" / f"{i:03d}.png", spec.mode)
    for i in range(spec.n_test_good):
        image, _ = _product(rng, size)
        _save(image, base / "test" / "good" / f"{i:03d}.png", spec.mode)
    for kind in spec.defects:
        for i in range(spec.n_test_per_defect):
            image, fg = _product(rng, size)
            mask = _defect_mask(rng, size, kind, fg)
            _save(_paint_defect(rng, image, mask, kind), base / "test" / kind / f"{i:03d}.png", spec.mode)
            mask_path = base / "ground_truth" / kind / f"{i:03d}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255, "L").save(mask_path)
    return root


def make_texture_folder(root: str | Path, n_classes: int = 3, n_per_class: int = 4, size: int = 64, seed: int = 0) -> Path:
    """Write a small DTD-like texture folder (``<root>/<class>/<k>.jpg``) for tests and demos.

    A stand-in for the Describable Textures Dataset, which AAND's synthesis reads as anomaly content: each class
    is a procedural family (stripes, checks, blobs, ...) with random frequency, angle and colours. Returns
    ``root``. It only serves to exercise the texture code path offline; it is not DTD.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    families = ("stripes", "checks", "blobs", "rings", "noise")
    for c in range(n_classes):
        family = families[c % len(families)]
        for k in range(n_per_class):
            freq = rng.uniform(3, 12)
            angle = rng.uniform(0, np.pi)
            u = np.cos(angle) * xx + np.sin(angle) * yy
            v = -np.sin(angle) * xx + np.cos(angle) * yy
            if family == "stripes":
                pattern = 0.5 + 0.5 * np.sin(2 * np.pi * freq * u)
            elif family == "checks":
                pattern = ((np.floor(freq * u) + np.floor(freq * v)) % 2).astype(np.float32)
            elif family == "blobs":
                noise = rng.normal(0, 1, (8, 8)).astype(np.float32)
                pattern = np.asarray(Image.fromarray(noise).resize((size, size), Image.BICUBIC), dtype=np.float32)
                pattern = (pattern - pattern.min()) / max(float(np.ptp(pattern)), 1e-6)
            elif family == "rings":
                pattern = 0.5 + 0.5 * np.sin(2 * np.pi * freq * np.hypot(xx - 0.5, yy - 0.5))
            else:
                pattern = rng.uniform(0, 1, (size, size)).astype(np.float32)
            low, high = rng.uniform(0, 1, (2, 3)).astype(np.float32)
            image = low + (high - low) * pattern[..., None]
            path = root / f"{family}{c}" / f"{k:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8), "RGB").save(path, quality=95)
    return root



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--category", default="widget")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--n-test-good", type=int, default=8)
    parser.add_argument("--n-test-per-defect", type=int, default=4)
    parser.add_argument("--mode", default="RGB", choices=["RGB", "L", "RGBA"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = make_mvtec_like_dataset(
        args.root,
        SyntheticSpec(
            category=args.category,
            image_size=args.image_size,
            n_train=args.n_train,
            n_test_good=args.n_test_good,
            n_test_per_defect=args.n_test_per_defect,
            mode=args.mode,
            seed=args.seed,
        ),
    )
    print(f"wrote {root / args.category}")


if __name__ == "__main__":
    main()
