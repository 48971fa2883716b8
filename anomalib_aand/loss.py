"""AAND losses.

Stage 1 (anomaly amplification), Eq. (9): ``L_1 = L_focal + L_A`` per level, summed over levels.

* :func:`gate_focal_loss` - focal loss (Lin et al.) on the residual gate ``w^a`` against the
  pseudo-anomaly mask pooled to the level (``alpha = 0.8``, ``gamma = 2``).
* :func:`amplification_loss` - Eq. (7)-(8): mean over all (anomalous, normal) patch pairs of
  ``max(s(F_A^a_i, F_T^n_j), s(F_T^a_i, F_T^n_j) - alpha)``. ``mode="exact"`` uses every pair of the
  batch without ever materialising the ``N_a x N_n`` matrix (row chunks in forward, recomputed in
  backward); ``mode="subsample"`` first draws at most ``max_anomalous`` / ``max_normal`` patches, as the
  public reference implementation does.

Stage 2 (normality distillation), Eq. (12): ``L_2 = L_KD + L_HKD``.

* ``L_KD`` (Eq. 10) is anomalib's :class:`ReverseDistillationLoss` (1 - cosine of the flattened maps).
* :func:`hard_kd_loss` - Eq. (11): per image and level, the mean of the ``K_h`` largest per-pixel
  ``1 - cos`` distances.
"""

from __future__ import annotations

import torch
from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torchvision.ops import sigmoid_focal_loss

from anomalib_kd_base.model import check_choice

AMPLIFICATION_MODES = ("exact", "subsample")


