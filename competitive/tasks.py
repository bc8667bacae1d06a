"""Any task: what a member learns from its own targets and what the members compete on (the lowest loss
teaches). ``"ce"`` is the classification of :func:`~competitive.step_losses`; the others are here:
``"bce"`` (multi-label), ``"mse"`` and ``"l1"`` (regression), a callable ``(output, target) -> loss per
sample [B]`` (or per position ``[B, d1..dk]``), and members that compute their own loss
(:func:`member_losses`: a scalar per member, one teacher per batch).

A member's objective is the mean of its per-sample (or per-position) losses, so the built-in ones equal
``F.binary_cross_entropy_with_logits``, ``F.mse_loss`` and ``F.l1_loss`` with their default reduction; a
sample's score, what the competition compares, is its own loss (for ``"bce"``, ``"mse"``, ``"l1"``: the mean
over its classes or outputs).
"""

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .features import extract_logits
from .losses import KnowledgeTerm, StepLosses, StepOutputs, _batch_teacher, check_rule, contest, term_weights

TaskLoss = Callable[[Tensor, Tensor], Tensor]


def _per_sample(loss: Callable[..., Tensor]) -> TaskLoss:
    def per_sample(output: Tensor, target: Tensor) -> Tensor:  # the mean over everything but the batch dim
        return loss(output.float(), target.to(torch.float32), reduction="none").flatten(1).mean(dim=1)

    return per_sample


TASK_LOSSES: dict[str, TaskLoss] = {
    "bce": _per_sample(F.binary_cross_entropy_with_logits),
    "mse": _per_sample(F.mse_loss),
    "l1": _per_sample(F.l1_loss),
}
"""The built-in task losses besides ``"ce"``, by name: ``(output, target) -> [B]``."""


def check_task_loss(task_loss: Any) -> str | TaskLoss:
    """``"ce"``, a name of :data:`TASK_LOSSES`, or a callable; anything else names what is allowed."""
    if callable(task_loss) or task_loss == "ce" or task_loss in TASK_LOSSES:
        return task_loss  # type: ignore[no-any-return]  # checked above
    raise ValueError(
        f"Invalid task_loss {task_loss!r}. Please provide 'ce', one of {sorted(TASK_LOSSES)}, or a callable "
        "(output, target) -> loss per sample [B] (or per position [B, d1, ..., dk])."
    )


def task_rows(task: str | TaskLoss, outputs: Sequence[Tensor], targets: Tensor) -> Tensor:
    """Each member's loss per sample (or position), ``[N, B, d1..dk]``; checked where a callable's may be off."""
    fn = TASK_LOSSES[task] if isinstance(task, str) else task
    return torch.stack([fn(z, targets) for z in outputs])


def check_rows(task: Any, rows: Sequence[Tensor], outputs: Sequence[Tensor], targets: Tensor, batch: int) -> None:
    """What a task loss returned, per member, before anything moves: a float tensor ``[B]`` or ``[B, d..]``
    that depends on the member's output, finite where the output and the targets are (read on the host:
    the group checks the first step only)."""
    name = task if isinstance(task, str) else getattr(task, "__name__", type(task).__name__)
    errors = []
    for i, (loss, z) in enumerate(zip(rows, outputs)):
        if not isinstance(loss, Tensor) or loss.dim() == 0 or loss.shape[0] != batch:
            shape = list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            errors.append(f"for models[{i}] it returned {shape}, not a loss per sample [{batch}] (or [{batch}, ...])")
        elif z.requires_grad and not loss.requires_grad:
            errors.append(f"for models[{i}] it returned a loss that does not depend on the member's output")
        elif bool(torch.isfinite(z).all()) and _finite(targets) and not bool(torch.isfinite(loss).all()):
            errors.append(f"for models[{i}] it returned NaN or inf for finite outputs and targets")
    if errors:
        raise ValueError(f"Invalid task_loss {name!r}: " + "; ".join(errors) + ".")


def _finite(targets: Any) -> bool:
    return not isinstance(targets, Tensor) or not targets.is_floating_point() or bool(torch.isfinite(targets).all())


