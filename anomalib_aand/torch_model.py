"""PyTorch model of AAND: frozen teacher + RAA modules (advanced teacher) + RD student.

Inference, Eq. (13)-(14): ``F_A = F_T + w^a * Delta`` on every level with the predicted gate; the RD
bottleneck and decoder reconstruct ``F_S`` from ``F_A``; the anomaly map is the sum over levels of the
bilinearly up-sampled ``1 - cos(F_A, F_S)``, smoothed by a Gaussian (sigma = 4); the image score is the
map's maximum. anomalib's RD ``AnomalyMapGenerator`` computes exactly that (``mode="add"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components.backbone import get_decoder
from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode, AnomalyMapGenerator
from anomalib.models.image.reverse_distillation.components import get_bottleneck_layer
from torch import nn

from anomalib_kd_base.fast import inference_autocast, set_channels_last
from anomalib_kd_base.model import SIZE_MULTIPLE, check_size_multiple
from anomalib_kd_base.weights import build_teacher

from .components.raa import ResidualAnomalyAmplification

def architecture_name(backbone: str) -> str:
    """``"wide_resnet50_2.tv_in1k"`` -> ``"wide_resnet50_2"`` (the decoder/bottleneck want the bare name)."""
    return backbone.split(".", 1)[0]


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """Accept grayscale (1 channel) and RGBA (4 channels) batches; anything else but RGB is an error."""
    channels = images.shape[1]
    if channels == 3:
        return images
    if channels == 1:
        return images.expand(-1, 3, -1, -1)
    if channels == 4:
        return images[:, :3]
    msg = f"expected images with 1 (grayscale), 3 (RGB) or 4 (RGBA) channels, got {channels}"
    raise ValueError(msg)


def check_image_size(height: int, width: int, backbone: str) -> None:
    """The RD bottleneck/decoder only reproduce the teacher's shapes for multiples of 32."""
    msg = (
        f"image size {(height, width)} cannot be served by backbone {backbone!r} with the reverse-distillation "
        f"student: height and width must be multiples of {SIZE_MULTIPLE} and at least {2 * SIZE_MULTIPLE}. "
        "Set the pre-processor's image size accordingly (e.g. pre_processor=Aand.configure_pre_processor("
        "image_size=(256, 256)) or --model.pre_processor.transform with a Resize to a multiple of 32)."
    )
    check_size_multiple(height, width, msg, minimum=2 * SIZE_MULTIPLE)


