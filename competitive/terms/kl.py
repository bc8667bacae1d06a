"""``L_D``: the student imitates its teachers' class distributions (paper Eq. 9), by the forward KL
(the paper's), the reverse KL or the generalized Jensen-Shannon divergence (as TRL's ``GKDTrainer``)."""

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validation import check_real
from .base import StepOutputs, Term, per_sample, register_term, upcast, weighted


def kl_term(
    log_probs: Tensor,
    teaches: Tensor,
    weights: Tensor,
    *,
    temperature: float = 1.0,
    logits: Sequence[Tensor] | None = None,
    valid: Tensor | None = None,
    pairwise: bool = False,
    divergence: str = "forward",
    beta: float = 0.5,
) -> Tensor:
    """``tau^2 * sum_j W_ij KL(p_j || p_i)`` per member and row, averaged over the rows: ``[N]``.

    Rows are samples or positions: ``log_probs`` ``[N, R, C]``, ``teaches`` ``[N, R]`` (where ``p_j``, a
    target without gradient, may teach), ``W`` ``[N, N]`` or ``[R, N, N]``, ``p = softmax(z / tau)``; the
    mean is over each student's ``valid`` rows. ``pairwise``: the same sum pair by pair (faster at a row
    per position). ``divergence`` ``"reverse"`` / ``"jsd"`` (:class:`KL`) replace the KL, without ``tau^2``.
    """
    if temperature != 1.0:
        if logits is None:
            raise ValueError(f"kl_term: temperature={temperature} needs the logits (logits=...) to rescale them.")
        log_probs = (torch.stack([upcast(z) for z in logits]) / temperature).log_softmax(dim=-1)
    if pairwise or divergence != "forward":
        if divergence == "forward":
            kl, scale = _pairwise(log_probs, teaches, weights), temperature**2
        else:
            kl, scale = _pairwise_divergence(log_probs, teaches, weights, divergence, beta), 1.0
        return _mean(kl, torch.ones_like(teaches) if valid is None else valid) * scale
    p = torch.where(teaches.unsqueeze(-1), log_probs.detach().exp(), 0.0)
    # sum_j W_ij KL(p_j || p_i) = sum_j W_ij sum_c p_j log p_j - sum_c q_i log p_i,
    # with q_i = sum_j W_ij p_j the (averaged) teacher distribution
    neg_entropy = torch.xlogy(p, p).sum(dim=-1)  # [N, B]
    w = weights.to(p.dtype) if weights.dim() == 2 else per_sample(weights, log_probs.shape[1]).to(p.dtype)
    if w.dim() == 2:  # one W for the batch: two matrix products
        q, teachers = (w @ p.view(len(p), -1)).view(p.shape), w @ neg_entropy
    else:
        q, teachers = torch.einsum("bij,jbc->ibc", w, p), torch.einsum("bij,jb->ib", w, neg_entropy)
    kl = _mean(teachers - (q * log_probs).sum(dim=-1), valid)
    return kl if temperature == 1 else kl * temperature**2


