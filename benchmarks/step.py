"""Step time of a group against its limit, and the loss math alone, eager vs compiled.

    python benchmarks/step.py                 # both parts, on CUDA when available, else CPU
    python benchmarks/step.py --part group    # or --part loss, --part dense

Part 1 (``group``): for each group of members, one step of each variant in turn, interleaved
step by step, over ``--steps`` steps after ``--warmup``; each ratio is the median of the per-round
ratios, beside the median time and the median count of minor page faults per step (``getrusage``):
(a) the limit: each member's plain training step (forward, CE, backward, optimizer step) outside
the group, summed; (b) the group with ``rule="independent"``; (c) ``"mutual"``; (d) ``"best"``
eager; (e) ``"best"`` with ``compile=True``; (f) the authors' public loop structure (forward every
member, then per member: its loss against the members with a lower CE read on the host, zero_grad,
backward, step) with their rule; (g) our group with that rule (``"better"``) and no features, whose
ratio to (f) is printed; (h) the same group through ``loss()``: the summed losses, one backward,
then every optimizer steps. (b)-(e) capture the members' default feature maps (``beta=1``), so they
run the same code and differ in the rule only.

The groups keep freed CPU memory (``keep_cpu_memory``, the default), which is process-wide: with
it, every variant of the run, the limit included, runs with glibc keeping freed memory from the
start; ``--no-keep-cpu-memory`` runs all of them at glibc's adaptive default. ``--allocator``
re-runs the script under glibc's malloc environment variables or a preloaded jemalloc / tcmalloc.
``--profile STEPS`` then prints ``torch.profiler`` tables (time and memory) of (a), (f), (d), (e).

Part ``overhead``: the group's own cost per step, with members of one linear layer, against the
limit and the authors' loop (``torch.utils.benchmark.Timer``, 20 steps a round, interleaved).

Part 2 (``loss``): each knowledge term's math (``step_losses`` forward + backward, KL, feature L2,
MCL, ADM) eager and compiled, against one step of a 2 x ResNet-32 group in the same run; then
``group_loss`` forward + backward for N in {2, 4, 8}, B in {128, 256}, C in {10, 100, 1000}, with
and without ResNet ``layer3``-sized features ``[B, 64, 8, 8]``, eager and compiled. Timed with
``torch.utils.benchmark.Timer``, the variants interleaved round by round. Prints tables and writes
JSON to ``--out``.

Part ``dense``: a torchvision segmentation pair with a teacher per pixel (see ``step_dense.py``).

Part ``lm``: two GPT-2-style causal LMs at a vocabulary of 50,257, step time and peak memory against their
own Hugging Face steps, eager and compiled, and our ``kl`` beside TRL's and torchtune's (see ``step_lm.py``).
"""

import argparse
import copy
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import build  # noqa: E402
from step_dense import bench_dense  # noqa: E402
from step_lm import SIZES, bench_lm, peak  # noqa: E402

from competitive import CompetitiveGroup, group_loss, step_losses  # noqa: E402
from competitive.memory import keep_freed_memory  # noqa: E402
from competitive.terms import TERMS  # noqa: E402

# malloc settings for --allocator: glibc's environment variables that keep freed memory, or a
# preloaded allocator (Debian: libjemalloc2, libtcmalloc-minimal4)
ALLOCATORS = {
    "glibc": {},
    "tuned": {
        "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
        "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
        "MALLOC_TOP_PAD_": str(2**30),
    },
    "jemalloc": {"LD_PRELOAD": "libjemalloc.so.2"},
    "tcmalloc": {"LD_PRELOAD": "libtcmalloc_minimal.so.4"},
}


def _preloadable(library: str) -> str:
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        if os.path.exists(os.path.join(folder, library)):
            return os.path.join(folder, library)
    found = shutil.which(library)
    if found is None:
        raise SystemExit(
            f"--allocator: {library} is not installed (Debian: apt-get install libjemalloc2 / libtcmalloc-minimal4)"
        )
    return found


GROUPS = {
    "2 x resnet32": ["resnet32", "resnet32"],
    "2 x resnet18tv": ["resnet18tv", "resnet18tv"],  # compute-bound on a GPU (batch 256 in benchmarks/gpu.sh)
    "4 x resnet20": ["resnet20"] * 4,
    "resnet20 + mobilenet0.5": ["resnet20", "mobilenet0.5"],
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _optimizers(models):
    return [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4) for m in models]


