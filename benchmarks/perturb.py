"""Cost of each perturbation, and of the pool per step, against one member's training step.

    python benchmarks/perturb.py            # CUDA when available, else CPU

One member is a CIFAR ResNet (``--model``, default resnet20) at batch 128 on 32x32 images. Each
repetition times, interleaved: one training step of the member (forward, CE, backward, SGD step),
every operation of the default pool applied to the batch, and the pool as the group uses it (draw
+ apply). Medians over ``--steps`` repetitions after ``--warmup``; writes JSON to ``--out``.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import build  # noqa: E402

from competitive import PerturbationPool  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(
        f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'})"
        f" torch={torch.__version__} threads={torch.get_num_threads()} model={args.model} batch={args.batch} "
        f"warmup={args.warmup} steps={args.steps} (medians; interleaved)",
        flush=True,
    )
    torch.manual_seed(0)
    model = build(args.model)[0].to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    pool = PerturbationPool().to(device)
    generator = torch.Generator().manual_seed(0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tasks = {"member training step": train_step}
    for index, name in enumerate(pool.names):
        tasks[name] = (lambda i: lambda: pool.perturb(i, x, y, seed=1, num_classes=10))(index)

    def pool_step():
        draw = pool.draw(generator, 2, x)  # whether it perturbs aside: the operation is always applied here
        pool.perturb(draw.operation, x, y, seed=draw.seed, num_classes=10)

    tasks["pool (draw + apply)"] = pool_step
    times = {k: [] for k in tasks}
    for rep in range(args.warmup + args.steps):
        for name, fn in tasks.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
    step = statistics.median(times["member training step"])
    rows = {
        k: {"median_ms": 1e3 * statistics.median(v), "ratio": statistics.median(v) / step} for k, v in times.items()
    }
    print("\n| operation | median ms | / member step |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['median_ms']:.2f} | {r['ratio']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"perturb-{device.type}.json"
    path.write_text(
        json.dumps({"setup": vars(args) | {"device": str(device), "out": str(args.out)}, "rows": rows}, indent=1)
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
