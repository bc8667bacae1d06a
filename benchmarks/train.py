"""Train a group on CIFAR under several settings and compare the members' test accuracy.

    python benchmarks/train.py --preset quick   # a few minutes on a CPU (the README's main job)
    python benchmarks/train.py --preset cpu     # the CPU-scale reproduction (3 seeds, Table 4 ablation)
    python benchmarks/train.py --preset paper --device cuda   # the paper's protocol on a GPU

Every setting runs through the same ``CompetitiveGroup`` code path with the same initial weights,
data order and optimizer per seed; only the selection rule, the feature loss and the perturbation
change. Writes ``results.json``, ``fig3a.png`` (per-member CE over steps, teacher marked) and
``fig3b.png`` (test accuracy per epoch per setting) to ``--out``.
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
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import DeviceLoader, default_root, load_cifar  # noqa: E402
from models import build  # noqa: E402

from competitive import KL, CompetitiveGroup, FeatureL2, PerturbationPool  # noqa: E402

# name -> (rule, knowledge terms, perturb_prob, warmup_steps or None for the library's default);
# DML and MCL are published without a feature loss.
# "+F" adds the feature L2 on each model's default feature map, "+P" the perturbation pool at the
# library's default p (0.1, the authors' code), "+P<n>" at p = n %, "adm" the ADM-style spatial term
# on the same maps, "mcl" Mutual Contrastive Learning on the classifier's input (the reference recipe: no logit KL).
SETTINGS = {
    "independent": ("independent", (), 0.0, None),
    "mutual": ("mutual", ("kl",), 0.0, None),
    "competitive": ("best", ("kl",), 0.0, None),
    "competitive-w0": ("best", ("kl",), 0.0, 0),  # the paper's plain behaviour: no warm-up
    "competitive+F": ("best", ("kl", "feature"), 0.0, None),
    "competitive+P": ("best", ("kl",), None, None),  # the library's default p (the authors': every tenth batch)
    "competitive+F+P": ("best", ("kl", "feature"), None, None),
    "competitive+P100": ("best", ("kl",), 1.0, None),  # every batch
    "competitive+F+P100": ("best", ("kl", "feature"), 1.0, None),
    "competitive+P50": ("best", ("kl",), 0.5, None),
    "competitive+P25": ("best", ("kl",), 0.25, None),
    "competitive+P10": ("best", ("kl",), 0.1, None),  # the authors' code perturbs every tenth batch
    "mcl": ("mutual", ("mcl",), 0.0, None),
    "competitive+mcl": ("best", ("mcl",), 0.0, None),
    "mutual+adm": ("mutual", ("kl", "adm"), 0.0, None),
    "competitive+adm": ("best", ("kl", "adm"), 0.0, None),
}

PRESETS = {
    "quick": dict(  # the README's main job: the paper's plain rule against the default, a few minutes
        models="resnet8,resnet20",
        epochs=3,
        train_subset=5000,
        test_subset=2000,
        seeds="0",
        settings="independent,mutual,competitive-w0,competitive",
        warmup_steps=40,  # the run is 117 steps: the library's 150 would never reach full weight
    ),
    "cpu": dict(
        models="resnet8,resnet20",
        epochs=8,
        train_subset=10000,
        test_subset=5000,
        seeds="0,1,2",
        settings="independent,mutual,competitive,competitive-w0,competitive+F,competitive+P100,competitive+F+P100,"
        "mcl,competitive+mcl,mutual+adm,competitive+adm",
    ),
    "paper": dict(
        models="resnet32,resnet32",
        epochs=200,
        train_subset=0,
        test_subset=0,
        seeds="0,1,2",
        settings="independent,mutual,competitive+F,competitive+F+P",
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="quick")
    p.add_argument("--models", help="comma-separated member names (see benchmarks/models.py)")
    p.add_argument("--settings", help=f"comma-separated, from {list(SETTINGS)}")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--train-subset", type=int, help="train on the first N images of a fixed shuffle (0: all)")
    p.add_argument("--test-subset", type=int, help="evaluate on N test images (0: all 10,000)")
    p.add_argument("--classes", type=int, default=10, choices=(10, 100))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=1.0, help="feature-loss weight of the +F settings")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--granularity", choices=("batch", "sample"), default="batch")
    p.add_argument("--warmup-steps", type=int, default=None, help="distillation warm-up (default: the library's)")
    p.add_argument("--lr-warmup", type=int, default=0, help="steps of linear learning-rate warm-up before the cosine")
    p.add_argument(
        "--class-balanced",
        type=int,
        default=0,
        metavar="M",
        help="class-balanced training batches of M images per class (MCL on many classes; 0: random batches)",
    )
    p.add_argument("--diagnose", action="store_true", help="log per-step KL, gradient norm and lr per member")
    p.add_argument("--data", type=Path, default=None, help=f"CIFAR source (default: $CIFAR_ROOT or {default_root()})")
    p.add_argument("--cache", type=Path, default=None, help="where decoded tensors are cached")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the step math (compile=True)")
    p.add_argument("--amp", choices=("bf16",), help="members' forwards under bf16 autocast (no GradScaler needed)")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="the whole step as CUDA graphs (cuda_graph=True): fused SGD, the cosine as LambdaLR (no host read)",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<preset>)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="K",
        help="run the settings x seeds as K concurrent processes, merged as one run (on a CPU each gets its share "
        "of the cores; on a GPU they share the device, whose steps leave it idle while the host launches kernels)",
    )
    p.add_argument("--runs", help=argparse.SUPPRESS)  # a --jobs worker's own runs: setting:seed,...
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="RESULTS_JSON",
        help="train nothing: merge results.json files of runs split by seed, then print and plot",
    )
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = args.models.split(",")
    args.settings = args.settings.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    args.out = args.out or Path("runs") / args.preset
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: please give a number of processes >= 1")
    return args


@torch.no_grad()
def evaluate(models, loader) -> list[float]:
    correct = torch.zeros(len(models), device=loader.images.device)
    for x, y in loader:
        for i, m in enumerate(models):
            correct[i] += (m(x).argmax(1) == y).sum()
    return (100.0 * correct / len(loader.labels)).tolist()


def run(setting: str, seed: int, data, args) -> dict:
    rule, terms, perturb_prob, warmup_steps = SETTINGS[setting]
    if args.warmup_steps is not None and warmup_steps is None:  # a setting's own warm-up (w0) wins
        warmup_steps = args.warmup_steps
    features = "feature" in terms or "adm" in terms
    device = torch.device(args.device)
    torch.manual_seed(seed)
    built = []
    for i, name in enumerate(args.models):
        torch.manual_seed(1000 * seed + i)  # the same initial weights in every setting
        built.append(build(name, args.classes))
    models = [m.to(device).to(memory_format=torch.channels_last) for m, _ in built]
    optimizers = [
        torch.optim.SGD(
            m.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay,
            fused=True if args.cuda_graph else None,
        )
        for m in models
    ]
    train = DeviceLoader(
        *data["train"],
        batch_size=args.batch_size,
        device=device,
        classes=args.classes,
        train=True,
        seed=seed,
        per_class=args.class_balanced,
    )
    test = DeviceLoader(
        *data["test"], batch_size=1000, device=device, classes=args.classes, train=False, drop_last=False
    )
    group = CompetitiveGroup(
        models,
        optimizers,
        rule=rule,
        # each term holds its own settings
        terms=[
            {"kl": KL(args.alpha, temperature=args.temperature), "feature": FeatureL2(args.beta)}.get(t, t)
            for t in terms
        ],
        granularity=args.granularity,
        **({} if warmup_steps is None else {"warmup_steps": warmup_steps}),
        feature_hooks=[hook for _, hook in built] if features else None,
        embedding_hooks=["fc"] * len(built) if "mcl" in terms else None,
        perturbation=None if perturb_prob == 0 else PerturbationPool(p=perturb_prob),
        seed=seed,
        compile=args.compile,
        autocast_dtype=torch.bfloat16 if args.amp == "bf16" else None,
        cuda_graph=args.cuda_graph,
        example_input=data["train"][0][:2].to(device).float() if features or "mcl" in terms else None,
    )
    total = args.epochs * len(train)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total) for o in optimizers]
    if args.cuda_graph:  # the same cosine in closed form: CosineAnnealingLR's recursion reads a tensor lr back
        cosine = lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total))  # noqa: E731
        schedulers = [torch.optim.lr_scheduler.LambdaLR(o, cosine) for o in optimizers]
    if args.lr_warmup:
        schedulers = [
            torch.optim.lr_scheduler.SequentialLR(
                o,
                [torch.optim.lr_scheduler.LinearLR(o, 1 / (args.lr_warmup + 1), total_iters=args.lr_warmup), s],
                milestones=[args.lr_warmup],
            )
            for o, s in zip(optimizers, schedulers)
        ]
    history = {"test_acc": [], "ce": [], "teacher": [], "epoch_time": []}
    if args.diagnose:
        history.update(kl=[], grad_norm=[], lr=[])
    torch.manual_seed(seed)  # kornia's crop/flip draws
    for epoch in range(args.epochs):
        group.train()
        start = time.perf_counter()
        ce, teacher = [], []
        for x, y in tqdm(
            train, desc=f"{setting} seed {seed} epoch {epoch + 1}/{args.epochs}", leave=False, mininterval=2.0
        ):
            if args.diagnose:
                result = diagnosed_step(group, (x, y), history)
            else:
                result = group.step((x, y))
            ce.append(result.ce)
            teacher.append(result.teacher)
            for s in schedulers:
                s.step()
        history["ce"] += torch.stack(ce).tolist()
        history["teacher"] += torch.stack(teacher).tolist()
        history["epoch_time"].append(time.perf_counter() - start)
        group.eval()
        history["test_acc"].append(evaluate(models, test))
    group.close()
    history["stats"] = group.stats
    return history


def diagnosed_step(group, batch, history):
    """``group.step`` done by hand, recording each member's KL, gradient norm and learning rate."""
    total, result = group.loss(batch)
    total.backward()
    history["kl"].append(result.kl.tolist())
    history["grad_norm"].append(
        [torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters()])).item() for m in group.models]
    )
    history["lr"].append(group.optimizers[0].param_groups[0]["lr"])
    for optimizer in group.optimizers:
        optimizer.step()
    group.zero_grad()
    return result


