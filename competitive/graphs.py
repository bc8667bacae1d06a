"""A group's whole training step as CUDA graphs (``CompetitiveGroup(cuda_graph=True)``).

A plain step of small members is bound by the host: it launches hundreds of kernels, each in a few
microseconds of Python and driver, while the GPU waits. The group's step reads nothing back to the host
(teacher, weights and counters are tensor ops), so it can be captured once in a ``torch.cuda.CUDAGraph``
and replayed: every member's forward, the step math with the knowledge terms, every backward and every
optimizer step, in one launch.

How a step runs (:class:`StepGraphs`):

* The host draws the step's perturbation from the group's generator, as an eager step does (no sync),
  and picks a graph by it: one for the unperturbed step, one per operation drawn. The perturbed member
  is a one-element tensor on the device, filled before the replay: every member forwards
  ``where(member == i, x', x)`` (:func:`forward_chosen_on_device`). Before replaying a perturbed graph
  the device's generator is seeded with the draw's seed, as the eager step seeds it, so the operation's
  parameters are drawn on the device inside the graph and a seeded run repeats.
* A graph is captured the first time its step comes after warm-up: the first ``WARMUP_STEPS`` steps,
  and the first step of each graph, run eagerly on a side stream (they are real steps; after the group's
  first, under CUDA's sync debug mode, which names where a step reads the host). The step count
  and the terms' warm-up ramp live on the device; the learning rate too (a float learning rate becomes
  a one-element tensor on the members' device at the first capture, which ``torch.optim.lr_scheduler``
  fills in place; a float assigned later is copied into it).
* Each step copies the batch into the graph's static inputs, replays, and returns a
  :class:`~competitive.StepResult` of copies of the graph's outputs (a later step does not overwrite it).
* A batch of a new shape is captured anew, once per shape, with a warning. Replaced parameters or
  optimizer state (``load_state_dict``) drop the graphs, which are captured again.
* What a graph cannot hold is refused before anything moves (:func:`check_graphable`; a
  ``GradScaler``; members off the GPU; another optimizer hyperparameter changed after capture). A step
  that synchronizes with the host, or a capture that fails, leaves that step eager, said once.

NaN or inf losses never teach and are counted on the device; their warning comes a step later (the
graph has already stepped), and ``skip_nonfinite`` is refused (skipping an update reads the host).
"""

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, cast

import torch
from torch import Tensor

from .capture import LearningRates, default_generator, sync_watch
from .features import check_logits, check_targets, shift
from .operations import member_targets
from .perturbation import Draw
from .result import StepResult

WARMUP_STEPS = 3  # eager steps before the first capture (cuDNN's and the optimizers' lazy set-up)
NO_DRAW = Draw(None, 0, 0, "")  # the step perturbs nobody
Body = Callable[[], StepResult]


