"""INT8 post-training quantization (NNCF) that keeps anomaly maps meaningful (why and figures: docs/export.md).

anomalib 2.7's ``INT8_PTQ`` quantizes the whole graph (the anomaly map, a small difference of two large feature maps,
is wiped out) and calibrates on the validation split. Here the map head and post-processor (:data:`FLOAT_SCOPES`) stay
in float, and the training split calibrates. :class:`AnomalyMapPTQMixin` routes ``INT8_PTQ`` exports through
:func:`quantize_model`, which works on any anomalib model's ONNX file (the edge benchmark: RD and Patchcore too).
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

if TYPE_CHECKING:
    from anomalib.data import AnomalibDataModule

logger = logging.getLogger(__name__)

#: sub-modules of an AnomalibModule whose ops stay in floating point (matched against the ONNX name scopes)
FLOAT_SCOPES: tuple[str, ...] = ("anomaly_map_generator", "post_processor")

#: name-scope metadata the torch dynamo ONNX exporter writes on every node
_SCOPE_KEY = "pkg.torch.onnx.name_scopes"


def float_node_names(onnx_path: str | Path, scopes: Sequence[str] = FLOAT_SCOPES) -> list[str]:
    """Names of the ONNX nodes that belong to any of the sub-modules ``scopes``, from the module path the dynamo
    exporter records on each node (e.g. ``['', 'model', 'model.anomaly_map_generator', 'sub_3']``)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    names = []
    for node in graph.node:
        metadata = {prop.key: prop.value for prop in node.metadata_props}
        raw = metadata.get(_SCOPE_KEY)
        if not raw:
            continue
        try:
            path = ast.literal_eval(raw)
        except (SyntaxError, ValueError):
            path = [raw]
        # entries are qualified module names: '', 'model', 'model.anomaly_map_generator', ..., then the op
        modules = {part for entry in path for part in str(entry).split(".")}
        if any(scope in modules for scope in scopes):
            names.append(node.name)
    return names


def float_op_names(
    model: Any,  # noqa: ANN401 - openvino.Model
    onnx_path: str | Path,
    scopes: Sequence[str] = FLOAT_SCOPES,
    tail_scopes: Sequence[str] = FLOAT_SCOPES,
) -> list[str]:
    """Friendly names of the ops of the OpenVINO ``model`` (converted from ``onnx_path``) kept in floating point. Not by
    ONNX name alone: OpenVINO renames some scope ops (docs/export.md). Kept: ops named like an ONNX node of ``scopes`` /
    ``tail_scopes`` or producing one of their tensors; ops whose every non-constant input is kept and that have no ONNX
    name or are computed from a ``tail_scopes`` op (the graph's end: the image score stays float too)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    onnx_names = {node.name for node in graph.node}
    selected = set(float_node_names(onnx_path, (*scopes, *tail_scopes)))
    tail_selected = set(float_node_names(onnx_path, tail_scopes))
    tensors = {tensor for node in graph.node if node.name in selected for tensor in node.output if tensor}
    inside: set[str] = set()
    after_tail: set[str] = set()
    for op in model.get_ordered_ops():
        name = op.get_friendly_name()
        if op.get_type_name() in {"Constant", "Parameter"}:
            continue
        sources = [port.get_source_output().get_node() for port in op.inputs()]
        sources = [source for source in sources if source.get_type_name() != "Constant"]
        if name in tail_selected or any(source.get_friendly_name() in after_tail for source in sources):
            after_tail.add(name)
        fed = bool(sources) and all(source.get_friendly_name() in inside for source in sources)
        if name in selected or any(tensors & output.get_names() for output in op.outputs()):
            inside.add(name)
        elif fed and (name not in onnx_names or name in after_tail):
            inside.add(name)
    return sorted(inside)


def calibration_batches(
    images: Iterable[torch.Tensor], input_size: tuple[int, int], max_images: int = 300
) -> list[np.ndarray]:
    """Single-image ``float32`` NCHW arrays in [0, 1], resized to the exported graph's static ``input_size``."""
    batches: list[np.ndarray] = []
    for batch in images:
        batch = batch.detach().float().cpu()
        if batch.ndim == 3:
            batch = batch.unsqueeze(0)
        if tuple(batch.shape[-2:]) != tuple(input_size):
            batch = F.interpolate(batch, size=tuple(input_size), mode="bilinear", align_corners=False, antialias=True)
        for image in batch:
            batches.append(image.unsqueeze(0).numpy())
            if len(batches) >= max_images:
                return batches
    return batches


