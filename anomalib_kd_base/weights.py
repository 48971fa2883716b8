"""Teacher weights of AAND and MemKD: explicit timm tag, local weight files, provenance, offline use.

Both models build their frozen teacher with :func:`build_teacher`:

* ``backbone_weights=None, pre_trained=True`` - timm loads the weights of the backbone's tag (default
  ``wide_resnet50_2.tv_in1k``: torchvision's ImageNet-V1 WideResNet50-2, the weights RD, AAND and MemKD used;
  a bare ``wide_resnet50_2`` would resolve to timm's default tag ``racm_in1k``, different weights) from the
  Hugging Face hub or its local cache (``HF_HUB_OFFLINE=1`` uses the cache only). When that fails for want of
  network or cache, a :class:`RuntimeError` says how to get out (a local file, or ``pre_trained=False``)
  instead of a stack trace from the hub.
* ``backbone_weights=<file>`` - the teacher is built *without* pretrained weights (timm never touches the
  network) and the file (``.safetensors``, or ``.pth``/``.pt`` read with ``torch.load(weights_only=True)``) is
  loaded into it. Every tensor of the teacher (parameters and buffers, e.g. batch-norm statistics) must be in
  the file with the same shape; the first missing or mis-shaped one is named in a :class:`ValueError`. Extra
  tensors (``fc.*``, ``layer4.*`` of a classification checkpoint) are ignored. The file can be a plain timm or
  torchvision state dict of the architecture, a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper, or carry a
  common prefix (``model.``, ``module.``, ``feature_extractor.``, ...), which is only stripped when exactly one
  prefix fits.
* ``pre_trained=False`` and no file - random initialisation (tests, demos).

Every teacher gets a provenance record (plain ``str -> str`` dict, stored on the torch model as
``teacher_provenance``, in Lightning checkpoints and in exported models' metadata):

``backbone``
    the timm name the model was built with.
``weights_source``
    ``"timm"`` (hub / cache), ``"file"`` or ``"random-init"``.
``weights_tag``
    the resolved timm tag (``wide_resnet50_2.tv_in1k``), for a file the tag written into it by
    ``anomalib-kd-weights export`` or else the file's name, ``"random-init"`` otherwise.
``weights_file``
    the file's name (no directory) or ``""``.
``weights_sha256`` / ``weights_sha256_of``
    SHA-256 of the weights file's bytes (``weights_sha256_of = "file"``); without a file, the same as
    ``teacher_sha256`` (``weights_sha256_of = "state_dict"``).
``teacher_sha256``
    SHA-256 of the teacher's state dict as loaded (:func:`state_dict_sha256`: tensors sorted by name, each
    contributing its name, dtype, shape and raw bytes). It is the same for the same teacher weights whatever
    their source, so it compares a hub-built model with a file-built one.

The console script ``anomalib-kd-weights`` (:func:`main`) writes a teacher's weights to a file on a connected
machine (``export``) and checks a file against a backbone (``verify``).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: The teacher the papers used: torchvision's ImageNet-V1 WideResNet50-2, as tagged in timm.
DEFAULT_BACKBONE = "wide_resnet50_2.tv_in1k"
DEFAULT_LAYERS = ("layer1", "layer2", "layer3")
SAFETENSORS_SUFFIXES = (".safetensors",)
#: metadata keys that ``anomalib-kd-weights export`` writes into a ``.safetensors`` header
FILE_TAG_KEY = "anomalib_kd.weights_tag"
FILE_BACKBONE_KEY = "anomalib_kd.backbone"

PROVENANCE_KEYS = (
    "backbone",
    "weights_source",
    "weights_tag",
    "weights_file",
    "weights_sha256",
    "weights_sha256_of",
    "teacher_sha256",
)

_RESTORING = contextvars.ContextVar("anomalib_kd_restoring_teacher", default=False)


@contextlib.contextmanager
def restoring_from_checkpoint() -> Iterator[None]:
    """Inside this context :func:`build_teacher` neither downloads nor reads a weights file.

    Used by ``load_from_checkpoint``: the checkpoint's state dict holds the teacher's weights, so the model is
    built with a randomly initialised teacher that the checkpoint then overwrites. A checkpoint therefore reloads
    on a machine without network and without the ``backbone_weights`` file it was trained with.
    """
    token = _RESTORING.set(True)
    try:
        yield
    finally:
        _RESTORING.reset(token)


def restoring() -> bool:
    """Whether the caller runs inside :func:`restoring_from_checkpoint` (a model built by ``load_from_checkpoint``)."""
    return _RESTORING.get()


# ---------------------------------------------------------------------------------------------- hashing
def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over tensors sorted by name; each contributes its name, dtype, shape and raw (CPU) bytes."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(state_dict[name].shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def teacher_state_dict(extractor: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict of a ``TimmFeatureExtractor``'s timm network (keys without ``feature_extractor.``)."""
    return extractor.feature_extractor.state_dict()


