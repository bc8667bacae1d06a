import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from reference import reference_losses, reference_weights

from competitive import competitive_loss, distillation_weights, group_loss
from competitive.features import build_adapters
from competitive.selection import RULES


def _inputs(n, batch, classes, feature_shape=(3, 2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(batch, classes, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n)]
    features = [
        torch.randn(batch, *feature_shape, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n)
    ]
    y = torch.randint(0, classes, (batch,), generator=g)
    return logits, features, y


def test_closed_form_two_members():
    # member 0 teaches member 1: KL(p0 || p1) and MSE written out by hand
    z0, z1 = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 0.5, 0.0]])
    f0, f1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    w = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    terms = competitive_loss([z0, z1], torch.tensor([0]), w, features=[f0, f1], alpha=0.5, beta=2.0)
    p0, p1 = z0.softmax(-1)[0], z1.softmax(-1)[0]
    kl = sum(p0[c] * math.log(p0[c] / p1[c]) for c in range(3))
    assert torch.allclose(terms.kl, torch.tensor([0.0, kl]), atol=1e-6)
    assert torch.allclose(terms.feature, torch.tensor([0.0, 2.5]))  # mean((0-1)^2, (0-2)^2)
    ce1 = -math.log(p1[0])
    assert torch.allclose(terms.loss[1], (ce1 + 0.5 * kl + 2.0 * 2.5).float(), atol=1e-6)
    assert torch.allclose(terms.loss[0], terms.ce[0])


def test_temperature_matches_kl_div_with_tau_squared():
    z0, z1 = torch.randn(4, 7), torch.randn(4, 7)
    w = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # member 1 teaches member 0
    tau = 3.0
    terms = competitive_loss([z0, z1], torch.zeros(4, dtype=torch.long), w, temperature=tau)
    expected = (
        F.kl_div((z0 / tau).log_softmax(-1), (z1 / tau).log_softmax(-1), log_target=True, reduction="batchmean")
        * tau**2
    )
    assert torch.allclose(terms.kl[0], expected, atol=1e-6)


@given(
    n=st.integers(2, 4),
    batch=st.integers(1, 5),
    classes=st.integers(2, 6),
    rule=st.sampled_from(RULES),
    granularity=st.sampled_from(["batch", "sample"]),
    alpha=st.sampled_from([0.0, 0.5, 1.0]),
    beta=st.sampled_from([0.0, 1.0, 2.0]),
    temperature=st.sampled_from([0.5, 1.0, 4.0]),
    seed=st.integers(0, 10**6),
)
def test_values_and_gradients_match_reference(n, batch, classes, rule, granularity, alpha, beta, temperature, seed):
    logits, features, y = _inputs(n, batch, classes, seed=seed)
    settings = dict(rule=rule, granularity=granularity, alpha=alpha, beta=beta, temperature=temperature)
    terms, teacher, _ = group_loss(logits, y, features, **settings)
    ref, ref_teacher = reference_losses(logits, [y] * n, features, **settings)
    assert torch.allclose(terms.loss, torch.stack(ref).detach(), atol=1e-9)
    assert teacher.tolist() == ref_teacher
    fast = torch.autograd.grad(terms.loss.sum(), logits + features, allow_unused=True, materialize_grads=True)
    for i in range(n):
        slow = torch.autograd.grad(ref[i], logits + features, allow_unused=True, materialize_grads=True)
        # member i's loss reaches only member i's logits and features
        for k, (a, b) in enumerate(zip(fast, slow)):
            if k % n == i:
                assert torch.allclose(a, b, atol=1e-9), (rule, granularity, i, k)


def test_teacher_gradient_is_its_cross_entropy_gradient():
    logits, features, y = _inputs(3, 6, 4, seed=1)
    terms, teacher, _ = group_loss(logits, y, features, rule="best")
    t = teacher.item()
    grad = torch.autograd.grad(terms.loss.sum(), [logits[t], features[t]], allow_unused=True)
    ce_grad = torch.autograd.grad(F.cross_entropy(logits[t], y), logits[t])[0]
    assert torch.allclose(grad[0], ce_grad, atol=1e-12)
    assert grad[1] is None or torch.all(grad[1] == 0)


