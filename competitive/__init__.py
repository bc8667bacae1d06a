"""Competitive Distillation (Shi et al., ICCV 2025) for any PyTorch training loop."""

from .features import FeatureAdapter
from .group import CompetitiveGroup
from .losses import LossTerms, StepLosses, competitive_loss, group_loss, step_losses
from .perturbation import PerturbationPool, default_operations
from .result import StepResult
from .selection import distillation_weights, teacher_index
from .terms import ADM, KL, MCL, FeatureL2, ProjectionHead, StepOutputs, Term, adm_loss, mcl_loss

__all__ = [
    "ADM",
    "KL",
    "MCL",
    "CompetitiveGroup",
    "FeatureAdapter",
    "FeatureL2",
    "LossTerms",
    "PerturbationPool",
    "ProjectionHead",
    "StepLosses",
    "StepOutputs",
    "StepResult",
    "Term",
    "adm_loss",
    "competitive_loss",
    "default_operations",
    "distillation_weights",
    "group_loss",
    "mcl_loss",
    "step_losses",
    "teacher_index",
]

__version__ = "0.3.0"
