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
selective recall; Eq. 8-9 likewise cannot reconstruct anything but a near-mean of the values). A lower ``tau``
sharpens the softmax, but random keys in ``C`` dimensions have cosines of order ``1 / sqrt(C)``, so much of what it
gives at random init is that of random keys, and measured at WideResNet50-2 channels training did not add to it
(docs/memkd.md, "Addressing evidence"). :class:`anomalib_memkd.MemKD` defaults to the paper's ``tau = 1``;
``temperature=0.1`` is an option (faster convergence measured on a short schedule there). The same ``tau`` is used in Eq. 5 and Eq. 8.

Layout (measured on the CPU at the shapes of the three WideResNet50-2 memories, 256 px): both operations are
batched matrix products over all ``H*W`` positions at once, reading the ``(B, C, H*W)`` flat view of the feature map
without a copy. The similarities are ``(B, L, H*W)`` = (normalised items / tau) @ (flat map): the items are
normalised once per call, ``1 / tau`` is folded into them, and the product is divided by the per-position query norm
(``L`` numbers per position, instead of normalising the ``C``-channel map); the softmax runs over the item axis
(``dim=1``, vectorised over the contiguous positions). This product was 1.1-1.6x faster than the transposed
``(B, H*W, L)`` = (flat map)^T @ items^T used before (one thread, bs 1 and 16), and the softmax costs the same in
either layout. Exported graphs keep the transposed product (OpenVINO's CPU plugin failed to compile the INT8
(post-training quantised) IR of this one). The read is ``(B, C, H*W)`` = values^T @ weights, already the
``(B, C, H, W)`` layout. The squared norms of large maps are summed in channel chunks (:func:`squared_norms`).
Inside the student the read is not formed at all: :meth:`anomalib_memkd.components.RecallBlock.forward_memory`
folds the values into the convolution that consumes it (eager only). No Python loop over positions, so the memory
exports to ONNX / OpenVINO.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

#: as ``torch.nn.functional.normalize``: norms are clamped to this before dividing
_EPS = 1e-12

#: elements (8 MiB of float32) of one chunk of squares in :func:`squared_norms`
_NORM_CHUNK_ELEMENTS = 1 << 21
#: fewest channels per chunk
_NORM_MIN_CHUNK = 8


