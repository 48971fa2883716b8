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

``tau`` is the softmax temperature; the paper has none, i.e. ``tau = 1``.

Both operations are two batched matrix products over all ``H*W`` positions at once
(no Python loop over positions), so they export to ONNX / OpenVINO unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


class NRMemory(nn.Module):
    """Key-value normality recall memory.

    Args:
        num_items (int): Number of key-value pairs ``L`` (paper: 50).
        channels (int): Channel count ``C`` of the feature maps the memory reads and learns.
        temperature (float): Softmax temperature ``tau`` applied to the cosine
            similarities of Eq. 5 and Eq. 8. ``1.0`` reproduces the paper.
            Defaults to ``1.0``.

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
        """Softmax over items of the cosine similarity between every position and every item.

        Args:
            features (torch.Tensor): ``(B, C, H, W)`` feature map.
            items (torch.Tensor): ``(L, C)`` keys or values.

        Returns:
            torch.Tensor: ``(B, H*W, L)`` addressing weights; each row sums to one.
        """
        positions = F.normalize(features.flatten(2).transpose(1, 2), dim=-1)  # (B, HW, C)
        items = F.normalize(items, dim=-1)  # (L, C)
        similarity = torch.matmul(positions, items.t())  # (B, HW, L) cosine similarities
        return torch.softmax(similarity / self.temperature, dim=-1)

    def _aggregate(self, weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the values, reshaped to ``like``'s ``(B, C, H, W)``."""
        read = torch.matmul(weights, self.values)  # (B, HW, C)
        return read.transpose(1, 2).reshape(like.shape)

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
