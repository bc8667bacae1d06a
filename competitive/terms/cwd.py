"""``cwd``: channel-wise distillation (Shu et al., ICCV 2021, arXiv 2011.13256), with ``W`` deciding
who learns from whom.

Each channel of a map ``[B, C, H, W]`` becomes a distribution over its ``H x W`` positions,
``phi(x_c) = softmax(x_c / tau)``, and the student matches the teacher's channel by channel:
``tau^2 / C * sum_c KL(phi(T_c) || phi(S_c))``, averaged over the batch, the teacher detached. This is
mmrazor's ``ChannelWiseDivergence.forward`` (``mmrazor/models/losses/cwd.py``; defaults ``tau=1``,
weight 1; its segmentation configs weigh the decode head's logits by 5) for each pair with
``W_ij > 0``, weighted by ``W`` as every term. It reads the hooked feature maps (maps of different
shapes go through adapters, as the ``feature`` term's), or with ``on="logits"`` the logits per position
``[B, C, d1..dk]`` (mmrazor's segmentation setting: the decode head's logits): there, positions whose
target is ignored by the student or the teacher are left out of both softmaxes.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._validation import check_real
from .base import StepOutputs, register_term, upcast, weighted
from .feature import Adapted, pairs, sample_mask


def _channel_kl(student: Tensor, teacher: Tensor, tau: float, mask: Tensor | None = None) -> Tensor:
    """``tau^2 / C * sum_c KL(softmax(T_c / tau) || softmax(S_c / tau))`` per sample ``[B]``; maps
    ``[B, C, ...]`` with the positions flattened (a ``[B, C]`` map is one position per channel);
    ``mask`` ``[B, P]``: the positions that count (the others are left out of both softmaxes)."""
    s = upcast(student).reshape(*student.shape[:2], -1) / tau  # [B, C, P]
    t = upcast(teacher).reshape(*teacher.shape[:2], -1) / tau
    if mask is not None:  # exp(-1e9 - max) is 0: a left-out position has no mass (nor NaN, all left out)
        s, t = s.masked_fill(~mask.unsqueeze(1), -1e9), t.masked_fill(~mask.unsqueeze(1), -1e9)
    log_t = t.log_softmax(dim=-1)
    kl = log_t.exp() * (log_t - s.log_softmax(dim=-1))
    kl = (kl if mask is None else torch.where(mask.unsqueeze(1), kl, 0.0)).sum(dim=-1)  # [B, C]
    return kl.mean(dim=-1) * tau**2


def cwd_logits(outputs: StepOutputs, weights: Tensor, tau: float = 1.0) -> Tensor:
    """:func:`cwd_term` on the logits per position (``outputs.logits``, rows ``[B * P, C]``): ``[N]``."""
    if not outputs.positions:
        raise ValueError(
            "CWD(on='logits') needs logits per position [B, C, d1..dk]; these are [B, C] (one position per "
            "channel, so every channel's softmax is 1). Use on='features' with feature_hooks, or the 'kl' term."
        )
    n, batch = len(outputs.logits), outputs.teaches.shape[1]
    maps = [z.view(batch, -1, z.shape[-1]).transpose(1, 2) for z in outputs.logits]  # [B, C, P]
    valid = (outputs.valid if outputs.valid is not None else outputs.log_probs.new_ones(n, batch)).view(n, batch, -1)
    rows = []
    for i in range(n):
        row = []
        for j in range(n):
            target = torch.where(outputs.teaches[j].view(-1, 1, 1), maps[j].detach(), 0.0)
            row.append(maps[i].new_zeros(batch) if i == j else _channel_kl(maps[i], target, tau, valid[i] & valid[j]))
        rows.append(torch.stack(row))
    pair = torch.stack(rows)  # [N, N, B]: member i towards member j
    return weighted(weights, pair)


def cwd_term(
    features: Sequence[Tensor],
    teaches: Tensor,
    weights: Tensor,
    adapters: nn.ModuleDict | None = None,
    tau: float = 1.0,
) -> Tensor:
    """Each member's channel-wise divergence from its teachers under ``W``: ``[N]``.

    Args:
        features (sequence of Tensor): ``N`` maps ``[B, C, H, W]``.
        teaches (BoolTensor): ``[N, B]``; a member's samples where it is False are never a target.
        weights (Tensor): ``W``, ``[N, N]`` or ``[B, N, N]``.
        adapters (nn.ModuleDict, optional): ``"i_j"`` -> module mapping ``F_i`` to ``F_j``'s shape.
        tau (float): the softmax temperature over positions. Default: 1.
    """
    targets = [torch.where(sample_mask(teaches[j], f), f.detach(), 0.0) for j, f in enumerate(features)]
    pair = pairs(features, targets, adapters, lambda student, target: _channel_kl(student, target, tau))
    return weighted(weights, pair)  # pair [N, N, B]: member i towards member j


@register_term("cwd")
class CWD(Adapted):
    """Channel-wise distillation on feature maps, ``tau^2 / C * sum_c KL(phi(T_c) || phi(S_c))``.

    Args:
        weight (float): the term's weight. Default: 1.
        tau (float): temperature of the softmax over each channel's positions. Default: 1.
        on (str): ``"features"`` (the hooked maps, default) or ``"logits"`` (the logits per position).

    Example:
        >>> from competitive.terms import StepOutputs
        >>> f = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)]
        >>> z = torch.zeros(2, 2, 5)
        >>> out = StepOutputs(list(z), z, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.bool), f)
        >>> value = CWD(tau=4.0)(out, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))  # member 0 teaches 1
        >>> bool(value[0] == 0 and value[1] > 0)
        True
    """

    def __init__(self, weight: float = 1.0, *, tau: float = 1.0, on: str = "features"):
        super().__init__(weight)
        self.tau = check_real("tau", tau, positive=True, owner="cwd")
        if on not in ("features", "logits"):
            raise ValueError(
                f"Invalid on value {on!r} provided for the 'cwd' term. Please provide 'features' or 'logits'."
            )
        self.on = on
        self.needs: tuple[str, ...] = ("features",) if on == "features" else ()
        self.reads_logits = on == "logits"

    def build(self, shapes: dict[str, list[tuple[int, ...]]]) -> None:
        if self.on == "features":  # adapters between maps of different shapes; logits share one shape
            super().build(shapes)

    def forward(self, outputs: StepOutputs, weights: Tensor) -> Tensor:
        if self.on == "logits":
            return cwd_logits(outputs, weights, self.tau)
        adapters = self.adapters if len(self.adapters) else None
        return cwd_term(outputs.hooked("features"), outputs.teaches, weights, adapters, tau=self.tau)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, tau={self.tau}, on={self.on!r}"
