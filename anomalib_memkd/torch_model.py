"""PyTorch model of MemKD: "Remembering Normality: Memory-guided Knowledge Distillation
for Unsupervised Anomaly Detection" (Gu et al., ICCV 2023).

MemKD is Reverse Distillation (RD, Deng & Li, CVPR 2022) with three normality recall (NR)
memories inside the student decoder:

* **Teacher**: a frozen ``TimmFeatureExtractor`` (layers 1-3 of a ResNet-family network),
  always kept in eval mode.
* **Bottleneck**: RD's one-class bottleneck embedding, ``get_bottleneck_layer(arch)``, unchanged.
* **Student**: :class:`~anomalib_memkd.components.MemoryResNetDecoder`: anomalib's RD decoder with one memory
  inside each of its three stages, after the stage's first (up-sampling) block, where the student feature has the
  shape of the teacher level the stage reconstructs; the rest of the stage encodes ``cat[query, recall]``::

      x = bottleneck(T)
      q3 = layer1[0](x);  a = layer1[1:](cat[q3, M2(q3)])     (teacher layer3 shape; M2 <- teacher layer3)
      q2 = layer2[0](a);  b = layer2[1:](cat[q2, M1(q2)])     (teacher layer2 shape; M1 <- teacher layer2)
      q1 = layer3[0](b);  c = layer3[1:](cat[q1, M0(q1)])     (teacher layer1 shape; M0 <- teacher layer1)
      student [c, b, a]  <->  teacher [layer1, layer2, layer3]

  Memory ``m`` (``memories[m]``) serves teacher layer ``layers[m]``: its items have that layer's channels and its
  normality-embedding target is that layer's (fixed) teacher feature of the exemplars.

**Why this placement** (the paper says only "insert three memory modules into the last three stages of the
student"). Sec. 4: memory ``i`` is queried by the student feature ``F_{S_i}`` "at the i-th stage", and (Sec. 4.2)
"the teacher T encodes [the exemplars] into features of the i-th stage" ``F_{T_i}^E``, which the same value items
must reconstruct (Eq. 8-10). Keys, values, the query and the NEL target thus share the channel count ``C_i`` of
teacher stage ``i``: the three memories have the channels of teacher ``layer1/2/3`` (WRN50: 256 / 512 / 1024) and
sit where the student has those shapes. Their query is the stage's intermediate feature after its first block, not
the stage output ``F_{S_i}`` that Eq. 1 compares (see the reading of "next stage" below). Of the placements below,
Tab. 3's size is closest to this one. Memory bytes at WideResNet50-2, fp32, keys + values, ``sum_m L_m * C_m * 2 * 4``:

    ======================================================  ===========================  =================
    placement (C per memory)                                L = 50/50/50                 values only
    ======================================================  ===========================  =================
    bottleneck + decoder stages 1, 2 outputs (2048/1024/512)  50 * 3584 * 8 = 1.43 MB     0.72 MB
    teacher-level features (256/512/1024), this module         50 * 1792 * 8 = 0.72 MB     0.36 MB (0.34 MiB)
    same, Tab. 4b's 100/50/10 (L_1 at layer1)                  61440 * 8 = 0.49 MB         0.25 MB
    ======================================================  ===========================  =================

Tab. 3 reports 0.3 MB for the three memories. No three-memory placement reaches 0.3 MB counting keys and values
(the teacher-level one is the smallest: every other stage output of the student is wider). The teacher-level
placement comes closest: its values alone are 0.36 MB (0.34 MiB) against the paper's 0.3 MB (the paper does not
say what it counts), and the bottleneck placement is twice the size under either count. The previous reading of
this package (a memory on the bottleneck output) had no teacher feature of its channel count to learn from and had
to invent a target that moved during training (the trainable bottleneck's own embedding). Here every target is a
fixed teacher feature and the exemplar pass never runs the bottleneck (its BatchNorm statistics see the training
batches only, as in RD).

"the student network of next stage encodes ``F^M_{S_i}``" is read as "the following blocks": RD's decoder has no
stage after the one that reconstructs teacher ``layer1``, so a memory there could only be consumed by the blocks of
its own stage; all three memories are placed alike (after the first block of their stage).

**Per-memory L.** ``memory_size`` is one ``L`` for all or ``(L_1, L_2, L_3)`` in teacher-layer order, as Tab. 4b
indexes them; default 50/50/50, the paper's choice "for the sake of higher I-AUC" (99.6 vs 99.4 for 100/50/10,
which has the better P-PRO, 94.6 vs 94.5).

* **Inference** (Eq. 3-4): anomalib's RD ``AnomalyMapGenerator`` in ``ADD`` mode: per level
  ``1 - cos`` over channels, bilinear up-sampling to the input size, sum, Gaussian blur
  with sigma 4; the image score is the maximum of the map.
* **Normality embedding learning** (Sec. 4.2, training only): the exemplar images are encoded by the (frozen,
  eval-mode) teacher in the same forward as the batch (one teacher call on ``cat[batch, exemplars]``; the teacher's
  BatchNorm uses its running statistics, so the batch's features do not depend on the exemplars). Target of memory
  ``m``: teacher ``layers[m]`` features of the exemplars (no gradient: the teacher is frozen). The bottleneck and the
  decoder run on the batch only.
* ``use_memory=False`` builds anomalib's plain RD decoder (``get_decoder(arch)``, the same width) and no memories:
  the "memory off" ablation, i.e. RD with MemKD's recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from anomalib.data import InferenceBatch
from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode, AnomalyMapGenerator
from anomalib.models.image.reverse_distillation.components import get_bottleneck_layer

from anomalib_kd_base.fast import inference_autocast, set_channels_last
from anomalib_kd_base.model import SIZE_MULTIPLE, check_size_multiple
from anomalib_kd_base.weights import build_teacher

from anomalib.models.components.backbone.resnet_decoder import get_decoder

from .components import NRMemory, get_memory_decoder

class MemKDTrainOutput(NamedTuple):
    """What the training-mode forward returns (everything :class:`~anomalib_memkd.loss.MemKDLoss` needs).

    Attributes:
        teacher_features: Teacher ``[layer1, layer2, layer3]`` features of the batch.
        student_features: Student ``[c, b, a]`` features, aligned with ``teacher_features``.
        exemplar_features: One normality-embedding target per memory ``(M0, M1, M2)``: the teacher's
            ``[layer1, layer2, layer3]`` features of the exemplars; ``None`` when no exemplars were given (or the
            model has no memory).
    """

    teacher_features: list[torch.Tensor]
    student_features: list[torch.Tensor]
    exemplar_features: list[torch.Tensor] | None


def check_input_size(height: int, width: int) -> None:
    """Raise ``ValueError`` unless height and width are multiples of 32 (the base's check, MemKD's message)."""
    msg = (
        f"MemKD needs an input height and width that are multiples of {SIZE_MULTIPLE} (the reverse-distillation "
        f"bottleneck and decoder would otherwise produce features of the wrong size); got {height}x{width}. "
        f"Set the pre-processor's image size accordingly, e.g. "
        f"MemKD(pre_processor=MemKD.configure_pre_processor(image_size=(256, 256)))."
    )
    check_size_multiple(height, width, msg)


def memory_sizes(memory_size: int | Sequence[int]) -> tuple[int, int, int]:
    """``L`` of the three memories ``(L_1, L_2, L_3)`` (teacher-layer order) from one int or three."""
    if isinstance(memory_size, int):
        sizes = (memory_size,) * 3
    else:
        sizes = tuple(int(size) for size in memory_size)
    if len(sizes) != 3 or any(size < 1 for size in sizes):
        msg = f"memory_size must be a positive int or three positive ints (L_1, L_2, L_3), got {memory_size!r}."
        raise ValueError(msg)
    return sizes  # type: ignore[return-value]


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
        memory_size (int | Sequence[int]): Items ``L`` per memory, one value for all three or
            ``(L_1, L_2, L_3)`` in teacher-layer order (Tab. 4b). Defaults to ``50`` (paper).
        temperature (float): Softmax temperature of Eq. 5/8. Defaults to ``1.0``, the paper's formula (see
            :class:`anomalib_memkd.MemKD`).
        use_memory (bool): ``False`` builds anomalib's plain RD decoder and no memories. Defaults to ``True``.
        backbone_weights (str | None): Local ``.safetensors`` / ``.pth`` file with the teacher's
            weights, loaded instead of downloading (no network access) and checked tensor by tensor
            (see :func:`anomalib_kd_base.weights.build_teacher`). Defaults to ``None``.

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
        memory_size: int | Sequence[int] = 50,
        temperature: float = 1.0,
        backbone_weights: str | None = None,
        use_memory: bool = True,
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
        self.use_memory = bool(use_memory)
        self.decoder = get_memory_decoder(arch) if self.use_memory else get_decoder(arch)

        expansion = type(self.decoder.layer1[0]).expansion
        expected = [64 * expansion, 128 * expansion, 256 * expansion]
        if list(self.encoder.out_dims) != expected:
            msg = (
                f"Teacher layers {layers} of {backbone!r} have {list(self.encoder.out_dims)} channels, but the "
                f"{arch} bottleneck/decoder expect {expected}."
            )
            raise ValueError(msg)

        sizes = memory_sizes(memory_size)
        self.memories = nn.ModuleList(
            NRMemory(size, channels, temperature) for size, channels in zip(sizes, expected, strict=True)
        ) if self.use_memory else nn.ModuleList()
        self.anomaly_map_generator = AnomalyMapGenerator(image_size=input_size, mode=AnomalyMapGenerationMode.ADD)
        self.fast_inference = False

    def set_fast_inference(self, enabled: bool) -> None:
        """Opt-in fast eval path (autocast fp16 on CUDA / bf16 on CPU, channels-last), see :mod:`anomalib_kd_base.fast`."""
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

    def decode(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        """Student features ``[c, b, a]`` of a bottleneck embedding (with the memories' recall, if any)."""
        if self.use_memory:
            return self.decoder(embedding, self.memories)
        return self.decoder(embedding)

    @torch.no_grad()
    def memory_queries(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The three memory queries (teacher order) of pre-processed ``images``, as the eval forward computes them."""
        if not self.use_memory:
            return []
        images = _to_rgb(images)
        teacher_features = list(self.encoder(images).values())
        return self.decoder.decode(self.bottleneck(teacher_features), self.memories)[1]

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

        if self.training:
            num_images = images.shape[0]
            with_exemplars = exemplars is not None and self.use_memory
            if with_exemplars:
                exemplars = _to_rgb(exemplars)
                if exemplars.shape[-2:] != images.shape[-2:]:
                    msg = f"Exemplars {tuple(exemplars.shape)} and images {tuple(images.shape)} differ in size."
                    raise ValueError(msg)
                # one teacher call (eval-mode BatchNorm: the batch's features do not depend on the exemplars)
                features = list(self.encoder(torch.cat([images, exemplars.to(images.dtype)])).values())
                teacher_features = [feature[:num_images] for feature in features]
                exemplar_features = [feature[num_images:] for feature in features]  # memory m <- teacher layers[m]
            else:
                teacher_features = list(self.encoder(images).values())
                exemplar_features = None
            student_features = self.decode(self.bottleneck(teacher_features))
            return MemKDTrainOutput(teacher_features, student_features, exemplar_features)

        with inference_autocast(self.fast_inference, images.device):
            if self.fast_inference:
                images = images.contiguous(memory_format=torch.channels_last)
            teacher_features = list(self.encoder(images).values())
            student_features = self.decode(self.bottleneck(teacher_features))
        # the map head stays in float32 (a no-op unless the fast path produced half-precision features)
        anomaly_map = self.anomaly_map_generator(
            [feature.float() for feature in student_features],
            [feature.float() for feature in teacher_features],
        )
        pred_score = torch.amax(anomaly_map, dim=(-3, -2, -1))  # (B,): maximum of the map
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
