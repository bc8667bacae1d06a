"""Two timm models of different families in the three-line loop: a ResNet beside a ConvNeXt.

Shows: ``timm.create_model(..., pretrained=False)`` (nothing is downloaded), feature hooks on
named stages (``layer3`` of the ResNet, ``stages.2`` of the ConvNeXt: ``[256, 2, 2]`` and
``[160, 2, 2]`` on 32x32 inputs, bridged by 1x1-convolution adapters), and the group's step.

    python examples/timm_pair.py --smoke    # a few steps on tiny synthetic data, CPU
"""

import argparse
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_device, synthetic_cifar  # noqa: E402

from competitive import CompetitiveGroup  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few batches of tiny synthetic data")
    add_device(p)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    nets = [
        timm.create_model("resnet18", pretrained=False, num_classes=10).to(args.device),
        timm.create_model("convnext_atto", pretrained=False, num_classes=10).to(args.device),
    ]
    optimizers = [torch.optim.AdamW(n.parameters(), lr=1e-3) for n in nets]
    loader = torch.utils.data.DataLoader(synthetic_cifar(64 if args.smoke else 2048), batch_size=16, shuffle=True)

    group = CompetitiveGroup(
        nets, optimizers, feature_hooks=["layer3", "stages.2"], seed=0,
        example_input=torch.randn(2, 3, 32, 32, device=args.device),
    )
    before = [p.detach().clone() for n in nets for p in n.parameters()]
    for x, y in loader:
        result = group.step((x.to(args.device), y.to(args.device)))
    # every weight (kernel or matrix, dim > 1) has a gradient; a bias whose gradient is zero in exact
    # arithmetic moves or not with the CPU's rounding, so only the weights are counted
    pairs = [(a, b.detach()) for a, b in zip(before, (p for n in nets for p in n.parameters())) if a.dim() > 1]
    moved = sum(not torch.equal(a, b) for a, b in pairs)
    adapters = {k: a.extra_repr() for k, a in group.adapters.items()}
    print(f"adapters {adapters}; weights moved: {moved}/{len(pairs)}; stats {group.stats}")
    return {"adapters": adapters, "moved": moved, "weights": len(pairs), "last": result.scalars()}


if __name__ == "__main__":
    main()
