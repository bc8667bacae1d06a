"""Competitive Distillation (Shi et al., ICCV 2025) for any PyTorch training loop."""

from .chunked import chunked_losses
from .functional import LossTerms, competitive_loss, distillation_weights, group_loss
from .group import CompetitiveGroup
from .losses import StepLosses, step_losses
from .members import Members
from .operations import default_operations, token_operations
from .parts import GroupParts, TermList
from .perturbation import PerturbationPool
from .result import StepResult
from .rules import teacher_index
from .tasks import TASK_LOSSES, member_losses, task_losses
from .terms import (
    ADM,
    CWD,
    KL,
    MCL,
    TERMS,
    FeatureL2,
    OutputL2,
    ProjectionHead,
    StepOutputs,
    Term,
    adm_loss,
    mcl_loss,
    register_term,
)
from .terms.adapters import FeatureAdapter

__all__ = [
    "ADM",
    "CWD",
    "KL",
    "MCL",
    "CompetitiveGroup",
    "FeatureAdapter",
    "FeatureL2",
    "GroupParts",
    "LossTerms",
    "Members",
    "OutputL2",
    "PerturbationPool",
    "ProjectionHead",
    "StepLosses",
    "StepOutputs",
    "StepResult",
    "TASK_LOSSES",
    "TERMS",
    "Term",
    "TermList",
    "adm_loss",
    "chunked_losses",
    "competitive_loss",
    "default_operations",
    "distillation_weights",
    "group_loss",
    "mcl_loss",
    "member_losses",
    "register_term",
    "step_losses",
    "task_losses",
    "teacher_index",
    "token_operations",
]

__version__ = "0.7.0"
