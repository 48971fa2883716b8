"""AAND building blocks: residual anomaly amplification and anomaly synthesis."""

from .raa import AttributeScalingResidualGenerator, MatchingGuidedResidualGate, ResidualAnomalyAmplification
from .synthesis import FOREGROUND_PRESETS, AnomalySynthesizer, foreground_mask, foreground_preset, otsu_threshold

__all__ = [
    "FOREGROUND_PRESETS",
    "AnomalySynthesizer",
    "AttributeScalingResidualGenerator",
    "MatchingGuidedResidualGate",
    "ResidualAnomalyAmplification",
    "foreground_mask",
    "foreground_preset",
    "otsu_threshold",
]
