"""Residual Anomaly Amplification (RAA), AAND paper Sec. III-B, Eq. (1)-(6).

One :class:`ResidualAnomalyAmplification` module sits on each teacher level. It takes the frozen
teacher's feature map ``F_T`` and returns

* the matching-guided residual gate ``w^a`` (Eq. 2-4): a position encoding is added to ``F_T``,
  a 1x1-conv MLP projects it to queries, the queries are matched (cosine similarity / temperature,
  softmax over all ``2L`` items) against ``L`` normal and ``L`` anomaly memory items, and the gate is
  the summed weight of the anomaly items;
* the attribute-scaling residual ``Delta = tanh(MLP(F_T)) * F_T`` (Eq. 5);
* the advanced feature ``F_A = F_T + g * Delta`` (Eq. 1), where ``g`` is the predicted gate, or
  the ground-truth anomaly mask during stage 1 (Eq. 6).

The levels are amplified *in parallel*: the backbone forward is unchanged (layer2 consumes the
un-amplified layer1), so the vanilla features come for free next to the amplified ones.

Initialisation (the paper is silent; matched to the public reference implementation): the memory items are
drawn from ``N(0, 1)`` (norm about ``sqrt(C)``; the cosine matching ignores the norm, but under Adam the step
size is per coordinate, so the norm sets how fast an item's *direction* moves - a ``1/sqrt(C)`` scaling would
make it move ``sqrt(C)`` times faster), and the *weight* of every 1x1 convolution of the two MLPs is re-initialised
Kaiming-normal with ``mode="fan_out"`` (ReLU gain); the biases keep PyTorch's default (uniform in
``+-1/sqrt(fan_in)``), as the reference's init loop touches only the weights.
"""

from __future__ import annotations

import torch
from anomalib.models.image.cflow.utils import positional_encoding_2d
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_kd_base.model import check_at_least, check_positive


def _mlp(channels: int, hidden: int) -> nn.Sequential:
    """1x1-conv MLP ``C -> h -> h -> C`` applied independently at each position (Kaiming fan-out weights, default biases)."""
    mlp = nn.Sequential(
        nn.Conv2d(channels, hidden, kernel_size=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, hidden, kernel_size=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, channels, kernel_size=1),
    )
    for module in mlp.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return mlp


class MatchingGuidedResidualGate(nn.Module):
    """Matching-guided residual gate (MRG), Eq. (2)-(4).

    Args:
        channels: channels ``C`` of the teacher level (a multiple of 4, for the sin/cos encoding).
        memory_size: ``L``, the number of normal and of anomaly memory items (``2L`` in all).
        hidden: hidden width of the projection MLP (``min(2C, 1024)`` when ``None``).
        temperature: ``tau`` dividing the cosine similarities before the softmax.
    """

    def __init__(self, channels: int, memory_size: int = 50, hidden: int | None = None, temperature: float = 0.2) -> None:
        super().__init__()
        check_at_least("memory_size", memory_size, 1)
        check_positive("temperature", temperature)
        self.channels = channels
        self.memory_size = memory_size
        self.temperature = temperature
        self.projection = _mlp(channels, hidden or min(2 * channels, 1024))
        # rows [0, L) are the normal memory M^n, rows [L, 2L) the anomaly memory M^a
        self.memory = nn.Parameter(torch.randn(2 * memory_size, channels))  # N(0, 1), see the module docstring
        self._pe_cache: tuple[tuple[int, int], torch.Tensor] | None = None

    def position_encoding(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """Fixed 2-D sin/cos position encoding ``p_c`` of shape ``(1, C, H, W)`` (anomalib's CFlow helper)."""
        cache = self._pe_cache
        if cache is None or cache[0] != (height, width) or cache[1].device != like.device:
            encoding = positional_encoding_2d(self.channels, height, width).unsqueeze(0).to(like.device)
            self._pe_cache = ((height, width), encoding)
        return self._pe_cache[1].to(like.dtype)

    def similarity(self, features: torch.Tensor) -> torch.Tensor:
        """``s(q_i, m_j) / tau`` for all ``2L`` memory items, shape ``(B, 2L, H, W)`` (Eq. 2-3)."""
        _, _, height, width = features.shape
        queries = self.projection(features + self.position_encoding(height, width, features))  # Eq. 2
        return (
            torch.einsum("bchw,mc->bmhw", F.normalize(queries, dim=1), F.normalize(self.memory, dim=1))
            / self.temperature
        )

    def memory_weights(self, features: torch.Tensor) -> torch.Tensor:
        """The ``2L`` matching weights of Eq. (3), normalised over both memories together."""
        return torch.softmax(self.similarity(features), dim=1)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Log-odds of the gate: ``log sum_a exp(s/tau) - log sum_n exp(s/tau)``, shape ``(B, 1, H, W)``.

        ``sigmoid`` of this equals the summed softmax weight of the anomaly items (Eq. 3-4); working in
        log-odds keeps the focal loss numerically stable when the gate saturates.
        """
        normal, anomaly = self.similarity(features).split(self.memory_size, dim=1)
        return torch.logsumexp(anomaly, dim=1, keepdim=True) - torch.logsumexp(normal, dim=1, keepdim=True)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(gate, logits)``, each ``(B, 1, H, W)``; ``gate = w^a in [0, 1]`` (Eq. 4)."""
        logits = self.logits(features)
        return torch.sigmoid(logits), logits


class AttributeScalingResidualGenerator(nn.Module):
    """Attribute-scaling residual generator (ARG), Eq. (5): ``Delta = tanh(MLP(F)) * F``."""

    def __init__(self, channels: int, hidden: int | None = None) -> None:
        super().__init__()
        self.projection = _mlp(channels, hidden or min(2 * channels, 1024))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.projection(features)) * features


class ResidualAnomalyAmplification(nn.Module):
    """RAA module of one teacher level: gate (MRG) + residual generator (ARG), Eq. (1)."""

    def __init__(self, channels: int, memory_size: int = 50, temperature: float = 0.2, hidden: int | None = None) -> None:
        super().__init__()
        self.gate = MatchingGuidedResidualGate(channels, memory_size, hidden, temperature)
        self.generator = AttributeScalingResidualGenerator(channels, hidden)

    def forward(
        self,
        features: torch.Tensor,
        residual_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Amplify one level.

        Args:
            features: vanilla teacher features ``F_T`` of shape ``(B, C, H, W)``.
            residual_weight: ``(B, 1, H, W)`` weight of the residual. ``None`` uses the predicted
                gate (Eq. 1, stage 2 and inference); stage 1 passes the binary ground truth (Eq. 6).

        Returns:
            ``(advanced, gate, gate_logits, residual)``.
        """
        gate, logits = self.gate(features)
        residual = self.generator(features)
        weight = gate if residual_weight is None else residual_weight
        return features + weight * residual, gate, logits, residual
