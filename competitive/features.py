"""What the terms read besides the logits: forward hooks that capture feature maps and embeddings,
adapters that bridge members whose feature maps differ in shape (the paper does not say how; see
README), and where the logits are in a member's output."""

import math
from collections.abc import Callable, Sequence
from typing import Any

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

    def _hook(self, i: int):
        def hook(module, inputs, output):
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
            return [(m.in_features,) for m in self.modules]
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
        return values

    def clear(self) -> None:
        self.values = [None] * len(self.values)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


LogitsSpec = str | int | Callable[[Any], Tensor] | None


def extract_logits(output: Any, spec: LogitsSpec, *, member: int) -> Tensor:
    """The logits in a member's output: ``spec`` is a key / attribute, a tuple index or a callable;
    None takes a tensor as it is, or the ``.logits`` of a (HuggingFace-style) output object."""
    if callable(spec):
        return spec(output)
    if spec is None:
        if isinstance(output, Tensor):
            return output
        spec = "logits"
    if isinstance(spec, int) and isinstance(output, (tuple, list)) and -len(output) <= spec < len(output):
        return output[spec]
    if isinstance(spec, str):
        if isinstance(output, dict) and spec in output:
            return output[spec]
        if hasattr(output, spec):
            return getattr(output, spec)
    raise ValueError(
        f"models[{member}] returned a {type(output).__name__}, and logits_from={spec!r} does not find logits in it. "
        "Pass logits_from: an attribute or key (e.g. 'logits'), a tuple index (e.g. 0), or a callable "
        "output -> logits; one for all members or a list with one per member."
    )


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
            # bilinear resizing (align_corners=False) is separable: one [out, in] matrix per axis
            self.register_buffer("rows", _linear_resize(source[1], target[1]), persistent=False)
            self.register_buffer("cols", _linear_resize(source[2], target[2]), persistent=False)
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
        if len(self.source) != 3 or len(self.target) != 3 or x.shape[-2:] == self.target[-2:]:
            return self.map(x)
        # the 1x1 convolution (channels) and the resizing (space) are linear maps of different axes,
        # so they commute: run the convolution at the smaller of the two spatial sizes
        if math.prod(self.target[-2:]) < math.prod(x.shape[-2:]):
            return self.map(self._resize(x))
        return self._resize(self.map(x))

    def _resize(self, x: Tensor) -> Tensor:
        """Bilinear resizing (``F.interpolate``, ``align_corners=False``) as two small matrix products,
        which compile to matrix multiplications (the compiled interpolation is slower on the CPU)."""
        return torch.einsum("oh,bchw,pw->bcop", self.rows.to(x.dtype), x, self.cols.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{list(self.source)} -> {list(self.target)}"


def _linear_resize(size: int, new_size: int) -> Tensor:
    """``[new_size, size]``: the weights of 1-D linear interpolation (``align_corners=False``), read
    off ``F.interpolate`` applied to the unit vectors; float64, cast to the input's dtype when used."""
    eye = torch.eye(size, dtype=torch.float64).unsqueeze(1)  # [size, 1, size]: one unit vector per row
    return F.interpolate(eye, size=new_size, mode="linear", align_corners=False).squeeze(1).T


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
