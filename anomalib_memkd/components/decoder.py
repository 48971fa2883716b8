"""Student decoder of MemKD: anomalib's RD ``ResNetDecoder`` with an NR memory inside each of its three stages.

MemKD (Gu et al., ICCV 2023) builds on Reverse Distillation: a frozen teacher encoder, RD's one-class bottleneck
(OCBE) and a ResNet decoder (the student) whose stages produce features of the shapes of teacher ``layer3``,
``layer2`` and ``layer1``. The paper inserts three NR memories "into the last three stages of the student"; memory
``i`` is queried by the student feature ``F_{S_i}`` of stage ``i`` and learns (NEL, Eq. 8-10) from the teacher's
features "of the i-th stage" ``F_{T_i}^E``. Key, value, query and target therefore share one channel count ``C_i``,
the teacher stage's.

**The query here is not the paper's** ``F_{S_i}``. In the paper the query is the stage's output, the feature that
Eq. 1 compares with ``F_{T_i}``, and the next stage consumes the recall. Here the query ``q`` is the stage's
*intermediate* feature after its first (up-sampling) block, which has ``F_{T_i}``'s shape. The rest of the same
stage consumes ``cat[q, recall]``, and the stage's output (the ``F_{S_i}`` compared in Eq. 1 and Eq. 3) comes after
the recall. The reason: RD's decoder has no stage after the one that reconstructs teacher ``layer1``, so that memory
could only be consumed inside its own stage; all three memories are placed alike. See
:mod:`anomalib_memkd.torch_model` for the full reasoning and the memory arithmetic::

    x = OCBE(teacher features)                                (RD's bottleneck, unchanged)
    stage s in (layer1, layer2, layer3) of the decoder, serving teacher level (layer3, layer2, layer1):
        q = stage[0](x)              first (up-sampling) block, unchanged: q has the teacher level's shape
        r = memory(q)                recall F^R (Eq. 5-6), memory of that teacher level
        x = stage[1](cat[q, r])      second block takes 2C channels; its residual (identity) path carries q
        x = stage[2:](x)             remaining blocks unchanged
    student features = [c, b, a] (outputs of layer3, layer2, layer1)  <->  teacher [layer1, layer2, layer3]

The second block of each stage is anomalib's own block type with ``2C`` input channels. Its identity path is the
query ``q`` (the first ``C`` of its ``2C`` input channels): a stride-1 block keeps its input's channels on the
identity path, and the query is that input before the recall was appended, so no projection layer is invented.

**How the recall is computed** (same value, float rounding apart; :meth:`RecallBlock.forward_memory`): the block's
first convolution is linear in the read ``r = V^T A`` (``A`` the ``L`` read weights per position, ``V`` the values),
so its ``r`` half ``W_r`` is folded into the values once per forward, ``W_r * r = (W_r V^T) * A``, and ``r``
itself, the concatenation and the convolution over ``C`` extra channels are never formed. At WideResNet50-2
(``C_out = C / 2``, 1x1) the per-position cost of the recall drops from ``C L + C^2 / 2`` to ``C L / 2``
multiply-adds on top of the ``C L`` of the similarities; at 256 px the eager model's FLOPs went from 1.021x to
1.004x RD's (``torch.utils.flop_counter``, bs1). What the folded path saves besides arithmetic: at bs16 the read and
the concatenation were 64-128 MiB fresh tensors each, whose page faults the CPU pays on every call. A basic-block
decoder (resnet18/34, 3x3 first convolution, ``C_out = C``) gains less and keeps the plain path when
``L > 1.125 C`` (:meth:`RecallBlock.folds_recall`). Exported graphs (ONNX / OpenVINO) keep the plain path, whose
convolution kernels are constants.

The block type, block counts, groups, base width and normalisation are those of anomalib's ``get_decoder(arch)``
(its first blocks are reused as they are), so every backbone RD supports is supported here. Every stage of those
decoders has at least two blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib.models.components.backbone.resnet_decoder import (
    DecoderBasicBlock,
    DecoderBottleneck,
    ResNetDecoder,
    get_decoder,
)

from .memory import NRMemory, _exporting

STAGES = ("layer1", "layer2", "layer3")


class QueryShortcut(nn.Module):
    """Identity path of a :class:`RecallBlock`: the first ``channels`` channels of ``cat[query, recall]``, the query."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """``batch[:, :channels]`` (a view, no copy)."""
        return batch[:, : self.channels]


class RecallBlock(nn.Module):
    """A stride-1 decoder block whose input is ``cat[query, recall]`` (``2C`` channels), identity path = query.

    Args:
        block_type: anomalib's ``DecoderBasicBlock`` or ``DecoderBottleneck``.
        channels (int): ``C``, the query's (and the block's output) channels.
        groups, base_width, norm_layer: as anomalib's decoder.

    The block is anomalib's own (``block_type(2C, C / expansion, stride=1)``, initialised as anomalib's decoder
    initialises its blocks) with :class:`QueryShortcut` on its identity branch. :meth:`forward` runs anomalib's own
    block forward on the concatenation; the decoder calls :meth:`forward_memory`, the same function of the query and
    the memory with the read folded into the first convolution.
    """

    def __init__(
        self,
        block_type: type[DecoderBasicBlock | DecoderBottleneck],
        channels: int,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.block = block_type(
            2 * channels,
            channels // block_type.expansion,
            stride=1,
            upsample=QueryShortcut(channels),
            groups=groups,
            base_width=base_width,
            norm_layer=norm_layer,
        )
        for module in self.block.modules():  # anomalib's ResNetDecoder initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def forward(self, query: torch.Tensor, recall: torch.Tensor) -> torch.Tensor:
        """``relu(branch(cat[query, recall]) + query)``, anomalib's block forward on the concatenation."""
        return self.block(torch.cat([query, recall], dim=1))

    def folds_recall(self, num_items: int, positions: int) -> bool:
        """Whether :meth:`forward_memory` folds the read into the first convolution (the cheaper of the two).

        Per position the plain path costs ``C L`` (the read ``F^R``) + ``k^2 C_out C`` multiply-adds (the first
        convolution over the recall half of its input), the folded one ``k^2 C_out L`` (the same convolution over the
        ``L`` read weights), plus ``k^2 C_out C L`` once per call to form the folded kernel; ``positions`` is
        ``B * H * W`` of the call. Bottleneck decoders (WideResNet50-2: ``k = 1``, ``C_out = C / 2``) fold at any
        useful map size; a basic-block one (resnet18/34: ``k = 3``, ``C_out = C``) gains less and never folds when
        ``L > 1.125 C``.
        """
        conv = self.block.conv1
        taps = conv.kernel_size[0] * conv.kernel_size[1]
        channels = conv.in_channels // 2
        plain = channels * num_items + taps * conv.out_channels * channels
        folded = taps * conv.out_channels * num_items
        return taps * conv.out_channels * channels * num_items + positions * folded < positions * plain

    def forward_memory(self, query: torch.Tensor, memory: NRMemory) -> torch.Tensor:
        """The block on ``cat[query, memory(query)]`` (same value as ``self(query, memory(query))``), cheaper.

        The first convolution ``W = [W_q, W_r]`` (bias-free) is linear in the recall ``F^R = V^T A`` (``A`` the
        ``(L, HW)`` read weights of Eq. 5, ``V`` the ``(L, C)`` values, Eq. 6), so
        ``W_r * F^R = (W_r V^T) * A``: the ``L x C_out`` (``x k x k``) kernel ``W_r V^T`` is formed once per forward
        and convolved with the ``L`` weight maps instead of forming ``F^R`` (``C`` channels), concatenating it and
        convolving ``2C`` channels. Same sum in another order (float rounding apart); gradients reach ``W_r``, the
        values and, through ``A``, the keys and the query as before. The rest of the block is anomalib's block
        forward (``bn1, relu, conv2, bn2, [relu, conv3, bn3]``, ``+ query``, ``relu``), with the query as its
        identity path. Without folding (:meth:`folds_recall`), and always in exported graphs (whose convolution
        kernels stay constants, as weight quantisation needs), it is ``self(query, memory(query))``.
        """
        if _exporting() or not self.folds_recall(memory.num_items, query.shape[0] * query.shape[2] * query.shape[3]):
            return self(query, memory(query))
        block = self.block
        conv = block.conv1
        channels = query.shape[1]
        batch, height, width = query.shape[0], query.shape[2], query.shape[3]
        weights = memory.read_weights(query)  # (B, L, HW), Eq. 5
        # (C_out, C, k, k) each; contiguous: oneDNN convolved the strided slice ~2x slower at 1024 channels (21 ms of
        # 43 ms at 16 x 1024 x 16 x 16 on the CPU) while the copy is C_out * C floats
        w_query, w_recall = conv.weight[:, :channels].contiguous(), conv.weight[:, channels:].contiguous()
        values = memory.values.to(w_recall.dtype)  # (L, C)
        out = F.conv2d(query, w_query, None, conv.stride, conv.padding, conv.dilation)  # RD's convolution
        weights = weights.to(out.dtype)  # one dtype for the in-place product (autocast)
        if conv.kernel_size == (1, 1):
            folded = (values @ w_recall.flatten(1).t()).t().to(out.dtype)  # (C_out, L) = W_r V^T
            folded = folded.expand(batch, -1, -1)
            flat_out = out.flatten(2)  # (B, C_out, HW), a view of the convolution's fresh output
            if flat_out.is_contiguous():  # out += W_r V^T A, accumulated in place (no new map)
                flat_out.baddbmm_(folded, weights)
            else:  # channels-last (fast path): an in-place product into the strided view was ~100x slower
                out = out + torch.bmm(folded, weights).view(batch, -1, height, width)
        else:
            folded = torch.einsum("ocij,lc->olij", w_recall, values).to(out.dtype)  # (C_out, L, k, k)
            weight_map = weights.view(batch, -1, height, width)  # (B, L, H, W)
            out += F.conv2d(weight_map, folded, None, conv.stride, conv.padding, conv.dilation)
        out = block.relu(block.bn1(out))
        if isinstance(block, DecoderBottleneck):
            out = block.relu(block.bn2(block.conv2(out)))
            out = block.bn3(block.conv3(out))
        else:
            out = block.bn2(block.conv2(out))
        out += query
        return block.relu(out)


