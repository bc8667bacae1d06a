"""Who learns from whom: the selection rules (paper §3.1, Eq. 4). They live in
:mod:`competitive.rules` (``distillation_weights``, for loops without a group, in
:mod:`competitive.functional`); this module names them with it."""

from .functional import distillation_weights
from .losses import GRANULARITIES, RULES, check_rule
from .rules import teacher_index, weights_for_teacher

__all__ = ["GRANULARITIES", "RULES", "check_rule", "distillation_weights", "teacher_index", "weights_for_teacher"]
