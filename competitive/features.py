"""What the members give each step, and its checks: where the logits are in a member's output,
forward hooks that capture feature maps and embeddings (which must keep the shapes the terms' parts
were built for), the batch, the logits and the targets. The adapters that bridge feature maps of
different shapes are the terms' (:mod:`competitive.terms.adapters`)."""

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

HookSpec = str | nn.Module | None


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel keeps the user's model in .module, torch.compile in ._orig_mod
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def resolve_hooks(
    models: Sequence[nn.Module], feature_hooks: Sequence[HookSpec], argument: str = "feature_hooks"
) -> list[nn.Module | None]:
    """The module named by each member's hook spec; every offender reported at once."""
    modules, errors = [], []
    for i, (model, spec) in enumerate(zip(models, feature_hooks)):
        if spec is None or isinstance(spec, nn.Module):
            if isinstance(spec, nn.Module) and not any(spec is m for m in model.modules()):
                errors.append(f"{argument}[{i}] is a module that is not part of models[{i}]")
            modules.append(spec)
        elif isinstance(spec, str):
            try:
                modules.append(_unwrap(model).get_submodule(spec))
            except AttributeError:
                names = [n for n, _ in _unwrap(model).named_modules() if n][:12]
                errors.append(f"{argument}[{i}]={spec!r} names no submodule of models[{i}] (some names: {names})")
                modules.append(None)
        else:
            errors.append(f"{argument}[{i}] has type {type(spec).__name__}; expected str, nn.Module or None")
            modules.append(None)
    if errors:
        raise ValueError(f"Invalid {argument}: " + "; ".join(errors) + ".")
    if any(m is None for m in modules) and not all(m is None for m in modules):
        missing = [i for i, m in enumerate(modules) if m is None]
        raise ValueError(
            f"Invalid {argument}: members {missing} have no hook. Give every member a hook, or pass {argument}=None."
        )
    return modules