def summarize(results: dict, args) -> str:
    n = len(args.models)
    lines = [f"top-1 % after {args.epochs} epochs, mean ± std over seeds {args.seeds} (n={len(args.seeds)})", ""]
    header = "| setting | " + " | ".join(f"net {i + 1} ({args.models[i]})" for i in range(n))
    header += " | mean | teacher share % (net 1 / ...) | perturbed member won % | s/epoch |"
    lines += [header, "|" + "---|" * (n + 5)]
    for setting in args.settings:
        runs = [results[setting][str(seed)] for seed in args.seeds]
        cells = []
        for i in range(n):
            accs = [r["test_acc"][-1][i] for r in runs]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.mean(accs):.2f} ± {sd:.2f}")
        mean = statistics.mean(statistics.mean(r["test_acc"][-1]) for r in runs)
        secs = statistics.median(t for r in runs for t in r["epoch_time"])
        stats = [r["stats"] for r in runs]
        share = [100 * sum(s["teacher_count"][i] for s in stats) / sum(s["steps"] for s in stats) for i in range(n)]
        perturbed = sum(sum(s["perturbed_count"]) for s in stats)
        won = f"{100 * sum(s['perturbed_wins'] for s in stats) / perturbed:.1f}" if perturbed else "-"
        taught = " / ".join(f"{v:.0f}" for v in share) if SETTINGS[setting][0] != "independent" else "-"
        lines.append(f"| {setting} | " + " | ".join(cells) + f" | {mean:.2f} | {taught} | {won} | {secs:.1f} |")
    return "\n".join(lines)


