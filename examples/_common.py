"""Tiny synthetic data and two small networks of different architectures, shared by the examples."""

import argparse

import torch
from torch import nn


def add_device(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the members train (default: CUDA when available, else the CPU)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device of the members and batches (default: cuda when available)")


def synthetic_cifar(n: int = 256, classes: int = 10, seed: int = 0) -> torch.utils.data.TensorDataset:
    """CIFAR-shaped images whose class shifts their mean colour: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g) + (y.float() / classes - 0.5).view(-1, 1, 1, 1) * 2
    return torch.utils.data.TensorDataset(x, y)


class SmallCNN(nn.Module):
    """conv -> conv (``features``: ``[width, 8, 8]``) -> pool -> ``fc``."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.features = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.features(self.stem(x)).mean(dim=(2, 3)))


class SmallMLP(nn.Module):
    """A different family: flatten -> ``features`` (a ``[hidden]`` vector) -> ``fc``."""

    def __init__(self, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc(self.features(x))


def synthetic_segmentation(
    n: int = 16, size: int = 64, classes: int = 21, seed: int = 0, ignore_index: int = 255
) -> torch.utils.data.TensorDataset:
    """Images with a few filled rectangles whose colour says their class, and their maps ``[H, W]``:
    background 0, each rectangle its class, a 2-pixel band around each rectangle ``ignore_index`` (as
    the object boundaries of Pascal VOC's maps)."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(classes, 3, generator=g) * 2 - 1
    x = torch.randn(n, 3, size, size, generator=g) * 0.3
    y = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(3):
            c = int(torch.randint(1, classes, (), generator=g))
            top, left = (int(v) for v in torch.randint(0, size - size // 4, (2,), generator=g))
            h, w = (int(v) for v in torch.randint(size // 8, size // 2, (2,), generator=g))
            y[i, max(top - 2, 0) : top + h + 2, max(left - 2, 0) : left + w + 2] = ignore_index
            y[i, top : top + h, left : left + w] = c
            x[i, :, top : top + h, left : left + w] += colours[c].view(3, 1, 1)
    return torch.utils.data.TensorDataset(x, y)
