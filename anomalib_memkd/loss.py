"""Losses of MemKD (Gu et al., ICCV 2023), Eq. 1-2, 7, 10 and 11.

``L = L_KD + lambda_1 * L_NM + lambda_2 * L_Orth``                                (Eq. 11)

* ``L_KD`` (Eq. 1-2): anomalib's :class:`ReverseDistillationLoss`, i.e. for every level the
  batch mean of ``1 - cos(flat(F_S), flat(F_T))`` over the whole flattened feature map,
  summed over the three levels.
* ``L_NM`` (Eq. 10), :func:`normality_memorization_loss`, summed over the three memories, with two reductions:

  - ``"sum"`` (the paper as written, the default): ``(1/N) sum_n ||F^{E_n} - F_bar^{E_n}||_2^2``, the norm over the whole
    flattened ``C*H*W`` exemplar feature. Its size grows with ``C*H*W`` (about 1e3-1e5 per memory: tens of
    thousands at 256 px with WideResNet50) against ``L_KD <= 3``.
  - ``"mean"``: the same squared error averaged per element, ``(1/(N*C*H*W)) sum_n ||.||_2^2`` (a mean squared
    error), i.e. the ``"sum"`` figure divided by ``C*H*W`` of each memory.

  The reconstruction ``F_bar^E`` addresses the *values* only (Eq. 8-9) and its targets carry no gradient, so
  ``L_NM`` reaches the value parameters only. The values also get gradients from ``L_KD`` (through the recall) and
  ``L_Orth``. With ``"sum"`` the ``L_NM`` gradient is 1e3-1e5 times larger than it would be per element, so it
  swamps the others: Adam normalises each parameter's step by its gradient's magnitude, so the values' update is
  then that of ``L_NM`` alone, whatever ``lambda_1`` is. ``"mean"`` puts ``L_NM`` on the per-element scale
  of ``L_KD`` (itself a mean of cosine distances), so ``lambda_1 = 0.1`` is again
  the balancing weight Eq. 11 describes: "balancing hyper-parameters" only balance terms of comparable scale. Both
  figures are computed every step (:class:`MemKDLossOutput` ``nm_sum`` / ``nm_mean``); ``MemKD`` logs both.
* ``L_Orth`` (Eq. 7), :func:`orthogonality_loss`: ``(1/L^2) sum_i sum_j d(k_i, v_j)``, summed over memories; it
  reaches both keys and values. Eq. 7 does not say which ``d`` it means: Eq. 1 defines ``d`` as the cosine
  *distance* ``1 - cos``, Eq. 5 and Eq. 8 (the same section as Eq. 7) as the cosine *similarity*. Read literally,
  neither makes keys and values orthogonal, the aim the paper states ("each k_i should be as independent as possible
  from each v_j", "a pairwise orthogonal loss"): the mean similarity is minimised (to -1) by *anti-aligning* every
  key with every value, the mean distance (to 0) by *aligning* them. The form (``orth_form``):

  - ``"abs"`` (default): ``d = |cos|``, Eq. 5's similarity with its sign dropped: 0 iff every key is orthogonal to
    every value, 1 for aligned or anti-aligned pairs. The only one of the three whose minimum is the stated aim.
  - ``"signed"``: ``d = cos`` (Eq. 5's similarity, Eq. 7 as written with it), in ``[-1, 1]``.
  - ``"distance"``: ``d = 1 - cos`` (Eq. 1's distance), in ``[0, 2]``; the same gradient as ``"signed"`` with the
    opposite sign (it pulls keys towards values).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss

from anomalib_kd_base.model import check_choice

from .components.memory import NRMemory


#: reductions of ``L_NM`` (Eq. 10): the paper's per-exemplar sum over C*H*W, or the per-element mean
NM_REDUCTIONS = ("sum", "mean")
#: readings of ``d`` in ``L_Orth`` (Eq. 7): |cos| (orthogonality, default), cos (Eq. 5's similarity), 1 - cos (Eq. 1)
ORTH_FORMS = ("abs", "signed", "distance")


class MemKDLossOutput(NamedTuple):
    """Total loss (Eq. 11), its three terms (unweighted; ``nm`` in the configured reduction) and both ``L_NM`` figures."""

    loss: torch.Tensor
    kd: torch.Tensor
    nm: torch.Tensor
    orth: torch.Tensor
    nm_sum: torch.Tensor | None = None
    nm_mean: torch.Tensor | None = None


def normality_memorization_loss(
    targets: Sequence[torch.Tensor],
    reconstructions: Sequence[torch.Tensor],
    reduction: str = "sum",
) -> torch.Tensor:
    """Eq. 10 summed over memories: ``sum_i (1/N) sum_n ||F_i^{E_n} - F_bar_i^{E_n}||_2^2`` (``"sum"``).

    Args:
        targets (Sequence[torch.Tensor]): Per memory, the ``(N, C, H, W)`` normality embedding.
        reconstructions (Sequence[torch.Tensor]): Per memory, its value-addressed
            reconstruction (Eq. 9), same shape.
        reduction (str): ``"sum"`` (the paper: squared L2 norm over ``C*H*W``, mean over exemplars) or ``"mean"``
            (mean over ``N*C*H*W`` elements). Defaults to ``"sum"``.

    Returns:
        torch.Tensor: Scalar loss.
    """
    check_choice("reduction", reduction, NM_REDUCTIONS, sentence=True)
    if len(targets) != len(reconstructions):
        msg = f"Got {len(targets)} targets but {len(reconstructions)} reconstructions."
        raise ValueError(msg)
    if len(targets) == 0:
        msg = "normality_memorization_loss needs at least one memory."
        raise ValueError(msg)
    total = targets[0].new_zeros(())
    for target, reconstruction in zip(targets, reconstructions, strict=True):
        squared_error = (target - reconstruction).pow(2)
        if reduction == "mean":
            total = total + squared_error.mean()
        else:
            total = total + squared_error.flatten(1).sum(dim=1).mean()  # ||.||_2^2 per exemplar, mean over N
    return total


def orthogonality_loss(
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    form: str = "abs",
) -> torch.Tensor:
    """Eq. 7 summed over memories: ``sum_m (1/L^2) sum_{i,j} d(k_i, v_j)``, ``d`` by ``form`` (module docstring).

    Args:
        keys (Sequence[torch.Tensor]): Per memory, ``(L, C)`` keys.
        values (Sequence[torch.Tensor]): Per memory, ``(L, C)`` values.
        form (str): ``"abs"`` (``|cos|``, 0 iff keys and values are pairwise orthogonal), ``"signed"`` (``cos``,
            Eq. 5's similarity) or ``"distance"`` (``1 - cos``, Eq. 1's distance). Defaults to ``"abs"``.

    Returns:
        torch.Tensor: Scalar loss, per memory in ``[0, 1]`` (abs), ``[-1, 1]`` (signed) or ``[0, 2]`` (distance).
    """
    check_choice("orth_form", form, ORTH_FORMS, sentence=True)
    if len(keys) != len(values):
        msg = f"Got {len(keys)} key sets but {len(values)} value sets."
        raise ValueError(msg)
    if len(keys) == 0:
        msg = "orthogonality_loss needs at least one memory."
        raise ValueError(msg)
    total = keys[0].new_zeros(())
    for key, value in zip(keys, values, strict=True):
        cosine = torch.matmul(F.normalize(key, dim=-1), F.normalize(value, dim=-1).t())  # (L, L)
        if form == "abs":
            total = total + cosine.abs().mean()
        elif form == "signed":
            total = total + cosine.mean()
        else:
            total = total + (1.0 - cosine).mean()
    return total


class MemKDLoss(nn.Module):
    """Total MemKD loss, Eq. 11: ``L_KD + lambda_nm * L_NM + lambda_orth * L_Orth``.

    Args:
        lambda_nm (float): Weight ``lambda_1`` of ``L_NM``. Defaults to ``0.1`` (paper).
        lambda_orth (float): Weight ``lambda_2`` of ``L_Orth``. Defaults to ``0.1`` (paper).
        nm_reduction (str): ``"mean"`` (per element) or ``"sum"`` (the paper as written); see the module
            docstring. Defaults to ``"mean"``.
        orth_form (str): ``d`` of ``L_Orth`` (Eq. 7): ``"abs"`` (``|cos|``), ``"signed"`` (``cos``) or
            ``"distance"`` (``1 - cos``); see the module docstring. Defaults to ``"abs"``.

    Without memories (``memories`` empty: the "memory off" ablation) ``L_NM = L_Orth = 0``.
    """

    def __init__(
        self,
        lambda_nm: float = 0.1,
        lambda_orth: float = 0.1,
        nm_reduction: str = "sum",
        orth_form: str = "abs",
    ) -> None:
        super().__init__()
        if lambda_nm < 0 or lambda_orth < 0:
            msg = f"Loss weights must be non-negative, got lambda_nm={lambda_nm}, lambda_orth={lambda_orth}."
            raise ValueError(msg)
        check_choice("nm_reduction", nm_reduction, NM_REDUCTIONS, sentence=True)
        check_choice("orth_form", orth_form, ORTH_FORMS, sentence=True)
        self.lambda_nm = lambda_nm
        self.lambda_orth = lambda_orth
        self.nm_reduction = nm_reduction
        self.orth_form = orth_form
        self.kd_loss = ReverseDistillationLoss()

    def forward(
        self,
        teacher_features: Sequence[torch.Tensor],
        student_features: Sequence[torch.Tensor],
        memories: Sequence[NRMemory],
        exemplar_features: Sequence[torch.Tensor] | None = None,
    ) -> MemKDLossOutput:
        """Compute the loss.

        Args:
            teacher_features (Sequence[torch.Tensor]): Teacher ``[layer1, layer2, layer3]`` of the batch.
            student_features (Sequence[torch.Tensor]): Student features aligned with them.
            memories (Sequence[NRMemory]): The NR memories ``(M0, M1, M2)``.
            exemplar_features (Sequence[torch.Tensor] | None): One normality-embedding target
                per memory (same order as ``memories``). ``None`` gives ``L_NM = 0``.

        Returns:
            MemKDLossOutput: ``loss`` (Eq. 11), the unweighted ``kd``, ``nm`` (configured reduction) and ``orth``
            terms, and ``nm_sum`` / ``nm_mean`` (both reductions, detached).
        """
        kd = self.kd_loss(list(teacher_features), list(student_features))
        if len(memories) == 0:
            zero = kd.new_zeros(())
            return MemKDLossOutput(loss=kd, kd=kd, nm=zero, orth=zero, nm_sum=zero, nm_mean=zero)
        if exemplar_features is None:
            nm = nm_sum = nm_mean = kd.new_zeros(())
        else:
            if len(exemplar_features) != len(memories):
                msg = f"Got {len(exemplar_features)} exemplar targets for {len(memories)} memories."
                raise ValueError(msg)
            reconstructions = [
                memory.reconstruct(target) for memory, target in zip(memories, exemplar_features, strict=True)
            ]
            nm = normality_memorization_loss(list(exemplar_features), reconstructions, self.nm_reduction)
            with torch.no_grad():
                other = "sum" if self.nm_reduction == "mean" else "mean"
                nm_other = normality_memorization_loss(list(exemplar_features), reconstructions, other)
            nm_sum, nm_mean = (nm.detach(), nm_other) if self.nm_reduction == "sum" else (nm_other, nm.detach())
        orth = orthogonality_loss(
            [memory.keys for memory in memories], [memory.values for memory in memories], self.orth_form
        )
        loss = kd + self.lambda_nm * nm + self.lambda_orth * orth
        return MemKDLossOutput(loss=loss, kd=kd, nm=nm, orth=orth, nm_sum=nm_sum, nm_mean=nm_mean)