def plot(results: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = next(
        (s for s in ("competitive+F", "competitive", "competitive+F+P", "competitive+P") if s in results),
        args.settings[0],
    )
    run0 = results[shown][str(args.seeds[0])]
    ce = torch.tensor(run0["ce"])
    teacher = torch.tensor(run0["teacher"])
    fig, ax = plt.subplots(figsize=(9, 4))
    steps = torch.arange(len(ce))
    for i in range(ce.shape[1]):
        ax.plot(steps, ce[:, i], lw=0.7, color=f"C{i}", label=f"net {i + 1} ({args.models[i]})")
        won = teacher == i
        ax.scatter(steps[won], ce[won, i], s=4, color=f"C{i}", label=f"net {i + 1} is teacher")
    ax.set(
        xlabel="step", ylabel="cross-entropy", title=f"Per-member CE, teacher marked ({shown}, seed {args.seeds[0]})"
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "fig3a.png", dpi=120)
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, setting in enumerate(args.settings):
        acc = torch.tensor([results[setting][str(s)]["test_acc"] for s in args.seeds]).mean(0)  # [epochs, n]
        for i in range(acc.shape[1]):
            ax.plot(
                range(1, len(acc) + 1),
                acc[:, i],
                marker=".",
                color=f"C{k}",
                ls=("-", "--", ":", "-.")[i % 4],
                label=f"{setting} net {i + 1}",
            )
    ax.set(xlabel="epoch", ylabel="test top-1 %", title="Test accuracy per epoch (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "fig3b.png", dpi=120)
    fig, ax = plt.subplots(figsize=(8, 4))  # who teaches over training: share of the last 50 steps
    for k, setting in enumerate(args.settings):
        if SETTINGS[setting][0] != "best":
            continue
        teacher = torch.tensor([results[setting][str(s)]["teacher"] for s in args.seeds]).float()  # [seeds, steps]
        last = len(args.models) - 1
        won = (teacher == last).float().mean(0)  # the last member's share, averaged over seeds
        window = min(50, len(won))
        rolling = torch.nn.functional.avg_pool1d(won.view(1, 1, -1), window, stride=1).flatten()
        ax.plot(range(window - 1, window - 1 + len(rolling)), 100 * rolling, color=f"C{k}", label=setting)
    ax.set(xlabel="step", ylabel=f"% of steps net {len(args.models)} teaches", title="Teacher share (last 50 steps)")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "teacher_share.png", dpi=120)


def merge(args) -> None:
    results = {s: {} for s in args.settings}
    for path in args.merge:
        for setting, runs in json.loads(path.read_text())["results"].items():
            results.setdefault(setting, {}).update(runs)
    missing = [f"{s} seed {seed}" for s in args.settings for seed in args.seeds if str(seed) not in results[s]]
    if missing:
        raise SystemExit(f"--merge: the files hold no results for {missing}")
    report(results, args)


def report(results: dict, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results})
    )
    table = summarize(results, args)
    print("\n" + table)
    (args.out / "table.md").write_text(table + "\n")
    plot(results, args)
    print(f"\nwrote {args.out}/results.json, table.md, fig3a.png, fig3b.png, teacher_share.png")


