"""Stochastic perturbation (paper §3.2, Eq. 6): an aggressive operation applied to one member's
batch per step, so a perturbation that helps its member win is distilled into the others.

Randomness is kept apart from application, as in kornia's ``forward_parameters``: the pool draws
*whether* a step perturbs (its ``p``), *which* member, *which* operation and a seed from the group's
``torch.Generator``; ``perturb`` then runs deterministically from that seed on the batch's device."""

from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from ._validation import real_scalar
from .mixing import CutMix, MixUp  # noqa: F401  (importable from here)
from .operations import (  # noqa: F401  (importable from here)
    InUnitRange,
    Operation,
    carries_dense_targets,
    default_operations,
    draws_on,
    kind_of,
    perturb_dense,
    soft_labels,
)
from .warps import ResizedCrop  # noqa: F401

DEFAULT_P = 0.1  # the authors' code perturbs every tenth batch (``if i_batch % 10 == 0``)


class Draw(NamedTuple):
    """One step's draw: ``member`` sees ``operation`` (its index; ``name``) run from ``seed`` (None: the device's
    generator as it stands); ``member`` is None when nobody is perturbed; ``skipped``: why a drawn operation was not."""

    member: int | Tensor | None  # a one-element device tensor in a CUDA graph's capture
    operation: int
    seed: int | None
    name: str
    skipped: str | None = None


