"""Feature maps for ``L_F`` (paper Eq. 10): forward hooks that capture them, adapters that bridge
members whose feature maps differ in shape (the paper does not say how; see README)."""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HookSpec = str | nn.Module | None


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel keeps the user's model in .module, torch.compile in ._orig_mod
    while isinstance(getattr(model, "module", None), nn.Module) or isinstance(
        getattr(model, "_orig_mod", None), nn.Module
    ):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def resolve_hooks(models: Sequence[nn.Module], feature_hooks: Sequence[HookSpec]) -> list[nn.Module | None]:
    """The module named by each member's hook spec; every offender reported at once."""
    modules, errors = [], []
    for i, (model, spec) in enumerate(zip(models, feature_hooks)):
        if spec is None or isinstance(spec, nn.Module):
            if isinstance(spec, nn.Module) and not any(spec is m for m in model.modules()):
                errors.append(f"feature_hooks[{i}] is a module that is not part of models[{i}]")
            modules.append(spec)
        elif isinstance(spec, str):
            try:
                modules.append(_unwrap(model).get_submodule(spec))
            except AttributeError:
                names = [n for n, _ in _unwrap(model).named_modules() if n][:12]
                errors.append(f"feature_hooks[{i}]={spec!r} names no submodule of models[{i}] (some names: {names})")
                modules.append(None)
        else:
            errors.append(f"feature_hooks[{i}] has type {type(spec).__name__}; expected str, nn.Module or None")
            modules.append(None)
    if errors:
        raise ValueError("Invalid feature_hooks: " + "; ".join(errors) + ".")
    if any(m is None for m in modules) and not all(m is None for m in modules):
        missing = [i for i, m in enumerate(modules) if m is None]
        raise ValueError(
            f"Invalid feature_hooks: members {missing} have no hook. Give every member a hook, "
            "or pass None for all of them to train without the feature loss."
        )
    return modules


class FeatureCapture:
    """Forward hooks that keep each member's latest feature map; ``remove()`` takes them off."""

    def __init__(self, modules: Sequence[nn.Module | None]):
        self.features: list[Tensor | None] = [None] * len(modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules) if m is not None]
        self.enabled = bool(self.handles)

    def _hook(self, i: int):
        def hook(module, inputs, output):
            self.features[i] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def clear(self) -> None:
        self.features = [None] * len(self.features)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class FeatureAdapter(nn.Module):
    """Maps a student's feature map to a teacher's shape (FitNets' regressor).

    ``[B, C, H, W] -> [B, C', H', W']``: a 1x1 convolution, then bilinear resizing when the spatial
    size differs. ``[B, C, H, W] -> [B, D]``: global average pooling and a linear map.
    ``[B, ..., D] -> [B, ..., D']`` (equal leading dims): a linear map of the last dim.
    ``[B, D] -> [B, *S]``: a linear map to ``prod(S)`` values, reshaped to ``S``.

    Example:
        >>> adapter = FeatureAdapter(torch.Size([32, 16, 16]), torch.Size([64, 8, 8]))
        >>> adapter(torch.randn(2, 32, 16, 16)).shape
        torch.Size([2, 64, 8, 8])
    """

    def __init__(self, source: torch.Size, target: torch.Size):
        super().__init__()
        self.source, self.target = tuple(source), tuple(target)
        if len(source) == 3 and len(target) == 3:
            self.map = nn.Conv2d(source[0], target[0], kernel_size=1, bias=False)
        elif len(source) == 3 and len(target) == 1:
            self.map = nn.Linear(source[0], target[0], bias=False)
        elif len(source) == len(target) and source[:-1] == target[:-1]:
            self.map = nn.Linear(source[-1], target[-1], bias=False)
        elif len(source) == 1:
            self.map = nn.Sequential(nn.Linear(source[0], math.prod(target), bias=False), nn.Unflatten(1, target))
        else:
            raise ValueError(
                f"No adapter maps a feature of shape {list(source)} to one of shape {list(target)} "
                "(shapes without the batch dim). Supported: [C, H, W] -> [C', H', W'], "
                "[C, H, W] -> [D], [D] -> any shape, and [..., D] -> [..., D'] with equal leading dims. Hook layers "
                "whose outputs agree in rank, or pass feature_hooks=None."
            )

    def forward(self, x: Tensor) -> Tensor:
        if len(self.source) == 3 and len(self.target) == 1:
            return self.map(x.mean(dim=(2, 3)))
        y = self.map(x)
        if len(self.source) == 3 and len(self.target) == 3 and y.shape[-2:] != self.target[-2:]:
            y = F.interpolate(y, size=self.target[-2:], mode="bilinear", align_corners=False)
        return y

    def extra_repr(self) -> str:
        return f"{list(self.source)} -> {list(self.target)}"


def build_adapters(shapes: Sequence[torch.Size], member_of: str = "models") -> dict[str, FeatureAdapter]:
    """One adapter per ordered pair of members whose feature shapes differ, keyed ``"i_j"``."""
    adapters, errors = {}, []
    for i, source in enumerate(shapes):
        for j, target in enumerate(shapes):
            if i != j and source != target:
                try:
                    adapters[f"{i}_{j}"] = FeatureAdapter(source, target)
                except ValueError as error:
                    errors.append(f"{member_of}[{i}] -> {member_of}[{j}]: {error}")
    if errors:
        raise ValueError("Feature maps cannot be matched: " + " | ".join(errors))
    return adapters
