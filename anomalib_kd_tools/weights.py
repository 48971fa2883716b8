"""``anomalib-kd-weights``: teacher weights for offline / air-gapped machines.

``export`` writes a timm backbone's weights to a file on a connected machine (``.safetensors`` records the tag in
its header), ``verify`` loads a file into a teacher and prints its provenance (no network). Loading, hashing and the
provenance record are :mod:`anomalib_kd_base.weights`; this module is only the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from anomalib_kd_base.weights import (
    DEFAULT_BACKBONE,
    DEFAULT_LAYERS,
    FILE_BACKBONE_KEY,
    FILE_TAG_KEY,
    build_teacher,
    file_sha256,
    is_download_failure,
    resolve_weights_tag,
)


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
        if pre_trained and is_download_failure(error):
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
    if output.suffix.lower() == ".safetensors":
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


def build_parser() -> argparse.ArgumentParser:
    """The command's parser (``export`` and ``verify``)."""
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``anomalib-kd-weights``: export a teacher's weights to a file, or check a file against a backbone."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