class PerturbationPool(nn.Module):
    """A pool of perturbations, one drawn per step (paper §3.2).

    Args:
        operations (sequence or dict, optional): kornia augmentation modules, or callables
            ``(x, y) -> (x', y')`` where ``y'`` is ``[B]`` class indices or ``[B, C]`` label rows
            that sum to 1. A dict names them. Default: :func:`default_operations` (mixup, cutmix,
            Gaussian noise, salt-and-pepper, elastic, thin-plate-spline, affine, resized crop with
            area scale (0.3, 0.7)).
        weights (sequence of float, optional): relative probability of each operation.
            Default: uniform.
        p (float, optional): probability that a step perturbs at all. Default: 0.1, as the authors' public
            code (every tenth batch); see README for 0.1 and 0.25 against no perturbation.

    Note:
        Inputs may be in any normalization: noise operations work in each image's own range
        (:class:`InUnitRange`) and nothing is clamped. Mixing operations (:class:`MixUp`, :class:`CutMix`,
        kornia's ``RandomMixUpV2`` / ``RandomCutMixV2``) need a batch of at least 2 and produce soft labels.

    Example:
        >>> pool = PerturbationPool()
        >>> x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
        >>> x2, y2 = pool.perturb(pool.names.index("mixup"), x, y, seed=0, num_classes=10)
        >>> y2.shape, bool(torch.allclose(y2.sum(dim=1), torch.ones(4)))
        (torch.Size([4, 10]), True)
    """

    def __init__(
        self,
        operations: Sequence[Operation] | dict[str, Operation] | None = None,
        weights: Sequence[float] | None = None,
        *,
        p: float | None = None,
    ):
        super().__init__()
        real = DEFAULT_P if p is None else real_scalar(p)
        if real is None or not 0 <= real <= 1:
            raise ValueError(f"Invalid p value {p!r} provided. Please provide a probability in [0, 1].")
        self.p, self.p_given = real, p is not None
        self.checked = False  # every operation tried once on the first batch (see check)
        default = operations is None
        named: dict[str, Operation] = dict(default_operations()) if operations is None else {}
        if isinstance(operations, dict):
            named = dict(operations)
        elif operations is not None:
            named = {f"{i}_{getattr(op, '__name__', type(op).__name__)}": op for i, op in enumerate(operations)}
        operations = named
        if not operations:
            raise ValueError("Invalid operations: the pool is empty. Please provide at least one operation.")
        bad = [f"{name!r} ({type(op).__name__})" for name, op in operations.items() if not callable(op)]
        if bad:
            raise TypeError(
                f"Invalid operations [{', '.join(bad)}]: each must be a kornia module or a callable (x, y) -> (x', y')."
            )
        self.names = list(operations)
        self.operations = list(operations.values())
        self.kinds = [kind_of(op) for op in self.operations]
        # modules live in a ModuleDict so .to() and state_dict() see them
        self.modules_ = nn.ModuleDict({n: op for n, op in operations.items() if isinstance(op, nn.Module)})
        # a plain CPU tensor, not a buffer: .to(device) must not move the draws onto the GPU
        self.weights = _checked_weights(weights, len(self.names))
        # with dense targets the default pool leaves out what cannot move them (thin-plate-spline)
        dense = [not default or carries_dense_targets(op) for op in self.operations]
        self.dense_weights = self.weights * torch.tensor(dense, dtype=torch.float64)

    def draw(self, generator: torch.Generator, members: int, x: Tensor, y: Tensor | None = None) -> Draw:
        """This step's :class:`Draw` from a CPU ``generator``: with probability ``p`` one of ``members``
        (uniformly) sees an operation (by ``weights``) with its own seed. The same four numbers are
        drawn whatever the outcome, so a run's later draws do not depend on ``p``'s earlier ones. With
        dense targets ``y`` (``[B, d1, ...]``) the default pool draws only operations that move them."""
        perturb = torch.rand((), generator=generator).item() < self.p
        member = int(torch.randint(members, (), generator=generator))
        weights = self.dense_weights if y is not None and y.dim() > 1 else self.weights
        index = int(torch.multinomial(weights, 1, generator=generator).item())
        seed = int(torch.randint(2**62, (), generator=generator).item())
        skipped = None
        if perturb and not self.can_apply(index, x):
            skipped, perturb = f"{self.names[index]!r} needs a batch of at least 2; got {x.shape[0]}", False
        return Draw(member if perturb else None, index, seed, self.names[index], skipped)

    def can_apply(self, index: int, x: Tensor) -> bool:
        """Whether operation ``index`` can run on ``x`` (mixing needs a batch of at least 2)."""
        return self.kinds[index] != "mix" or x.shape[0] >= 2

    def check(self, x: Tensor, y: Tensor, *, num_classes: int, ignore_index: int = -100) -> None:
        """Run every operation once on (a slice of) the batch, so that inputs an operation cannot
        handle are refused now, naming it, and not at a random later step. Draws nothing from any
        generator the caller sees."""
        self.checked = True
        weights = self.dense_weights if y.dim() > 1 else self.weights
        cannot = [
            n for n, op, w in zip(self.names, self.operations, weights) if w > 0 and not carries_dense_targets(op)
        ]
        if y.dim() > 1 and cannot:
            raise ValueError(
                f"Perturbations {cannot} cannot move dense targets of shape {list(y.shape)} with the image (kornia "
                "cannot warp masks with them). Leave them out of the pool, or give them weight 0."
            )
        images = [n for n, kind in zip(self.names, self.kinds) if kind != "pair"]
        if x.dim() != 4 and images:  # an (x, y) -> (x', y') callable takes any inputs (token_operations)
            raise ValueError(
                f"Perturbation {images[0]!r} needs an image batch [B, C, H, W]; got inputs of shape "
                f"{list(x.shape)}. Use token_operations() for token ids, or perturbation=None."
            )
        x, y = x[:2].detach(), y[:2]
        for index, name in enumerate(self.names):
            if not self.can_apply(index, x) or weights[index] == 0:
                continue
            try:
                self.perturb(index, x, y, seed=0, num_classes=num_classes, ignore_index=ignore_index)
            except Exception as error:  # kornia's own checks raise their BaseError
                if isinstance(error, (ValueError, TypeError)) and name in str(error):
                    raise
                raise ValueError(
                    f"Perturbation {name!r} cannot handle inputs of shape {list(x.shape)[1:]} (per sample): {error}. "
                    "Give the pool operations that suit these inputs, or perturbation=None."
                ) from error

    def extra_repr(self) -> str:
        return f"p={self.p}, operations={self.names}"

    def perturb(
        self, index: int, x: Tensor, y: Tensor, *, seed: int | None, num_classes: int, ignore_index: int = -100
    ) -> tuple[Tensor, Tensor]:
        """Apply operation ``index`` to the batch ``(x, y)``, deterministically from ``seed``.

        Returns ``(x', y')``: ``y'`` stays class indices ``[B]`` unless the operation mixes images,
        then it is ``[B, num_classes]`` with rows summing to 1. An operation of the ``(x, y) ->
        (x', y')`` kind may return new class indices ``[B]`` (they are used) or label rows. Dense
        targets ``[B, H, W]`` move with the image (:mod:`competitive.operations`): warped (``ignore_index``
        where ignored or brought in), or label rows ``[B, C, H, W]`` from mixing (zeros: ignored).
        """
        op, kind, name = self.operations[index], self.kinds[index], self.names[index]
        if x.dim() != 4 and kind != "pair":
            raise ValueError(
                f"Perturbation {name!r} needs an image batch [B, C, H, W]; got inputs of shape {list(x.shape)}."
            )
        if not self.can_apply(index, x):
            raise ValueError(f"Perturbation {name!r} mixes images and needs a batch of at least 2; got {x.shape[0]}.")
        if x.device.type != "cpu":
            draws_on(op, x)
        devices = [x.device] if x.device.type == "cuda" else []  # seed None: a CUDA graph seeds it before a replay
        with torch.random.fork_rng(devices=devices, device_type=x.device.type, enabled=seed is not None):
            torch.manual_seed(seed) if seed is not None else None
            try:
                if y.dim() > 1 and kind != "pair":  # dense targets move with the image
                    return _checked_dense(perturb_dense(op, kind, x, y, num_classes, ignore_index), x, y, name, kind)
                # an "image" operation is a module x -> x'; the others take (x, y)
                out = cast(nn.Module, op)(x) if kind == "image" else op(x, y)
            except TypeError as error:
                raise TypeError(f"Perturbation {name!r} could not be called: {error}. {_EXPECTED[kind]}") from error
        if y.dim() > 1:
            return _checked_dense(out, x, y, name, kind, num_classes, ignore_index)
        return _checked(out, x, y, kind, name, num_classes)


