"""Two torchvision detectors compete on their own loss: a Faster R-CNN (MobileNetV3-FPN, 320) beside a
RetinaNet (ResNet-50-FPN), no weights downloaded, on generated images of shapes with boxes.

In training mode a torchvision detector takes ``(images, targets)`` and returns a dict of losses, so
the group calls each member through ``forward=`` and reads its loss through ``loss_from=`` (their sum):
the member with the lower total loss teaches the batch, and the student learns from the teacher's FPN
maps by channel-wise distillation (``CWD``; an adapter bridges the two FPNs' spatial sizes). Images are
lists of tensors of different sizes, as torchvision takes them; the group passes them through.
Evaluation: mean average precision (torchmetrics' ``MeanAveragePrecision``, COCO's definition) of each
member on held-out images.

    python examples/detection_pair.py --smoke              # two steps, seconds
    python examples/detection_pair.py --settings independent,competitive --seeds 0 --out runs/det  # 200 steps
    python examples/detection_pair.py --report runs/det    # the table of every results-*.json there
"""

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
from torchvision.models import detection

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_device, synthetic_shapes  # noqa: E402

from competitive import CWD, CompetitiveGroup  # noqa: E402

HOOKS = ["backbone.fpn.layer_blocks.1", "backbone.fpn.layer_blocks.1"]  # an FPN level of each detector
NAMES = ("faster_rcnn", "retinanet")


def members(size: int, device: str) -> list[torch.nn.Module]:
    kw = dict(weights=None, weights_backbone=None, num_classes=3, min_size=size, max_size=size)
    # fewer region proposals and sampled boxes than torchvision's defaults: a few objects per image
    rpn = dict(rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100, box_batch_size_per_image=64)
    return [detection.fasterrcnn_mobilenet_v3_large_320_fpn(**kw, **rpn).to(device),
            detection.retinanet_resnet50_fpn(**kw).to(device)]  # fmt: skip


def clip_gradients(optimizer: torch.optim.Optimizer, args, kwargs, *, max_norm: float) -> None:
    """An optimizer step pre-hook: the gradients' total norm clipped to ``max_norm`` (mmdetection's RetinaNet
    configurations clip at 35 for stability; without it this RetinaNet's focal loss diverged in 2 of 3 runs)."""
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm)


def mean_average_precision(model: torch.nn.Module, data, device: str) -> float:
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy")
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data), 8):
            images, targets = zip(*data[start : start + 8])
            detections = model([i.to(device) for i in images])
            metric.update([{k: v.cpu() for k, v in d.items()} for d in detections], list(targets))
    model.train()
    return float(metric.compute()["map"])


def run(setting: str, seed: int, args) -> dict:
    torch.manual_seed(seed)
    nets = members(args.size, args.device)
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=args.lr, momentum=0.9,
                                  weight_decay=1e-4) for m in nets]  # fmt: skip
    for optimizer in optimizers if args.clip else []:  # the group steps each optimizer: clip just before
        optimizer.register_step_pre_hook(partial(clip_gradients, max_norm=args.clip))
    competitive = setting == "competitive"
    group = CompetitiveGroup(
        nets, optimizers, rule="best" if competitive else "independent", terms=[CWD(2.0)] if competitive else [],
        feature_hooks=HOOKS if competitive else None, forward=lambda m, images, targets: m(images, targets),
        loss_from=lambda losses: sum(losses.values()), seed=seed, warmup_steps=args.steps // 4,
        example_input=[torch.rand(3, args.size, args.size, device=args.device)],  # the adapter, built now
    )  # fmt: skip
    torch.manual_seed(seed)  # the detectors' own sampling draws from here: the same in every setting
    train, test = synthetic_shapes(args.images, args.size, 100 + seed), synthetic_shapes(args.eval, args.size, 7)
    order = torch.Generator().manual_seed(seed)  # the same batches in every setting of a seed
    log = []
    for step in range(args.steps):
        batch = [train[int(i)] for i in torch.randint(0, len(train), (args.batch,), generator=order)]
        images, targets = zip(*batch)
        move = [{k: v.to(args.device) for k, v in t.items()} for t in targets]
        result = group.step(([i.to(args.device) for i in images], move))
        log.append(result.scalars())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"{setting} seed {seed} step {step + 1}: loss {log[-1]['ce/0']:.3f} / {log[-1]['ce/1']:.3f}, "
                  f"teacher {int(log[-1]['teacher'])}", flush=True)  # fmt: skip
    maps = [mean_average_precision(m, test, args.device) for m in nets]
    taught = [sum(s[f"teacher_share/{i}"] for s in log) / len(log) for i in range(2)]
    print(f"{setting} seed {seed}: mAP {maps[0]:.4f} / {maps[1]:.4f}, teaches {taught[0]:.2f} / {taught[1]:.2f}")
    first, last = ([entry["ce/0"], entry["ce/1"]] for entry in (log[0], log[-1]))
    return {"map": maps, "teacher_share": taught, "loss": last, "first_loss": first}


def report(folder: Path) -> str:
    runs: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("results-*.json")):
        for setting, result in json.loads(path.read_text()).items():
            runs.setdefault(setting, []).append(result)
    lines = ["| setting | seeds | Faster R-CNN mAP | RetinaNet mAP | teaches % (Faster R-CNN / RetinaNet) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for setting, results in runs.items():
        cells = []
        for i in range(2):
            values = [100 * r["map"][i] for r in results]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {spread:.2f}")
        share = " / ".join(f"{100 * statistics.mean(r['teacher_share'][i] for r in results):.0f}" for i in range(2))
        share = share if setting != "independent" else "-"
        lines.append(f"| {setting} | {len(results)} | {cells[0]} | {cells[1]} | {share} |")
    table = "\n".join(lines)
    (folder / "table.md").write_text(table + "\n")
    return table


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="two steps on tiny images, one setting")
    p.add_argument("--settings", default="competitive", help="comma-separated: independent, competitive")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--images", type=int, default=256, help="training images")
    p.add_argument("--eval", type=int, default=64, help="held-out images (the same for every seed)")
    p.add_argument("--size", type=int, default=96, help="the detectors' input size (min_size = max_size)")
    p.add_argument("--lr", type=float, default=0.003)  # 0.01 took RetinaNet (from scratch) to NaN by step 100
    p.add_argument("--clip", type=float, default=35.0, help="clip each member's gradient norm (0: never)")
    p.add_argument("--out", type=Path, default=None, help="write results-<seeds>.json here")
    p.add_argument("--report", type=Path, default=None, help="train nothing: the table of the results in a folder")
    add_device(p)
    args = p.parse_args(argv)
    if args.report:
        print(report(args.report))
        return {}
    if args.smoke:
        args.steps, args.images, args.size, args.batch, args.eval = 2, 8, 64, 2, 4
    results = {}
    for setting in args.settings.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            results.setdefault(setting, {})[seed] = run(setting, seed, args)
    if args.out:  # one file per run, so runs split over processes merge by --report
        args.out.mkdir(parents=True, exist_ok=True)
        for setting, runs in results.items():
            for seed, result in runs.items():
                (args.out / f"results-{setting}-{seed}.json").write_text(json.dumps({setting: result}))
    return results


if __name__ == "__main__":
    main()