def bernoulli_kl_term(
    logits: Sequence[Tensor], teaches: Tensor, weights: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """``kl`` for multi-label members (``task_loss="bce"``): per class the KL between Bernoullis,
    ``tau^2 * sum_j W_ij mean_c KL(s(z_jc / tau) || s(z_ic / tau))`` with ``s`` the sigmoid, averaged over the
    samples: ``[N]``. Each class is Hinton et al.'s distillation over the two-way softmax of ``(z / tau, 0)``,
    whose first probability is ``s(z / tau)``; the mean over classes matches ``"bce"``'s reduction. The teacher
    (``j``) is a target without gradient, and 0 where it may not teach (``teaches`` ``[N, B]``)."""
    z = torch.stack([upcast(v).flatten(1) for v in logits]) / temperature  # [N, B, C]
    log_p, log_q = -F.softplus(-z), -F.softplus(z)  # log s(z), log(1 - s(z))
    mask = teaches.unsqueeze(-1)
    t_log_p, t_log_q = log_p.detach().where(mask, 0.0), log_q.detach().where(mask, 0.0)
    t_p = t_log_p.exp().where(mask, 0.0)
    # pair[i, j, b]: student i towards teacher j on sample b
    pair = t_p * (t_log_p - log_p.unsqueeze(1)) + (1 - t_p) * (t_log_q - log_q.unsqueeze(1))
    return weighted(weights, pair.mean(dim=-1)) * temperature**2


def _mean(values: Tensor, valid: Tensor | None) -> Tensor:
    """``[N, R] -> [N]``: each member's mean over its valid rows (0 with none; None: every row)."""
    if valid is None:
        return values.mean(dim=1)
    return torch.where(valid, values, 0.0).sum(dim=1) / valid.sum(dim=1, dtype=values.dtype).clamp_min(1)


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


def _divergence(log_p: Tensor, log_t: Tensor, t: Tensor, divergence: str, beta: float) -> Tensor:
    """``D`` between student ``log p`` and teacher ``log t`` (``t = exp(log t)``), summed over classes."""
    if divergence == "forward" or (divergence == "jsd" and beta == 0):  # KL(t || p)
        return (t * (log_t - log_p)).sum(dim=-1)
    p = log_p.exp()
    if divergence == "reverse" or beta == 1:  # KL(p || t)
        return (p * (log_p - log_t)).sum(dim=-1)
    # M = (1 - beta) p + beta t;  beta KL(t || M) + (1 - beta) KL(p || M)
    log_m = torch.logaddexp(log_p + math.log(1 - beta), log_t + math.log(beta))
    return beta * (t * (log_t - log_m)).sum(dim=-1) + (1 - beta) * (p * (log_p - log_m)).sum(dim=-1)


def _pairwise_divergence(log_probs: Tensor, teaches: Tensor, weights: Tensor, divergence: str, beta: float) -> Tensor:
    """``sum_j W_ij D(p_i, p_j)`` per row ``[N, R]``; the teacher ``p_j`` detached, and 0 (with a finite
    stand-in) wherever member ``j`` may not teach, so no NaN reaches a gradient."""
    n, w = log_probs.shape[0], weights.to(log_probs.dtype)
    target = [torch.where(teaches[j].unsqueeze(-1), log_probs[j].detach(), 0.0) for j in range(n)]
    probs = [torch.where(teaches[j].unsqueeze(-1), target[j].exp(), 0.0) for j in range(n)]
    rows = []
    for i in range(n):
        pairs = [
            w[..., i, j]
            * torch.where(teaches[j], _divergence(log_probs[i], target[j], probs[j], divergence, beta), 0.0)
            for j in range(n)
            if j != i
        ]
        rows.append(torch.stack(pairs).sum(dim=0))
    return torch.stack(rows)


# -- the same, row by row, for competitive.chunked: values from rows of statistics, gradients in place --


def pair_divergences(u: list[Tensor], lse: list[Tensor], p: list[Tensor], kind: tuple[float, str, float]) -> Tensor:
    """``D(p_i, p_j)`` for every student ``i`` and teacher ``j``: ``[N, N, r]`` (0 on the diagonal), and
    for the JSD also ``KL(p_i || M)``, stacked as ``[2, N, N, r]``."""
    divergence, beta = resolved(kind[1], kind[2]), kind[2]
    n, zero = len(u), torch.zeros_like(lse[0])
    values = [[zero] * n for _ in range(n)]
    extra = [[zero] * n for _ in range(n)]
    own = [torch.linalg.vecdot(p[j], u[j]) - lse[j] for j in range(n)]  # sum p log p
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if divergence == "forward":  # sum t_j (log t_j - log p_i)
                values[i][j] = own[j] - torch.linalg.vecdot(p[j], u[i]) + lse[i]
            elif divergence == "reverse":  # sum p_i (log p_i - log t_j)
                values[i][j] = own[i] - torch.linalg.vecdot(p[i], u[j]) + lse[j]
            else:
                log_m = log_mixture(u[i] - lse[i].unsqueeze(-1), u[j] - lse[j].unsqueeze(-1), beta)
                student = own[i] - torch.linalg.vecdot(p[i], log_m)
                values[i][j] = beta * (own[j] - torch.linalg.vecdot(p[j], log_m)) + (1 - beta) * student
                extra[i][j] = student
    return torch.stack([torch.stack([torch.stack(row) for row in m]) for m in (values, extra)])


def resolved(divergence: str, beta: float) -> str:
    """What a ``kl`` term computes: TRL's JSD at ``beta`` 0 is the forward KL, at 1 the reverse KL."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        return "forward" if beta == 0 else "reverse"
    return divergence


def log_mixture(log_p: Tensor, log_t: Tensor, beta: float) -> Tensor:
    """``log((1 - beta) p + beta t)`` (TRL's mixture), without leaving log space."""
    return torch.logaddexp(log_p + math.log(1 - beta), log_t + math.log(beta))


Softmax = Callable[[int, int, float], tuple[Tensor, Tensor]]


def divergence_gradient(
    g: Tensor, i: int, k: int, kind: tuple[float, str, float], c: Tensor, softmax: Softmax, pairs: Tensor,
    finite: Tensor,
) -> None:
    """``g += sum_j c_j dD(p_i, p_j)/dz_i`` for the ``kl`` term ``k`` of ``kind`` (temperature, divergence, beta)."""
    tau, name, beta = kind
    divergence = resolved(name, beta)
    log_p, p = softmax(i, 1 + k, tau)
    others = [j for j in range(len(c)) if j != i]
    if divergence == "forward":  # d/dz KL(t || p) = (p - t) / tau, times tau^2 for "forward" only (not the JSD's)
        scale = tau if name == "forward" else 1 / tau
        g.addcmul_(p, (scale * c.sum(0)).unsqueeze(-1))
        for j in others:
            g.addcmul_(softmax(j, 1 + k, tau)[1], (scale * c[j]).unsqueeze(-1), value=-1)
        return
    d = pairs[0 if divergence == "reverse" else 1]  # [N, r]: D(p_i, p_j), or KL(p_i || M) for the JSD
    for j in others:
        log_t = softmax(j, 1 + k, tau)[0]
        # d/du KL(p || t) = p (log p - log t - KL);  d/du JSD = (1 - beta) p (log p - log M - KL(p || M))
        inner = log_p - log_t if divergence == "reverse" else log_p - log_mixture(log_p, log_t, beta)
        factor = c[j] / tau * (1.0 if divergence == "reverse" else 1 - beta)
        term = (p * (inner - d[j].unsqueeze(-1))).masked_fill_(~finite[j].unsqueeze(-1), 0.0)
        g.addcmul_(term, factor.unsqueeze(-1))


DIVERGENCES = ("forward", "reverse", "jsd")


@register_term("kl")
class KL(Term):
    """Logit distillation, ``tau^2 * sum_j W_ij KL(softmax(z_j / tau) || softmax(z_i / tau))`` (Eq. 9).

    With predictions per position it is computed at every position, with that position's ``W``
    (``per_position``), and averaged over the student's valid positions (``[B, C]``: the batch mean).

    Args:
        weight (float): ``alpha``. Default: 1.
        temperature (float): ``tau``. Default: 1.
        divergence (str): ``"forward"`` ``KL(p_T || p_S)`` (the paper's, default), ``"reverse"``
            ``KL(p_S || p_T)``, or ``"jsd"``, the generalized Jensen-Shannon divergence of TRL's
            ``GKDTrainer.generalized_jsd_loss`` (Agarwal et al., 2024): ``M = (1 - beta) p_S + beta p_T``,
            ``beta KL(p_T || M) + (1 - beta) KL(p_S || M)``; ``beta`` 0 is the forward KL, 1 the reverse.
            Only ``"forward"`` carries the ``tau^2`` factor (TRL's divergences have none).
        beta (float): the ``"jsd"`` interpolation, in ``[0, 1]``. Default: 0.5.

    Example:
        >>> from competitive.terms import StepOutputs
        >>> z = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]]).log_softmax(-1)  # [N=2, B=1, C=2]
        >>> out = StepOutputs([z[0], z[1]], z, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool))
        >>> KL()(out, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))  # member 0 teaches member 1
        tensor([0.0000, 1.5232])
    """

    per_position = True  # reads W per row of StepOutputs
    tasks = ("ce", "bce")  # the softmax over classes, or per class its Bernoulli (multi-label)

    def __init__(
        self, weight: float = 1.0, *, temperature: float = 1.0, divergence: str = "forward", beta: float = 0.5
    ):
        super().__init__(weight)
        self.temperature = check_real("temperature", temperature, positive=True)
        if divergence not in DIVERGENCES:
            raise ValueError(
                f"Invalid divergence {divergence!r} for the 'kl' term. Please provide one of {DIVERGENCES}."
            )
        self.divergence, self.beta = divergence, check_real("beta", beta, owner="kl")
        if self.beta > 1:
            raise ValueError(
                f"Invalid beta value {beta!r} provided for the 'kl' term. Please provide a value in [0, 1]."
            )

    def forward(self, outputs: StepOutputs, weights: Tensor) -> Tensor:
        teaches = outputs.teaches if outputs.teaches_at is None else outputs.teaches_at
        if outputs.task == "bce":
            return bernoulli_kl_term(outputs.logits, teaches, weights, temperature=self.temperature)
        if outputs.task != "ce":
            raise ValueError(
                f"The 'kl' term compares class distributions; task_loss={outputs.task!r} has none. For regression "
                "use OutputL2 (the mean squared difference to the teacher's output), or terms on hooked features."
            )
        return kl_term(
            outputs.log_probs,
            teaches,
            weights,
            temperature=self.temperature,
            logits=outputs.logits,
            valid=outputs.valid,
            pairwise=len(outputs.positions) > 0 and outputs.valid is not None,  # a row per position: pair by pair
            divergence=self.divergence,
            beta=self.beta,
        )

    def extra_repr(self) -> str:
        extra = "" if self.divergence == "forward" else f", divergence={self.divergence!r}, beta={self.beta}"
        return f"weight={self.weight}, temperature={self.temperature}{extra}"