def _runs(args) -> list[tuple[str, int]]:
    """The (setting, seed) runs of this process: seed by seed, every setting; a worker's own with --runs."""
    if args.runs:
        return [(run.rsplit(":", 1)[0], int(run.rsplit(":", 1)[1])) for run in args.runs.split(",")]
    return [(setting, seed) for seed in args.seeds for setting in args.settings]


def concurrent(args, argv) -> None:
    """``--jobs K``: the runs dealt round-robin to K worker processes (each this script on its own runs, in
    ``--out``/job-k), then merged. On a CPU each worker is pinned to its share of the cores."""
    import subprocess

    runs, cores = _runs(args), sorted(os.sched_getaffinity(0))
    jobs = min(args.jobs, len(runs))
    share = [cores[k::jobs] or cores for k in range(jobs)] if args.device == "cpu" else [cores] * jobs
    argv = list(sys.argv[1:] if argv is None else argv)
    start, workers = time.perf_counter(), []
    for k in range(jobs):
        mine = ",".join(f"{setting}:{seed}" for setting, seed in runs[k::jobs])
        command = [sys.executable, __file__, *argv, "--jobs", "1", "--runs", mine, "--out", str(args.out / f"job-{k}")]
        env = dict(os.environ, OMP_NUM_THREADS=str(len(share[k])))
        workers.append(subprocess.Popen(command, env=env, preexec_fn=lambda c=share[k]: os.sched_setaffinity(0, c)))
    failed = [k for k, worker in enumerate(workers) if worker.wait() != 0]
    if failed:
        raise SystemExit(f"--jobs: workers {failed} failed (their output is above; their runs in {args.out}/job-*)")
    wall = time.perf_counter() - start
    args.merge = [args.out / f"job-{k}" / "results.json" for k in range(jobs)]
    merge(args)
    epochs = len(runs) * args.epochs
    rate = 60 * epochs / wall
    print(f"--jobs {jobs}: {len(runs)} runs, {epochs} epochs in {wall:.0f} s ({rate:.2f} epochs per minute, all runs)")


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    if args.jobs > 1:
        return concurrent(args, argv)
    if args.device == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(
        f"preset={args.preset} models={args.models} settings={args.settings} seeds={args.seeds} "
        f"epochs={args.epochs} batch={args.batch_size} lr={args.lr} (SGD nesterov 0.9, wd {args.weight_decay}, "
        f"cosine) alpha={args.alpha} beta={args.beta} train_subset={args.train_subset or 'all'} "
        f"test_subset={args.test_subset or 'all'} device={args.device} torch={torch.__version__} "
        f"threads={torch.get_num_threads()} python={platform.python_version()}",
        flush=True,
    )
    data = load_cifar(args.data, classes=args.classes, cache=args.cache)
    if args.train_subset:
        keep = torch.randperm(len(data["train"][1]), generator=torch.Generator().manual_seed(0))[: args.train_subset]
        data["train"] = (data["train"][0][keep], data["train"][1][keep])
    if args.test_subset:
        keep = torch.randperm(len(data["test"][1]), generator=torch.Generator().manual_seed(0))[: args.test_subset]
        data["test"] = (data["test"][0][keep], data["test"][1][keep])
    args.out.mkdir(parents=True, exist_ok=True)
    results = {s: {} for s in args.settings}
    for setting, seed in _runs(args):
        history = run(setting, seed, data, args)
        results[setting][str(seed)] = history
        print(
            f"{setting:>16} seed {seed}: top-1 {[f'{a:.2f}' for a in history['test_acc'][-1]]} "
            f"({sum(history['epoch_time']):.0f} s)",
            flush=True,
        )
        (args.out / "results.json").write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results})
        )
    if args.runs:  # a --jobs worker: its results.json is merged by the parent
        return
    report(results, args)
    if args.preset == "quick":
        print("\n" + reading(results, args))
        print_committed()


