"""Normality Recall (NR) memory of MemKD (Gu et al., ICCV 2023, Sec. 4.1-4.2).

An NR memory is a set of ``L`` learnable key-value pairs
``M = {(k_l, v_l)}_{l=1..L}`` with ``k_l, v_l in R^C``.

* **Recall (Eq. 5-6)**: every spatial position ``j`` of a query feature map
  ``F in R^{C x H x W}`` is addressed by the *keys*::

      w_{l,j} = softmax_l( cos(F(:, j), k_l) / tau )          (Eq. 5)
      F_bar(:, j) = sum_l w_{l,j} v_l                          (Eq. 6)

  and the read ``F^R`` (same shape as ``F``) is what the student concatenates
  with the query.
* **Normality embedding learning (Eq. 8-9)**: an exemplar feature map is
  reconstructed by addressing the *values* (the keys are not used)::

      w_{l,j} = softmax_l( cos(F^E(:, j), v_l) / tau )         (Eq. 8)
      F_bar^E(:, j) = sum_l w_{l,j} v_l                        (Eq. 9)

**Temperature.** The paper has no temperature, i.e. ``tau = 1``. Cosines lie in ``[-1, 1]``, so at ``tau = 1`` the
logits span at most 2 nats: with ``L = 50`` a key matching the query exactly (cos 1) against 49 orthogonal keys gets
``e / (e + 49) = 0.053`` of the weight, and the read is ~95 % the *mean* of the values whatever the query (no
selective recall; Eq. 8-9 likewise cannot reconstruct anything but a near-mean of the values). The default of the
models is therefore ``tau = 0.1`` (see :class:`anomalib_memkd.MemKD` for the evidence); ``tau = 1`` is one flag away
(``temperature=1.0``). The same ``tau`` is used in Eq. 5 and Eq. 8.

Layout (measured in the speed benchmark): both operations are batched matrix products over all ``H*W`` positions
at once, reading the ``(B, C, H*W)`` flat view of the feature map without a copy. The similarities are computed as
``(B, H*W, L)`` = (flat map)^T @ (normalised items / tau)^T, i.e. with the long ``H*W`` axis as the rows of the
product (BLAS reads the transposed view in place) and the softmax over the contiguous last axis; they are divided by
the per-position query norm (``L`` numbers per position, instead of normalising the ``C``-channel map). The read is
``(B, C, H*W)`` = values^T @ weights^T, already the ``(B, C, H, W)`` memory layout: no transpose copy. The first
layout tried (items @ flat map, softmax over a strided axis, ``torch.matmul`` broadcasting) was ~2x slower at bs1 on
the CPU. No Python loop over positions, so the memory exports to ONNX / OpenVINO unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

#: as ``torch.nn.functional.normalize``: norms are clamped to this before dividing
_EPS = 1e-12


class NRMemory(nn.Module):
    """Key-value normality recall memory.

    Args:
        num_items (int): Number of key-value pairs ``L`` (paper: 50).
        channels (int): Channel count ``C`` of the feature maps the memory reads and learns.
        temperature (float): Softmax temperature ``tau`` applied to the cosine
            similarities of Eq. 5 and Eq. 8. ``1.0`` reproduces the paper's formula.
            Defaults to ``1.0`` here; :class:`anomalib_memkd.MemKD` defaults to ``0.1``.

    Attributes:
        keys (nn.Parameter): ``(L, C)`` key items ``k_l``.
        values (nn.Parameter): ``(L, C)`` value items ``v_l``.

    Initialisation: keys and values are drawn independently from a standard normal
    distribution (``torch.randn``). Keys are only used through cosine similarities, so
    their scale is irrelevant; unit-variance values have the per-channel scale of the
    batch-normalised, ReLU-activated features they are concatenated with and are
    trained towards (teacher features, Eq. 10). The paper only says "randomly
    initialize".

    Example:
        >>> memory = NRMemory(num_items=50, channels=256)
        >>> query = torch.randn(2, 256, 16, 16)
        >>> memory(query).shape
        torch.Size([2, 256, 16, 16])
    """

    def __init__(self, num_items: int, channels: int, temperature: float = 1.0) -> None:
        super().__init__()
        if num_items < 1:
            msg = f"An NR memory needs at least one item, got num_items={num_items}."
            raise ValueError(msg)
        if channels < 1:
            msg = f"channels must be positive, got {channels}."
            raise ValueError(msg)
        if not (temperature > 0 and math.isfinite(temperature)):
            msg = f"temperature must be a positive finite number, got {temperature}."
            raise ValueError(msg)
        self.num_items = num_items
        self.channels = channels
        self.temperature = float(temperature)
        self.keys = nn.Parameter(torch.randn(num_items, channels))
        self.values = nn.Parameter(torch.randn(num_items, channels))

    def extra_repr(self) -> str:
        """Summary shown by ``print(module)``."""
        return f"num_items={self.num_items}, channels={self.channels}, temperature={self.temperature}"

    def _weights(self, features: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Softmax over items of ``cos(position, item) / tau`` for every position and every item.

        Args:
            features (torch.Tensor): ``(B, C, H, W)`` feature map.
            items (torch.Tensor): ``(L, C)`` keys or values.

        Returns:
            torch.Tensor: ``(B, H*W, L)`` addressing weights; each row sums to one.
        """
        batch = features.shape[0]
        flat = features.flatten(2)  # (B, C, HW), a view
        inverse_norm = (flat * flat).sum(dim=1).clamp_min(_EPS * _EPS).rsqrt().unsqueeze(-1)  # (B, HW, 1)
        scaled_items = F.normalize(items, dim=-1, eps=_EPS) * (1.0 / self.temperature)  # (L, C), 1/tau folded in
        scaled_items = scaled_items.to(flat.dtype).t().expand(batch, -1, -1)  # (B, C, L), no copy
        logits = torch.bmm(flat.transpose(1, 2), scaled_items) * inverse_norm  # (B, HW, L) = cos / tau
        return torch.softmax(logits, dim=-1)

    def _aggregate(self, weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the values: ``(C, L) @ (B, L, HW)``, viewed as ``like``'s ``(B, C, H, W)``."""
        values = self.values.t().to(weights.dtype).expand(weights.shape[0], -1, -1)  # (B, C, L), no copy
        return torch.bmm(values, weights.transpose(1, 2)).view(like.shape)

    def key_weights(self, query: torch.Tensor) -> torch.Tensor:
        """Eq. 5: read weights ``w_{k_l, j}``, shape ``(B, H*W, L)``, addressing by keys."""
        return self._weights(query, self.keys)

    def value_weights(self, features: torch.Tensor) -> torch.Tensor:
        """Eq. 8: weights ``w_{v_l, j}``, shape ``(B, H*W, L)``, addressing by values only."""
        return self._weights(features, self.values)

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """Recall normality for a query feature map (Eq. 5-6).

        Args:
            query (torch.Tensor): ``(B, C, H, W)`` student feature map.

        Returns:
            torch.Tensor: ``(B, C, H, W)`` recalled feature ``F^R``.
        """
        return self._aggregate(self.key_weights(query), query)

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        """Reconstruct (exemplar) features from the values alone (Eq. 8-9).

        Args:
            features (torch.Tensor): ``(N, C, H, W)`` normality embedding ``F^E``.

        Returns:
            torch.Tensor: ``(N, C, H, W)`` reconstruction ``F_bar^E``. Gradients reach
            only :attr:`values` (and ``features`` if it requires grad).
        """
        return self._aggregate(self.value_weights(features), features)

    @torch.no_grad()
    def addressing_statistics(self, query: torch.Tensor) -> dict[str, torch.Tensor]:
        """How selective the recall of ``query`` is, per position (the figures of ``MemKD.mechanism_report``).

        Args:
            query (torch.Tensor): ``(B, C, H, W)`` student query.

        Returns:
            dict[str, torch.Tensor]: each ``(B, H*W)``: ``peak`` = max read weight (``1/L`` for uniform addressing,
            1 for one-hot), ``entropy_ratio`` = entropy of the read weights / ``log L`` (1 = uniform, 0 = one-hot;
            0 when ``L = 1``), ``recall_dev`` = ``||F^R - mean_l(v_l)|| / ||F^R||`` (0 when every position reads
            the mean of the values, i.e. the recall does not depend on the query).
        """
        weights = self.key_weights(query).float()  # (B, HW, L)
        peak = weights.amax(dim=-1)
        entropy = -(weights * weights.clamp_min(1e-30).log()).sum(dim=-1)
        entropy_ratio = entropy / math.log(self.num_items) if self.num_items > 1 else torch.zeros_like(entropy)
        read = torch.matmul(weights, self.values.float())  # (B, HW, C)
        mean_value = self.values.float().mean(dim=0)
        recall_dev = (read - mean_value).norm(dim=-1) / read.norm(dim=-1).clamp_min(_EPS)
        return {"peak": peak, "entropy_ratio": entropy_ratio, "recall_dev": recall_dev}
