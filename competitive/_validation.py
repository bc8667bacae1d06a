"""Argument checks for :class:`~competitive.CompetitiveGroup` at construction: each names the
argument, shows the bad value and says what is allowed; per-member lists report every offender at
once. The checks of each step (the batch, the members' outputs) live in :mod:`competitive.members`."""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .losses import check_rule


def check_members(
    models: Sequence[Any], optimizers: Sequence[Any], feature_hooks: Any, embedding_hooks: Any = None
) -> int:
    """The members, their optimizers and hooks, checked; returns ``N``."""
    if not isinstance(models, (list, tuple)) or len(models) < 2:
        count = len(models) if isinstance(models, (list, tuple)) else type(models).__name__
        raise ValueError(f"Invalid models ({count}): a group needs a list of at least 2 nn.Module members.")
    if not isinstance(optimizers, (list, tuple)) or len(optimizers) != len(models):
        count = len(optimizers) if isinstance(optimizers, (list, tuple)) else type(optimizers).__name__
        raise ValueError(f"Invalid optimizers ({count}): please provide one optimizer per model ({len(models)}).")
    for name, hooks in (("feature_hooks", feature_hooks), ("embedding_hooks", embedding_hooks)):
        if hooks is not None and (not isinstance(hooks, (list, tuple)) or len(hooks) != len(models)):
            count = len(hooks) if isinstance(hooks, (list, tuple)) else repr(hooks)
            raise ValueError(
                f"Invalid {name} ({count}): please provide one entry per model ({len(models)}): "
                f"a submodule name, a module or None; or {name}=None."
            )
    errors = [
        f"models[{i}] is a {type(m).__name__}, not an nn.Module"
        for i, m in enumerate(models)
        if not isinstance(m, nn.Module)
    ]
    errors += [
        f"optimizers[{i}] is a {type(o).__name__}, not a torch.optim.Optimizer (or None for a frozen member)"
        for i, o in enumerate(optimizers)
        if o is not None and not isinstance(o, torch.optim.Optimizer)
    ]
    if errors:
        raise TypeError("; ".join(errors) + ".")
    empty = [i for i, m in enumerate(models) if next(iter(m.parameters()), None) is None]
    if empty:
        raise ValueError(f"Invalid models: models{empty} have no parameters; every member must be trainable.")
    _check_ownership(models, optimizers)
    return len(models)


def _check_ownership(models: Sequence[nn.Module], optimizers: Sequence[Any]) -> None:
    """Each member its own module and parameters; each optimizer holds exactly its member's."""
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
    _check_optimizers(models, optimizers, owner)


def _check_optimizers(models: Sequence[nn.Module], optimizers: Sequence[Any], owner: dict[int, int]) -> None:
    errors = []
    for i, (m, opt) in enumerate(zip(models, optimizers)):
        if opt is None:
            if any(p.requires_grad for p in m.parameters()):
                errors.append(f"optimizers[{i}] is None but models[{i}] has trainable parameters")
            continue
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
            "Invalid optimizers: " + "; ".join(errors) + ". Build optimizers[i] from models[i].parameters() "
            "(None only for a member whose parameters are all frozen)."
        )


def real_scalar(value: Any) -> float | None:
    """A Python float from an int, float, numpy scalar or 0-d real tensor; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Tensor):
        if value.dim() == 0 and (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            return float(value.item())
        return None
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and value.dtype.kind in "iuf":
        return float(value)
    return None


def check_real(name: str, value: Any, *, positive: bool = False, owner: str = "") -> float:
    """``value`` as a finite Python float ``>= 0`` (``> 0`` with ``positive``), or a ValueError naming it."""
    real = real_scalar(value)
    if real is None or not math.isfinite(real) or real < 0 or (positive and real == 0):
        where = f" for the {owner!r} term" if owner else ""
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"Invalid {name} value {value!r} provided{where}. Please provide a finite value {bound}.")
    return real


def settings(
    rule: str,
    granularity: str,
    warmup_steps: Any,
    fixed_teacher: Any,
    seed: Any,
    compile: Any,
    keep: Any,
    n: int,
    layout: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The settings the group itself owns; returns the ``torch.compile`` options (None: eager)."""
    check_rule(rule, granularity)
    check_member_settings(None, False, keep_cpu_memory=keep, **(layout or {}))
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"Invalid warmup_steps value {warmup_steps!r} provided. Please provide an int >= 0.")
    if fixed_teacher is not None:
        if isinstance(fixed_teacher, bool) or not isinstance(fixed_teacher, int) or not 0 <= fixed_teacher < n:
            raise ValueError(
                f"Invalid fixed_teacher value {fixed_teacher!r} provided. Please provide a member index in [0, {n}) "
                "or None."
            )
        if rule != "best":
            raise ValueError(
                f"fixed_teacher={fixed_teacher} decides who teaches, so it needs rule='best'; got rule={rule!r}."
            )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise TypeError(f"Invalid seed value {seed!r} provided. Please provide an int >= 0 or None.")
    return check_compile(compile)