COMMITTED = ("cpu-resnet8-resnet20", "cpu-2x-resnet8", "cpu-2x-resnet8-p")


def reading(results: dict, args) -> str:
    """One line on what the run shows: the plain rule (no warm-up) against the default, member by member."""
    wanted = ("independent", "competitive-w0", "competitive")
    if not all(s in results for s in wanted):
        return "reading: needs the settings independent, competitive-w0 and competitive"
    seed = str(args.seeds[0])
    acc = {s: results[s][seed]["test_acc"][-1] for s in wanted}
    stats = results["competitive-w0"][seed]["stats"]
    share = [100 * c / stats["steps"] for c in stats["teacher_count"]]
    big, small = len(args.models) - 1, 0
    plain, default, alone = acc["competitive-w0"][big], acc["competitive"][big], acc["independent"][big]
    return (
        f"reading: with the paper's plain rule (competitive-w0, no warm-up) the {args.models[big]} teaches "
        f"{share[big]:.0f} % of the steps and ends at {plain:.1f} % ({plain - alone:+.1f} points against training "
        f"alone, {alone:.1f} %); with the warm-up ({args.warmup_steps} steps here) it ends at {default:.1f} % "
        f"({default - alone:+.1f}); the {args.models[small]} ends at {acc['competitive'][small]:.1f} % "
        f"(alone {acc['independent'][small]:.1f} %). One seed and 117 steps: the 3-seed tables below are the evidence."
    )


def print_committed() -> None:
    """The committed 3-seed tables, so a new user sees the evidence without hours of training."""
    for name in COMMITTED:
        path = Path(__file__).resolve().parent / "results" / name / "table.md"
        if path.exists():
            print(f"\ncommitted: {path.relative_to(Path(__file__).resolve().parents[1])}\n{path.read_text().strip()}")


if __name__ == "__main__":
    main()
