"""Any task (competitive/tasks.py): the built-in task losses against torch's, the Bernoulli ``kl`` and
``OutputL2`` against transcriptions of their equations, a task loss of one's own and its checks, and members
that compute their own loss (Hugging Face's ``labels=``, a torchvision detector's dict of losses)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from competitive import ADM, CWD, KL, MCL, CompetitiveGroup, FeatureL2, OutputL2, task_losses
from competitive.terms.kl import bernoulli_kl_term
from competitive.terms.output import output_l2_term

REFERENCE = {"bce": F.binary_cross_entropy_with_logits, "mse": F.mse_loss, "l1": F.l1_loss}


def _nets(n, out, seed=0):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, out)) for _ in range(n)]


def _targets(task, batch, out):
    return (torch.rand(batch, out) > 0.5).float() if task == "bce" else torch.randn(batch, out)


@settings(max_examples=30)
@given(
    task=st.sampled_from(["bce", "mse", "l1"]), n=st.integers(2, 4), batch=st.integers(1, 9),
    out=st.integers(1, 6), rule=st.sampled_from(["best", "better", "mutual", "independent"]),
    granularity=st.sampled_from(["batch", "sample"]), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_builtin_task_losses_equal_torchs_and_the_lowest_loss_teaches(task, n, batch, out, rule, granularity, seed):
    torch.manual_seed(seed)
    outputs = [torch.randn(batch, out, requires_grad=True) for _ in range(n)]
    targets = _targets(task, batch, out)
    result = task_losses(outputs, targets, task=task, rule=rule, granularity=granularity)
    expected = torch.stack([REFERENCE[task](z, targets) for z in outputs])  # the default reduction: the mean
    torch.testing.assert_close(result.ce, expected)
    per_sample = torch.stack([REFERENCE[task](z, targets, reduction="none").mean(dim=1) for z in outputs])
    scores = per_sample.mean(dim=1) if granularity == "batch" else per_sample.T  # [N] or [B, N]
    lowest = scores.argmin(dim=-1)
    assert torch.equal(result.teacher, lowest)  # ties have probability 0 here
    if rule == "best":
        w = result.weights if granularity == "sample" else result.weights.unsqueeze(0)
        taught = w.sum(dim=-1) > 0
        assert (w.argmax(dim=-1)[taught] == lowest.reshape(-1, 1).expand_as(taught)[taught]).all()
    # each member's objective has the gradient of its own torch loss
    grads = torch.autograd.grad(result.ce.sum(), outputs)
    for z, g in zip(outputs, grads):
        torch.testing.assert_close(g, torch.autograd.grad(REFERENCE[task](z, targets), z)[0])


@pytest.mark.parametrize("task", ["bce", "mse", "l1"])
def test_a_group_trains_on_each_builtin_task_loss(task):
    nets = _nets(2, 4)
    terms = [KL(temperature=2.0)] if task == "bce" else [OutputL2(0.5)]
    group = CompetitiveGroup(nets, [torch.optim.SGD(m.parameters(), lr=0.1) for m in nets], task_loss=task,
                             terms=terms, warmup_steps=0)  # fmt: skip
    x, y = torch.randn(16, 6), _targets(task, 16, 4)
    with torch.no_grad():
        before = torch.stack([REFERENCE[task](m(x), y) for m in nets])
    first = group.step((x, y))
    torch.testing.assert_close(first.ce, before)  # result.ce: each member's task loss
    assert first.terms[terms[0].name][first.teacher] == 0  # the teacher learns from its targets only
    for _ in range(30):
        last = group.step((x, y))
    assert (last.ce < first.ce).all()


def _bernoulli_kl(student, teacher, tau):
    """KL(Bern(s(t / tau)) || Bern(s(z / tau))) per class, in float64, as written."""
    p, q = torch.sigmoid(teacher / tau), torch.sigmoid(student / tau)
    return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_bernoulli_kl_is_its_equation_in_value_and_gradient(tau):
    torch.manual_seed(3)
    logits = [(torch.randn(5, 7, dtype=torch.float64) * 3).requires_grad_() for _ in range(3)]
    weights = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    teaches = torch.ones(3, 5, dtype=torch.bool)
    ours = bernoulli_kl_term(logits, teaches, weights, temperature=tau)
    expected = torch.stack([
        sum(weights[i, j] * _bernoulli_kl(logits[i], logits[j].detach(), tau).mean() for j in range(3)) * tau**2
        for i in range(3)
    ])  # fmt: skip
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    for i in range(2):
        g = torch.autograd.grad(ours[i], logits, allow_unused=True, retain_graph=True)
        h = torch.autograd.grad(expected[i], logits, allow_unused=True, retain_graph=True)
        torch.testing.assert_close(g[i], h[i], rtol=1e-10, atol=1e-12)
        assert all(g[j] is None or not g[j].any() for j in range(3) if j != i)  # the teachers are targets


def test_bernoulli_kl_is_the_two_way_softmax_kl_per_class():
    # each class as a softmax over (z, 0): KL over those two classes, averaged over classes
    torch.manual_seed(4)
    s, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    two = [torch.stack([v, torch.zeros_like(v)], dim=-1).log_softmax(-1) for v in (s, t)]
    expected = (two[1].exp() * (two[1] - two[0])).sum(-1).mean()
    weights = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    ours = bernoulli_kl_term([s, t], torch.ones(2, 4, dtype=torch.bool), weights)
    torch.testing.assert_close(ours[0], expected)


def test_a_teacher_that_may_not_teach_gives_nothing_and_no_nan():
    logits = [torch.randn(3, 2, requires_grad=True), torch.full((3, 2), math.nan)]
    teaches = torch.tensor([[True] * 3, [False] * 3])
    for value in (bernoulli_kl_term(logits, teaches, torch.tensor([[0.0, 1.0], [0.0, 0.0]])),
                  output_l2_term(logits, teaches, torch.tensor([[0.0, 1.0], [0.0, 0.0]]))):  # fmt: skip
        assert torch.isfinite(value[0])
        (g,) = torch.autograd.grad(value[0], logits[0])
        assert torch.isfinite(g).all()


def test_output_l2_is_the_weighted_mean_squared_difference_to_the_teachers():
    torch.manual_seed(5)
    y = [torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    weights = torch.rand(4, 3, 3, dtype=torch.float64) * (1 - torch.eye(3, dtype=torch.float64))  # per sample
    ours = output_l2_term(y, torch.ones(3, 4, dtype=torch.bool), weights)
    expected = torch.stack([
        torch.stack([sum(weights[b, i, j] * (y[i][b] - y[j][b].detach()).square().mean() for j in range(3))
                     for b in range(4)]).mean()
        for i in range(3)
    ])  # fmt: skip
    torch.testing.assert_close(ours, expected)


def test_kl_refuses_regression_naming_output_l2_and_mcl_refuses_other_tasks():
    nets = _nets(2, 3)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in nets]
    for task in ("mse", "l1"):
        with pytest.raises(ValueError, match=r"\['kl'\] have no form for task_loss='" + task + "'.*OutputL2"):
            CompetitiveGroup(nets, optimizers, task_loss=task)
    with pytest.raises(ValueError, match=r"\['cwd'\] have no form for task_loss='bce'"):
        CompetitiveGroup(nets, optimizers, task_loss="bce", terms=[CWD(on="logits")])
    with pytest.raises(ValueError, match="Invalid task_loss 'hinge'"):
        CompetitiveGroup(nets, optimizers, task_loss="hinge")


@pytest.mark.parametrize("task", ["bce", "l1"])
def test_terms_on_hooked_outputs_serve_any_task_loss(task):
    nets = _nets(3, 3)
    terms = [OutputL2(), FeatureL2(), ADM(), CWD(), MCL()]
    group = CompetitiveGroup(nets, [torch.optim.SGD(m.parameters(), lr=0.1) for m in nets], task_loss=task,
                             terms=terms, feature_hooks=["1"] * 3, embedding_hooks=["2"] * 3, granularity="sample",
                             warmup_steps=0)  # fmt: skip
    x, y = torch.randn(8, 6), _targets(task, 8, 3)
    for _ in range(3):
        result = group.step((x, y))
        assert result.teacher.shape == (8,) and set(result.terms) == {t.name for t in terms}
        assert torch.isfinite(result.loss).all()


def test_mcl_without_classes_contrasts_each_sample_with_itself():
    from competitive import StepOutputs

    torch.manual_seed(6)
    term = MCL()
    term.build({"embeddings": [(12,), (12,)]})
    embeddings = [torch.randn(6, 12) for _ in range(2)]
    teaches, w = torch.ones(2, 6, dtype=torch.bool), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    empty = torch.zeros(2, 6, 0)

    def value(labels, task):
        out = StepOutputs([empty[0], empty[1]], empty, labels, teaches, None, embeddings, task=task)
        return term(out, w)

    instance = value(torch.arange(6).expand(2, -1), "ce")  # every sample of its own class
    torch.testing.assert_close(value(torch.zeros(2, 6, dtype=torch.long), "mse"), instance)
    assert not torch.allclose(value(torch.zeros(2, 6, dtype=torch.long), "ce"), instance)  # one class: another loss


def _per_sample_abs(output, target):
    return (output - target).abs().sum(dim=1)


@pytest.mark.parametrize(
    "loss, match",
    [
        (lambda z, t: (z - t).abs().sum(), r"returned \[\], not a loss per sample \[8\]"),
        (lambda z, t: t.sum(dim=1), "does not depend on the member's output"),
        (lambda z, t: (z - t).sum(dim=1) * math.nan, "NaN or inf for finite outputs"),
    ],
)
def test_a_task_loss_of_ones_own_is_checked_before_anything_moves(loss, match):
    nets = _nets(2, 3)
    group = CompetitiveGroup(nets, [torch.optim.SGD(m.parameters(), lr=0.1) for m in nets], task_loss=loss,
                             terms=[])  # fmt: skip
    before = [p.detach().clone() for m in nets for p in m.parameters()]
    with pytest.raises(ValueError, match=r"Invalid task_loss '<lambda>': for models\[0\] .*" + match):
        group.step((torch.randn(8, 6), torch.randn(8, 3)))
    assert all(torch.equal(a, p) for a, p in zip(before, (p for m in nets for p in m.parameters())))
    assert group.steps == 0


def test_a_task_loss_of_ones_own_competes_per_sample_and_per_position():
    nets = _nets(2, 3)
    group = CompetitiveGroup(nets, [torch.optim.SGD(m.parameters(), lr=0.1) for m in nets],
                             task_loss=_per_sample_abs, terms=[OutputL2()], granularity="sample")  # fmt: skip
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    with torch.no_grad():
        losses = torch.stack([_per_sample_abs(m(x), y) for m in nets])
    result = group.step((x, y))
    torch.testing.assert_close(result.ce, losses.mean(dim=1))
    assert torch.equal(result.teacher, losses.argmin(dim=0))
    per_position = CompetitiveGroup(nets, [torch.optim.SGD(m.parameters(), lr=0.1) for m in nets],
                                    task_loss=lambda z, t: (z - t).square(), terms=[], granularity="position")
    result = per_position.step((x, y))
    assert result.teacher.shape == (8, 3) and result.weights.shape == (8, 3, 2, 2)


def test_other_task_losses_refuse_what_needs_class_indices():
    from competitive import PerturbationPool

    nets = _nets(2, 3)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in nets]
    with pytest.raises(ValueError, match=r"\['perturbation'\] with task_loss='mse'"):
        CompetitiveGroup(nets, optimizers, task_loss="mse", terms=[], perturbation=PerturbationPool())
    with pytest.raises(ValueError, match=r"\['granularity'\] with task_loss='ce', loss_from='loss'"):
        CompetitiveGroup(nets, optimizers, loss_from="loss", terms=[], granularity="sample")
    with pytest.raises(ValueError, match="Pass one of the two"):
        CompetitiveGroup(nets, optimizers, loss_from="loss", task_loss="mse", terms=[])
    group = CompetitiveGroup(nets, optimizers, task_loss="mse", terms=[])
    with pytest.raises(ValueError, match=r"outputs for task_loss='mse' and targets \[8, 2\]"):
        group.step((torch.randn(8, 6), torch.randn(8, 2)))


def _gpt2s():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    configs = [transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=n, n_head=2) for n in (1, 2)]
    return [transformers.GPT2LMHeadModel(c).eval() for c in configs]  # eval: no dropout, so the losses repeat


def test_loss_from_takes_hugging_faces_own_loss_and_competes_on_it():
    lms = _gpt2s()
    group = CompetitiveGroup(lms, [torch.optim.SGD(m.parameters(), lr=0.1) for m in lms], terms=[],
                             forward=lambda m, x, y: m(x, labels=y), loss_from="loss")  # fmt: skip
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        own = torch.stack([m(ids, labels=ids).loss for m in lms])
    result = group.step((ids, ids))
    torch.testing.assert_close(result.ce, own, rtol=0, atol=1e-6)
    assert int(result.teacher) == int(own.argmin())
    with torch.no_grad():
        after = torch.stack([m(ids, labels=ids).loss for m in lms])
    assert (after < own).all()  # each member stepped on its own loss


def test_loss_from_refuses_what_is_not_a_scalar_loss_naming_the_member():
    lms = _gpt2s()
    group = CompetitiveGroup(lms, [torch.optim.SGD(m.parameters(), lr=0.1) for m in lms], terms=[],
                             loss_from="loss")  # fmt: skip: without labels= the output holds no loss
    ids = torch.randint(0, 64, (2, 16))
    with pytest.raises(ValueError, match=r"models\[0\] returned a .*loss_from='loss' finds NoneType"):
        group.step((ids, ids))


def test_a_detector_pair_trains_with_cwd_on_fpn_maps():
    detection = pytest.importorskip("torchvision.models.detection")
    from competitive import CWD

    torch.manual_seed(0)
    size = dict(min_size=96, max_size=96, weights=None, weights_backbone=None, num_classes=3)
    nets = [detection.fasterrcnn_mobilenet_v3_large_320_fpn(**size), detection.retinanet_resnet50_fpn(**size)]
    group = CompetitiveGroup(
        nets, [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in nets],
        forward=lambda m, images, targets: m(images, targets), loss_from=lambda losses: sum(losses.values()),
        terms=[CWD(2.0)], feature_hooks=["backbone.fpn.layer_blocks.1", "backbone.fpn.layer_blocks.1"],
        warmup_steps=0,
    )  # fmt: skip
    images = [torch.rand(3, s, s) for s in (80, 112)]  # of different sizes: the detectors' transform resizes
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [50.0, 60.0, 100.0, 100.0]]),
                "labels": torch.tensor([2, 1])}]  # fmt: skip
    for _ in range(3):
        result = group.step((images, targets))
        assert torch.isfinite(result.ce).all() and torch.isfinite(result.terms["cwd"]).all()
        assert result.terms["cwd"][result.teacher] == 0 and result.terms["cwd"][1 - result.teacher] > 0


@pytest.mark.parametrize("task", ["bce", "mse", "l1"])
@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_a_member_with_a_nonfinite_output_never_teaches_there(task, granularity):
    torch.manual_seed(7)
    outputs = [torch.randn(5, 3, requires_grad=True) for _ in range(3)]
    targets = _targets(task, 5, 3)
    with torch.no_grad():
        outputs[0][2, 1] = math.nan  # member 0 has the lowest loss elsewhere ...
        outputs[0][[0, 1, 3, 4]] = targets[[0, 1, 3, 4]] * 20 - 10 if task == "bce" else targets[[0, 1, 3, 4]]
    result = task_losses(outputs, targets, task=task, rule="mutual", granularity=granularity, terms=[OutputL2()])
    if granularity == "sample":  # it teaches the samples where it is finite and the best
        assert result.teacher[2] != 0 and (result.teacher[[0, 1, 3, 4]] == 0).all()
    else:  # its batch score is not finite: it teaches nothing
        assert result.teacher != 0
    w = result.weights if granularity == "sample" else result.weights.expand(5, 3, 3)
    assert (w[2, :, 0] == 0).all()  # ... but nobody learns from its sample 2 (mutual: from every finite peer)
    assert torch.isfinite(result.terms["output_l2"][1:]).all()
