"""``quality --ablation aand|memkd|all``: which mechanism of AAND / MemKD moves which number.

The variants of :data:`ABLATIONS` (a model plus constructor keyword overrides, the interface agreed with the model
code) run instead of ``--models``, with the model's mechanism figures on the test images (:func:`mechanism_figures`);
a variant whose keyword the installed constructor lacks is skipped and listed, never run without it. The options
(textures, ``--proxy-teacher``, ``--aand-foreground``, ``--defects``, ``--product``): docs/benchmarks.md
("Ablations"); the tables: :mod:`.ablation_report`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalib_kd_tools.proxy import PROXY_TEACHER
from anomalib_kd_tools.synthetic import ALL_DEFECT_TYPES, PRODUCTS, make_texture_folder

TEXTURES = "<texture-dir>"  # placeholder in a variant's overrides, replaced by the run's texture folder


@dataclass(frozen=True)
class Variant:
    """A model (class name as the benchmark builds it) with constructor keyword overrides."""

    name: str
    model: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def resolved(self, texture_dir: str | None) -> dict[str, Any]:
        return {k: (texture_dir if v == TEXTURES else v) for k, v in self.overrides.items()}


ABLATIONS: dict[str, tuple[Variant, ...]] = {
    "aand": (
        Variant("AAND", "Aand", {"anomaly_source_path": TEXTURES}),
        Variant("AAND stage1=0", "Aand", {"anomaly_source_path": TEXTURES, "stage1_epochs": 0}),
        Variant("AAND no L_A", "Aand", {"anomaly_source_path": TEXTURES, "amplification_weight": 0.0}),
        Variant("AAND no fg mask", "Aand", {"anomaly_source_path": TEXTURES, "foreground": "none"}),
        Variant("AAND no textures", "Aand", {"anomaly_source_path": None}),
    ),
    "memkd": (
        Variant("MemKD", "MemKD"),
        Variant("MemKD no memory", "MemKD", {"use_memory": False}),
        Variant("MemKD no NEL", "MemKD", {"lambda_nm": 0.0}),
        Variant("MemKD tau=0.1", "MemKD", {"temperature": 0.1}),
        Variant("MemKD L_NM sum", "MemKD", {"nm_reduction": "sum"}),
        Variant("MemKD L_NM mean", "MemKD", {"nm_reduction": "mean"}),
    ),
}
ABLATION_CHOICES = (*ABLATIONS, "all")
RUN_CONFIG_DEFAULT_OFF = ("ablation", "proxy_teacher", "texture_dir", "texture_spec", "aand_foreground")
UNLIKE_SYNTHESIS = (("foreign", "tint"), ("scratch", "hole"))  # preferred first, when the generator has them


def variants_of(ablation: str) -> list[Variant]:
    names = list(ABLATIONS) if ablation == "all" else [ablation]
    return [v for name in names for v in ABLATIONS[name]]


def ablation_of(variant: str) -> str:
    return next(name for name, variants in ABLATIONS.items() if any(v.name == variant for v in variants))


def model_class(model: str) -> type:
    """The class of a benchmark model: ``Aand`` / ``MemKD`` from their packages, the others from anomalib's."""
    package = f"anomalib_{model.lower()}" if model in ("Aand", "MemKD") else "anomalib.models"
    return getattr(importlib.import_module(package), model)


def accepted_kwargs(cls: type) -> set[str] | None:
    """The keywords ``cls(...)`` accepts, ``None`` for any: a ``**kwargs`` is followed up the MRO to the next
    ``__init__`` (``Aand`` / ``MemKD`` pass ``**components`` to ``KDModelBase``), so a misspelt override is caught."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names: set[str] = set()
    for klass in getattr(cls, "__mro__", (cls,)):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        parameters = inspect.signature(init).parameters
        names |= {name for name, p in parameters.items() if p.kind in named and name != "self"}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return names
    return None


def missing_kwargs(variant: Variant, cls: type | None = None) -> list[str]:
    """The override keywords the installed model's constructor does not accept (see :func:`accepted_kwargs`)."""
    accepted = accepted_kwargs(cls or model_class(variant.model))
    return [] if accepted is None else [k for k in variant.overrides if k not in accepted]


