"""The perturbation pool with dense targets ``[B, H, W]``: geometric operations move the targets with
the image, mixing gives label rows per position, photometric operations leave the targets."""

import kornia.augmentation as K
import pytest
import torch
from torch import nn

from competitive import CompetitiveGroup, PerturbationPool
from competitive.perturbation import default_operations

IGNORE = 255


def _batch(seed=0, batch=4, classes=5, size=(12, 16)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, *size, generator=g)
    y = torch.randint(0, classes, (batch, *size), generator=g)
    y[:, :3, :4] = IGNORE
    return x, y


def _apply(op, x, y, name="op"):
    pool = PerturbationPool({name: op}, p=1.0)
    return pool.perturb(0, x, y, seed=3, num_classes=5, ignore_index=IGNORE)


def test_a_flip_moves_targets_with_the_image():
    x, y = _batch()
    x2, y2 = _apply(K.RandomHorizontalFlip(p=1.0), x, y)
    assert torch.equal(x2, x.flip(-1)) and torch.equal(y2, y.flip(-1))  # ignored positions stay ignored


def test_pixels_a_translation_brings_in_are_ignored():
    x, y = _batch()
    shift = K.RandomAffine(degrees=0.0, translate=(0.25, 0.0), p=1.0)  # up to 4 of 16 columns, integer or not
    _, y2 = _apply(shift, x, y)
    assert (y2 == IGNORE).sum() > (y == IGNORE).sum()  # the strip brought in counts nowhere
    kept = y2 != IGNORE
    assert ((y2[kept] >= 0) & (y2[kept] < 5)).all()  # nearest neighbour: only classes, never a blend


@pytest.mark.parametrize("name", ["elastic", "thin_plate_spline", "affine", "resized_crop"])
def test_default_geometric_operations_warp_the_targets_by_nearest_neighbour(name):
    x, y = _batch(1)
    x2, y2 = _apply(default_operations()[name], x, y, name)
    assert x2.shape == x.shape and y2.shape == y.shape and y2.dtype == torch.long
    assert set(y2.unique().tolist()) <= set(range(5)) | {IGNORE}
    assert not torch.equal(y2, y)  # the targets moved


@pytest.mark.parametrize("name", ["gaussian_noise", "salt_and_pepper"])
def test_photometric_operations_leave_the_targets(name):
    x, y = _batch(2)
    x2, y2 = _apply(default_operations()[name], x, y, name)
    assert not torch.equal(x2, x) and torch.equal(y2, y)


def test_mixup_gives_label_rows_per_position():
    x, y = _batch(3)
    x2, rows = _apply(default_operations()["mixup"], x, y, "mixup")
    assert rows.shape == (4, 5, 12, 16) and rows.dtype == torch.float32
    total = rows.sum(dim=1)
    assert torch.allclose(total[total > 0], torch.ones(())) and (total[y == IGNORE] == 0).all()
    # every sample is (1 - lam) x_b + lam x_j: its rows mix its own one-hot map and x_j's with that lam
    for b in range(4):
        for j in range(4):
            lam = ((x2[b] - x[b]) / (x[j] - x[b])).median()
            if torch.allclose(x2[b], (1 - lam) * x[b] + lam * x[j], atol=1e-5):
                both = (y[b] != IGNORE) & (y[j] != IGNORE)
                expected = (1 - lam) * nn.functional.one_hot(y[b].clamp(0, 4), 5).float()
                expected = expected + lam * nn.functional.one_hot(y[j].clamp(0, 4), 5).float()
                torch.testing.assert_close(rows[b].movedim(0, -1)[both], expected[both], atol=1e-5, rtol=0)
                break
        else:
            raise AssertionError(f"sample {b} is no mix of two samples")


def test_cutmix_gives_each_pixel_the_targets_of_the_sample_it_came_from():
    x, y = _batch(4)
    x2, rows = _apply(default_operations()["cutmix"], x, y, "cutmix")
    assert rows.shape == (4, 5, 12, 16)
    same = (x2.unsqueeze(1) == x.unsqueeze(0)).all(dim=2)  # [B, B, H, W]: pixel of b equals that of j
    assert (same.sum(dim=1) == 1).all()  # every pixel comes from exactly one sample (random images)
    source = same.float().argmax(dim=1)
    assert (source != torch.arange(4).view(-1, 1, 1)).any()  # something was pasted
    expected = torch.gather(y, 0, source)
    valid = expected != IGNORE
    assert torch.equal(rows.argmax(dim=1)[valid], expected[valid])
    assert (rows.amax(dim=1)[valid] == 1).all() and (rows.sum(dim=1)[~valid] == 0).all()


def test_an_operation_that_cannot_move_dense_targets_is_refused_at_the_first_step():
    models = [nn.Conv2d(3, 5, 1), nn.Conv2d(3, 5, 1)]
    pool = PerturbationPool({"tps": K.RandomThinPlateSpline(p=1.0), "flip": K.RandomHorizontalFlip(p=1.0)}, p=1.0)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    group = CompetitiveGroup(models, optimizers, perturbation=pool, ignore_index=IGNORE)
    before = [p.detach().clone() for m in models for p in m.parameters()]
    with pytest.raises(ValueError, match=r"Perturbations \['tps'\] cannot move dense targets"):
        group.step(_batch(5))
    assert all(torch.equal(a, p) for a, p in zip(before, [p for m in models for p in m.parameters()]))


def test_the_default_pool_draws_only_what_moves_dense_targets():
    pool = PerturbationPool(p=1.0)
    generator = torch.Generator().manual_seed(0)
    x, y = _batch(6)
    names = {pool.draw(generator, 2, x, y).name for _ in range(300)}
    # every default operation moves dense targets (the thin-plate spline too since it is the library's own)
    assert names == set(pool.names)
    only_kornia = PerturbationPool({"tps": K.RandomThinPlateSpline(p=1.0), "flip": K.RandomHorizontalFlip(p=1.0)})
    assert only_kornia.dense_weights.tolist() == [1.0, 1.0]  # a user's pool is refused at the first step instead


def test_a_dense_group_trains_under_the_default_pool():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1)) for _ in range(3)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    group = CompetitiveGroup(
        models, optimizers, perturbation=PerturbationPool(p=1.0), granularity="position", ignore_index=IGNORE,
        warmup_steps=0,
    )  # fmt: skip
    seen = set()
    for step in range(12):
        result = group.step(_batch(step))
        seen.add(result.perturbation)
        assert torch.isfinite(result.loss).all()
    assert len(seen) >= 4


def test_label_rows_that_are_not_distributions_are_refused_naming_the_operation():
    x, y = _batch(7)

    def halves(x, y):
        return x, torch.full((x.shape[0], 5, *y.shape[1:]), 0.5)

    with pytest.raises(ValueError, match=r"Perturbation 'halves' returned label rows that are not distributions"):
        _apply(halves, x, y, "halves")
