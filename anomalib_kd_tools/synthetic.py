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

``product="brick"`` replaces the disc by a full-frame *texture*: a regular running-bond brick wall with
bright, high-contrast mortar lines, slight jitter of the grid (global phase, per-row offset, per-brick
length and shade, mortar width) and fine grain; the whole image is foreground. Two more defect
families, unlike AAND's Perlin-blob synthesis, are available for any product (``EXTRA_DEFECT_TYPES``):
``foreign`` (a blob filled with a patch of a different texture: fine stripes of another colour) and
``tint`` (a blob whose colour is shifted while its structure is kept). They are opt-in: the default
``defects`` stay ``DEFECT_TYPES`` and the default product's files are byte-identical to before.

``product="grain"`` is a full-frame *irregular* texture (stone / leather-like): fractal noise with a ``1/f^1.6``
amplitude spectrum, mapped between two shades, with fine grain; no two images share a structure, and nothing in it
repeats (unlike the brick wall's regular grid).

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
#: opt-in defect families (not in the default ``defects``), unlike AAND's synthesis
EXTRA_DEFECT_TYPES = ("foreign", "tint")
ALL_DEFECT_TYPES = DEFECT_TYPES + EXTRA_DEFECT_TYPES
#: ``"widget"``: textured disc on a plain background (default, an aligned object); ``"brick"``: full-frame brick-wall
#: texture (regular); ``"grain"``: full-frame fractal-noise texture (irregular)
PRODUCTS = ("widget", "brick", "grain")


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
    product: str = "widget"  # one of PRODUCTS


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


def _brick(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A running-bond brick wall ``(H, W, 3)`` in [0, 1] with bright mortar lines; foreground = whole image.

    Bricks are ``size/8`` high and about ``size/4`` long (16 x 32 px at 128 px); mortar is about ``size/50``
    wide and much brighter than the bricks (the regular high-contrast structure). Jitter: random global
    phase of the grid, per-row horizontal offset (+-size/64), per-brick length (+-6 %) and shade (+-8 %),
    mortar width per image (+-20 %), pixel grain.
    """
    course = size / 8.0
    length = size / 4.0
    mortar = max(1.0, size / 50.0) * rng.uniform(0.8, 1.2)
    brick_colour = np.array([0.62, 0.3, 0.2], dtype=np.float32) * rng.uniform(0.94, 1.06)
    mortar_colour = np.array([0.86, 0.84, 0.8], dtype=np.float32) * rng.uniform(0.97, 1.03)
    phase_y, phase_x = rng.uniform(0, course), rng.uniform(0, length)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    y = yy + phase_y
    row = np.floor(y / course).astype(int)
    n_rows = int(row.max()) + 2
    row_offset = (np.arange(n_rows) % 2) * length / 2 + rng.uniform(-size / 64, size / 64, n_rows)
    x = xx + phase_x + row_offset[row]
    # bricks of slightly different length: cumulative joints per row
    n_cols = int(np.ceil((size + 2 * length) / length)) + 2
    lengths = length * rng.uniform(0.94, 1.06, (n_rows, n_cols))
    joints = np.cumsum(lengths, axis=1)
    col = np.stack([np.searchsorted(joints[r], x[i]) for i, r in enumerate(row[:, 0])])
    start = np.where(col > 0, np.take_along_axis(joints[row[:, 0]], np.maximum(col - 1, 0), axis=1), 0.0)
    in_bed = (y - row * course) < mortar  # horizontal mortar (bed joint)
    in_head = (x - start) < mortar  # vertical mortar (head joint)
    shade = rng.uniform(0.92, 1.08, (n_rows, n_cols + 1)).astype(np.float32)
    image = brick_colour * shade[row, col][..., None]
    grain = rng.normal(0, 0.03, (size, size, 1)).astype(np.float32)
    image = image + grain
    joint = in_bed | in_head
    image[joint] = mortar_colour + rng.normal(0, 0.02, (int(joint.sum()), 1)).astype(np.float32)
    image += rng.normal(0, 0.01, image.shape).astype(np.float32)
    return np.clip(image, 0, 1).astype(np.float32), np.ones((size, size), dtype=bool)


def _grain(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An irregular stone / leather-like texture ``(H, W, 3)`` in [0, 1]; foreground = whole image.

    White noise filtered to a ``1/f^1.6`` amplitude spectrum (fractal noise: structure at every scale, no period),
    standardised, squashed by a logistic and mapped between a dark and a light shade (each +-5 % per image), plus
    pixel grain.
    """
    noise = rng.normal(size=(size, size))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    frequency = np.sqrt(fy**2 + fx**2)
    frequency[0, 0] = 1.0
    spectrum = np.fft.rfft2(noise) / frequency**1.6
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=(size, size))
    field = (field - field.mean()) / max(float(field.std()), 1e-8)
    tone = 1.0 / (1.0 + np.exp(-1.5 * field))
    dark = np.array([0.34, 0.27, 0.21]) * rng.uniform(0.95, 1.05)
    light = np.array([0.74, 0.64, 0.52]) * rng.uniform(0.95, 1.05)
    image = dark + (light - dark) * tone[..., None] + rng.normal(0, 0.025, (size, size, 1))
    image += rng.normal(0, 0.01, image.shape)
    return np.clip(image, 0, 1).astype(np.float32), np.ones((size, size), dtype=bool)


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
    elif kind == "foreign":
        # a patch of another texture: fine stripes (period 3-6 px) between two random colours
        size = image.shape[0]
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(3, 6)
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(theta) * xx + np.sin(theta) * yy) / period)
        low, high = rng.uniform(0, 1, (2, 3))
        texture = low + (high - low) * stripes[..., None]
        image[mask] = texture[mask]
    elif kind == "tint":
        # colour shift that keeps the structure: per-channel gains, normalised to keep the brightness
        gains = rng.uniform(0.55, 1.45, 3)
        gains = gains / gains.mean()
        image[mask] = image[mask] * gains
    else:
        msg = f"unknown defect type {kind!r}; choose from {ALL_DEFECT_TYPES}"
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
    unknown = set(spec.defects) - set(ALL_DEFECT_TYPES)
    if unknown:
        msg = f"unknown defect types {sorted(unknown)}; choose from {ALL_DEFECT_TYPES}"
        raise ValueError(msg)
    if spec.product not in PRODUCTS:
        msg = f"unknown product {spec.product!r}; choose from {PRODUCTS}"
        raise ValueError(msg)
    product = {"widget": _product, "brick": _brick, "grain": _grain}[spec.product]
    root = Path(root)
    base = root / spec.category
    rng = np.random.default_rng(spec.seed)
    size = spec.image_size

    for i in range(spec.n_train):
        image, _ = product(rng, size)
        _save(image, base / "train" / "good" / f"{i:03d}.png", spec.mode)
    for i in range(spec.n_test_good):
        image, _ = product(rng, size)
        _save(image, base / "test" / "good" / f"{i:03d}.png", spec.mode)
    for kind in spec.defects:
        for i in range(spec.n_test_per_defect):
            image, fg = product(rng, size)
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
    parser.add_argument("--product", default="widget", choices=list(PRODUCTS))
    parser.add_argument(
        "--defects",
        nargs="+",
        default=list(DEFECT_TYPES),
        choices=list(ALL_DEFECT_TYPES),
        help=f"defect families (default: {' '.join(DEFECT_TYPES)}; extra: {' '.join(EXTRA_DEFECT_TYPES)})",
    )
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
            defects=tuple(args.defects),
            product=args.product,
        ),
    )
    print(f"wrote {root / args.category}")


if __name__ == "__main__":
    main()