def split_runnable(variants: Sequence[Variant]) -> tuple[list[Variant], dict[str, list[str]]]:
    """``(runnable variants, {skipped variant: missing keywords})``."""
    missing = {variant.name: missing_kwargs(variant) for variant in variants}
    return [v for v in variants if not missing[v.name]], {name: keys for name, keys in missing.items() if keys}


def available_defects() -> tuple[str, ...]:
    """Defect families of the generator (:data:`anomalib_kd_tools.synthetic.ALL_DEFECT_TYPES`)."""
    return tuple(ALL_DEFECT_TYPES)


def default_ablation_defects(available: Sequence[str] | None = None) -> tuple[str, ...]:
    available = tuple(available_defects() if available is None else available)
    chosen = (tuple(d for d in preferred if d in available) for preferred in UNLIKE_SYNTHESIS)
    return next((defects for defects in chosen if defects), available)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ablations and the proxy teacher")
    group.add_argument("--ablation", choices=ABLATION_CHOICES, help="run the ablation variants of AAND / MemKD (or "
                       "both) instead of --models; seeds default to 0 1 2")
    group.add_argument("--variants", nargs="+", metavar="NAME", help="run only these variants of the ablation")
    group.add_argument("--proxy-teacher", action="store_true",
                       help=f"with --no-pre-trained: {PROXY_TEACHER} before fitting (never ImageNet)")
    group.add_argument("--texture-dir", type=Path, help="texture images for AAND's synthesis (anomaly_source_path, "
                       "e.g. ./datasets/dtd/images); with --generated and --ablation a DTD-like folder is generated "
                       "when not given")
    group.add_argument("--aand-foreground", help="AAND's foreground strategy for every AAND variant but 'no fg mask' "
                       "(default: the model's default); the generated product is a bright disc on a dark background: "
                       "'bright'")
    group.add_argument("--defects", nargs="+", help="defect families of the generated test set (default: the "
                       "generator's; with --ablation families unlike AAND's synthesis: foreign/tint when available, "
                       "else scratch/hole)")
    group.add_argument("--product", nargs="+", metavar="PRODUCT", help="products of the generated data, one category "
                       "each, named after it (e.g. widget brick grain: an aligned object, a regular and an irregular "
                       "texture); default: the widget, as category 'widget'")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate the ablation options and fill their run-dependent defaults (seeds, defects)."""
    if args.seeds is None:
        args.seeds = [0, 1, 2] if args.ablation else [0]
    if args.proxy_teacher and args.pre_trained:
        parser.error("--proxy-teacher calibrates a random-init teacher: add --no-pre-trained")
    if not args.generated and (args.defects or args.product):
        parser.error("--defects / --product describe generated data: use them with --generated")
    if args.defects:
        unknown = sorted(set(args.defects) - set(available_defects()))
        if unknown:
            parser.error(f"--defects: unknown {unknown}; the generator has {list(available_defects())}")
    elif args.generated and args.ablation:
        args.defects = list(default_ablation_defects())
    unknown = sorted(set(args.product or ()) - set(PRODUCTS))
    if unknown:
        parser.error(f"--product {' '.join(unknown)}: the generator has {list(PRODUCTS)}")
    if args.product and len(set(args.product)) != len(args.product):
        parser.error("--product: each product once")
    if args.variants:
        if not args.ablation:
            parser.error("--variants selects variants of an --ablation")
        unknown = sorted(set(args.variants) - {v.name for v in variants_of(args.ablation)})
        if unknown:
            parser.error(f"--variants: unknown {unknown}; --ablation {args.ablation} has "
                         f"{[v.name for v in variants_of(args.ablation)]}")
    if args.texture_dir is not None and not args.texture_dir.is_dir():
        parser.error(f"--texture-dir {args.texture_dir}: not a folder")
    needs_textures = args.ablation in {"aand", "all"}
    if needs_textures and args.texture_dir is None and not args.generated:
        parser.error("--ablation aand runs AAND as configured, with textures: give --texture-dir (DTD's images)")


def plan(args: argparse.Namespace, output: Path) -> tuple[list[Variant], dict[str, list[str]], dict[str, Any]]:
    """Variants to run, variants skipped (missing keywords) and the run-config entries of these options."""
    texture_dir, texture_spec = None, None
    if args.texture_dir is not None:
        texture_dir = str(args.texture_dir.resolve())
    elif args.ablation in {"aand", "all"} or (args.generated and not args.ablation):
        # Aand reads DTD's textures as anomaly content (the paper's recipe): generated data gets a DTD-like folder
        # (whatever --models says, so that a run extended with other models keeps its settings)
        texture_spec = {"n_classes": 5, "n_per_class": 6, "size": args.image_size, "seed": 0}
        texture_dir = str((output / "textures").resolve())
    if args.ablation:
        chosen = [v for v in variants_of(args.ablation) if not args.variants or v.name in args.variants]
        variants, skipped = split_runnable(chosen)
    else:
        variants, skipped = [Variant(m, m) for m in args.models], {}
    if args.aand_foreground:
        variants = [Variant(v.name, v.model, {"foreground": args.aand_foreground, **v.overrides})
                    if v.model == "Aand" else v for v in variants]  # fmt: skip
    config = {"ablation": args.ablation, "proxy_teacher": bool(args.proxy_teacher), "texture_dir": texture_dir,
              "texture_spec": texture_spec, "aand_foreground": args.aand_foreground}  # fmt: skip
    return variants, skipped, config


def generated_extras(args: argparse.Namespace) -> dict[str, Any]:
    """Generator options beyond the benchmark's original ones (only when given, so old run configs still match)."""
    return {key: list(value) for key, value in (("defects", args.defects), ("products", args.product)) if value}


