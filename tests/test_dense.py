"""Predictions per position: logits ``[B, C, d1..dk]`` with targets ``[B, d1..dk]``, ``ignore_index``,
the three granularities, and the ``[B, C]`` case unchanged bit for bit."""

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from classification_reference import CONFIGS, run
from conftest import TORCH, version
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from competitive import ADM, CWD, KL, CompetitiveGroup, FeatureL2, step_losses

# written by the 0.3.0 code on two CPUs whose float kernels round differently (AMD EPYC, Intel Xeon)
REFERENCES = sorted((Path(__file__).parent / "data").glob("classification-0.3.0*.pt"))


def _compare(ours, saved, same):
    for mine, theirs in zip(ours["steps"], saved["steps"], strict=True):
        for key in ("teacher", "ce", "loss", "weights"):
            assert same(mine[key], theirs[key]), key
        assert mine["terms"].keys() == theirs["terms"].keys()
        assert all(same(mine["terms"][k], v) for k, v in theirs["terms"].items())
    assert all(same(a, b) for a, b in zip(ours["params"], saved["params"], strict=True))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_classification_is_bit_for_bit_that_of_0_3_0(name):
    # every rule, both granularities, soft labels from mixing, KL / feature / ADM terms, the pool: bit for bit
    # what the 0.3.0 code computed on a CPU of the same kind
    import kornia

    if "pool" in CONFIGS[name] and (TORCH < (2, 11) or version(kornia.__version__) < (0, 9)):
        pytest.skip(f"0.3.0's pool draws through kornia, whose draws differ under torch {torch.__version__} / kornia "
                    f"{kornia.__version__} from those of the references (torch >= 2.11, kornia >= 0.9)")
    ours, saved = run(name), [torch.load(path)[name] for path in REFERENCES]
    for reference in saved:
        try:
            return _compare(ours, reference, torch.equal)
        except AssertionError:
            continue
    # a CPU whose kernels round unlike both: the same teachers and W, and every float within float32 noise
    close = partial(torch.allclose, rtol=1e-5, atol=1e-6)
    _compare(ours, saved[0], lambda a, b: close(a, b) if a.is_floating_point() else torch.equal(a, b))


