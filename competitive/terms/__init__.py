"""Knowledge terms: what a member learns from its peers, one term per file (see :mod:`.base`)."""

from .adm import ADM, adm_loss
from .base import StepOutputs, Term
from .feature import FeatureL2
from .kl import KL
from .mcl import MCL, ProjectionHead, mcl_loss

# the built-in terms by the name a group accepts in ``terms=[...]``
TERMS: dict[str, type[Term]] = {"kl": KL, "feature": FeatureL2, "mcl": MCL, "adm": ADM}

__all__ = ["ADM", "KL", "MCL", "TERMS", "FeatureL2", "ProjectionHead", "StepOutputs", "Term", "adm_loss", "mcl_loss"]