def _checked_weights(weights: Sequence[float] | None, count: int) -> Tensor:
    weights = [1.0] * count if weights is None else list(weights)
    finite = all(isinstance(w, (int, float)) and 0 <= w < float("inf") for w in weights)
    if len(weights) != count or not finite or sum(weights) <= 0:
        raise ValueError(
            f"Invalid weights {weights}: please provide {count} finite, non-negative "
            "numbers with a positive sum, one per operation."
        )
    return torch.tensor(weights, dtype=torch.float64)


def _checked(out: Any, x: Tensor, y: Tensor, kind: str, name: str, num_classes: int) -> tuple[Tensor, Tensor]:
    """An operation's output as ``(x', y')``, checked against the batch ``(x, y)`` it got."""
    if kind == "mix":
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"Perturbation {name!r} returned {type(out).__name__}. {_EXPECTED[kind]}")
        images, params = out
        return images, soft_labels(y, params.to(x.device), num_classes)
    if kind == "image":
        if not isinstance(out, Tensor):
            raise TypeError(f"Perturbation {name!r} returned {type(out).__name__}. {_EXPECTED[kind]}")
        return out, y
    if not isinstance(out, (tuple, list)) or len(out) != 2 or not all(isinstance(t, Tensor) for t in out):
        raise TypeError(f"Perturbation {name!r} returned {type(out).__name__}. {_EXPECTED[kind]}")
    images, y_out = out
    if images.shape != x.shape or y_out.shape not in (y.shape, (y.shape[0], num_classes)):
        raise ValueError(
            f"Perturbation {name!r} returned inputs {list(images.shape)} and targets "
            f"{list(y_out.shape)}; expected inputs {list(x.shape)} and targets {list(y.shape)} "
            f"(class indices) or {[y.shape[0], num_classes]} (label rows)."
        )
    _check_labels(name, y_out, num_classes)
    return images, y_out


