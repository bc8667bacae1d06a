"""Competitive distillation inside PyTorch Lightning, with manual optimization.

Shows: a ``LightningModule`` (``automatic_optimization = False``) training a CNN beside an
MLP (different architectures, so the feature term gets adapters), logging each
member's CE / KL / feature loss and teacher share with ``self.log_dict``, and resuming from a
checkpoint with the group's own state (``group.parts``: adapters, counters, perturbation generator)
restored as any submodule's.

    python examples/lightning_manual.py --smoke      # a few steps on tiny synthetic data, CPU

The traps, and how this module handles them:

- Lightning's ``global_step`` counts *optimizer* steps: with N members it grows by N per batch,
  so ``max_steps`` means N times fewer batches (set ``max_steps = N * batches``; here epochs).
- ``group.step()`` steps the raw optimizers, which Lightning does not see: its counter would not
  move at all. Use ``group.loss`` + ``self.manual_backward`` + Lightning's wrapped optimizers.
- The group's adapters must exist before Lightning restores a checkpoint (the model's state, then
  the optimizers' param groups). They are built in ``setup()`` with ``example_input``, which runs
  before both, and they are submodules of this module, so the checkpoint holds them.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SmallCNN, SmallMLP, add_device, synthetic_cifar  # noqa: E402

from competitive import CompetitiveGroup, PerturbationPool  # noqa: E402


class CompetitiveModule(L.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.automatic_optimization = False
        self.lr = lr
        self.members = nn.ModuleList([SmallCNN(), SmallMLP()])
        self.group: CompetitiveGroup | None = None

    def setup(self, stage: str) -> None:
        if self.group is not None:
            return
        self.raw_optimizers = [torch.optim.SGD(m.parameters(), lr=self.lr, momentum=0.9) for m in self.members]
        self.group = CompetitiveGroup(
            list(self.members),
            self.raw_optimizers,
            feature_hooks=["features", "features"],  # [16, 8, 8] beside [64]: adapters both ways
            perturbation=PerturbationPool(),  # draws from the group's generator, saved in the checkpoint
            seed=0,
            warmup_steps=0,
            example_input=torch.randn(2, 3, 32, 32),  # the adapters exist now, before any restore
        )
        # a submodule: the terms' adapters, the counters and the perturbation generator are in
        # Lightning's checkpoint and follow .to(), with no hook of ours
        self.group_parts = self.group.parts

    def configure_optimizers(self):
        return self.raw_optimizers

    def training_step(self, batch, batch_idx):
        total, result = self.group.loss(batch)
        self.manual_backward(total)
        for optimizer in self.optimizers():  # Lightning's wrappers: global_step += N
            optimizer.step()
            optimizer.zero_grad()
        self.log_dict(result.scalars())  # ce/i, kl/i, feature/i, loss/i, teacher_share/i, teacher
        return total


def _same(a, b) -> bool:
    """Bitwise equal, through the dicts of extra state (the group's generator state, its shapes)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def _trainer(root: Path, epochs: int, device: str = "cpu") -> L.Trainer:
    return L.Trainer(
        default_root_dir=root,
        max_epochs=epochs,
        accelerator="cpu" if torch.device(device).type == "cpu" else "gpu",
        devices=1,
        logger=L.pytorch.loggers.CSVLogger(root),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few batches of tiny synthetic data")
    p.add_argument("--batches", type=int, default=None, help="batches per epoch (the run is two epochs)")
    add_device(p)
    args = p.parse_args(argv)
    batches = args.batches or (3 if args.smoke else 50)
    # one epoch per half, no shuffle: the resumed run sees exactly the batches the straight one does
    loader = torch.utils.data.DataLoader(synthetic_cifar(16 * batches), batch_size=16)
    n = 2
    root = Path(tempfile.mkdtemp(prefix="competitive-lightning-"))
    L.seed_everything(0, verbose=False)
    straight = CompetitiveModule()
    _trainer(root / "straight", epochs=2, device=args.device).fit(straight, loader)

    L.seed_everything(0, verbose=False)
    first = CompetitiveModule()
    trainer = _trainer(root / "first", epochs=1, device=args.device)
    trainer.fit(first, loader)
    assert trainer.global_step == n * batches  # N optimizer steps per batch: max_steps counts these
    checkpoint = root / "half.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed = CompetitiveModule()
    trainer = _trainer(root / "resumed", epochs=2, device=args.device)
    trainer.fit(resumed, loader, ckpt_path=checkpoint)

    same = _same(straight.state_dict(), resumed.state_dict())
    logged = (root / "first").rglob("metrics.csv")
    keys = next(iter(logged)).read_text().splitlines()[0].split(",")
    print(f"global_step {trainer.global_step} after {2 * batches} batches; resumed run bitwise equal: {same}")
    print(f"logged: {sorted(k for k in keys if '/' in k or k == 'teacher')}")
    return {
        "global_step": trainer.global_step,
        "batches": 2 * batches,
        "bitwise_resume": same,
        "logged": keys,
        "group_steps": resumed.group.steps,
        "perturbed": resumed.group.stats["perturbed_count"],
        "adapters": sorted(resumed.group.adapters),
    }


if __name__ == "__main__":
    main()
