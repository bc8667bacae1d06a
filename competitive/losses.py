"""The per-step math of each iteration (paper §3.1, §3.3, Eq. 4, 7-11), as pure functions.

:func:`step_losses` is what :class:`~competitive.CompetitiveGroup` runs every step (eagerly, or
compiled with ``torch.compile(fullgraph=True)``): cross-entropy, the competition (who may teach,
the teacher, the rule's matrix ``W``), then every knowledge term. Every rule turns per-member
scores into ``W`` with ``W[..., i, j]`` = how much member ``i`` learns from member ``j``: rows of
students sum to 1 and the teacher's row is 0, so one loss function serves every rule. This module
also holds what every term reads (:class:`StepOutputs`) and the helpers that weight by ``W``.
Nothing here reads a tensor back to the host or branches on a tensor value in Python, so it runs
under ``torch.compile`` with ``fullgraph=True`` and never syncs a GPU with the host.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

RULES = ("best", "better", "mutual", "independent")
GRANULARITIES = ("batch", "sample")


def check_rule(rule: str, granularity: str = "batch") -> None:
    """Refuse an unknown ``rule`` or ``granularity`` by name (the pure functions never guess)."""
    if rule not in RULES:
        raise ValueError(f"Invalid rule {rule!r}. Please provide one of {RULES}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"Invalid granularity {granularity!r}. Please provide one of {GRANULARITIES}.")


def _ranking_key(ce: Tensor) -> Tensor:
    # a NaN or inf cross-entropy ranks last, so it can never teach
    return torch.where(torch.isfinite(ce), ce, torch.full_like(ce, torch.inf))


def teacher_index(ce: Tensor) -> Tensor:
    """Index of the member with the lowest finite cross-entropy (paper Eq. 4).

    Args:
        ce (Tensor): cross-entropies of shape ``[..., N]``: ``[N]`` for one teacher per batch,
            ``[B, N]`` for one teacher per sample.

    Returns:
        LongTensor of shape ``ce.shape[:-1]``. Ties go to the lowest index. Where every entry is
        NaN or inf there is no teacher and the index is ``-1`` (this pure function cannot raise
        without reading the values back; :class:`~competitive.CompetitiveGroup` raises a
        ``RuntimeError`` when no member's loss is finite).

    Example:
        >>> teacher_index(torch.tensor([0.9, 0.4, torch.nan, 0.4]))
        tensor(1)
    """
    key = _ranking_key(ce)
    # argmin returns the first of several minima: ties go to the lowest index
    index = key.argmin(dim=-1)
    return torch.where(torch.isfinite(ce).any(dim=-1), index, torch.full_like(index, -1))


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


def weights_for_teacher(ce: Tensor, *, rule: str, teacher: Tensor | None) -> Tensor:
    """:func:`distillation_weights` for a ``teacher`` already computed by :func:`teacher_index`."""
    n = ce.shape[-1]
    finite = torch.isfinite(ce)
    index = torch.arange(n, device=ce.device)
    if rule == "best":
        if teacher is None:
            raise ValueError("weights_for_teacher: rule='best' needs teacher=teacher_index(ce); got None.")
        is_teacher = index == teacher.unsqueeze(-1)  # [..., N]; all False without one
        beats = is_teacher.unsqueeze(-2) & ~is_teacher.unsqueeze(-1)
    elif rule == "better":
        key = _ranking_key(ce)
        lower = key.unsqueeze(-2) < key.unsqueeze(-1)  # [..., i, j]: j's CE is below i's
        tie = (key.unsqueeze(-2) == key.unsqueeze(-1)) & (index < index.unsqueeze(-1))
        beats = (lower | tie) & finite.unsqueeze(-2)
    elif rule == "mutual":
        beats = (index != index.unsqueeze(-1)) & finite.unsqueeze(-2)
    else:
        beats = torch.zeros(ce.shape + (n,), dtype=torch.bool, device=ce.device)
    weights = beats.to(ce.dtype)
    # average over the peers a member learns from; a row with no peer stays 0
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(1.0)


# -- what every term reads, and the helpers that weight by W ------------------------------


def upcast(x: Tensor) -> Tensor:
    """``x`` in at least float32, also when the members run in bf16 / fp16 under autocast."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def per_sample(weights: Tensor, batch: int) -> Tensor:
    """``W`` as ``[B, N, N]``: ``[N, N]`` (one teacher per batch) is broadcast over the batch."""
    return weights.expand(batch, -1, -1) if weights.dim() == 2 else weights


def weighted(weights: Tensor, pair: Tensor) -> Tensor:
    """``sum_j W[b, i, j] * pair[i, j, b]``, averaged over ``b``: ``[N]``.

    ``pair`` is ``[N, N, B]`` (member ``i`` towards member ``j``, per sample). A pair with weight
    0 contributes exactly 0 even where its value is NaN or inf, so a member that cannot teach
    never poisons another.
    """
    w = per_sample(weights, pair.shape[-1]).permute(1, 2, 0).to(pair.dtype)  # [N, N, B]
    return torch.where(w > 0, w * pair, 0.0).sum(dim=1).mean(dim=-1)


class StepOutputs(NamedTuple):
    """What the members produced this step, as every term sees it.

    Attributes:
        logits (list of Tensor): ``N`` tensors ``[B, C]``, as the members returned them.
        log_probs (Tensor): ``[N, B, C]`` log-softmax of the logits (at least float32).
        labels (Tensor): ``[N, B]`` the class each member was trained towards per sample (the
            argmax of a mixed label).
        teaches (BoolTensor): ``[N, B]`` where member ``j``'s outputs on sample ``b`` are all finite,
            so it may act as a target; terms mask every other value out of the targets.
        features (list of Tensor or None): the hooked feature maps, ``[B, ...]`` per member.
        embeddings (list of Tensor or None): the hooked embeddings, ``[B, D_i]`` per member.
    """

    logits: Sequence[Tensor]
    log_probs: Tensor
    labels: Tensor
    teaches: Tensor
    features: Sequence[Tensor] | None = None
    embeddings: Sequence[Tensor] | None = None

    def hooked(self, need: str) -> Sequence[Tensor]:
        """``features`` or ``embeddings``, which a term that reads them needs (the group captures both
        for every term that declares them in ``needs``)."""
        values = self.features if need == "features" else self.embeddings
        if values is None:
            raise ValueError(f"This term reads {need}, but the step has none: give the group hooks for them.")
        return values


# -- the step --------------------------------------------------------------------------------


class KnowledgeTerm(Protocol):
    """What the step math calls a term: a name and ``(outputs, W) -> [N]`` (a :class:`~competitive.Term`)."""

    @property
    def name(self) -> str: ...

    def __call__(self, outputs: StepOutputs, weights: Tensor) -> Tensor: ...


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
    terms: Sequence["KnowledgeTerm"] = (),
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
    outputs, ce, teacher, weights = compete(
        logits, targets, features, embeddings, rule, granularity, reduce_score, fixed_teacher
    )
    values = {term.name: term(outputs, weights) for term in terms}
    return StepLosses(ce, values, teacher, weights)


def compete(
    logits: Sequence[Tensor],
    targets: Tensor,
    features: Sequence[Tensor] | None,
    embeddings: Sequence[Tensor] | None,
    rule: str,
    granularity: str,
    reduce_score: Callable[[Tensor], Tensor] | None,
    fixed_teacher: int | None = None,
) -> tuple["StepOutputs", Tensor, Tensor, Tensor]:
    """CE, which member may teach which sample, the teacher and ``W`` (Eq. 4, 7): what the terms read,
    the mean CE ``[N]``, the teacher and ``W``."""
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
