"""Student decoder of MemKD: anomalib's RD ``ResNetDecoder`` with 2C-channel stage inputs.

MemKD (Gu et al., ICCV 2023) builds on Reverse Distillation: a frozen teacher encoder,
RD's one-class bottleneck (OCBE) and a ResNet decoder (the student). The paper inserts
three NR memories "into the last three stages of the student"; the read ``F^R`` of each
memory is concatenated with its query ``F`` and "the student network of the next stage
encodes" the concatenation. This module reads that as:

    x = OCBE(teacher features)              (C = 512 * expansion)
    a = layer1(cat[x, M0(x)])               (C = teacher layer3 channels)
    b = layer2(cat[a, M1(a)])               (C = teacher layer2 channels)
    c = layer3(cat[b, M2(b)])               (C = teacher layer1 channels)
    student features = [c, b, a]  aligned with teacher [layer1, layer2, layer3]

i.e. each of the three decoder stages takes twice the channels of RD's decoder stage.
The block type, block counts, groups and base width are read from anomalib's own
``get_decoder(arch)`` so every backbone RD supports is supported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from anomalib.models.components.backbone.resnet_decoder import (
    DecoderBasicBlock,
    DecoderBottleneck,
    ResNetDecoder,
    get_decoder,
)


class MemoryResNetDecoder(ResNetDecoder):
    """``ResNetDecoder`` whose three stages take the query concatenated with its recall.

    Identical to anomalib's decoder except that the first block of each stage (and its
    up-sampling identity branch) receives ``2 * C`` input channels.

    Args:
        block: ``DecoderBasicBlock`` or ``DecoderBottleneck``.
        layers (Sequence[int]): Number of blocks of stages 1, 2 and 3.
        groups (int): Convolution groups (ResNeXt). Defaults to ``1``.
        width_per_group (int): Base width (128 for wide ResNets). Defaults to ``64``.
        norm_layer: Normalisation layer; ``None`` means ``BatchNorm2d``.
    """

    def __init__(
        self,
        block: type[DecoderBasicBlock | DecoderBottleneck],
        layers: Sequence[int],
        groups: int = 1,
        width_per_group: int = 64,
        norm_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__(
            block,
            list(layers),
            groups=groups,
            width_per_group=width_per_group,
            norm_layer=norm_layer,
        )
        self.block_expansion = block.expansion

    def _make_layer(
        self,
        block: type[DecoderBasicBlock | DecoderBottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
    ) -> nn.Sequential:
        # The stage input is cat[query, recalled query]: twice the channels.
        self.inplanes *= 2
        return super()._make_layer(block, planes, blocks, stride)

    @property
    def memory_channels(self) -> tuple[int, int, int]:
        """Channels of the three memory queries: bottleneck output, stage-1 and stage-2 outputs."""
        expansion = self.block_expansion
        return (512 * expansion, 256 * expansion, 128 * expansion)

    def forward(self, batch: torch.Tensor, memories: Sequence[nn.Module]) -> list[torch.Tensor]:  # type: ignore[override]
        """Decode the bottleneck embedding, recalling normality before every stage.

        Args:
            batch (torch.Tensor): ``(B, 512 * expansion, H/32, W/32)`` bottleneck output.
            memories (Sequence[nn.Module]): The three NR memories ``(M0, M1, M2)``; each
                maps a ``(B, C, h, w)`` query to a ``(B, C, h, w)`` read.

        Returns:
            list[torch.Tensor]: ``[c, b, a]`` at strides 4, 8 and 16, aligned with the
            teacher's ``[layer1, layer2, layer3]``.
        """
        feature_a = self.layer1(torch.cat([batch, memories[0](batch)], dim=1))
        feature_b = self.layer2(torch.cat([feature_a, memories[1](feature_a)], dim=1))
        feature_c = self.layer3(torch.cat([feature_b, memories[2](feature_b)], dim=1))
        return [feature_c, feature_b, feature_a]


def get_memory_decoder(arch: str) -> MemoryResNetDecoder:
    """Build the MemKD student decoder for a ResNet-family architecture.

    anomalib's ``get_decoder(arch)`` is built once to read its block type, block counts,
    groups, base width and normalisation layer; the MemKD decoder reuses them.

    Args:
        arch (str): Bare architecture name, e.g. ``"wide_resnet50_2"`` or ``"resnet18"``
            (no timm pretrained tag).

    Returns:
        MemoryResNetDecoder: Randomly initialised decoder.
    """
    reference = get_decoder(arch)
    block = type(reference.layer1[0])
    layers = (len(reference.layer1), len(reference.layer2), len(reference.layer3))
    return MemoryResNetDecoder(
        block,
        layers,
        groups=reference.groups,
        width_per_group=reference.base_width,
        norm_layer=reference._norm_layer,  # noqa: SLF001
    )
