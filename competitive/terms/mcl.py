"""Mutual Contrastive Learning (Yang et al., TPAMI 2023, arXiv 2207.11518), with ``W`` deciding who
learns from whom. The equations follow the authors' public code (``winycg/MCL``,
``losses/cifar_sup_mcl_loss.py``); ``rule="mutual"`` with two members gives its loss exactly.

With ``z_i`` the normalized embeddings and ``S_ij = z_i z_j^T / tau``, member ``i``'s loss is
``vcl * VCL_i + sum_j W_ij (icl * ICL_ij + soft_vcl * SoftVCL_ij + soft_icl * SoftICL_ij)``:

- ``VCL_i = SupCon(S_ii)``, ``ICL_ij = SupCon(S_ij)`` (anchors from ``i``, positives: samples
  of the same class, the diagonal excluded); an anchor without a positive in the batch is left
  out of the average;
- ``SoftVCL_ij = T^2 KL(softmax(S_jj / T) || softmax(S_ii / T))`` and
  ``SoftICL_ij = T^2 KL(softmax(S_ji / T) || softmax(S_ij / T))``, row-wise, batch mean,
  targets detached.

VCL is the member's own term (every member has it, the teacher too). In ``ICL_ij`` and
``SoftICL_ij`` a gradient reaches peer ``j``'s embedding only where ``j`` also learns from
``i`` (``W[j, i] > 0``): under ``rule="best"`` the teacher learns nothing from its students,
under ``rule="mutual"`` the gradients are the reference code's.
"""

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_real
from .base import StepOutputs, Term, per_sample, register_term, upcast, weighted


class ProjectionHead(nn.Module):
    """``Linear(d, dim) -> ReLU -> Linear(dim, dim)``, then L2 normalization (MCL's ``Embed``)."""

    def __init__(self, in_features: int, dim: int = 128):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(in_features, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.proj(x), dim=-1)


def _supcon(logits: Tensor, positives: Tensor) -> tuple[Tensor, Tensor]:
    """Per-anchor supervised contrastive loss of ``logits`` ``[..., B, B]`` and whether it counts.

    ``-(1/|P(a)|) sum_{p in P(a)} (S[a, p] - log sum_{k != a} exp S[a, k])``; the diagonal is left
    out of the numerator (``positives`` excludes it) and the denominator, as in the reference code.
    """
    eye = torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    log_denominator = logits.masked_fill(eye, -torch.inf).logsumexp(dim=-1, keepdim=True)
    count = positives.sum(dim=-1)
    total = torch.where(positives, logits - log_denominator, 0.0).sum(dim=-1)
    return -total / count.clamp_min(1), count > 0


def _soft_kl(student: Tensor, target: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(target / T) || softmax(student / T))`` per row ``[..., B]``; target detached."""
    log_q = (student / temperature).log_softmax(dim=-1)
    log_p = (target.detach() / temperature).log_softmax(dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1) * temperature**2


def _similarities(z: Tensor, shown: Tensor, w: Tensor, eye: Tensor) -> Tensor:
    """``z_i z_j^T`` for every pair ``[i, j, B, B]``, a gradient reaching row ``b`` of ``z_j`` from
    member ``i``'s loss only where ``j`` learns from ``i`` (``S_ii`` is the member's own)."""
    n = z.shape[0]
    gate = ((w.permute(2, 1, 0) > 0) | eye.unsqueeze(-1)).to(z.dtype)  # [i, j, B] = W[b, j, i] > 0
    frozen = shown.detach()
    # the same values as z_j, with the gradient of row b scaled by gate[i, j, b]
    peers = frozen.unsqueeze(0) + (shown - frozen).unsqueeze(0) * gate.unsqueeze(-1)  # [i, j, B, D]
    peers = torch.where(eye.view(n, n, 1, 1), z.unsqueeze(0), peers)
    return torch.einsum("ibd,ijcd->ijbc", z, peers)


def _contrastive(s: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``VCL_i`` ``[N]`` and the per-anchor ``ICL_ij`` ``[N, N, B]`` (anchors without a positive left out)."""
    n, batch = labels.shape
    positives = labels.view(n, 1, batch, 1) == labels.view(1, n, 1, batch)
    positives = positives & ~torch.eye(batch, dtype=torch.bool, device=s.device)
    per_anchor, counts = _supcon(s, positives)  # [N, N, B]
    valid = counts.to(s.dtype)
    n_valid = valid.sum(dim=-1).clamp_min(1)  # [N, N]
    own = (per_anchor.diagonal().transpose(0, 1) * valid.diagonal().transpose(0, 1)).sum(dim=-1)
    # per-anchor averages, so that sum_b W[b, i, j] * x[i, j, b] / count matches W_ij * mean
    return own / n_valid.diagonal(), torch.where(valid > 0, per_anchor, 0.0) * batch / n_valid.unsqueeze(-1)


