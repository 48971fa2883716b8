"""Teacher provenance in checkpoints and exported models, and exports with a dynamic input size (docs/export.md).

:class:`ProvenanceExportMixin` (a base of :class:`~anomalib_kd_base.model.KDModelBase`) expects the teacher at
``self.model.encoder`` and its record at ``self.model.teacher_provenance``. It stores the record in checkpoints,
reloads them without downloading or reading ``backbone_weights`` (offline machines), and writes the record into
ONNX ``metadata_props``, the torch export's ``"metadata"`` and the OpenVINO ``rt_info`` (docs/offline_weights.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .weights import PROVENANCE_KEYS, restoring_from_checkpoint, state_dict_sha256

logger = logging.getLogger(__name__)

METADATA_NAMESPACE = "anomalib_kd"
CHECKPOINT_KEY = "anomalib_kd_teacher"
#: where the teacher's tensors live in the Lightning state dict of both models
TEACHER_STATE_PREFIX = "model.encoder.feature_extractor."


class ProvenanceExportMixin:
    """Teacher provenance for checkpoints and ``to_torch`` / ``to_onnx`` / ``to_openvino`` exports."""

    # ------------------------------------------------------------------ the record
    @property
    def teacher_provenance(self) -> dict[str, str]:
        """The teacher's provenance record, with ``teacher_sha256`` of the teacher as it is now."""
        record = {**dict.fromkeys(PROVENANCE_KEYS, ""), **(getattr(self.model, "teacher_provenance", None) or {})}
        encoder = getattr(self.model, "encoder", None)
        if encoder is not None and hasattr(encoder, "feature_extractor"):
            record["teacher_sha256"] = state_dict_sha256(encoder.feature_extractor.state_dict())
        return {key: str(value) for key, value in record.items()}

    def export_metadata(self) -> dict[str, str]:
        """``{"anomalib_kd.<key>": value}`` written into exported models."""
        record = {"model": type(self).__name__, **self.teacher_provenance}
        return {f"{METADATA_NAMESPACE}.{key}": value for key, value in record.items()}

    # ------------------------------------------------------------------ checkpoints (called by the model's hooks)
    def restore_teacher_record(self, checkpoint: dict[str, Any]) -> None:
        """Set ``model.teacher_provenance`` from a checkpoint (rebuilt from its hyper-parameters when it has none)."""
        state = checkpoint.get("state_dict") or {}
        size = len(TEACHER_STATE_PREFIX)
        teacher = {key[size:]: value for key, value in state.items() if key.startswith(TEACHER_STATE_PREFIX)}
        if saved := checkpoint.get(CHECKPOINT_KEY):
            record = {str(key): str(value) for key, value in saved.items()}
        else:  # a checkpoint written before provenance was recorded
            backbone = str((checkpoint.get("hyper_parameters") or {}).get("backbone", ""))
            record = {**dict.fromkeys(PROVENANCE_KEYS, ""), "backbone": backbone, "weights_source": "checkpoint"}
            if teacher:
                record["teacher_sha256"] = state_dict_sha256(teacher)
        if not teacher:
            logger.warning(
                "The checkpoint holds no teacher tensors (%s*): the teacher keeps the weights it was built with.",
                TEACHER_STATE_PREFIX,
            )
        self.model.teacher_provenance = record

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        """anomalib's ``load_from_checkpoint``, with the teacher taken from the checkpoint only (no download, no
        ``backbone_weights`` file: neither needs to be reachable any more)."""
        with restoring_from_checkpoint():
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # ------------------------------------------------------------------ exports
    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        """anomalib's torch export (``{"model": self}`` in ``weights/torch/<name>.pt``) plus ``"metadata"``."""
        from anomalib.deploy.export import ExportType
        from anomalib.models.components.base.export_mixin.utils import create_export_root

        export_root = create_export_root(export_root, ExportType.TORCH)
        pt_model_path = export_root / (model_file_name + ".pt")
        torch.save(obj={"model": self, "metadata": self.export_metadata()}, f=pt_model_path)
        return pt_model_path

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        dynamic_spatial: bool = True,
        **kwargs: Any,
    ) -> Path:
        """anomalib's ONNX export, its input ``H`` / ``W`` dynamic even with ``input_size`` (the graph starts with the
        pre-processor's resize), then the provenance in ``metadata_props``. Static with ``dynamic_spatial=False``, the
        caller's own ``dynamic_axes`` / ``dynamic_shapes``, or no resize (docs/export.md)."""
        if dynamic_spatial and "dynamic_axes" not in kwargs and "dynamic_shapes" not in kwargs:
            if export_resizes_input(self):
                input_size = None  # anomalib's path for a dynamic (batch, H, W) input
            elif input_size is not None:
                logger.warning("%s: the pre-processor has no resize, so the export keeps the static input size %s.",
                               type(self).__name__, tuple(input_size))  # fmt: skip
        onnx_path = super().to_onnx(export_root, model_file_name, input_size, **kwargs)
        write_onnx_metadata(onnx_path, self.export_metadata())
        return onnx_path

    def to_openvino(self, *args: Any, **kwargs: Any) -> Path:
        """anomalib's OpenVINO export (any compression), then the provenance in the IR's ``rt_info``."""
        xml_path = super().to_openvino(*args, **kwargs)
        write_openvino_metadata(xml_path, self.export_metadata())
        return xml_path


