"""Teacher weights of AAND and MemKD: explicit timm tag, local weight files, provenance, offline use.

:func:`build_teacher` builds the frozen teacher from timm's hub / cache, a local file or random init, with the
provenance record (:data:`PROVENANCE_KEYS`) that checkpoints and exports carry (details: ``docs/offline_weights.md``).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from unittest.mock import patch

import timm
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_session, try_to_load_from_cache
from huggingface_hub.utils.sha import sha_fileobj
from safetensors import safe_open

logger = logging.getLogger(__name__)

#: The teacher the papers used: torchvision's ImageNet-V1 WideResNet50-2, as tagged in timm.
DEFAULT_BACKBONE = "wide_resnet50_2.tv_in1k"
DEFAULT_LAYERS = ("layer1", "layer2", "layer3")
#: metadata keys that ``anomalib-kd-weights export`` writes into a ``.safetensors`` header
FILE_TAG_KEY = "anomalib_kd.weights_tag"
FILE_BACKBONE_KEY = "anomalib_kd.backbone"
PROVENANCE_KEYS = (
    "backbone", "weights_source", "weights_tag", "weights_file", "weights_sha256", "weights_sha256_of", "teacher_sha256"
)
#: seconds the hub probe waits for an answer (DNS included) before the teacher is loaded from the cache only
HUB_TIMEOUT_ENV = "ANOMALIB_KD_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT = 5.0

_RESTORING = contextvars.ContextVar("anomalib_kd_restoring_teacher", default=False)


@contextlib.contextmanager
def restoring_from_checkpoint() -> Iterator[None]:
    """Inside it :func:`build_teacher` neither downloads nor reads a weights file (``load_from_checkpoint``: the
    checkpoint's state dict overwrites the randomly initialised teacher)."""
    token = _RESTORING.set(True)
    try:
        yield
    finally:
        _RESTORING.reset(token)


def restoring() -> bool:
    """Whether the caller runs inside :func:`restoring_from_checkpoint` (a model built by ``load_from_checkpoint``)."""
    return _RESTORING.get()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (what ``sha256sum`` prints; ``hashlib.file_digest`` needs Python 3.11)."""
    with Path(path).open("rb") as handle:
        return sha_fileobj(handle).hex()  # read in 1 MiB chunks


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over tensors sorted by name (each: name, dtype, shape, raw CPU bytes). Hand-written: equal for the same
    weights from the hub, a ``.safetensors`` or a ``.pth`` file, whose bytes differ; no library hashes tensors so."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(state_dict[name].shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _pretrained_cfg(name: str) -> Any:  # noqa: ANN401 - timm's PretrainedCfg, or None for an unknown name
    try:
        return timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown name is reported by timm when the model is built
        return None


def resolve_weights_tag(backbone: str) -> str:
    """The timm tag whose weights ``pre_trained=True`` loads: ``"resnet18"`` -> ``"resnet18.a1_in1k"``."""
    cfg = _pretrained_cfg(backbone)
    return f"{cfg.architecture}.{cfg.tag}" if cfg is not None and getattr(cfg, "tag", None) else backbone


# ---------------------------------------------------------------------------------------------- weight files
def read_weights_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A file's tensors (read by timm's ``load_state_dict``) and its safetensors header metadata (``{}`` for .pth)."""
    path = Path(path)
    safetensors = str(path).endswith(".safetensors")  # timm's test
    try:
        loaded = timm.models.load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as error:
        if safetensors:
            raise
        msg = (
            f"backbone_weights {str(path)!r} could not be read as a PyTorch state dict with "
            f"torch.load(weights_only=True) ({type(error).__name__}: {error}). Give a .safetensors file or a "
            ".pth/.pt file holding a plain state dict (anomalib-kd-weights export writes one)."
        )
        raise ValueError(msg) from error
    tensors = {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        msg = (
            f"backbone_weights {str(path)!r} holds no state dict: expected a mapping of tensor names to tensors, "
            "or one under a 'state_dict' / 'model' key."
        )
        raise ValueError(msg)
    if not safetensors:
        return tensors, {}
    with safe_open(str(path), framework="pt") as handle:
        return tensors, dict(handle.metadata() or {})


def _names(key: str) -> list[str]:
    """``key`` and its un-flattened variants (timm's ``features_only`` nets turn ``stem.0.w`` into ``stem_0.w``)."""
    head, _, rest = key.partition(".")
    return [key] + [f"{head[:i]}.{head[i + 1:]}.{rest}" for i, char in enumerate(head) if char == "_" and rest]


def _lookup(key: str, prefix: str, tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The file's name for ``key`` under ``prefix``: the same name, else its only un-flattened variant."""
    found = [prefix + name for name in _names(key) if prefix + name in tensors]
    return found[0] if found and (found[0] == prefix + key or len(found) == 1) else None


def _choose_prefix(expected: Sequence[str], tensors: Mapping[str, torch.Tensor], source: str) -> str | None:
    """The one prefix under which the file holds the teacher's tensors; ``None`` when no key matches at all."""
    wanted = {name for key in expected for name in _names(key)}
    prefixes = {  # every suffix of a file name that is a teacher name gives a prefix
        "".join(part + "." for part in parts[:start])
        for parts in (name.split(".") for name in tensors)
        for start in range(len(parts))
        if ".".join(parts[start:]) in wanted
    }
    counts = {prefix: sum(_lookup(key, prefix, tensors) is not None for key in expected) for prefix in prefixes}
    winners = sorted(prefix for prefix, count in counts.items() if count == max(counts.values()))
    if len(winners) > 1:
        msg = (
            f"backbone_weights {source!r} is ambiguous: the teacher's tensors fit under several prefixes "
            f"{winners}. Save the teacher's state dict alone (e.g. with anomalib-kd-weights export)."
        )
        raise ValueError(msg)
    return winners[0] if winners else None


def match_state_dict(
    expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], source: str, backbone: str
) -> dict[str, torch.Tensor]:
    """Map a file's ``tensors`` onto the teacher's state dict ``expected``; ``ValueError`` names the first missing
    or mis-shaped tensor. Hand-written: timm's ``clean_state_dict`` strips no Lightning ``model.`` prefix, its
    ``features_only`` nets rename ``stem.0`` to ``stem_0``, and ``load_state_dict(strict=True)`` names no shapes."""
    if not expected:
        msg = f"teacher {backbone!r} has no tensors to load"
        raise ValueError(msg)
    prefix = _choose_prefix(list(expected), tensors, source)
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in expected.items():
        name = None if prefix is None else _lookup(key, prefix, tensors)
        if name is None:
            msg = (
                f"backbone_weights {source!r} does not fit teacher {backbone!r}: tensor {(prefix or '') + key!r} "
                f"(shape {tuple(tensor.shape)}) is missing from the file"
                + (f" (found no key ending in {key!r} at all)" if prefix is None else "")
                + f". The file has {len(tensors)} tensors, e.g. {sorted(tensors)[:3]}. Was it written for another "
                "architecture? (anomalib-kd-weights verify FILE --backbone NAME checks a file.)"
            )
            raise ValueError(msg)
        if tuple(tensors[name].shape) != tuple(tensor.shape):
            msg = (
                f"backbone_weights {source!r} does not fit teacher {backbone!r}: tensor {name!r} has shape "
                f"{tuple(tensors[name].shape)} in the file, the teacher expects {tuple(tensor.shape)}. Was it "
                "written for another architecture?"
            )
            raise ValueError(msg)
        mapped[key] = tensors[name]
    return mapped


# ---------------------------------------------------------------------------------------------- hub and cache
_NETWORK_MODULES = ("huggingface_hub", "httpx", "httpcore", "requests", "urllib3", "urllib", "socket", "ssl")


def is_download_failure(error: BaseException | None) -> bool:
    """Whether ``error`` or one of its causes is an ``OSError`` or comes from a network / hub library (timm passes
    on whatever failed: huggingface_hub's, torch.hub's or an HTTP client's error, with no common type to catch)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) or type(error).__module__.startswith(_NETWORK_MODULES):
            return True
        error = error.__cause__
    return False


def _hub_file(tag: str) -> tuple[str, str | None, tuple[str, ...]]:
    """``(repo, revision, files)`` timm downloads ``tag`` from: its cfg's ``hf_hub_id``, else ``timm/<tag>``."""
    cfg = _pretrained_cfg(tag)
    repo, _, revision = (getattr(cfg, "hf_hub_id", None) or f"timm/{tag}").partition("@")
    filename = getattr(cfg, "hf_hub_filename", None)  # else timm tries model.safetensors, then pytorch_model.bin
    return repo, revision or None, (filename,) if filename else ("model.safetensors", "pytorch_model.bin")


def cached_weights(tag: str) -> str | None:
    """The Hugging Face cache's file of ``tag``'s weights, or ``None``: ``try_to_load_from_cache``, no network."""
    repo, revision, files = _hub_file(tag)
    for filename in files:
        with contextlib.suppress(ValueError):  # HFValidationError: not a hub repository name
            if isinstance(found := try_to_load_from_cache(repo, filename, revision=revision), str):
                return found
    return None


def hub_reachable(timeout: float | None = None, repo_id: str = "timm/resnet18.a1_in1k") -> bool:
    """Whether the hub (``HF_ENDPOINT``) answers a ``HEAD`` of ``repo_id``'s model API with success within ``timeout``.
    Hand-written around huggingface_hub's session: without it, no network and no ``HF_HUB_OFFLINE=1`` waits for its
    download retries (20 s to over 2 minutes); no HTTP timeout bounds a hanging DNS lookup, hence the daemon thread;
    ``HfApi.model_info`` would first fetch huggingface_hub's agent registry."""
    if timeout is None:
        try:
            timeout = float(os.environ.get(HUB_TIMEOUT_ENV, DEFAULT_HUB_TIMEOUT))
        except ValueError:
            timeout = DEFAULT_HUB_TIMEOUT
    answered: list[bool] = []

    def probe() -> None:
        with contextlib.suppress(Exception):  # any failure means: not reachable now
            url = f"{hub_constants.ENDPOINT.rstrip('/')}/api/models/{repo_id}"
            answered.append(200 <= get_session().head(url, timeout=timeout).status_code < 400)  # noqa: PLR2004

    thread = threading.Thread(target=probe, name="anomalib-kd-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return any(answered)


def offline_message(backbone: str, tag: str, error: BaseException, probed: bool = False) -> str:
    """The message of the :class:`RuntimeError` raised when pretrained weights cannot be obtained."""
    where = "the Hugging Face hub or its cache"
    if hub_constants.HF_HUB_OFFLINE:  # what huggingface_hub obeys (from HF_HUB_OFFLINE when it was imported)
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)"
    if probed:
        where = (
            f"the local Hugging Face cache (the hub did not answer within the {HUB_TIMEOUT_ENV} probe, default "
            f"{DEFAULT_HUB_TIMEOUT:g} s, so only the cache was tried)"
        )
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
    """``(extractor, provenance)``: the frozen teacher (anomalib's ``TimmFeatureExtractor``) and its record. A
    ``backbone_weights`` file wins over ``pre_trained`` (no network); ``pre_trained`` loads the tag's weights through
    timm, from the cache with no network when there, else after :func:`hub_reachable`. Raises ``FileNotFoundError``,
    ``ValueError`` (a tensor missing or mis-shaped), ``RuntimeError`` (no weights). Record: docs/offline_weights.md."""
    from anomalib.models.components import TimmFeatureExtractor

    def teacher(pretrained: bool) -> TimmFeatureExtractor:
        return TimmFeatureExtractor(backbone=backbone, layers=list(layers), pre_trained=pretrained)

    def record(source: str, tag: str, network: torch.nn.Module, path: Path | None = None) -> dict[str, str]:
        teacher_hash = state_dict_sha256(network.state_dict())
        file_hash, file_name, of = (file_sha256(path), path.name, "file") if path else (teacher_hash, "", "state_dict")
        return dict(zip(PROVENANCE_KEYS, (backbone, source, tag, file_name, file_hash, of, teacher_hash), strict=True))

    if restoring():  # the checkpoint's state dict overwrites the teacher, its provenance this placeholder
        placeholder = {**dict.fromkeys(PROVENANCE_KEYS, ""), "backbone": backbone, "weights_source": "checkpoint"}
        return teacher(False), placeholder
    if backbone_weights is not None and str(backbone_weights) != "":
        path = Path(os.fspath(backbone_weights)).expanduser()
        if not path.is_file():
            msg = (
                f"backbone_weights file {str(path)!r} does not exist. Write it on a connected machine with "
                f"`anomalib-kd-weights export --backbone {backbone} --output {path.name}` and copy it here."
            )
            raise FileNotFoundError(msg)
        extractor = teacher(False)
        network = extractor.feature_extractor
        tensors, metadata = read_weights_file(path)
        network.load_state_dict(match_state_dict(network.state_dict(), tensors, path.name, backbone), strict=True)
        provenance = record("file", metadata.get(FILE_TAG_KEY) or path.name, network, path)
        logger.info("Teacher %s loaded from %s (sha256 %s)", backbone, path, provenance["weights_sha256"])
        return extractor, provenance

    tag = resolve_weights_tag(backbone) if pre_trained else "random-init"
    # in the cache: no network at all; else, without HF_HUB_OFFLINE, a short probe instead of huggingface_hub's retries
    online = pre_trained and not hub_constants.HF_HUB_OFFLINE
    cached = online and cached_weights(tag) is not None
    probed_offline = online and not cached and not hub_reachable(repo_id=_hub_file(tag)[0])
    if probed_offline:
        logger.warning(
            "The Hugging Face hub did not answer within %s s: loading %s from the local cache only "
            "(set HF_HUB_OFFLINE=1 to skip this probe).", os.environ.get(HUB_TIMEOUT_ENV, DEFAULT_HUB_TIMEOUT), tag,
        )  # fmt: skip
    # cache only: huggingface_hub reads HF_HUB_OFFLINE once, at import, with no scoped switch; its session checks the
    # module flag on each call, so it is set for the block
    cache_only = patch.object(hub_constants, "HF_HUB_OFFLINE", True)
    try:
        with cache_only if cached or probed_offline else contextlib.nullcontext():
            extractor = teacher(pre_trained)
    except Exception as error:
        if pre_trained and (is_download_failure(error) or probed_offline):
            raise RuntimeError(offline_message(backbone, tag, error, probed=probed_offline)) from error
        raise
    return extractor, record("timm" if pre_trained else "random-init", tag, extractor.feature_extractor)
