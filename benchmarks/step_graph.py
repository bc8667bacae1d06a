"""The group's step as CUDA graphs (``cuda_graph=True``) against its members' own steps, eager and captured.

    python benchmarks/step_graph.py --groups "2 x resnet32" --batch 128 [--amp bf16]

Variants, one step of each in turn, interleaved, timed with CUDA events after a synchronize; each ratio
is the median of the per-round ratios to (a):
(a) the limit: each member's own eager step in turn (forward, CE, backward, fused SGD step);
(b) the limit captured the same way: those steps of every member in one CUDA graph, replayed;
(c) the group eager (``rule="best"``, ``kl``); (d) the group with ``cuda_graph=True``.
The ratio (d)/(b) is printed beside. Every variant uses the same optimizer, fused SGD (momentum 0.9,
Nesterov, weight decay 5e-4), and the same batch. Without a GPU only (a) and (c) run (a graph needs CUDA).
Writes ``graph.json`` to ``--out``.
"""

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import build  # noqa: E402

from competitive import CompetitiveGroup  # noqa: E402


def _optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True)


def _member_steps(models, x, y, amp):
    optimizers = [_optimizer(m) for m in models]

    def step():
        for model, optimizer in zip(models, optimizers):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                logits = model(x)
            F.cross_entropy(logits.float(), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def _captured(step, warmup=3):
    """``step`` (reading static tensors) warmed up on a side stream, then captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _timer(device):
    if device.type == "cuda":

        def timed(fn):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return timed

    def timed_cpu(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return timed_cpu


def bench(names, args, device):
    torch.manual_seed(0)
    base = [build(n)[0].to(device) for n in names]
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    graphs = device.type == "cuda"
    variants = {"(a) limit, eager": _member_steps(copy.deepcopy(base), x, y, args.amp)}
    if graphs:
        variants["(b) limit, one CUDA graph"] = _captured(_member_steps(copy.deepcopy(base), x, y, args.amp))
    for label, graphed in (("(c) group, eager", False), ("(d) group, cuda_graph=True", True)):
        if graphed and not graphs:
            continue
        models = copy.deepcopy(base)
        group = CompetitiveGroup(
            models, [_optimizer(m) for m in models], warmup_steps=0, cuda_graph=graphed,
            autocast_dtype=torch.bfloat16 if args.amp == "bf16" else None,
        )
        variants[label] = (lambda g: lambda: g.step((x, y)))(group)
    timed, times = _timer(device), {k: [] for k in variants}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for step in range(args.warmup + args.steps):
            for label, fn in variants.items():  # interleaved: one step of each variant in turn
                t = timed(fn)
                if step >= args.warmup:
                    times[label].append(t)

    def of(label, reference):  # measured in the same rounds: the median of the per-round ratios
        return statistics.median(a / b for a, b in zip(times[label], times[reference]))

    result = {
        k: {"median_ms": 1e3 * statistics.median(v), "ratio": of(k, "(a) limit, eager"),
            "samples_ms": [1e3 * t for t in v]}
        for k, v in times.items()
    }
    if graphs:
        result["(d) group, cuda_graph=True"]["of_captured_limit"] = of(
            "(d) group, cuda_graph=True", "(b) limit, one CUDA graph"
        )
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--groups", default="2 x resnet32", help="e.g. '2 x resnet32,2 x resnet18tv'")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--amp", choices=("bf16",))
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path("runs/graph"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    timing = "CUDA events after a synchronize" if device.type == "cuda" else "perf_counter"
    setup = dict(device=name, torch=torch.__version__, batch=args.batch, amp=args.amp, warmup=args.warmup,
                 steps=args.steps, timing=timing)
    print("setup:", json.dumps(setup))
    results = {}
    for spec in args.groups.split(","):
        count, member = (s.strip() for s in spec.split(" x "))
        results[spec.strip()] = bench([member] * int(count), args, device)
        print(f"\n{spec.strip()}, batch {args.batch}, {args.amp or 'fp32'}")
        print("| variant | median | / (a) |\n|---|---|---|")
        for label, v in results[spec.strip()].items():
            extra = f" ({v['of_captured_limit']:.3f} x (b))" if "of_captured_limit" in v else ""
            print(f"| {label} | {v['median_ms']:.2f} ms | {v['ratio']:.3f} x{extra} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "graph.json").write_text(json.dumps({"setup": setup, "group": results}, indent=1))


if __name__ == "__main__":
    main()
