"""PyTorch model of MemKD: "Remembering Normality: Memory-guided Knowledge Distillation
for Unsupervised Anomaly Detection" (Gu et al., ICCV 2023).

MemKD is Reverse Distillation (RD, Deng & Li, CVPR 2022) with three normality recall (NR)
memories inside the student decoder:

* **Teacher**: a frozen ``TimmFeatureExtractor`` (layers 1-3 of a ResNet-family network),
  always kept in eval mode.
* **Bottleneck**: RD's one-class bottleneck embedding, ``get_bottleneck_layer(arch)``.
* **Student**: :class:`~anomalib_memkd.components.MemoryResNetDecoder`. Placement of the
  three memories (the paper only says "the last three stages of the student"): ``M0`` on
  the bottleneck output, ``M1`` on decoder stage 1's output, ``M2`` on decoder stage 2's
  output; each stage consumes ``cat[query, memory(query)]``::

      x = bottleneck(T);  a = layer1(cat[x, M0(x)]);  b = layer2(cat[a, M1(a)]);
      c = layer3(cat[b, M2(b)]);  student [c, b, a]  <->  teacher [layer1, layer2, layer3]

* **Inference** (Eq. 3-4): anomalib's RD ``AnomalyMapGenerator`` in ``ADD`` mode: per level
  ``1 - cos`` over channels, bilinear up-sampling to the input size, sum, Gaussian blur
  with sigma 4; the image score is the maximum of the map.
* **Normality embedding learning** (Sec. 4.2, training only): the exemplar images are
  encoded by the teacher in the same forward pass as the batch. Targets per memory:
  ``M1`` <- teacher ``layer3`` features of the exemplars, ``M2`` <- teacher ``layer2``
  features (the channels of ``M1``/``M2`` are those of the teacher levels their stage
  reconstructs). ``M0`` sits on the bottleneck, whose exemplar target the paper does not
  spell out: here it is the bottleneck's own (one-class) embedding of the exemplar
  teacher features, computed without gradient so that ``L_NM`` only trains the memory. One
  teacher forward runs on ``cat[batch, exemplars]``; the bottleneck runs on the batch (with
  gradient, normalised by the batch's own batch-norm statistics, exactly as RD) and, under
  ``no_grad``, on the exemplars (its running statistics see both: all are normal training
  images). Running the exemplars through the bottleneck's autograd graph would double the
  bottleneck's backward cost for nothing; the decoder runs on the batch only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from anomalib.data import InferenceBatch
from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode, AnomalyMapGenerator
from anomalib.models.image.reverse_distillation.components import get_bottleneck_layer

from anomalib_kd.fast import inference_autocast, set_channels_last
from anomalib_kd.weights import build_teacher

from .components import NRMemory, get_memory_decoder

#: Total stride of teacher + bottleneck; input height and width must be multiples of it.
SIZE_MULTIPLE = 32


class MemKDTrainOutput(NamedTuple):
    """What the training-mode forward returns (everything :class:`~anomalib_memkd.loss.MemKDLoss` needs).

    Attributes:
        teacher_features: Teacher ``[layer1, layer2, layer3]`` features of the batch.
        student_features: Student ``[c, b, a]`` features, aligned with ``teacher_features``.
        exemplar_features: One normality-embedding target per memory ``(M0, M1, M2)``, or
            ``None`` when no exemplars were given.
    """

    teacher_features: list[torch.Tensor]
    student_features: list[torch.Tensor]
    exemplar_features: list[torch.Tensor] | None


def check_input_size(height: int, width: int) -> None:
    """Raise ``ValueError`` unless height and width are multiples of 32 (RD bottleneck/decoder geometry)."""
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        msg = (
            f"MemKD needs an input height and width that are multiples of {SIZE_MULTIPLE} (the reverse-distillation "
            f"bottleneck and decoder would otherwise produce features of the wrong size); got {height}x{width}. "
            f"Set the pre-processor's image size accordingly, e.g. "
            f"MemKD(pre_processor=MemKD.configure_pre_processor(image_size=(256, 256)))."
        )
        raise ValueError(msg)


def _to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Accept 1-channel (replicated to 3) and 4-channel (alpha dropped) images."""
    if images.dim() != 4:
        msg = f"MemKD expects a (B, C, H, W) image tensor, got shape {tuple(images.shape)}."
        raise ValueError(msg)
    channels = images.shape[1]
    if channels == 1:
        return images.repeat(1, 3, 1, 1)
    if channels == 4:
        return images[:, :3]
    if channels != 3:
        msg = f"MemKD expects 1 (grayscale), 3 (RGB) or 4 (RGBA) channel images, got {channels} channels."
        raise ValueError(msg)
    return images


