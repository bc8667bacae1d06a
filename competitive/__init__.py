"""Competitive Distillation (Shi et al., ICCV 2025) for any PyTorch training loop."""

from .features import FeatureAdapter
from .group import CompetitiveGroup, StepResult
from .losses import LossTerms, competitive_loss, group_loss
from .perturbation import PerturbationPool, default_operations
from .selection import distillation_weights, teacher_index

__all__ = [
    "CompetitiveGroup",
    "FeatureAdapter",
    "LossTerms",
    "PerturbationPool",
    "StepResult",
    "competitive_loss",
    "default_operations",
    "distillation_weights",
    "group_loss",
    "teacher_index",
]

__version__ = "0.1.0"
