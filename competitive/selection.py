"""Who learns from whom: the competition of each iteration (paper §3.1, Eq. 4, 7).

Every rule turns per-member cross-entropies into a distillation weight matrix ``W`` with
``W[..., i, j]`` = how much member ``i`` learns from member ``j``. Rows of students sum to 1 and
the teacher's row is 0, so one loss function serves every rule. Everything here is pure tensor
code that reads nothing back to the host and never branches on a tensor value in Python, so it
runs under ``torch.compile`` with ``fullgraph=True`` and never syncs a GPU with the host.
"""

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
