"""``CompetitiveGroup``: N networks trained together by competitive distillation (paper §3)."""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import _validation as check
from .distributed import global_mean
from .features import FeatureCapture, HookSpec, build_adapters, resolve_hooks
from .losses import group_loss
from .perturbation import PerturbationPool


@dataclass
class StepResult:
    """What one step computed. Tensors stay on the device: building this reads nothing back.

    Attributes:
        teacher (LongTensor): the member with the lowest finite CE; a scalar, or ``[B]`` with
            ``granularity="sample"``; ``-1`` where no CE is finite. Reported for every rule.
        ce, kl, feature, loss (Tensor): per-member terms ``[N]``, ``loss = ce + alpha*kl + beta*feature``.
        weights (Tensor): the distillation matrix ``W`` (``[N, N]`` or ``[B, N, N]``).
        nonfinite (BoolTensor): ``[N]``, members whose loss is NaN or inf this step.
        perturbed (int or None): the member that saw the perturbed batch.
        perturbation (str or None): the name of the operation it saw.

    Example:
        >>> nets = [nn.Linear(4, 3), nn.Linear(4, 3)]
        >>> group = CompetitiveGroup(nets, [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets])
        >>> result = group.step((torch.randn(8, 4), torch.randint(0, 3, (8,))))
        >>> bool(result.kl[result.teacher] == 0)  # the teacher learns from labels only
        True
    """

    teacher: Tensor
    ce: Tensor
    kl: Tensor
    feature: Tensor
    loss: Tensor
    weights: Tensor
    nonfinite: Tensor
    perturbed: int | None = None
    perturbation: str | None = None