class MemKDModel(nn.Module):
    """Memory-guided knowledge distillation network.

    Args:
        backbone (str): Teacher backbone, a timm name optionally with a pretrained tag
            (e.g. ``"wide_resnet50_2.tv_in1k"``). The bottleneck and decoder use the bare
            architecture name ``backbone.split(".")[0]``, which must be a ResNet-family
            network anomalib's RD supports.
        input_size (tuple[int, int]): ``(H, W)`` of the pre-processed images; the anomaly
            map is produced at this size. Both must be multiples of 32.
        layers (Sequence[str]): Three teacher layers. Defaults to ``("layer1", "layer2", "layer3")``.
        pre_trained (bool): Load pretrained teacher weights. Defaults to ``True``.
        memory_size (int): Items ``L`` per memory. Defaults to ``50``.
        temperature (float): Softmax temperature of Eq. 5/8. Defaults to ``1.0`` (paper).
        backbone_weights (str | None): Local ``.safetensors`` / ``.pth`` file with the teacher's
            weights, loaded instead of downloading (no network access) and checked tensor by tensor
            (see :func:`anomalib_kd.weights.build_teacher`). Defaults to ``None``.

    Attributes:
        teacher_provenance (dict[str, str]): Where the teacher's weights came from: ``backbone``,
            ``weights_source``, ``weights_tag``, ``weights_file``, ``weights_sha256`` (of the file, or of
            the loaded state dict: ``weights_sha256_of``) and ``teacher_sha256``.

    Example:
        >>> model = MemKDModel("resnet18", input_size=(64, 64), pre_trained=False).eval()
        >>> out = model(torch.rand(2, 3, 64, 64))
        >>> out.pred_score.shape, out.anomaly_map.shape
        (torch.Size([2]), torch.Size([2, 1, 64, 64]))
    """

    def __init__(
        self,
        backbone: str,
        input_size: tuple[int, int],
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = True,
        memory_size: int = 50,
        temperature: float = 1.0,
        backbone_weights: str | None = None,
    ) -> None:
        super().__init__()
        layers = list(layers)
        if len(layers) != 3:
            msg = f"MemKD distils exactly three teacher layers (the RD bottleneck fuses three), got {layers}."
            raise ValueError(msg)
        input_size = (int(input_size[0]), int(input_size[1]))
        check_input_size(*input_size)
        arch = backbone.split(".")[0]

        self.encoder, self.teacher_provenance = build_teacher(backbone, layers, pre_trained, backbone_weights)
        self.bottleneck = get_bottleneck_layer(arch)
        self.decoder = get_memory_decoder(arch)

        expansion = self.decoder.block_expansion
        expected = [64 * expansion, 128 * expansion, 256 * expansion]
        if list(self.encoder.out_dims) != expected:
            msg = (
                f"Teacher layers {layers} of {backbone!r} have {list(self.encoder.out_dims)} channels, but the "
                f"{arch} bottleneck/decoder expect {expected}."
            )
            raise ValueError(msg)

        self.memories = nn.ModuleList(
            NRMemory(memory_size, channels, temperature) for channels in self.decoder.memory_channels
        )
        self.anomaly_map_generator = AnomalyMapGenerator(image_size=input_size, mode=AnomalyMapGenerationMode.ADD)
        self.fast_inference = False

    def set_fast_inference(self, enabled: bool) -> None:
        """Opt-in fast eval path (autocast fp16 on CUDA / bf16 on CPU, channels-last), see :mod:`anomalib_kd.fast`."""
        self.fast_inference = bool(enabled)
        set_channels_last(self, self.fast_inference)

    @property
    def input_size(self) -> tuple[int, int]:
        """``(H, W)`` of the anomaly map."""
        return tuple(self.anomaly_map_generator.image_size)

    @input_size.setter
    def input_size(self, size: Sequence[int]) -> None:
        size = (int(size[0]), int(size[1]))
        check_input_size(*size)
        self.anomaly_map_generator.image_size = size

    def forward(
        self,
        images: torch.Tensor,
        exemplars: torch.Tensor | None = None,
    ) -> MemKDTrainOutput | InferenceBatch:
        """Run the model.

        Args:
            images (torch.Tensor): ``(B, C, H, W)`` pre-processed images, ``C`` in {1, 3, 4};
                ``H`` and ``W`` multiples of 32.
            exemplars (torch.Tensor | None): Training only: ``(N, C, H, W)`` pre-processed
                normal exemplar images for normality embedding learning.

        Returns:
            MemKDTrainOutput | InferenceBatch: In training mode the teacher, student and
            exemplar features; in eval mode ``InferenceBatch(pred_score (B,), anomaly_map
            (B, 1, H_in, W_in))`` where ``(H_in, W_in)`` is ``input_size``.
        """
        self.encoder.eval()
        images = _to_rgb(images)
        check_input_size(images.shape[-2], images.shape[-1])

        if self.training and exemplars is not None:
            exemplars = _to_rgb(exemplars)
            if exemplars.shape[-2:] != images.shape[-2:]:
                msg = f"Exemplars {tuple(exemplars.shape)} and images {tuple(images.shape)} differ in size."
                raise ValueError(msg)
            num_images = images.shape[0]
            features = list(self.encoder(torch.cat([images, exemplars.to(images.dtype)])).values())
            teacher_features = [feature[:num_images] for feature in features]
            student_features = self.decoder(self.bottleneck(teacher_features), self.memories)
            with torch.no_grad():  # a target only: no autograd graph through the bottleneck for the exemplars
                exemplar_embedding = self.bottleneck([feature[num_images:] for feature in features])
            exemplar_features = [
                exemplar_embedding,  # M0: one-class embedding of the exemplars (no gradient)
                features[2][num_images:],  # M1 <- teacher layer3
                features[1][num_images:],  # M2 <- teacher layer2
            ]
            return MemKDTrainOutput(teacher_features, student_features, exemplar_features)

        if self.training:
            teacher_features = list(self.encoder(images).values())
            student_features = self.decoder(self.bottleneck(teacher_features), self.memories)
            return MemKDTrainOutput(teacher_features, student_features, None)

        with inference_autocast(self.fast_inference, images.device):
            if self.fast_inference:
                images = images.contiguous(memory_format=torch.channels_last)
            teacher_features = list(self.encoder(images).values())
            student_features = self.decoder(self.bottleneck(teacher_features), self.memories)
        # the map head stays in float32 (a no-op unless the fast path produced half-precision features)
        anomaly_map = self.anomaly_map_generator(
            [feature.float() for feature in student_features],
            [feature.float() for feature in teacher_features],
        )
        pred_score = torch.amax(anomaly_map, dim=(-3, -2, -1))  # (B,): maximum of the map
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