def _checked_dense(
    out: Any, x: Tensor, y: Tensor, name: str, kind: str, num_classes: int = 0, ignore: int = -100
) -> tuple[Tensor, Tensor]:
    """``(x', y')`` for dense targets: class indices shaped as ``y`` or label rows ``[B, C, d1, ...]``."""
    if not isinstance(out, (tuple, list)) or len(out) != 2 or not all(isinstance(t, Tensor) for t in out):
        raise TypeError(f"Perturbation {name!r} returned {type(out).__name__}. {_EXPECTED[kind]}")
    images, y_out = out
    rows = (y.shape[0], num_classes or -1, *y.shape[1:])
    if images.shape != x.shape or not (
        y_out.shape == y.shape or (y_out.dim() == y.dim() + 1 and y_out.is_floating_point())
    ):
        raise ValueError(
            f"Perturbation {name!r} returned inputs {list(images.shape)} and targets {list(y_out.shape)}; expected "
            f"inputs {list(x.shape)} and targets {list(y.shape)} (class indices) or {list(rows)} (label rows)."
        )
    if num_classes and y_out.shape == y.shape:
        ok = (((y_out >= 0) & (y_out < num_classes)) | (y_out == ignore)).all()
        _raise_unless(
            ok, f"Perturbation {name!r} returned class indices outside [0, {num_classes}) other than {ignore}."
        )
    elif num_classes:
        total = y_out.sum(dim=1)
        ok = (y_out >= 0).all() & (((total - 1).abs() <= 1e-3) | (total == 0)).all()
        _raise_unless(
            ok,
            f"Perturbation {name!r} returned label rows that are not distributions: every entry must be >= 0 and "
            "every row along dim 1 must sum to 1 (or to 0 where the position is ignored).",
        )
    return images, y_out


def _raise_unless(ok: Tensor, message: str) -> None:
    """A ValueError at once on the CPU; on a GPU a device-side assert, without waiting for it."""
    if ok.device.type == "cpu":
        if not ok:
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


_EXPECTED = {
    "mix": "A kornia mixing module must be built with data_keys=['input', 'class'] and return (images, params).",
    "image": "A kornia augmentation must take the image batch [B, C, H, W] and return the perturbed batch.",
    "pair": "An operation must be a kornia module or a callable (x, y) -> (x', y'), with y' class indices [B] "
    "or label rows [B, C] that sum to 1.",
}


def _check_labels(name: str, y: Tensor, num_classes: int) -> None:
    """Class indices must be integers in range; label rows must be distributions."""
    if y.dim() == 1:
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(
                f"Perturbation {name!r} returned class indices of dtype {y.dtype}; class indices must be an integer "
                f"tensor [B] (for soft labels return rows [B, {num_classes}] that sum to 1)."
            )
        ok = ((y >= 0) & (y < num_classes)).all()
        message = f"Perturbation {name!r} returned class indices outside [0, {num_classes})."
    else:
        if not y.is_floating_point():
            raise TypeError(f"Perturbation {name!r} returned label rows of dtype {y.dtype}; expected floating point.")
        ok = ((y >= 0).all() & ((y.sum(dim=1) - 1).abs() <= 1e-3).all()) & torch.isfinite(y).all()
        message = (
            f"Perturbation {name!r} returned label rows that are not distributions "
            "(every entry must be >= 0 and every row must sum to 1)."
        )
    _raise_unless(ok, message)
