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


def synthetic_shapes(n: int = 64, size: int = 128, seed: int = 0) -> list[tuple[torch.Tensor, dict]]:
    """Detection data: noisy images with 1-3 objects, red-ish filled rectangles (class 1) and blue-ish
    ellipses (class 2), each with its box ``[x0, y0, x1, y1]``; the images are of different sizes."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        side = int(torch.randint(size - 32, size + 33, (), generator=g))
        image = torch.rand(3, side, side, generator=g) * 0.3
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            w, h = (int(v) for v in torch.randint(side // 6, side // 2, (2,), generator=g))
            x0, y0 = int(torch.randint(0, side - w, (), generator=g)), int(torch.randint(0, side - h, (), generator=g))
            label = int(torch.randint(1, 3, (), generator=g))
            colour = torch.tensor([0.9, 0.2, 0.2] if label == 1 else [0.2, 0.3, 0.9]) + 0.1 * torch.rand(3, generator=g)
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            inside = torch.ones(h, w, dtype=torch.bool) if label == 1 else (
                ((xs - w / 2) / (w / 2)) ** 2 + ((ys - h / 2) / (h / 2)) ** 2 <= 1)  # fmt: skip
            patch = image[:, y0 : y0 + h, x0 : x0 + w]
            image[:, y0 : y0 + h, x0 : x0 + w] = torch.where(inside, colour.view(3, 1, 1), patch)
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(label)
        samples.append((image, {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}))
    return samples


def synthetic_multilabel(n: int = 256, labels: int = 5, seed: int = 0) -> torch.utils.data.TensorDataset:
    """Multi-label data: 32 x 32 images holding a coloured square for each of their labels (0-3 of ``labels``),
    the targets ``[n, labels]`` in {0, 1}."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(labels, 3, generator=g)
    x, y = torch.randn(n, 3, 32, 32, generator=g) * 0.2, (torch.rand(n, labels, generator=g) < 0.35).float()
    for i in range(n):
        for c in y[i].nonzero().flatten().tolist():
            top, left = (int(v) for v in torch.randint(0, 24, (2,), generator=g))
            x[i, :, top : top + 8, left : left + 8] = colours[c].view(3, 1, 1)
    return torch.utils.data.TensorDataset(x, y)