def export_resizes_input(model: Any) -> bool:
    """Whether the export transform of ``model``'s pre-processor resizes every input to a fixed ``(H, W)``."""
    from torchvision.transforms.v2 import Compose, Resize

    def fixed_resize(transform: Any) -> bool:
        if isinstance(transform, Resize):
            size = transform.size
            return isinstance(size, list | tuple) and len(size) == 2  # noqa: PLR2004 - (H, W)
        if isinstance(transform, Compose):
            return any(fixed_resize(child) for child in transform.transforms)
        return False

    pre_processor = getattr(model, "pre_processor", None)
    return pre_processor is not None and fixed_resize(getattr(pre_processor, "export_transform", None))


def write_onnx_metadata(onnx_path: str | os.PathLike[str], metadata: dict[str, str]) -> None:
    """Set ``metadata_props`` of an ONNX file in place (external data files are left as they are)."""
    import onnx

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    onnx.helper.set_model_props(model, {**{prop.key: prop.value for prop in model.metadata_props}, **metadata})
    onnx.save(model, str(onnx_path))


def read_onnx_metadata(onnx_path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``anomalib_kd.*`` entries of an ONNX file's ``metadata_props``."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    prefix = METADATA_NAMESPACE + "."
    return {prop.key: prop.value for prop in model.metadata_props if prop.key.startswith(prefix)}


def write_openvino_metadata(xml_path: str | os.PathLike[str], metadata: dict[str, str]) -> None:
    """Add ``rt_info`` entries ``[anomalib_kd, <key>]`` to an OpenVINO IR, keeping every constant's precision."""
    import openvino as ov

    xml_path = Path(xml_path)
    bin_path = xml_path.with_suffix(".bin")
    model = ov.Core().read_model(str(xml_path))
    prefix = METADATA_NAMESPACE + "."
    for key, value in metadata.items():
        model.set_rt_info(value, [METADATA_NAMESPACE, key.removeprefix(prefix)])
    with tempfile.TemporaryDirectory(dir=xml_path.parent) as scratch:
        scratch_xml = Path(scratch) / xml_path.name
        # compress_to_fp16=False: constants are written in the precision they have (FP16 IRs stay FP16)
        ov.save_model(model, str(scratch_xml), compress_to_fp16=False)
        del model
        shutil.move(str(scratch_xml.with_suffix(".bin")), str(bin_path))
        shutil.move(str(scratch_xml), str(xml_path))


def read_openvino_metadata(xml_path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``anomalib_kd`` section of an OpenVINO IR's ``rt_info`` as ``{"anomalib_kd.<key>": value}``."""
    import openvino as ov

    model = ov.Core().read_model(str(xml_path))
    if not model.has_rt_info([METADATA_NAMESPACE]):
        return {}
    section = model.get_rt_info([METADATA_NAMESPACE])
    keys = section.astype(dict).keys() if hasattr(section, "astype") else []
    return {f"{METADATA_NAMESPACE}.{key}": model.get_rt_info([METADATA_NAMESPACE, key]).astype(str) for key in keys}


def read_torch_metadata(pt_path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``"metadata"`` dict of a ``to_torch`` export (unpickles the file: only for files you trust)."""
    return dict(torch.load(pt_path, map_location="cpu", weights_only=False).get("metadata") or {})
