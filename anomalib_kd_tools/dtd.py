"""Download the Describable Textures Dataset (DTD), AAND's texture source, with anomalib's download helpers.

AAND (paper Sec. III-B) fills its synthetic anomalies with DTD textures. The model never downloads anything
itself; this command puts DTD where the configs expect it::

    anomalib-kd-dtd --root ./datasets/dtd          # or: python -m anomalib_kd_tools.dtd --root ./datasets/dtd
    # -> ./datasets/dtd/images/<47 texture classes>/*.jpg
    anomalib train --model Aand --model.anomaly_source_path ./datasets/dtd/images ...

The archive, its URL and its SHA-256 are the ones anomalib's DRAEM and GLASS models use
(``dtd-r1.0.1.tar.gz`` from the Visual Geometry Group, Oxford); the download, hash check and safe extraction
are anomalib's :func:`anomalib.data.utils.download.download_and_extract`. The archive's top-level ``dtd/``
folder is flattened into ``--root``, so the images end up in ``<root>/images``. Nothing is downloaded when
``<root>/images`` already holds images.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from anomalib.data.utils.download import DownloadInfo, download_and_extract

#: same archive, URL and hash as ``anomalib.models.image.draem.lightning_model.DTD_DOWNLOAD_INFO``
DTD_DOWNLOAD_INFO = DownloadInfo(
    name="dtd-r1.0.1.tar.gz",
    url="https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
    hashsum="e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205",
)
DEFAULT_ROOT = Path("./datasets/dtd")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _has_images(folder: Path) -> bool:
    return folder.is_dir() and any(path.suffix.lower() in IMAGE_SUFFIXES for path in folder.rglob("*"))


def download_dtd(root: str | Path = DEFAULT_ROOT) -> Path:
    """Download and extract DTD under ``root``; return the images folder ``<root>/images``.

    Raises:
        RuntimeError: the extracted archive has no ``images`` folder with images (a changed upstream archive).
    """
    root = Path(root)
    images = root / "images"
    if _has_images(images):
        return images
    download_and_extract(root, DTD_DOWNLOAD_INFO)
    nested = root / "dtd"  # the archive's top-level folder
    if nested.is_dir():
        for entry in nested.iterdir():
            target = root / entry.name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            shutil.move(str(entry), str(target))
        nested.rmdir()
    if not _has_images(images):
        msg = f"DTD was extracted to {root}, but {images} holds no images; the archive's layout may have changed"
        raise RuntimeError(msg)
    return images


def main(argv: list[str] | None = None) -> Path:
    """Command line entry point (``anomalib-kd-dtd``)."""
    parser = argparse.ArgumentParser(
        prog="anomalib-kd-dtd",
        description="Download DTD (AAND's texture source) with anomalib's download helpers.",
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="target folder (default: ./datasets/dtd)")
    args = parser.parse_args(argv)
    images = download_dtd(args.root)
    count = sum(1 for path in images.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    print(f"DTD: {count} images under {images}")  # noqa: T201
    print(f"use it with: --model.anomaly_source_path {images}")  # noqa: T201
    return images


if __name__ == "__main__":
    main()