def _soft_pairs(s: Tensor, shown: Tensor, tau: float, temperature: float) -> tuple[Tensor, Tensor]:
    """``SoftVCL_ij`` and ``SoftICL_ij`` for every pair, targets from the finite rows, detached."""
    s_own = s.diagonal(dim1=0, dim2=1).permute(2, 0, 1)  # [N, B, B]: S_ii
    s_shown = torch.einsum("ibd,jcd->ijbc", shown, shown).detach() / tau
    own_targets = s_shown.diagonal(dim1=0, dim2=1).permute(2, 0, 1).unsqueeze(0)
    soft_vcl_pair = _soft_kl(s_own.unsqueeze(1), own_targets, temperature)
    return soft_vcl_pair, _soft_kl(s, s_shown.transpose(0, 1), temperature)  # target S_ji for student S_ij


def mcl_loss(
    embeddings: Sequence[Tensor],
    targets: Tensor,
    weights: Tensor,
    *,
    tau: float = 0.1,
    temperature: float = 3.0,
    vcl: float = 0.1,
    soft_vcl: float = 1.0,
    icl: float = 0.1,
    soft_icl: float = 1.0,
    teaches: Tensor | None = None,
) -> Tensor:
    """Each member's MCL loss under the distillation matrix ``W``: ``[N]`` (equations: module docstring).

    ``embeddings``: ``N`` normalized ``[B, D]``; ``targets``: ``[B]`` or ``[N, B]``; ``tau``: the
    contrastive temperature; ``temperature``: ``T``; ``vcl`` ... ``soft_icl``: the four weights;
    ``teaches``: ``[N, B]``, rows never a target or contrast where False (default: finite rows).

    Example:
        >>> z = [F.normalize(torch.randn(8, 4), dim=1) for _ in range(2)]
        >>> y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> w = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # mutual learning
        >>> mcl_loss(z, y, w).shape
        torch.Size([2])
    """
    z = torch.stack([upcast(e) for e in embeddings])  # [N, B, D]
    n, batch = z.shape[:2]
    labels = targets.expand(n, -1) if targets.dim() == 1 else targets
    w = per_sample(weights, batch).to(z.dtype)  # [B, N, N]
    if teaches is None:
        teaches = torch.isfinite(z).all(dim=-1)
    # what a peer shows as a target or a contrast: finite rows only
    shown = torch.where(teaches.unsqueeze(-1), z, 0.0)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    s = _similarities(z, shown, w, eye) / tau  # [i, j, B, B]: S_ij
    vcl_i, icl_pair = _contrastive(s, labels)
    soft_vcl_pair, soft_icl_pair = _soft_pairs(s, shown, tau, temperature)
    peer = weighted(weights, icl * icl_pair + soft_vcl * soft_vcl_pair + soft_icl * soft_icl_pair)
    return vcl * vcl_i + peer


@register_term("mcl")
class MCL(Term):
    """Mutual Contrastive Learning on per-member embeddings, see :func:`mcl_loss`.

    Each member gets a :class:`ProjectionHead` from its embedding size to ``dim``, trained by its
    own loss. The embeddings come from the group's ``embedding_hooks`` (the input of a named
    ``nn.Linear`` such as ``"fc"``, or the output of a pooling module).

    Args:
        weight (float): the term's weight. Default: 1.
        tau, temperature, vcl, soft_vcl, icl, soft_icl (float): as in :func:`mcl_loss`.
        dim (int): the heads' output size. Default: 128.
    """

    needs = ("embeddings",)
    # by class with "ce"; without classes every sample is its own class: the instance contrast
    tasks = ("ce", "bce", "mse", "l1", "callable", "member")

    def __init__(
        self,
        weight: float = 1.0,
        *,
        tau: float = 0.1,
        temperature: float = 3.0,
        vcl: float = 0.1,
        soft_vcl: float = 1.0,
        icl: float = 0.1,
        soft_icl: float = 1.0,
        dim: int = 128,
    ):
        super().__init__(weight)
        settings = dict(tau=tau, temperature=temperature, vcl=vcl, soft_vcl=soft_vcl, icl=icl, soft_icl=soft_icl)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"Invalid dim value {dim!r} provided. Please provide a positive int.")
        self.settings = {k: check_real(k, v, positive=k in ("tau", "temperature")) for k, v in settings.items()}
        self.dim = dim
        self.heads = nn.ModuleList()

    def build(self, shapes: dict[str, list[tuple[int, ...]]]) -> None:
        self.heads = nn.ModuleList(ProjectionHead(int(torch.Size(s).numel()), self.dim) for s in shapes["embeddings"])

    def member_parameters(self, member: int) -> Iterator[nn.Parameter]:
        return self.heads[member].parameters()

    def forward(self, outputs: StepOutputs, weights: Tensor) -> Tensor:
        if outputs.positions:
            raise ValueError(
                f"The 'mcl' term contrasts samples by their class, so it needs one label per sample (logits [B, C]); "
                f"these logits have positions {list(outputs.positions)}. Use 'kl', 'feature', 'adm' or 'cwd' instead."
            )
        z = [head(upcast(e).flatten(1)) for head, e in zip(self.heads, outputs.hooked("embeddings"))]
        labels = outputs.labels if outputs.task == "ce" else torch.arange(len(z[0]), device=z[0].device)
        return mcl_loss(z, labels, weights, teaches=outputs.teaches, **self.settings)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, " + ", ".join(f"{k}={v}" for k, v in self.settings.items())
