"""The step math over chunks of positions, for logits too large to hold more than once (a language
model's vocabulary): :func:`chunked_losses`, the same losses and gradients as :func:`~competitive.step_losses`.

A first pass without gradient keeps per row only the log-sum-exp, the CE and each ``kl`` term's divergence
of every pair of members; the teacher and ``W`` follow from those rows. The backward writes each member's
gradient chunk by chunk from them and a second read of the logits: no ``[N, rows, classes]`` tensor exists
besides the logits, and the gradients take the logits' place. With ``compile``, the work on each chunk is
compiled on its own (``fullgraph=True``) and the loop over the chunks is not, as in torchtune's chunked losses.
"""

from __future__ import annotations  # torch 2.6's dynamo cannot build the nested softmax's annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .losses import KnowledgeTerm, StepLosses, StepOutputs, check_rule, contest, shifted_targets, term_weights, upcast
from .terms.kl import KL, divergence_gradient, pair_divergences

AUTO_VALUES = 2**24  # chunk_rows=None: a member's logits with more values than this are chunked
# chunk_rows=None: values per member and chunk, by the logits' device. On a CPU 2**19 (2 MB of float32, which
# stays in its caches); on a GPU 2**26 (256 MB of float32): a chunk's kernels must fill the device, and its
# launches (some tens per chunk) must not outnumber the members' own (``benchmarks/step.py --part lm``)
CHUNK_VALUES = {"cpu": 2**19, "cuda": 2**26}


def chunk_values(device: torch.device) -> int:
    """Values per member and chunk for ``chunk_rows=None`` on ``device`` (a GPU's for any accelerator)."""
    return CHUNK_VALUES.get(device.type, CHUNK_VALUES["cuda"] if device.type != "cpu" else CHUNK_VALUES["cpu"])


def chunking(logits: Sequence[Tensor], chunk_rows: int | None, terms: Sequence[Any]) -> bool:
    """Whether a step runs :func:`chunked_losses`: ``chunk_rows`` > 0, or None, more than ``AUTO_VALUES``
    values per member and no term that reads the logits (all but ``kl`` and the terms on hooked outputs)."""
    if chunk_rows == 0:
        return False
    whole = [t.name for t in terms if not isinstance(t, KL) and getattr(t, "reads_logits", True)]
    if chunk_rows is None:
        return logits[0].numel() > AUTO_VALUES and not whole
    if whole:
        raise ValueError(
            f"chunk_rows={chunk_rows} computes the step over chunks of positions, but the terms {whole} read every "
            "member's logits whole. Use 'kl' and terms on hooked outputs, or chunk_rows=0."
        )
    return True


class Plan(NamedTuple):
    """What the backward needs besides tensors: the layout, the chunks and each ``kl`` term's settings."""

    class_dim: int
    trim: int  # positions dropped at the end (shift_targets)
    rows: int  # positions per chunk
    kinds: tuple[tuple[float, str, float], ...]  # (temperature, divergence, beta) per kl term
    labels: bool  # targets are label rows [N, R, C]
    compile: tuple[tuple[str, Any], ...] | None = None  # torch.compile's options for the work on a chunk


def _view(z: Tensor, class_dim: int, trim: int) -> Tensor:
    """Logits as ``[B', P', C]`` (a view where the layout allows), rows in the order of the step math."""
    z = z.movedim(class_dim, -1)
    if trim:
        z = z.narrow(1, 0, z.shape[1] - trim)
    batch, classes = z.shape[0], z.shape[-1]
    z = z.reshape(batch, -1, classes)
    return z if z.shape[1] > 1 else z.reshape(1, batch, classes)  # [B, C]: the batch is the positions


def _chunks(shape: Sequence[int], rows: int) -> list[tuple[int, int, int]]:
    step = max(1, min(rows, shape[1]))
    return [(b, p, min(p + step, shape[1])) for b in range(shape[0]) for p in range(0, shape[1], step)]


