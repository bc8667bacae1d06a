"""Networks for the benchmarks (not part of the library), each with a default feature hook.

- ``resnet8/14/20/32/44/56/110``: the CIFAR ResNets of He et al. (2016): three stages of 16/32/64
  channels with ``(depth - 2) / 6`` basic blocks each and identity shortcuts (option A).
  Feature hook: ``"layer3"``.
- ``mobilenet``: a CIFAR MobileNet (v1-style depthwise separable blocks). Hook: ``"features"``.
- ``resnet18tv``: torchvision's ResNet-18 adapted to 32x32 inputs (3x3 stem, no max-pool).
  Hook: ``"layer4"``.
"""

import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin if stride != 1 or cin != cout else 0

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.pad:  # option A: subsample and zero-pad the channels
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"Invalid depth {depth}: a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110).")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.fc = nn.Linear(64, classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(cin, cout, blocks, stride):
        return nn.Sequential(
            *[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(blocks)]
        )

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MobileNet(nn.Module):
    """MobileNet v1 for 32x32 inputs (stride 1 stem), ``width`` scales the channels."""

    CFG = (64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024)

    def __init__(self, classes: int = 10, width: float = 1.0):
        super().__init__()
        c = int(32 * width)
        layers = [nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        for entry in self.CFG:
            out, stride = (entry, 1) if isinstance(entry, int) else entry
            out = int(out * width)
            layers += [
                nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, out, 1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            c = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def resnet18_cifar(classes: int = 10) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=classes)  # no download: random init
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build(name: str, classes: int = 10) -> tuple[nn.Module, str]:
    """``(model, default feature hook)`` for a model name."""
    if name.startswith("resnet") and name[6:].isdigit():
        return CifarResNet(int(name[6:]), classes), "layer3"
    if name == "mobilenet":
        return MobileNet(classes), "features"
    if name.startswith("mobilenet") and name[9:].replace(".", "", 1).isdigit():
        return MobileNet(classes, width=float(name[9:])), "features"
    if name == "resnet18tv":
        return resnet18_cifar(classes), "layer4"
    raise ValueError(f"Invalid model {name!r}. Please provide resnet<6n+2>, mobilenet, mobilenet<width> or resnet18tv.")