def gate_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.8, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss of the gate. ``logits`` are the gate's log-odds (``sigmoid(logits) = w^a``).

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``alpha_t = alpha`` on anomalous patches.
    """
    return sigmoid_focal_loss(logits, target.to(logits.dtype), alpha=alpha, gamma=gamma, reduction="mean")


class _PairwiseHingeSum(torch.autograd.Function):
    """``sum_ij max(a_i . n_j, r_i . n_j - margin)`` in row chunks; gradient w.r.t. ``a`` only.

    Memory is ``O(chunk_rows x N_n)`` in forward and backward (the pair matrix is recomputed chunk by
    chunk in backward instead of being saved).
    """

    @staticmethod
    def forward(ctx, a, r, n, margin: float, chunk_rows: int):  # noqa: ANN001, ANN205
        total = a.new_zeros(())
        n_t = n.t()
        for start in range(0, a.shape[0], chunk_rows):
            sim = a[start : start + chunk_rows] @ n_t
            ref = r[start : start + chunk_rows] @ n_t - margin
            total = total + torch.maximum(sim, ref).sum()
        ctx.save_for_backward(a, r, n)
        ctx.margin = margin
        ctx.chunk_rows = chunk_rows
        return total

    @staticmethod
    def backward(ctx, grad_output):  # noqa: ANN001, ANN205
        a, r, n = ctx.saved_tensors
        grad_a = torch.empty_like(a)
        n_t = n.t()
        for start in range(0, a.shape[0], ctx.chunk_rows):
            sim = a[start : start + ctx.chunk_rows] @ n_t
            ref = r[start : start + ctx.chunk_rows] @ n_t - ctx.margin
            grad_a[start : start + ctx.chunk_rows] = (sim >= ref).to(a.dtype) @ n
        return grad_a * grad_output, None, None, None, None


def pairwise_hinge_mean(
    advanced_anomalous: torch.Tensor,
    vanilla_anomalous: torch.Tensor,
    vanilla_normal: torch.Tensor,
    margin: float,
    chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Eq. (7)-(8) on given patch sets (rows are patch features ``(N, C)``), exact and streamed."""
    a = F.normalize(advanced_anomalous, dim=1)
    r = F.normalize(vanilla_anomalous.detach(), dim=1)
    n = F.normalize(vanilla_normal.detach(), dim=1)
    chunk_rows = max(1, chunk_elements // max(1, n.shape[0]))
    total = _PairwiseHingeSum.apply(a, r, n, float(margin), chunk_rows)
    return total / (a.shape[0] * n.shape[0])


def _patches(features: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Rows of ``features`` ``(B, C, H, W)`` at positions where ``select`` ``(B, 1, H, W)`` is true."""
    channels = features.shape[1]
    return features.permute(0, 2, 3, 1).reshape(-1, channels)[select.reshape(-1)]


def _subsample(rows: torch.Tensor, limit: int, generator: torch.Generator | None = None) -> torch.Tensor:
    if rows.shape[0] <= limit:
        return torch.arange(rows.shape[0], device=rows.device)
    return torch.randperm(rows.shape[0], device=rows.device, generator=generator)[:limit]


def amplification_loss(
    advanced: torch.Tensor,
    vanilla: torch.Tensor,
    anomalous: torch.Tensor,
    normal: torch.Tensor,
    margin: float = 0.3,
    mode: str = "exact",
    max_anomalous: int = 1000,
    max_normal: int = 5000,
    chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Anomaly amplification loss ``L_A`` of one level, Eq. (7)-(8).

    Args:
        advanced: ``F_A`` (gradient flows into it), ``(B, C, H, W)``.
        vanilla: ``F_T`` (treated as constant), ``(B, C, H, W)``.
        anomalous: ``(B, 1, H, W)`` bool, the synthetic-anomaly patches ``a``.
        normal: ``(B, 1, H, W)`` bool, the normal patches ``n`` paired with them.
        margin: ``alpha`` of the dynamic margin ``S_ref = s(F_T^a, F_T^n) - alpha``.
        mode: ``"exact"`` (all pairs) or ``"subsample"`` (reference implementation's caps).

    Returns a scalar; ``0`` (still attached to the graph, never NaN) when either set is empty.
    """
    check_choice("amplification mode", mode, AMPLIFICATION_MODES)
    anomalous = anomalous.bool()
    normal = normal.bool() & ~anomalous
    if not anomalous.any() or not normal.any():
        return advanced.sum() * 0.0
    adv_a = _patches(advanced, anomalous)
    van_a = _patches(vanilla, anomalous)
    van_n = _patches(vanilla, normal)
    if mode == "subsample":
        keep_a = _subsample(adv_a, max_anomalous)
        adv_a, van_a = adv_a[keep_a], van_a[keep_a]
        van_n = van_n[_subsample(van_n, max_normal)]
    return pairwise_hinge_mean(adv_a, van_a, van_n, margin, chunk_elements)


def hard_kd_loss(teacher: list[torch.Tensor], student: list[torch.Tensor], hard_samples: int = 10) -> torch.Tensor:
    """Hard knowledge distillation loss, Eq. (11), summed over levels and averaged over images."""
    total = teacher[0].new_zeros(())
    for t_feat, s_feat in zip(teacher, student, strict=True):
        distance = (1 - F.cosine_similarity(t_feat, s_feat, dim=1)).flatten(1)  # (B, H*W)
        k = min(hard_samples, distance.shape[1])
        total = total + distance.topk(k, dim=1).values.mean(dim=1).mean()
    return total


class AandDistillationLoss(nn.Module):
    """Stage-2 loss ``L_KD + L_HKD`` (Eq. 10-12); returns ``(total, l_kd, l_hkd)``."""

    def __init__(self, hard_samples: int = 10) -> None:
        super().__init__()
        self.hard_samples = hard_samples
        self.kd = ReverseDistillationLoss()

    def forward(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        l_kd = self.kd(teacher, student)
        l_hkd = hard_kd_loss(teacher, student, self.hard_samples)
        return l_kd + l_hkd, l_kd, l_hkd


class AandAmplificationLoss(nn.Module):
    """Stage-1 loss ``sum_k (L_focal,k + weight * L_A,k)`` (Eq. 9); returns ``(total, focal, l_a)``.

    Args:
        margin: ``alpha`` of Eq. (8) (0.3 in the paper).
        focal_alpha, focal_gamma: focal-loss parameters (0.8, 2).
        amplification_weight: weight of ``L_A`` (1.0 = Eq. 9; the public reference uses 0.1).
        mode, max_anomalous, max_normal, chunk_elements: see :func:`amplification_loss`.
    """

    def __init__(
        self,
        margin: float = 0.3,
        focal_alpha: float = 0.8,
        focal_gamma: float = 2.0,
        amplification_weight: float = 1.0,
        mode: str = "exact",
        max_anomalous: int = 1000,
        max_normal: int = 5000,
        chunk_elements: int = 1 << 24,
    ) -> None:
        super().__init__()
        check_choice("amplification_pairs", mode, AMPLIFICATION_MODES)
        self.margin = margin
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.amplification_weight = amplification_weight
        self.mode = mode
        self.max_anomalous = max_anomalous
        self.max_normal = max_normal
        self.chunk_elements = chunk_elements

    def forward(
        self,
        advanced: list[torch.Tensor],
        vanilla: list[torch.Tensor],
        gate_logits: list[torch.Tensor],
        anomalous: list[torch.Tensor],
        normal: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        focal = advanced[0].new_zeros(())
        l_a = advanced[0].new_zeros(())
        for adv, van, logits, anom, norm in zip(advanced, vanilla, gate_logits, anomalous, normal, strict=True):
            focal = focal + gate_focal_loss(logits, anom, self.focal_alpha, self.focal_gamma)
            l_a = l_a + amplification_loss(
                adv,
                van,
                anom,
                norm,
                self.margin,
                self.mode,
                self.max_anomalous,
                self.max_normal,
                self.chunk_elements,
            )
        return focal + self.amplification_weight * l_a, focal, l_a
