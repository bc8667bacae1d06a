"""The group's counters, kept on the device (the group updates them at each step).

Counters are registered buffers (as in ``torch.optim.swa_utils``), so ``state_dict``, ``.to()`` and
DDP handle them; updating them reads nothing back to the host.
"""

from typing import Any

import torch
from torch import Tensor, nn


class GroupStats(nn.Module):
    """Per-member counters since construction.

    ``teacher_count`` (steps as teacher, fractional per sample), ``switches`` (steps at which the
    batch's teacher changed), ``nonfinite_count``, ``perturbed_count`` and ``perturbed_wins``
    (steps at which the perturbed member won), and ``steps`` (a Python int, no device read).
    """

    teacher_count: Tensor
    switches: Tensor
    nonfinite_count: Tensor
    perturbed_count: Tensor
    perturbed_wins: Tensor
    last_teacher: Tensor
    members: Tensor
    switch_table: Tensor

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.steps = 0
        self.register_buffer("teacher_count", torch.zeros(n))
        self.register_buffer("switches", torch.zeros(()))
        self.register_buffer("nonfinite_count", torch.zeros(n, dtype=torch.long))
        self.register_buffer("perturbed_count", torch.zeros(n, dtype=torch.long))
        self.register_buffer("perturbed_wins", torch.zeros(()))
        self.register_buffer("last_teacher", torch.full((), -1, dtype=torch.long))
        self.register_buffer("members", torch.arange(n), persistent=False)
        # whether the batch's teacher switched from ``last`` to ``t`` (both -1..n-1), at ``t * (n + 1) + last``
        # (negative entries count from the end, as torch.take does: every pair has its own entry)
        teacher, last = torch.arange(-1, n).view(-1, 1), torch.arange(-1, n)
        switched = ((teacher != last) & (teacher >= 0) & (last >= 0)).float().flatten()
        table = torch.zeros((n + 1) ** 2).index_put_(((teacher * (n + 1) + last).flatten(),), switched)
        self.register_buffer("switch_table", table, persistent=False)

    def count_perturbed(self, perturbed: int | Tensor, share: Tensor) -> None:
        """The perturbed member (an index, or a one-element device tensor in a CUDA graph) and whether it
        won: its share of the batch's teaching (``share``, per member)."""
        if isinstance(perturbed, Tensor):
            index = perturbed.view(1)
            self.perturbed_count.index_add_(0, index, torch.ones_like(index))
            self.perturbed_wins += share.gather(0, index).squeeze(0)
        else:
            self.perturbed_count[perturbed] += 1
            self.perturbed_wins += share[perturbed]

    def get_extra_state(self) -> dict[str, int]:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.steps = int(state["steps"])

    def summary(self) -> dict[str, Any]:
        """The counters as Python numbers (reading them syncs with the device)."""
        return {
            "steps": self.steps,
            "teacher_count": self.teacher_count.tolist(),
            "switches": self.switches.item(),
            "nonfinite_count": self.nonfinite_count.tolist(),
            "perturbed_count": self.perturbed_count.tolist(),
            "perturbed_wins": self.perturbed_wins.item(),
        }
