"""``Members``: the networks of a group, their optimizers and hooks; forward, backward and step.

A group reaches its members through :meth:`Members.forward` (every member's forward, one of them
perturbed, the outputs checked and cut from the members' graphs) and :meth:`Members.backward_and_step`
(member by member: backward from its outputs, optimizer step, gradients freed).
"""

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from ._validation import check_logits_from, check_member_settings, check_members
from .chunked import overwritten_logits
from .features import (
    Cut,
    FeatureCapture,
    HookSpec,
    LogitsSpec,
    check_batch,
    check_logits,
    check_shapes,
    check_targets,
    extract_logits,
    no_cut,
    resolve_hooks,
    shift,
)
from .graphs import forward_chosen_on_device
from .operations import member_targets
from .perturbation import Draw, PerturbationPool


class StepInputs(NamedTuple):
    """What the step math reads, on one device, and the cut of the members' graphs (or None)."""

    logits: list[Tensor]
    targets: Tensor
    captured: dict[str, list[Tensor]]  # "features", "embeddings": the hooked outputs the terms read
    cut: "Cut | None"


class Members:
    """The models, their optimizers, the hooks on them, and how a step runs through them (the
    arguments are :class:`~competitive.CompetitiveGroup`'s of the same names)."""

    def __init__(
        self,
        models: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer | None],
        feature_hooks: Sequence[HookSpec] | None = None,
        embedding_hooks: Sequence[HookSpec] | None = None,
        logits_from: LogitsSpec | Sequence[LogitsSpec] = None,
        autocast_dtype: torch.dtype | None = None,
        skip_nonfinite: bool = False,
        class_dim: int = 1,
        ignore_index: int = -100,
        shift_targets: bool = False,
    ):
        check_members(models, optimizers, feature_hooks, embedding_hooks)
        check_member_settings(
            autocast_dtype, skip_nonfinite, class_dim=class_dim, ignore_index=ignore_index, shift_targets=shift_targets
        )
        self.class_dim, self.ignore_index, self.shift_targets = class_dim, ignore_index, shift_targets
        self.models, self.optimizers = list(models), list(optimizers)
        n = len(self.models)
        self.logits_from = check_logits_from(logits_from, n)
        self.autocast_dtype, self.skip_nonfinite = autocast_dtype, skip_nonfinite
        self.capture = {
            "features": FeatureCapture(resolve_hooks(self.models, feature_hooks or [None] * n, "feature_hooks")),
            "embeddings": FeatureCapture(
                resolve_hooks(self.models, embedding_hooks or [None] * n, "embedding_hooks"), linear_input=True
            ),
        }
        self.watch = NonfiniteWatch(skip_nonfinite)
        self.call: Any = None  # the group's forward=: (member, inputs, targets) -> output
        self.autocast_cache = True  # autocast's cast cache (off in a CUDA graph's capture)
        # which hooked outputs the terms read, and the shapes their parts were built for (set by the group)
        self.needs: list[str] = []
        self.shapes: dict[str, list[tuple[int, ...]]] = {}
        self.fixed: set[str] = set()

    def __len__(self) -> int:
        return len(self.models)

    @property
    def devices(self) -> list[torch.device]:
        """Each member's device, read from its parameters (so a trainer may move the members)."""
        return [next(m.parameters()).device for m in self.models]

    @property
    def device(self) -> torch.device:
        """Where the step math runs: the first member's device."""
        return next(self.models[0].parameters()).device

    def check_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)`` checked against the members (targets as int64)."""
        return check_batch(batch, self.devices)

    def forward(
        self, x: Tensor, y: Tensor, draw: Draw | None = None, pool: PerturbationPool | None = None, cut: bool = False
    ) -> StepInputs:
        """What the step math reads, on the first member's device: every member's logits on ``x``
        (member ``draw.member`` on its batch perturbed by ``pool``), the targets each member learns
        towards, and the hooked outputs in ``needs``; with ``cut``, cut from the members' graphs for
        :meth:`backward_and_step`. ``pool`` tries each of its operations on the first batch it
        sees, so one that cannot handle ``x`` is refused now."""
        if draw is not None and isinstance(draw.member, Tensor):  # a CUDA graph's perturbed step
            return cast(StepInputs, forward_chosen_on_device(self, x, y, draw, pool, cut))
        devices, n, class_dim = self.devices, len(self.models), self.class_dim
        member = None if draw is None else cast(int | None, draw.member)
        logits = [self._forward(i, x, devices[i], y) for i in range(n) if i != member]
        self.layout = layout = check_logits(logits, x.shape[0], [i for i in range(n) if i != member], class_dim)
        if self.shift_targets:  # position t learns the target at t + 1
            layout, y = shift(layout, y)
        check_targets(y, layout, self.ignore_index)
        if pool is not None and not pool.checked:
            pool.check(x, y, num_classes=layout[0], ignore_index=self.ignore_index)
        targets = y.to(devices[0])
        if member is not None:
            if pool is None or draw is None:
                raise ValueError(f"draw.member={member} names a perturbed member, so forward() needs the pool too.")
            on = devices[member]
            x_p, y_p = pool.perturb(
                draw.operation,
                x.to(on),
                y.to(on),
                seed=draw.seed,
                num_classes=layout[0],
                ignore_index=self.ignore_index,
            )
            logits.insert(member, self._forward(member, x_p, on, y_p))
            check_logits(logits, x.shape[0], list(range(n)), class_dim)
            targets = member_targets(targets, y_p.to(devices[0]), member, n, layout[0], self.ignore_index)
        return self.inputs(logits, targets, devices[0], cut)

    def inputs(self, logits: list[Tensor], targets: Any, device: torch.device, cut: bool) -> StepInputs:
        """The step math's inputs from the members' outputs: with ``cut``, cut from the members' graphs."""
        cutter: Any = Cut(len(self.models)) if cut else no_cut  # shift_targets: the step math drops the last position
        captured = {}
        for need in self.needs:  # contiguous: a compiled step is several times slower on channels_last maps
            values = self.capture[need].take(need)
            captured[need] = [cutter(i, v).to(device).contiguous() for i, v in enumerate(values)]
        check_shapes(captured, self.shapes, self.fixed)
        logits = [cutter(i, z).to(device) for i, z in enumerate(logits)]
        return StepInputs(logits, targets, captured, cutter if cut else None)

    def _forward(self, i: int, x: Tensor, device: torch.device, y: Any = None) -> Tensor:
        return extract_logits(self.output(i, x, device, y), self.logits_from[i], member=i)

    def output(self, i: int, x: Any, device: torch.device, y: Any = None) -> Any:
        """Member ``i``'s output on ``x`` (its ``forward=`` call with the targets ``y``, if the group has one)."""
        x = x.to(device, non_blocking=True) if isinstance(x, Tensor) else x  # other inputs pass as they are
        model = self.models[i]
        try:
            if self.autocast_dtype is None:  # no context: an autocast the caller entered stays in force
                return model(x) if self.call is None else self.call(model, x, y)
            with torch.autocast(device.type, dtype=self.autocast_dtype, cache_enabled=self.autocast_cache):
                return model(x) if self.call is None else self.call(model, x, y)
        except IndexError as error:  # an embedding given token ids beyond its vocabulary
            if not isinstance(x, Tensor) or x.is_floating_point():
                raise
            raise ValueError(
                f"models[{i}] could not embed the token ids of inputs {list(x.shape)} (values in [{int(x.min())}, "
                f"{int(x.max())}]): {error}. Token ids must lie in [0, vocabulary size) of every member."
            ) from error

    def probe(self, example_input: Any, targets: Any = None) -> dict[str, list[tuple[int, ...]]]:
        """The shapes (without the batch dim) of the hooked outputs in ``needs``, from one forward of
        ``example_input`` (with ``targets`` for a ``forward=`` call) per member in eval mode, without gradients."""
        modes = [m.training for m in self.models]
        try:
            with torch.no_grad():
                for i, model in enumerate(self.models):
                    model.eval()
                    self.output(i, example_input, self.devices[i], targets)
            return {need: [tuple(v.shape[1:]) for v in self.capture[need].take(need)] for need in self.needs}
        finally:
            for model, mode in zip(self.models, modes):
                model.train(mode)
            self.clear()

    def known_shapes(self, example_input: Tensor | None) -> dict[str, list[tuple[int, ...]]] | None:
        """The shapes of the hooked outputs in ``needs`` where they are known before a step: none
        needed, a :meth:`probe` of ``example_input``, or embeddings read at ``nn.Linear`` inputs."""
        if not self.needs:
            return {}
        if example_input is not None:
            return self.probe(example_input)
        static = self.capture["embeddings"].static_shapes() if self.needs == ["embeddings"] else None
        return None if static is None else {"embeddings": static}

    def watch_losses(self, total: Tensor, nonfinite: Tensor, step: int, watch: bool = True) -> None:
        """Before anything moves: some member must be trainable, and (on the CPU, at once) some loss finite
        (``watch``: a CUDA graph's step reads its flags after the replay)."""
        if not total.requires_grad:
            raise RuntimeError(
                "No member has a trainable parameter in this step's graph (every parameter has "
                "requires_grad=False), so step() cannot update anything. Unfreeze at least one member."
            )
        if watch:
            self.watch.watch(nonfinite, step=step)
            self.watch.poll()

    def backward_and_step(self, total: Tensor, cut: "Cut", nonfinite: Tensor, scaler: Any = None) -> None:
        """The step math's backward, then per member: backward from its outputs, optimizer step,
        gradients freed, so its graph is freed before the next member's backward. By the chain rule
        every parameter gets the gradient of one backward of the summed losses."""
        (scaler.scale(total) if scaler is not None else total).backward()
        try:
            for i, optimizer in enumerate(self.optimizers):
                cut.backward(i)
                if i == 0:
                    # no finite loss raises here, before any update (a GPU's flags land during this backward)
                    self.watch.wait()
                    skip = nonfinite.tolist() if self.skip_nonfinite else [False] * len(self.models)
                if optimizer is not None:
                    if not skip[i]:
                        scaler.step(optimizer) if scaler is not None else optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        except BaseException as error:
            self.zero_grad()
            hint = overwritten_logits(error)  # a backward that reads logits the chunked step math overwrote
            if hint is None:
                raise
            raise hint from error
        if scaler is not None:
            scaler.update()

    def clear(self) -> None:  # forget the captured outputs of a forward that did not finish
        for capture in self.capture.values():
            capture.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=set_to_none)

    def train(self, mode: bool = True) -> None:
        for model in self.models:
            model.train(mode)

    def close(self) -> None:
        """Remove the hooks from the members."""
        for capture in self.capture.values():
            capture.remove()


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
        self.pending: list[tuple[int, Any, Any]] = []  # (step, NumPy flags, event or None)

    def watch(self, nonfinite: Tensor, step: int) -> None:
        if nonfinite.device.type == "cpu":  # read at once, through NumPy (no tensor op per step)
            self.pending.append((step, nonfinite.numpy().copy(), None))
        else:
            host = torch.empty(nonfinite.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(nonfinite, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]  # unannotated in torch
            event.record()
            self.pending.append((step, host.numpy(), event))

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
                    f"Step {step}: the losses of all {flags.size} members are NaN or inf, so no member can "
                    "teach and no member was updated. Check the inputs for NaN/inf, lower the learning rate, "
                    "or use a GradScaler with fp16."
                )
            if flags.any():
                members = [int(i) for i in flags.nonzero()[0]]
                warnings.warn(
                    f"Step {step}: the loss of members {members} is NaN or inf; they do not teach this step"
                    + (" and skip their update." if self.skip_nonfinite else "."),
                    RuntimeWarning,
                    stacklevel=5,
                )