# ---------------------------------------------------------------------------------------------- tags
def resolve_weights_tag(backbone: str) -> str:
    """The timm tag whose weights ``pre_trained=True`` loads: ``"resnet18"`` -> ``"resnet18.a1_in1k"``."""
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(backbone)
    except Exception:  # noqa: BLE001 - an unknown name is reported by timm when the model is built
        return backbone
    if cfg is None or not getattr(cfg, "tag", None):
        return backbone
    return f"{cfg.architecture}.{cfg.tag}"


# ---------------------------------------------------------------------------------------------- reading files
def read_weights_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of a ``.safetensors`` or ``.pth``/``.pt`` file, and the safetensors header metadata (or ``{}``)."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(str(path), device="cpu"), metadata
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        msg = (
            f"backbone_weights {str(path)!r} could not be read as a PyTorch state dict with "
            f"torch.load(weights_only=True) ({type(error).__name__}: {error}). Give a .safetensors file or a "
            ".pth/.pt file holding a plain state dict (anomalib-kd-weights export writes one)."
        )
        raise ValueError(msg) from error
    return _unwrap_state_dict(loaded, path), {}


def _unwrap_state_dict(loaded: Any, path: Path) -> dict[str, torch.Tensor]:  # noqa: ANN401
    if isinstance(loaded, Mapping):
        tensors = {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
        if tensors:
            return dict(tensors)
        for wrapper in ("state_dict", "model"):
            inner = loaded.get(wrapper)
            if isinstance(inner, Mapping):
                return _unwrap_state_dict(inner, path)
    msg = (
        f"backbone_weights {str(path)!r} holds no state dict: expected a mapping of tensor names to tensors, "
        "or one under a 'state_dict' / 'model' key."
    )
    raise ValueError(msg)


# ---------------------------------------------------------------------------------------------- matching
def _name_candidates(key: str) -> list[str]:
    """Names a feature-net key may have in a classification checkpoint.

    timm's ``features_only`` networks (``FeatureListNet``) may flatten the first level of a ``Sequential``
    (``blocks.0.conv.weight`` becomes ``blocks_0.conv.weight``); ResNets keep the classification model's names.
    """
    head, _, rest = key.partition(".")
    candidates = [key]
    for position, char in enumerate(head):
        if char == "_" and rest:
            candidates.append(f"{head[:position]}.{head[position + 1:]}.{rest}")
    return candidates


def _lookup(key: str, prefix: str, tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The file's name for ``key`` under ``prefix``: the same name, else its only un-flattened variant."""
    if prefix + key in tensors:
        return prefix + key
    found = [prefix + name for name in _name_candidates(key)[1:] if prefix + name in tensors]
    return found[0] if len(found) == 1 else None


def _choose_prefix(expected: Sequence[str], tensors: Mapping[str, torch.Tensor], source: str) -> str | None:
    """The one prefix under which the file holds the teacher's tensors; ``None`` when no key matches at all."""
    prefixes: set[str] = set()
    wanted = {candidate for key in expected for candidate in _name_candidates(key)}
    for name in tensors:
        parts = name.split(".")
        for start in range(len(parts)):  # every suffix of the file's name that is a teacher name gives a prefix
            if ".".join(parts[start:]) in wanted:
                prefixes.add("".join(part + "." for part in parts[:start]))
    if not prefixes:
        return None
    if len(prefixes) == 1:
        return prefixes.pop()
    counts = {prefix: sum(_lookup(key, prefix, tensors) is not None for key in expected) for prefix in prefixes}
    best = max(counts.values())
    winners = sorted(prefix for prefix, count in counts.items() if count == best)
    if len(winners) > 1:
        msg = (
            f"backbone_weights {source!r} is ambiguous: the teacher's tensors fit under several prefixes "
            f"{winners}. Save the teacher's state dict alone (e.g. with anomalib-kd-weights export)."
        )
        raise ValueError(msg)
    return winners[0]


def match_state_dict(
    expected: Mapping[str, torch.Tensor],
    tensors: Mapping[str, torch.Tensor],
    source: str,
    backbone: str,
) -> dict[str, torch.Tensor]:
    """Map the file's tensors onto the teacher's state dict; ``ValueError`` naming the first missing/mis-shaped one.

    Args:
        expected: the teacher's own state dict (names, shapes), in module order.
        tensors: the file's tensors.
        source: the file's name, for messages.
        backbone: the backbone name, for messages.
    """
    keys = list(expected)
    if not keys:
        msg = f"teacher {backbone!r} has no tensors to load"
        raise ValueError(msg)
    prefix = _choose_prefix(keys, tensors, source)
    mapped: dict[str, torch.Tensor] = {}
    for key in keys:
        name = None if prefix is None else _lookup(key, prefix, tensors)
        if name is None:
            shown = (prefix or "") + key
            msg = (
                f"backbone_weights {source!r} does not fit teacher {backbone!r}: tensor {shown!r} (shape "
                f"{tuple(expected[key].shape)}) is missing from the file"
                + (f" (found no key ending in {key!r} at all)" if prefix is None else "")
                + f". The file has {len(tensors)} tensors, e.g. {sorted(tensors)[:3]}. Was it written for another "
                "architecture? (anomalib-kd-weights verify FILE --backbone NAME checks a file.)"
            )
            raise ValueError(msg)
        found = tensors[name]
        if tuple(found.shape) != tuple(expected[key].shape):
            msg = (
                f"backbone_weights {source!r} does not fit teacher {backbone!r}: tensor {name!r} has shape "
                f"{tuple(found.shape)} in the file, the teacher expects {tuple(expected[key].shape)}. Was it written "
                "for another architecture?"
            )
            raise ValueError(msg)
        mapped[key] = found
    return mapped


def load_weights_into(extractor: torch.nn.Module, path: str | os.PathLike[str], backbone: str) -> dict[str, str]:
    """Load a weights file into a ``TimmFeatureExtractor``; returns the file's safetensors metadata."""
    tensors, metadata = read_weights_file(path)
    network = extractor.feature_extractor
    mapped = match_state_dict(network.state_dict(), tensors, Path(path).name, backbone)
    network.load_state_dict(mapped, strict=True)
    return metadata


# ---------------------------------------------------------------------------------------------- offline errors
_NETWORK_MODULES = ("huggingface_hub", "httpx", "httpcore", "requests", "urllib3", "urllib", "socket", "ssl")


def _is_download_failure(error: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            return True
        module = type(current).__module__.split(".")[0]
        if module.startswith(_NETWORK_MODULES):
            return True
        current = current.__cause__
    return False


#: seconds the hub probe waits for a TCP connection (DNS included) before the teacher is loaded from the cache only
HUB_TIMEOUT_ENV = "ANOMALIB_KD_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT = 5.0


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float | None = None, repo_id: str = "timm/resnet18.a1_in1k") -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers an HTTP ``HEAD`` of ``repo_id`` within ``timeout`` s.

    Without this, ``pre_trained=True`` on a machine without network and without ``HF_HUB_OFFLINE=1`` waits for
    huggingface_hub's connection retries (20 s to over 2 minutes, depending on how the network fails) before the
    error. A TCP connection is not enough (proxies and captive portals accept those): the hub must answer the
    request with a success status. The probe runs in a daemon thread, so a hanging DNS lookup is bounded too;
    proxy variables (``HTTPS_PROXY``) are honoured as by huggingface_hub.
    """
    import threading
    import urllib.request

    if timeout is None:
        try:
            timeout = float(os.environ.get(HUB_TIMEOUT_ENV, DEFAULT_HUB_TIMEOUT))
        except ValueError:
            timeout = DEFAULT_HUB_TIMEOUT
    try:
        from huggingface_hub import constants

        endpoint = str(constants.ENDPOINT).rstrip("/")
    except Exception:  # noqa: BLE001 - no hub library: let timm report it
        return True
    url = f"{endpoint}/api/models/{repo_id}"
    result: dict[str, bool] = {}

    def probe() -> None:
        try:
            request = urllib.request.Request(url, method="HEAD")  # noqa: S310 - the hub's https endpoint
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                result["ok"] = 200 <= response.status < 400  # noqa: PLR2004
        except Exception:  # noqa: BLE001 - any failure means: not reachable now
            result["ok"] = False

    thread = threading.Thread(target=probe, name="anomalib-kd-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return result.get("ok", False)


def _hub_repo(tag: str) -> str:
    """The Hugging Face repository timm downloads ``tag`` from (``timm/<tag>`` unless timm says otherwise)."""
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(tag)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    except Exception:  # noqa: BLE001
        hub_id = None
    return str(hub_id).split("@")[0] if hub_id else f"timm/{tag}"


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub in offline mode (cache only) for the block."""
    from huggingface_hub import constants

    saved_env, saved_constant = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_constant
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def offline_message(backbone: str, tag: str, error: BaseException, probed: bool = False) -> str:
    """The message of the :class:`RuntimeError` raised when pretrained weights cannot be obtained."""
    offline = _env_offline()
    if probed:
        where = (
            f"the local Hugging Face cache (the hub did not answer within the {HUB_TIMEOUT_ENV} probe, default "
            f"{DEFAULT_HUB_TIMEOUT:g} s, so only the cache was tried)"
        )
    else:
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face hub or its cache"
    return (
        f"Could not load the pretrained teacher weights {tag!r} (backbone={backbone!r}) from {where}: "
        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n"
        "This machine looks offline, or the weights are not in its cache. Two ways out:\n"
        "  1. give the weights as a local file: backbone_weights='teacher.safetensors' "
        "(CLI: --model.backbone_weights teacher.safetensors). Write the file on a connected machine with\n"
        f"       anomalib-kd-weights export --backbone {backbone} --output teacher.safetensors\n"
        "     and carry it over (or copy a Hugging Face cache that holds the weights and set HF_HUB_OFFLINE=1);\n"
        "  2. pre_trained=False (CLI: --model.pre_trained false) for a randomly initialised teacher - only for tests "
        "and demos: the methods rely on ImageNet features."
    )


# ---------------------------------------------------------------------------------------------- the teacher
def build_teacher(
    backbone: str,
    layers: Sequence[str],
    pre_trained: bool = True,
    backbone_weights: str | os.PathLike[str] | None = None,
) -> tuple[torch.nn.Module, dict[str, str]]:
    """Build the frozen teacher (anomalib's ``TimmFeatureExtractor``) and its provenance record.

    Args:
        backbone: timm name with an optional weights tag (``wide_resnet50_2.tv_in1k``).
        layers: teacher layers to extract.
        pre_trained: load the tag's weights through timm (hub or cache) when no file is given.
        backbone_weights: local ``.safetensors`` / ``.pth`` / ``.pt`` file; when given it is loaded whatever
            ``pre_trained`` says, and timm is asked for no pretrained weights (no network access).

    Returns:
        ``(extractor, provenance)``.

    Raises:
        FileNotFoundError: ``backbone_weights`` does not exist.
        ValueError: the file lacks a teacher tensor or has one of another shape (named in the message).
        RuntimeError: ``pre_trained=True``, no file, and the weights could not be downloaded / found in the cache.
    """
    from anomalib.models.components import TimmFeatureExtractor

    layers = list(layers)
    if _RESTORING.get():
        # the checkpoint's state dict overwrites the teacher and its provenance replaces this placeholder
        extractor = TimmFeatureExtractor(backbone=backbone, layers=layers, pre_trained=False)
        provenance = dict.fromkeys(PROVENANCE_KEYS, "")
        provenance.update(backbone=backbone, weights_source="checkpoint")
        return extractor, provenance

    if backbone_weights is not None and str(backbone_weights) != "":
        path = Path(os.fspath(backbone_weights)).expanduser()
        if not path.is_file():
            msg = (
                f"backbone_weights file {str(path)!r} does not exist. Write it on a connected machine with "
                f"`anomalib-kd-weights export --backbone {backbone} --output {path.name}` and copy it here."
            )
            raise FileNotFoundError(msg)
        extractor = TimmFeatureExtractor(backbone=backbone, layers=layers, pre_trained=False)
        metadata = load_weights_into(extractor, path, backbone)
        teacher_hash = state_dict_sha256(teacher_state_dict(extractor))
        provenance = {
            "backbone": backbone,
            "weights_source": "file",
            "weights_tag": metadata.get(FILE_TAG_KEY) or path.name,
            "weights_file": path.name,
            "weights_sha256": file_sha256(path),
            "weights_sha256_of": "file",
            "teacher_sha256": teacher_hash,
        }
        logger.info("Teacher %s loaded from %s (sha256 %s)", backbone, path, provenance["weights_sha256"])
        return extractor, provenance

    tag = resolve_weights_tag(backbone) if pre_trained else "random-init"
    # no network and no HF_HUB_OFFLINE: a short probe instead of huggingface_hub's retries (then cache only)
    probed_offline = pre_trained and not _env_offline() and not hub_reachable(repo_id=_hub_repo(tag))
    if probed_offline:
        logger.warning(
            "The Hugging Face hub did not answer within %s s: loading %s from the local cache only "
            "(set HF_HUB_OFFLINE=1 to skip this probe).",
            os.environ.get(HUB_TIMEOUT_ENV, DEFAULT_HUB_TIMEOUT),
            tag,
        )
    try:
        with _hub_offline() if probed_offline else contextlib.nullcontext():
            extractor = TimmFeatureExtractor(backbone=backbone, layers=layers, pre_trained=pre_trained)
    except Exception as error:
        if pre_trained and (_is_download_failure(error) or probed_offline):
            raise RuntimeError(offline_message(backbone, tag, error, probed=probed_offline)) from error
        raise
    teacher_hash = state_dict_sha256(teacher_state_dict(extractor))
    provenance = {
        "backbone": backbone,
        "weights_source": "timm" if pre_trained else "random-init",
        "weights_tag": tag,
        "weights_file": "",
        "weights_sha256": teacher_hash,
        "weights_sha256_of": "state_dict",
        "teacher_sha256": teacher_hash,
    }
    return extractor, provenance


# ---------------------------------------------------------------------------------------------- console script
def export_weights(
    backbone: str,
    output: str | os.PathLike[str],
    pre_trained: bool = True,
    seed: int = 0,
) -> tuple[Path, str]:
    """Write the full timm model's state dict of ``backbone`` to ``output``; returns ``(path, sha256)``.

    ``.safetensors`` (recommended) records the tag in its header; any other suffix is written with ``torch.save``.
    The file is the classification model's state dict (same names as torchvision's ResNets), so the teacher's
    tensors plus ``layer4``/``fc``, which loading ignores.
    """
    import timm

    output = Path(output)
    tag = resolve_weights_tag(backbone) if pre_trained else "random-init"
    if not pre_trained:
        torch.manual_seed(seed)
    try:
        model = timm.create_model(backbone, pretrained=pre_trained)
    except Exception as error:
        if pre_trained and _is_download_failure(error):
            msg = (
                f"Could not download the weights {tag!r} (backbone={backbone!r}): {type(error).__name__}: "
                f"{str(error).rstrip('.')}. Run this on a machine that reaches huggingface.co (unset HF_HUB_OFFLINE), "
                "or behind a proxy set "
                "HTTPS_PROXY; HF_ENDPOINT selects a hub mirror."
            )
            raise RuntimeError(msg) from error
        raise
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors.torch import save_file

        save_file(state, str(output), metadata={"format": "pt", FILE_TAG_KEY: tag, FILE_BACKBONE_KEY: backbone})
    else:
        torch.save(state, output)
    return output, file_sha256(output)


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        path, digest = export_weights(args.backbone, args.output, pre_trained=not args.no_pretrained, seed=args.seed)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    tag = resolve_weights_tag(args.backbone) if not args.no_pretrained else "random-init"
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB), weights {tag}")
    print(f"{digest}  {path.name}")
    print(
        "offline: anomalib train --model Aand --model.backbone "
        f"{args.backbone} --model.backbone_weights {path.name} ..."
    )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    try:
        _, provenance = build_teacher(args.backbone, args.layers, pre_trained=False, backbone_weights=args.file)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(provenance, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``anomalib-kd-weights``: export a teacher's weights to a file, or check a file against a backbone."""
    parser = argparse.ArgumentParser(
        prog="anomalib-kd-weights",
        description=(
            "Teacher weights for offline / air-gapped machines: `export` writes them on a connected machine, "
            "`verify` checks a file against a backbone (no network). Use the file with backbone_weights=FILE "
            "(CLI: --model.backbone_weights FILE)."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="download a timm backbone's weights and write them to a file")
    export.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"timm name with tag (default {DEFAULT_BACKBONE})")
    export.add_argument("--output", "-o", required=True, help="output file: .safetensors (recommended) or .pth")
    export.add_argument(
        "--no-pretrained",
        action="store_true",
        help="write a randomly initialised backbone instead (no download; for tests)",
    )
    export.add_argument("--seed", type=int, default=0, help="seed of --no-pretrained (default 0)")
    export.set_defaults(handler=_cmd_export)

    verify = commands.add_parser("verify", help="load a weights file into a teacher and print its provenance")
    verify.add_argument("file", help=".safetensors / .pth / .pt file")
    verify.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"timm name (default {DEFAULT_BACKBONE})")
    verify.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS), help="teacher layers (default layer1-3)")
    verify.set_defaults(handler=_cmd_verify)

    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
