"""The per-step math of each iteration (paper §3.3, Eq. 7-11), as pure functions.

:func:`step_losses` is what :class:`~competitive.CompetitiveGroup` runs every step (eagerly, or
compiled with ``torch.compile(fullgraph=True)``): cross-entropy, the competition, ``W``, then every
knowledge term of :mod:`competitive.terms`. :func:`group_loss` and :func:`competitive_loss` are
the same math for the paper's two terms (KL and feature L2) with the weights applied. No function
here reads a tensor back to the host.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .selection import check_rule, teacher_index, weights_for_teacher
from .terms.base import StepOutputs, Term, upcast
from .terms.feature import feature_term
from .terms.kl import kl_term


class LossTerms(NamedTuple):
    """Per-member loss terms, each of shape ``[N]``: ``loss = ce + alpha * kl + beta * feature``."""

    ce: Tensor
    kl: Tensor
    feature: Tensor
    loss: Tensor


class StepLosses(NamedTuple):
    """What :func:`step_losses` computed: ``ce`` ``[N]``, ``terms`` (name -> unweighted ``[N]``),
    ``teacher`` (scalar or ``[B]``, ``-1`` where no member may teach) and ``weights`` (``W``)."""

    ce: Tensor
    terms: dict[str, Tensor]
    teacher: Tensor
    weights: Tensor


def cross_entropy(log_probs: Tensor, targets: Tensor) -> Tensor:
    """Per-member, per-sample cross-entropy ``[N, B]`` (paper Eq. 7).

    Args:
        log_probs (Tensor): ``[N, B, C]`` log-softmax of each member's logits.
        targets (Tensor): class indices ``[B]`` shared by all members, one row of indices per
            member ``[N, B]``, or one (soft) label distribution per member ``[N, B, C]``.
    """
    if targets.dim() == 1:
        targets = targets.expand(log_probs.shape[0], -1)
    if targets.dim() == 2:
        return -log_probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return -(targets * log_probs).sum(dim=-1)


def competition_score(ce_per_sample: Tensor, targets: Tensor) -> Tensor:
    """What the members compete on, per sample ``[N, B]``: ``KL(label || p) = CE - H(label)``.

    Identical to the CE for hard labels; for a mixed (soft) label it does not count the label's
    own entropy against the member that was trained on it (a member predicting a 50/50 mix exactly
    scores 0, not 0.69).
    """
    score = ce_per_sample.detach()
    if targets.dim() == 3:
        score = score + torch.xlogy(targets, targets).sum(dim=-1)
    return score


def _finite_samples(values: Sequence[Tensor], batch: int) -> Tensor:
    """``[N, B]``: where each member's hooked output is all finite."""
    return torch.stack([torch.isfinite(v.detach().reshape(batch, -1)).all(dim=1) for v in values])


def step_losses(
    logits: Sequence[Tensor],
    targets: Tensor,
    *,
    terms: Sequence[Term] = (),
    features: Sequence[Tensor] | None = None,
    embeddings: Sequence[Tensor] | None = None,
    rule: str = "best",
    granularity: str = "batch",
    reduce_score: Callable[[Tensor], Tensor] | None = None,
    fixed_teacher: int | None = None,
) -> StepLosses:
    """Cross-entropy, competition, ``W`` and every term: one group step's math, without weights.

    A member may teach a sample only where its CE and all its hooked outputs are finite; the
    teacher is the member with the lowest :func:`competition_score` among those (ties: lowest
    index). Every term reads the same ``W``.

    Args:
        logits (sequence of Tensor): ``N`` tensors ``[B, C]``.
        targets (Tensor): ``[B]`` or ``[N, B]`` class indices, or ``[N, B, C]`` label rows.
        terms (sequence of Term): the knowledge terms. Default: none (CE only).
        features, embeddings (sequence of Tensor, optional): per-member hooked outputs.
        rule (str): see :func:`~competitive.distillation_weights`. Default: ``"best"``.
        granularity (str): ``"batch"`` (one teacher per batch, the paper) or ``"sample"``.
        reduce_score (callable, optional): applied to the batch scores ``[N]`` before selection
            (an all-reduce, so every process picks the same teacher). Only with ``"batch"``.
        fixed_teacher (int, optional): this member teaches wherever it may (``rule="best"``).
    """
    outputs, ce, teacher, weights = _compete(
        logits, targets, features, embeddings, rule, granularity, reduce_score, fixed_teacher
    )
    values = {term.name: term(outputs, weights) for term in terms}
    return StepLosses(ce, values, teacher, weights)


def _compete(logits, targets, features, embeddings, rule, granularity, reduce_score, fixed_teacher=None):
    """CE, which member may teach which sample, the teacher and ``W`` (Eq. 4, 7)."""
    check_rule(rule, granularity)
    log_probs = torch.stack([upcast(z) for z in logits]).log_softmax(dim=-1)
    ce_per_sample = cross_entropy(log_probs, targets)
    batch = ce_per_sample.shape[1]
    # a member may act as a target only where all its outputs are finite
    teaches = torch.isfinite(ce_per_sample)
    for values in (features, embeddings):
        if values is not None:
            teaches = teaches & _finite_samples(values, batch).to(teaches.device)
    score = torch.where(teaches, competition_score(ce_per_sample, targets), torch.nan)
    if granularity == "batch":
        score = score.mean(dim=1)
        if reduce_score is not None:
            score = reduce_score(score)
    else:
        score = score.transpose(0, 1)  # [B, N]
    teacher = teacher_index(score)
    if fixed_teacher is not None:
        # offline KD: the fixed member teaches wherever its own outputs are finite
        teacher = torch.where(torch.isfinite(score[..., fixed_teacher]), fixed_teacher, -1)
    weights = weights_for_teacher(score, rule=rule, teacher=teacher)
    labels = targets.argmax(dim=-1) if targets.dim() == 3 else targets.expand(len(logits), -1)
    outputs = StepOutputs(logits, log_probs, labels, teaches, features, embeddings)
    return outputs, ce_per_sample.mean(dim=1), teacher, weights


def _weighted_terms(log_probs, teaches, logits, weights, features, adapters, alpha, beta, temperature, ce) -> LossTerms:
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

    Args:
        logits (sequence of Tensor): ``N`` tensors of shape ``[B, C]``.
        targets (Tensor): class indices ``[B]``, or per-member label distributions ``[N, B, C]``.
        weights (Tensor): ``W`` of shape ``[N, N]`` (one teacher per batch) or ``[B, N, N]``
            (one per sample).
        features (sequence of Tensor, optional): ``N`` feature maps with a leading batch dim.
        adapters (nn.ModuleDict, optional): ``"i_j"`` -> module mapping ``F_i`` to ``F_j``'s shape.
        alpha (float): weight of ``L_D``. Default: 1.
        beta (float): weight of ``L_F``. Default: 1.
        temperature (float): softmax temperature of ``L_D``. Default: 1.

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
        logits, targets, features, adapters, alpha, beta, temperature: as in
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
    out, ce, teacher, weights = _compete(logits, targets, features, None, rule, granularity, reduce_ce)
    terms = _weighted_terms(
        out.log_probs, out.teaches, logits, weights, features, adapters, alpha, beta, temperature, ce
    )
    return terms, teacher, weights
