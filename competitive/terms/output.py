"""``OutputL2``: the student imitates its teachers' outputs (regression), weighted by ``W`` as ``kl`` is."""

import torch
from torch import Tensor

from .base import StepOutputs, Term, register_term, upcast, weighted


def output_l2_term(outputs: list[Tensor], teaches: Tensor, weights: Tensor) -> Tensor:
    """``sum_j W_ij mean((y_i - y_j)^2)`` per member, ``y`` the outputs ``[B, ...]`` (the mean over each
    sample's outputs, then over the samples), the teacher's ``y_j`` a target without gradient, 0 where it
    may not teach (``teaches`` ``[N, B]``): ``[N]``."""
    y = torch.stack([upcast(v).flatten(1) for v in outputs])  # [N, B, D]
    target = y.detach().where(teaches.unsqueeze(-1), 0.0)
    return weighted(weights, (y.unsqueeze(1) - target).square().mean(dim=-1))  # pair [i, j, B]


@register_term("output_l2")
class OutputL2(Term):
    """Output distillation for regression (``task_loss="mse"`` or ``"l1"``, or any task whose outputs can be
    compared): ``sum_j W_ij mean((y_i - y_j)^2)``, the mean squared difference of a student's outputs to its
    teachers' (detached), averaged over the batch.

    Args:
        weight (float): the term's weight. Default: 1.

    Example:
        >>> from competitive.terms import StepOutputs
        >>> y = [torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [2.0]])]  # two members, B = 2, one output
        >>> teaches = torch.ones(2, 2, dtype=torch.bool)
        >>> out = StepOutputs(y, torch.zeros(2, 2, 0), torch.zeros(2, 2, dtype=torch.long), teaches)
        >>> OutputL2()(out, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))  # member 0 teaches member 1
        tensor([0., 2.])
    """

    tasks = ("ce", "bce", "mse", "l1", "callable")

    def forward(self, outputs: StepOutputs, weights: Tensor) -> Tensor:
        return output_l2_term(list(outputs.logits), outputs.teaches, weights)
