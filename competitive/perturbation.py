"""Stochastic perturbation (paper §3.2, Eq. 6): an aggressive operation applied to one member's
batch per step, so a perturbation that helps its member win is distilled into the others.

Randomness is kept apart from application, as in kornia's ``forward_parameters``: the pool draws
*whether* a step perturbs (its ``p``), *which* member, *which* operation and a seed from the group's
``torch.Generator``; ``perturb`` then runs deterministically from that seed on the batch's device.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import kornia.augmentation as K
import torch
from kornia.augmentation._2d.mix.base import MixAugmentationBaseV2
from torch import Tensor, nn

from ._validation import real_scalar

Operation = nn.Module | Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

# the authors' public code perturbs every tenth batch (train_competitive_distillation.py:
# ``if i_batch % 10 == 0``); see README for 0.1 and 0.25 against no perturbation
DEFAULT_P = 0.1


class Draw(NamedTuple):
    """One step's draw: ``member`` sees ``operation`` (its index; ``name``) run from ``seed``; ``member`` is
    None when the step perturbs nobody, and ``skipped`` says why a drawn operation was not applied."""

    member: int | None
    operation: int
    seed: int
    name: str
    skipped: str | None = None


class InUnitRange(nn.Module):
    """Runs an image operation that assumes ``[0, 1]`` pixels on a batch in any normalization.

    Each image is mapped to ``[0, 1]`` by its own minimum and maximum, perturbed, and mapped back,
    so salt becomes the image's maximum and pepper its minimum. Nothing is clamped.
    """

    def __init__(self, op: nn.Module):
        super().__init__()
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        span = (x.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-12)
        perturbed: Tensor = self.op((x - low) / span)
        return low + span * perturbed


class ResizedCrop(nn.Module):
    """Kornia's ``RandomResizedCrop`` at the input's own size, with area scale ``scale``."""

    def __init__(self, scale: tuple[float, float] = (0.3, 0.7)):
        super().__init__()
        self.scale = scale
        self.crops = nn.ModuleDict()

    def forward(self, x: Tensor) -> Tensor:
        key = "x".join(map(str, x.shape[-2:]))
        if key not in self.crops:
            self.crops[key] = K.RandomResizedCrop(tuple(x.shape[-2:]), scale=self.scale, p=1.0)
        cropped: Tensor = self.crops[key](x)
        return cropped


def default_operations() -> dict[str, nn.Module]:
    """Every operation the paper names, at settings beyond normal augmentation (paper §3.2)."""
    return {
        "mixup": K.RandomMixUpV2(lambda_val=(0.2, 0.8), p=1.0, data_keys=["input", "class"]),
        "cutmix": K.RandomCutMixV2(cut_size=(0.3, 0.7), p=1.0, use_correct_lambda=True, data_keys=["input", "class"]),
        "gaussian_noise": InUnitRange(K.RandomGaussianNoise(std=0.2, p=1.0)),
        "salt_and_pepper": InUnitRange(K.RandomSaltAndPepperNoise(amount=(0.05, 0.15), p=1.0)),
        "elastic": K.RandomElasticTransform(kernel_size=(15, 15), sigma=(4.0, 4.0), alpha=(2.0, 2.0), p=1.0),
        "thin_plate_spline": K.RandomThinPlateSpline(scale=0.3, p=1.0),
        "affine": K.RandomAffine(degrees=45.0, translate=(0.2, 0.2), scale=(0.7, 1.3), shear=20.0, p=1.0),
        "resized_crop": ResizedCrop(scale=(0.3, 0.7)),
    }


def _kind(op: Operation) -> str:
    """``"mix"`` (kornia mixing: images and labels), ``"image"`` (x -> x'), ``"pair"`` ((x, y) -> (x', y'))."""
    if isinstance(op, MixAugmentationBaseV2):
        return "mix"
    if isinstance(op, (K.base._BasicAugmentationBase, K.AugmentationSequential, InUnitRange, ResizedCrop)):
        return "image"
    return "pair"


def _soft_labels(y: Tensor, params: Tensor, num_classes: int) -> Tensor:
    # kornia's mixing modules return rows (label, label of the pasted image, lambda)
    params = params.reshape(-1, y.shape[0], 3)  # mixup: [B, 3]; cutmix: [num_mix, B, 3]
    soft = torch.nn.functional.one_hot(y, num_classes).float()
    for mix in params.unbind(0):
        lam = mix[:, 2:3].float()
        pasted = torch.nn.functional.one_hot(mix[:, 1].long(), num_classes).float()
        soft = (1 - lam) * soft + lam * pasted
    return soft


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
        (:class:`InUnitRange`) and nothing is clamped. Mixing operations (kornia's
        ``RandomMixUpV2`` / ``RandomCutMixV2``) need a batch of at least 2 and produce soft labels.

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
        self.kinds = [_kind(op) for op in self.operations]
        # modules live in a ModuleDict so .to() and state_dict() see them
        self.modules_ = nn.ModuleDict({n: op for n, op in operations.items() if isinstance(op, nn.Module)})
        weights = [1.0] * len(self.names) if weights is None else list(weights)
        finite = all(isinstance(w, (int, float)) and 0 <= w < float("inf") for w in weights)
        if len(weights) != len(self.names) or not finite or sum(weights) <= 0:
            raise ValueError(
                f"Invalid weights {weights}: please provide {len(self.names)} finite, non-negative "
                "numbers with a positive sum, one per operation."
            )
        # a plain CPU tensor, not a buffer: .to(device) must not move the draws onto the GPU
        self.weights = torch.tensor(weights, dtype=torch.float64)

    def draw(self, generator: torch.Generator, members: int, x: Tensor) -> Draw:
        """This step's :class:`Draw` from a CPU ``generator``: with probability ``p`` one of ``members``
        (uniformly) sees an operation (by ``weights``) with its own seed. The same four numbers are
        drawn whatever the outcome, so a run's later draws do not depend on ``p``'s earlier ones."""
        perturb = torch.rand((), generator=generator).item() < self.p
        member = int(torch.randint(members, (), generator=generator))
        index = int(torch.multinomial(self.weights, 1, generator=generator).item())
        seed = int(torch.randint(2**62, (), generator=generator).item())
        skipped = None
        if perturb and not self.can_apply(index, x):
            skipped, perturb = f"{self.names[index]!r} needs a batch of at least 2; got {x.shape[0]}", False
        return Draw(member if perturb else None, index, seed, self.names[index], skipped)

    def can_apply(self, index: int, x: Tensor) -> bool:
        """Whether operation ``index`` can run on ``x`` (mixing needs a batch of at least 2)."""
        return self.kinds[index] != "mix" or x.shape[0] >= 2

    def check(self, x: Tensor, y: Tensor, *, num_classes: int) -> None:
        """Run every operation once on (a slice of) the batch, so that inputs an operation cannot
        handle are refused now, naming it, and not at a random later step. Draws nothing from any
        generator the caller sees."""
        self.checked = True
        if x.dim() != 4:
            raise ValueError(
                f"Perturbation {self.names[0]!r} needs an image batch [B, C, H, W]; got inputs of shape "
                f"{list(x.shape)}. Use perturbation=None for non-image inputs."
            )
        x, y = x[:2].detach(), y[:2]
        for index, name in enumerate(self.names):
            if not self.can_apply(index, x):
                continue
            try:
                self.perturb(index, x, y, seed=0, num_classes=num_classes)
            except Exception as error:  # kornia's own checks raise their BaseError
                if isinstance(error, (ValueError, TypeError)) and name in str(error):
                    raise
                raise ValueError(
                    f"Perturbation {name!r} cannot handle inputs of shape {list(x.shape)[1:]} (per sample): {error}. "
                    "Give the pool operations that suit these inputs, or perturbation=None."
                ) from error

    def extra_repr(self) -> str:
        return f"p={self.p}, operations={self.names}"

    def perturb(self, index: int, x: Tensor, y: Tensor, *, seed: int, num_classes: int) -> tuple[Tensor, Tensor]:
        """Apply operation ``index`` to the batch ``(x, y)``, deterministically from ``seed``.

        Returns ``(x', y')``: ``y'`` stays class indices ``[B]`` unless the operation mixes images,
        then it is ``[B, num_classes]`` with rows summing to 1. An operation of the ``(x, y) ->
        (x', y')`` kind may return new class indices ``[B]`` (they are used) or label rows.
        """
        op, kind, name = self.operations[index], self.kinds[index], self.names[index]
        if x.dim() != 4:
            raise ValueError(
                f"Perturbation {name!r} needs an image batch [B, C, H, W]; got inputs "
                f"of shape {list(x.shape)}. Use perturbation=None for non-image inputs."
            )
        if not self.can_apply(index, x):
            raise ValueError(f"Perturbation {name!r} mixes images and needs a batch of at least 2; got {x.shape[0]}.")
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=x.device.type):
            torch.manual_seed(seed)
            try:
                # an "image" operation is a module x -> x'; the others take (x, y)
                out = cast(nn.Module, op)(x) if kind == "image" else op(x, y)
            except TypeError as error:
                raise TypeError(f"Perturbation {name!r} could not be called: {error}. {_EXPECTED[kind]}") from error
        return _checked(out, x, y, kind, name, num_classes)


def _checked(out: Any, x: Tensor, y: Tensor, kind: str, name: str, num_classes: int) -> tuple[Tensor, Tensor]:
    """An operation's output as ``(x', y')``, checked against the batch ``(x, y)`` it got."""
    if kind == "mix":
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"Perturbation {name!r} returned {type(out).__name__}. {_EXPECTED[kind]}")
        images, params = out
        return images, _soft_labels(y, params.to(x.device), num_classes)
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
    if y.device.type == "cpu":
        if not ok:
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)  # checked on the device, without waiting for it