def _autocast(x, amp):
    """bf16 autocast where ``--amp bf16`` asks for it (the group's ``autocast_dtype``), else nothing."""
    return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def _limit(models, x, y, amp=None):
    """The limit: each member's plain training step (forward, CE, backward, optimizer step), in turn."""
    optimizers = _optimizers(models)

    def step():
        for m, o in zip(models, optimizers):
            with _autocast(x, amp):
                logits = m(x)
            F.cross_entropy(logits.float(), y).backward()
            o.step()
            o.zero_grad(set_to_none=True)

    return step


def _authors_loop(models, x, y, amp=None):
    """The structure of the authors' public training loop: forward every member, then for each member
    in turn its loss against the members with a lower CE (compared on the host), its own zero_grad,
    backward and optimizer step."""
    optimizers = _optimizers(models)

    def step():
        with _autocast(x, amp):
            outputs = [m(x).float() for m in models]
        ces = [F.cross_entropy(z, y) for z in outputs]
        for i, optimizer in enumerate(optimizers):
            better = [j for j in range(len(outputs)) if j != i and ces[j].item() < ces[i].item()]
            loss = ces[i]
            for j in better:
                kl = F.kl_div(outputs[i].log_softmax(1), outputs[j].detach().softmax(1), reduction="batchmean")
                loss = loss + kl / len(better)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


def bench_group(names, args, device):
    torch.manual_seed(0)
    built = [build(n) for n in names]
    base = [m.to(device).to(memory_format=torch.channels_last) for m, _ in built]
    hooks = [h for _, h in built]
    x = torch.randn(args.batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device)
    variants = {
        "(a) limit": _limit(copy.deepcopy(base), x, y, args.amp),
        "(f) authors' loop, better": _authors_loop(copy.deepcopy(base), x, y, args.amp),
    }
    for label, rule, compiled in [
        ("(b) independent", "independent", False),
        ("(c) mutual", "mutual", False),
        ("(d) best eager", "best", False),
        ("(e) best compiled", "best", True),
        ("(g) ours, better, no features", "better", False),
        ("(h) ours, better, loss() + one backward", "better", False),
    ]:
        models = copy.deepcopy(base)
        features = dict(feature_hooks=hooks, example_input=x[:2]) if label[1] not in "gh" else {}
        group = CompetitiveGroup(
            models,
            _optimizers(models),
            rule=rule,
            compile=compiled,
            warmup_steps=0,
            keep_cpu_memory=args.keep_cpu_memory,
            autocast_dtype=torch.bfloat16 if args.amp == "bf16" else None,
            **features,
        )
        variants[label] = (
            (lambda g: lambda: g.step((x, y)))(group) if label[1] != "h" else partial(_summed, group, x, y)
        )
    times = {k: [] for k in variants}
    faults = {k: [] for k in variants}
    for step in range(args.warmup + args.steps):
        for label, fn in variants.items():  # interleaved: one step of each variant in turn
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = _timed(fn, device)
            if step >= args.warmup:
                times[label].append(t)
                faults[label].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    if args.profile:
        _profile(variants, args.profile)

    def of(label, reference):  # measured in the same rounds: the median of the per-round ratios
        return statistics.median(a / b for a, b in zip(times[label], times[reference]))

    result = {
        k: {
            "median_ms": 1e3 * statistics.median(v),
            "ratio": of(k, "(a) limit"),
            "faults": statistics.median(faults[k]),
            "samples_ms": [1e3 * t for t in v],
        }
        for k, v in times.items()
    }
    for label in ("(g) ours, better, no features", "(h) ours, better, loss() + one backward"):
        result[label]["of_authors"] = of(label, "(f) authors' loop, better")
    result["(e) best compiled"]["of_eager"] = of("(e) best compiled", "(d) best eager")
    return result


