"""Knowledge terms: what a member learns from its peers, one term per file (see :mod:`.base`).

Each term registers itself by name with :func:`register_term`; ``TERMS`` maps every registered
name to its class, so a group accepts ``terms=["kl", "my_term"]``.
"""

from .adm import ADM, adm_loss
from .base import TERMS, StepOutputs, Term, register_term, resolve_terms
from .cwd import CWD, cwd_term
from .feature import FeatureL2
from .kl import KL
from .mcl import MCL, ProjectionHead, mcl_loss
from .output import OutputL2

__all__ = [
    "ADM",
    "CWD",
    "KL",
    "MCL",
    "OutputL2",
    "TERMS",
    "FeatureL2",
    "ProjectionHead",
    "StepOutputs",
    "Term",
    "adm_loss",
    "cwd_term",
    "mcl_loss",
    "register_term",
    "resolve_terms",
]
