"""``benchmarks/step.py --part lm``: two GPT-2-style causal LMs at a real vocabulary against their own steps.

Members from ``transformers`` configs (no download): 2 and 4 layers of width 128, 4 heads, vocabulary 50,257,
context ``--lm-context`` (256), batch ``--lm-batch`` (8) of random token ids (labels = ids), AdamW.

Time, in this process, one step of each variant in turn, interleaved step by step, each ratio the median of
the per-round ratios: (a) the limit, each member's own Hugging Face training step in turn
(``model(ids, labels=ids).loss.backward()``, optimizer step); the group (``shift_targets=True``,
``class_dim=-1``, ``granularity="position"``, the default ``kl``, ``warmup_steps=0``) with the step math over
chunks of positions (``chunk_rows=None``: chunked at this vocabulary): (b) eager, (c) ``compile=True``,
(d) eager with ``KL(divergence="jsd")``; (e) the whole step math (``chunk_rows=0``), eager, for reference.

Peak memory: on a CPU each variant again in a fresh process (``--lm-peak``), the peak resident set
(``VmHWM``) over ``--warmup`` + 3 steps; every process keeps freed memory as the group does
(``keep_freed_memory``). On a GPU (``--device cuda``): the peak of allocated memory over the same steps, each
variant on its own in this process; the members are then GPT-2 configs of 4 x 512 and 8 x 768 under bf16
autocast with fused AdamW (``SIZES``), and the times are CUDA-synchronized.

Then the divergence alone on the same tensors (the two members' logits at this size, the 4-layer member
teaching the 2-layer one, whose logits require grad): forward + backward of (f) our step math
(:func:`competitive.chunked.chunked_losses`, ``fixed_teacher=1``: both CEs and the student's KL), (g) TRL's
``GKDTrainer.generalized_jsd_loss`` (``beta=0``: the forward KL), (h) torchtune's
``ForwardKLWithChunkedOutputLoss`` (8 chunks), (i) the whole step math (``step_losses``); and for the JSD
(beta 0.5) (j) ours, (k) TRL's. Time with ``torch.utils.benchmark.Timer``, interleaved; peak in a fresh
process each, reported as the peak above the resident set once the logits exist.
"""

import json
import statistics
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch

from competitive import KL, CompetitiveGroup, step_losses
from competitive.chunked import chunked_losses
from competitive.memory import keep_freed_memory

VOCAB = 50257
CPU = torch.device("cpu")
STEPS = ("limit", "eager", "compiled", "eager-jsd", "whole")
LOSSES = ("ours-kl", "trl-kl", "torchtune-kl", "whole-kl", "ours-jsd", "trl-jsd")


# per device: (layers, width, heads) of the two members; on a GPU GPT-2 small's width, bf16 autocast, fused AdamW
SIZES = {"cpu": ((2, 128, 4), (4, 128, 4)), "cuda": ((4, 512, 8), (8, 768, 12))}


