"""Who learns from whom (paper §3.1, Eq. 4): the rules, the teacher of the lowest score and the matrix ``W``,
as pure tensor functions with no host read (a GPU never waits for them)."""

import torch
from torch import Tensor


def _ranking_key(ce: Tensor) -> Tensor:
    # a NaN or inf cross-entropy ranks last, so it can never teach
    return torch.where(torch.isfinite(ce), ce, torch.full_like(ce, torch.inf))


def teacher_index(ce: Tensor) -> Tensor:
    """Index of the member with the lowest finite cross-entropy (paper Eq. 4).

    ``ce`` ``[..., N]`` (``[N]``, ``[B, N]`` per sample, ``[R, N]`` per position) gives a LongTensor
    ``ce.shape[:-1]``; ties go to the lowest index, ``-1`` where every entry is NaN or inf.

    Example:
        >>> teacher_index(torch.tensor([0.9, 0.4, torch.nan, 0.4]))
        tensor(1)
    """
    key = _ranking_key(ce)
    # the first of several minima: ties go to the lowest index (argmin's answer; a loop over the few
    # members is several times faster than argmin over a last dim of 2-8 at a row per pixel)
    index, lowest = torch.zeros(key.shape[:-1], dtype=torch.long, device=ce.device), key[..., 0]
    for j in range(1, key.shape[-1]):
        lower = key[..., j] < lowest
        index, lowest = torch.where(lower, j, index), torch.where(lower, key[..., j], lowest)
    return torch.where(torch.isfinite(ce).any(dim=-1), index, torch.full_like(index, -1))


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


TABLES: dict[tuple[str, int, torch.device, torch.dtype], Tensor] = {}


def weight_table(rule: str, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[N + 1, N, N]``: :func:`weights_for_teacher` when member ``t`` teaches the batch (row ``N``, i.e.
    ``-1``: no teacher), built once per setting, so a step's ``W`` is one lookup."""
    key = (rule, n, device, dtype)
    if key not in TABLES:
        with torch.no_grad():
            ce, teachers = torch.zeros(n, device=device, dtype=dtype), torch.arange(-1, n, device=device).roll(-1)
            rows = [weights_for_teacher(ce.unsqueeze(0), rule=rule, teacher=t.view(1))[0] for t in teachers]
            TABLES[key] = torch.stack(rows)
    return TABLES[key]