def task_losses(
    outputs: Sequence[Tensor], targets: Tensor, *, task: str | TaskLoss, terms: Sequence[KnowledgeTerm] = (),
    features: Sequence[Tensor] | None = None, embeddings: Sequence[Tensor] | None = None, rule: str = "best",
    granularity: str = "batch", reduce_score: Callable[[Tensor], Tensor] | None = None,
    fixed_teacher: int | None = None,
) -> StepLosses:
    """:func:`~competitive.step_losses` for a task loss other than ``"ce"``: each member's loss per sample (or
    position) is its score there; its objective, ``ce`` in the result, is their mean. Every rule and
    granularity; the terms read the outputs (``StepOutputs.logits``, ``[R, ...]`` per member) and ``task``."""
    check_rule(rule, granularity)
    n, batch = len(outputs), outputs[0].shape[0]
    loss = task_rows(task, outputs, targets)  # [N, B, d1..dk]
    positions = tuple(loss.shape[2:])
    rows = loss.reshape(n, -1)
    valid = torch.ones_like(rows, dtype=torch.bool)
    dummy = torch.zeros(rows.shape[1], dtype=torch.long, device=rows.device)  # no class indices: no labels
    how = (rule, granularity, reduce_score, fixed_teacher, -100)
    teaches_at, teacher, weights, has, ok, labels = contest(rows, dummy, valid, features, embeddings, batch, *how)
    empty = rows.new_zeros(n, rows.shape[1], 0)
    name = task if isinstance(task, str) else "callable"
    out = StepOutputs(list(outputs), empty, labels, ok, features, embeddings, None, teaches_at, positions, name)
    per_row, per_sample = term_weights(weights, out)
    values = {t.name: t(out, per_row if getattr(t, "per_position", False) else per_sample) for t in terms}
    if granularity == "position" and positions:
        shape = (batch, *positions)
        teacher, weights, has = teacher.view(shape), weights.view(*shape, n, n), has.view(shape)
    return StepLosses(rows.mean(dim=1), values, teacher, weights, has)


def member_losses(
    losses: Sequence[Tensor], *, terms: Sequence[KnowledgeTerm] = (), features: Sequence[Tensor] | None = None,
    embeddings: Sequence[Tensor] | None = None, rule: str = "best",
    reduce_score: Callable[[Tensor], Tensor] | None = None, fixed_teacher: int | None = None,
) -> StepLosses:
    """The step math of members that compute their own loss (``loss_from``): one scalar per member, the
    lowest finite teaches the batch; the terms read hooked outputs only."""
    check_rule(rule, "batch")
    ce = torch.stack([torch.as_tensor(v).reshape(()) for v in losses]).float()
    score = ce.detach()
    for hooked in (features, embeddings):
        if hooked is not None:  # a member whose hooked outputs are not finite does not teach
            finite = torch.stack([torch.isfinite(v.detach()).all() for v in hooked])
            score = score.masked_fill(~finite.to(score.device), torch.nan)
    score = score if reduce_score is None else reduce_score(score)
    teacher, weights = _batch_teacher(score, torch.ones_like(score, dtype=torch.bool), rule, fixed_teacher)
    n = len(losses)
    batch = (features or embeddings or [score.new_zeros(1, 1)])[0].shape[0]
    teaches = torch.isfinite(score).unsqueeze(1).expand(n, batch)
    empty = score.new_zeros(n, batch, 0)
    labels = torch.zeros(n, batch, dtype=torch.long, device=score.device)
    out = StepOutputs(list(empty.unbind(0)), empty, labels, teaches, features, embeddings, None, None, (), "member")
    values = {t.name: t(out, weights) for t in terms}
    return StepLosses(ce, values, teacher, weights, None)