def _members(context, device):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = dict(vocab_size=VOCAB, n_positions=context)
    sizes = SIZES["cuda" if device.type == "cuda" else "cpu"]
    models = [GPT2LMHeadModel(GPT2Config(n_layer=n, n_embd=w, n_head=h, **config)).to(device) for n, w, h in sizes]
    fused = device.type == "cuda"
    return models, [torch.optim.AdamW(m.parameters(), lr=1e-4, fused=fused) for m in models]


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _step(variant, args, device=CPU):
    """One training step of ``variant`` on a fixed batch, as a callable."""
    models, optimizers = _members(args.lm_context, device)
    ids = torch.randint(0, VOCAB, (args.lm_batch, args.lm_context), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    if variant == "limit":

        def step():
            for model, optimizer in zip(models, optimizers):
                with _autocast(device):
                    loss = model(ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return step
    terms = [KL(divergence="jsd")] if variant == "eager-jsd" else ["kl"]
    group = CompetitiveGroup(
        models, optimizers, shift_targets=True, class_dim=-1, granularity="position", terms=terms, warmup_steps=0,
        compile=variant == "compiled", chunk_rows=0 if variant == "whole" else None,
        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
    )  # fmt: skip
    return partial(group.step, (ids, ids))


def _loss(name, args, device=CPU):
    """Forward + backward of one divergence on the two members' logits, as a callable."""
    g = torch.Generator().manual_seed(2)
    shape = (args.lm_batch, args.lm_context, VOCAB)
    student, teacher = torch.randn(shape, generator=g).to(device).requires_grad_(), torch.randn(shape, generator=g)
    teacher, labels = teacher.to(device), torch.randint(0, VOCAB, shape[:2], generator=g).to(device)
    kw = dict(fixed_teacher=1, granularity="position", class_dim=-1, shift_targets=True)
    if name in ("ours-kl", "ours-jsd", "whole-kl"):
        fn = step_losses if name == "whole-kl" else chunked_losses
        term = KL(divergence="jsd" if name == "ours-jsd" else "forward")

        def run():
            out = fn([student, teacher], labels, terms=[term], **kw)
            (out.ce.sum() + out.terms["kl"].sum()).backward()
    elif name.startswith("trl"):
        from trl.experimental.gkd import GKDTrainer

        beta = 0.5 if name == "trl-jsd" else 0.0

        def run():
            z, t, y = student[:, :-1], teacher[:, :-1], labels[:, 1:]
            GKDTrainer.generalized_jsd_loss(z, t, labels=y, beta=beta).backward()
    else:
        from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

        loss = ForwardKLWithChunkedOutputLoss(num_output_chunks=8)

        def run():
            chunks = [c.chunk(8, dim=1) for c in (student[:, :-1], teacher[:, :-1])]
            loss(list(chunks[0]), list(chunks[1]), labels[:, 1:]).backward()

    def step():
        run()
        student.grad = None

    return step


def _high_water_mb():
    """This process's peak resident set (``VmHWM``; ``ru_maxrss`` would count the parent's before ``exec``)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def peak(kind, variant, args):
    """In a fresh process: the peak resident set (MB) of ``--warmup`` + 3 steps, and the peak before them."""
    keep_freed_memory()
    step = _step(variant, args) if kind == "step" else _loss(variant, args)
    before = _high_water_mb()
    for _ in range(args.warmup + 3):
        step()
    return {"peak_mb": _high_water_mb(), "before_mb": before}


def _fresh(kind, variant, args):
    command = [sys.executable, str(Path(__file__).with_name("step.py")), "--part", "lm", "--lm-peak", kind, variant]
    command += ["--lm-batch", str(args.lm_batch), "--lm-context", str(args.lm_context), "--warmup", str(args.warmup)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cuda_peak(kind, variant, args, device):
    """On a GPU, in this process: the peak of allocated memory (MB) over ``--warmup`` + 3 steps."""
    torch.cuda.empty_cache()
    step = _step(variant, args, device) if kind == "step" else _loss(variant, args, device)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup + 3):
        step()
    torch.cuda.synchronize()
    del step
    return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20, "before_mb": before}


def bench_lm(args, device, timed):
    """CPU: peak resident memory of a fresh process per variant; GPU: peak allocated memory, in this process."""
    measure = partial(_cuda_peak, device=device) if device.type == "cuda" else _fresh
    peaks = {v: measure("step", v, args) for v in STEPS} if device.type == "cuda" else None
    steps = {v: _step(v, args, device) for v in STEPS}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    rounds = {v: [] for v in STEPS}
    for _ in range(args.steps):
        for v, step in steps.items():
            rounds[v].append(timed(step, device))
    out = {"steps": {}, "losses": {}}
    peaks = peaks or {v: measure("step", v, args) for v in STEPS}
    print("| variant | median s | / limit | peak MB (fresh process) | peak / limit's |")
    print("|---|---|---|---|---|")
    for v in STEPS:
        ratio = statistics.median(t / a for t, a in zip(rounds[v], rounds["limit"]))
        mem = peaks[v]["peak_mb"] / peaks["limit"]["peak_mb"]
        out["steps"][v] = {"median_s": statistics.median(rounds[v]), "ratio": ratio, **peaks[v], "peak_ratio": mem}
        print(f"| {v} | {statistics.median(rounds[v]):.2f} | {ratio:.3f} | {peaks[v]['peak_mb']:.0f} | {mem:.3f} |")
    del steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    losses = {name: _loss(name, args, device) for name in LOSSES if _available(name)}
    times = {name: [] for name in losses}
    for _ in range(max(3, args.steps // 2)):
        for name, fn in losses.items():
            times[name].append(timed(fn, device))
    print("\n| divergence on the same logits (fwd + bwd) | median s | / torchtune | peak above the logits, MB |")
    print("|---|---|---|---|")
    for name in LOSSES:
        if name not in losses:
            print(f"| {name} | not installed | | |")
            continue
        fresh = measure("loss", name, args)
        median = statistics.median(times[name])
        base = statistics.median(times["torchtune-kl"]) if "torchtune-kl" in times else float("nan")
        extra = fresh["peak_mb"] - fresh["before_mb"]
        out["losses"][name] = {"median_s": median, "of_torchtune": median / base, "extra_peak_mb": extra, **fresh}
        print(f"| {name} | {median:.3f} | {median / base:.2f} | {extra:.0f} |", flush=True)
    return out


def _available(name):
    module = {"trl": "trl", "torchtune": "torchtune.modules.loss"}.get(name.split("-")[0])
    if module is None:
        return True
    try:
        __import__(module)
        return True
    except ImportError:
        return False
