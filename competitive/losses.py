"""The per-step math of each iteration (paper §3.1, §3.3, Eq. 4, 7-11), as pure functions.

:func:`step_losses` is what :class:`~competitive.CompetitiveGroup` runs every step (eagerly, or under
``torch.compile(fullgraph=True)``): cross-entropy, the competition (who may teach, the teacher, the
rule's ``W``, ``W[..., i, j]`` = how much member ``i`` learns from ``j``), then every knowledge term;
also what every term reads (:class:`StepOutputs`). Nothing here syncs a GPU with the host."""

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .rules import TABLES, teacher_index, weight_table, weights_for_teacher  # noqa: F401

RULES = ("best", "better", "mutual", "independent")
GRANULARITIES = ("batch", "sample", "position")


def check_rule(rule: str, granularity: str = "batch") -> None:
    """Refuse an unknown ``rule`` or ``granularity`` by name (the pure functions never guess)."""
    if rule not in RULES:
        raise ValueError(f"Invalid rule {rule!r}. Please provide one of {RULES}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"Invalid granularity {granularity!r}. Please provide one of {GRANULARITIES}.")


def upcast(x: Tensor) -> Tensor:
    """``x`` in at least float32 (members under autocast); decided in Python (promote_types is an op)."""
    return x if x.dtype in _WIDE else x.to(torch.float32)  # a cast on the device, no host read


_WIDE = (torch.float32, torch.float64)


def per_sample(weights: Tensor, batch: int) -> Tensor:
    """``W`` as ``[B, N, N]``: ``[N, N]`` (one teacher per batch) is broadcast over the batch."""
    return weights.expand(batch, -1, -1) if weights.dim() == 2 else weights


class StepOutputs(NamedTuple):
    """What the members produced this step, as every term sees it. Predictions per position are
    flattened into rows, ``R = B * d1 * ... * dk`` (``R = B`` for logits ``[B, C]``).

    Attributes:
        logits, log_probs: ``N`` tensors ``[R, C]`` (classes last), their log-softmax ``[N, R, C]`` (>= float32;
            both ``[.., R, 0]`` in :func:`~competitive.chunked.chunked_losses`, which computes ``kl`` itself).
        labels (Tensor): ``[N, R]`` the class each member learns towards (``ignore_index`` where ignored).
        teaches (BoolTensor): ``[N, B]`` where member ``j``'s outputs on sample ``b`` are all finite.
        features, embeddings (list of Tensor or None): the hooked outputs, ``[B, ...]`` per member.
        valid, teaches_at (BoolTensor or None): ``[N, R]`` rows not ignored (None: all); where ``j`` may teach.
        positions (tuple of int): ``(d1, ..., dk)``; ``()`` for ``[B, C]`` logits.
        task (str): the task loss (:mod:`competitive.tasks`); with another than ``"ce"``, ``logits`` are
            the members' outputs and ``log_probs`` empty. ``"member"``: members that give their own loss.
    """

    logits: Sequence[Tensor]
    log_probs: Tensor
    labels: Tensor
    teaches: Tensor
    features: Sequence[Tensor] | None = None
    embeddings: Sequence[Tensor] | None = None
    valid: Tensor | None = None
    teaches_at: Tensor | None = None
    positions: tuple[int, ...] = ()
    task: str = "ce"

    def hooked(self, need: str) -> Sequence[Tensor]:
        """``features`` or ``embeddings``, which a term that reads them needs (captured for its ``needs``)."""
        values = self.features if need == "features" else self.embeddings
        if values is None:
            raise ValueError(f"This term reads {need}, but the step has none: give the group hooks for them.")
        return values


class KnowledgeTerm(Protocol):
    """What the step math calls: a name and ``(outputs, W) -> [N]`` (a :class:`~competitive.Term`; with
    ``per_position = True`` ``W`` per row of :class:`StepOutputs`, else per sample)."""

    @property
    def name(self) -> str: ...

    def __call__(self, outputs: StepOutputs, weights: Tensor) -> Tensor: ...


class StepLosses(NamedTuple):
    """What :func:`step_losses` computed: ``ce`` ``[N]``, ``terms`` (name -> unweighted ``[N]``),
    ``teacher`` (scalar, ``[B]`` or ``[B, d1..dk]``; ``-1`` where no member may teach), ``weights``
    (``W``: ``teacher.shape + [N, N]``) and ``valid`` (where ``teacher`` counts: not ignored)."""

    ce: Tensor
    terms: dict[str, Tensor]
    teacher: Tensor
    weights: Tensor
    valid: Tensor | None = None


def cross_entropy(log_probs: Tensor, targets: Tensor) -> Tensor:
    """Per-member, per-row cross-entropy ``[N, R]`` (paper Eq. 7) of log-probabilities ``[N, R, C]``
    and class indices ``[R]`` (shared) or ``[N, R]``, or label distributions ``[N, R, C]``."""
    if targets.dim() == 1:
        targets = targets.expand(log_probs.shape[0], -1)
    if targets.dim() == 2:
        return -log_probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return -(targets * log_probs).sum(dim=-1)


def competition_score(ce_per_sample: Tensor, targets: Tensor) -> Tensor:
    """What the members compete on, per row ``[N, R]``: ``KL(label || p) = CE - H(label)`` (the CE for hard
    labels; a member predicting a 50/50 mixed label exactly scores 0, not 0.69)."""
    score = ce_per_sample.detach()
    if targets.dim() == 3:
        score = score + torch.xlogy(targets, targets).sum(dim=-1)
    return score


def step_losses(
    logits: Sequence[Tensor], targets: Tensor, *, terms: Sequence["KnowledgeTerm"] = (),
    features: Sequence[Tensor] | None = None, embeddings: Sequence[Tensor] | None = None, rule: str = "best",
    granularity: str = "batch", reduce_score: Callable[[Tensor], Tensor] | None = None,
    fixed_teacher: int | None = None, class_dim: int = 1, ignore_index: int = -100, shift_targets: bool = False,
) -> StepLosses:
    """Cross-entropy, competition, ``W`` and every term: one group step's math, without weights.

    A member may teach a position only where its target is not ``ignore_index`` and its CE and all
    its hooked outputs are finite; the teacher is the member with the lowest :func:`competition_score`
    among those (ties: lowest index), averaged over the valid positions of the batch (``"batch"``),
    of each sample (``"sample"``), or not at all (``"position"``). Every term reads the same ``W``. For
    logits too large to hold more than once (a vocabulary), :func:`~competitive.chunked_losses` computes the
    same over chunks of positions; the group picks it by itself (``chunk_rows``).

    Args:
        logits (sequence of Tensor): ``N`` tensors ``[B, C, d1..dk]`` (``k >= 0``; classes at ``class_dim``).
        targets (Tensor): class indices ``[B, d1..dk]`` or ``[N, B, d1..dk]`` (``ignore_index``: ignored),
            or label rows ``[N, B, C, d1..dk]`` (a row of zeros: ignored).
        terms, features, embeddings (optional): the knowledge terms (default none), the hooked outputs.
        rule, granularity, fixed_teacher, class_dim, ignore_index (str, str, int, int, int): as the group's.
        reduce_score (callable, optional): applied to the batch scores ``[N]`` before selection
            (an all-reduce, so every process picks the same teacher). Only with ``"batch"``.
        shift_targets (bool): the logits at position ``t`` learn the target at ``t + 1`` (causal LMs): targets
            with the logits' positions are shifted here, targets with one position fewer are taken as shifted.
    """
    if shift_targets:  # the logits at 0..T-2 learn the targets at 1..T-1
        targets, dim = shifted_targets(logits, targets, class_dim), 2 if class_dim % logits[0].dim() == 1 else 1
        logits = [z.narrow(dim, 0, z.shape[dim] - 1) for z in logits]
    outputs, ce, teacher, weights, valid = compete(
        logits, targets, features, embeddings, rule, granularity, reduce_score, fixed_teacher, class_dim, ignore_index
    )
    rows, samples = term_weights(weights, outputs)
    values = {t.name: t(outputs, rows if getattr(t, "per_position", False) else samples) for t in terms}
    if granularity == "position" and outputs.positions:  # in the layout of the targets: [B, d1..dk]
        shape = (outputs.teaches.shape[1], *outputs.positions)
        teacher, weights, valid = teacher.view(shape), weights.view(*shape, *weights.shape[-2:]), valid.view(shape)
    return StepLosses(ce, values, teacher, weights, valid)


def shifted_targets(logits: Sequence[Tensor], targets: Tensor, class_dim: int) -> Tensor:
    """``shift_targets``: the targets of positions ``1..T-1`` (as given where they have ``T - 1`` positions)."""
    length = logits[0].shape[2 if class_dim % logits[0].dim() == 1 else 1]
    dim = targets.dim() - (logits[0].dim() - 2)  # the targets' first position dim
    return targets.narrow(dim, 1, length - 1) if targets.shape[dim] == length else targets


def _rows(logits: Sequence[Tensor], targets: Tensor, class_dim: int, ignore_index: int) -> tuple[Tensor, ...]:
    """Logits ``[N, R, C]`` (at least float32), targets ``[R]``, ``[N, R]`` or ``[N, R, C]``, ``valid [N, R]``."""
    n, classes = len(logits), logits[0].shape[class_dim]
    rows = torch.stack([upcast(z.movedim(class_dim, -1)) for z in logits]).reshape(n, -1, classes)  # one copy
    if targets.is_floating_point():  # label rows [N, B, C, d1..dk]; zero rows are ignored
        targets = targets.movedim(2, -1).reshape(n, -1, classes)
        return rows, targets, (targets.sum(dim=-1) > 0)
    targets = targets.reshape(-1) if targets.dim() == logits[0].dim() - 1 else targets.reshape(n, -1)
    valid = targets != ignore_index
    return rows, torch.where(valid, targets, 0), valid.expand(n, -1)


def compete(
    logits: Sequence[Tensor], targets: Tensor, features: Sequence[Tensor] | None, embeddings: Sequence[Tensor] | None,
    rule: str, granularity: str, reduce_score: Callable[[Tensor], Tensor] | None, fixed_teacher: int | None = None,
    class_dim: int = 1, ignore_index: int = -100,
) -> tuple["StepOutputs", Tensor, Tensor, Tensor, Tensor]:
    """CE, which member may teach which position, the teacher and ``W`` (Eq. 4, 7): what the terms
    read, the mean CE over valid positions ``[N]``, the teacher, ``W`` (per row at ``"position"``)
    and where the teacher counts."""
    check_rule(rule, granularity)
    batch = logits[0].shape[0]
    positions = tuple(s for d, s in enumerate(logits[0].shape) if d not in (0, class_dim % logits[0].dim()))
    if granularity == "batch" and not targets.is_floating_point():
        return _compete_batch(logits, targets, features, embeddings, rule, reduce_score, fixed_teacher, class_dim,
                              ignore_index, batch, positions)
    rows, targets, valid = _rows(logits, targets, class_dim, ignore_index)
    log_probs = rows.log_softmax(dim=-1)
    ce_rows = torch.where(valid, cross_entropy(log_probs, targets), 0.0)
    how = (rule, granularity, reduce_score, fixed_teacher, ignore_index)
    teaches_at, teacher, weights, has, ok, labels = contest(ce_rows, targets, valid, features, embeddings, batch, *how)
    outputs = StepOutputs(rows.unbind(0), log_probs, labels, ok, features, embeddings, valid, teaches_at, positions)
    ce = ce_rows.sum(dim=1) / valid.sum(dim=1).to(ce_rows.dtype).clamp_min(1.0)  # mean over valid positions
    return outputs, ce, teacher, weights, has


def _compete_batch(
    logits: Sequence[Tensor], targets: Tensor, features: Sequence[Tensor] | None, embeddings: Sequence[Tensor] | None,
    rule: str, reduce_score: Callable[[Tensor], Tensor] | None, fixed_teacher: int | None, class_dim: int,
    ignore_index: int, batch: int, positions: tuple[int, ...],
) -> tuple["StepOutputs", Tensor, Tensor, Tensor, Tensor]:
    """:func:`compete` for one teacher per batch and class indices, in the fewest ops the math needs (the
    same values, bit for bit): each member's score is its mean CE, and a non-finite row makes it non-finite."""
    n, classes, last = len(logits), logits[0].shape[class_dim], class_dim % logits[0].dim() == logits[0].dim() - 1
    rows = torch.stack([upcast(z if last else z.movedim(class_dim, -1)) for z in logits]).view(n, -1, classes)
    log_probs = rows.log_softmax(dim=-1)
    labels = targets.reshape(-1) if targets.dim() == logits[0].dim() - 1 else targets.reshape(n, -1)
    flat = labels.repeat(n) if labels.dim() == 1 else labels.reshape(-1)
    nll = F.nll_loss(log_probs.view(-1, classes), flat, ignore_index=ignore_index, reduction="none")
    ce_rows, valid = nll.view(n, -1), (labels != ignore_index).expand(n, -1)  # 0 where ignored
    count, total = valid.sum(dim=1, dtype=ce_rows.dtype), ce_rows.sum(dim=1)
    teaches_at = (ce_rows - ce_rows == 0) & valid  # a member may be a target only where finite (inf - inf: NaN)
    score = total.detach() / count  # NaN without a valid row; not finite with a non-finite row
    for values in (features, embeddings):
        if values is not None:
            finite = torch.stack([torch.isfinite(v.detach().reshape(batch, -1)).all(dim=1) for v in values])
            teaches_at = (teaches_at.view(n, batch, -1) & finite.to(valid.device).unsqueeze(-1)).view(n, -1)
            score = score.masked_fill(~(teaches_at | ~valid).all(dim=1), torch.nan)
    score, has = (score if reduce_score is None else reduce_score(score)), count > 0
    teacher, weights = _batch_teacher(score, has, rule, fixed_teacher)
    # teaches [N, B]: all of a sample's valid positions may teach, and it has one (without positions: teaches_at)
    ok = teaches_at
    if positions:
        ok = (teaches_at | ~valid).view(n, batch, -1).all(-1) & valid.view(n, batch, -1).any(-1)
    outputs = StepOutputs(rows.unbind(0), log_probs, labels.expand(n, -1), ok, features, embeddings, valid,
                          teaches_at, positions)  # fmt: skip
    return outputs, total / count.clamp_min(1.0), teacher, weights, has.any()


def _batch_teacher(score: Tensor, has: Tensor, rule: str, fixed_teacher: int | None) -> tuple[Tensor, Tensor]:
    """The batch's teacher and ``W`` (zero rows where no valid position, ``~has``) from the scores ``[N]``."""
    # the first of the lowest finite scores (min gives the first of equal minima), -1 if none is finite
    lowest, teacher = torch.nan_to_num(score, nan=torch.inf, posinf=torch.inf, neginf=torch.inf).min(dim=0)
    teacher = teacher.masked_fill(lowest == torch.inf, -1)
    if fixed_teacher is not None:  # offline KD: the fixed member teaches wherever its own outputs are finite
        teacher = torch.where(torch.isfinite(score[fixed_teacher]), fixed_teacher, -1)
    if rule in ("best", "independent") and not torch.compiler.is_compiling():  # W of every teacher, built once:
        key = (rule, len(score), score.device, score.dtype)  # a lookup by a 1-D index
        weights = (TABLES[key] if key in TABLES else weight_table(*key))[teacher.view(1)][0]
    else:
        weights = weights_for_teacher(score, rule=rule, teacher=teacher)
    return teacher, weights * has.unsqueeze(-1)


def contest(
    ce_rows: Tensor, targets: Tensor, valid: Tensor, features: Sequence[Tensor] | None,
    embeddings: Sequence[Tensor] | None, batch: int, rule: str, granularity: str,
    reduce_score: Callable[[Tensor], Tensor] | None, fixed_teacher: int | None, ignore_index: int,
) -> tuple[Tensor, ...]:
    """The competition on the CE rows ``[N, R]`` (0 where not ``valid``): where each member may teach
    ``[N, R]``, the teacher, ``W``, where the teacher counts, ``teaches`` ``[N, B]`` and the labels ``[N, R]``."""
    n = len(ce_rows)
    teaches_at = torch.isfinite(ce_rows) & valid  # a member may be a target only where finite
    for values in (features, embeddings):
        if values is not None:
            finite = torch.stack([torch.isfinite(v.detach().reshape(batch, -1)).all(dim=1) for v in values])
            teaches_at = (teaches_at.view(n, batch, -1) & finite.to(valid.device).unsqueeze(-1)).view(n, -1)
    score = torch.where(valid, torch.where(teaches_at, competition_score(ce_rows, targets), torch.nan), 0.0)
    score, has = _reduce(score, valid, granularity, batch, reduce_score)
    teacher = teacher_index(score)
    if fixed_teacher is not None:  # offline KD: the fixed member teaches wherever its own outputs are finite
        teacher = torch.where(torch.isfinite(score[..., fixed_teacher]), fixed_teacher, -1)
    weights = torch.where(has.unsqueeze(-1), weights_for_teacher(score, rule=rule, teacher=teacher), 0.0)
    ok = (teaches_at | ~valid).view(n, batch, -1).all(dim=-1) & valid.view(n, batch, -1).any(dim=-1)  # [N, B]
    labels = targets.argmax(dim=-1) if targets.dim() == 3 else targets.expand(n, -1)
    return teaches_at, teacher, weights, has.any(dim=-1), ok, torch.where(valid, labels, ignore_index)


def _reduce(
    score: Tensor, valid: Tensor, granularity: str, batch: int, reduce_score: Callable[[Tensor], Tensor] | None
) -> tuple[Tensor, Tensor]:
    """The scores ``[N, R]`` (0 where ignored) averaged over the valid positions of the batch ``[N]``, of
    each sample ``[B, N]``, or none ``[R, N]``; and where each member has a valid position there."""
    if granularity == "position":
        return torch.where(valid, score, torch.nan).transpose(0, 1), valid.transpose(0, 1)
    if granularity == "batch":
        count = valid.sum(dim=1).to(score.dtype)
        score = score.sum(dim=1) / count
        return (score if reduce_score is None else reduce_score(score)), count > 0
    if score.shape[1] != batch:  # positions: the mean over each sample's valid positions
        count = valid.view(len(score), batch, -1).sum(dim=-1).to(score.dtype)
        score, valid = score.view(len(score), batch, -1).sum(dim=-1) / count, count > 0
    return score.transpose(0, 1), valid.transpose(0, 1)


def term_weights(weights: Tensor, outputs: StepOutputs) -> tuple[Tensor, Tensor]:
    """``W`` for the terms that read rows (``per_position``) and for those that read whole samples. A
    sample's ``W`` at ``"position"``: the share of member ``i``'s valid positions that ``j`` teaches."""
    if weights.dim() == 2 or not outputs.positions:
        return weights, weights
    n, batch = len(outputs.logits), outputs.teaches.shape[1]
    if weights.shape[0] == batch:  # one W per sample, repeated over its positions
        return weights.unsqueeze(1).expand(-1, len(outputs.log_probs[0]) // batch, -1, -1).reshape(-1, n, n), weights
    valid = outputs.valid if outputs.valid is not None else outputs.log_probs.new_ones(outputs.log_probs.shape[:2])
    count = valid.view(n, batch, -1).sum(dim=-1).transpose(0, 1).unsqueeze(-1)  # [B, N, 1]
    return weights, weights.view(batch, -1, n, n).sum(dim=1) / count.clamp_min(1).to(weights.dtype)