class FeatureCapture:
    """Forward hooks that keep each member's latest hooked output; ``remove()`` takes them off.

    With ``linear_input=True`` (embeddings), a hooked ``nn.Linear`` gives its *input* (the pooled
    features a classifier reads) and any other module its output, flattened to ``[B, D]``.
    """

    def __init__(self, modules: Sequence[nn.Module | None], *, linear_input: bool = False):
        self.modules = list(modules)
        self.linear_input = linear_input
        self.values: list[Tensor | None] = [None] * len(modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules) if m is not None]
        self.enabled = bool(self.handles)

    def _hook(self, i: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if self.linear_input and isinstance(module, nn.Linear):
                value = inputs[0]
            else:
                value = output[0] if isinstance(output, (tuple, list)) else output
            if self.linear_input and isinstance(value, Tensor):
                value = value.flatten(1)
            self.values[i] = value

        return hook

    def static_shapes(self) -> list[tuple[int, ...]] | None:
        """Shapes known without a forward: every hook on an ``nn.Linear`` read at its input."""
        if self.linear_input and self.enabled and all(isinstance(m, nn.Linear) for m in self.modules):
            return [(m.in_features,) for m in self.modules if isinstance(m, nn.Linear)]
        return None

    def take(self, argument: str) -> list[Tensor]:
        """This forward's values (then forgotten); a hook that did not fire is an error."""
        values, self.values = self.values, [None] * len(self.values)
        missing = [i for i, v in enumerate(values) if not isinstance(v, Tensor)]
        if missing:
            raise RuntimeError(
                f"{argument} of members {missing} did not fire (or returned no tensor) in this forward; hook a "
                "module that runs in every forward."
            )
        return cast(list[Tensor], values)

    def clear(self) -> None:
        self.values = [None] * len(self.values)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def check_shapes(captured: dict[str, list[Tensor]], shapes: dict[str, list[tuple[int, ...]]], fixed: set[str]) -> None:
    """The hooked outputs in ``fixed`` have the shapes the terms' parts were built for."""
    for need, values in captured.items():
        if need not in fixed:
            continue
        now = [tuple(v.shape[1:]) for v in values]
        changed = [f"models[{i}]: {list(a)} -> {list(b)}" for i, (a, b) in enumerate(zip(shapes[need], now)) if a != b]
        if changed:
            raise ValueError(
                f"The {need} changed shape since the group built its adapters / heads for them ({'; '.join(changed)}; "
                "shapes without the batch dim). Keep the input resolution fixed, or build a new group for it."
            )


LogitsSpec = str | int | Callable[[Any], Tensor] | None


def extract_logits(output: Any, spec: LogitsSpec, *, member: int) -> Tensor:
    """The logits in a member's output: ``spec`` is a key / attribute, a tuple index or a callable;
    None takes a tensor as it is, or the ``.logits`` of a (HuggingFace-style) output object."""
    # what is found is checked by check_logits, naming the member, if it is not a tensor [B, C]
    if callable(spec):
        return spec(output)
    if spec is None:
        if isinstance(output, Tensor):
            return output
        spec = "logits"
    if isinstance(spec, int) and isinstance(output, (tuple, list)) and -len(output) <= spec < len(output):
        return cast(Tensor, output[spec])
    if isinstance(spec, str):
        if isinstance(output, dict) and spec in output:
            return cast(Tensor, output[spec])
        if hasattr(output, spec):
            return cast(Tensor, getattr(output, spec))
    raise ValueError(
        f"models[{member}] returned a {type(output).__name__}, and logits_from={spec!r} does not find logits in it. "
        "Pass logits_from: an attribute or key (e.g. 'logits'), a tuple index (e.g. 0), or a callable "
        "output -> logits; one for all members or a list with one per member."
    )


def check_batch(batch: Any, devices: Sequence[torch.device]) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not all(isinstance(t, Tensor) for t in batch):
        shown = (
            type(batch).__name__
            if not isinstance(batch, (tuple, list))
            else f"{type(batch).__name__} of {[type(t).__name__ for t in batch]}"
        )
        raise TypeError(f"Invalid batch ({shown}): please provide a pair of tensors (inputs, targets).")
    x, y = batch
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(
            f"Invalid batch: inputs of shape {list(x.shape)} hold no samples; the batch must not be empty."
        )
    if x.dtype in (torch.uint8, torch.bool) or x.is_complex():  # token ids (int64, int32) are the members' business
        raise TypeError(
            f"Invalid batch: inputs have dtype {x.dtype}; members expect floating point inputs "
            "(for uint8 images, convert with x.float() / 255 and normalize) or integer token ids (int64)."
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(
            f"Invalid batch: targets have dtype {y.dtype}; please provide class indices as an integer "
            "tensor of shape [B] (soft labels come from the perturbation pool, not from the batch)."
        )
    if y.dtype == torch.uint64:
        raise TypeError("Invalid batch: targets have dtype torch.uint64; please provide int64 class indices.")
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"Invalid batch: targets of shape {list(y.shape)} for {x.shape[0]} inputs; expected [{x.shape[0]}] "
            f"(one class per sample) or [{x.shape[0]}, d1, ..., dk] (one per position)."
        )
    if x.device not in devices:
        raise RuntimeError(
            f"Invalid batch: inputs are on {x.device} but the members are on {sorted(map(str, set(devices)))}. "
            "Move the batch to the members' device first, e.g. x.to(device)."
        )
    return x, y.long()  # int32 / int16 / uint8 class indices work like int64


def check_logits(logits: Sequence[Any], batch_size: int, members: Sequence[int], class_dim: int = 1) -> tuple[int, Any]:
    """Every member returned logits ``[B, C, d1..dk]`` (the class at ``class_dim``) with the same
    ``C >= 2`` and positions ``(d1, ..., dk)``; returns ``(C, positions)``."""
    bad, layouts = [], []
    for i, z in zip(members, logits):
        if not isinstance(z, Tensor) or z.dim() < 2 or z.shape[0] != batch_size:
            bad.append(f"models[{i}] returned {tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        elif not -z.dim() <= class_dim < z.dim() or class_dim % z.dim() == 0:
            bad.append(f"models[{i}] returned {list(z.shape)}, which has no class dimension {class_dim}")
        else:
            layouts.append(
                (i, z.shape[class_dim], tuple(s for d, s in enumerate(z.shape[1:], 1) if d != class_dim % z.dim()))
            )
    if bad:
        raise ValueError(
            f"Invalid model outputs: {'; '.join(bad)}; each member must return logits of shape [{batch_size}, C] or "
            f"[{batch_size}, C, d1, ..., dk] with the classes at class_dim={class_dim} (use logits_from to say where "
            "the logits are in a tuple, dict or output object)."
        )
    if len({layout[1:] for layout in layouts}) > 1:
        shown = "; ".join(f"models[{i}]: C={c}, positions {list(p)}" for i, c, p in layouts)
        raise ValueError(
            f"Members disagree on the number of classes or the positions: {shown}. All must predict the same (for "
            "language models: the same vocabulary; mapping between vocabularies is not supported)."
        )
    _, classes, positions = layouts[0]
    if classes < 2:
        raise ValueError(
            f"Invalid model outputs: logits with {classes} class at class_dim={class_dim}; a softmax over one class is "
            "always 1, so nothing would be learned. Members must predict C >= 2 classes."
        )
    return classes, positions


def shift(layout: tuple[int, Any], y: Tensor) -> tuple[tuple[int, Any], Tensor]:
    """``shift_targets``: the targets at positions ``1..T-1`` for the logits at ``0..T-2`` (Hugging Face's
    causal-LM convention); returns the layout and the targets of the shifted problem."""
    classes, positions = layout
    if not positions:
        raise ValueError(
            "shift_targets=True compares the logits at position t with the targets at t + 1, so the logits need "
            f"positions ([B, T, V] with class_dim=-1); these are [B, {classes}] with targets {list(y.shape)}."
        )
    if positions[0] < 2:
        raise ValueError(
            f"shift_targets=True needs sequences of length >= 2 (position t learns the target at t + 1); got "
            f"length {positions[0]}: targets {list(y.shape)}."
        )
    return (classes, (positions[0] - 1, *positions[1:])), y.narrow(1, 1, positions[0] - 1)


def check_targets(y: Tensor, layout: tuple[int, Any], ignore_index: int = -100) -> None:
    """Targets ``[B, d1..dk]`` match the logits' positions, lie in ``[0, C)`` or are ``ignore_index``, and
    some position is not ignored."""
    num_classes, positions = layout
    if tuple(y.shape[1:]) != tuple(positions):
        raise ValueError(
            f"Invalid targets of shape {list(y.shape)}: the logits without the class dimension are "
            f"{[y.shape[0], *positions]}; please provide targets of that shape."
        )
    if y.device.type != "cpu":  # device-side asserts: checked without waiting for the GPU
        valid = y != ignore_index
        in_range = ((y >= 0) & (y < num_classes) | ~valid).all()
        torch._assert_async(in_range, f"targets must lie in [0, {num_classes}) or be ignore_index={ignore_index}")
        torch._assert_async(valid.any(), f"every target of the batch is ignore_index={ignore_index}")
        return
    ids = y.numpy()  # on the CPU the host reads them where they are (NumPy: no tensor op per step)
    valid_ids = ids != ignore_index
    if not (((ids >= 0) & (ids < num_classes)) | ~valid_ids).all():
        bad = sorted({int(v) for v in ids[valid_ids & ((ids < 0) | (ids >= num_classes))]})[:8]
        raise ValueError(
            f"Invalid targets: class indices must lie in [0, {num_classes}) or be ignore_index={ignore_index}; "
            f"got {bad}."
        )
    if not valid_ids.any():
        raise ValueError(
            f"Invalid targets: every position of the batch is ignore_index={ignore_index}, so no member has anything "
            "to learn or to teach. Leave such batches out."
        )


def no_cut(i: int, output: Tensor) -> Tensor:
    return output


class Cut:
    """Each member's graph cut at its outputs (logits, hooked features and embeddings).

    The step math runs on detached leaves that stand for those outputs, so one backward of the
    summed losses fills the leaves' ``.grad``; :meth:`backward` then carries them through member
    ``i``'s own graph.
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


# the adapters moved to the terms that own them; importable from here as before
from .terms.adapters import FeatureAdapter, build_adapters  # noqa: E402, F401
