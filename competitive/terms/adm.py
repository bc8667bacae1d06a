"""An ADM-style spatial term: consensus for the students, divergence for the teacher.

This is **our reading of the abstract** of Asymmetric Decision-Making (arXiv 2503.06685, ICML
2025), whose code and full text are not public; it is not a reproduction of that paper. Students
learn the teacher's spatial features where the two agree (consensus); the teacher is pushed away
from a student where they disagree (divergence).
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

    For student ``i`` and teacher ``j`` with ``W_ij > 0``: ``u = normalize(A_ij(F_i))`` and
    ``v = normalize(F_j)`` over channels at each location, ``s = sum_c u * v``, ``s_bar = s.detach()``;
    consensus weights ``w_co = (1 + s_bar) / 2`` and divergence weights ``w_di = (1 - s_bar) / 2``,
    each divided by its own mean over the locations of each sample (plus 1e-6).

    - student's consensus term ``L_co(i, j) = mean_{b, loc} w_co * ||u - v.detach()||^2``;
    - teacher's divergence term ``L_di(j, i) = mean_{b, loc} w_di * sum_c (u.detach() * v)``;
    - member ``m``: ``consensus * sum_j W_mj L_co(m, j) + divergence * sum_i W_im L_di(m, i)``.

    Args:
        features (sequence of Tensor): ``N`` maps ``[B, C, H, W]`` (or ``[B, D]``, one location).
        weights (Tensor): ``W``, ``[N, N]`` or ``[B, N, N]``.
        consensus (float): weight of the students' consensus term. Default: 1.
        divergence (float): weight of the teacher's divergence term. Default: 0.1.
        adapters (nn.ModuleDict, optional): ``"i_j"`` -> module mapping ``F_i`` to ``F_j``'s shape.
        teaches (BoolTensor, optional): ``[N, B]``; samples where it is False are never read as
            a target (zeros instead). Default: every sample with finite features.

    Example:
        >>> f = [torch.randn(2, 8, 4, 4) for _ in range(2)]
        >>> adm_loss(f, torch.tensor([[0.0, 0.0], [1.0, 0.0]])).shape  # member 0 teaches member 1
        torch.Size([2])
    """
    n = len(features)
    if teaches is None:
        teaches = torch.stack([torch.isfinite(f.flatten(1)).all(dim=1) for f in features])
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
            u = F.normalize(upcast(student), dim=_channels(features[j]))
            v = v_all[j]
            # what each side reads of the other: finite samples only, and no gradient
            v_target = torch.where(sample_mask(teaches[j], v), v, 0.0).detach()
            u_target = torch.where(sample_mask(teaches[i], u), u, 0.0).detach()
            s_bar = (u_target * v_target).sum(dim=_channels(features[j]))  # [B, ...locations]
            w_co = (1 + s_bar) / 2
            w_di = (1 - s_bar) / 2
            w_co = w_co / (_location_mean(w_co).view(-1, *[1] * (w_co.dim() - 1)) + 1e-6)
            w_di = w_di / (_location_mean(w_di).view(-1, *[1] * (w_di.dim() - 1)) + 1e-6)
            co_row.append(_location_mean(w_co * (u - v_target).square().sum(dim=_channels(features[j]))))
            di_row.append(_location_mean(w_di * (u_target * v).sum(dim=_channels(features[j]))))
        co_rows.append(torch.stack(co_row))
        di_rows.append(torch.stack(di_row))
    co = torch.stack(co_rows)  # [i, j, B]: student i's consensus towards teacher j
    di = torch.stack(di_rows)  # [i, j, B]: teacher j's divergence from student i
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
            outputs.features,
            weights,
            consensus=self.consensus,
            divergence=self.divergence,
            adapters=self.adapters if len(self.adapters) else None,
            teaches=outputs.teaches,
        )

    def extra_repr(self) -> str:
        return f"weight={self.weight}, consensus={self.consensus}, divergence={self.divergence}"
