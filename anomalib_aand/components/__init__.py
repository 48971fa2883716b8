"""AAND building blocks: residual anomaly amplification and anomaly synthesis."""

from .raa import AttributeScalingResidualGenerator, MatchingGuidedResidualGate, ResidualAnomalyAmplification
from .synthesis import AnomalySynthesizer, foreground_mask, otsu_threshold

__all__ = [
    "AnomalySynthesizer",
    "AttributeScalingResidualGenerator",
    "MatchingGuidedResidualGate",
    "ResidualAnomalyAmplification",
    "foreground_mask",
    "otsu_threshold",
]
