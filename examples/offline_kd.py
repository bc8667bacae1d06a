"""Classic, offline knowledge distillation with the group's losses: a frozen, pretrained teacher.

Shows: a teacher trained here first and saved to a checkpoint (nothing is downloaded), loaded,
frozen (``requires_grad_(False)``, no optimizer: ``None``), and a student trained by the group with
``fixed_teacher=0``: the teacher teaches at every step with the same KL (and feature) terms as the
competitive rules, and never changes.

    python examples/offline_kd.py --smoke    # a few steps on tiny synthetic data, CPU
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SmallCNN, SmallMLP, add_device, synthetic_cifar  # noqa: E402

from competitive import KL, CompetitiveGroup  # noqa: E402


def pretrain_teacher(loader, epochs: int, path: Path, device: str = "cpu") -> None:
    teacher = SmallCNN(width=32).to(device)
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for x, y in loader:
            F.cross_entropy(teacher(x.to(device)), y.to(device)).backward()
            optimizer.step()
            optimizer.zero_grad()
    torch.save(teacher.state_dict(), path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few batches of tiny synthetic data")
    add_device(p)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(synthetic_cifar(64 if args.smoke else 2048), batch_size=16, shuffle=True)
    checkpoint = Path(tempfile.mkdtemp(prefix="competitive-kd-")) / "teacher.pt"
    pretrain_teacher(loader, epochs=1 if args.smoke else 5, path=checkpoint, device=args.device)

    teacher = SmallCNN(width=32).to(args.device)
    teacher.load_state_dict(torch.load(checkpoint, map_location=args.device))
    teacher.eval().requires_grad_(False)  # frozen: BatchNorm statistics and weights stay as trained
    student = SmallMLP().to(args.device)
    group = CompetitiveGroup(
        [teacher, student],
        [None, torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)],
        fixed_teacher=0,
        terms=[KL(temperature=4.0)],  # each term holds its own settings
        warmup_steps=0,
    )
    frozen = [p.clone() for p in teacher.parameters()]
    for x, y in loader:
        result = group.step((x.to(args.device), y.to(args.device)))
    unchanged = all(torch.equal(a, b) for a, b in zip(frozen, teacher.parameters()))
    print(f"teacher unchanged: {unchanged}; teacher share {group.stats['teacher_count']}; last {result.scalars()}")
    return {"teacher_unchanged": unchanged, "teacher_count": group.stats["teacher_count"], "last": result.scalars()}


if __name__ == "__main__":
    main()
