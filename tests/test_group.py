import copy
import io

import pytest
import torch
from reference import reference_step, tiny_cnn
from torch import nn

from competitive import KL, CompetitiveGroup, FeatureL2, StepResult


def _pair(dtype=torch.float64, lr=0.05, n=2, classes=5):
    models = [tiny_cnn(width=4, classes=classes, seed=i, dtype=dtype) for i in range(n)]
    optimizers = [
        torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4) for m in models
    ]
    return models, optimizers


def _batch(seed, batch=8, classes=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 6, 6, generator=g, dtype=dtype), torch.randint(0, classes, (batch,), generator=g)


@pytest.mark.parametrize("rule", ["best", "better", "mutual", "independent"])
@pytest.mark.parametrize("granularity", ["batch", "sample"])
@pytest.mark.parametrize("hooks", [None, "1"])
def test_fifty_steps_match_the_reference(rule, granularity, hooks):
    models, optimizers = _pair(n=3)
    ref_models = copy.deepcopy(models)
    ref_optimizers = [
        torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4) for m in ref_models
    ]
    settings = dict(rule=rule, granularity=granularity, alpha=1.0, beta=0.5, temperature=2.0)
    terms = [KL(1.0, temperature=2.0)] + ([] if hooks is None else [FeatureL2(0.5)])
    group = CompetitiveGroup(
        models,
        optimizers,
        feature_hooks=None if hooks is None else [hooks] * 3,
        warmup_steps=0,
        terms=terms,
        rule=rule,
        granularity=granularity,
    )
    feature_modules = None if hooks is None else [m.get_submodule(hooks) for m in ref_models]
    teachers = set()
    for step in range(50):
        batch = _batch(step)
        result = group.step(batch)
        _, ref_teacher = reference_step(ref_models, ref_optimizers, batch, feature_modules, **settings)
        assert result.teacher.tolist() == ref_teacher
        teachers.add(str(result.teacher.tolist()))
    for m, r in zip(models, ref_models):
        for p, q in zip(m.parameters(), r.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-10)
    assert len(teachers) > 1  # the teacher changes over the run: the comparison covers both roles


def test_one_step_gradients_match_reference_before_stepping():
    models, optimizers = _pair(n=3)
    ref_models = copy.deepcopy(models)
    group = CompetitiveGroup(models, optimizers, feature_hooks=["1"] * 3, warmup_steps=0)
    x, y = _batch(0)
    total, result = group.loss((x, y))
    total.backward()
    from reference import reference_losses

    captured = {}
    hooks = [
        m[1].register_forward_hook(lambda mod, i, o, k=k: captured.__setitem__(k, o)) for k, m in enumerate(ref_models)
    ]
    logits = [m(x) for m in ref_models]
    losses, teacher = reference_losses(logits, [y] * 3, [captured[k] for k in range(3)])
    for h in hooks:
        h.remove()
    assert result.teacher.item() == teacher
    for i, (m, r) in enumerate(zip(models, ref_models)):
        grads = torch.autograd.grad(losses[i], list(r.parameters()))
        for p, g in zip(m.parameters(), grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_result_holds_per_member_tensors():
    models, optimizers = _pair(dtype=torch.float32)
    group = CompetitiveGroup(models, optimizers, warmup_steps=0)
    result = group.step(_batch(0, dtype=torch.float32))
    assert isinstance(result, StepResult)
    assert result.teacher.dtype == torch.long and result.teacher.shape == ()
    for name in ("ce", "kl", "feature", "loss"):
        assert getattr(result, name).shape == (2,)
    teacher = result.teacher.item()
    assert result.kl[teacher] == 0 and result.kl[1 - teacher] > 0
    assert torch.allclose(result.loss, result.ce + result.kl + result.feature)
    assert all(p.grad is None for m in models for p in m.parameters())  # gradients are zeroed


def test_sample_granularity_reports_a_teacher_per_sample():
    models, optimizers = _pair(dtype=torch.float32)
    group = CompetitiveGroup(models, optimizers, granularity="sample")
    result = group.step(_batch(0, dtype=torch.float32))
    assert result.teacher.shape == (8,) and result.weights.shape == (8, 2, 2)
    assert abs(sum(group.stats["teacher_count"]) - 1.0) < 1e-6


def test_heterogeneous_members_train_their_adapters():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 4))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(108, 20), nn.ReLU(), nn.Linear(20, 4))
    optimizers = [torch.optim.SGD(cnn.parameters(), lr=0.1), torch.optim.SGD(mlp.parameters(), lr=0.1)]
    # a conv map [6, 6, 6] beside a vector [20]: adapters both ways
    group = CompetitiveGroup([cnn, mlp], optimizers, feature_hooks=["1", "2"])
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
    group.step((x, y))
    assert sorted(group.adapters) == ["0_1", "1_0"]
    before = {k: [p.detach().clone() for p in a.parameters()] for k, a in group.adapters.items()}
    changed = {k: False for k in before}
    for _step in range(10):
        result = group.step((torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))))
        assert result.feature[result.teacher] == 0
        for k, a in group.adapters.items():
            changed[k] |= any(not torch.equal(p, q) for p, q in zip(a.parameters(), before[k]))
    assert all(changed.values()), changed
    # the adapter i_j is a parameter group of the student's optimizer
    held = {id(p) for g in optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in held for p in group.adapters["0_1"].parameters())
    saved = group.state_dict()["terms"]
    assert sum(k.startswith("1.adapters.0_1") or k.startswith("1.adapters.1_0") for k in saved) == 2


