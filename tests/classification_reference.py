"""Seeded classification runs whose every number is kept in ``tests/data/classification-0.3.0*.pt``.

The files were written by the 0.3.0 code (commit b2c6953), one per kind of CPU (``-xeon``: Intel Xeon; the
other: AMD EPYC), with ``PYTHONPATH=<0.3.0 checkout> python tests/classification_reference.py <file>``;
``tests/test_dense.py`` runs the same configurations with today's code and asserts every tensor is bit for
bit that of one of them: the ``[B, C]`` case of the dense layout changes nothing.
"""

import sys
import warnings

import torch
from torch import nn

CONFIGS = {
    "best-batch-kl-feature": dict(
        rule="best", granularity="batch", terms=["kl", "feature"], alpha=0.5, temperature=4.0, hooks=True
    ),
    "better-sample-mix": dict(rule="better", granularity="sample", terms=["kl"], pool=("mixup", "cutmix"), p=1.0),
    "mutual-batch-adm": dict(rule="mutual", granularity="batch", terms=["kl", "feature", "adm"], hooks=True),
    "best-sample-pool": dict(rule="best", granularity="sample", terms=["kl"], pool=None, p=0.5, temperature=2.0),
    "independent-sample": dict(rule="independent", granularity="sample", terms=["kl"]),
}


def _net(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip


def _operations_0_3_0() -> dict:
    """The default pool of 0.3.0 (kornia's modules; later versions draw on the batch's device with their own)."""
    import kornia.augmentation as K

    from competitive.operations import InUnitRange

    class ResizedCrop(K.RandomResizedCrop):  # 0.3.0's: kornia's at the input's own size
        def __init__(self, scale):
            super().__init__((8, 8), scale=scale, p=1.0)

    return {
        "mixup": K.RandomMixUpV2(lambda_val=(0.2, 0.8), p=1.0, data_keys=["input", "class"]),
        "cutmix": K.RandomCutMixV2(cut_size=(0.3, 0.7), p=1.0, use_correct_lambda=True, data_keys=["input", "class"]),
        "gaussian_noise": InUnitRange(K.RandomGaussianNoise(std=0.2, p=1.0)),
        "salt_and_pepper": InUnitRange(K.RandomSaltAndPepperNoise(amount=(0.05, 0.15), p=1.0)),
        "elastic": K.RandomElasticTransform(kernel_size=(15, 15), sigma=(4.0, 4.0), alpha=(2.0, 2.0), p=1.0),
        "thin_plate_spline": K.RandomThinPlateSpline(scale=0.3, p=1.0),
        "affine": K.RandomAffine(degrees=45.0, translate=(0.2, 0.2), scale=(0.7, 1.3), shear=20.0, p=1.0),
        "resized_crop": ResizedCrop(scale=(0.3, 0.7)),
    }


def run(name: str, steps: int = 4) -> dict:
    from competitive import CompetitiveGroup, PerturbationPool

    config = dict(CONFIGS[name])
    torch.manual_seed(0)
    models = [_net(4), _net(6), _net(4)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    kwargs = {k: config[k] for k in ("rule", "granularity", "terms")}
    kwargs.update({k: config[k] for k in ("alpha", "temperature") if k in config})
    if config.get("hooks"):
        kwargs["feature_hooks"] = ["2", "2", "2"]
    if "pool" in config:
        ops = _operations_0_3_0()
        kwargs["perturbation"] = PerturbationPool(ops if config["pool"] is None else [ops[k] for k in config["pool"]])
        kwargs["perturb_prob"] = config["p"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 0.3.0 keywords are deprecated later, with the same effect
        group = CompetitiveGroup(models, optimizers, seed=3, warmup_steps=0, **kwargs)
    out: dict = {"steps": []}
    for _ in range(steps):
        x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
        r = group.step((x, y))
        out["steps"].append(dict(teacher=r.teacher, ce=r.ce, loss=r.loss, weights=r.weights, terms=dict(r.terms)))
    out["params"] = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in models]
    return out


if __name__ == "__main__":
    torch.save({name: run(name) for name in CONFIGS}, sys.argv[1])
