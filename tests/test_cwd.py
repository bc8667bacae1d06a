"""The ``cwd`` term against a transcription of mmrazor's ``ChannelWiseDivergence.forward``."""

import pytest
import torch
import torch.nn.functional as F
from reference import tiny_cnn

from competitive import CWD, CompetitiveGroup, distillation_weights, step_losses


def mmrazor_cwd(preds_S, preds_T, tau=1.0, loss_weight=1.0):
    """mmrazor/models/losses/cwd.py, ``ChannelWiseDivergence.forward``, transcribed as written."""
    N, C, H, W = preds_S.shape
    softmax_pred_T = F.softmax(preds_T.reshape(-1, W * H) / tau, dim=1)
    logsoftmax = torch.nn.LogSoftmax(dim=1)
    loss = torch.sum(
        softmax_pred_T * logsoftmax(preds_T.reshape(-1, W * H) / tau)
        - softmax_pred_T * logsoftmax(preds_S.reshape(-1, W * H) / tau)
    ) * (tau**2)
    return loss_weight * loss / (C * N)


def _inputs(seed, n=2, batch=4, shape=(3, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(batch, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n)]
    features = [torch.randn(batch, *shape, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n)]
    return logits, features, torch.randint(0, 6, (batch,), generator=g)


@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("seed", range(3))
def test_rule_best_with_two_members_is_mmrazors_loss_for_the_student(tau, seed):
    logits, features, y = _inputs(seed)
    out = step_losses(logits, y, terms=[CWD(weight=5.0, tau=tau)], features=features, rule="best")
    teacher = int(out.teacher)
    student = 1 - teacher
    expected = mmrazor_cwd(features[student], features[teacher].detach(), tau=tau)
    ours = out.terms["cwd"]  # unweighted: the group multiplies by the term's weight
    torch.testing.assert_close(ours[student], expected, rtol=1e-12, atol=1e-12)
    assert ours[teacher] == 0
    grads = torch.autograd.grad(ours.sum(), features)
    (reference,) = torch.autograd.grad(expected, features[student])
    torch.testing.assert_close(grads[student], reference, rtol=1e-12, atol=1e-12)
    assert not grads[teacher].any()  # the teacher's map is a target: no gradient reaches it


@pytest.mark.parametrize("rule", ["better", "mutual"])
def test_per_sample_teachers_weight_the_per_sample_divergences(rule):
    logits, features, y = _inputs(7, n=3, batch=5)
    out = step_losses(logits, y, terms=[CWD(tau=2.0)], features=features, rule=rule, granularity="sample")
    ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits], dim=1).detach()  # [B, N]
    w = distillation_weights(ce, rule=rule)  # [B, N, N]
    for i in range(3):
        pairs = [
            w[b, i, j] * mmrazor_cwd(features[i][b : b + 1], features[j][b : b + 1].detach(), tau=2.0)
            for b in range(5)
            for j in range(3)
        ]
        torch.testing.assert_close(out.terms["cwd"][i], torch.stack(pairs).sum() / 5, rtol=1e-12, atol=1e-12)


def test_cwd_in_a_group_on_hooked_feature_maps_with_adapters():
    models = [tiny_cnn(width=w, classes=5, seed=i, dtype=torch.float32) for i, w in enumerate((4, 6))]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    # Conv2d outputs [4, 6, 6] and [6, 6, 6]: the student's channels go through an adapter
    group = CompetitiveGroup(
        models, optimizers, feature_hooks=["0", "0"], terms=["kl", "cwd"], example_input=torch.randn(2, 3, 6, 6)
    )
    assert sorted(group.terms["cwd"].adapters) == ["0_1", "1_0"]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        result = group.step((torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)))
        assert torch.isfinite(result.terms["cwd"]).all() and result.terms["cwd"][result.teacher] == 0
    with pytest.raises(ValueError, match=r"Invalid tau value 0.0 provided for the 'cwd' term"):
        CWD(tau=0.0)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_on_logits_per_position_is_mmrazors_loss_on_the_decode_heads_logits(tau):
    # mmrazor's segmentation setting: CWD on the logits [B, C, H, W]; rule best, two members
    g = torch.Generator().manual_seed(11)
    logits = [torch.randn(3, 5, 4, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    y = torch.randint(0, 5, (3, 4, 6), generator=g)
    out = step_losses(logits, y, terms=[CWD(tau=tau, on="logits")], rule="best")
    teacher = int(out.teacher)
    student = 1 - teacher
    expected = mmrazor_cwd(logits[student], logits[teacher].detach(), tau=tau)
    torch.testing.assert_close(out.terms["cwd"][student], expected, rtol=1e-12, atol=1e-12)
    assert out.terms["cwd"][teacher] == 0
    grads = torch.autograd.grad(out.terms["cwd"].sum(), logits)
    (reference,) = torch.autograd.grad(expected, logits[student])
    torch.testing.assert_close(grads[student], reference, rtol=1e-12, atol=1e-12)
    assert not grads[teacher].any()


def test_on_logits_leaves_ignored_positions_out():
    g = torch.Generator().manual_seed(12)
    logits = [torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    y = torch.randint(0, 3, (2, 4, 4), generator=g)
    y[:, :, :2] = 255  # the left half of every map is ignored
    out = step_losses(logits, y, terms=[CWD(on="logits")], rule="mutual", ignore_index=255)
    # the right halves alone, through mmrazor's formula, per pair (mutual: each learns from the other)
    for i in range(2):
        expected = mmrazor_cwd(logits[i][..., 2:], logits[1 - i][..., 2:].detach())
        torch.testing.assert_close(out.terms["cwd"][i], expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.terms["cwd"].sum(), logits)
    assert all(not g[..., :2].any() for g in grads) and all(torch.isfinite(g).all() for g in grads)


def test_on_logits_needs_positions_and_a_known_setting():
    z = [torch.randn(4, 3), torch.randn(4, 3)]
    with pytest.raises(ValueError, match=r"CWD\(on='logits'\) needs logits per position"):
        step_losses(z, torch.tensor([0, 1, 2, 0]), terms=[CWD(on="logits")])
    with pytest.raises(ValueError, match=r"Invalid on value 'maps'.*'features' or 'logits'"):
        CWD(on="maps")