class Task:
    """How a group steps with a task loss other than ``"ce"`` (or members that give their own loss), checked
    when the group is built; the arguments are :class:`~competitive.CompetitiveGroup`'s of the same names."""

    def __init__(self, task_loss: Any, loss_from: Any, terms: Sequence[Any], step: dict[str, Any], *,
                 compile: Any, perturbation: Any, chunk_rows: Any):
        task, granularity, shift_targets = check_task_loss(task_loss), step["granularity"], step["shift_targets"]
        if loss_from is not None and task != "ce":
            raise ValueError(f"Invalid task_loss {task_loss!r} with loss_from={loss_from!r}: the members give their "
                             "own loss (loss_from), so there is no task loss to compute. Pass one of the two.")
        if loss_from is not None and not (callable(loss_from) or isinstance(loss_from, str)):
            raise TypeError(f"Invalid loss_from {loss_from!r}: please provide a key or attribute name, or a callable.")
        self.name = "member" if loss_from is not None else (task if isinstance(task, str) else "callable")
        self.task, self.loss_from, self.checked = task, loss_from, False
        unsupported = {"perturbation": perturbation is not None, "shift_targets": shift_targets,
                       "chunk_rows": chunk_rows not in (None, 0), "granularity": self.name == "member" and
                       granularity != "batch"}  # fmt: skip
        if any(unsupported.values()):
            names = [k for k, v in unsupported.items() if v]
            raise ValueError(f"{names} with task_loss={task_loss!r}, loss_from={loss_from!r}: not supported (members "
                             "that give their own loss compete per batch; perturbation, shift_targets and chunks are "
                             "for class indices with 'ce'). Leave them at their defaults.")
        wrong = [t.name for t in terms if not t.serves(self.name)]
        if wrong:
            hint = " For regression use OutputL2." if "kl" in wrong and self.name in ("mse", "l1") else ""
            raise ValueError(f"The terms {wrong} have no form for task_loss={self.name!r} (a term on hooked features "
                             f"serves every task; 'kl' serves 'ce' and 'bce').{hint}")
        fn = member_losses if self.name == "member" else partial(task_losses, task=task, granularity=granularity)
        step = {k: step[k] for k in ("rule", "reduce_score", "fixed_teacher")}
        self.fn = partial(fn if compile is None else torch.compile(fn, fullgraph=True, **compile), **step)

    def check_batch(self, batch: Any, devices: Sequence[torch.device]) -> tuple[Any, Any]:
        """``(inputs, targets)``: any pair for members that give their own loss; else tensors of one batch."""
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"Invalid batch ({type(batch).__name__}): please provide a pair (inputs, targets).")
        x, y = batch
        if self.name == "member":  # passed to the members as it is: what they take, they check
            return x, y
        if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() == 0 or y.dim() == 0:
            raise TypeError(f"Invalid batch: task_loss={self.name!r} needs two tensors [B, ...] (inputs, targets).")
        if y.shape[0] != x.shape[0] or x.shape[0] == 0:
            raise ValueError(f"Invalid batch: inputs {list(x.shape)} and targets {list(y.shape)}: the same B >= 1.")
        if x.device not in devices:
            raise RuntimeError(f"Invalid batch: inputs are on {x.device} but the members are on "
                               f"{sorted(map(str, set(devices)))}. Move the batch to the members' device first.")
        return x, y

    def forward(self, members: Any, x: Any, y: Any, cut: Any) -> Any:
        """The members' outputs (or their own losses) as :class:`~competitive.members.StepInputs`."""
        n, devices = len(members), members.devices
        raw = [members.output(i, x, devices[i], y) for i in range(n)]
        if self.name == "member":
            values = [self._own_loss(out, i) for i, out in enumerate(raw)]
        else:
            values = [extract_logits(out, members.logits_from[i], member=i) for i, out in enumerate(raw)]
            self._check_outputs(values, y)
            y = y.to(devices[0])
        return members.inputs(values, y, devices[0], cut)

    def _own_loss(self, output: Any, member: int) -> Tensor:
        spec = self.loss_from
        found = spec(output) if callable(spec) else output.get(spec) if isinstance(output, dict) else getattr(
            output, spec, None)  # fmt: skip
        if not isinstance(found, Tensor) or found.numel() != 1 or not found.is_floating_point():
            raise ValueError(f"models[{member}] returned a {type(output).__name__}, and loss_from={spec!r} finds "
                             f"{type(found).__name__ if not isinstance(found, Tensor) else list(found.shape)} in it, "
                             "not a scalar loss. Pass a key, an attribute or a callable output -> loss (a scalar).")
        return found.reshape(())

    def _check_outputs(self, outputs: Sequence[Tensor], y: Tensor) -> None:
        """Shapes each step (no host read): a built-in loss needs outputs of the targets' shape."""
        bad = [f"models[{i}] returned {list(z.shape) if isinstance(z, Tensor) else type(z).__name__}"
               for i, z in enumerate(outputs) if not isinstance(z, Tensor) or z.shape[0] != y.shape[0]
               or (self.name in TASK_LOSSES and z.shape != y.shape)]  # fmt: skip
        if bad:
            raise ValueError(f"Invalid model outputs for task_loss={self.name!r} and targets {list(y.shape)}: "
                             + "; ".join(bad) + " (the built-in task losses need outputs of the targets' shape).")

    def __call__(self, outputs: Sequence[Tensor], targets: Any, **kwargs: Any) -> StepLosses:
        """The step math on the members' outputs (or own losses) and the targets; ``kwargs``: the terms and the
        hooked outputs. The first step checks what the task loss returns, on the host."""
        if self.name == "member":
            return self.fn(outputs, **kwargs)
        if not self.checked:
            rows = [task_rows(self.task, [z], targets)[0] for z in outputs]
            check_rows(self.task, rows, outputs, targets, outputs[0].shape[0])
            self.checked = torch.is_grad_enabled()  # the first training step also checks the gradient's path
        return self.fn(outputs, targets, **kwargs)