def quantize_model(
    onnx_path: str | Path,
    calibration: Sequence[np.ndarray],
    float_scopes: Sequence[str] = FLOAT_SCOPES,
    ov_kwargs: dict[str, Any] | None = None,
    tail_scopes: Sequence[str] = FLOAT_SCOPES,
    **nncf_kwargs: Any,  # noqa: ANN401
) -> Any:  # noqa: ANN401 - openvino.Model
    """Convert ``onnx_path`` to OpenVINO and quantize it to INT8, leaving ``float_scopes`` and everything computed
    from ``tail_scopes`` in float (:func:`float_op_names`; Patchcore: ``("feature_pooler", *FLOAT_SCOPES)``)."""
    import nncf
    import openvino as ov

    if not calibration:
        msg = "INT8 post-training quantization needs at least one calibration image."
        raise ValueError(msg)
    if len(calibration) < 300:
        logger.info("INT8 calibration on %d training images (NNCF's default subset is 300).", len(calibration))
    model = ov.convert_model(str(onnx_path), **(ov_kwargs or {}))
    ignored = float_op_names(model, onnx_path, float_scopes, tail_scopes)
    batch_dim = model.input(0).get_partial_shape()[0]
    if batch_dim.is_static and batch_dim.get_length() != 1:  # e.g. an export whose batch size was specialised
        size = batch_dim.get_length()
        calibration = [
            np.concatenate([calibration[(start + k) % len(calibration)] for k in range(size)])
            for start in range(0, len(calibration), size)
        ]
    nncf_kwargs.setdefault("subset_size", len(calibration))
    if ignored:
        nncf_kwargs.setdefault("ignored_scope", nncf.IgnoredScope(names=ignored, validate=False))
    return nncf.quantize(model, nncf.Dataset(list(calibration)), **nncf_kwargs)


class AnomalyMapPTQMixin:
    """``to_openvino`` with ``CompressionType.INT8_PTQ`` -> :func:`quantize_model` on the training images (a base
    before ``AnomalibModule``; other compression types are anomalib's own)."""

    def to_openvino(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        compression_type: Any = None,  # noqa: ANN401 - anomalib.deploy.CompressionType | None
        datamodule: AnomalibDataModule | None = None,
        *args: Any,  # noqa: ANN401
        **kwargs: Any,  # noqa: ANN401
    ) -> Path:
        from anomalib.deploy import CompressionType, ExportType
        from anomalib.models.components.base.export_mixin.utils import create_export_root

        if compression_type != CompressionType.INT8_PTQ:
            return super().to_openvino(  # type: ignore[misc]
                export_root, model_file_name, input_size, compression_type, datamodule, *args, **kwargs
            )
        if datamodule is None:
            msg = "INT8_PTQ needs a datamodule: its training images (normal ones) calibrate the quantization."
            raise ValueError(msg)
        import openvino as ov

        size = tuple(input_size) if input_size is not None else tuple(getattr(self, "input_size", None) or ())
        if len(size) != 2:
            msg = "INT8_PTQ needs a static input size: pass input_size=(H, W) (CLI: --input_size '[256,256]')."
            raise ValueError(msg)
        onnx_kwargs = kwargs.get("onnx_kwargs") or {}
        datamodule.setup("fit")  # calibration on the training split (normal images only), never the test split
        if getattr(datamodule, "train_data", None) is None or len(datamodule.train_data) == 0:
            msg = (
                "INT8 post-training quantization calibrates on the datamodule's training images (normal images), "
                "but its training split is empty."
            )
            raise ValueError(msg)
        calibration = calibration_batches((batch.image for batch in datamodule.train_dataloader()), size)
        with TemporaryDirectory() as onnx_directory:
            onnx_path = self.to_onnx(onnx_directory, model_file_name, size, **onnx_kwargs)  # type: ignore[attr-defined]
            model = quantize_model(onnx_path, calibration, ov_kwargs=kwargs.get("ov_kwargs"))
        root = create_export_root(export_root, ExportType.OPENVINO)
        xml_path = root / f"{model_file_name}.xml"
        ov.save_model(model, xml_path, compress_to_fp16=False)
        return xml_path
