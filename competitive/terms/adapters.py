"""Adapters that bridge members whose feature maps differ in shape (FitNets' regressor; the paper
does not say how, see README). The ``feature`` and ``adm`` terms own one per ordered pair."""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        self.map: nn.Module
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
        out: Tensor
        if len(self.source) == 3 and len(self.target) == 1:
            out = self.map(x.mean(dim=(2, 3)))
        elif len(self.source) != 3 or len(self.target) != 3 or x.shape[-2:] == self.target[-2:]:
            out = self.map(x)
        # the 1x1 convolution (channels) and the resizing (space) are linear maps of different axes,
        # so they commute: run the convolution at the smaller of the two spatial sizes
        elif math.prod(self.target[-2:]) < math.prod(x.shape[-2:]):
            out = self.map(self._resize(x))
        else:
            out = self._resize(self.map(x))
        return out

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
