"""``CompetitiveGroup`` (paper §3): a composite of small owners that runs one step through them: the
pool draws, the members forward, the step math computes, the counters record, the members step."""

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor, nn

from . import _validation as check
from ._deprecated import Fixed, Moved, forward_deprecated
from .capture import check_graphable
from .chunked import AUTO_VALUES, chunking
from .chunked import chunked_losses as chunked
from .distributed import default_seed, global_mean
from .features import HookSpec, LogitsSpec
from .graphs import StepGraphs
from .losses import step_losses
from .members import Members
from .memory import keep_freed_memory
from .parts import GroupParts
from .perturbation import PerturbationPool
from .result import StepResult
from .tasks import Task, TaskLoss
from .terms import Term


class CompetitiveGroup:
    """Trains ``N >= 2`` networks on the same batches by competitive distillation.

    Each :meth:`step` forwards every member, picks the teacher (the lowest loss), adds every knowledge term to
    each student's loss, then backpropagates and steps each member; a term's settings live on it.

    Args:
        models (list of nn.Module): the members; logits ``[B, C]`` with targets ``[B]``, or per position
            ``[B, C, d1..dk]`` with targets ``[B, d1..dk]`` (same ``C >= 2`` and positions for all).
        optimizers (list of Optimizer or None): ``optimizers[i]`` steps ``models[i]``; None if frozen.
        feature_hooks, embedding_hooks (list, optional): per member, a submodule (or its name): the maps
            the ``"feature"`` / ``"adm"`` / ``"cwd"`` terms read; the input of an ``nn.Linear`` for ``"mcl"``.
        terms (list of str or Term, optional): the knowledge terms, by registered name or as instances holding
            their settings (``KL(0.5, temperature=4)``). Default: ``["kl"]``, plus ``"feature"`` with feature hooks.
        rule (str): ``"best"`` (paper, default), ``"better"``, ``"mutual"`` or ``"independent"``.
        granularity (str): one teacher per ``"batch"`` (paper, default), ``"sample"`` or ``"position"``.
        class_dim (int): the class dimension of the logits: 1 (``F.cross_entropy``), -1 for ``[B, ..., C]``.
        ignore_index (int): targets that count nowhere (CE, competition, terms, counters). Default: -100.
        shift_targets (bool): logits at position t learn the target at t + 1 (causal LMs). Default: False.
        chunk_rows (int, optional): positions per chunk of the step math (:mod:`competitive.chunked`); 0: never;
            None: chunk logits of more than 2**24 values per member (a vocabulary). Default: None.
        warmup_steps (int): ramp every term's weight from 0 over the first steps. Default: 150.
        fixed_teacher (int, optional): this member always teaches (``rule="best"``). Default: None.
        logits_from (optional): where the logits are in a member's output: a key or attribute (``"out"`` for
            torchvision's segmentation), a tuple index, a callable; or one per member. Default: it, or ``.logits``.
        perturbation (PerturbationPool, optional): with probability ``p`` a step perturbs one member's batch.
        seed (int, optional): seed of the draws. Default: ``torch.initial_seed()`` (rank 0's under DDP).
        compile (bool or dict): ``torch.compile(fullgraph=True)`` the step math; a dict: its options. Default: False.
        skip_nonfinite (bool): skip the update of a member whose loss is NaN or inf. Default: False.
        autocast_dtype (torch.dtype, optional): run forwards under ``torch.autocast``. Default: None.
        example_input (Tensor, optional): inputs forwarded once (eval mode) to build the terms' parts now.
        process_group (ProcessGroup, optional): ranks that agree on one teacher under DDP.
        keep_cpu_memory (bool): keep freed CPU memory (:func:`competitive.memory.keep_freed_memory`). Default: True.
        task_loss (str or callable): each member's objective and score: ``"ce"`` (default), ``"bce"``, ``"mse"``,
            ``"l1"``, or ``(output, target) -> loss per sample [B]`` (:mod:`competitive.tasks`).
        forward (callable, optional): ``(member, inputs, targets) -> output``; default ``member(inputs)``.
        loss_from (optional): the member's own loss in its output (a key, attribute or callable), per batch.
        cuda_graph (bool): capture the whole step in CUDA graphs and replay them (:mod:`competitive.graphs`).
        **deprecated: ``alpha``, ``temperature``, ``beta``, ``perturb_prob``: forwarded with a warning.

    Example:
        >>> nets = [nn.Linear(4, 3), nn.Linear(4, 3)]
        >>> group = CompetitiveGroup(nets, [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets])
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
        rule: str = "best", granularity: str = "batch",
        class_dim: int = 1, ignore_index: int = -100,
        shift_targets: bool = False, chunk_rows: int | None = None,
        warmup_steps: int = 150, fixed_teacher: int | None = None,
        logits_from: LogitsSpec | Sequence[LogitsSpec] = None,
        perturbation: PerturbationPool | None = None,
        seed: int | None = None, compile: bool | dict[str, Any] = False,
        skip_nonfinite: bool = False, autocast_dtype: torch.dtype | None = None,
        example_input: Tensor | None = None,
        process_group: "torch.distributed.ProcessGroup | None" = None, keep_cpu_memory: bool = True,
        task_loss: str | TaskLoss = "ce", forward: Callable[[nn.Module, Any, Any], Any] | None = None,
        loss_from: str | Callable[[Any], Tensor] | None = None, cuda_graph: bool = False,
        **deprecated: Any,
    ):
        n = check.check_members(models, optimizers, feature_hooks, embedding_hooks)  # every argument, before any hook
        layout: dict[str, Any] = dict(class_dim=class_dim, ignore_index=ignore_index, shift_targets=shift_targets)
        c = check.settings(rule, granularity, warmup_steps, fixed_teacher, seed, compile, keep_cpu_memory, n, layout)
        check.check_member_settings(None, False, chunk_rows=chunk_rows)
        graphed = check_graphable(cuda_graph, optimizers, process_group, skip_nonfinite, forward, loss_from)
        built = forward_deprecated(deprecated, perturbation, terms, (feature_hooks, embedding_hooks))
        self.members = Members(models, optimizers, feature_hooks, embedding_hooks, logits_from, autocast_dtype,
                               skip_nonfinite, **layout)
        self.seed, self.warmup_steps = (seed if seed is not None else default_seed(process_group)), warmup_steps
        self.parts = GroupParts(built, self.members, self.seed, process_group, example_input)
        self.perturbation, self.process_group, self.keep_cpu_memory = perturbation, process_group, keep_cpu_memory
        kw: dict[str, Any] = dict(rule=rule, granularity=granularity, fixed_teacher=fixed_teacher, class_dim=class_dim)
        kw.update(ignore_index=ignore_index, reduce_score=global_mean(process_group), shift_targets=shift_targets)
        self.loss_fn = partial(step_losses if c is None else torch.compile(step_losses, fullgraph=True, **c), **kw)
        self.chunk_rows, self.chunked_fn = chunk_rows, partial(chunked, **kw, chunk_rows=chunk_rows, compile=c)
        self.task = None if task_loss == "ce" and loss_from is None else Task(
            task_loss, loss_from, built, kw, compile=c, perturbation=perturbation, chunk_rows=chunk_rows)
        self.members.call, self.graphs = check.check_forward(forward), (StepGraphs(self) if graphed else None)

    def step(self, batch: tuple[Tensor, Tensor], *, scaler: torch.amp.GradScaler | None = None) -> StepResult:
        """One iteration (paper Eq. 5): the losses, then per member its backward from its outputs and its
        optimizer step, at once, so its graph is freed before the next member's; the gradients are
        those of one backward of the summed losses. ``scaler``: a ``GradScaler`` (AMP), optional."""
        if not torch.is_grad_enabled():
            raise RuntimeError(
                "step() was called with gradients disabled (inside torch.no_grad() or inference_mode()), so "
                "no member can learn. Call step() outside it; for validation use group.evaluate(batch)."
            )
        if self.graphs is not None:
            return self.graphs.step(batch, scaler)
        total, result, cut = self._run(batch, train=True, cut=True)
        self.members.backward_and_step(total, cut, result.nonfinite, scaler)
        return result

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, StepResult]:
        """``(total, result)``, leaving backward and stepping to the caller: ``total`` sums the members'
        losses (one backward gives each its own gradient). Under ``torch.no_grad()``: :meth:`evaluate`."""
        if not torch.is_grad_enabled():
            result = self.evaluate(batch)
            return result.loss.sum(), result
        return self._run(batch, train=True, cut=False)[:2]

    @torch.no_grad()
    def evaluate(self, batch: tuple[Tensor, Tensor]) -> StepResult:
        """The losses and the teacher of a batch, with no side effect on the group (no perturbation,
        no counter or generator moves, no gradient). Call ``group.eval()`` first for validation."""
        return self._run(batch, train=False, cut=False)[1]

    def _run(self, batch: tuple[Any, Any], *, train: bool, cut: bool) -> tuple[Tensor, StepResult, Any]:
        x, y = self.members.check_batch(batch) if self.task is None else self.task.check_batch(batch, self.devices)
        generator_state = self.parts.generator.get_state()
        try:
            return self._losses(x, y, train, cut)
        except BaseException:
            # a failed step leaves the group as it was: same draws next time, no stale captures
            self.parts.generator.set_state(generator_state)
            self.members.clear()
            raise

    def _losses(self, x: Tensor, y: Tensor, train: bool, cut: bool, draw: Any = None,
                ramp: Tensor | None = None) -> tuple[Tensor, StepResult, Any]:
        # draw, ramp: given by a CUDA graph's step (competitive.graphs): a ramp on the device keeps the host out
        device, host = self.members.device, ramp is None
        if self.parts.counters.last_teacher.device != device:  # the members moved (e.g. a trainer's .to())
            self.parts.to(device)
        if self.parts.shapes is None:  # no example_input: size the parts from this batch first
            self.parts.build(self.members.probe(x[:2]) if self.task is None else self.members.probe(x, y))
        pool = self.perturbation if train else None
        if train and host:
            self.members.watch.poll()
            if self.keep_cpu_memory and self.cpu_memory is None and device.type == "cpu":
                self.cpu_memory = keep_freed_memory()
        if draw is None and pool is not None:
            draw = pool.draw(self.parts.generator, len(self.members), x, y)
        inputs = self.members.forward(x, y, draw, pool, cut) if self.task is None else self.task.forward(
            self.members, x, y, cut)  # another task loss, or members that give their own: competitive.tasks
        big, rows, terms = inputs.logits[0].numel() > AUTO_VALUES, self.chunk_rows, self.terms
        chunks = self.task is None and rows != 0 and (rows or big) and chunking(inputs.logits, rows, terms)
        fn = self.task or (self.chunked_fn if chunks else self.loss_fn)
        out = fn(inputs.logits, inputs.targets, terms=terms, **inputs.captured)
        scale, loss = (self.ramp if train else 1.0) if ramp is None else ramp, out.ce
        for term in cast(Iterable[Term], self.parts.terms):  # a TermList holds Terms
            loss = loss + (scale * term.weight) * out.terms[term.name]
        # NaN or inf: x - x is 0 exactly for every finite x (two ops where isfinite dispatches five)
        nonfinite, total, perturbed = loss - loss != 0, loss.sum(), None if draw is None else draw.member
        if train:
            self.members.watch_losses(total, nonfinite, step=self.parts.counters.steps + 1, watch=host)
            _count(self.parts.counters, out.teacher, out.valid, nonfinite, perturbed, host)
        terms = {k: v.detach() for k, v in out.terms.items()}
        name, skipped = (None, None) if draw is None else (draw.name if perturbed is not None else None, draw.skipped)
        values = (out.ce.detach(), terms, loss.detach(), out.weights, nonfinite, perturbed, name, skipped, out.valid)
        return total, StepResult(out.teacher, *values), inputs.cut

    models = property(lambda self: self.members.models, doc="The members (a list of nn.Module).")
    optimizers = property(lambda self: self.members.optimizers, doc="``optimizers[i]`` steps ``models[i]``.")
    terms = property(lambda self: self.parts.terms, doc="The knowledge terms; ``terms['adm']`` by name.")
    counters = property(lambda self: self.parts.counters, doc="The counters (``parts.counters``).")
    generator = property(lambda self: self.parts.generator, doc="The CPU generator of the draws.")
    shapes = property(lambda self: self.parts.shapes, doc="The hooked outputs' shapes the parts were built for.")
    capture = property(lambda self: self.members.capture, doc="The hooks' captures by kind.")
    devices = property(lambda self: self.members.devices, doc="Each member's device.")
    device = property(lambda self: self.members.device, doc="Where the step math runs: the first member's.")
    steps = property(lambda self: self.parts.counters.steps, doc="Steps taken since construction (an int).")

    ramp = property(lambda self: min(1.0, self.steps / self.warmup_steps) if self.warmup_steps else 1.0,
                    doc="The factor on every term's weight at the next step (``warmup_steps``), a float.")
    adapters = property(lambda self: self.terms["feature"].adapters if "feature" in self.terms else nn.ModuleDict(),
                        doc="The feature term's adapters ``'i_j'`` (every term's parts: ``group.terms['adm']``).")

    stats = property(lambda self: self.parts.counters.summary(), doc="Counters as Python numbers (a device read).")

    rule, granularity, fixed_teacher = Fixed(), Fixed(), Fixed()  # fixed when built
    cpu_memory: str | None = None  # what keep_freed_memory() answered at the first CPU step
    alpha, beta, temperature = Moved("kl", "weight"), Moved("feature", "weight"), Moved("kl", "temperature")
    perturb_prob = Moved(None, "p")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.members.zero_grad(set_to_none)

    def train(self, mode: bool = True) -> "CompetitiveGroup":
        self.members.train(mode)
        self.parts.train(mode)
        return self

    def eval(self) -> "CompetitiveGroup":
        return self.train(False)

    def state_dict(self) -> dict[str, Any]:
        """Members, optimizers, the terms' parts (adapters, heads), counters and the generator."""
        return self.parts.group_state(with_members=True)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.parts.load_group_state(state_dict, with_members=True)  # builds the parts first where needed

    def close(self) -> None:
        self.members.close()  # the hooks come off the members

    __enter__ = lambda self: self  # noqa: E731
    __exit__ = lambda self, *exc: self.close()  # noqa: E731


def _count(counters: Any, teacher: Tensor, valid: Tensor | None, nonfinite: Tensor, perturbed: Any,
           host: bool = True) -> None:
    """One step into the counters, on the device, in a few ops: no host read (``host``: count it in ``steps``)."""
    if teacher.dim() == 0:  # one teacher per batch (-1: none)
        share, batch_teacher = teacher == counters.members, teacher
    else:  # per sample or position: the share of the valid ones each member taught
        valid = teacher >= 0 if valid is None else valid
        share = ((teacher.unsqueeze(-1) == counters.members) & valid.unsqueeze(-1)).flatten(0, -2).sum(0)
        share = share / valid.sum().clamp_min(1)
        batch_teacher = torch.where(share.sum() > 0, share.argmax(), -1)  # the batch's most frequent
    counters.teacher_count += share
    counters.switches += counters.switch_table.take(batch_teacher * (counters.n + 1) + counters.last_teacher)
    counters.last_teacher.copy_(batch_teacher)
    counters.nonfinite_count += nonfinite
    if perturbed is not None:  # an index, or a device tensor (a CUDA graph's perturbed step)
        counters.count_perturbed(perturbed, share)
    counters.steps += host