def test_unbridgeable_feature_shapes_fail_on_first_step():
    # token features [B, L, D] with a different number of tokens L
    a = nn.Sequential(nn.Unflatten(1, (2, 54)), nn.Linear(54, 5), nn.Flatten(), nn.Linear(10, 4))
    b = nn.Sequential(nn.Unflatten(1, (3, 36)), nn.Linear(36, 5), nn.Flatten(), nn.Linear(15, 4))
    a.insert(0, nn.Flatten())
    b.insert(0, nn.Flatten())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, b)]
    group = CompetitiveGroup([a, b], optimizers, feature_hooks=["2", "2"])
    with pytest.raises(ValueError, match=r"models\[0\] -> models\[1\]: No adapter maps a feature of shape \[2, 5\]"):
        group.step((torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,))))


def test_example_input_builds_adapters_at_construction():
    a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(144, 3))
    b = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(288, 3))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, b)]
    group = CompetitiveGroup([a, b], optimizers, feature_hooks=["0", "0"], example_input=torch.randn(2, 3, 6, 6))
    assert sorted(group.adapters) == ["0_1", "1_0"] and len(optimizers[1].param_groups) == 2


def test_state_dict_round_trip():
    models, optimizers = _pair(dtype=torch.float32)
    group = CompetitiveGroup(models, optimizers, feature_hooks=["1", "1"])
    for s in range(5):
        group.step(_batch(s, dtype=torch.float32))
    buffer = io.BytesIO()
    torch.save(group.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    models2, optimizers2 = _pair(dtype=torch.float32)
    other = CompetitiveGroup(models2, optimizers2, feature_hooks=["1", "1"])
    other.load_state_dict(state)
    assert other.stats == group.stats and other.stats["steps"] == 5
    for s in range(5, 8):
        a, b = group.step(_batch(s, dtype=torch.float32)), other.step(_batch(s, dtype=torch.float32))
        assert torch.equal(a.loss, b.loss)
    for m, r in zip(models, models2):
        for p, q in zip(m.parameters(), r.parameters()):
            assert torch.equal(p, q)
    assert other.stats == group.stats


def test_stats_count_teachers_and_switches():
    models, optimizers = _pair(dtype=torch.float32)
    group = CompetitiveGroup(models, optimizers)
    teachers = [group.step(_batch(s, dtype=torch.float32)).teacher.item() for s in range(12)]
    stats = group.stats
    assert stats["steps"] == 12
    assert stats["teacher_count"] == [float(teachers.count(0)), float(teachers.count(1))]
    assert stats["switches"] == sum(a != b for a, b in zip(teachers, teachers[1:]))


def test_train_eval_and_close():
    models, optimizers = _pair(dtype=torch.float32)
    with CompetitiveGroup(models, optimizers, feature_hooks=["1", "1"]) as group:
        assert group.eval() is group and not any(m.training for m in models)
        group.train()
        assert all(m.training for m in models)
        assert all(len(m[1]._forward_hooks) == 1 for m in models)
    assert all(len(m[1]._forward_hooks) == 0 for m in models)  # hooks removed on exit


def test_loss_leaves_stepping_to_the_caller():
    models, optimizers = _pair(dtype=torch.float32)
    reference = copy.deepcopy(models)
    group = CompetitiveGroup(models, optimizers, warmup_steps=0)
    before = [p.detach().clone() for p in models[0].parameters()]
    x, y = _batch(0, dtype=torch.float32)
    total, result = group.loss((x, y))
    from reference import reference_losses

    losses, teacher = reference_losses([m(x) for m in reference], [y, y])
    assert result.teacher.item() == teacher
    torch.testing.assert_close(total, sum(losses))  # the members' losses, from the equations by hand
    total.backward()
    for m, r, loss in zip(models, reference, losses):  # one backward: each member gets its own gradient
        for p, g in zip(m.parameters(), torch.autograd.grad(loss, list(r.parameters()), retain_graph=True)):
            torch.testing.assert_close(p.grad, g)
    assert all(p.grad is not None for p in models[0].parameters())
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), before))


def _summed_step(group, batch):
    """The obvious step: the summed losses, one backward through every member, every optimizer steps."""
    total, result = group.loss(batch)
    total.backward()
    for optimizer in group.optimizers:
        optimizer.step()
    group.zero_grad()
    return result


@pytest.mark.parametrize("rule", ["best", "mutual"])
def test_member_by_member_backward_equals_one_backward_of_the_sum(rule):
    # step() backpropagates the step math once, then each member from its outputs in turn, stepping
    # it at once; every parameter (members, adapters, heads) must end bitwise where one backward of
    # the summed losses puts it, perturbed (mixed) batches included
    from competitive import PerturbationPool, default_operations

    def build():
        models = [tiny_cnn(width=w, classes=5, seed=i, dtype=torch.float32) for i, w in enumerate((4, 6, 4))]
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) for m in models]
        ops = default_operations()
        pool = PerturbationPool({k: ops[k] for k in ("mixup", "gaussian_noise")}, p=1.0)
        return CompetitiveGroup(
            models,
            optimizers,
            feature_hooks=["1"] * 3,
            embedding_hooks=["4"] * 3,
            terms=["kl", "feature", "mcl", "adm"],
            rule=rule,
            warmup_steps=2,
            perturbation=pool,
            seed=0,
            example_input=_batch(0, dtype=torch.float32)[0][:2],
        )

    group, twin = build(), build()
    for step in range(6):
        batch = _batch(step, dtype=torch.float32)
        result, expected = group.step(batch), _summed_step(twin, batch)
        assert torch.equal(result.loss, expected.loss) and result.perturbed == expected.perturbed
    for a, b in zip(
        group.state_dict()["models"] + [group.terms.state_dict()],
        twin.state_dict()["models"] + [twin.terms.state_dict()],
    ):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.grad is None for o in group.optimizers for g in o.param_groups for p in g["params"])
