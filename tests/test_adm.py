"""The ADM-style term against a plain per-pair, per-sample, per-location loop of its equations."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_weights

from competitive import ADM, CompetitiveGroup, distillation_weights
from competitive.features import build_adapters
from competitive.terms import adm_loss


def plain_adm(features, ws, *, consensus=1.0, divergence=0.1, adapters=None):
    """``consensus * sum_j W_mj L_co(m, j) + divergence * sum_i W_im L_di(m, i)`` written out by hand."""
    n, batch = len(features), features[0].shape[0]

    def unit_vectors(f):  # [C, H, W] -> list of per-location channel vectors
        return [f[:, h, w] for h in range(f.shape[1]) for w in range(f.shape[2])] if f.dim() == 3 else [f]

    def pair(i, j, b):
        fi = features[i][b : b + 1]
        if adapters is not None and f"{i}_{j}" in adapters:
            fi = adapters[f"{i}_{j}"](fi)
        us = [u / u.norm().clamp_min(1e-12) for u in unit_vectors(fi[0])]
        vs = [v / v.norm().clamp_min(1e-12) for v in unit_vectors(features[j][b])]
        s_bar = [float((u * v).sum()) for u, v in zip(us, vs)]
        w_co = [(1 + s) / 2 for s in s_bar]
        w_di = [(1 - s) / 2 for s in s_bar]
        mean_co, mean_di = sum(w_co) / len(w_co) + 1e-6, sum(w_di) / len(w_di) + 1e-6
        co = sum(wc / mean_co * ((u - v.detach()) ** 2).sum() for wc, u, v in zip(w_co, us, vs)) / len(us)
        di = sum(wd / mean_di * (u.detach() * v).sum() for wd, u, v in zip(w_di, us, vs)) / len(us)
        return co, di

    losses = []
    for m in range(n):
        loss = torch.zeros((), dtype=torch.float64)
        for b in range(batch):
            for j in range(n):
                if j != m and ws[b][m][j] > 0:
                    loss = loss + consensus * ws[b][m][j] * pair(m, j, b)[0] / batch
            for i in range(n):
                if i != m and ws[b][i][m] > 0:
                    loss = loss + divergence * ws[b][i][m] * pair(i, m, b)[1] / batch
        losses.append(loss)
    return torch.stack(losses)


def _features(n, shapes, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shapes[i], generator=g, dtype=torch.float64, requires_grad=True) for i in range(n)]


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("rule", ["best", "better", "mutual", "independent"])
@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_matches_the_plain_loop_in_value_and_gradient(n, rule, granularity):
    batch = 3
    features = _features(n, [(4, 3, 3)] * n, batch, seed=n)
    g = torch.Generator().manual_seed(10 + n)
    scores = torch.rand(batch, n, generator=g, dtype=torch.float64)
    if granularity == "batch":
        w, ws = (
            distillation_weights(scores.mean(0), rule=rule),
            [reference_weights(scores.mean(0).tolist(), rule)] * batch,
        )
    else:
        w = distillation_weights(scores, rule=rule)
        ws = [reference_weights(scores[b].tolist(), rule) for b in range(batch)]
    ours = adm_loss(features, w, consensus=0.7, divergence=0.3)
    theirs = plain_adm(features, ws, consensus=0.7, divergence=0.3)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-11)
    if rule == "independent":  # nobody learns from anybody: the term is exactly zero
        assert (ours == 0).all() and not theirs.requires_grad
        return
    for i in range(n):
        mine = torch.autograd.grad(ours[i], features, retain_graph=True, allow_unused=True)
        ref = torch.autograd.grad(theirs[i], features, retain_graph=True, allow_unused=True)
        for a, b, f in zip(mine, ref, features):
            a = torch.zeros_like(f) if a is None else a
            b = torch.zeros_like(f) if b is None else b
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


def test_members_of_different_shapes_go_through_adapters():
    shapes = [(4, 3, 3), (6, 2, 2), (5,)]
    features = _features(3, shapes, seed=1)
    adapters = torch.nn.ModuleDict(build_adapters([torch.Size(s) for s in shapes])).double()
    w = distillation_weights(torch.tensor([0.3, 0.9, 0.5]), rule="mutual")
    ours = adm_loss(features, w, adapters=adapters)
    theirs = plain_adm(features, [w.tolist()] * 3, adapters=adapters)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-11)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 4), seed=st.integers(0, 10_000), per_sample=st.booleans())
def test_a_members_term_sends_no_gradient_to_any_other_member(n, seed, per_sample):
    # the student's consensus reads the teacher detached; the teacher's divergence reads the student detached
    g = torch.Generator().manual_seed(seed)
    shape = (3, n, n) if per_sample else (n, n)
    w = torch.rand(shape, generator=g, dtype=torch.float64) * (1 - torch.eye(n, dtype=torch.float64))
    features = _features(n, [(4, 2, 2)] * n, seed=seed)
    loss = adm_loss(features, w)
    for i in range(n):
        grads = torch.autograd.grad(loss[i], features, retain_graph=True, allow_unused=True)
        assert all(grads[j] is None or (grads[j] == 0).all() for j in range(n) if j != i)


def test_consensus_pulls_the_student_and_divergence_pushes_the_teacher():
    f_teacher = torch.tensor([[[[1.0]], [[0.0]]]], dtype=torch.float64)  # [1, 2, 1, 1]
    f_student = torch.tensor([[[[0.6]], [[0.8]]]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)  # member 1 teaches member 0
    f_teacher.requires_grad_()
    loss = adm_loss([f_student, f_teacher], w, consensus=1.0, divergence=1.0)
    # one location: w_co = w_di = 1 after normalization; L_co = ||u - v||^2 = 2 - 2 * 0.6, L_di = u.v = 0.6
    # (the weights are divided by their mean plus 1e-6)
    torch.testing.assert_close(loss, torch.tensor([0.8, 0.6], dtype=torch.float64), rtol=0, atol=1e-5)


def test_the_group_trains_with_adm_and_reports_it():
    torch.manual_seed(0)
    models = [
        torch.nn.Sequential(
            torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(c * 36, 4)
        )
        for c in (4, 6)
    ]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    group = CompetitiveGroup(
        models,
        optimizers,
        feature_hooks=["1", "1"],
        terms=["kl", ADM(divergence=0.2)],
        example_input=torch.randn(2, 3, 6, 6),
        warmup_steps=0,
    )
    assert sorted(group.terms[1].adapters) == ["0_1", "1_0"]
    result = group.step((torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))))
    assert set(result.terms) == {"kl", "adm"} and torch.isfinite(result.terms["adm"]).all()
    assert result.terms["adm"].abs().sum() > 0
    with pytest.raises(ValueError, match="divergence"):
        ADM(divergence=-1)
