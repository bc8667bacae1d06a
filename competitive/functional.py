"""The paper's loss with its two terms (KL and feature L2) as plain functions, for loops that do
not use :class:`~competitive.CompetitiveGroup`: :func:`competitive_loss` for a given ``W``, and
:func:`group_loss` with the competition included."""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .losses import check_rule, compete, cross_entropy, upcast
from .rules import teacher_index, weights_for_teacher
from .terms.feature import feature_term
from .terms.kl import kl_term


class LossTerms(NamedTuple):
    """Per-member loss terms, each of shape ``[N]``: ``loss = ce + alpha * kl + beta * feature``."""

    ce: Tensor
    kl: Tensor
    feature: Tensor
    loss: Tensor


def _weighted_terms(
    log_probs: Tensor,
    teaches: Tensor,
    logits: Sequence[Tensor],
    weights: Tensor,
    features: Sequence[Tensor] | None,
    adapters: nn.ModuleDict | None,
    alpha: float,
    beta: float,
    temperature: float,
    ce: Tensor,
) -> LossTerms:
    kl = kl_term(log_probs, teaches, weights, temperature=temperature, logits=logits)
    if features is None:
        feature = torch.zeros_like(kl)
    else:
        feature = feature_term(features, teaches, weights, adapters if adapters else None)
    return LossTerms(ce, kl, feature, ce + alpha * kl + beta * feature)


def competitive_loss(
    logits: Sequence[Tensor],
    targets: Tensor,
    weights: Tensor,
    *,
    features: Sequence[Tensor] | None = None,
    adapters: nn.ModuleDict | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    temperature: float = 1.0,
) -> LossTerms:
    """Each member's loss ``L_i = L_C,i + alpha * L_D,i + beta * L_F,i`` for a given ``W`` (Eq. 8-11).

    - ``L_C,i``: the batch mean of the cross-entropy (Eq. 7).
    - ``L_D,i = tau^2 * sum_j W_ij KL(p_j || p_i)`` with ``p = softmax(z / tau)``, summed over
      classes and averaged over the batch (``batchmean``). ``p_j`` is a target: no gradient
      reaches the teacher through it (Eq. 9).
    - ``L_F,i = sum_j W_ij || A_ij(F_i) - F_j ||^2`` as a mean over elements (Eq. 10), where
      ``A_ij`` is the adapter from member ``i``'s feature shape to member ``j``'s (identity when
      the shapes agree).

    ``logits``: ``N`` tensors ``[B, C]``; ``targets``: ``[B]`` or label rows ``[N, B, C]``;
    ``weights``: ``W`` (``[N, N]`` or ``[B, N, N]``); ``features``: ``N`` maps; ``adapters``:
    ``"i_j"`` -> ``A_ij``; ``alpha``, ``beta``, ``temperature``: as above (defaults 1).

    Returns:
        :class:`LossTerms` of per-member tensors of shape ``[N]``.

    Example:
        >>> z = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
        >>> w = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # member 0 teaches member 1
        >>> competitive_loss(z, torch.tensor([0]), w).kl
        tensor([0.0000, 1.5232])
    """
    log_probs = torch.stack([upcast(z) for z in logits]).log_softmax(dim=-1)
    ce_per_sample = cross_entropy(log_probs, targets)
    teaches = torch.isfinite(ce_per_sample)
    ce = ce_per_sample.mean(dim=1)
    return _weighted_terms(log_probs, teaches, logits, weights, features, adapters, alpha, beta, temperature, ce)


def group_loss(
    logits: Sequence[Tensor],
    targets: Tensor,
    features: Sequence[Tensor] | None = None,
    *,
    rule: str = "best",
    granularity: str = "batch",
    alpha: float = 1.0,
    beta: float = 1.0,
    temperature: float = 1.0,
    adapters: nn.ModuleDict | None = None,
    reduce_ce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[LossTerms, Tensor, Tensor]:
    """Cross-entropy, selection and the paper's loss in one pure function.

    Args:
        logits, targets, features, adapters, alpha, beta, temperature (see competitive_loss): as in
            :func:`competitive_loss`.
        rule (str): selection rule, see :func:`~competitive.distillation_weights`.
        granularity (str): ``"batch"`` (one teacher per batch, the paper) or ``"sample"``.
        reduce_ce (callable, optional): applied to the batch scores ``[N]`` before selection, e.g.
            an all-reduce so every process picks the same teacher. Only with ``"batch"``.

    Returns:
        ``(terms, teacher, weights)``: the :class:`LossTerms`, the teacher index (a scalar, or
        ``[B]`` per sample; ``-1`` where no CE is finite) and ``W``.

    Example:
        >>> z = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
        >>> terms, teacher, w = group_loss(z, torch.tensor([0]))
        >>> int(teacher), terms.kl  # member 0 has the lower CE and teaches member 1
        (0, tensor([0.0000, 1.5232]))
    """
    out, ce, teacher, weights, _ = compete(logits, targets, features, None, rule, granularity, reduce_ce)
    terms = _weighted_terms(
        out.log_probs, out.teaches, logits, weights, features, adapters, alpha, beta, temperature, ce
    )
    return terms, teacher, weights


def distillation_weights(ce: Tensor, *, rule: str = "best") -> Tensor:
    """The weight matrix ``W`` of a selection rule.

    Args:
        ce (Tensor): cross-entropies of shape ``[..., N]`` (see :func:`teacher_index`).
        rule (str): one of

            - ``"best"`` (default, paper Eq. 4): the member with the lowest CE teaches all others.
            - ``"better"`` (the authors' public code): each member learns from every member with
              a lower CE, averaged.
            - ``"mutual"`` (deep mutual learning): each member learns from every other member,
              averaged.
            - ``"independent"``: nobody learns from anybody (``W = 0``).

    Returns:
        Float tensor of shape ``[..., N, N]``. Members with a NaN or inf CE never teach (their
        column is 0); ties in CE go to the lowest index.

    Example:
        >>> distillation_weights(torch.tensor([0.9, 0.4, 0.7]), rule="best")
        tensor([[0., 1., 0.],
                [0., 0., 0.],
                [0., 1., 0.]])
    """
    check_rule(rule)
    return weights_for_teacher(ce, rule=rule, teacher=teacher_index(ce) if rule == "best" else None)