def write_textures(config: dict[str, Any]) -> None:
    """Write the generated texture folder unless the same one is already there."""
    spec = config.get("texture_spec")
    if not spec:
        return
    root = Path(config["texture_dir"])
    marker = root / "textures.json"
    if not marker.exists() or json.loads(marker.read_text(encoding="utf-8")) != spec:
        make_texture_folder(root, **spec)
        marker.write_text(json.dumps(spec), encoding="utf-8")


def teacher_label(config: dict[str, Any]) -> str:
    if config.get("proxy_teacher"):
        return PROXY_TEACHER
    return "ImageNet (pre-trained)" if config.get("pre_trained") else "random init (no pre-trained weights)"


def mechanism_figures(model: Any, dataloader: Any, report: Any = None) -> tuple[dict[str, float], str]:  # noqa: ANN401
    """``(figures, status)`` of ``report(model, dataloader)`` (default: ``mechanisms.mechanism_report``) under
    ``no_grad``, non-numeric values dropped; ``status``: ``ok``, ``absent`` or ``error: ...`` (traceback in the log)."""
    import torch

    from anomalib_kd_tools import mechanisms

    if report is None:
        if not mechanisms.has_mechanism_report(model):
            return {}, "absent"
        report = mechanisms.mechanism_report
    model.eval()
    try:
        with torch.no_grad():
            raw = report(model, dataloader)
    except Exception as error:  # noqa: BLE001 - reported in the results, the metrics of the cell stay valid
        traceback.print_exc()
        return {}, f"error: {type(error).__name__}: {error}"[:300]
    figures = {}
    for key, value in dict(raw or {}).items():
        try:
            figures[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return figures, "ok"