def _softmax(z: Tensor, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """``u = z / tau``, its log-sum-exp ``[r]`` and ``softmax(u)`` ``[r, C]``, from one ``exp``."""
    u = z if tau == 1 else z / tau
    top = u.amax(dim=-1, keepdim=True)
    e = (u - top).exp_()
    total = e.sum(dim=-1, keepdim=True)
    return u, (top + total.log()).squeeze(-1), e.div_(total)


def _targets(targets: Tensor, n: int, dims: int, classes: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Targets as rows, ``[N, R]`` class indices (0 where ignored) or ``[N, R, C]`` label rows, and ``valid``."""
    if targets.is_floating_point():
        rows = targets.movedim(2, -1).reshape(n, -1, classes)
        return rows, rows.sum(dim=-1) > 0
    rows = targets.reshape(-1).expand(n, -1) if targets.dim() == dims - 1 else targets.reshape(n, -1)
    valid = rows != ignore_index
    return torch.where(valid, rows, 0), valid


def _first_pass(views: list[Tensor], y: Tensor, valid: Tensor, plan: Plan) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Without gradient: per row, the log-sum-exp of every member at temperature 1 and at each ``kl`` term's
    ``[(1 + K), N, R]``, the CE ``[N, R]`` (0 where ignored) and each term's pairs ``[2, N, N, R]``."""
    shape, stats = views[0].shape, _compiled(_chunk_stats, plan.compile)
    with torch.no_grad():
        chunks = [stats([v[b, p0:p1] for v in views], _chunk(y, shape, b, p0, p1, plan.labels), plan)
                  for b, p0, p1 in _chunks(shape, plan.rows)]
    lse, ce, *pairs = (torch.cat(parts, dim=-1) for parts in zip(*chunks))
    return lse, torch.where(valid, ce, 0.0), pairs


def _chunk_stats(views: list[Tensor], target: Tensor, plan: Plan) -> tuple[Tensor, ...]:
    """One chunk of :func:`_first_pass`: ``lse [1 + K, N, r]``, ``ce [N, r]`` and each term's pairs."""
    z = [upcast(v) for v in views]
    u1, lse1, p1 = zip(*(_softmax(zi, 1.0) for zi in z))
    if plan.labels:
        ce = [lse1[i] * target[i].sum(-1) - torch.linalg.vecdot(target[i], z[i]) for i in range(len(z))]
    else:
        ce = [lse1[i] - z[i].gather(-1, target[i].unsqueeze(-1)).squeeze(-1) for i in range(len(z))]
    lse, pairs = [torch.stack(lse1)], []
    for kind in plan.kinds:
        u, ls, q = (u1, lse1, p1) if kind[0] == 1 else zip(*(_softmax(zi, kind[0]) for zi in z))
        lse.append(torch.stack(ls))
        pairs.append(pair_divergences(list(u), list(ls), list(q), kind))
    return torch.stack(lse), torch.stack(ce), *pairs


_COMPILED: dict[tuple[Any, str], Any] = {}


def _compiled(fn: Any, options: tuple[tuple[str, Any], ...] | None) -> Any:
    """``fn`` compiled with ``torch.compile(fullgraph=True, **options)`` (once per options), or ``fn``."""
    if options is None:
        return fn
    key = (fn, repr(options))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, fullgraph=True, **dict(options))
    return _COMPILED[key]


def _chunk(t: Tensor, shape: Sequence[int], b: int, p0: int, p1: int, classes: bool = False) -> Tensor:
    """Rows ``(b, p0:p1)`` of ``t`` ``[..., R]`` (or ``[N, R, C]`` with ``classes``), its rows ``shape[:2]``."""
    if classes:
        return t.reshape(t.shape[0], shape[0], shape[1], t.shape[-1])[:, b, p0:p1]
    return t.reshape(*t.shape[:-1], shape[0], shape[1])[..., b, p0:p1]


class _Gradients(torch.autograd.Function):
    """Zeros ``[1 + K, N]`` (added to the CE and each ``kl`` term's values); the backward writes each
    member's logits gradient chunk by chunk, from the rows the first pass kept and the logits."""

    @staticmethod
    def forward(ctx: Any, plan: Plan, *tensors: Tensor) -> Tensor:  # noqa: D102
        ctx.plan, ctx.count = plan, len(tensors) - 5 - len(plan.kinds)
        ctx.save_for_backward(*tensors)
        return tensors[0].new_zeros(1 + len(plan.kinds), ctx.count, dtype=tensors[1].dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        plan, n = ctx.plan, ctx.count
        y, lse, scale, finite, coefficient, *rest = ctx.saved_tensors
        pairs, logits = rest[: len(plan.kinds)], rest[-n:]
        needed = ctx.needs_input_grad[-n:]
        # each chunk of every member's logits is read before it is written: the gradients take their place
        views = [_view(z.detach(), plan.class_dim, plan.trim) for z in logits]
        shape = views[0].shape
        step = _compiled(_chunk_gradients, plan.compile)
        for b, p0, p1 in _chunks(shape, plan.rows):
            at = [_chunk(t, shape, b, p0, p1) for t in (lse, scale, finite, coefficient, *pairs)]
            chunk, target = [v[b, p0:p1] for v in views], _chunk(y, shape, b, p0, p1, plan.labels)
            step(plan, chunk, tuple(needed), grad, target, *at[:4], at[4:])
        grads = [z.detach() if on else None for z, on in zip(logits, needed)]
        for g in (g.movedim(plan.class_dim, -1) for g in grads if g is not None and plan.trim):
            g.narrow(1, g.shape[1] - plan.trim, plan.trim).zero_()  # the positions with no target
        return (None, *([None] * (5 + len(pairs))), *grads)


def _chunk_gradients(
    plan: Plan, chunk: list[Tensor], needed: tuple[bool, ...], grad: Tensor, target: Tensor, lse: Tensor,
    scale: Tensor, finite: Tensor, coefficient: Tensor, pairs: list[Tensor],
) -> None:
    """One chunk of every member's logits gradient, written over that chunk of its logits (``chunk[i]``);
    the per-row tensors are the chunk's rows."""
    z = [upcast(v) for v in chunk]
    probs: dict[tuple[int, float], tuple[Tensor, Tensor]] = {}

    def softmax(i: int, k: int, tau: float) -> tuple[Tensor, Tensor]:  # (log p, p), p 0 on non-finite rows
        if (i, tau) not in probs:
            log_p = (z[i] if tau == 1 else z[i] / tau) - lse[k, i].unsqueeze(-1)
            probs[i, tau] = log_p, log_p.exp().masked_fill_(~finite[i].unsqueeze(-1), 0.0)
        return probs[i, tau]

    for i in range(len(z)):  # everything read of the logits, before any is written
        for k, tau in enumerate((1.0, *(kind[0] for kind in plan.kinds))):
            softmax(i, k, tau)
    for i, into in enumerate(chunk):
        if not needed[i]:
            continue
        p, a = probs[i, 1.0][1], grad[0, i] * scale[i]  # d(mean CE)/d(CE row)
        own = (a * target[i].sum(-1) if plan.labels else a).unsqueeze(-1)
        direct = into.dtype == p.dtype and not torch.compiler.is_compiling()
        g = torch.mul(p, own, out=into) if direct else p * own
        if plan.labels:
            g.addcmul_(target[i], a.unsqueeze(-1), value=-1)
        else:
            g.scatter_add_(-1, target[i].unsqueeze(-1), -a.unsqueeze(-1))
        for k, kind in enumerate(plan.kinds):
            c = grad[1 + k, i] * coefficient[i]  # [N, r]: W_ij, where j may teach, 1 / i's count
            divergence_gradient(g, i, k, kind, c, softmax, pairs[k][:, i], finite)
        if not direct:
            into.copy_(g)


def _plan(logits: Sequence[Tensor], targets: Tensor, class_dim: int, shift: bool, chunk_rows: int | None,
          kls: list[KL], ignore_index: int, compile: dict[str, Any] | None,
          ) -> tuple[Plan, tuple[int, ...], list[Tensor], Tensor, Tensor]:
    """The plan, the positions, the logits as ``[B', P', C]`` views, the target rows and ``valid``."""
    targets, trim = (shifted_targets(logits, targets, class_dim), 1) if shift else (targets, 0)
    positions = tuple(s for d, s in enumerate(logits[0].shape) if d not in (0, class_dim % logits[0].dim()))
    positions = (positions[0] - trim, *positions[1:]) if trim else positions
    views = [_view(z.detach(), class_dim, trim) for z in logits]
    classes = logits[0].shape[class_dim]
    rows = chunk_rows or max(1, chunk_values(logits[0].device) // classes)
    kinds = tuple((t.temperature, t.divergence, t.beta) for t in kls)
    y, valid = _targets(targets, len(logits), logits[0].dim(), classes, ignore_index)
    options = None if compile is None else tuple(sorted(compile.items()))
    return Plan(class_dim, trim, rows, kinds, targets.is_floating_point(), options), positions, views, y, valid


def chunked_losses(
    logits: Sequence[Tensor], targets: Tensor, *, terms: Sequence[KnowledgeTerm] = (),
    features: Sequence[Tensor] | None = None, embeddings: Sequence[Tensor] | None = None, rule: str = "best",
    granularity: str = "batch", reduce_score: Callable[[Tensor], Tensor] | None = None,
    fixed_teacher: int | None = None, class_dim: int = 1, ignore_index: int = -100, shift_targets: bool = False,
    chunk_rows: int | None = None, compile: dict[str, Any] | None = None,
) -> StepLosses:
    """:func:`~competitive.step_losses` over chunks of ``chunk_rows`` positions (None: :func:`chunk_values`,
    2**19 values per member and chunk on a CPU, 2**26 on a GPU): the same values and gradients. ``kl`` terms
    run chunk by chunk, terms on hooked outputs as in the whole step; a term that reads the logits is refused.
    ``compile``: ``torch.compile``'s options for the work on each chunk, which is compiled, not the loop over
    the chunks (as torchtune's chunked losses)."""
    check_rule(rule, granularity)
    chunking(logits, chunk_rows or 1, terms)  # refuses the terms that read the logits whole
    kls = [t for t in terms if isinstance(t, KL)]
    setup = (class_dim, shift_targets, chunk_rows, kls, ignore_index, compile)
    plan, positions, views, y, valid = _plan(logits, targets, *setup)
    lse, ce_rows, pairs = _first_pass(views, y, valid, plan)
    n, batch, how = len(logits), logits[0].shape[0], (rule, granularity, reduce_score, fixed_teacher, ignore_index)
    teaches_at, teacher, weights, has, ok, labels = contest(ce_rows, y, valid, features, embeddings, batch, *how)
    empty = ce_rows.new_zeros(n, ce_rows.shape[1], 0)  # what terms on hooked outputs read of the logits: nothing
    outputs = StepOutputs(empty.unbind(0), empty, labels, ok, features, embeddings, valid, teaches_at, positions)
    (per_row, per_sample), count = term_weights(weights, outputs), valid.sum(1, True, dtype=ce_rows.dtype).clamp_min(1)
    w = per_row.expand(ce_rows.shape[1], n, n).permute(1, 2, 0)  # [i, j, R]; the weight of a KL row:
    share = valid / count  # a row's share of its member's mean
    coefficient = w * teaches_at.unsqueeze(0) * share.unsqueeze(1)  # where j may teach, i's mean
    zero = _Gradients.apply(plan, y, lse, share, torch.isfinite(ce_rows), coefficient, *pairs, *logits)
    values = {t.name: t(outputs, per_sample) for t in terms if not isinstance(t, KL)}
    for k, (term, pair) in enumerate(zip(kls, pairs)):
        kl = torch.where(coefficient > 0, coefficient * pair[0], 0.0).sum(dim=(1, 2))
        values[term.name] = kl * (term.temperature**2 if term.divergence == "forward" else 1.0) + zero[1 + k]
    ce = ce_rows.sum(dim=1) / count.squeeze(1) + zero[0]
    if granularity == "position" and positions:  # in the layout of the targets: [B, d1..dk]
        teacher, weights, has = (t.view(batch, *positions, *t.shape[1:]) for t in (teacher, weights, has))
    return StepLosses(ce, {t.name: values[t.name] for t in terms}, teacher, weights, has)


def overwritten_logits(error: BaseException) -> RuntimeError | None:
    """What a member's failed backward means when it read logits whose gradients the step math over
    chunks wrote over them (autograd's "modified by an inplace operation"); None for another error."""
    if "modified by an inplace operation" not in str(error):
        return None
    return RuntimeError(
        "A member's backward reads its logits (e.g. a model that returns log_softmax), but the step math "
        "over chunks (chunk_rows, or None with a large vocabulary) wrote the logits' gradients over them. "
        "Pass chunk_rows=0 to the group, or return the logits before any such op."
    )
