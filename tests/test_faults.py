"""Faults: non-finite losses, a member whose forward raises, and exact resume from disk."""

import pytest
import torch
from reference import tiny_cnn
from torch import nn

from competitive import CompetitiveGroup, PerturbationPool


class Faulty(nn.Module):
    """A member that can be told to return NaN logits or to raise."""

    def __init__(self, seed):
        super().__init__()
        self.net = tiny_cnn(seed=seed, dtype=torch.float32)
        self.mode = "ok"

    def forward(self, x):
        if self.mode == "raise":
            raise RuntimeError("member exploded")
        z = self.net(x)
        return z * float("nan") if self.mode == "nan" else z


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)


def _group(n=3, **kwargs):
    members = [Faulty(i) for i in range(n)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in members]
    return CompetitiveGroup(members, optimizers, **kwargs), members


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("rule", ["best", "better", "mutual"])
def test_nonfinite_member_never_teaches_and_others_keep_training(rule):
    group, members = _group(rule=rule, feature_hooks=["net.1"] * 3)
    group.step(_batch(0))
    members[1].mode = "nan"
    before = [_params(m) for m in members]
    with pytest.warns(RuntimeWarning, match=r"Step 2: the loss of members \[1\] is NaN or inf"):
        result = group.step(_batch(1))
    assert result.teacher.item() != 1 and result.nonfinite.tolist() == [False, True, False]
    assert torch.all(result.weights[:, 1] == 0)
    for i in (0, 2):
        after = _params(members[i])
        assert all(torch.isfinite(p).all() for p in after)
        assert any(not torch.equal(p, q) for p, q in zip(after, before[i]))
    assert group.stats["nonfinite_count"] == [0, 1, 0]


def test_skip_nonfinite_keeps_the_member_unchanged():
    group, members = _group(skip_nonfinite=True)
    group.step(_batch(0))
    members[2].mode = "nan"
    before = _params(members[2])
    with pytest.warns(RuntimeWarning, match=r"members \[2\] is NaN or inf; they do not teach this step and skip"):
        group.step(_batch(1))
    assert all(torch.equal(p, q) for p, q in zip(_params(members[2]), before))
    members[2].mode = "ok"
    group.step(_batch(2))  # it recovers: its parameters never became NaN
    assert all(torch.isfinite(p).all() for p in members[2].parameters())


def test_all_members_nonfinite_is_a_clear_error_and_nothing_moves():
    group, members = _group(perturbation=PerturbationPool(p=1.0), seed=0)
    group.step(_batch(0))
    params = [_params(m) for m in members]
    generator = group.generator.get_state()
    for m in members:
        m.mode = "nan"
    with pytest.raises(
        RuntimeError, match=r"Step 2: the losses of all 3 members are NaN or inf, so no member can teach"
    ):
        group.step(_batch(1))
    assert group.stats["steps"] == 1 and group.stats["nonfinite_count"] == [0, 0, 0]
    assert torch.equal(group.generator.get_state(), generator)
    assert all(torch.equal(p, q) for m, p0 in zip(members, params) for p, q in zip(_params(m), p0))


def test_a_forward_that_raises_leaves_the_group_unchanged():
    group, members = _group(perturbation=PerturbationPool(p=1.0), seed=3)
    group.step(_batch(0))
    state = {k: v.clone() for k, v in group.counters.state_dict().items() if k != "_extra_state"}
    generator = group.generator.get_state()
    params = [_params(m) for m in members]
    momentum = [
        [o.state[p]["momentum_buffer"].clone() for p in m.parameters()] for o, m in zip(group.optimizers, members)
    ]
    members[2].mode = "raise"
    with pytest.raises(RuntimeError, match="member exploded"):
        group.step(_batch(1))
    assert group.stats["steps"] == 1
    assert all(torch.equal(v, state[k]) for k, v in group.counters.state_dict().items() if k != "_extra_state")
    assert torch.equal(group.generator.get_state(), generator)
    for m, o, p0, b0 in zip(members, group.optimizers, params, momentum):
        assert all(torch.equal(p, q) for p, q in zip(_params(m), p0))
        assert all(torch.equal(o.state[p]["momentum_buffer"], b) for p, b in zip(m.parameters(), b0))
        assert all(p.grad is None for p in m.parameters())
    assert group.capture["features"].values == [None] * 3


def _resume_group(seed=11):
    torch.manual_seed(0)
    members = [tiny_cnn(width=4 + i, seed=i, dtype=torch.float32) for i in range(2)]
    optimizers = [
        torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4) for m in members
    ]
    group = CompetitiveGroup(
        members,
        optimizers,
        feature_hooks=["1", "1"],
        perturbation=PerturbationPool(p=1.0),
        seed=seed,
        example_input=torch.zeros(2, 3, 6, 6),
    )
    return group


def test_exact_resume_from_disk(tmp_path):
    k = 6
    torch.use_deterministic_algorithms(True)
    try:
        straight = _resume_group()
        for s in range(2 * k):
            straight.step(_batch(s))
        first = _resume_group()
        for s in range(k):
            first.step(_batch(s))
        torch.save(first.state_dict(), tmp_path / "group.pt")
        del first
        resumed = _resume_group(seed=12345)  # another seed: everything must come from the file
        resumed.load_state_dict(torch.load(tmp_path / "group.pt"))
        draws = []
        for s in range(k, 2 * k):
            draws.append(resumed.step(_batch(s)).perturbation)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(straight.models, resumed.models):
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)
    for a, b in zip(straight.adapters.values(), resumed.adapters.values()):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert straight.stats == resumed.stats
    assert len(set(draws)) > 1  # perturbations were part of the resumed run


def test_load_state_dict_of_another_group_size_is_rejected():
    small = _group(2)[0]
    with pytest.raises(ValueError, match=r"Invalid state_dict: it holds 3 members; this group has 2"):
        small.load_state_dict(_group(3)[0].state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_a_step_with_no_finite_member_updates_nobody():
    members = [Faulty(i).cuda() for i in range(2)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in members]
    group = CompetitiveGroup(members, optimizers, seed=0)
    x, y = (t.cuda() for t in _batch(0))
    group.step((x, y))
    params = [_params(m) for m in members]
    for m in members:
        m.mode = "nan"
    with pytest.raises(RuntimeError, match="no member was updated"):
        group.step((x, y))
    assert all(torch.equal(p, q) for m, p0 in zip(members, params) for p, q in zip(_params(m), p0))
    assert all(p.grad is None for m in members for p in m.parameters())