def check_member_settings(
    autocast_dtype: Any,
    skip_nonfinite: Any,
    *,
    keep_cpu_memory: Any = True,
    class_dim: Any = 1,
    ignore_index: Any = -100,
    shift_targets: Any = False,
    chunk_rows: Any = None,
) -> None:
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 0):
        raise ValueError(
            f"Invalid chunk_rows value {chunk_rows!r} provided. Please provide an int >= 0 (positions per chunk of "
            "the step math; 0: never chunk) or None (chunk logits of more than 2**24 values)."
        )
    for name, value in (("class_dim", class_dim), ("ignore_index", ignore_index)):
        if isinstance(value, bool) or not isinstance(value, int) or (name == "class_dim" and value == 0):
            allowed = "an int other than 0 (dim 0 is the batch): 1 as F.cross_entropy, -1 for [B, ..., C]"
            raise ValueError(
                f"Invalid {name} value {value!r} provided. Please provide "
                f"{allowed if name == 'class_dim' else 'an int'}."
            )
    bools = (("skip_nonfinite", skip_nonfinite), ("keep_cpu_memory", keep_cpu_memory), ("shift_targets", shift_targets))
    for name, value in bools:
        if not isinstance(value, bool):
            raise TypeError(f"Invalid {name} value {value!r} provided. Please provide True or False.")
    if autocast_dtype is not None and not (
        isinstance(autocast_dtype, torch.dtype) and autocast_dtype.is_floating_point
    ):
        raise TypeError(
            f"Invalid autocast_dtype value {autocast_dtype!r} provided. Please provide a floating torch.dtype "
            "(torch.bfloat16, torch.float16) or None."
        )


COMPILE_OPTIONS = ("backend", "mode", "options", "dynamic")


def check_compile(compile: Any) -> dict[str, Any] | None:
    """``compile``: a bool, or a dict of ``torch.compile`` keyword arguments; returns those (None: eager)."""
    if isinstance(compile, bool):
        return {} if compile else None
    if not isinstance(compile, Mapping) or not all(isinstance(k, str) for k in compile):
        raise TypeError(
            f"Invalid compile value {compile!r} provided. Please provide True, False or a dict of torch.compile "
            f"keyword arguments ({', '.join(COMPILE_OPTIONS)})."
        )
    unknown = sorted(set(compile) - set(COMPILE_OPTIONS))
    if unknown:
        raise ValueError(
            f"Invalid compile keys {unknown} provided. Please provide only {', '.join(COMPILE_OPTIONS)} "
            "(the step math always compiles with fullgraph=True)."
        )
    return dict(compile)


def check_forward(forward: Any) -> Any:
    """``forward``: None or a callable ``(member, inputs, targets) -> output``."""
    if forward is not None and not callable(forward):
        raise TypeError(f"Invalid forward {forward!r}: please provide a callable (member, inputs, targets) -> output.")
    return forward


def check_logits_from(spec: Any, n: int) -> list[Any]:
    """``logits_from``: one spec for all members, or a list of one per member."""
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec] * n
    if len(specs) != n:
        raise ValueError(f"Invalid logits_from ({len(specs)} entries): please provide one per model ({n}) or one.")
    bad = [
        f"logits_from[{i}]={s!r}"
        for i, s in enumerate(specs)
        if not (s is None or callable(s) or isinstance(s, (str, int))) or isinstance(s, bool)
    ]
    if bad:
        raise TypeError(
            f"Invalid {', '.join(bad)}: please provide an attribute or key (str), a tuple index (int), "
            "a callable output -> logits, or None."
        )
    return specs


def check_no_scheduler_yet(optimizers: Sequence[Any], terms: Any, shapes: Any) -> None:
    """Refuse to add parameter groups to an optimizer that an LR scheduler already wraps."""
    if not any(True for t in terms for p in t.parameters()) and not any(t.needs for t in terms):
        return
    wrapped = [i for i, o in enumerate(optimizers) if o is not None and any("initial_lr" in g for g in o.param_groups)]
    if wrapped:
        raise RuntimeError(
            f"optimizers{wrapped} already have an LR scheduler, but the group is only now creating the terms' "
            "adapters / heads (they join those optimizers and the scheduler would not cover them). Build the "
            "schedulers after the group, and pass example_input=<a batch of inputs> so the group creates them "
            "when it is built."
        )


def check_owners(optimizers: Sequence[Any], owned: Sequence[Sequence[Any]]) -> None:
    frozen = [i for i, (o, params) in enumerate(zip(optimizers, owned)) if o is None and params]
    if frozen:
        raise ValueError(
            f"Members {frozen} have no optimizer (None), but the terms give them learnable parts (adapters or "
            "heads) to train. Give them an optimizer, or choose terms without parts on their side."
        )


def check_state_dict(state_dict: Any, n: int) -> None:
    keys = {"models", "optimizers", "shapes", "terms", "counters", "generator"}
    if not isinstance(state_dict, dict) or not keys <= set(state_dict):
        missing = sorted(keys - set(state_dict)) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"Invalid state_dict: missing {missing}; expected a CompetitiveGroup.state_dict().")
    if len(state_dict["models"]) != n:
        raise ValueError(f"Invalid state_dict: it holds {len(state_dict['models'])} members; this group has {n}.")