class StepGraphs:
    """The graphed step of ``group`` (see the module's text). ``capture(body) -> replay``: how a body is
    captured; default: in a ``torch.cuda.CUDAGraph`` (all of a group's graphs share one memory pool).
    ``replay()`` runs the captured body on the static inputs and returns its (static) result."""

    def __init__(self, group: Any, capture: Callable[[Body], Body] | None = None):
        self.group, self.capture = group, capture
        group.members.autocast_cache = False  # a capture needs autocast's cast cache off (torch's CUDA graph notes)
        self.graphs: dict[tuple[Any, ...], Callable[[], StepResult]] = {}
        self.seen: set[tuple[Any, ...]] = set()  # the keys whose step ran eagerly once
        self.failed: dict[tuple[Any, ...], str] = {}  # keys that stay eager, and why
        self.inputs: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}  # static (x, y) per batch signature
        self.layouts: dict[tuple[Any, ...], Any] = {}  # the members' output layout per batch signature
        self.member: Tensor | None = None  # the perturbed member of a replay, on the device
        self.lrs = LearningRates(group.optimizers)
        self.eager_steps, self.known = 0, -1
        self.steps: Tensor | None = None  # the step count on the device
        self.pool: Any = None  # the graphs' memory pool
        self.stream: Any = None  # the side stream of the eager steps
        self.fingerprint: Any = None  # what the graphs hold: parameters' and optimizer states' identities
        self.parameters: list[Tensor] = []  # the members' parameters at the capture (a walk of the modules is slow)
        self.warned: set[Any] = set()  # what was said once: "drop", "fail", new batch signatures

    def step(self, batch: Any, scaler: Any = None) -> StepResult:
        """One step: replayed where its graph exists, else eager (warm-up, or a step that cannot be captured)."""
        group = self.group
        if scaler is not None:
            raise ValueError(
                "scaler: a GradScaler reads its inf check on the host, which a CUDA graph cannot hold. Use "
                "autocast_dtype=torch.bfloat16 (no scaler needed), or cuda_graph=False for float16 with a scaler."
            )
        x, y = group.members.check_batch(batch) if group.task is None else group.task.check_batch(batch, group.devices)
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(
                f"cuda_graph=True copies each batch into the graph's inputs, so a batch is a pair of tensors; got "
                f"({type(x).__name__}, {type(y).__name__}). Use cuda_graph=False for other batches."
            )
        self._check_members()
        self.lrs.check(group.members.device)
        group.members.watch.poll()
        if self.fingerprint is not None and self.fingerprint != self._fingerprint():
            self._drop("the members' parameters or their optimizers' state were replaced since the capture")
        signature = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype, tuple(m.training for m in group.models))
        generator_state = group.parts.generator.get_state()
        try:
            pool = group.perturbation
            draw = pool.draw(group.parts.generator, len(group.members), x, y) if pool is not None else NO_DRAW
            key = (signature, None if draw.member is None else draw.operation)
            if key not in self.graphs and key not in self.failed and self._ready(key):
                self._capture(key, x, y, draw)
            if key in self.graphs:
                return self._replay(key, x, y, draw)
            return self._eager(key, x, y, draw)
        except BaseException:
            group.parts.generator.set_state(generator_state)
            group.members.clear()
            raise

    def _ready(self, key: tuple[Any, ...]) -> bool:
        if key in self.seen and self.eager_steps >= WARMUP_STEPS:
            return True
        if self.inputs and key[0] not in self.inputs and key[0] not in self.warned:  # a batch of a new shape
            self.warned.add(key[0])
            shapes = f"inputs {list(key[0][0])} and targets {list(key[0][2])}"
            warnings.warn(
                f"cuda_graph: a batch of {shapes} (training modes {list(key[0][4])}) is new to the captured "
                "step; its step is captured anew, once (drop_last=True keeps every batch one shape).",
                RuntimeWarning,
                stacklevel=4,
            )
        return False

    def _eager(self, key: tuple[Any, ...], x: Tensor, y: Tensor, draw: Draw) -> StepResult:
        group = self.group
        # where the step reads the host (not in the group's first step: it builds the parts, tries every operation)
        checking = self.capture is None and key not in self.failed and group.steps > 0
        with self._side_stream(), sync_watch(checking) as syncs:
            total, result, cut = group._losses(x, y, train=True, cut=True, draw=draw)
            group.members.backward_and_step(total, cut, result.nonfinite, None)
        self.seen.add(key)
        self.layouts[key[0]] = group.members.layout
        self.eager_steps += 1
        if syncs:
            self._fail(key, f"the step synchronizes with the host at {syncs[0]}", draw)
        return cast(StepResult, result)  # the group is typed Any here (no import cycle)

    def _capture(self, key: tuple[Any, ...], x: Tensor, y: Tensor, draw: Draw) -> None:
        group = self.group
        group.members.watch.wait()  # earlier steps' flags, read now: nothing may query the device in a capture
        device = group.members.device
        if self.steps is None:
            self.lrs.capture(device)
        steps = self.steps = torch.zeros((), dtype=torch.float64, device=device) if self.steps is None else self.steps
        self._sync_steps()
        if key[0] not in self.inputs:
            self.inputs[key[0]] = (torch.empty(key[0][0], dtype=key[0][1], device=device),
                                   torch.empty(key[0][2], dtype=key[0][3], device=device))
        x, y = self.inputs[key[0]][0].copy_(x), self.inputs[key[0]][1].copy_(y)  # this step's batch, as replayed
        if self.member is None:
            self.member = torch.zeros((), dtype=torch.long, device=device)
        group.members.layout = self.layouts[key[0]]
        # the member is filled and the generator seeded before each replay
        captured_draw = draw._replace(seed=None, member=None if draw.member is None else self.member)

        warm = group.warmup_steps

        def body() -> StepResult:
            ramp = (steps / warm).clamp(max=1.0) if warm else torch.ones_like(steps)
            total, result, cut = group._losses(x, y, train=True, cut=True, draw=captured_draw, ramp=ramp)
            group.members.backward_and_step(total, cut, result.nonfinite, None)
            steps.add_(1)
            return cast(StepResult, result)

        try:
            self.graphs[key] = (self.capture or self._cuda_capture)(body)
        except Exception as error:
            group.members.clear()
            group.members.zero_grad(set_to_none=True)  # what the failed capture left in .grad is not a gradient
            self._fail(key, f"capturing it failed ({type(error).__name__}: {error})", draw)
            return
        self.parameters = [p for m in group.models for p in m.parameters()]
        self.fingerprint = self._fingerprint()

    def _replay(self, key: tuple[Any, ...], x: Tensor, y: Tensor, draw: Draw) -> StepResult:
        group = self.group
        static_x, static_y = self.inputs[key[0]]
        static_x.copy_(x, non_blocking=True)
        static_y.copy_(y, non_blocking=True)
        self._sync_steps()
        if draw.member is not None and self.member is not None:
            self.member.fill_(draw.member)
        generator = default_generator(static_x.device)
        saved = None if draw.member is None else generator.get_state()
        if draw.seed is not None and saved is not None:
            generator.manual_seed(draw.seed)  # as the eager step seeds the operation's draws
        try:
            out = self.graphs[key]()
        finally:
            if saved is not None:
                generator.set_state(saved)
        terms = {name: value.clone() for name, value in out.terms.items()}
        fields = {k: getattr(out, k).clone() for k in ("teacher", "ce", "loss", "weights", "nonfinite")}
        valid = None if out.valid is None else out.valid.clone()
        member = cast(int | None, draw.member)  # the host's draw
        result = replace(out, terms=terms, valid=valid, perturbed=member, skipped=draw.skipped, **fields)
        group.parts.counters.steps += 1
        self.known = group.parts.counters.steps
        group.members.watch.watch(result.nonfinite, step=self.known)
        return result

    def _sync_steps(self) -> None:
        """The device's step count from the host's, where they parted (a loaded state, an eager step)."""
        steps = self.group.parts.counters.steps
        if self.steps is not None and self.known != steps:
            self.steps.fill_(steps)
            self.known = steps

    def _cuda_capture(self, body: Callable[[], StepResult]) -> Callable[[], StepResult]:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = body()
        except BaseException:
            torch.cuda.set_stream(stream)  # a failed capture_end() leaves the capture's stream current
            raise

        def replay() -> StepResult:
            graph.replay()
            return out

        return replay

    @contextmanager
    def _side_stream(self) -> Iterator[None]:
        """Eager steps run on a side stream, as a capture does (torch's recipe for warm-up)."""
        if self.capture is not None or self.group.members.device.type != "cuda":
            yield
            return
        if self.stream is None:
            self.stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # unannotated in torch
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield
        current.wait_stream(self.stream)

    def _check_members(self) -> None:
        devices = self.group.members.devices
        if self.capture is None and (any(d.type != "cuda" for d in devices) or len(set(devices)) > 1):
            raise ValueError(
                f"cuda_graph=True captures the step on one GPU, and the members are on {[str(d) for d in devices]}. "
                "Move every member to the same CUDA device (model.cuda()) before the first step."
            )

    def _fingerprint(self) -> tuple[Any, ...]:
        optimizers = tuple((id(o.state), id(o.param_groups)) for o in self.group.optimizers if o is not None)
        return optimizers, tuple(p.data_ptr() for p in self.parameters)

    def _drop(self, why: str) -> None:
        self.graphs.clear()
        self.seen.clear()
        self.eager_steps, self.fingerprint = 0, None
        self._warn_once("drop", f"cuda_graph: {why}; the step is warmed up and captured again.", stacklevel=5)

    def _fail(self, key: tuple[Any, ...], why: str, draw: Draw) -> None:
        self.failed[key] = why
        step = f"the step perturbed by {draw.name!r}" if draw.member is not None else "the step"
        self._warn_once(
            "fail", f"cuda_graph: {step} runs eagerly: {why}. Any other step that cannot be captured does too "
            "(said once; group.graphs.failed lists them).",
            stacklevel=6,
        )

    def _warn_once(self, what: str, message: str, stacklevel: int) -> None:
        """``stacklevel``: frames up to the caller of ``group.step()``."""
        if what not in self.warned:
            self.warned.add(what)
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def forward_chosen_on_device(members: Any, x: Tensor, y: Tensor, draw: Draw, pool: Any, cut: bool) -> Any:
    """``Members.forward`` of a CUDA graph's perturbed step: the operation is the graph's, the member
    ``draw.member`` a one-element tensor on the device, so one graph serves every member. The batch is
    perturbed first (the device's generator as it stands), then member ``i`` forwards
    ``where(member == i, x', x)``; the layout of the members' outputs is the eager step's (``members.layout``)."""
    n, device, member = len(members), members.device, cast(Tensor, draw.member)  # the graph's, filled per replay
    layout = members.layout
    if members.shift_targets:  # position t learns the target at t + 1
        layout, y = shift(layout, y)
    check_targets(y, layout, members.ignore_index)
    x_p, y_p = pool.perturb(
        draw.operation, x, y, seed=None, num_classes=layout[0], ignore_index=members.ignore_index
    )
    logits = [members._forward(i, torch.where(member == i, x_p, x), device) for i in range(n)]
    check_logits(logits, x.shape[0], list(range(n)), members.class_dim)
    targets = member_targets(y, y_p, member, n, layout[0], members.ignore_index)
    return members.inputs(logits, targets, device, cut)
