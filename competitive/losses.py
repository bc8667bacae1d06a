"""The per-step loss math of each iteration (paper §3.3, Eq. 8-11).

``competitive_loss(logits, targets, weights, ...)`` is one pure function of the members' logits,
targets, features and the weight matrix ``W`` of :mod:`competitive.selection`; ``group_loss``
chains cross-entropy, selection and this loss, and is what :class:`~competitive.CompetitiveGroup`
runs (eagerly, or compiled with ``torch.compile(fullgraph=True)``). No function here reads a tensor
back to the host.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .selection import _weights_for_teacher, teacher_index


def _upcast(x: Tensor) -> Tensor:
    # losses in at least float32, also when the members run in bf16 / fp16 under autocast
    return x.to(torch.promote_types(x.dtype, torch.float32))


class LossTerms(NamedTuple):
    """Per-member loss terms, each of shape ``[N]``: ``loss = ce + alpha * kl + beta * feature``."""

    ce: Tensor
    kl: Tensor
    feature: Tensor
    loss: Tensor


def cross_entropy(log_probs: Tensor, targets: Tensor) -> Tensor:
    """Per-member, per-sample cross-entropy ``[N, B]`` (paper Eq. 7).

    Args:
        log_probs (Tensor): ``[N, B, C]`` log-softmax of each member's logits.
        targets (Tensor): class indices ``[B]`` shared by all members, or one (soft) label
            distribution per member ``[N, B, C]``.
    """
    if targets.dim() == 1:
        index = targets.view(1, -1, 1).expand(log_probs.shape[0], -1, 1)
        return -log_probs.gather(-1, index).squeeze(-1)
    return -(targets * log_probs).sum(dim=-1)


def _per_sample_weights(weights: Tensor, batch: int) -> Tensor:
    # [N, N] (one teacher per batch) or [B, N, N] (one per sample) -> [B, N, N]
    return weights.expand(batch, -1, -1) if weights.dim() == 2 else weights


def _feature_loss(
    features: Sequence[Tensor],
    weights: Tensor,
    teaches: Tensor,
    adapters: nn.ModuleDict | None,
) -> Tensor:
    """``sum_j W[i, j] * mean((A_ij(F_i) - F_j)^2)`` per member and sample, ``[N, B]`` (Eq. 10)."""
    n, batch = len(features), features[0].shape[0]
    w = _per_sample_weights(weights, batch)  # [B, N, N]
    # the teacher's target carries no gradient; a member that cannot teach contributes zeros
    targets = [torch.where(teaches[j].view(-1, *[1] * (f.dim() - 1)), f.detach(), 0.0) for j, f in enumerate(features)]
    if all(f.shape == features[0].shape for f in features) and not adapters:
        f = _upcast(torch.stack(features).flatten(2))  # [N, B, D]
        t = _upcast(torch.stack(targets).flatten(2))
        # sum_j W_ij (F_i - F_j)^2 = s_i (F_i - G_i)^2 + (sum_j W_ij F_j^2 - s_i G_i^2),
        # with s_i = sum_j W_ij in {0, 1} and G_i = sum_j W_ij F_j; the second term is the
        # (gradient-free) spread of the teachers, exactly 0 for one teacher.
        g = torch.einsum("bij,jbd->ibd", w, t)
        s = w.sum(dim=-1).transpose(0, 1).unsqueeze(-1)  # [N, B, 1]
        spread = torch.einsum("bij,jbd->ibd", w, t.square()) - s * g.square()
        return ((s * f - g).square() + spread.clamp_min(0.0)).mean(dim=-1)
    rows = []
    for i in range(n):
        row = []
        for j in range(n):
            if i == j:
                row.append(_upcast(features[i].new_zeros(batch)))
                continue
            key = f"{i}_{j}"
            student = adapters[key](features[i]) if adapters is not None and key in adapters else features[i]
            diff = _upcast(student) - _upcast(targets[j])
            row.append(diff.square().flatten(1).mean(dim=1))
        rows.append(torch.stack(row, dim=-1))  # [B, N]
    pair = torch.stack(rows)  # [N, B, N]: pair[i, b, j]
    return (pair * w.permute(1, 0, 2)).sum(dim=-1)


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
    """Each member's loss ``L_i = L_C,i + alpha * L_D,i + beta * L_F,i`` (paper Eq. 8-11).

    With ``W`` from :func:`~competitive.distillation_weights`:

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
    log_probs = torch.stack([_upcast(z) for z in logits]).log_softmax(dim=-1)
    ce_per_sample = cross_entropy(log_probs, targets)
    return _loss_terms(log_probs, ce_per_sample, logits, weights, features, adapters, alpha, beta, temperature)


def _loss_terms(log_probs, ce_per_sample, logits, weights, features, adapters, alpha, beta, temperature):
    batch = ce_per_sample.shape[1]
    # only a member with a finite CE (on this sample) may act as a target for the others
    teaches = torch.isfinite(ce_per_sample)
    if temperature != 1.0:
        log_probs = (torch.stack([_upcast(z) for z in logits]) / temperature).log_softmax(dim=-1)
    p = torch.where(teaches.unsqueeze(-1), log_probs.detach().exp(), 0.0)
    w = _per_sample_weights(weights, batch).to(p.dtype)
    # sum_j W_ij KL(p_j || p_i) = sum_j W_ij sum_c p_j log p_j - sum_c q_i log p_i,
    # with q_i = sum_j W_ij p_j the (averaged) teacher distribution
    q = torch.einsum("bij,jbc->ibc", w, p)
    neg_entropy = torch.xlogy(p, p).sum(dim=-1)  # [N, B]
    kl = torch.einsum("bij,jb->ib", w, neg_entropy) - (q * log_probs).sum(dim=-1)
    kl = kl.mean(dim=1) * temperature**2
    if features is None:
        feature = torch.zeros_like(kl)
    else:
        feature = _feature_loss(features, weights, teaches, adapters).mean(dim=1)
    ce = ce_per_sample.mean(dim=1)
    return LossTerms(ce, kl, feature, ce + alpha * kl + beta * feature)


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
    """Cross-entropy, selection and loss in one pure function: what a group step computes.

    Args:
        logits, targets, features, adapters, alpha, beta, temperature: as in
            :func:`competitive_loss`.
        rule (str): selection rule, see :func:`~competitive.distillation_weights`.
        granularity (str): ``"batch"`` (one teacher per batch, the paper) or ``"sample"``.
        reduce_ce (callable, optional): applied to the batch CE ``[N]`` before selection, e.g. an
            all-reduce so every process picks the same teacher. Only with ``"batch"``.

    Returns:
        ``(terms, teacher, weights)``: the :class:`LossTerms`, the teacher index (a scalar, or
        ``[B]`` per sample; ``-1`` where no CE is finite) and ``W``.
    """
    log_probs = torch.stack([_upcast(z) for z in logits]).log_softmax(dim=-1)
    ce_per_sample = cross_entropy(log_probs, targets)
    if granularity == "batch":
        score = ce_per_sample.detach().mean(dim=1)
        if reduce_ce is not None:
            score = reduce_ce(score)
    else:
        score = ce_per_sample.detach().transpose(0, 1)  # [B, N]
    teacher = teacher_index(score)
    weights = _weights_for_teacher(score, rule=rule, teacher=teacher)
    terms = _loss_terms(log_probs, ce_per_sample, logits, weights, features, adapters, alpha, beta, temperature)
    return terms, teacher, weights
