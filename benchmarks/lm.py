"""Two causal language models trained together on Tiny Shakespeare, byte by byte.

    python benchmarks/lm.py --seeds 0,1,2                          # every setting, writes runs/lm/
    python benchmarks/lm.py --merge runs/lm-0/results.json ...     # merge runs split by seed

A GPT-2-style and a Llama-style model of comparable size from ``transformers`` configs (2 layers,
width 128, byte-level vocabulary of 256; nothing is downloaded) on ``--data`` (default
``$TINYSHAKESPEARE`` or the first ``shared/data/tinyshakespeare/input.txt`` beside the repository):
the first 90 % of the bytes for training, the last 10 % for validation. Context 128, batch 32, AdamW
(lr 1e-3, cosine to 10 %), the same initial weights and the same batches for every setting of a seed.
Settings: ``independent``, ``mutual``, ``competitive`` at ``batch``, ``sample`` and ``position``
granularity (rule ``best``, forward KL), and ``competitive-position-jsd`` (``KL(divergence="jsd")``).
Every ``--eval-every`` steps each member's validation loss (nats per byte, the mean over
``--eval-windows`` fixed windows) is recorded, with the training CE, KL and teacher share per step.
Writes ``results.json``, ``table.md`` and ``val_loss.png`` to ``--out``.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from hf_causal_lm import find_text, members  # noqa: E402

from competitive import KL, CompetitiveGroup  # noqa: E402

# name -> (rule, granularity, divergence)
SETTINGS = {
    "independent": ("independent", "batch", "forward"),
    "mutual": ("mutual", "position", "forward"),
    "competitive-batch": ("best", "batch", "forward"),
    "competitive-sample": ("best", "sample", "forward"),
    "competitive-position": ("best", "position", "forward"),
    "competitive-position-jsd": ("best", "position", "jsd"),
}
NAMES = ("gpt2", "llama")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("runs/lm"))
    p.add_argument("--merge", type=Path, nargs="+", help="train nothing: merge results.json files, then report")
    args = p.parse_args(argv)
    args.settings, args.seeds = args.settings.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    return args


def split(args):
    data = torch.tensor(list(find_text(args.data).read_bytes()), dtype=torch.long)
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:]


def windows(data, starts, context, device="cpu"):
    return torch.stack([data[s : s + context] for s in starts.tolist()]).to(device)


def run(setting: str, seed: int, train, val, args) -> dict:
    rule, granularity, divergence = SETTINGS[setting]
    torch.manual_seed(seed)
    nets = [n.to(args.device) for n in members(width=args.width, layers=args.layers, context=args.context)]
    optimizers = [torch.optim.AdamW(n.parameters(), lr=args.lr) for n in nets]
    schedulers = [
        torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * s / args.steps)))
        for o in optimizers
    ]
    group = CompetitiveGroup(
        nets, optimizers, class_dim=-1, shift_targets=True, granularity=granularity, rule=rule,
        terms=[KL(divergence=divergence)], seed=seed,
    )  # fmt: skip
    batches = torch.Generator().manual_seed(seed)  # the same batches for every setting of a seed
    val_starts = torch.linspace(0, len(val) - args.context - 1, args.eval_windows).long()
    history = {"step": [], "val": [], "ce": [], "kl": [], "share": [], "time": 0.0}
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = windows(
            train, torch.randint(0, len(train) - args.context, (args.batch,), generator=batches), args.context,
            args.device,
        )
        result = group.step((ids, ids))
        for scheduler in schedulers:
            scheduler.step()
        s = result.scalars()
        history["ce"].append([s["ce/0"], s["ce/1"]])
        history["kl"].append([s["kl/0"], s["kl/1"]])
        history["share"].append([s["teacher_share/0"], s["teacher_share/1"]])
        if step % args.eval_every == 0 or step == args.steps:
            group.eval()
            losses = []
            for chunk in val_starts.split(32):
                ids = windows(val, chunk, args.context, args.device)
                losses.append(group.evaluate((ids, ids)).ce * len(chunk))
            group.train()
            history["step"].append(step)
            history["val"].append((torch.stack(losses).sum(0) / len(val_starts)).tolist())
    history["time"] = time.perf_counter() - start
    return history


def table(results: dict, args) -> str:
    lines = [
        f"validation loss (nats per byte) after {args.steps} steps, mean ± std over seeds {args.seeds}; teacher "
        "share: the share of the valid tokens (or samples, batches) each member taught over training",
        "",
        "| setting | gpt2 | llama | teacher share % (gpt2 / llama) | s per run |",
        "|---|---|---|---|---|",
    ]
    for setting in args.settings:
        runs = [results[setting][str(seed)] for seed in args.seeds]
        cells = []
        for i in range(2):
            final = [r["val"][-1][i] for r in runs]
            sd = statistics.stdev(final) if len(final) > 1 else 0.0
            cells.append(f"{statistics.mean(final):.4f} ± {sd:.4f}")
        share = [100 * statistics.mean(statistics.mean(s[i] for s in r["share"]) for r in runs) for i in range(2)]
        taught = "-" if SETTINGS[setting][0] in ("independent", "mutual") else f"{share[0]:.0f} / {share[1]:.0f}"
        secs = statistics.median(r["time"] for r in runs)
        lines.append(f"| {setting} | {cells[0]} | {cells[1]} | {taught} | {secs:.0f} |")
    return "\n".join(lines)


def plot(results: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for k, setting in enumerate(args.settings):
        runs = [results[setting][str(seed)] for seed in args.seeds]
        steps = runs[0]["step"]
        for i, ax in enumerate(axes):
            mean = [statistics.mean(r["val"][t][i] for r in runs) for t in range(len(steps))]
            ax.plot(steps, mean, marker=".", color=f"C{k}", label=setting)
    for i, ax in enumerate(axes):
        ax.set(xlabel="step", title=f"{NAMES[i]}: validation loss (mean over seeds)")
    axes[0].set_ylabel("nats per byte")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "val_loss.png", dpi=120)


def report(results: dict, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    saved = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    (args.out / "results.json").write_text(json.dumps(saved))
    text = table(results, args)
    print("\n" + text)
    (args.out / "table.md").write_text(text + "\n")
    plot(results, args)
    print(f"\nwrote {args.out}/results.json, table.md, val_loss.png")


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        results: dict = {s: {} for s in args.settings}
        for path in args.merge:
            for setting, runs in json.loads(path.read_text())["results"].items():
                results.setdefault(setting, {}).update(runs)
        return report(results, args)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(
        f"settings={args.settings} seeds={args.seeds} steps={args.steps} context={args.context} batch={args.batch} "
        f"width={args.width} layers={args.layers} lr={args.lr} torch={torch.__version__} "
        f"threads={torch.get_num_threads()} python={platform.python_version()}",
        flush=True,
    )
    train, val = split(args)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {s: {} for s in args.settings}
    for seed in args.seeds:
        for setting in args.settings:
            history = run(setting, seed, train, val, args)
            results[setting][str(seed)] = history
            print(f"{setting:>26} seed {seed}: val {[f'{v:.4f}' for v in history['val'][-1]]} "
                  f"({history['time']:.0f} s)", flush=True)  # fmt: skip
            (args.out / "results.json").write_text(json.dumps({"results": results}))
    report(results, args)


if __name__ == "__main__":
    main()