class Dense(nn.Module):
    """Per-position logits ``[B, C, *positions]`` from inputs ``[B, 3, *positions]`` (1x1 convolutions)."""

    def __init__(self, k: int, classes: int, width: int = 6):
        super().__init__()
        conv = {0: nn.Linear, 1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[k]
        args = {} if k == 0 else {"kernel_size": 1}
        self.body = nn.Sequential(conv(3, width, **args), nn.Tanh(), conv(width, classes, **args))

    def forward(self, x):
        return self.body(x)


def _problem(seed, n, k, batch=3, classes=4, ignore=255, frac=0.3):
    g = torch.Generator().manual_seed(seed)
    positions = tuple(int(s) for s in torch.randint(1, 5, (k,), generator=g))
    torch.manual_seed(seed)
    models = [Dense(k, classes, width=4 + 2 * i) for i in range(n)]
    x = torch.randn(batch, 3, *positions, generator=g)
    y = torch.randint(0, classes, (batch, *positions), generator=g)
    y[torch.rand(y.shape, generator=g) < frac] = ignore
    y.view(-1)[0] = 0  # never a batch without a valid position
    return models, x, y


def _group(models, **kwargs):
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    return CompetitiveGroup(models, optimizers, warmup_steps=0, **kwargs)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 4),
    k=st.integers(0, 3),
    frac=st.sampled_from([0.0, 0.3, 0.8]),
    granularity=st.sampled_from(["batch", "sample", "position"]),
    rule=st.sampled_from(["best", "better", "mutual", "independent"]),
)
def test_ce_teacher_and_gradients_per_position(seed, n, k, frac, granularity, rule):
    models, x, y = _problem(seed, n, k, frac=frac)
    logits = [m(x) for m in models]
    group = _group(models, ignore_index=255, granularity=granularity, rule=rule)
    result = group.evaluate((x, y))
    expected = torch.stack([F.cross_entropy(z, y, ignore_index=255) for z in logits])
    torch.testing.assert_close(result.ce, expected.detach(), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(result.loss).all() and torch.isfinite(result.weights).all()
    # the step math on leaves: at "position" each valid position's teacher has the lowest CE there
    leaves = [z.detach().requires_grad_() for z in logits]
    out = step_losses(leaves, y, terms=[KL()], rule=rule, granularity=granularity, ignore_index=255)
    valid = y != 255
    if granularity == "position":
        per_position = torch.stack([F.cross_entropy(z, y, ignore_index=255, reduction="none") for z in leaves])
        lowest = per_position.detach().movedim(0, -1).argmin(dim=-1)
        assert torch.equal(out.teacher[valid], lowest[valid]) and (out.teacher[~valid] == -1).all()
        assert (out.weights[~valid] == 0).all()
    out.terms["kl"].sum().backward()
    if rule == "best":  # no KL gradient reaches a member from where it teaches (or where nothing counts)
        teacher = (
            out.teacher.reshape(-1) if granularity != "sample" else out.teacher.repeat_interleave(valid[0].numel())
        )
        teacher = teacher if granularity != "batch" else out.teacher.expand(valid.numel())
        for i, z in enumerate(leaves):
            rows = z.grad.movedim(1, -1).reshape(-1, z.shape[1])
            assert (rows[teacher == i] == 0).all()
            assert (rows[~valid.reshape(-1)] == 0).all()


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("rule", ["best", "better", "mutual", "independent"])
def test_positions_of_size_one_reduce_to_classification(k, rule):
    # [B, C, 1, ..., 1] with targets [B, 1, ..., 1] is the [B, C] problem: same CE, teacher, W, terms
    torch.manual_seed(0)
    z = [torch.randn(5, 4) for _ in range(3)]
    y = torch.randint(0, 4, (5,))
    ones = (1,) * k
    for granularity, dense_granularity in (("batch", "batch"), ("sample", "sample"), ("sample", "position")):
        flat = step_losses(z, y, terms=[KL(temperature=2.0)], rule=rule, granularity=granularity)
        dense = step_losses(
            [t.view(5, 4, *ones) for t in z], y.view(5, *ones), terms=[KL(temperature=2.0)], rule=rule,
            granularity=dense_granularity,
        )  # fmt: skip
        assert torch.equal(flat.ce, dense.ce)
        # per position the KL is summed pair by pair (the einsum of [B, C] sums the same terms in
        # another order): equal for one teacher, equal to rounding for several
        torch.testing.assert_close(flat.terms["kl"], dense.terms["kl"], rtol=1e-6, atol=0)
        if rule in ("best", "independent"):
            assert torch.equal(flat.terms["kl"], dense.terms["kl"])
        assert torch.equal(flat.teacher.reshape(-1), dense.teacher.reshape(-1))
        assert torch.equal(flat.weights.reshape(-1), dense.weights.reshape(-1))


@pytest.mark.parametrize("positions", [(), (3,), (3, 5)])
def test_one_hot_label_rows_equal_class_indices(positions):
    # label rows that are one-hot (k = 0: [N, B, C]; per position [N, B, C, d1..dk]) are the hard problem
    torch.manual_seed(1)
    z = [torch.randn(2, 4, *positions) for _ in range(3)]
    y = torch.randint(0, 4, (2, *positions))
    y.view(-1)[1] = -100
    rows = F.one_hot(y.clamp_min(0), 4).movedim(-1, 1).float() * (y != -100).unsqueeze(1)
    for granularity in ("batch", "sample", "position"):
        hard = step_losses(z, y, terms=[KL()], granularity=granularity)
        soft = step_losses(z, rows.expand(3, *rows.shape), terms=[KL()], granularity=granularity)
        assert torch.equal(hard.ce, soft.ce) and torch.equal(hard.terms["kl"], soft.terms["kl"])
        assert torch.equal(hard.teacher, soft.teacher) and torch.equal(hard.weights, soft.weights)


def test_class_dim_last_is_the_same_problem():
    torch.manual_seed(2)
    z = [torch.randn(2, 4, 7) for _ in range(2)]  # [B, C, T]
    y = torch.randint(0, 4, (2, 7))
    y[1, 3:] = -100
    first = step_losses(z, y, terms=[KL()], granularity="position")
    last = step_losses([t.transpose(1, 2) for t in z], y, terms=[KL()], granularity="position", class_dim=-1)
    assert torch.equal(first.ce, last.ce) and torch.equal(first.teacher, last.teacher)
    assert torch.equal(first.terms["kl"], last.terms["kl"]) and torch.equal(first.weights, last.weights)


def test_kl_per_position_is_the_mean_over_the_students_valid_positions():
    torch.manual_seed(3)
    z = [torch.randn(2, 3, 4, 4) for _ in range(2)]
    y = torch.randint(0, 3, (2, 4, 4))
    y[0, :, :2] = 255
    valid = y != 255
    for granularity in ("batch", "sample", "position"):
        out = step_losses(z, y, terms=[KL()], granularity=granularity, ignore_index=255)
        w = out.weights
        w = (
            w.expand(*y.shape, 2, 2)
            if w.dim() == 2
            else w.view(2, 1, 1, 2, 2).expand(-1, 4, 4, -1, -1)
            if w.dim() == 3
            else w
        )
        kl = torch.zeros(2)
        for i in range(2):
            j = 1 - i
            pair = F.kl_div(z[i].log_softmax(1), z[j].log_softmax(1), log_target=True, reduction="none").sum(1)
            kl[i] = (w[..., i, j] * pair)[valid].sum() / valid.sum()
        torch.testing.assert_close(out.terms["kl"], kl, rtol=1e-5, atol=1e-7)


def test_a_sample_without_valid_position_neither_competes_nor_teaches():
    models, x, y = _problem(0, 3, 2, frac=0.0)
    y[1] = 255
    for granularity in ("sample", "position"):
        group = _group(
            models, ignore_index=255, granularity=granularity, terms=["kl", "feature"], feature_hooks=["body.1"] * 3
        )
        result = group.step((x, y))
        assert (result.teacher[1] == -1).all() and (result.weights[1] == 0).all()
        assert torch.isfinite(result.loss).all() and all(torch.isfinite(v).all() for v in result.terms.values())
        assert all(torch.isfinite(p).all() for m in models for p in m.parameters())
        assert result.valid is not None and not result.valid[1].any()
        assert sum(group.stats["teacher_count"]) == pytest.approx(1.0)  # shares of the valid samples / positions


def test_a_batch_without_valid_position_raises_before_anything_moves():
    models, x, y = _problem(0, 2, 2)
    group = _group(models, ignore_index=255)
    before = [p.detach().clone() for m in models for p in m.parameters()]
    with pytest.raises(ValueError, match="every position of the batch is ignore_index=255"):
        group.step((x, torch.full_like(y, 255)))
    assert all(torch.equal(a, p) for a, p in zip(before, [p for m in models for p in m.parameters()]))
    assert group.steps == 0


@pytest.mark.parametrize("granularity", ["batch", "sample", "position"])
def test_feature_terms_with_dense_members(granularity):
    # feature maps [B, C', H, W] beside logits per pixel: W per sample for the terms that read maps
    models, x, y = _problem(4, 3, 2, frac=0.2)
    terms = [KL(), FeatureL2(), ADM(), CWD(tau=2.0)]
    group = _group(models, ignore_index=255, granularity=granularity, terms=terms, feature_hooks=["body.1"] * 3)
    result = group.step((x, y))
    assert all(torch.isfinite(v).all() for v in result.terms.values())
    if granularity == "batch":  # the teacher learns from the labels only
        assert all(float(v[result.teacher]) == 0 for k, v in result.terms.items() if k in ("kl", "feature", "cwd"))
    else:  # every member learns something from where others teach it
        assert all((v > 0).any() for v in result.terms.values())


def test_position_weights_for_the_terms_that_read_samples_are_shares():
    from competitive.losses import compete, term_weights

    torch.manual_seed(5)
    z = [torch.randn(2, 3, 2, 2) for _ in range(2)]
    y = torch.randint(0, 3, (2, 2, 2))
    y[0, 0, 0] = -100
    out = step_losses(z, y, granularity="position")
    outputs, _, _, weights, _ = compete(z, y, None, None, "best", "position", None)
    rows, samples = term_weights(weights, outputs)
    assert rows is weights
    per_sample = out.weights.flatten(1, 2)  # [B, 4, N, N]
    counts = (y != -100).flatten(1).sum(1).view(2, 1, 1).float()
    torch.testing.assert_close(samples, per_sample.sum(1) / counts)
    assert (samples.sum(-1) <= 1 + 1e-6).all()


def _params(models):
    return [p.detach().clone() for m in models for p in m.parameters()]


def _unchanged(models, before):
    return all(torch.equal(a, p) for a, p in zip(before, [p for m in models for p in m.parameters()]))


@pytest.mark.parametrize(
    "case, match",
    [
        ("targets", r"Invalid targets of shape \[3, 4, 5\]: the logits without the class dimension are \[3, 4, 4\]"),
        ("class_dim", r"models\[0\] returned \[3, 5, 4, 4\], which has no class dimension 4"),
        ("range", r"class indices must lie in \[0, 5\) or be ignore_index=255; got \[7\]"),
        ("classes", r"Members disagree on the number of classes or the positions: .*models\[1\]: C=6"),
        ("positions", r"Members disagree on the number of classes or the positions: .*positions \[2, 2\]"),
    ],
)
def test_bad_dense_input_is_refused_before_anything_moves(case, match):
    torch.manual_seed(0)
    models = [nn.Conv2d(3, 5, 1), nn.Conv2d(3, 6 if case == "classes" else 5, 1)]
    if case == "positions":
        models[1] = nn.Conv2d(3, 5, 2, stride=2)
    x, y = torch.randn(3, 3, 4, 4), torch.randint(0, 5, (3, 4, 4))
    if case == "targets":
        y = torch.randint(0, 5, (3, 4, 5))
    if case == "range":
        y[0, 0, 0] = 7
    group = _group(models, ignore_index=255, class_dim=4 if case == "class_dim" else 1)
    before = _params(models)
    with pytest.raises(ValueError, match=match):
        group.step((x, y))
    assert _unchanged(models, before) and group.steps == 0


@pytest.mark.parametrize("value", [0, 1.0, True, "1"])
def test_bad_class_dim_or_ignore_index_is_refused_when_the_group_is_built(value):
    models = [nn.Conv2d(3, 5, 1), nn.Conv2d(3, 5, 1)]
    with pytest.raises(ValueError, match=r"Invalid class_dim value .* Please provide an int other than 0"):
        _group(models, class_dim=value)
    if value != 0:
        with pytest.raises(ValueError, match=r"Invalid ignore_index value .* Please provide an int"):
            _group(models, ignore_index=value)
    assert all(not m._forward_hooks for m in models)


@pytest.mark.parametrize("granularity", ["sample", "position"])
def test_compiled_dense_step_matches_eager(granularity):
    runs = []
    for compile in (False, {"backend": "aot_eager"}):
        models, x, y = _problem(9, 3, 2, frac=0.3)
        group = _group(
            models,
            ignore_index=255,
            granularity=granularity,
            compile=compile,
            terms=[KL(temperature=2.0), CWD(on="logits")],
        )
        results = [group.step((x, y)) for _ in range(3)]
        runs.append((results, _params(models)))
    (eager, p_eager), (compiled, p_compiled) = runs
    for a, b in zip(eager, compiled):
        assert torch.equal(a.teacher, b.teacher)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(p_eager, p_compiled):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_mcl_needs_one_label_per_sample():
    from competitive import MCL

    models, x, y = _problem(0, 2, 2)
    group = _group(models, ignore_index=255, terms=[KL(), MCL()], embedding_hooks=["body.1"] * 2)
    with pytest.raises(ValueError, match=r"The 'mcl' term .* needs one label per sample"):
        group.step((x, y))
