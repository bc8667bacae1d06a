"""``benchmarks/step.py --part dense``: a segmentation pair, a teacher per pixel, against its limit.

``lraspp_mobilenet_v3_large`` beside ``deeplabv3_mobilenet_v3_large`` (torchvision, ``weights=None``),
21 classes, ``--dense-batch`` maps of ``--dense-size`` pixels (default 8 x 128 x 128), targets with 5 %
of the pixels ``ignore_index=255``. One step of each variant in turn, interleaved step by step, each
ratio the median of the per-round ratios: (a) the limit, each member's own training step (forward,
``F.cross_entropy(..., ignore_index=255)``, backward, optimizer step) in turn; the group with
``granularity="position"``: (b) with no term (its CE, competition and graph cut: the floor of any
term), (d) / (e) with the default ``kl``, eager / compiled, (d+) / (e+) with the example's terms
(``kl`` + ``CWD(5.0, on="logits")``), eager / compiled. Then the step math alone
(``step_losses`` forward + backward on the pair's logits), eager and compiled, interleaved with
``torch.utils.benchmark.Timer``.
"""

import copy
import statistics
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, lraspp_mobilenet_v3_large

from competitive import CWD, KL, CompetitiveGroup, step_losses


def _pair():
    return [
        lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21),
        deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21),
    ]


def _optimizers(models):
    return [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]


def _limit(models, x, y):
    optimizers = _optimizers(models)

    def step():
        for m, o in zip(models, optimizers):
            F.cross_entropy(m(x)["out"], y, ignore_index=255).backward()
            o.step()
            o.zero_grad(set_to_none=True)

    return step


def _math(fn, logits, y, terms):
    out = fn(logits, y, terms=terms, granularity="position", ignore_index=255)
    (out.ce + sum(out.terms.values())).sum().backward()


def bench_dense(args, device, timed):
    torch.manual_seed(0)
    base = [m.to(device) for m in _pair()]
    size = args.dense_size
    x = torch.randn(args.dense_batch, 3, size, size, device=device)
    y = torch.randint(0, 21, (args.dense_batch, size, size), device=device)
    y[torch.rand(y.shape, device=device) < 0.05] = 255
    variants = {"(a) limit": _limit(copy.deepcopy(base), x, y)}
    for label, terms, compiled in [
        ("(b) CE only (terms=[])", [], False),
        ("(d) best eager, kl", [KL()], False),
        ("(e) best compiled, kl", [KL()], True),
        ("(d+) best eager, kl + cwd", [KL(), CWD(5.0, on="logits")], False),
        ("(e+) best compiled, kl + cwd", [KL(), CWD(5.0, on="logits")], True),
    ]:
        models = copy.deepcopy(base)
        group = CompetitiveGroup(
            models, _optimizers(models), logits_from="out", ignore_index=255, granularity="position", terms=terms,
            compile=compiled, warmup_steps=0, keep_cpu_memory=args.keep_cpu_memory,
        )  # fmt: skip
        variants[label] = (lambda g: lambda: g.step((x, y)))(group)
    times = {k: [] for k in variants}
    for step in range(args.warmup + args.steps):
        for label, fn in variants.items():  # interleaved: one step of each variant in turn
            t = timed(fn, device)
            if step >= args.warmup:
                times[label].append(t)

    def of(label, reference):
        return statistics.median(a / b for a, b in zip(times[label], times[reference]))

    result = {k: {"median_ms": 1e3 * statistics.median(v), "ratio": of(k, "(a) limit")} for k, v in times.items()}
    result["(e) best compiled, kl"]["of_eager"] = of("(e) best compiled, kl", "(d) best eager, kl")
    result["(e+) best compiled, kl + cwd"]["of_eager"] = of("(e+) best compiled, kl + cwd", "(d+) best eager, kl + cwd")
    print("| variant | median ms | / limit | / eager |\n|---|---|---|---|")
    for label, r in result.items():
        of_eager = f"{r['of_eager']:.3f}" if "of_eager" in r else ""
        print(f"| {label} | {r['median_ms']:.0f} | {r['ratio']:.3f} | {of_eager} |", flush=True)
    result["math"] = _bench_math(args, base, x, y)
    return result


def _bench_math(args, models, x, y):
    with torch.no_grad():
        logits = [m.eval()(x)["out"] for m in models]
    leaves = [z.detach().requires_grad_() for z in logits]
    terms = [KL(), CWD(5.0, on="logits")]
    compiled = torch.compile(step_losses, fullgraph=True)
    variants = {
        "eager": partial(_math, step_losses, leaves, y, terms),
        "compiled": partial(_math, compiled, leaves, y, terms),
    }
    timers = {k: Timer(stmt="fn()", globals={"fn": fn}) for k, fn in variants.items()}
    for timer in timers.values():
        timer.timeit(2)  # warm-up, and the compile
    times = {k: [] for k in variants}
    for _ in range(args.loss_steps):
        for k, timer in timers.items():
            times[k].append(timer.timeit(3).mean)
    ratios = [c / e for c, e in zip(times["compiled"], times["eager"])]
    out = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    out["compiled_of_eager"] = statistics.median(ratios)
    print(
        f"\nstep math alone (step_losses forward + backward, kl + cwd on logits {list(logits[0].shape)}, position): "
        f"eager {out['eager']:.1f} ms, compiled {out['compiled']:.1f} ms, "
        f"compiled / eager {out['compiled_of_eager']:.3f}"
    )
    return out