class CompetitiveGroup:
    """Trains ``N >= 2`` networks on the same batches by competitive distillation.

    Each :meth:`step` forwards every member, picks this step's teacher from the cross-entropies,
    adds ``alpha * KL(p_T || p_i) + beta * ||F_i - F_T||^2`` to each student's loss, backpropagates
    once and steps every optimizer. See README for the rules and equations.

    Args:
        models (list of nn.Module): the members; logits ``[B, C]`` with the same ``C``.
        optimizers (list of Optimizer): ``optimizers[i]`` holds ``models[i]``'s parameters.
        feature_hooks (list, optional): per member, a submodule name, a submodule or None; the
            hooked outputs feed ``L_F``. Default: None (no feature loss).
        rule (str): ``"best"`` (paper, default), ``"better"``, ``"mutual"`` or ``"independent"``.
        granularity (str): ``"batch"`` (paper, default) or ``"sample"``.
        alpha (float): weight of the KL term. Default: 1.
        beta (float): weight of the feature term. Default: 1.
        temperature (float): softmax temperature of the KL term (``tau^2`` factor). Default: 1.
        perturbation (PerturbationPool, optional): perturb one random member's batch per step.
        perturb_prob (float): probability that a step perturbs at all. Default: 1.
        seed (int, optional): seed of the group's ``torch.Generator`` (perturbation draws).
            Default: drawn from torch's global generator.
        compile (bool): run the loss math through ``torch.compile(fullgraph=True)``. Default: False.
        skip_nonfinite (bool): skip the optimizer step of a member whose loss is NaN or inf. This
            reads N flags back to the host each step (like ``GradScaler``). Default: False.
        autocast_dtype (torch.dtype, optional): run forwards under ``torch.autocast`` with this
            dtype (e.g. ``torch.bfloat16``). Default: None.
        example_input (Tensor, optional): a batch of inputs used once to create the feature
            adapters at construction (otherwise they are created at the first step).
        process_group (ProcessGroup, optional): ranks that agree on one teacher under DDP.

    Note:
        Adapters between feature maps of different shapes (``"i_j"``: student ``i`` to teacher
        ``j``) are added as a parameter group to ``optimizers[i]`` and trained by student ``i``'s
        loss. Build LR schedulers after they exist (pass ``example_input``, or after step 1).

    Example:
        >>> nets = [nn.Linear(4, 3), nn.Linear(4, 3)]
        >>> opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
        >>> group = CompetitiveGroup(nets, opts)
        >>> result = group.step((torch.randn(8, 4), torch.randint(0, 3, (8,))))
        >>> result.loss.shape, result.teacher.dtype
        (torch.Size([2]), torch.int64)
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        feature_hooks: Sequence[HookSpec] | None = None,
        rule: str = "best",
        granularity: str = "batch",
        alpha: float = 1.0,
        beta: float = 1.0,
        temperature: float = 1.0,
        perturbation: PerturbationPool | None = None,
        perturb_prob: float = 1.0,
        seed: int | None = None,
        compile: bool = False,
        skip_nonfinite: bool = False,
        autocast_dtype: torch.dtype | None = None,
        example_input: Tensor | None = None,
        process_group: Any = None,
    ):
        check.check_members(models, optimizers, feature_hooks)
        check.check_settings(
            rule=rule,
            granularity=granularity,
            alpha=alpha,
            beta=beta,
            temperature=temperature,
            perturb_prob=perturb_prob,
        )
        if perturbation is not None and not isinstance(perturbation, PerturbationPool):
            raise TypeError(
                f"Invalid perturbation ({type(perturbation).__name__}): please provide a PerturbationPool or None."
            )
        self.models, self.optimizers = list(models), list(optimizers)
        self.rule, self.granularity = rule, granularity
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.perturbation, self.perturb_prob = perturbation, float(perturb_prob)
        self.skip_nonfinite, self.autocast_dtype = skip_nonfinite, autocast_dtype
        self.devices = [next(m.parameters()).device for m in self.models]
        self.device = self.devices[0]  # where the loss math runs
        hooks = resolve_hooks(self.models, feature_hooks or [None] * len(self.models))
        self.capture = FeatureCapture(hooks)
        self.adapters = nn.ModuleDict()
        self.feature_shapes: list[tuple[int, ...]] | None = None
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        self.reduce_ce = global_mean(process_group) if granularity == "batch" else None
        self.loss_fn = torch.compile(group_loss, fullgraph=True) if compile else group_loss
        self._reset_stats()
        self._pending_warnings: list = []
        if example_input is not None and self.capture.enabled:
            self._build_adapters_from(example_input)

    # -- the step -----------------------------------------------------------------------------

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, StepResult]:
        """Forward every member and compute the losses, leaving backward and stepping to the caller.

        Returns ``(total, result)``: ``total`` is the sum of the members' losses (their parameters
        are disjoint, so one backward gives each member exactly its own gradient).
        """
        x, y = check.check_batch(batch, self.devices)
        generator_state = self.generator.get_state()
        try:
            return self._loss(x, y)
        except BaseException:
            # a failed step leaves the group as it was: same draws next time, no stale features
            self.generator.set_state(generator_state)
            self.capture.clear()
            raise

    def step(self, batch: tuple[Tensor, Tensor], *, scaler: torch.amp.GradScaler | None = None) -> StepResult:
        """One iteration (paper Eq. 5): losses, one backward, every optimizer steps, grads zeroed.

        Args:
            batch: ``(inputs, targets)``, targets as class indices ``[B]``.
            scaler (torch.amp.GradScaler, optional): scale the loss and unscale each optimizer.
        """
        total, result = self.loss(batch)
        (scaler.scale(total) if scaler is not None else total).backward()
        skip = result.nonfinite.tolist() if self.skip_nonfinite else [False] * len(self.models)
        for optimizer, skipped in zip(self.optimizers, skip):
            if not skipped:
                scaler.step(optimizer) if scaler is not None else optimizer.step()
        if scaler is not None:
            scaler.update()
        self.zero_grad()
        return result

    def _loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, StepResult]:
        self._poll_nonfinite()
        n = len(self.models)
        perturbed, op_index, op_seed = self._draw()
        logits: list[Tensor | None] = [None] * n
        clean = [i for i in range(n) if i != perturbed]
        for i in clean:
            logits[i] = self._forward(i, x)
        num_classes = check.check_logits([logits[i] for i in clean], x.shape[0])
        check.check_targets(y, num_classes)
        targets = y.to(self.device)
        if perturbed is not None:
            x_p, y_p = self.perturbation.apply(
                op_index,
                x.to(self.devices[perturbed]),
                y.to(self.devices[perturbed]),
                seed=op_seed,
                num_classes=num_classes,
            )
            logits[perturbed] = self._forward(perturbed, x_p)
            num_classes = check.check_logits(logits, x.shape[0])
            if y_p.dim() == 2:  # mixing: member `perturbed` learns from soft labels, the rest from y
                targets = torch.nn.functional.one_hot(targets, num_classes).float().expand(n, -1, -1).clone()
                targets[perturbed] = y_p.to(self.device, torch.float32)
        features = self._features() if self.capture.enabled else None
        terms, teacher, weights = self.loss_fn(
            [z.to(self.device) for z in logits],
            targets,
            features,
            rule=self.rule,
            granularity=self.granularity,
            alpha=self.alpha,
            beta=self.beta,
            temperature=self.temperature,
            adapters=self.adapters if len(self.adapters) else None,
            reduce_ce=self.reduce_ce,
        )
        nonfinite = ~torch.isfinite(terms.loss)
        self._watch_nonfinite(nonfinite, step=self.steps + 1)  # raises (on CPU: now) if none is finite
        self._record(teacher, nonfinite, perturbed)
        result = StepResult(
            teacher,
            terms.ce.detach(),
            terms.kl.detach(),
            terms.feature.detach(),
            terms.loss.detach(),
            weights,
            nonfinite,
            perturbed,
            None if perturbed is None else self.perturbation.names[op_index],
        )
        return terms.loss.sum(), result

    def _draw(self) -> tuple[int | None, int, int]:
        """Which member is perturbed, by which operation, with which seed (all from the CPU generator)."""
        if self.perturbation is None:
            return None, 0, 0
        perturb = torch.rand((), generator=self.generator).item() < self.perturb_prob
        member = int(torch.randint(len(self.models), (), generator=self.generator))
        op_index, op_seed = self.perturbation.draw(self.generator)
        return (member if perturb else None), op_index, op_seed

    def _forward(self, i: int, x: Tensor) -> Tensor:
        x = x.to(self.devices[i], non_blocking=True)
        if self.autocast_dtype is None:
            return self.models[i](x)
        with torch.autocast(self.devices[i].type, dtype=self.autocast_dtype):
            return self.models[i](x)

    def _features(self) -> list[Tensor]:
        features = self.capture.features
        missing = [i for i, f in enumerate(features) if not isinstance(f, Tensor)]
        if missing:
            raise RuntimeError(
                f"feature_hooks of members {missing} did not fire (or returned no tensor) in this forward."
            )
        if self.feature_shapes is None:
            self._set_feature_shapes([tuple(f.shape[1:]) for f in features])
        self.capture.clear()
        return [f.to(self.device) for f in features]

    def _build_adapters_from(self, example_input: Tensor) -> None:
        modes = [m.training for m in self.models]
        with torch.no_grad():
            for i, model in enumerate(self.models):
                model.eval()
                self._forward(i, example_input)
        for model, mode in zip(self.models, modes):
            model.train(mode)
        self._features()

    def _set_feature_shapes(self, shapes: list[tuple[int, ...]]) -> None:
        adapters = build_adapters([torch.Size(s) for s in shapes], member_of="models")
        self.feature_shapes = shapes
        for key, adapter in adapters.items():
            student = int(key.split("_")[0])
            adapter.to(self.device)
            self.adapters[key] = adapter
            # the adapter is part of the student's loss, so the student's optimizer trains it
            self.optimizers[student].add_param_group({"params": list(adapter.parameters())})

    # -- statistics ---------------------------------------------------------------------------

    def _reset_stats(self) -> None:
        n = len(self.models)
        self.steps = 0
        self.counters = {
            "teacher_count": torch.zeros(n, device=self.device),
            "switches": torch.zeros((), device=self.device),
            "nonfinite_count": torch.zeros(n, dtype=torch.long, device=self.device),
            "perturbed_count": torch.zeros(n, dtype=torch.long, device=self.device),
            "perturbed_wins": torch.zeros((), device=self.device),
            "last_teacher": torch.full((), -1, dtype=torch.long, device=self.device),
        }

    def _record(self, teacher: Tensor, nonfinite: Tensor, perturbed: int | None) -> None:
        c, n = self.counters, len(self.models)
        share = (teacher.unsqueeze(-1) == torch.arange(n, device=self.device)).float()
        share = share.mean(0) if share.dim() == 2 else share  # per sample: share of the batch taught
        c["teacher_count"] += share
        # the batch's teacher (the largest share per sample); -1 when no member had a finite CE
        batch_teacher = torch.where(share.sum() > 0, share.argmax(), -1)
        last = c["last_teacher"]
        c["switches"] += ((batch_teacher != last) & (batch_teacher >= 0) & (last >= 0)).float()
        c["last_teacher"] = batch_teacher
        c["nonfinite_count"] += nonfinite.long()
        if perturbed is not None:
            c["perturbed_count"][perturbed] += 1
            c["perturbed_wins"] += share[perturbed]
        self.steps += 1

    def _watch_nonfinite(self, nonfinite: Tensor, step: int) -> None:
        # report without a host sync on GPU: copy the flags asynchronously and look at them once the
        # copy is done (at a later step), not now
        if nonfinite.device.type == "cpu":
            self._pending_warnings.append((step, nonfinite.clone(), None))
        else:
            host = torch.empty(nonfinite.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(nonfinite, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending_warnings.append((step, host, event))
        self._poll_nonfinite()

    def _poll_nonfinite(self) -> None:
        while self._pending_warnings and (self._pending_warnings[0][2] is None or self._pending_warnings[0][2].query()):
            step, flags, _ = self._pending_warnings.pop(0)
            if flags.all():
                raise RuntimeError(
                    f"Step {step}: the losses of all {flags.numel()} members are NaN or inf, so no member can "
                    "teach. Check the inputs for NaN/inf, lower the learning rate, or use a GradScaler with fp16."
                )
            if flags.any():
                members = flags.nonzero().flatten().tolist()
                warnings.warn(
                    f"Step {step}: the loss of members {members} is NaN or inf; they do not teach this step"
                    + (" and skip their update." if self.skip_nonfinite else "."),
                    RuntimeWarning,
                    stacklevel=4,
                )

    @property
    def stats(self) -> dict[str, Any]:
        """Counters since construction (reading them syncs with the device).

        ``steps``; ``teacher_count`` (per member: steps as teacher, fractional per sample);
        ``switches`` (steps at which the batch's teacher changed); ``nonfinite_count``;
        ``perturbed_count`` and ``perturbed_wins`` (steps at which the perturbed member won).
        """
        c = self.counters
        return {
            "steps": self.steps,
            "teacher_count": c["teacher_count"].tolist(),
            "switches": c["switches"].item(),
            "nonfinite_count": c["nonfinite_count"].tolist(),
            "perturbed_count": c["perturbed_count"].tolist(),
            "perturbed_wins": c["perturbed_wins"].item(),
        }

    # -- torch conventions --------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def train(self, mode: bool = True) -> "CompetitiveGroup":
        for model in self.models:
            model.train(mode)
        self.adapters.train(mode)
        return self

    def eval(self) -> "CompetitiveGroup":
        return self.train(False)

    def state_dict(self) -> dict[str, Any]:
        """Members, optimizers, adapters, counters and the perturbation generator."""
        return {
            "models": [m.state_dict() for m in self.models],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "feature_shapes": self.feature_shapes,
            "adapters": self.adapters.state_dict(),
            "counters": {k: v.clone() for k, v in self.counters.items()},
            "steps": self.steps,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        n = len(self.models)
        if len(state_dict["models"]) != n:
            raise ValueError(f"Invalid state_dict: it holds {len(state_dict['models'])} members; this group has {n}.")
        shapes = state_dict["feature_shapes"]
        if shapes is not None and self.feature_shapes is None:
            self._set_feature_shapes([tuple(s) for s in shapes])  # adapters exist before loading
        for model, state in zip(self.models, state_dict["models"]):
            model.load_state_dict(state)
        self.adapters.load_state_dict(state_dict["adapters"])
        for optimizer, state in zip(self.optimizers, state_dict["optimizers"]):
            optimizer.load_state_dict(state)
        self.counters = {k: v.to(self.device) for k, v in state_dict["counters"].items()}
        self.steps = state_dict["steps"]
        self.generator.set_state(state_dict["generator"])

    def close(self) -> None:
        """Remove the feature hooks from the members."""
        self.capture.remove()

    def __enter__(self) -> "CompetitiveGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
