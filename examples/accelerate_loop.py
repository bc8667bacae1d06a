"""Competitive distillation with Hugging Face Accelerate.

Shows: ``accelerator.prepare`` on the members, their optimizers and the loader; ``group.loss`` +
``accelerator.backward`` inside ``accelerator.accumulate`` (gradient accumulation); bf16 where the
device supports it; ``save_state`` / ``load_state`` with the group registered for checkpointing,
and a resumed run that continues bitwise like an uninterrupted one.

    python examples/accelerate_loop.py --smoke     # a few steps on tiny synthetic data, CPU
    accelerate launch examples/accelerate_loop.py  # the same on every process of a launch config

Build the group after ``prepare`` (its members are then the prepared, possibly DDP-wrapped
modules), with ``example_input`` so its adapters join the prepared optimizers before any state is
loaded.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SmallCNN, SmallMLP, add_device, synthetic_cifar  # noqa: E402

from competitive import CompetitiveGroup, PerturbationPool  # noqa: E402


def build(accumulation: int, device: str = "cpu"):
    cpu = torch.device(device).type == "cpu"  # Accelerate picks the GPU itself; cpu=True keeps it off
    bf16 = not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    accelerator = Accelerator(
        gradient_accumulation_steps=accumulation, mixed_precision="bf16" if bf16 else "no", cpu=cpu
    )
    set_seed(0)
    members = [SmallCNN(), SmallMLP()]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in members]
    loader = torch.utils.data.DataLoader(synthetic_cifar(256), batch_size=16)
    *prepared, loader = accelerator.prepare(*members, *optimizers, loader)
    members, optimizers = prepared[:2], prepared[2:]
    group = CompetitiveGroup(
        members,
        optimizers,
        feature_hooks=["features", "features"],
        perturbation=PerturbationPool(),
        seed=0,
        warmup_steps=0,
        example_input=torch.randn(2, 3, 32, 32, device=accelerator.device),
    )
    accelerator.register_for_checkpointing(group.parts)  # an nn.Module: adapters, counters, generator
    return accelerator, group, loader


def train(accelerator, group, loader, batches: int, skip: int = 0) -> list[dict]:
    logs = []
    for i, batch in enumerate(loader):
        if i < skip:
            continue
        if i >= skip + batches:
            break
        with accelerator.accumulate(*group.models):
            total, result = group.loss(batch)
            accelerator.backward(total)
            for optimizer in group.optimizers:  # steps only when the accumulation is complete
                optimizer.step()
                optimizer.zero_grad()
        logs.append(result.scalars())
    return logs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few batches of tiny synthetic data")
    p.add_argument("--accumulation", type=int, default=2)
    add_device(p)
    args = p.parse_args(argv)
    batches = 4 if args.smoke else 8
    folder = Path(tempfile.mkdtemp(prefix="competitive-accelerate-"))

    accelerator, group, loader = build(args.accumulation, args.device)
    before = [p.detach().clone() for m in group.models for p in m.parameters()]
    train(accelerator, group, loader, batches)
    accelerator.save_state(folder)
    train(accelerator, group, loader, batches, skip=batches)
    straight = [p.detach().clone() for m in group.models for p in m.parameters()]

    accelerator, resumed, loader = build(args.accumulation, args.device)
    accelerator.load_state(folder)
    logs = train(accelerator, resumed, loader, batches, skip=batches)
    after = [p.detach() for m in resumed.models for p in m.parameters()]
    same = all(torch.equal(a, b) for a, b in zip(straight, after))
    # weight matrices and kernels always get a gradient; a bias followed by BatchNorm gets none in
    # exact arithmetic, so whether it moves is the CPU's rounding: it is not counted
    weights = [(a, b) for a, b in zip(before, after) if a.dim() > 1]
    trained = sum(not torch.equal(a, b) for a, b in weights) == len(weights)
    print(f"members trained (every weight moved): {trained}; resumed run bitwise equal: {same}; last log: {logs[-1]}")
    return {"moved": trained, "bitwise_resume": same, "logged": sorted(logs[-1]), "steps": resumed.steps}


if __name__ == "__main__":
    main()
