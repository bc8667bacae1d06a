"""The group's statistics and its non-finite bookkeeping, kept on the device.

Counters are registered buffers (as in ``torch.optim.swa_utils``), so ``state_dict``, ``.to()`` and
DDP handle them; updating them reads nothing back to the host.
"""

import warnings
from typing import Any

import torch
from torch import Tensor, nn


class GroupStats(nn.Module):
    """Per-member counters since construction.

    ``teacher_count`` (steps as teacher, fractional per sample), ``switches`` (steps at which the
    batch's teacher changed), ``nonfinite_count``, ``perturbed_count`` and ``perturbed_wins``
    (steps at which the perturbed member won), and ``steps`` (a Python int, no device read).
    """

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

    def record(self, teacher: Tensor, nonfinite: Tensor, perturbed: int | None) -> None:
        share = (teacher.unsqueeze(-1) == self.members).float()
        share = share.mean(0) if share.dim() == 2 else share  # per sample: share of the batch taught
        self.teacher_count += share
        # the batch's teacher (the largest share per sample); -1 when no member could teach
        batch_teacher = torch.where(share.sum() > 0, share.argmax(), -1)
        last = self.last_teacher
        self.switches += ((batch_teacher != last) & (batch_teacher >= 0) & (last >= 0)).float()
        self.last_teacher.copy_(batch_teacher)
        self.nonfinite_count += nonfinite.long()
        if perturbed is not None:
            self.perturbed_count[perturbed] += 1
            self.perturbed_wins += share[perturbed]
        self.steps += 1

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


class NonfiniteWatch:
    """Reports members whose loss is NaN or inf without a host sync in the step.

    On the CPU the flags are read at once. On a GPU they are copied to pinned memory
    asynchronously, behind an event: :meth:`wait` (called by ``step()`` after the first member's
    backward pass, before any optimizer runs) blocks until that copy has landed, which the GPU
    reaches as soon as the forward pass is done, while the backward kernels already queued keep it
    busy; warnings for single members are raised when their copy is seen.
    """

    def __init__(self, skip_nonfinite: bool):
        self.skip_nonfinite = skip_nonfinite
        self.pending: list[tuple[int, Tensor, Any]] = []

    def watch(self, nonfinite: Tensor, step: int) -> None:
        if nonfinite.device.type == "cpu":
            self.pending.append((step, nonfinite.clone(), None))
        else:
            host = torch.empty(nonfinite.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(nonfinite, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((step, host, event))

    def wait(self) -> None:
        """Block until every pending flag is on the host, then report (raises if none was finite)."""
        for _, _, event in self.pending:
            if event is not None:
                event.synchronize()
        self.poll()

    def poll(self) -> None:
        """Report every flag copy that has landed; raise if a step had no finite member."""
        while self.pending and (self.pending[0][2] is None or self.pending[0][2].query()):
            step, flags, _ = self.pending.pop(0)
            if flags.all():
                self.pending.clear()
                raise RuntimeError(
                    f"Step {step}: the losses of all {flags.numel()} members are NaN or inf, so no member can "
                    "teach and no member was updated. Check the inputs for NaN/inf, lower the learning rate, "
                    "or use a GradScaler with fp16."
                )
            if flags.any():
                members = flags.nonzero().flatten().tolist()
                warnings.warn(
                    f"Step {step}: the loss of members {members} is NaN or inf; they do not teach this step"
                    + (" and skip their update." if self.skip_nonfinite else "."),
                    RuntimeWarning,
                    stacklevel=5,
                )