def test_soft_targets_per_member():
    logits, _, y = _inputs(2, 5, 3, seed=2)
    soft = torch.softmax(torch.randn(5, 3, dtype=torch.float64), -1)
    targets = torch.stack([F.one_hot(y, 3).double(), soft])
    terms, _, _ = group_loss(logits, targets, rule="mutual")
    ref, _ = reference_losses(logits, [y, soft], rule="mutual")
    assert torch.allclose(terms.loss, torch.stack(ref).detach(), atol=1e-9)


@pytest.mark.parametrize("rule", ["best", "better", "mutual"])
def test_heterogeneous_features_through_adapters_match_reference(rule):
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(4, 5, generator=g, requires_grad=True) for _ in range(3)]
    features = [
        torch.randn(4, 8, 4, 4, generator=g),
        torch.randn(4, 16, 2, 2, generator=g),
        torch.randn(4, 6, generator=g),
    ]
    # conv maps of other widths and sizes beside a vector: an adapter for every ordered pair
    feats, zs = features, logits
    adapters = torch.nn.ModuleDict(build_adapters([f.shape[1:] for f in feats]))
    assert sorted(adapters) == ["0_1", "0_2", "1_0", "1_2", "2_0", "2_1"]
    y = torch.randint(0, 5, (4,), generator=g)
    terms, _, _ = group_loss(zs, y, feats, rule=rule, adapters=adapters)
    ref, _ = reference_losses(zs, [y] * 3, feats, adapters, rule=rule)
    assert torch.allclose(terms.loss, torch.stack(ref).detach(), atol=1e-5)


def test_nonfinite_member_never_teaches_and_does_not_poison_others():
    logits, features, y = _inputs(3, 4, 5, seed=4)
    bad = [logits[0], logits[1].detach().clone().fill_(float("nan")).requires_grad_(), logits[2]]
    for rule in ("best", "better", "mutual"):
        terms, teacher, w = group_loss(bad, y, features, rule=rule)
        assert torch.all(w[:, 1] == 0)
        assert teacher.item() != 1
        assert torch.isfinite(terms.loss[[0, 2]]).all() and not torch.isfinite(terms.loss[1])
        grads = torch.autograd.grad(terms.loss[[0, 2]].sum(), [logits[0], logits[2]])
        assert all(torch.isfinite(gr).all() for gr in grads)


def test_all_nonfinite_has_no_teacher():
    z = [torch.full((2, 3), float("nan")) for _ in range(2)]
    _, teacher, w = group_loss(z, torch.zeros(2, dtype=torch.long))
    assert teacher.item() == -1 and torch.all(w == 0)


def test_weights_are_used_as_given():
    # competitive_loss is a pure function of W: a hand-made W gives the hand-made mixture
    logits, _, y = _inputs(3, 3, 4, seed=5)
    w = torch.tensor([[0.0, 0.25, 0.75], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    terms = competitive_loss(logits, y, w)
    for i in range(3):
        expected = sum(
            float(w[i, j])
            * F.kl_div(logits[i].log_softmax(-1), logits[j].log_softmax(-1), log_target=True, reduction="batchmean")
            for j in range(3)
        )
        assert torch.allclose(terms.kl[i], torch.as_tensor(expected, dtype=torch.float64), atol=1e-12)
    assert reference_weights([0.2, 0.1], "best") == [[0.0, 1.0], [0.0, 0.0]]
    assert torch.equal(distillation_weights(torch.tensor([0.2, 0.1])), torch.tensor([[0.0, 1.0], [0.0, 0.0]]))


def test_the_pure_functions_name_a_missing_input():
    from competitive.losses import weights_for_teacher
    from competitive.terms.kl import kl_term

    with pytest.raises(ValueError, match=r"rule='best' needs teacher=teacher_index\(ce\)"):
        weights_for_teacher(torch.tensor([0.2, 0.1]), rule="best", teacher=None)
    log_probs = torch.zeros(2, 3, 4).log_softmax(-1)
    with pytest.raises(ValueError, match=r"temperature=2.0 needs the logits"):
        kl_term(log_probs, torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 2), temperature=2.0)
