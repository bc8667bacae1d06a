"""Argument checks for :class:`~competitive.CompetitiveGroup`: each names the argument, shows the
bad value and says what is allowed; per-member lists report every offender at once."""

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .selection import GRANULARITIES, RULES


def check_members(models: Sequence[Any], optimizers: Sequence[Any], feature_hooks: Any) -> None:
    if not isinstance(models, (list, tuple)) or len(models) < 2:
        count = len(models) if isinstance(models, (list, tuple)) else type(models).__name__
        raise ValueError(f"Invalid models ({count}): a group needs a list of at least 2 nn.Module members.")
    if not isinstance(optimizers, (list, tuple)) or len(optimizers) != len(models):
        count = len(optimizers) if isinstance(optimizers, (list, tuple)) else type(optimizers).__name__
        raise ValueError(f"Invalid optimizers ({count}): please provide one optimizer per model ({len(models)}).")
    if feature_hooks is not None and (
        not isinstance(feature_hooks, (list, tuple)) or len(feature_hooks) != len(models)
    ):
        count = len(feature_hooks) if isinstance(feature_hooks, (list, tuple)) else repr(feature_hooks)
        raise ValueError(
            f"Invalid feature_hooks ({count}): please provide one entry per model ({len(models)}): "
            "a submodule name, a module or None; or feature_hooks=None."
        )
    errors = [
        f"models[{i}] is a {type(m).__name__}, not an nn.Module"
        for i, m in enumerate(models)
        if not isinstance(m, nn.Module)
    ]
    errors += [
        f"optimizers[{i}] is a {type(o).__name__}, not a torch.optim.Optimizer"
        for i, o in enumerate(optimizers)
        if not isinstance(o, torch.optim.Optimizer)
    ]
    if errors:
        raise TypeError("; ".join(errors) + ".")
    empty = [i for i, m in enumerate(models) if next(iter(m.parameters()), None) is None]
    if empty:
        raise ValueError(f"Invalid models: models{empty} have no parameters; every member must be trainable.")
    errors = []
    for i, m in enumerate(models):
        for j in range(i):
            if models[j] is m:
                errors.append(f"models[{j}] and models[{i}] are the same module")
    if errors:
        raise ValueError("Invalid models: " + "; ".join(errors) + ". Please give each slot its own network.")
    owner: dict[int, int] = {}
    for i, m in enumerate(models):
        for p in m.parameters():
            if id(p) in owner and owner[id(p)] != i:
                errors.append(f"models[{owner[id(p)]}] and models[{i}] share a parameter of shape {list(p.shape)}")
                break
            owner[id(p)] = i
    if errors:
        raise ValueError("Invalid models: " + "; ".join(errors) + ". Members must not share parameters.")
    for i, (m, opt) in enumerate(zip(models, optimizers)):
        held = {id(p) for group in opt.param_groups for p in group["params"]}
        missing = sum(1 for p in m.parameters() if p.requires_grad and id(p) not in held)
        if missing:
            errors.append(f"optimizers[{i}] does not hold {missing} trainable parameter(s) of models[{i}]")
        foreign = {
            owner[id(p)] for group in opt.param_groups for p in group["params"] if id(p) in owner and owner[id(p)] != i
        }
        if foreign:
            errors.append(f"optimizers[{i}] holds parameters of models{sorted(foreign)}")
    if errors:
        raise ValueError(
            "Invalid optimizers: " + "; ".join(errors) + ". Build optimizers[i] from models[i].parameters()."
        )


def check_settings(
    *, rule: str, granularity: str, alpha: float, beta: float, temperature: float, perturb_prob: float
) -> None:
    if rule not in RULES:
        raise ValueError(f"Invalid rule {rule!r}. Please provide one of {RULES}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"Invalid granularity {granularity!r}. Please provide one of {GRANULARITIES}.")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"Invalid {name} value {value!r} provided. Please provide a finite value >= 0.")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"Invalid temperature value {temperature!r} provided. Please provide a finite value > 0.")
    if not isinstance(perturb_prob, (int, float)) or not 0 <= perturb_prob <= 1:
        raise ValueError(
            f"Invalid perturb_prob value {perturb_prob!r} provided. Please provide a value in [0,1] range."
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
    if not x.is_floating_point():
        raise TypeError(
            f"Invalid batch: inputs have dtype {x.dtype}; members expect floating point inputs "
            "(for uint8 images, convert with x.float() / 255 and normalize)."
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(
            f"Invalid batch: targets have dtype {y.dtype}; please provide class indices as an integer "
            "tensor of shape [B] (soft labels come from the perturbation pool, not from the batch)."
        )
    if y.shape != (x.shape[0],):
        raise ValueError(
            f"Invalid batch: targets of shape {list(y.shape)} for {x.shape[0]} inputs; expected [{x.shape[0]}]."
        )
    if x.device not in devices:
        raise RuntimeError(
            f"Invalid batch: inputs are on {x.device} but the members are on {sorted(map(str, set(devices)))}. "
            "Move the batch to the members' device first, e.g. x.to(device)."
        )
    return x, y


def check_logits(logits: Sequence[Any], batch_size: int) -> int:
    shapes = [tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__ for z in logits]
    bad = [
        f"models[{i}] returned {s}"
        for i, s in enumerate(shapes)
        if not isinstance(s, tuple) or len(s) != 2 or s[0] != batch_size
    ]
    if bad:
        raise ValueError(
            f"Invalid model outputs: {'; '.join(bad)}; each member must return logits of shape [{batch_size}, C]."
        )
    classes = [s[1] for s in shapes]
    if len(set(classes)) > 1:
        raise ValueError(
            f"Members disagree on the number of classes: {classes} (models[i] -> C). "
            "All must predict the same C classes."
        )
    return classes[0]


def check_targets(y: Tensor, num_classes: int) -> None:
    in_range = ((y >= 0) & (y < num_classes)).all()
    if y.device.type == "cpu":
        if not in_range:
            raise ValueError(
                f"Invalid targets: class indices must lie in [0, {num_classes}); got values in "
                f"[{int(y.min())}, {int(y.max())}]."
            )
    else:
        # a device-side assert: checked without waiting for the GPU
        torch._assert_async(in_range, f"targets must lie in [0, {num_classes})")
