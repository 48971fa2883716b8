"""MemKD for anomalib: "Remembering Normality: Memory-guided Knowledge Distillation for
Unsupervised Anomaly Detection" (Gu et al., ICCV 2023).

``MemKD`` is the anomalib (Lightning) model, ``MemKDModel`` the PyTorch network.
Registered under the ``anomalib.models`` entry-point group, so with the anomalib-kd
import hook the stock ``anomalib train --model MemKD`` and ``get_model("memkd")`` work.
"""

from .components import MemoryResNetDecoder, NRMemory, RecallBlock, get_memory_decoder
from .lightning_model import MemKD
from .loss import NM_REDUCTIONS, ORTH_FORMS, MemKDLoss, MemKDLossOutput, normality_memorization_loss, orthogonality_loss
from .torch_model import MemKDModel, MemKDTrainOutput

__all__ = [
    "MemKD",
    "MemKDLoss",
    "MemKDLossOutput",
    "MemKDModel",
    "MemKDTrainOutput",
    "NM_REDUCTIONS",
    "ORTH_FORMS",
    "MemoryResNetDecoder",
    "NRMemory",
    "RecallBlock",
    "get_memory_decoder",
    "normality_memorization_loss",
    "orthogonality_loss",
]