def bench_overhead(args, device):
    """The group's own cost per step: members so small (one linear layer on 3 x 8 x 8 inputs) that the
    step is all bookkeeping; the limit, the authors' loop and the group's rules, interleaved."""
    torch.manual_seed(0)
    n = 2
    base = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).to(device) for _ in range(n)]
    x = torch.randn(args.batch, 3, 8, 8, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    variants = {
        "limit": _limit(copy.deepcopy(base), x, y),
        "authors' loop, better": _authors_loop(copy.deepcopy(base), x, y),
    }
    for rule, compiled in (("better", False), ("independent", False), ("best", False), ("best", True)):
        models = copy.deepcopy(base)
        group = CompetitiveGroup(models, _optimizers(models), rule=rule, compile=compiled, warmup_steps=0)
        variants[f"group, {rule}{', compiled' if compiled else ''}"] = (lambda g: lambda: g.step((x, y)))(group)
    medians = _interleaved(variants, rounds=args.overhead_rounds, number=20)
    print("| variant | ms per step |\n|---|---|")
    for label, t in medians.items():
        print(f"| {label} | {1e3 * t:.3f} |", flush=True)
    return {label: 1e3 * t for label, t in medians.items()}


def _profile(variants, steps):
    """``torch.profiler`` (time and memory) over ``steps`` steps of the limit, the authors' loop and
    the ``best`` group eager and compiled: each variant's top operators by self CPU time, with the
    memory they allocate and the number of calls."""
    for label in ("(a) limit", "(f) authors' loop, better", "(d) best eager", "(e) best compiled"):
        with torch.profiler.profile(profile_memory=True) as prof:
            for _ in range(steps):
                variants[label]()
        print(f"\ntorch.profiler, {label}, {steps} steps", flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)


def _summed(group, x, y):
    """The ``loss()`` path: the summed losses, one backward, then every optimizer steps."""
    total, _ = group.loss((x, y))
    total.backward()
    for optimizer in group.optimizers:
        optimizer.step()
    group.zero_grad()


def _interleaved(variants: dict, rounds: int, number: int) -> dict[str, float]:
    """Median seconds per call of each variant: ``rounds`` rounds of ``torch.utils.benchmark.Timer``
    (``number`` calls each, CUDA synchronized), the variants interleaved round by round."""
    timers = {k: Timer(stmt="fn()", globals={"fn": fn}) for k, fn in variants.items()}
    for timer in timers.values():
        timer.timeit(2)  # warm-up (and the compile)
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, timer in timers.items():
            times[k].append(timer.timeit(number).mean)
    return {k: statistics.median(v) for k, v in times.items()}


def _loss_step(fn, logits, y, features):
    terms, _, _ = fn(logits, y, features)
    terms.loss.sum().backward()


def _term_step(fn, terms, logits, y, features, embeddings):
    out = fn(logits, y, terms=terms, features=features, embeddings=embeddings, rule="best")
    (out.ce + sum(out.terms.values())).sum().backward()


def bench_terms(args, device):
    """Each term's math (forward + backward of ``step_losses``), eager and compiled, at the sizes of
    a 2 x ResNet-32 CIFAR-10 group (logits [B, 10], layer3 maps [B, 64, 8, 8], embeddings [B, 64]),
    against one training step of that group (interleaved in the same run)."""
    torch.manual_seed(0)
    b, c, n = args.batch, 10, 2
    g = torch.Generator(device=device).manual_seed(0)
    logits = [torch.randn(b, c, device=device, generator=g, requires_grad=True) for _ in range(n)]
    features = [torch.randn(b, 64, 8, 8, device=device, generator=g, requires_grad=True) for _ in range(n)]
    embeddings = [torch.randn(b, 64, device=device, generator=g, requires_grad=True) for _ in range(n)]
    channels_last = [f.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for f in features]
    y = torch.randint(0, c, (b,), device=device, generator=g)
    models = [build("resnet32")[0].to(device).to(memory_format=torch.channels_last) for _ in range(n)]
    group = CompetitiveGroup(models, _optimizers(models), feature_hooks=["layer3"] * n, warmup_steps=0)
    x = torch.randn(b, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    variants = {"2 x resnet32 step (kl + feature)": lambda: group.step((x, y))}
    for name in ("kl", "feature", "mcl", "adm"):
        term = TERMS[name]()
        if name == "mcl":
            term.build({"embeddings": [(64,)] * n})
        elif name in ("feature", "adm"):
            term.build({"features": [(64, 8, 8)] * n})
        terms = torch.nn.ModuleList([term]).to(device)
        for label, fn in (("eager", step_losses), ("compiled", torch.compile(step_losses, fullgraph=True))):
            variants[f"{name} {label}"] = partial(_term_step, fn, terms, logits, y, features, embeddings)
            if name == "feature":
                # the same values laid out channels_last, as hooked from channels_last members (the
                # group hands the terms contiguous copies: this row shows why)
                variants[f"feature-on-channels_last-maps {label}"] = partial(
                    _term_step, fn, terms, logits, y, channels_last, embeddings
                )
    torch._dynamo.reset()
    medians = _interleaved(variants, rounds=args.loss_steps, number=1)
    step = medians.pop("2 x resnet32 step (kl + feature)")
    rows = [{"term": "2 x resnet32 step", "ms": 1e3 * step, "of_step": 1.0}]
    print(f"| term | variant | ms | / 2 x ResNet-32 step ({1e3 * step:.0f} ms) |\n|---|---|---|---|")
    for label, t in medians.items():
        name, variant = label.split()
        rows.append({"term": name, "variant": variant, "ms": 1e3 * t, "of_step": t / step})
        print(f"| {name} | {variant} | {1e3 * t:.2f} | {t / step:.4f} |", flush=True)
    return rows


def bench_loss(args, device):
    rows = []
    for n in (2, 4, 8):
        for b in (128, 256):
            for c in (10, 100, 1000):
                for feats in (False, True):
                    torch._dynamo.reset()
                    g = torch.Generator(device=device).manual_seed(0)
                    logits = [torch.randn(b, c, device=device, generator=g, requires_grad=True) for _ in range(n)]
                    features = (
                        [torch.randn(b, 64, 8, 8, device=device, generator=g, requires_grad=True) for _ in range(n)]
                        if feats
                        else None
                    )
                    y = torch.randint(0, c, (b,), device=device, generator=g)
                    compiled = torch.compile(group_loss, fullgraph=True, dynamic=False)
                    variants = {
                        "eager": partial(_loss_step, group_loss, logits, y, features),
                        "compiled": partial(_loss_step, compiled, logits, y, features),
                    }
                    medians = _interleaved(variants, rounds=args.loss_steps, number=5)
                    eager, comp = medians["eager"], medians["compiled"]
                    rows.append(
                        {
                            "N": n,
                            "B": b,
                            "C": c,
                            "features": feats,
                            "eager_ms": 1e3 * eager,
                            "compiled_ms": 1e3 * comp,
                            "speedup": eager / comp,
                        }
                    )
                    print(
                        f"  N={n} B={b:>3} C={c:>4} features={'yes' if feats else 'no ':<3} "
                        f"eager {1e3 * eager:8.3f} ms  compiled {1e3 * comp:8.3f} ms  x{eager / comp:5.2f}",
                        flush=True,
                    )
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "group", "loss", "overhead", "dense", "lm"), default="all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--amp", choices=("bf16",), help="--part group: members under bf16 autocast (limit and group)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--loss-steps", type=int, default=30)
    p.add_argument("--overhead-rounds", type=int, default=30)
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="--part group: after the timing, profile this many steps of (a), (f), (d), (e) with torch.profiler",
    )
    p.add_argument("--groups", default=",".join(g for g in GROUPS if "18" not in g), help=f"from {list(GROUPS)}")
    p.add_argument("--no-grid", action="store_true", help="--part loss: the per-term table only")
    p.add_argument("--dense-batch", type=int, default=8, help="--part dense: maps per batch")
    p.add_argument("--dense-size", type=int, default=128, help="--part dense: height = width of the maps")
    p.add_argument("--lm-batch", type=int, default=8, help="--part lm: sequences per batch")
    p.add_argument("--lm-context", type=int, default=256, help="--part lm: tokens per sequence")
    p.add_argument("--lm-peak", nargs=2, metavar=("KIND", "VARIANT"), help=argparse.SUPPRESS)  # a fresh process
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument(
        "--allocator",
        choices=list(ALLOCATORS),
        default="glibc",
        help="re-run under glibc's malloc environment variables that keep freed memory ('tuned'), or with "
        "jemalloc / tcmalloc preloaded (see README: CPU allocator). Default: glibc, no environment variable",
    )
    p.add_argument(
        "--keep-cpu-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the groups' keep_cpu_memory (default: on, the library's default); with it, glibc keeps freed "
        "memory from the start for every variant of the process (it is process-wide)",
    )
    args = p.parse_args()
    if args.lm_peak:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        print(json.dumps(peak(*args.lm_peak, args)))
        return
    wanted = dict(ALLOCATORS[args.allocator])
    if "LD_PRELOAD" in wanted:
        wanted["LD_PRELOAD"] = _preloadable(wanted["LD_PRELOAD"])
    if any(os.environ.get(k) != v for k, v in wanted.items()):
        os.environ.update(wanted)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    device = torch.device(args.device)
    cpu_memory = keep_freed_memory() if args.keep_cpu_memory and device.type == "cpu" else "glibc default"
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))  # one thread per core this process may use
    threads = torch.get_num_threads()
    malloc = args.allocator
    print(
        f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'})"
        f" torch={torch.__version__} threads={threads} cores={len(os.sched_getaffinity(0))} batch={args.batch} "
        f"warmup={args.warmup} steps={args.steps} allocator={malloc} cpu_memory={cpu_memory} amp={args.amp}"
        " (medians; variants interleaved step by step)",
        flush=True,
    )
    out = {
        "setup": {
            "device": str(device),
            "torch": torch.__version__,
            "threads": threads,
            "batch": args.batch,
            "warmup": args.warmup,
            "steps": args.steps,
            "allocator": malloc,
            "cpu_memory": cpu_memory,
            "amp": args.amp,
        }
    }
    if args.part == "dense":
        out["setup"].update(dense_batch=args.dense_batch, dense_size=args.dense_size)
    if args.part == "lm":
        out["setup"].update(lm_batch=args.lm_batch, lm_context=args.lm_context, vocabulary=50257)
    if args.part in ("all", "group"):
        out["group"] = {}
        for name in args.groups.split(","):
            print(f"\n{name}, batch {args.batch}", flush=True)
            result = bench_group(GROUPS[name], args, device)
            out["group"][name] = result
            print("| variant | median ms | / limit | / authors' loop | / eager | minor page faults per step |")
            print("|---|---|---|---|---|---|")
            for label, r in result.items():
                of_authors, of_eager = (f"{r[k]:.3f}" if k in r else "" for k in ("of_authors", "of_eager"))
                print(
                    f"| {label} | {r['median_ms']:.1f} | {r['ratio']:.3f} | {of_authors} | {of_eager} "
                    f"| {r['faults']:.0f} |",
                    flush=True,
                )
    if args.part in ("all", "overhead"):
        print("\nthe group's own cost per step (members of one linear layer, batch of 3 x 8 x 8 inputs)", flush=True)
        out["overhead"] = bench_overhead(args, device)
    if args.part in ("all", "loss"):
        print("\neach term's math, forward + backward (step_losses, rule='best'), eager and compiled", flush=True)
        out["terms"] = bench_terms(args, device)
        if not args.no_grid:
            print("\nloss math forward + backward (group_loss, rule='best'), eager vs compiled", flush=True)
            out["loss"] = bench_loss(args, device)
    if args.part == "dense":
        print(
            f"\nsegmentation pair, batch {args.dense_batch} x {args.dense_size} x {args.dense_size}, 21 classes",
            flush=True,
        )
        out["dense"] = bench_dense(args, device, _timed)
    if args.part == "lm":
        sizes = " and ".join(f"{n} x {w}" for n, w, _ in SIZES["cuda" if device.type == "cuda" else "cpu"])
        print(f"\ntwo GPT-2-style LMs ({sizes}), batch {args.lm_batch} x {args.lm_context}", flush=True)
        out["lm"] = bench_lm(args, device, _timed)
    args.out.mkdir(parents=True, exist_ok=True)
    memory = "" if args.keep_cpu_memory or device.type != "cpu" else "-nokeep"
    path = args.out / f"step-{device.type}-{args.part}-{malloc}{memory}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