def _exporting() -> bool:
    """Inside ``torch.export`` (the ONNX / OpenVINO exports), ``torch.jit.trace`` or ``torch.onnx.export``."""
    compiler = getattr(torch, "compiler", None)
    exporting = compiler is not None and getattr(compiler, "is_exporting", None) is not None and compiler.is_exporting()
    return bool(exporting or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


def squared_norms(flat: torch.Tensor) -> torch.Tensor:
    """``(B, HW)`` squared L2 norms over the channels of a ``(B, C, HW)`` map, ``sum_c flat[:, c] ** 2``.

    ``(flat * flat).sum(1)`` writes a temporary the size of the map; at 16 x 256 x 64 x 64 (64 MiB) a buffer that
    size is a fresh mapping of the allocator every call, and its page faults cost more than the arithmetic
    (measured on the CPU, one thread: 39 ms, against 5.3-6.8 ms summing 16-32 channels at a time).
    The squares are therefore summed over chunks of channels of about 8 MiB (same sum, in another order);
    ``torch.linalg.vector_norm`` over ``dim=1`` needs no temporary but was 1.4-10x slower than the one-shot sum.
    Exported graphs take the one-shot sum (the chunk size depends on the batch, a dynamic axis of the export).
    """
    batch, channels, positions = flat.shape
    chunk = channels if _exporting() else max(_NORM_MIN_CHUNK, _NORM_CHUNK_ELEMENTS // max(1, batch * positions))
    if chunk >= channels:
        return (flat * flat).sum(dim=1)
    chunks = flat.split(chunk, dim=1)
    total = (chunks[0] * chunks[0]).sum(dim=1)
    for part in chunks[1:]:
        total.add_((part * part).sum(dim=1))
    return total


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

    def scaled_items(self, items: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(L, C)``: the unit-norm items divided by ``tau`` (normalised once per call, not per position)."""
        return (F.normalize(items, dim=-1, eps=_EPS) * (1.0 / self.temperature)).to(dtype)

    def _weights(self, features: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Softmax over items of ``cos(position, item) / tau`` for every position and every item.

        Args:
            features (torch.Tensor): ``(B, C, H, W)`` feature map.
            items (torch.Tensor): ``(L, C)`` keys or values.

        Returns:
            torch.Tensor: ``(B, L, H*W)`` addressing weights (contiguous, a transposed view in exported graphs);
            each column sums to one.
        """
        flat = features.flatten(2)  # (B, C, HW), a view
        inverse_norm = squared_norms(flat).clamp_min(_EPS * _EPS).rsqrt()  # (B, HW)
        scaled_items = self.scaled_items(items, flat.dtype)  # (L, C)
        if _exporting():  # (B, HW, L) layout: OpenVINO's INT8 CPU plugin rejects the product below
            logits = torch.matmul(flat.transpose(1, 2), scaled_items.t()) * inverse_norm.unsqueeze(-1)
            return torch.softmax(logits, dim=-1).transpose(1, 2)
        logits = torch.matmul(scaled_items, flat)  # (B, L, HW) = cos / tau once scaled by the inverse norms
        needs_graph = torch.is_grad_enabled() and (features.requires_grad or items.requires_grad)
        if needs_graph or logits.dtype != torch.float32:  # autograd, or autocast's softmax (computed in float32)
            return torch.softmax(logits * inverse_norm.unsqueeze(1), dim=1)
        # inference: the same softmax, computed in the product's own buffer (no two more B x L x HW maps per read:
        # at batch 16 a fresh map is a fresh mapping of the allocator, whose page faults cost more than the exp)
        logits.mul_(inverse_norm.unsqueeze(1))
        logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
        return logits.div_(logits.sum(dim=1, keepdim=True))

    def _aggregate(self, weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the values: ``(C, L) @ (B, L, HW)``, viewed as ``like``'s ``(B, C, H, W)``."""
        values = self.values.t().to(weights.dtype).contiguous().expand(weights.shape[0], -1, -1)  # (B, C, L)
        return torch.bmm(values, weights).view(like.shape)

    def read_weights(self, query: torch.Tensor) -> torch.Tensor:
        """Eq. 5: read weights ``w_{k_l, j}`` in the ``(B, L, H*W)`` layout, addressing by keys."""
        return self._weights(query, self.keys)

    def key_weights(self, query: torch.Tensor) -> torch.Tensor:
        """Eq. 5: read weights ``w_{k_l, j}``, shape ``(B, H*W, L)`` (a view of :meth:`read_weights`)."""
        return self._weights(query, self.keys).transpose(1, 2)

    def value_weights(self, features: torch.Tensor) -> torch.Tensor:
        """Eq. 8: weights ``w_{v_l, j}``, shape ``(B, H*W, L)`` (a transposed view), addressing by values only."""
        return self._weights(features, self.values).transpose(1, 2)

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """Recall normality for a query feature map (Eq. 5-6).

        Args:
            query (torch.Tensor): ``(B, C, H, W)`` student feature map.

        Returns:
            torch.Tensor: ``(B, C, H, W)`` recalled feature ``F^R``.
        """
        return self._aggregate(self.read_weights(query), query)

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        """Reconstruct (exemplar) features from the values alone (Eq. 8-9).

        Args:
            features (torch.Tensor): ``(N, C, H, W)`` normality embedding ``F^E``.

        Returns:
            torch.Tensor: ``(N, C, H, W)`` reconstruction ``F_bar^E``. Gradients reach
            only :attr:`values` (and ``features`` if it requires grad).
        """
        return self._aggregate(self._weights(features, self.values), features)

    @torch.no_grad()
    def addressing_statistics(self, query: torch.Tensor) -> dict[str, torch.Tensor]:
        """How selective the recall of ``query`` is, per position (the figures of ``anomalib_kd_tools.mechanisms.memkd_mechanism_report``).

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
