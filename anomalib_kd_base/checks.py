"""Data checks at fit start: bad data is named before any training time is spent (docs/training.md).

:func:`check_datamodule_layout` runs in the model's ``prepare_data``, before anomalib's ``MVTecAD`` fails on a missing
mask with pandas' ``Must have equal len keys and value``; :func:`check_datasets` in ``setup("fit")``: every image and
mask decodes (a truncated PNG otherwise raises ``OSError`` without a file name, a bad test image only after training).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DATA_CHECK_ENV = "ANOMALIB_KD_DATA_CHECK"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
_SHOWN = 5  # bad files named in a message


class DataCheckError(ValueError):
    """A dataset problem found before training (the message names the files / folders)."""


def _listing(paths: Sequence[Any]) -> str:
    shown = ", ".join(str(path) for path in paths[:_SHOWN])
    more = f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else ""
    return shown + more


def decode_error(path: str | os.PathLike[str]) -> str | None:
    """``None`` when ``path`` is an image PIL decodes completely, else what is wrong with it."""
    from PIL import Image

    path = Path(path)
    try:
        if not path.is_file():
            return "missing"
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # noqa: BLE001 - any failure is reported with the file's name
        return f"{type(error).__name__}: {error}"
    return None


def undecodable(paths: Iterable[str | os.PathLike[str]], workers: int | None = None) -> list[tuple[str, str]]:
    """``[(path, problem)]`` of the files that do not decode (PIL decodes in threads, releasing the GIL)."""
    paths = [str(path) for path in paths if path is not None and str(path) != ""]
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(decode_error, paths))
    return [(path, problem) for path, problem in zip(paths, problems, strict=True) if problem is not None]


# ---------------------------------------------------------------------------------------------- MVTec layout
def check_datamodule_layout(datamodule: Any) -> None:  # noqa: ANN401
    """Before ``datamodule.setup``, for anomalib's ``MVTecAD``: raise :class:`DataCheckError` when an anomalous test
    image ``<root>/<category>/test/<defect>/<name>.png`` has no mask ``ground_truth/<defect>/<name>_mask.png`` (or
    ``<name>.png``); a missing folder is left to the datamodule."""
    from anomalib.data import MVTecAD

    root, category = getattr(datamodule, "root", None), getattr(datamodule, "category", None)
    if not isinstance(datamodule, MVTecAD) or root is None or not category:
        return
    base = Path(root) / str(category)
    test = base / "test"
    if not test.is_dir():
        return
    defects = sorted(d for d in test.iterdir() if d.is_dir() and d.name != "good")
    anomalous = {d.name: sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS) for d in defects}
    anomalous = {name: files for name, files in anomalous.items() if files}
    if not anomalous:
        return
    ground_truth = base / "ground_truth"
    if not ground_truth.is_dir():
        total = sum(len(files) for files in anomalous.values())
        msg = (
            f"The dataset has {total} anomalous test images ({', '.join(sorted(anomalous))}) but no mask folder: "
            f"{ground_truth} does not exist. anomalib's MVTecAD needs one mask per anomalous image "
            "(ground_truth/<defect>/<name>_mask.png); add the masks, or move the images to a datamodule without "
            "masks (anomalib.data.Folder without mask_dir) for image-level evaluation only."
        )
        raise DataCheckError(msg)
    missing_folders = [name for name in anomalous if not (ground_truth / name).is_dir()]
    if missing_folders:
        msg = (
            f"Masks missing for the defect folders {missing_folders}: {ground_truth}/<defect>/ does not exist for "
            f"them (test images in {test}/{missing_folders[0]}/ need ground_truth/{missing_folders[0]}/<name>_mask.png)."
        )
        raise DataCheckError(msg)
    missing: list[str] = []
    for name, files in anomalous.items():
        masks = {f.stem for f in (ground_truth / name).iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS}
        missing.extend(str(f.relative_to(base)) for f in files if f.stem not in masks and f"{f.stem}_mask" not in masks)
    if missing:
        msg = (
            f"{len(missing)} anomalous test image(s) have no mask under {ground_truth}: {_listing(missing)}. "
            "Expected ground_truth/<defect>/<name>_mask.png for each (anomalib's MVTecAD would fail with "
            "'ValueError: Must have equal len keys and value')."
        )
        raise DataCheckError(msg)


# ---------------------------------------------------------------------------------------------- datasets
def _samples(dataset: Any) -> Any:  # noqa: ANN401 - pandas DataFrame or None
    samples = getattr(dataset, "samples", None)
    return samples if samples is not None and hasattr(samples, "columns") else None


def anomalous_count(dataset: Any) -> int | None:  # noqa: ANN401
    """Number of anomalous samples of an anomalib dataset (``None`` when the dataset has no sample table)."""
    samples = _samples(dataset)
    if samples is None or "label_index" not in samples.columns:
        return None
    return int((samples.label_index == 1).sum())


def check_datasets(datamodule: Any, check_eval: bool = True) -> None:  # noqa: ANN401
    """Decode every image (and named mask) of the datamodule's sets; raise :class:`DataCheckError` naming bad ones."""
    sets = [("training", getattr(datamodule, "train_data", None))]
    if check_eval:
        sets += [("validation", getattr(datamodule, "val_data", None)), ("test", getattr(datamodule, "test_data", None))]
    seen: set[str] = set()
    problems: list[str] = []
    for split, dataset in sets:
        samples = _samples(dataset)
        if samples is None:
            continue
        paths = [p for p in samples.get("image_path", []) if p and str(p) not in seen]
        if "mask_path" in samples.columns:
            paths += [p for p in samples.mask_path if isinstance(p, str | os.PathLike) and str(p) and str(p) not in seen]
        seen.update(str(p) for p in paths)
        problems.extend(f"{split} {path}: {problem}" for path, problem in undecodable(paths))
    if problems:
        msg = (
            f"{len(problems)} file(s) of the dataset cannot be read; fix or remove them before training "
            f"(no training time was spent):\n  " + "\n  ".join(problems[:_SHOWN])
            + (f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else "")
            + f"\n(set {DATA_CHECK_ENV}=0 to skip this check)"
        )
        raise DataCheckError(msg)


def warn_if_no_anomalous(datamodule: Any) -> None:  # noqa: ANN401
    """Warn when the validation / test set holds no anomalous image (AUROC / F1 undefined there)."""
    for split in ("val_data", "test_data"):
        if anomalous_count(getattr(datamodule, split, None)) == 0:
            logger.warning(
                "The %s set has no anomalous images: image and pixel AUROC, AUPR and F1 are undefined on it and are "
                "reported as NaN (not 0.0); thresholds set on it are not meaningful.",
                split.removesuffix("_data").replace("val", "validation"),
            )