class AandModel(nn.Module):
    """AAND network.

    Args:
        backbone: timm name of the teacher, optionally with a weights tag; default is the torchvision
            ImageNet-V1 WideResNet50-2 the paper used. The RD student is built for the bare architecture.
        input_size: ``(H, W)`` of the pre-processed images (the anomaly map's size).
        layers: the three teacher levels.
        pre_trained: load ImageNet weights into the teacher.
        memory_size: ``L`` normal and ``L`` anomaly memory items per gate.
        gate_temperature: ``tau`` of the gate's softmax over cosine similarities.
        sigma: Gaussian smoothing of the anomaly map.
        backbone_weights: local ``.safetensors`` / ``.pth`` file with the teacher's weights; loaded instead of
            downloading (no network access), checked tensor by tensor (see :func:`anomalib_kd_base.weights.build_teacher`).

    Attributes:
        teacher_provenance: ``backbone``, ``weights_source``, ``weights_tag``, ``weights_file``, ``weights_sha256``
            (of the file, or of the loaded state dict: ``weights_sha256_of``) and ``teacher_sha256``.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        input_size: tuple[int, int] = (256, 256),
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = True,
        memory_size: int = 50,
        gate_temperature: float = 0.2,
        sigma: int = 4,
        backbone_weights: str | None = None,
    ) -> None:
        super().__init__()
        if len(layers) != 3:
            msg = f"AAND's reverse-distillation student needs exactly three teacher layers, got {list(layers)}"
            raise ValueError(msg)
        input_size = tuple(int(v) for v in input_size)
        check_image_size(*input_size, backbone)
        arch = architecture_name(backbone)
        self.backbone = backbone
        self.input_size = input_size
        self.encoder, self.teacher_provenance = build_teacher(backbone, list(layers), pre_trained, backbone_weights)
        self.raa = nn.ModuleList(
            ResidualAnomalyAmplification(channels, memory_size, gate_temperature) for channels in self.encoder.out_dims
        )
        self.bottleneck = get_bottleneck_layer(arch)
        self.decoder = get_decoder(arch)
        self.anomaly_map_generator = AnomalyMapGenerator(
            image_size=input_size,
            sigma=sigma,
            mode=AnomalyMapGenerationMode.ADD,
        )
        self.fast_inference = False
        #: add the gated residual (Eq. 1); ``Aand`` turns it off when no stage 1 is run (``F_A = F_T``)
        self.amplification = True

    def set_fast_inference(self, enabled: bool) -> None:
        """Opt-in fast eval path (autocast fp16 on CUDA / bf16 on CPU, channels-last), see :mod:`anomalib_kd_base.fast`."""
        self.fast_inference = bool(enabled)
        set_channels_last(self, self.fast_inference)

    def set_input_size(self, input_size: tuple[int, int]) -> None:
        """Change the size of the produced anomaly map (the pre-processed image size)."""
        input_size = tuple(int(v) for v in input_size)
        check_image_size(*input_size, self.backbone)
        self.input_size = input_size
        self.anomaly_map_generator.image_size = input_size

    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Vanilla (frozen, ImageNet) teacher features ``F_T`` of the three levels."""
        self.encoder.eval()
        images = as_rgb(images)
        check_image_size(images.shape[-2], images.shape[-1], self.backbone)
        with torch.no_grad():
            return list(self.encoder(images).values())

    def amplify(
        self,
        vanilla: list[torch.Tensor],
        residual_weights: list[torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Advance the teacher features: returns ``(advanced, gates, gate_logits, residuals)`` per level.

        With ``self.amplification`` off (no stage 1 trained the RAA: ``Aand(stage1_epochs=0)``) and no explicit
        ``residual_weights``, the residual is not added: ``F_A = F_T`` (an untrained RAA would otherwise add
        ``w^a Delta`` with ``w^a`` about 0.5 and ``|Delta|`` up to ~0.5 ``|F_T|`` to every feature). Gates and
        residuals are still returned.
        """
        if residual_weights is None and not getattr(self, "amplification", True):
            residual_weights = [features.new_zeros(features.shape[0], 1, *features.shape[-2:]) for features in vanilla]
        weights = residual_weights or [None] * len(vanilla)
        outputs = [raa(features, weight) for raa, features, weight in zip(self.raa, vanilla, weights, strict=True)]
        advanced, gates, logits, residuals = (list(items) for items in zip(*outputs, strict=True))
        return advanced, gates, logits, residuals

    def student_features(self, advanced: list[torch.Tensor]) -> list[torch.Tensor]:
        """RD student: one-class bottleneck + decoder, ``F_S`` aligned with the teacher's levels."""
        return self.decoder(self.bottleneck(advanced))

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]] | InferenceBatch:
        """Training mode: ``(F_A, F_S)`` of normal images (stage 2); eval mode: ``InferenceBatch``.

        In training mode ``F_A`` is the stage-2 *target*: it is computed without autograd, so a loss on
        ``(F_A, F_S)`` back-propagates into the student only, never into the RAA modules.
        """
        if self.training:
            with torch.no_grad():
                advanced = self.amplify(self.teacher_features(images))[0]
            return advanced, self.student_features(advanced)
        with inference_autocast(self.fast_inference, images.device):
            if self.fast_inference:
                images = images.contiguous(memory_format=torch.channels_last)
            advanced = self.amplify(self.teacher_features(images))[0]
            student = self.student_features(advanced)
        # the map head stays in float32 (a no-op unless the fast path produced half-precision features)
        anomaly_map = self.anomaly_map_generator([s.float() for s in student], [a.float() for a in advanced])
        pred_score = torch.amax(anomaly_map, dim=(-2, -1))
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
