"""A multi-label pair: a CNN beside an MLP tag images with any number of 5 labels, ``task_loss="bce"``.

Each member's objective is ``F.binary_cross_entropy_with_logits`` over its labels; the member with the
lower BCE teaches, and the student learns from the teacher's label probabilities by the Bernoulli form of
``kl``: per label, the KL between the teacher's and the student's sigmoid (at a temperature), the
two-way softmax of Hinton et al.'s distillation for each label. Targets are ``[B, labels]`` in {0, 1}.

    python examples/multilabel_pair.py --smoke
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SmallCNN, SmallMLP, add_device, synthetic_multilabel  # noqa: E402

from competitive import KL, CompetitiveGroup  # noqa: E402


def f1(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Micro F1 of the labels predicted at probability 0.5."""
    predicted = logits > 0
    hit = (predicted & (targets > 0)).sum()
    return float(2 * hit / (predicted.sum() + (targets > 0).sum()).clamp_min(1))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few batches of tiny synthetic data")
    p.add_argument("--epochs", type=int, default=10)
    add_device(p)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    nets = [SmallCNN(classes=5).to(args.device), SmallMLP(classes=5).to(args.device)]
    optimizers = [torch.optim.SGD(n.parameters(), lr=0.05, momentum=0.9) for n in nets]
    group = CompetitiveGroup(nets, optimizers, task_loss="bce", terms=[KL(temperature=2.0)], warmup_steps=20)
    data = synthetic_multilabel(64 if args.smoke else 1024)
    held_out = synthetic_multilabel(64 if args.smoke else 512, seed=1)
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    for _ in range(1 if args.smoke else args.epochs):
        for x, y in loader:
            result = group.step((x.to(args.device), y.to(args.device)))
    group.eval()
    x, y = (t.to(args.device) for t in held_out.tensors)
    with torch.no_grad():
        scores = [f1(n(x), y) for n in nets]
    print(f"held-out F1 (CNN / MLP): {scores[0]:.3f} / {scores[1]:.3f}; last step {result.scalars()}")
    return {"f1": scores, "last": result.scalars(), "stats": group.stats}


if __name__ == "__main__":
    main()
