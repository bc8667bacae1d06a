"""Mixing two images of the batch (paper §3.2: fusion and splicing) in a few tensor ops, every random
number drawn on the batch's device: on a GPU a perturbed step waits for nothing on the host."""

import torch
from torch import Tensor, nn


class Mixing(nn.Module):
    """Base of the operations that mix images: ``(x, y) -> (x', rows)``, ``rows`` ``[B, 3]`` of (own label,
    the other image's label, the other image's share), as kornia's mixing modules return. Every random
    number is drawn on the batch's device, so a step on a GPU never waits for the host."""

    def pairs(self, x: Tensor) -> Tensor:
        """The image each sample is mixed with: a random permutation of the batch, on its device."""
        return torch.randperm(x.shape[0], device=x.device)

    @staticmethod
    def rows(y: Tensor, other: Tensor, share: Tensor) -> Tensor:
        return torch.stack([y.to(share.dtype), y[other].to(share.dtype), share], dim=1)


class MixUp(Mixing):
    """Image fusion (paper §3.2): ``x' = (1 - lam) x + lam x[perm]``, ``lam ~ U(lam)`` per sample.

    Example:
        >>> x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> images, rows = MixUp()(x, y)
        >>> images.shape, rows.shape
        (torch.Size([4, 3, 8, 8]), torch.Size([4, 3]))
    """

    def __init__(self, lam: tuple[float, float] = (0.2, 0.8)):
        super().__init__()
        self.lam = lam

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        other = self.pairs(x)
        low, high = self.lam
        lam = torch.rand(x.shape[0], device=x.device) * (high - low) + low
        images = torch.lerp(x, x[other], lam.to(x.dtype).view(-1, *[1] * (x.dim() - 1)))
        return images, self.rows(y, other, lam)


class CutMix(Mixing):
    """Splicing (paper §3.2): a box of each image replaced by the same box of another; the box's sides are
    ``size`` (drawn per sample) of the image's, placed uniformly inside it; the share is the box's area.

    Example:
        >>> x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> images, rows = CutMix()(x, y)
        >>> bool(((rows[:, 2] > 0) & (rows[:, 2] < 1)).all())
        True
    """

    def __init__(self, size: tuple[float, float] = (0.3, 0.7)):
        super().__init__()
        self.size = size

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        other, (height, width), batch = self.pairs(x), x.shape[-2:], x.shape[0]
        low, high = self.size
        draws = torch.rand(3, batch, device=x.device)
        side = draws[0] * (high - low) + low
        h, w = (side * height).round().clamp_min(1), (side * width).round().clamp_min(1)
        top, left = (draws[1] * (height - h + 1)).floor(), (draws[2] * (width - w + 1)).floor()
        rows = torch.arange(height, device=x.device).view(1, -1, 1)
        cols = torch.arange(width, device=x.device).view(1, 1, -1)
        box = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
               & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)))
        images = torch.where(box.unsqueeze(1), x[other], x)
        return images, self.rows(y, other, h * w / (height * width))
