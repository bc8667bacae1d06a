"""What a CUDA graph of the step needs from the group (:mod:`competitive.graphs`): the options it
refuses (:func:`check_graphable`), learning rates on the device (:class:`LearningRates`), where a step
synchronizes with the host (:func:`sync_watch`), and the generator an operation draws from."""

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor


def check_graphable(
    cuda_graph: Any, optimizers: Sequence[Any], process_group: Any, skip_nonfinite: Any, forward: Any, loss_from: Any
) -> bool:
    """Whether the group captures its step; refuses, naming the option, what a CUDA graph cannot hold (the
    arguments are the group's of the same names)."""
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"Invalid cuda_graph value {cuda_graph!r} provided. Please provide True or False.")
    if not cuda_graph:
        return False
    why = {
        "process_group": "the ranks' collectives run eagerly under DDP",
        "skip_nonfinite": "skipping a member's update reads its loss on the host",
        "forward": "a forward= call takes inputs of any structure, and the graph copies tensors",
        "loss_from": "a member's own loss takes inputs of any structure, and the graph copies tensors",
    }
    options = dict(process_group=process_group, skip_nonfinite=skip_nonfinite, forward=forward, loss_from=loss_from)
    given = [name for name in why if options[name] is not None and options[name] is not False]
    if given:
        raise ValueError(
            f"cuda_graph=True cannot be combined with {given[0]}={options[given[0]]!r}: {why[given[0]]}. "
            f"Leave out {given[0]}, or use cuda_graph=False."
        )
    bad = [
        f"optimizers[{i}] ({type(o).__name__})"
        for i, o in enumerate(optimizers)
        if o is not None and not all(g.get("capturable") or g.get("fused") for g in o.param_groups)
    ]
    if bad:
        raise ValueError(
            f"cuda_graph=True captures every optimizer's step, and {', '.join(bad)} cannot be captured with a "
            "learning rate a scheduler can change: build Adam/AdamW (and others that offer it) with "
            "capturable=True, SGD with fused=True."
        )
    if not torch.cuda.is_available():
        raise RuntimeError(
            "cuda_graph=True captures the step in a CUDA graph, which needs a CUDA GPU, and "
            "torch.cuda.is_available() is False here. Use cuda_graph=False on this machine."
        )
    return True


class LearningRates:
    """The optimizers' learning rates as one-element tensors on the members' device, which a captured
    optimizer step reads at each replay: ``torch.optim.lr_scheduler`` fills such a tensor in place, and
    a float assigned to ``param_group["lr"]`` later is copied into it. Every other hyperparameter is
    held by the graph, so a change to one is refused (:meth:`check`)."""

    def __init__(self, optimizers: Sequence[Any]):
        self.optimizers = optimizers
        self.tensors: dict[tuple[int, int], Tensor] = {}  # (optimizer, param group): its learning rate
        self.frozen: list[list[dict[str, Any]]] | None = None  # the other hyperparameters at the first capture

    def capture(self, device: torch.device) -> None:
        """At the first capture: hold the other hyperparameters, make the learning rates tensors."""
        if self.frozen is None:
            self.frozen = self.hyperparameters()
        self.install(device)

    def check(self, device: torch.device) -> None:
        """Before a step: nothing but the learning rates changed since capture; they are the tensors."""
        if self.frozen is None:
            return
        now = self.hyperparameters()
        for i, (before, after) in enumerate(zip(self.frozen, now)):
            for g, (a, b) in enumerate(zip(before, after)):
                changed = [f"{k!r} from {a[k]!r} to {b.get(k)!r}" for k in a if b.get(k) != a[k]]
                if changed or len(before) != len(after):
                    raise ValueError(
                        f"optimizers[{i}].param_groups[{g}]: {', '.join(changed) or 'the groups'} changed after "
                        "the step was captured in a CUDA graph, which holds them fixed; only 'lr' may change. "
                        "Keep them fixed (e.g. OneCycleLR(cycle_momentum=False)), or use cuda_graph=False."
                    )
        self.install(device)

    def install(self, device: torch.device) -> None:
        for i, optimizer in enumerate(self.optimizers):
            for g, param_group in enumerate(optimizer.param_groups if optimizer is not None else []):
                lr, tensor = param_group["lr"], self.tensors.get((i, g))
                if tensor is None:  # a tensor on the device is kept as it is (a scheduler may hold it)
                    on = isinstance(lr, Tensor) and lr.device == device and lr.dtype == torch.float32
                    tensor = lr if on else torch.tensor(float(lr), dtype=torch.float32, device=device)
                    self.tensors[(i, g)] = tensor
                elif lr is not tensor:
                    tensor.copy_(lr) if isinstance(lr, Tensor) else tensor.fill_(float(lr))
                param_group["lr"] = tensor

    def hyperparameters(self) -> list[list[dict[str, Any]]]:
        return [[_fixed(g) for g in (o.param_groups if o is not None else [])] for o in self.optimizers]


def _fixed(param_group: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters a captured optimizer step holds: all but the parameters and learning rates."""
    skip = ("params", "lr", "initial_lr")
    return {k: v for k, v in param_group.items() if k not in skip and not isinstance(v, Tensor)}


def default_generator(device: torch.device) -> torch.Generator:
    """The generator an operation draws from on ``device`` when nothing seeds it."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


@contextmanager
def sync_watch(active: bool) -> Iterator[list[str]]:
    """Where the enclosed code synchronizes a CUDA device with the host (file:line of each), via
    ``torch.cuda.set_sync_debug_mode("warn")``; other warnings pass through."""
    found: list[str] = []
    if not active:
        yield found
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for w in caught:
        if "synchronizing" in str(w.message):
            found.append(f"{w.filename}:{w.lineno}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
