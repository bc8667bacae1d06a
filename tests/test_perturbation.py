import pytest
import torch
from torch import nn

from competitive import CompetitiveGroup, PerturbationPool
from competitive.perturbation import default_operations

MIXING = {"mixup", "cutmix"}


def _batch(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # normalized images: values well outside [0, 1]
    return torch.randn(b, 3, 16, 16, generator=g) * 2 - 0.5, torch.randint(0, 10, (b,), generator=g)


class Recorder(nn.Module):
    """A member that remembers the inputs it saw."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)


def test_default_pool_covers_the_paper_operations():
    assert set(default_operations()) == {
        "mixup",
        "cutmix",
        "gaussian_noise",
        "salt_and_pepper",
        "elastic",
        "thin_plate_spline",
        "affine",
        "resized_crop",
    }
    crop = default_operations()["resized_crop"]
    assert crop.scale == (0.3, 0.7)


@pytest.mark.parametrize("name", list(default_operations()))
def test_each_operation_changes_only_the_chosen_member_input(name):
    pool = PerturbationPool({name: default_operations()[name]}, p=1.0)
    members = [Recorder() for _ in range(3)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01) for m in members]
    group = CompetitiveGroup(members, optimizers, perturbation=pool, seed=1)
    x, y = _batch()
    result = group.step((x, y))
    k = result.perturbed
    assert result.perturbation == name and k in range(3)
    for i, m in enumerate(members):
        if i == k:
            assert not torch.equal(m.seen[-1], x)
            assert m.seen[-1].shape == x.shape and torch.isfinite(m.seen[-1]).all()
        else:
            assert torch.equal(m.seen[-1], x)  # bit for bit


@pytest.mark.parametrize("name", list(default_operations()))
def test_labels_stay_hard_or_become_rows_that_sum_to_one(name):
    pool = PerturbationPool({name: default_operations()[name]}, p=1.0)
    x, y = _batch()
    x2, y2 = pool.perturb(0, x, y, seed=3, num_classes=10)
    if name in MIXING:
        assert y2.shape == (8, 10) and y2.dtype == torch.float32
        torch.testing.assert_close(y2.sum(1), torch.ones(8))
        assert (y2 >= 0).all() and (y2.max(1).values < 1).any()  # actually mixed
    else:
        assert torch.equal(y2, y)


def test_mixing_uses_soft_labels_in_the_member_cross_entropy():
    pool = PerturbationPool({"mixup": default_operations()["mixup"]}, p=1.0)
    members = [Recorder() for _ in range(2)]
    group = CompetitiveGroup(
        members, [torch.optim.SGD(m.parameters(), lr=0.0) for m in members], perturbation=pool, seed=0
    )
    x, y = _batch()
    result = group.step((x, y))
    k = result.perturbed
    _, soft = pool.perturb(0, x, y, seed=_seed_of_first_draw(pool, group_seed=0), num_classes=10)
    logits = members[k].net(members[k].seen[-1])
    expected = -(soft * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(result.ce[k], expected.detach())


def _seed_of_first_draw(pool, group_seed):
    return pool.draw(torch.Generator().manual_seed(group_seed), 2, torch.zeros(2, 1, 1, 1)).seed


def test_noise_keeps_the_normalization_and_does_not_clamp():
    x, y = _batch()
    for name in ("gaussian_noise", "salt_and_pepper"):
        x2, _ = PerturbationPool({name: default_operations()[name]}).perturb(0, x, y, seed=0, num_classes=10)
        assert x2.min() < 0 and x2.max() > 1  # not squeezed into [0, 1]
    x2, _ = PerturbationPool({"sp": default_operations()["salt_and_pepper"]}).perturb(0, x, y, seed=0, num_classes=10)
    changed = (x2 - x).abs() > 1e-4  # the round trip through [0, 1] moves the rest by rounding only
    # salt and pepper become each image's own max and min
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    on_extreme = torch.isclose(x2, lo.expand_as(x2), atol=1e-5) | torch.isclose(x2, hi.expand_as(x2), atol=1e-5)
    assert changed.any() and on_extreme[changed].all()


def test_same_seed_same_draws_and_replay():
    def draws(seed):
        members = [Recorder() for _ in range(3)]
        group = CompetitiveGroup(
            members,
            [torch.optim.SGD(m.parameters(), lr=0.0) for m in members],
            perturbation=PerturbationPool(p=1.0),
            seed=seed,
        )
        out = []
        for s in range(6):
            r = group.step(_batch(seed=s))
            out.append((r.perturbed, r.perturbation, members[r.perturbed].seen[-1]))
        return out

    a, b, c = draws(7), draws(7), draws(8)
    assert [(m, o) for m, o, _ in a] == [(m, o) for m, o, _ in b]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(a, b))
    assert [(m, o) for m, o, _ in a] != [(m, o) for m, o, _ in c]


def test_member_draw_is_uniform():
    # a fixed seed makes this deterministic: it cannot flake
    members = [nn.Linear(4, 3) for _ in range(4)]
    pool = PerturbationPool({"identity": lambda x, y: (x + 0.0, y)}, p=1.0)
    group = CompetitiveGroup(
        members, [torch.optim.SGD(m.parameters(), lr=0.0) for m in members], perturbation=pool, seed=123
    )
    counts = torch.zeros(4)
    x = torch.randn(2, 4)
    for _ in range(4000):
        counts[pool.draw(group.generator, 4, x).member] += 1
    expected = 1000.0
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.27, counts  # chi-square, 3 degrees of freedom, p = 0.001


def test_perturb_prob_zero_never_perturbs_and_half_sometimes():
    # the deprecated group argument, forwarded to the pool's p with a warning
    members = [nn.Linear(4, 3) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.0) for m in members]
    x = torch.randn(2, 4)
    pool = PerturbationPool({"identity": lambda x, y: (x + 0.0, y)})
    with pytest.warns(DeprecationWarning, match=r"perturb_prob.*PerturbationPool\(p="):
        never = CompetitiveGroup(members, opts, perturbation=pool, perturb_prob=0.0, seed=0)
    assert pool.p == never.perturb_prob == 0.0
    assert all(pool.draw(never.generator, 2, x).member is None for _ in range(200))
    pool = PerturbationPool({"identity": lambda x, y: (x + 0.0, y)})
    with pytest.warns(DeprecationWarning):
        half = CompetitiveGroup(members, opts, perturbation=pool, perturb_prob=0.5, seed=0)
    hits = sum(pool.draw(half.generator, 2, x).member is not None for _ in range(1000))
    assert 420 < hits < 580


def test_the_pool_owns_p_and_perturbs_about_a_tenth_of_the_steps_by_default():
    pool, x = PerturbationPool({"identity": lambda x, y: (x + 0.0, y)}), torch.randn(2, 4)
    g = torch.Generator().manual_seed(0)
    hits = sum(pool.draw(g, 2, x).member is not None for _ in range(2000))
    assert pool.p == 0.1 and 140 < hits < 260  # binomial(2000, 0.1): mean 200, sd 13.4
    with pytest.raises(ValueError, match=r"Invalid p value 1.5 provided"):
        PerturbationPool(p=1.5)
    members = [nn.Linear(4, 3) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.0) for m in members]
    with pytest.raises(ValueError, match=r"perturb_prob=0.3 sets the perturbation pool's p, but the pool sets p=0.5"):
        with pytest.warns(DeprecationWarning, match="perturb_prob"):
            CompetitiveGroup(members, opts, perturbation=PerturbationPool(p=0.5), perturb_prob=0.3)
    group = CompetitiveGroup(members, opts, perturbation=PerturbationPool(p=0.5))
    with pytest.raises(AttributeError, match=r"group.perturb_prob is read-only: set the pool's p"):
        group.perturb_prob = 0.2


def test_state_dict_round_trip_continues_the_draws():
    def group(seed):
        members = [Recorder() for _ in range(3)]
        return CompetitiveGroup(
            members,
            [torch.optim.SGD(m.parameters(), lr=0.0) for m in members],
            perturbation=PerturbationPool(p=1.0),
            seed=seed,
        )

    a = group(5)
    for s in range(3):
        a.step(_batch(seed=s))
    b = group(99)
    b.load_state_dict(a.state_dict())
    for s in range(3, 8):
        ra, rb = a.step(_batch(seed=s)), b.step(_batch(seed=s))
        assert (ra.perturbed, ra.perturbation) == (rb.perturbed, rb.perturbation)
        assert torch.equal(a.models[ra.perturbed].seen[-1], b.models[rb.perturbed].seen[-1])


def test_stats_count_perturbed_wins():
    members = [Recorder() for _ in range(2)]
    group = CompetitiveGroup(
        members,
        [torch.optim.SGD(m.parameters(), lr=0.1) for m in members],
        perturbation=PerturbationPool(p=1.0),
        seed=0,
    )
    wins = 0
    for s in range(10):
        r = group.step(_batch(seed=s))
        wins += int(r.teacher.item() == r.perturbed)
    stats = group.stats
    assert stats["perturbed_wins"] == wins and sum(stats["perturbed_count"]) == 10


def test_input_errors():
    pool = PerturbationPool()
    with pytest.raises(
        ValueError, match=r"Perturbation 'mixup' needs an image batch \[B, C, H, W\]; got inputs of shape \[4, 8\]"
    ):
        pool.perturb(0, torch.randn(4, 8), torch.zeros(4, dtype=torch.long), seed=0, num_classes=3)
    with pytest.raises(ValueError, match=r"Perturbation 'cutmix' mixes images and needs a batch of at least 2; got 1"):
        pool.perturb(1, torch.randn(1, 3, 8, 8), torch.zeros(1, dtype=torch.long), seed=0, num_classes=3)
    with pytest.raises(ValueError, match=r"Invalid weights \[1.0\]: please provide 8 finite, non-negative numbers"):
        PerturbationPool(weights=[1.0])
    with pytest.raises(TypeError, match=r"Invalid operations \['bad' \(int\)\]: each must be a kornia module"):
        PerturbationPool({"bad": 3})
    with pytest.raises(ValueError, match=r"returned inputs \[4, 3, 8, 8\] and targets \[4, 7\]"):
        PerturbationPool([lambda x, y: (x, torch.zeros(4, 7))]).perturb(
            0, torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), seed=0, num_classes=3
        )


def test_non_image_input_with_a_pool_errors_in_the_group():
    members = [nn.Linear(4, 3) for _ in range(2)]
    group = CompetitiveGroup(
        members,
        [torch.optim.SGD(m.parameters(), lr=0.1) for m in members],
        perturbation=PerturbationPool(p=1.0),
        seed=0,
    )
    with pytest.raises(ValueError, match=r"needs an image batch \[B, C, H, W\]; got inputs of shape \[4, 4\]"):
        group.step((torch.randn(4, 4), torch.zeros(4, dtype=torch.long)))
    assert group.stats["steps"] == 0


def test_draws_stay_on_the_cpu_when_the_pool_moves():
    # moving the pool (as for CUDA) must not move the draw weights: reading them back would sync
    pool = PerturbationPool({"identity": lambda x, y: (x + 0.0, y), "twice": lambda x, y: (x * 2, y)}, p=1.0)
    pool.to("meta")
    assert pool.weights.device.type == "cpu"
    assert pool.draw(torch.Generator().manual_seed(0), 2, torch.zeros(2, 1)).operation in (0, 1)


def test_weights_choose_operations():
    pool = PerturbationPool(weights=[0, 0, 0, 0, 0, 0, 0, 1])
    g = torch.Generator().manual_seed(0)
    assert {pool.draw(g, 2, torch.zeros(2, 1)).operation for _ in range(50)} == {7}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(default_operations()))
def test_operations_run_on_the_batch_device(name):
    pool = PerturbationPool({name: default_operations()[name]}).cuda()
    x, y = _batch()
    x2, y2 = pool.perturb(0, x.cuda(), y.cuda(), seed=0, num_classes=10)
    assert x2.device.type == "cuda" and y2.device.type == "cuda"