class MemoryResNetDecoder(nn.Module):
    """anomalib's RD decoder with a memory recall inside every stage (after its first, up-sampling block).

    Args:
        reference (ResNetDecoder): anomalib's decoder for the architecture (``get_decoder(arch)``); its first block
            of each stage and its blocks after the second are reused, the second block of each stage is rebuilt
            with ``2C`` input channels (same type, width, groups, normalisation; anomalib's initialisation).
    """

    def __init__(self, reference: ResNetDecoder) -> None:
        super().__init__()
        first = reference.layer1[0]
        block_type = type(first)
        self.block_expansion = block_type.expansion
        norm_layer = reference._norm_layer  # noqa: SLF001
        for name in STAGES:
            stage = getattr(reference, name)
            if len(stage) < 2:  # pragma: no cover - every anomalib decoder has >= 2 blocks per stage
                msg = f"MemKD needs at least two blocks in decoder {name}, got {len(stage)}."
                raise ValueError(msg)
            channels = stage[0].upsample[0].out_channels
            block = RecallBlock(block_type, channels, reference.groups, reference.base_width, norm_layer)
            setattr(self, name, nn.Sequential(stage[0], block, *list(stage)[2:]))

    @property
    def memory_channels(self) -> tuple[int, int, int]:
        """Channels of the three memories in *teacher* order ``(layer1, layer2, layer3)``: 64/128/256 x expansion."""
        expansion = self.block_expansion
        return (64 * expansion, 128 * expansion, 256 * expansion)

    def decode(
        self,
        batch: torch.Tensor,
        memories: Sequence[nn.Module],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Decode and also return the memory queries.

        Args:
            batch (torch.Tensor): ``(B, 512 * expansion, H/32, W/32)`` bottleneck output.
            memories (Sequence[nn.Module]): The three NR memories in teacher order ``(layer1, layer2, layer3)``;
                each maps a ``(B, C, h, w)`` query to a ``(B, C, h, w)`` read.

        Returns:
            tuple: student features ``[c, b, a]`` (strides 4, 8, 16, aligned with the teacher's
            ``[layer1, layer2, layer3]``) and the three queries, also in teacher order.
        """
        queries: list[torch.Tensor] = [batch, batch, batch]
        features = batch
        outputs = []
        for name, memory_index in zip(STAGES, (2, 1, 0), strict=True):
            stage = getattr(self, name)
            query = stage[0](features)
            queries[memory_index] = query
            memory = memories[memory_index]
            if isinstance(memory, NRMemory):
                features = stage[1].forward_memory(query, memory)
            else:
                features = stage[1](query, memory(query))
            for block in list(stage)[2:]:
                features = block(features)
            outputs.append(features)
        feature_a, feature_b, feature_c = outputs
        return [feature_c, feature_b, feature_a], queries

    def forward(self, batch: torch.Tensor, memories: Sequence[nn.Module]) -> list[torch.Tensor]:  # type: ignore[override]
        """Student features ``[c, b, a]`` (see :meth:`decode`)."""
        return self.decode(batch, memories)[0]


def get_memory_decoder(arch: str) -> MemoryResNetDecoder:
    """Build the MemKD student decoder for a ResNet-family architecture.

    Args:
        arch (str): Bare architecture name, e.g. ``"wide_resnet50_2"`` or ``"resnet18"`` (no timm pretrained tag).

    Returns:
        MemoryResNetDecoder: Randomly initialised decoder (anomalib's ``get_decoder(arch)`` plus the recall blocks).
    """
    return MemoryResNetDecoder(get_decoder(arch))
