"""``L_F``: the student imitates its teachers' feature maps, FitNets-style (paper Eq. 10)."""

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .adapters import build_adapters
from .base import StepOutputs, Term, per_sample, register_term, upcast, weighted


def sample_mask(mask: Tensor, like: Tensor) -> Tensor:
    """A per-sample ``[B]`` mask shaped to broadcast over ``like`` ``[B, ...]``."""
    return mask.view(-1, *[1] * (like.dim() - 1))


def feature_term(
    features: Sequence[Tensor], teaches: Tensor, weights: Tensor, adapters: nn.ModuleDict | None = None
) -> Tensor:
    """``sum_j W_ij * mean((A_ij(F_i) - F_j)^2)`` per member, averaged over the batch: ``[N]``."""
    w = per_sample(weights, features[0].shape[0])  # [B, N, N]
    # the teacher's target carries no gradient; a member that cannot teach contributes zeros
    targets = [torch.where(sample_mask(teaches[j], f), f.detach(), 0.0) for j, f in enumerate(features)]
    if all(f.shape == features[0].shape for f in features) and not adapters:
        f = upcast(torch.stack(list(features)).flatten(2))  # [N, B, D]
        t = upcast(torch.stack(targets).flatten(2))
        w = w.to(f.dtype)
        # sum_j W_ij (F_i - F_j)^2 = s_i (F_i - G_i)^2 + (sum_j W_ij F_j^2 - s_i G_i^2),
        # with s_i = sum_j W_ij in {0, 1} and G_i = sum_j W_ij F_j; the second term is the
        # (gradient-free) spread of the teachers, exactly 0 for one teacher.
        g = torch.einsum("bij,jbd->ibd", w, t)
        s = w.sum(dim=-1).transpose(0, 1).unsqueeze(-1)  # [N, B, 1]
        spread = torch.einsum("bij,jbd->ibd", w, t.square()) - s * g.square()
        return ((s * f - g).square() + spread.clamp_min(0.0)).mean(dim=-1).mean(dim=1)
    pair = pairs(features, targets, adapters, lambda s, t: (upcast(s) - upcast(t)).square().flatten(1).mean(dim=1))
    return weighted(weights, pair)


def pairs(
    features: Sequence[Tensor],
    targets: Sequence[Tensor],
    adapters: nn.ModuleDict | None,
    value: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """``[N, N, B]``: ``value(A_ij(F_i), T_j)`` per sample for every student ``i`` and teacher ``j``
    (``A_ij`` the adapter where the shapes differ), 0 on the diagonal."""
    n, batch = len(features), features[0].shape[0]
    rows = []
    for i in range(n):
        row = []
        for j in range(n):
            if i == j:
                row.append(upcast(features[i].new_zeros(batch)))
                continue
            key = f"{i}_{j}"
            student = adapters[key](upcast(features[i])) if adapters is not None and key in adapters else features[i]
            row.append(value(student, targets[j]))
        rows.append(torch.stack(row))  # [N, B]
    return torch.stack(rows)


class Adapted(Term):
    """A term on feature maps, with one :class:`~competitive.FeatureAdapter` per ordered pair of
    members whose shapes differ (``"i_j"``: student ``i`` to teacher ``j``, trained by ``i``)."""

    needs: tuple[str, ...] = ("features",)
    reads_logits = False

    def __init__(self, weight: float = 1.0):
        super().__init__(weight)
        self.adapters = nn.ModuleDict()
        self.shapes: list[tuple[int, ...]] | None = None

    def build(self, shapes: dict[str, list[tuple[int, ...]]]) -> None:
        self.shapes = [tuple(s) for s in shapes["features"]]
        for key, adapter in build_adapters([torch.Size(s) for s in self.shapes], member_of="models").items():
            self.adapters[key] = adapter

    def member_parameters(self, member: int) -> Iterator[nn.Parameter]:
        for key, adapter in self.adapters.items():
            if int(key.split("_")[0]) == member:
                yield from adapter.parameters()


@register_term("feature")
class FeatureL2(Adapted):
    """Feature distillation, ``sum_j W_ij || A_ij(F_i) - F_j ||^2`` as a mean over elements (Eq. 10).

    Args:
        weight (float): ``beta``. Default: 1.

    Example:
        >>> from competitive.terms import StepOutputs
        >>> f = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])]
        >>> z = torch.zeros(2, 1, 3)
        >>> out = StepOutputs(list(z), z, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool), f)
        >>> FeatureL2()(out, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))  # mean((0-1)^2, (0-2)^2)
        tensor([0.0000, 2.5000])
    """

    def forward(self, outputs: StepOutputs, weights: Tensor) -> Tensor:
        adapters = self.adapters if len(self.adapters) else None
        return feature_term(outputs.hooked("features"), outputs.teaches, weights, adapters)
