"""Two torchvision segmentation networks trained together, with a teacher per pixel.

``lraspp_mobilenet_v3_large`` beside ``deeplabv3_mobilenet_v3_large`` (``weights=None,
weights_backbone=None``: nothing is downloaded). Both return ``{"out": [B, 21, H, W]}``, so
``logits_from="out"``; targets are maps ``[B, H, W]`` with 255 on the boundaries (``ignore_index=255``,
as Pascal VOC). With ``granularity="position"`` the member with the lower cross-entropy at a pixel
teaches the other there (``result.teacher`` is a map ``[B, H, W]``, -1 where the pixel is ignored). The
terms: ``kl`` per pixel and channel-wise distillation on the logits (``CWD(5.0, on="logits")``, the weight
of mmrazor's segmentation configs). The perturbation pool warps the maps with the images (nearest
neighbour; pixels a warp brings in are ignored) and mixes them into label rows per pixel.

    python examples/segmentation_pair.py --smoke    # two steps on 64 x 64 synthetic maps, CPU
"""

import argparse
import sys
from pathlib import Path

import torch
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, lraspp_mobilenet_v3_large

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_device, synthetic_segmentation  # noqa: E402

from competitive import CWD, KL, CompetitiveGroup, PerturbationPool  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="two steps on tiny synthetic maps")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=128)
    add_device(p)
    args = p.parse_args(argv)
    steps, size = (2, 64) if args.smoke else (args.steps, args.size)
    torch.manual_seed(0)
    nets = [
        lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21),
        deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21),
    ]
    nets = [n.to(args.device) for n in nets]
    optimizers = [torch.optim.AdamW(n.parameters(), lr=1e-3) for n in nets]
    data = synthetic_segmentation(4 * steps, size=size)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)

    group = CompetitiveGroup(
        nets, optimizers, logits_from="out", ignore_index=255, granularity="position",
        terms=[KL(), CWD(5.0, on="logits")], perturbation=PerturbationPool(p=0.5), warmup_steps=0,
    )  # fmt: skip
    for x, y in loader:
        x, y = x.to(args.device), y.to(args.device)
        result = group.step((x, y))
        logged = result.scalars()
        print(
            f"step {group.steps}: ce {logged['ce/0']:.3f} / {logged['ce/1']:.3f}, kl {logged['kl/0']:.3f} / "
            f"{logged['kl/1']:.3f}, cwd {logged['cwd/0']:.4f} / {logged['cwd/1']:.4f}, pixels taught "
            f"{logged['teacher_share/0']:.2f} / {logged['teacher_share/1']:.2f}, perturbed {result.perturbation}"
        )
    print(f"teacher map {list(result.teacher.shape)}, W {list(result.weights.shape)}; stats {group.stats}")
    return {"result": result, "targets": y, "logged": logged, "stats": group.stats}


if __name__ == "__main__":
    main()
