"""An ADM-style spatial term: consensus for the students, divergence for the teacher.

This is **our reading of the abstract** of Asymmetric Decision-Making (arXiv 2503.06685, ICML
2025), whose code and full text are not public; it is not a reproduction of that paper. Students
learn the teacher's spatial features where the two agree (consensus); the teacher is pushed away
from a student where they disagree (divergence).

For student ``i`` and teacher ``j`` with ``W_ij > 0``: ``u = normalize(A_ij(F_i))`` and
``v = normalize(F_j)`` over channels at each location, ``s = sum_c u * v``, ``s_bar = s.detach()``;
consensus weights ``w_co = (1 + s_bar) / 2`` and divergence weights ``w_di = (1 - s_bar) / 2``,
each divided by its own mean over the locations of each sample (plus 1e-6).

- student's consensus term ``L_co(i, j) = mean_{b, loc} w_co * ||u - v.detach()||^2``;
- teacher's divergence term ``L_di(j, i) = mean_{b, loc} w_di * sum_c (u.detach() * v)``;
- member ``m``: ``consensus * sum_j W_mj L_co(m, j) + divergence * sum_i W_im L_di(m, i)``.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_real
from .base import StepOutputs, register_term, upcast, weighted
from .feature import Adapted, sample_mask


def _channels(f: Tensor) -> int:
    # [B, C, H, W]: channels at dim 1; [B, D] (one location) and [B, T, D]: the last dim
    return 1 if f.dim() == 4 else -1


def _location_mean(x: Tensor) -> Tensor:
    """Mean over every dim but the batch: ``[B, ...] -> [B]``."""
    return x.flatten(1).mean(dim=1) if x.dim() > 1 else x


def _pair(student: Tensor, v: Tensor, student_teaches: Tensor, teaches: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """Student ``i``'s consensus towards teacher ``j`` and ``j``'s divergence from ``i``, per sample."""
    u = F.normalize(upcast(student), dim=channels)
    # what each side reads of the other: finite samples only, and no gradient
    v_target = torch.where(sample_mask(teaches, v), v, 0.0).detach()
    u_target = torch.where(sample_mask(student_teaches, u), u, 0.0).detach()
    s_bar = (u_target * v_target).sum(dim=channels)  # [B, ...locations]
    w_co, w_di = (1 + s_bar) / 2, (1 - s_bar) / 2
    w_co = w_co / (_location_mean(w_co).view(-1, *[1] * (w_co.dim() - 1)) + 1e-6)
    w_di = w_di / (_location_mean(w_di).view(-1, *[1] * (w_di.dim() - 1)) + 1e-6)
    co = _location_mean(w_co * (u - v_target).square().sum(dim=channels))
    return co, _location_mean(w_di * (u_target * v).sum(dim=channels))


def _all_pairs(features: Sequence[Tensor], adapters: nn.ModuleDict | None, teaches: Tensor) -> tuple[Tensor, Tensor]:
    """``[i, j, B]``: student ``i``'s consensus towards teacher ``j``, and ``j``'s divergence from ``i``."""
    n = len(features)
    v_all = [F.normalize(upcast(f), dim=_channels(f)) for f in features]
    co_rows, di_rows = [], []
    for i in range(n):
        co_row, di_row = [], []
        for j in range(n):
            if i == j:
                zero = v_all[i].new_zeros(features[i].shape[0])
                co_row.append(zero)
                di_row.append(zero)
                continue
            key = f"{i}_{j}"
            student = adapters[key](upcast(features[i])) if adapters is not None and key in adapters else features[i]
            co, di = _pair(student, v_all[j], teaches[i], teaches[j], _channels(features[j]))
            co_row.append(co)
            di_row.append(di)
        co_rows.append(torch.stack(co_row))
        di_rows.append(torch.stack(di_row))
    return torch.stack(co_rows), torch.stack(di_rows)


def adm_loss(
    features: Sequence[Tensor],
    weights: Tensor,
    *,
    consensus: float = 1.0,
    divergence: float = 0.1,
    adapters: nn.ModuleDict | None = None,
    teaches: Tensor | None = None,
) -> Tensor:
    """Each member's ADM-style loss under ``W``: ``[N]`` (our formulation; see the module docstring).

    ``features``: ``N`` maps ``[B, C, H, W]`` (or ``[B, D]``); ``weights``: ``W``; ``consensus``,
    ``divergence``: the two weights (1, 0.1); ``adapters``: ``"i_j"`` -> ``A_ij``; ``teaches``:
    ``[N, B]``, samples never read as a target where False (default: finite features).

    Example:
        >>> f = [torch.randn(2, 8, 4, 4) for _ in range(2)]
        >>> adm_loss(f, torch.tensor([[0.0, 0.0], [1.0, 0.0]])).shape  # member 0 teaches member 1
        torch.Size([2])
    """
    if teaches is None:
        teaches = torch.stack([torch.isfinite(f.flatten(1)).all(dim=1) for f in features])
    co, di = _all_pairs(features, adapters, teaches)
    student_side = weighted(weights, co)
    # member m as a teacher: sum_i W_im L_di(m, i) = the column m of W against di[:, m]
    teacher_side = weighted(weights.transpose(-1, -2), di.transpose(0, 1))
    return consensus * student_side + divergence * teacher_side


@register_term("adm")
class ADM(Adapted):
    """ADM-style spatial distillation on feature maps (our reading of the abstract), see :func:`adm_loss`.

    Args:
        weight (float): the term's weight. Default: 1.
        consensus (float): weight of the students' consensus term. Default: 1.
        divergence (float): weight of the teacher's divergence term. Default: 0.1.
    """

    def __init__(self, weight: float = 1.0, *, consensus: float = 1.0, divergence: float = 0.1):
        super().__init__(weight)
        self.consensus = check_real("consensus", consensus)
        self.divergence = check_real("divergence", divergence)

    def forward(self, outputs: StepOutputs, weights: Tensor) -> Tensor:
        return adm_loss(
            outputs.hooked("features"),
            weights,
            consensus=self.consensus,
            divergence=self.divergence,
            adapters=self.adapters if len(self.adapters) else None,
            teaches=outputs.teaches,
        )

    def extra_repr(self) -> str:
        return f"weight={self.weight}, consensus={self.consensus}, divergence={self.divergence}"
