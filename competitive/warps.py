"""Geometric perturbations (paper §3.2: deformation, random cropping) as one sampling grid per image,
every random number drawn on the batch's device, so a perturbed step on a GPU never waits for the host.
Images are sampled bilinearly from the grid; dense targets move with them through the same grid
(:func:`~competitive.operations.perturb_dense`), and what a warp brings in from outside is padding."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Warp(nn.Module):
    """Base of the warps: :meth:`grid` gives, per output pixel, where to read the input (``grid_sample``'s
    normalized coordinates, ``align_corners=False``); outside ``[-1, 1]`` reads zeros."""

    def grid(self, x: Tensor) -> Tensor:  # pragma: no cover - every warp defines it
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return sample(x, self.grid(x))


def sample(x: Tensor, grid: Tensor, mode: str = "bilinear") -> Tensor:
    """``x`` read at ``grid`` ``[B, H, W, 2]``, in ``x``'s dtype (the grid in it too)."""
    return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode="zeros", align_corners=False)


def _uniform(shape: tuple[int, ...], low: float, high: float, like: Tensor) -> Tensor:
    return torch.rand(shape, device=like.device) * (high - low) + low


class Affine(Warp):
    """A random affine map per image: rotation up to ``degrees``, shear up to ``shear`` degrees on each
    axis, scale in ``scale``, translation up to ``translate`` of the image on each axis (paper §3.2's
    deformation, beyond normal augmentation by default).

    Example:
        >>> Affine()(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """

    def __init__(self, degrees: float = 45.0, translate: tuple[float, float] = (0.2, 0.2),
                 scale: tuple[float, float] = (0.7, 1.3), shear: float = 20.0):
        super().__init__()
        self.degrees, self.translate, self.scale, self.shear = degrees, translate, scale, shear

    def grid(self, x: Tensor) -> Tensor:
        batch, (height, width) = x.shape[0], x.shape[-2:]
        angle, shear_x, shear_y, scale, move_x, move_y = _uniform((6, batch), -1.0, 1.0, x)
        low, high = self.scale
        angle, scale = angle * math.radians(self.degrees), low + (scale + 1) / 2 * (high - low)
        tan_x, tan_y = (shear_x * math.radians(self.shear)).tan(), (shear_y * math.radians(self.shear)).tan()
        cos, sin = angle.cos(), angle.sin()
        # rotation @ shear in pixels, over the scale, in grid_sample's coordinates (x / (W / 2), y / (H / 2))
        a, b = (cos + -sin * tan_y) / scale, (cos * tan_x - sin) / scale * height / width
        c, d = (sin + cos * tan_y) / scale * width / height, (sin * tan_x + cos) / scale
        theta = torch.stack([a, b, 2 * self.translate[0] * move_x, c, d, 2 * self.translate[1] * move_y], 1)
        return F.affine_grid(theta.view(batch, 2, 3), [batch, 1, height, width], align_corners=False)


class ResizedCrop(Warp):
    """A random crop of ``scale`` of the image's area with an aspect ratio in ``ratio``, resized to the
    image's size (paper §3.2: random cropping with area scale in ``[0.3, 0.7]``).

    Example:
        >>> ResizedCrop()(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """

    def __init__(self, scale: tuple[float, float] = (0.3, 0.7), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        super().__init__()
        self.scale, self.ratio = scale, ratio

    def grid(self, x: Tensor) -> Tensor:
        batch, (height, width) = x.shape[0], x.shape[-2:]
        area, log_ratio, at_x, at_y = torch.rand(4, batch, device=x.device)
        area = area * (self.scale[1] - self.scale[0]) + self.scale[0]
        ratio = (log_ratio * math.log(self.ratio[1] / self.ratio[0]) + math.log(self.ratio[0])).exp()
        w, h = (area * ratio).sqrt().clamp_max(1.0), (area / ratio).sqrt().clamp_max(1.0)  # shares of W, H
        zero = torch.zeros_like(w)
        theta = torch.stack([w, zero, (2 * at_x - 1) * (1 - w), zero, h, (2 * at_y - 1) * (1 - h)], 1)
        return F.affine_grid(theta.view(batch, 2, 3), [batch, 1, height, width], align_corners=False)


class ThinPlateSpline(Warp):
    """A thin-plate-spline warp: the four corners and the centre move by up to ``scale`` (of half the
    image) on each axis, as kornia's ``RandomThinPlateSpline``; its system is solved on the device
    (``torch.linalg.solve_ex``, which does not read back whether it succeeded).

    Example:
        >>> ThinPlateSpline()(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """

    def __init__(self, scale: float = 0.3):
        super().__init__()
        self.scale = scale

    def grid(self, x: Tensor) -> Tensor:
        batch, (height, width) = x.shape[0], x.shape[-2:]
        points = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0], [0.0, 0.0]], device=x.device)
        moved = points + _uniform((batch, 5, 2), -self.scale, self.scale, x)
        # the spline maps each output point to its input point: f(p) = A [1, p] + sum_k w_k U(|p - moved_k|)
        system = torch.zeros(batch, 8, 8, device=x.device)
        system[:, :5, :5] = _kernel(moved, moved)
        system[:, :5, 5] = system[:, 5, :5] = 1.0
        system[:, :5, 6:] = moved
        system[:, 6:, :5] = moved.transpose(1, 2)
        targets = torch.cat([points.expand(batch, 5, 2), torch.zeros(batch, 3, 2, device=x.device)], 1)
        weights: Tensor = torch.linalg.solve_ex(system, targets, check_errors=False).result  # [B, 8, 2]
        ys = (torch.arange(height, device=x.device) * 2 + 1) / height - 1  # pixel centres (align_corners=False)
        xs = (torch.arange(width, device=x.device) * 2 + 1) / width - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).view(1, -1, 2).expand(batch, -1, -1)
        affine = torch.cat([torch.ones_like(grid[..., :1]), grid], -1) @ weights[:, 5:]
        return (affine + _kernel(grid, moved) @ weights[:, :5]).view(batch, height, width, 2)


def _kernel(a: Tensor, b: Tensor) -> Tensor:
    """The thin-plate radial basis ``r^2 log r^2`` between points ``a`` ``[B, P, 2]`` and ``b`` ``[B, K, 2]``."""
    r2 = (a.unsqueeze(2) - b.unsqueeze(1)).square().sum(-1)
    kernel: Tensor = torch.xlogy(r2, r2)  # 0 at r = 0
    return kernel


class SaltAndPepper(nn.Module):
    """A share ``amount`` (drawn per image) of the pixels set to 1 (salt) or 0 (pepper), half each, on every
    channel; for inputs in ``[0, 1]`` (the pool wraps it in :class:`~competitive.operations.InUnitRange`).

    Example:
        >>> bool(((SaltAndPepper()(torch.rand(2, 3, 8, 8)) >= 0)).all())
        True
    """

    def __init__(self, amount: tuple[float, float] = (0.05, 0.15)):
        super().__init__()
        self.amount = amount

    def forward(self, x: Tensor) -> Tensor:
        batch, (height, width) = x.shape[0], x.shape[-2:]
        amount = _uniform((batch, 1, 1, 1), *self.amount, x)
        hit, salt = torch.rand(2, batch, 1, height, width, device=x.device)
        return torch.where(hit < amount, (salt < 0.5).to(x.dtype), x)
