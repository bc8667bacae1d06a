"""MCL against a transcription of the reference code's equations and a plain per-anchor loop."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_weights, tiny_cnn

from competitive import MCL, CompetitiveGroup, distillation_weights, mcl_loss


def transcribed_mcl(embeddings, labels, tau=0.1, kd_t=3.0):
    """``winycg/MCL`` ``losses/cifar_sup_mcl_loss.py`` (``SupMCL.forward``), its equations copied
    line by line for any number of networks; returns ``0.1*VCL + SoftVCL + 0.1*ICL + SoftICL``."""
    number_net = len(embeddings)

    def kl(y_s, y_t):
        p_s = F.log_softmax(y_s / kd_t, dim=1)
        p_t = F.softmax(y_t / kd_t, dim=1)
        return F.kl_div(p_s, p_t, reduction="batchmean") * kd_t**2

    labels = labels.unsqueeze(0)
    intra_mask = torch.eq(labels, labels.T).double() - torch.eye(labels.size(1), dtype=torch.double)
    diag_mask = 1.0 - torch.eye(labels.size(1), dtype=torch.double)
    inter_logits = []
    soft_icl_loss = 0.0
    for i in range(number_net):
        for j in range(i + 1, number_net):
            cos_simi_ij = torch.div(torch.mm(embeddings[i], embeddings[j].T), tau)
            inter_logits.append(cos_simi_ij)
            cos_simi_ji = torch.div(torch.mm(embeddings[j], embeddings[i].T), tau)
            inter_logits.append(cos_simi_ji)
            soft_icl_loss += kl(cos_simi_ij, cos_simi_ji.detach())
            soft_icl_loss += kl(cos_simi_ji, cos_simi_ij.detach())
    icl_loss = 0.0
    for logit in inter_logits:
        log_prob = logit - torch.log((torch.exp(logit) * diag_mask).sum(1, keepdim=True))
        mean_log_prob_pos = (intra_mask * log_prob).sum(1) / intra_mask.sum(1)
        icl_loss += -mean_log_prob_pos.mean()
    intra_logits = [torch.div(torch.mm(embeddings[i], embeddings[i].T), tau) for i in range(number_net)]
    soft_vcl_loss = 0.0
    for i in range(number_net):
        for j in range(number_net):
            if i != j:
                soft_vcl_loss += kl(intra_logits[i], intra_logits[j].detach())
    vcl_loss = 0.0
    for logit in intra_logits:
        log_prob = logit - torch.log((torch.exp(logit) * diag_mask).sum(1, keepdim=True))
        mean_log_prob_pos = (intra_mask * log_prob).sum(1) / intra_mask.sum(1)
        vcl_loss += -mean_log_prob_pos.mean()
    return 0.1 * vcl_loss + soft_vcl_loss + 0.1 * icl_loss + soft_icl_loss


def plain_mcl(z, labels, ws, *, tau=0.1, t=3.0, vcl=0.1, soft_vcl=1.0, icl=0.1, soft_icl=1.0):
    """The issue's equations with Python loops over members, anchors and contrasts.

    ``labels[i]`` are member i's labels, ``ws[b]`` the nested-list W of sample b. Gradients reach
    row b of peer j's embedding from member i's loss only where ``ws[b][j][i] > 0``.
    """
    n, batch = len(z), z[0].shape[0]

    def peer(i, j):
        if i == j:
            return z[j]
        rows = [z[j][b] if ws[b][j][i] > 0 else z[j][b].detach() for b in range(batch)]
        return torch.stack(rows)

    def supcon(zi, zj, li, lj):
        count = 0
        per_anchor = []
        for a in range(batch):
            positives = [p for p in range(batch) if p != a and lj[p] == li[a]]
            if not positives:
                per_anchor.append(None)
                continue
            sims = [zi[a] @ zj[k] / tau for k in range(batch)]
            log_denominator = torch.logsumexp(torch.stack([sims[k] for k in range(batch) if k != a]), 0)
            value = -sum(sims[p] - log_denominator for p in positives) / len(positives)
            per_anchor.append(value)
            count += 1
        return per_anchor, max(count, 1)

    def soft_kl_row(student_row, target_row):
        log_q = (student_row / t).log_softmax(0)
        p = (target_row.detach() / t).softmax(0)
        return (p * (p.log() - log_q)).sum() * t**2

    losses = []
    for i in range(n):
        own, count = supcon(z[i], z[i], labels[i], labels[i])
        loss = vcl * sum(v for v in own if v is not None) / count
        for j in range(n):
            if i == j:
                continue
            zj = peer(i, j)
            anchors, count = supcon(z[i], zj, labels[i], labels[j])
            s_ij, s_ji = z[i] @ zj.T / tau, z[j] @ z[i].T / tau
            s_ii, s_jj = z[i] @ z[i].T / tau, z[j] @ z[j].T / tau
            for b in range(batch):
                w = ws[b][i][j]
                if w == 0:
                    continue
                if anchors[b] is not None:
                    loss = loss + w * icl * anchors[b] / count
                loss = loss + w * soft_vcl * soft_kl_row(s_ii[b], s_jj[b]) / batch
                loss = loss + w * soft_icl * soft_kl_row(s_ij[b], s_ji[b]) / batch
        losses.append(loss)
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in losses])


def _embeddings(n, batch, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = [torch.randn(batch, dim, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n)]
    return raw, [F.normalize(r, dim=1) for r in raw]


def test_two_members_mutual_equal_the_reference_code_in_value_and_gradient():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3])  # every anchor has a positive, as the code requires
    raw, z = _embeddings(2, 8)
    w = distillation_weights(torch.tensor([0.7, 0.3]), rule="mutual")
    ours = mcl_loss(z, labels, w).sum()
    raw_ref = [r.detach().clone().requires_grad_() for r in raw]
    theirs = transcribed_mcl([F.normalize(r, dim=1) for r in raw_ref], labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(ours, raw)
    ref_grads = torch.autograd.grad(theirs, raw_ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("rule", ["best", "better", "mutual", "independent"])
@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_matches_the_plain_loop_in_value_and_gradient(n, rule, granularity):
    batch = 6
    g = torch.Generator().manual_seed(n)
    labels = torch.randint(0, 3, (n, batch), generator=g)
    labels[:, 0] = 5  # an anchor without any positive: left out of the average, never NaN
    raw, z = _embeddings(n, batch, seed=n)
    scores = torch.rand(batch, n, generator=g, dtype=torch.float64)
    if granularity == "batch":
        w = distillation_weights(scores.mean(0), rule=rule)
        ws = [reference_weights(scores.mean(0).tolist(), rule)] * batch
    else:
        w = distillation_weights(scores, rule=rule)
        ws = [reference_weights(scores[b].tolist(), rule) for b in range(batch)]
    settings_ = dict(vcl=0.3, soft_vcl=0.7, icl=0.2, soft_icl=1.1)
    ours = mcl_loss(z, labels, w, tau=0.2, temperature=2.0, **settings_)
    theirs = plain_mcl(z, labels.tolist(), ws, tau=0.2, t=2.0, **settings_)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-11)
    for i in range(n):  # each member's loss, gradient into every member's embedding
        mine = torch.autograd.grad(ours[i], raw, retain_graph=True, allow_unused=True)
        ref = torch.autograd.grad(theirs[i], raw, retain_graph=True, allow_unused=True)
        for a, b in zip(mine, ref):
            a = torch.zeros_like(raw[0]) if a is None else a
            b = torch.zeros_like(raw[0]) if b is None else b
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 4), batch=st.integers(2, 6), seed=st.integers(0, 10_000), per_sample=st.booleans())
def test_a_peer_gets_gradient_from_a_members_term_only_where_it_learns_from_that_member(n, batch, seed, per_sample):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, n, n) if per_sample else (n, n)
    w = (torch.rand(shape, generator=g) < 0.5).double() * (1 - torch.eye(n, dtype=torch.double))
    labels = torch.randint(0, 2, (batch,), generator=g)
    raw, z = _embeddings(n, batch, seed=seed)
    loss = mcl_loss(z, labels, w)
    for i in range(n):
        grads = torch.autograd.grad(loss[i], raw, retain_graph=True, allow_unused=True)
        for j in range(n):
            if j == i:
                continue
            learns = (w[..., j, i] > 0).expand(batch) if not per_sample else w[:, j, i] > 0
            rows = grads[j] if grads[j] is not None else torch.zeros_like(raw[j])
            assert (rows[~learns] == 0).all()  # rows of j that do not learn from i: no gradient


def test_the_teacher_under_best_learns_nothing_from_its_students():
    raw, z = _embeddings(3, 6)
    w = distillation_weights(torch.tensor([0.9, 0.2, 0.5]), rule="best")  # member 1 teaches
    loss = mcl_loss(z, torch.tensor([0, 0, 1, 1, 2, 2]), w)
    students = loss[0] + loss[2]
    grad = torch.autograd.grad(students, raw[1], allow_unused=True, retain_graph=True)[0]
    assert grad is None or (grad == 0).all()
    # ... while its own VCL still trains it
    assert torch.autograd.grad(loss[1], raw[1])[0].abs().sum() > 0


def test_a_nonfinite_peer_never_poisons_another_member():
    raw, z = _embeddings(3, 6)
    z[2] = z[2].detach().clone()
    z[2][1] = torch.nan
    teaches = torch.ones(3, 6, dtype=torch.bool)
    teaches[2, 1] = False
    w = distillation_weights(torch.tensor([0.4, 0.2, torch.nan]), rule="mutual")
    loss = mcl_loss(z, torch.tensor([0, 0, 1, 1, 2, 2]), w, teaches=teaches)
    assert torch.isfinite(loss[:2]).all() and not torch.isfinite(loss[2])


class Pooled(torch.nn.Module):
    """A CNN whose classifier reads a pooled embedding: hooks on ``fc`` (input) and ``pool`` (output)."""

    def __init__(self, width, classes=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, width, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def _mcl_group(hooks=("fc", "fc"), **kwargs):
    models = [Pooled(5, seed=0), Pooled(7, seed=1)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    return (
        models,
        optimizers,
        CompetitiveGroup(
            models,
            optimizers,
            embedding_hooks=list(hooks),
            terms=["kl", "mcl"],
            rule="mutual",
            seed=0,
            warmup_steps=0,
            **kwargs,
        ),
    )


def _batches(k, batch=8):
    g = torch.Generator().manual_seed(k)
    return torch.randn(batch, 3, 6, 6, generator=g), torch.randint(0, 4, (batch,), generator=g)


def test_heads_exist_when_the_group_is_built_and_join_their_members_optimizer():
    models, optimizers, group = _mcl_group()
    heads = group.terms[1].heads
    assert [h.proj[0].in_features for h in heads] == [5, 7]  # sizes read off the fc layers, no forward
    for i, opt in enumerate(optimizers):
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        assert all(id(p) in held for p in heads[i].parameters())
        assert not any(id(p) in held for p in heads[1 - i].parameters())
    before = [[p.detach().clone() for p in head.parameters()] for head in heads]
    result = group.step(_batches(0))
    assert result.terms["mcl"].shape == (2,) and torch.isfinite(result.terms["mcl"]).all()
    # every member's head trained (its VCL loss reaches it): some of its parameters moved
    assert all(any(not torch.equal(p, q) for p, q in zip(h.parameters(), b)) for h, b in zip(heads, before))


def test_a_pooling_output_works_as_the_embedding():
    models, optimizers, group = _mcl_group(hooks=("pool", "pool"), example_input=torch.randn(2, 3, 6, 6))
    assert [h.proj[0].in_features for h in group.terms[1].heads] == [5, 7]
    assert torch.isfinite(group.step(_batches(0)).terms["mcl"]).all()


def test_resume_restores_the_heads_bitwise():
    _, _, group = _mcl_group()
    for k in range(3):
        group.step(_batches(k))
    buffer = io.BytesIO()
    torch.save(group.state_dict(), buffer)
    expected = [group.step(_batches(k)).loss for k in range(3, 6)]
    heads_after = copy.deepcopy(group.terms.state_dict())
    _, _, resumed = _mcl_group()
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    got = [resumed.step(_batches(k)).loss for k in range(3, 6)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert all(torch.equal(heads_after[k], v) for k, v in resumed.terms.state_dict().items())


def test_invalid_settings_name_the_argument():
    with pytest.raises(ValueError, match="tau"):
        MCL(tau=0.0)
    with pytest.raises(ValueError, match="weight"):
        MCL(weight=-1.0)
    models = [tiny_cnn(seed=0), tiny_cnn(seed=1)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    with pytest.raises(ValueError, match="embedding_hooks"):
        CompetitiveGroup(models, optimizers, terms=["mcl"])
    with pytest.raises(ValueError, match="no term reads embeddings"):
        CompetitiveGroup(models, optimizers, embedding_hooks=["4", "4"])
    assert math.isclose(MCL(weight=2).weight, 2.0)
