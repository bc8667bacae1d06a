"""``L_D``: the student imitates its teachers' class distributions (paper Eq. 9)."""

from collections.abc import Sequence

import torch
from torch import Tensor

from .._validation import check_real
from .base import StepOutputs, Term, per_sample, register_term, upcast


def kl_term(
    log_probs: Tensor,
    teaches: Tensor,
    weights: Tensor,
    *,
    temperature: float = 1.0,
    logits: Sequence[Tensor] | None = None,
    valid: Tensor | None = None,
    pairwise: bool = False,
) -> Tensor:
    """``tau^2 * sum_j W_ij KL(p_j || p_i)`` per member and row, averaged over the rows: ``[N]``.

    Rows are samples (``batchmean``) or positions: ``log_probs`` ``[N, R, C]``, ``teaches`` ``[N, R]``,
    ``W`` ``[N, N]`` or ``[R, N, N]``. ``p = softmax(z / tau)``. ``p_j`` is a target (no gradient
    reaches the teacher through it); where ``teaches`` is False member ``j`` contributes nothing.
    With ``valid`` ``[N, R]`` the mean is over each student's valid rows only. ``pairwise`` computes
    the same sum pair by pair, the faster way at a row per position (``[B, C]`` keeps the einsum).
    """
    if temperature != 1.0:
        if logits is None:
            raise ValueError(f"kl_term: temperature={temperature} needs the logits (logits=...) to rescale them.")
        log_probs = (torch.stack([upcast(z) for z in logits]) / temperature).log_softmax(dim=-1)
    if pairwise:
        kl = _pairwise(log_probs, teaches, weights)
        valid = torch.ones_like(teaches) if valid is None else valid
        return torch.where(valid, kl, 0.0).sum(dim=1) / valid.sum(dim=1).clamp_min(1).to(kl.dtype) * temperature**2
    p = torch.where(teaches.unsqueeze(-1), log_probs.detach().exp(), 0.0)
    w = per_sample(weights, log_probs.shape[1]).to(p.dtype)
    # sum_j W_ij KL(p_j || p_i) = sum_j W_ij sum_c p_j log p_j - sum_c q_i log p_i,
    # with q_i = sum_j W_ij p_j the (averaged) teacher distribution
    q = torch.einsum("bij,jbc->ibc", w, p)
    neg_entropy = torch.xlogy(p, p).sum(dim=-1)  # [N, B]
    kl = torch.einsum("bij,jb->ib", w, neg_entropy) - (q * log_probs).sum(dim=-1)
    if valid is None:
        return kl.mean(dim=1) * temperature**2
    kl = torch.where(valid, kl, 0.0).sum(dim=1) / valid.sum(dim=1).clamp_min(1).to(kl.dtype)
    return kl * temperature**2


def _pairwise(log_probs: Tensor, teaches: Tensor, weights: Tensor) -> Tensor:
    """``sum_j W_ij KL(p_j || p_i)`` per row ``[N, R]``, one pair at a time: for a few members and many
    rows this is a few elementwise passes, where the einsum is a batched matmul of tiny matrices."""
    n = log_probs.shape[0]
    target = log_probs.detach()
    p = [torch.where(teaches[j].unsqueeze(-1), target[j].exp(), 0.0) for j in range(n)]
    neg_entropy = [torch.where(teaches[j], (p[j] * target[j]).sum(dim=-1), 0.0) for j in range(n)]
    w = weights.to(log_probs.dtype)
    rows = []
    for i in range(n):
        pairs = [w[..., i, j] * (neg_entropy[j] - (p[j] * log_probs[i]).sum(dim=-1)) for j in range(n) if j != i]
        rows.append(torch.stack(pairs).sum(dim=0))
    return torch.stack(rows)


@register_term("kl")
class KL(Term):
    """Logit distillation, ``tau^2 * sum_j W_ij KL(softmax(z_j / tau) || softmax(z_i / tau))`` (Eq. 9).

    With predictions per position it is computed at every position, with that position's ``W``
    (``per_position``), and averaged over the student's valid positions (``[B, C]``: the batch mean).

    Args:
        weight (float): ``alpha``. Default: 1.
        temperature (float): ``tau``. Default: 1.

    Example:
        >>> from competitive.terms import StepOutputs
        >>> z = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]]).log_softmax(-1)  # [N=2, B=1, C=2]
        >>> out = StepOutputs([z[0], z[1]], z, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool))
        >>> KL()(out, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))  # member 0 teaches member 1
        tensor([0.0000, 1.5232])
    """

    per_position = True  # reads W per row of StepOutputs

    def __init__(self, weight: float = 1.0, *, temperature: float = 1.0):
        super().__init__(weight)
        self.temperature = check_real("temperature", temperature, positive=True)

    def forward(self, outputs: StepOutputs, weights: Tensor) -> Tensor:
        teaches = outputs.teaches if outputs.teaches_at is None else outputs.teaches_at
        return kl_term(
            outputs.log_probs,
            teaches,
            weights,
            temperature=self.temperature,
            logits=outputs.logits,
            valid=outputs.valid,
            pairwise=bool(outputs.positions) and outputs.valid is not None,  # a row per position: pair by pair
        )

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}"
