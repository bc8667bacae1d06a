"""What one step of a group computed: ``StepResult``, with a flat view for loggers."""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class StepResult:
    """What one step computed. Tensors stay on the device: building this reads nothing back.

    Attributes:
        teacher (LongTensor): the member that taught (the lowest finite competition score); a
            scalar, ``[B]`` with ``granularity="sample"``, ``[B, d1..dk]`` with ``"position"``; ``-1``
            where no member could teach (or the position is ignored). Reported for every rule.
        ce (Tensor): ``[N]`` each member's cross-entropy.
        terms (dict of str to Tensor): each knowledge term's unweighted ``[N]`` value, by name.
        loss (Tensor): ``[N]``, ``ce + ramp * sum_t weight_t * terms[t]``.
        weights (Tensor): the distillation matrix ``W``, ``teacher.shape + [N, N]``.
        nonfinite (BoolTensor): ``[N]``, members whose loss is NaN or inf this step.
        perturbed (int or None): the member that saw the perturbed batch.
        perturbation (str or None): the name of the operation it saw.
        skipped (str or None): why a drawn perturbation was not applied this step.
        valid (BoolTensor or None): where ``teacher`` counts (not ignored), its shape; None: everywhere.

    Example:
        >>> from torch import nn
        >>> from competitive import CompetitiveGroup
        >>> nets = [nn.Linear(4, 3), nn.Linear(4, 3)]
        >>> group = CompetitiveGroup(nets, [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets])
        >>> result = group.step((torch.randn(8, 4), torch.randint(0, 3, (8,))))
        >>> bool(result.kl[result.teacher] == 0)  # the teacher learns from labels only
        True
        >>> sorted(result.scalars())
        ['ce/0', 'ce/1', 'kl/0', 'kl/1', 'loss/0', 'loss/1', 'teacher', 'teacher_share/0', 'teacher_share/1']
    """

    teacher: Tensor
    ce: Tensor
    terms: dict[str, Tensor]
    loss: Tensor
    weights: Tensor
    nonfinite: Tensor
    perturbed: int | None = None
    perturbation: str | None = None
    skipped: str | None = None
    valid: Tensor | None = None

    @property
    def kl(self) -> Tensor:
        """The ``"kl"`` term ``[N]`` (zeros when the group has none)."""
        return self.terms.get("kl", torch.zeros_like(self.ce))

    @property
    def feature(self) -> Tensor:
        """The ``"feature"`` term ``[N]`` (zeros when the group has none)."""
        return self.terms.get("feature", torch.zeros_like(self.ce))

    def scalars(self) -> dict[str, float]:
        """A flat mapping of Python floats for loggers (``log_dict``, ``add_scalars``, CSV).

        Keys: ``ce/i``, ``loss/i``, ``<term>/i`` for each term, ``teacher_share/i`` (the share of
        the batch's valid samples or positions member ``i`` taught), ``teacher`` (the batch's teacher,
        ``-1`` if none) and
        ``perturbed`` (when a member was perturbed). Building it reads the values back to the host
        (one copy); the step itself does not.
        """
        n = self.ce.numel()
        teacher = self.teacher.reshape(-1)
        valid = torch.ones_like(teacher, dtype=torch.bool) if self.valid is None else self.valid.reshape(-1)
        taught = (teacher.unsqueeze(-1) == torch.arange(n, device=teacher.device)) & valid.unsqueeze(-1)
        share = taught.float().sum(0) / valid.sum().clamp_min(1)
        rows = {"ce": self.ce, "loss": self.loss, **self.terms, "teacher_share": share}
        names = list(rows)
        values = torch.stack([rows[k].detach().float().to(self.ce.device) for k in names]).cpu()
        out = {f"{k}/{i}": float(values[r, i]) for r, k in enumerate(names) for i in range(n)}
        out["teacher"] = float(torch.where(share.sum() > 0, share.argmax(), -1).item())
        if self.perturbed is not None:
            out["perturbed"] = float(self.perturbed)
        return out
