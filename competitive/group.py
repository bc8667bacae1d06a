"""``CompetitiveGroup``: N networks trained together by competitive distillation (paper §3).

The group keeps the stateful loop only: forward every member, call the pure step math of
:mod:`competitive.losses`, backward, step. The terms live in :mod:`competitive.terms`, the
counters and the non-finite bookkeeping in :mod:`competitive.stats`.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _validation as check
from .distributed import default_seed, global_mean, share_parameters
from .features import FeatureCapture, HookSpec, extract_logits, resolve_hooks
from .losses import step_losses
from .memory import keep_freed_memory
from .perturbation import PerturbationPool
from .result import StepResult
from .stats import GroupStats, NonfiniteWatch
from .terms import Term


class CompetitiveGroup:
    """Trains ``N >= 2`` networks on the same batches by competitive distillation.

    Each :meth:`step` forwards every member, picks this step's teacher from the cross-entropies,
    adds every knowledge term (by default ``alpha * KL(p_T || p_i)``, and
    ``beta * ||F_i - F_T||^2`` with ``feature_hooks``) to each student's loss, then backpropagates
    and steps each member in turn, with the gradients of one backward of the summed losses. See
    README for the rules, terms and equations.

    Args:
        models (list of nn.Module): the members; logits ``[B, C]`` with the same ``C >= 2``.
        optimizers (list of Optimizer or None): ``optimizers[i]`` holds ``models[i]``'s trainable
            parameters; None for a frozen member (no trainable parameter).
        feature_hooks (list, optional): per member, a submodule name, a submodule or None; the
            hooked outputs feed the ``"feature"`` and ``"adm"`` terms. Default: None.
        embedding_hooks (list, optional): per member, where the embedding of the ``"mcl"`` term
            comes from: the input of a named ``nn.Linear`` (e.g. ``"fc"``), or the output of any
            other module (e.g. a pooling layer), flattened to ``[B, D]``. Default: None.
        terms (list of str or Term, optional): the knowledge terms: ``"kl"``, ``"feature"``,
            ``"mcl"``, ``"adm"`` or :class:`~competitive.terms.Term` instances. Default: ``["kl"]``,
            plus ``"feature"`` when ``feature_hooks`` is given (the paper).
        rule (str): ``"best"`` (paper, default), ``"better"``, ``"mutual"`` or ``"independent"``.
        granularity (str): ``"batch"`` (paper, default) or ``"sample"``.
        alpha (float): weight of the ``"kl"`` term. Default: 1.
        beta (float): weight of the ``"feature"`` term. Default: 1.
        temperature (float): softmax temperature of the ``"kl"`` term (``tau^2`` factor). Default: 1.
        warmup_steps (int): ramp every term's weight linearly from 0 to its value over the first
            ``warmup_steps`` steps, so a member that starts worse is not knocked off course by its
            peers' early outputs (see README). 0: the paper's plain behaviour. Default: 150.
        fixed_teacher (int, optional): this member always teaches (classic, offline KD with the
            same terms; it must have a finite loss to teach). Only with ``rule="best"``. Default: None.
        logits_from (str, int or callable, or a list of them, optional): where the logits are in a
            member's output: an attribute or dict key, a tuple index, or ``output -> logits``; one
            for all members or one per member. Default: the output itself, or its ``.logits``
            (attribute or key) when it is not a tensor.
        perturbation (PerturbationPool, optional): perturb one random member's batch per step.
        perturb_prob (float): probability that a step perturbs at all. Default: 1.
        seed (int, optional): seed of the group's CPU ``torch.Generator`` (perturbation draws).
            Default: None, ``torch.initial_seed()`` (read, not drawn: torch's global stream is
            untouched), so ``torch.manual_seed(s)`` at the top of a script makes the whole run
            repeat; under an initialized process group every rank takes rank 0's seed, broadcast
            once here. ``group.seed`` tells which.
        compile (bool or dict): run the step math through ``torch.compile(fullgraph=True)``; a dict
            passes its keyword arguments (``backend``, ``mode``, ``options``, ``dynamic``) on, e.g.
            ``{"mode": "max-autotune-no-cudagraphs"}``, or ``{"backend": "aot_eager"}`` (the same
            graph capture and autograd graph with eager kernels: no C++ build, so a quick check that
            a new term compiles). Default: False.
        skip_nonfinite (bool): skip the optimizer step of a member whose loss is NaN or inf. This
            reads N flags back to the host each step (like ``GradScaler``). Default: False.
        autocast_dtype (torch.dtype, optional): run forwards under ``torch.autocast`` with this
            floating dtype (e.g. ``torch.bfloat16``). Default: None.
        example_input (Tensor, optional): a batch of inputs used once (no gradient, eval mode)
            to create the terms' adapters and heads when the group is built. Without it, parts
            whose shapes need a forward are created at the start of the first step, from that
            batch's first two inputs, before its forward.
        process_group (ProcessGroup, optional): ranks that agree on one teacher under DDP.
        keep_cpu_memory (bool): at the first training step on the CPU, ask glibc's malloc to keep
            the memory it frees (:func:`competitive.memory.keep_freed_memory`, process-wide), so
            the members' activations are not page-faulted in again at every step; ``group.cpu_memory``
            says whether it took effect. No effect on GPUs, where malloc is not glibc's, with a
            preloaded allocator, or when ``MALLOC_*_`` / ``GLIBC_TUNABLES`` are set. Default: True.

    Note:
        Learnable parts of the terms (adapters ``"i_j"`` from student ``i`` to teacher ``j``,
        projection heads) are added as a parameter group to the optimizer of the member whose
        loss trains them. Build LR schedulers after the group, and pass ``example_input`` when
        the members' feature maps may differ in shape, so those parts exist by then; a group that
        would add them to an optimizer that already has a scheduler refuses with a clear error.

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
        optimizers: Sequence[torch.optim.Optimizer | None],
        *,
        feature_hooks: Sequence[HookSpec] | None = None,
        embedding_hooks: Sequence[HookSpec] | None = None,
        terms: Sequence[str | Term] | None = None,
        rule: str = "best",
        granularity: str = "batch",
        alpha: float = 1.0,
        beta: float = 1.0,
        temperature: float = 1.0,
        warmup_steps: int = 150,
        fixed_teacher: int | None = None,
        logits_from: Any = None,
        perturbation: PerturbationPool | None = None,
        perturb_prob: float = 1.0,
        seed: int | None = None,
        compile: bool | dict[str, Any] = False,
        skip_nonfinite: bool = False,
        autocast_dtype: torch.dtype | None = None,
        example_input: Tensor | None = None,
        process_group: Any = None,
        keep_cpu_memory: bool = True,
    ):
        check.check_members(models, optimizers, feature_hooks, embedding_hooks)
        settings = check.check_settings(
            rule=rule,
            granularity=granularity,
            alpha=alpha,
            beta=beta,
            temperature=temperature,
            perturb_prob=perturb_prob,
            warmup_steps=warmup_steps,
            fixed_teacher=fixed_teacher,
            n=len(models),
            seed=seed,
            compile=compile,
            skip_nonfinite=skip_nonfinite,
            keep_cpu_memory=keep_cpu_memory,
            autocast_dtype=autocast_dtype,
            perturbation=perturbation,
        )
        self.models, self.optimizers = list(models), list(optimizers)
        self.rule, self.granularity, self.fixed_teacher = rule, granularity, fixed_teacher
        self.perturb_prob = settings.pop("perturb_prob")
        self.alpha, self.beta, self.temperature = settings["alpha"], settings["beta"], settings["temperature"]
        self.warmup_steps = warmup_steps
        self.perturbation = perturbation
        self.skip_nonfinite, self.autocast_dtype = skip_nonfinite, autocast_dtype
        self.logits_from = check.check_logits_from(logits_from, len(self.models))
        self.terms = nn.ModuleList(check.resolve_terms(terms, feature_hooks, embedding_hooks, **settings)).to(
            self.device
        )
        n = len(self.models)
        self.capture = {
            "features": FeatureCapture(resolve_hooks(self.models, feature_hooks or [None] * n, "feature_hooks")),
            "embeddings": FeatureCapture(
                resolve_hooks(self.models, embedding_hooks or [None] * n, "embedding_hooks"), linear_input=True
            ),
        }
        self.needs = sorted({need for term in self.terms for need in term.needs})
        self.shapes: dict[str, list[tuple[int, ...]]] | None = None
        self.fixed_shapes: set[str] = set()
        self.seed = seed if seed is not None else default_seed(process_group)
        self.generator = torch.Generator()
        self.generator.manual_seed(self.seed)
        self.process_group = process_group
        self.keep_cpu_memory = keep_cpu_memory
        self.cpu_memory: str | None = None  # what keep_freed_memory() answered, at the first CPU step
        self.reduce_score = global_mean(process_group) if granularity == "batch" else None
        options = check.check_compile(compile)
        self.loss_fn: Callable = step_losses
        if options is not None:
            self.loss_fn = torch.compile(step_losses, fullgraph=True, **options)
        self.counters = GroupStats(n).to(self.device)
        self.watch = NonfiniteWatch(skip_nonfinite)
        self.pool_checked = False
        if not self.needs:
            self.shapes = {}
        elif example_input is not None:
            self._build(self._probe(example_input))
        else:
            static = self.capture["embeddings"].static_shapes() if self.needs == ["embeddings"] else None
            if static is not None:
                self._build({"embeddings": static})

    # -- the step -----------------------------------------------------------------------------

    def step(self, batch: tuple[Tensor, Tensor], *, scaler: torch.amp.GradScaler | None = None) -> StepResult:
        """One iteration (paper Eq. 5): losses, then per member its backward, optimizer step, grads zeroed.

        The gradients are those of one backward of the summed losses (the members' parameters are
        disjoint): the step math is differentiated once, on its inputs cut from the members' graphs,
        and each member's backward then runs from its outputs in turn (member 0 first), followed at
        once by its optimizer step, so its graph is freed before the next member's backward.

        Args:
            batch: ``(inputs, targets)``, targets as integer class indices ``[B]``.
            scaler (torch.amp.GradScaler, optional): scale the loss and unscale each optimizer.
        """
        if not torch.is_grad_enabled():
            raise RuntimeError(
                "step() was called with gradients disabled (inside torch.no_grad() or inference_mode()), so "
                "no member can learn. Call step() outside it; for validation use group.evaluate(batch)."
            )
        cut = _Cut(len(self.models))
        total, result = self._run(batch, train=True, cut=cut)
        # the step math's own (small) backward: the gradients of every member's outputs and of the
        # terms' parts; then each member's backward from its outputs, its graph freed, its step
        (scaler.scale(total) if scaler is not None else total).backward()
        try:
            for i, optimizer in enumerate(self.optimizers):
                cut.backward(i)
                if i == 0:
                    # a step where no member's loss is finite raises here, before any update; on a GPU
                    # this waits for the flags' copy while the first member's backward runs
                    self.watch.wait()
                    skip = result.nonfinite.tolist() if self.skip_nonfinite else [False] * len(self.models)
                if optimizer is not None:
                    if not skip[i]:
                        scaler.step(optimizer) if scaler is not None else optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        except BaseException:
            self.zero_grad()
            raise
        if scaler is not None:
            scaler.update()
        return result

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, StepResult]:
        """Forward every member and compute the losses, leaving backward and stepping to the caller.

        Returns ``(total, result)``: ``total`` is the sum of the members' losses (their parameters
        are disjoint, so one backward gives each member exactly its own gradient). Under
        ``torch.no_grad()`` this is :meth:`evaluate`: nothing about the group moves.
        """
        if not torch.is_grad_enabled():
            result = self.evaluate(batch)
            return result.loss.sum(), result
        return self._run(batch, train=True)

    @torch.no_grad()
    def evaluate(self, batch: tuple[Tensor, Tensor]) -> StepResult:
        """The losses and the teacher of a batch, with no side effect on the group.

        No perturbation, no counter or generator moves, no gradient. The members run in whatever
        mode they are in (call ``group.eval()`` first for validation: BatchNorm statistics of
        members in training mode are updated by any forward).
        """
        return self._run(batch, train=False)[1]

    def _run(
        self, batch: tuple[Tensor, Tensor], *, train: bool, cut: "_Cut | None" = None
    ) -> tuple[Tensor, StepResult]:
        devices = self.devices  # read once per step
        x, y = check.check_batch(batch, devices)
        generator_state = self.generator.get_state()
        try:
            return self._losses(x, y, train, devices, cut)
        except BaseException:
            # a failed step leaves the group as it was: same draws next time, no stale captures
            self.generator.set_state(generator_state)
            for capture in self.capture.values():
                capture.clear()
            raise

    def _losses(
        self, x: Tensor, y: Tensor, train: bool, devices: list[torch.device], cut: "_Cut | None"
    ) -> tuple[Tensor, StepResult]:
        device = devices[0]  # where the step math runs
        if self.counters.last_teacher.device != device:  # the members moved (e.g. a trainer's .to())
            self.terms.to(device)
            self.counters.to(device)
        if self.shapes is None:
            # no example_input: size the parts from this batch's first inputs before its forward
            self._build(self._probe(x[:2]))
        if train:
            self.watch.poll()
            if self.keep_cpu_memory and self.cpu_memory is None and device.type == "cpu":
                self.cpu_memory = keep_freed_memory()
        n = len(self.models)
        perturbed, op_index, op_seed = self._draw() if train else (None, 0, 0)
        skipped = None
        if perturbed is not None and not self.perturbation.can_apply(op_index, x):
            skipped = f"{self.perturbation.names[op_index]!r} needs a batch of at least 2; got {x.shape[0]}"
            perturbed = None
        logits: list[Tensor | None] = [None] * n
        for i in range(n):
            if i != perturbed:
                logits[i] = self._forward(i, x, devices[i])
        clean = [logits[i] for i in range(n) if i != perturbed]
        num_classes = check.check_logits(clean, x.shape[0], [i for i in range(n) if i != perturbed])
        check.check_targets(y, num_classes)
        if train and self.perturbation is not None and not self.pool_checked:
            # every operation once on two images: inputs one cannot handle are refused now, naming it
            self.perturbation.check(x, y, num_classes=num_classes)
            self.pool_checked = True
        targets = y.to(device)
        if perturbed is not None:
            x_p, y_p = self.perturbation.perturb(
                op_index,
                x.to(devices[perturbed]),
                y.to(devices[perturbed]),
                seed=op_seed,
                num_classes=num_classes,
            )
            logits[perturbed] = self._forward(perturbed, x_p, devices[perturbed])
            num_classes = check.check_logits(logits, x.shape[0], list(range(n)))
            targets = _member_targets(targets, y_p.to(device), perturbed, n, num_classes)
        cut = cut if cut is not None else _no_cut
        captured = self._captured(device, cut)
        out = self.loss_fn(
            [cut(i, z).to(device) for i, z in enumerate(logits)],
            targets,
            terms=self.terms,
            features=captured.get("features"),
            embeddings=captured.get("embeddings"),
            rule=self.rule,
            granularity=self.granularity,
            reduce_score=self.reduce_score,
            fixed_teacher=self.fixed_teacher,
        )
        ramp = self.ramp if train else 1.0
        loss = out.ce
        for term in self.terms:
            loss = loss + (ramp * term.weight) * out.terms[term.name]
        nonfinite = ~torch.isfinite(loss)
        total = loss.sum()
        if train:
            if not total.requires_grad:
                raise RuntimeError(
                    "No member has a trainable parameter in this step's graph (every parameter has "
                    "requires_grad=False), so step() cannot update anything. Unfreeze at least one member."
                )
            self.watch.watch(nonfinite, step=self.counters.steps + 1)
            self.watch.poll()  # on the CPU: raises now, before anything moves, if none is finite
            self.counters.record(out.teacher, nonfinite, perturbed)
        result = StepResult(
            out.teacher,
            out.ce.detach(),
            {k: v.detach() for k, v in out.terms.items()},
            loss.detach(),
            out.weights,
            nonfinite,
            perturbed,
            None if perturbed is None else self.perturbation.names[op_index],
            skipped,
        )
        return total, result

    @property
    def ramp(self) -> float:
        """The factor on every term's weight at the next step (``warmup_steps``)."""
        steps = self.counters.steps
        return 1.0 if steps >= self.warmup_steps else steps / self.warmup_steps

    @property
    def steps(self) -> int:
        """Steps taken since construction (a Python int)."""
        return self.counters.steps

    @property
    def devices(self) -> list[torch.device]:
        """Each member's device, read from its parameters (so a trainer may move the members)."""
        return [next(m.parameters()).device for m in self.models]

    @property
    def device(self) -> torch.device:
        """Where the step math runs: the first member's device."""
        return next(self.models[0].parameters()).device

    def _draw(self) -> tuple[int | None, int, int]:
        """Which member is perturbed, by which operation, with which seed (all from the CPU generator)."""
        if self.perturbation is None:
            return None, 0, 0
        perturb = torch.rand((), generator=self.generator).item() < self.perturb_prob
        member = int(torch.randint(len(self.models), (), generator=self.generator))
        op_index, op_seed = self.perturbation.draw(self.generator)
        return (member if perturb else None), op_index, op_seed

    def _forward(self, i: int, x: Tensor, device: torch.device) -> Tensor:
        x = x.to(device, non_blocking=True)
        if self.autocast_dtype is None:
            output = self.models[i](x)
        else:
            with torch.autocast(device.type, dtype=self.autocast_dtype):
                output = self.models[i](x)
        return extract_logits(output, self.logits_from[i], member=i)

    def _captured(self, device: torch.device, cut: Callable[[int, Tensor], Tensor]) -> dict[str, list[Tensor]]:
        """The hooked outputs of this forward, checked against the shapes the parts were built for.

        Made contiguous: the terms flatten them, and a compiled step math is several times slower
        on ``channels_last`` inputs than on the same values laid out contiguously.
        """
        captured = {}
        for need in self.needs:
            values = self.capture[need].take(need)
            captured[need] = [cut(i, v).to(device).contiguous() for i, v in enumerate(values)]
        check.check_shapes(captured, self.shapes, self.fixed_shapes)
        return captured

    def _probe(self, example_input: Tensor) -> dict[str, list[tuple[int, ...]]]:
        modes = [m.training for m in self.models]
        try:
            with torch.no_grad():
                for i, model in enumerate(self.models):
                    model.eval()
                    self._forward(i, example_input, self.devices[i])
            return {need: [tuple(v.shape[1:]) for v in self.capture[need].take(need)] for need in self.needs}
        finally:
            for model, mode in zip(self.models, modes):
                model.train(mode)
            for capture in self.capture.values():
                capture.clear()

    def _build(self, shapes: dict[str, list[tuple[int, ...]]]) -> None:
        """Create the terms' learnable parts and hand each to the optimizer of the member it belongs to."""
        check.check_no_scheduler_yet(self.optimizers, self.terms, shapes)
        for term in self.terms:
            if term.needs:
                term.build({need: shapes[need] for need in term.needs})
        self.terms.to(self.device)
        # what must keep its shape from now on: the inputs of terms that hold learnable parts
        self.fixed_shapes = {need for t in self.terms if any(True for _ in t.parameters()) for need in t.needs}
        share_parameters(self.terms, self.process_group)  # identical on every rank, gradients averaged
        owned = [[p for term in self.terms for p in term.member_parameters(i)] for i in range(len(self.models))]
        check.check_owners(self.optimizers, owned)
        for optimizer, params in zip(self.optimizers, owned):
            if params:
                # the part is trained by this member's loss, so this member's optimizer steps it
                optimizer.add_param_group({"params": params})
        self.shapes = shapes

    @property
    def adapters(self) -> nn.ModuleDict:
        """The ``"feature"`` term's adapters (``"i_j"``: student ``i`` to teacher ``j``)."""
        for term in self.terms:
            if term.name == "feature":
                return term.adapters
        return nn.ModuleDict()

    # -- statistics ---------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, Any]:
        """Counters since construction (reading them syncs with the device).

        ``steps``; ``teacher_count`` (per member: steps as teacher, fractional per sample);
        ``switches`` (steps at which the batch's teacher changed); ``nonfinite_count``;
        ``perturbed_count`` and ``perturbed_wins`` (steps at which the perturbed member won).
        """
        return self.counters.summary()

    # -- torch conventions --------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=set_to_none)

    def train(self, mode: bool = True) -> "CompetitiveGroup":
        for model in self.models:
            model.train(mode)
        self.terms.train(mode)
        return self

    def eval(self) -> "CompetitiveGroup":
        return self.train(False)

    def state_dict(self) -> dict[str, Any]:
        """Members, optimizers, the terms' parts (adapters, heads), counters and the generator."""
        return {
            "models": [m.state_dict() for m in self.models],
            "optimizers": [None if o is None else o.state_dict() for o in self.optimizers],
            "shapes": self.shapes,
            "terms": self.terms.state_dict(),
            "counters": self.counters.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check.check_state_dict(state_dict, len(self.models))
        if self.shapes is None and state_dict["shapes"] is not None:
            self._build({k: [tuple(s) for s in v] for k, v in state_dict["shapes"].items()})  # parts exist first
        for model, state in zip(self.models, state_dict["models"]):
            model.load_state_dict(state)
        self.terms.load_state_dict(state_dict["terms"])
        for optimizer, state in zip(self.optimizers, state_dict["optimizers"]):
            if optimizer is not None:
                optimizer.load_state_dict(state)
        self.counters.load_state_dict(state_dict["counters"])
        self.generator.set_state(state_dict["generator"])

    def close(self) -> None:
        """Remove the hooks from the members."""
        for capture in self.capture.values():
            capture.remove()

    def __enter__(self) -> "CompetitiveGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Cut:
    """Each member's graph cut at its outputs (logits, hooked features and embeddings).

    The step math runs on detached leaves that stand for those outputs, so one backward of the
    summed losses fills the leaves' ``.grad``; :meth:`backward` then carries them through member
    ``i``'s own graph. By the chain rule every parameter gets the gradient of the summed losses.
    """

    def __init__(self, n: int):
        self.pairs: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(n)]

    def __call__(self, i: int, output: Tensor) -> Tensor:
        if not output.requires_grad:
            return output
        leaf = output.detach().requires_grad_()
        self.pairs[i].append((output, leaf))
        return leaf

    def backward(self, i: int) -> None:
        """Member ``i``'s backward from its outputs; its graph is freed."""
        pairs = [(output, leaf.grad) for output, leaf in self.pairs[i] if leaf.grad is not None]
        self.pairs[i] = []
        if pairs:
            outputs, grads = zip(*pairs)
            torch.autograd.backward(outputs, grads)


def _no_cut(i: int, output: Tensor) -> Tensor:
    return output


def _member_targets(y: Tensor, y_p: Tensor, perturbed: int, n: int, num_classes: int) -> Tensor:
    """Per-member targets: the perturbed member's own labels beside everyone else's ``y``."""
    if y_p.dim() == 1:  # new class indices (e.g. a permuted batch)
        targets = y.expand(n, -1).clone()
        targets[perturbed] = y_p
        return targets
    # mixing: member `perturbed` learns from soft labels, the rest from y
    targets = torch.nn.functional.one_hot(y, num_classes).float().expand(n, -1, -1).clone()
    targets[perturbed] = y_p.to(torch.float32)
    return targets
