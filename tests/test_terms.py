"""Every term with every rule and granularity, in the group: compiled against eager, under
perturbation and bf16 autocast, and the warm-up ramp of the terms' weights."""

import copy

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import tiny_cnn
from torch import nn

from competitive import CompetitiveGroup, PerturbationPool, Term
from competitive.terms.base import weighted

TERMS = ["kl", "feature", "mcl", "adm", "cwd"]


def _models(widths=(4, 6, 5)):
    return [tiny_cnn(width=w, classes=5, seed=i, dtype=torch.float32) for i, w in enumerate(widths)]


def _group(models, seed=0, **kwargs):
    torch.manual_seed(seed)  # the parts' initial draws
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    return CompetitiveGroup(
        models,
        optimizers,
        feature_hooks=["1"] * len(models),
        embedding_hooks=["4"] * len(models),
        terms=TERMS,
        seed=0,
        example_input=torch.randn(2, 3, 6, 6),
        **kwargs,
    )


def _learnable(group):
    """The terms' learnable parts by name: each MCL head, each feature, ADM and CWD adapter."""
    adapters = {f"{t}.{k}": a for t in ("feature", "adm", "cwd") for k, a in group.terms[t].adapters.items()}
    return {**{f"mcl.{i}": h for i, h in enumerate(group.terms["mcl"].heads)}, **adapters}


def _batch(k, batch=8):
    g = torch.Generator().manual_seed(k)
    return torch.randn(batch, 3, 6, 6, generator=g), torch.randint(0, 5, (batch,), generator=g)


@pytest.mark.parametrize("rule", ["best", "better", "mutual", "independent"])
@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_every_term_reports_per_member_values_and_trains_its_parts(rule, granularity):
    models = _models()
    group = _group(models, rule=rule, granularity=granularity, warmup_steps=0)
    parts = [[p.detach().clone() for p in m.parameters()] for m in _learnable(group).values()]
    for k in range(3):
        result = group.step(_batch(k))
        assert set(result.terms) == set(TERMS)
        assert all(v.shape == (3,) and torch.isfinite(v).all() for v in result.terms.values())
        weighted_sum = result.ce + sum(t.weight * result.terms[t.name] for t in group.terms)
        torch.testing.assert_close(result.loss, weighted_sum)
        if rule == "independent":  # nobody learns from anybody: only MCL's own VCL is left
            assert (result.terms["kl"] == 0).all() and (result.terms["feature"] == 0).all()
    moved = {
        name: any(not torch.equal(p, q) for p, q in zip(m.parameters(), b))
        for (name, m), b in zip(_learnable(group).items(), parts)
    }
    # every member's MCL head always learns (its own VCL term); the feature and ADM adapters learn
    # only when their student learns from someone: never under "independent" (W = 0 makes their
    # gradient exactly zero), from some teacher under every other rule
    assert all(v for k, v in moved.items() if k.startswith("mcl")), moved
    adapters = [v for k, v in moved.items() if not k.startswith("mcl")]
    assert adapters and (not any(adapters) if rule == "independent" else any(adapters)), moved


@pytest.mark.parametrize("rule, granularity", [("best", "batch"), ("mutual", "sample")])
def test_compiled_terms_match_eager_without_recompiles(rule, granularity):
    torch._dynamo.reset()
    models = _models()
    twins = copy.deepcopy(models)
    # every term in the fullgraph capture; aot_eager: no inductor C++ build (see test_compile)
    compiled = _group(models, rule=rule, granularity=granularity, compile={"backend": "aot_eager"}, warmup_steps=0)
    eager = _group(twins, rule=rule, granularity=granularity, warmup_steps=0)
    compiled.step(_batch(0))
    eager.step(_batch(0))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(1, 4):
            a, b = compiled.step(_batch(k)), eager.step(_batch(k))
            torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=1e-5)
            assert torch.equal(a.teacher, b.teacher)
    for p, q in zip(compiled.terms.parameters(), eager.terms.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_every_term_under_perturbation_and_bf16_autocast():
    group = _group(
        _models(), perturbation=PerturbationPool(p=1.0), autocast_dtype=torch.bfloat16, warmup_steps=0, rule="mutual"
    )
    seen = set()
    for k in range(6):
        result = group.step(_batch(k))
        seen.add(result.perturbation)
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in result.terms.values())
    assert len(seen - {None}) >= 2


def test_the_warmup_ramps_every_terms_weight_from_zero():
    group = _group(_models(), warmup_steps=4, rule="mutual")
    for k in range(6):
        ramp = min(1.0, k / 4)
        assert group.ramp == ramp
        result = group.step(_batch(k))
        expected = result.ce + sum(ramp * t.weight * result.terms[t.name] for t in group.terms)
        torch.testing.assert_close(result.loss, expected)
    assert group.ramp == 1.0


class Confidence(Term):
    """A fifth term, written outside the library: students match the teachers' max probability."""

    name = "confidence"

    def forward(self, outputs, weights):
        top = outputs.log_probs.exp().amax(dim=-1)  # [N, B]
        pair = (top.unsqueeze(1) - top.detach().unsqueeze(0)).square()  # [i, j, B]
        return weighted(weights, pair)


def test_a_new_term_plugs_in_without_touching_the_group():
    models = _models((4, 4))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    group = CompetitiveGroup(models, optimizers, terms=["kl", Confidence(weight=0.5)], warmup_steps=0)
    result = group.step(_batch(0))
    teacher = result.teacher.item()
    assert result.terms["confidence"][teacher] == 0 and result.terms["confidence"][1 - teacher] > 0
    torch.testing.assert_close(result.loss, result.ce + result.kl + 0.5 * result.terms["confidence"])


def test_terms_need_their_hooks_and_hooks_need_a_term():
    models = _models((4, 4))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    with pytest.raises(ValueError, match=r"\['adm'\] read features: please provide feature_hooks"):
        CompetitiveGroup(models, optimizers, terms=["kl", "adm"])
    with pytest.raises(ValueError, match="no term reads features"):
        CompetitiveGroup(models, optimizers, feature_hooks=["1", "1"], terms=["kl"])
    with pytest.raises(TypeError, match="Invalid terms"):
        CompetitiveGroup(models, optimizers, terms="kl")
    assert isinstance(nn.ModuleList([Confidence()]), nn.Module)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(TERMS),
    n=st.integers(2, 4),
    per_sample=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_a_member_that_does_not_learn_from_a_student_gets_no_gradient_from_its_term(name, n, per_sample, seed):
    from competitive.terms import TERMS as BUILT_IN
    from competitive.terms import StepOutputs

    g = torch.Generator().manual_seed(seed)
    batch = 4
    shape = (batch, n, n) if per_sample else (n, n)
    w = (torch.rand(shape, generator=g) < 0.6).double() * (1 - torch.eye(n, dtype=torch.double))
    logits = [torch.randn(batch, 5, generator=g, dtype=torch.double, requires_grad=True) for _ in range(n)]
    features = [torch.randn(batch, 3, 2, 2, generator=g, dtype=torch.double, requires_grad=True) for _ in range(n)]
    embeddings = [torch.randn(batch, 6, generator=g, dtype=torch.double, requires_grad=True) for _ in range(n)]
    term = BUILT_IN[name]()
    if term.needs:
        term.build({"features": [(3, 2, 2)] * n, "embeddings": [(6,)] * n})
    term.double()
    labels = torch.randint(0, 2, (n, batch), generator=g)
    outputs = StepOutputs(
        logits,
        torch.stack(logits).log_softmax(-1),
        labels,
        torch.ones(n, batch, dtype=torch.bool),
        features,
        embeddings,
    )
    values = term(outputs, w)
    for i in range(n):
        for j in range(n):
            if j == i:
                continue
            inputs = [logits[j], features[j], embeddings[j]]
            grads = torch.autograd.grad(values[i], inputs, retain_graph=True, allow_unused=True)
            learns = w[..., j, i] > 0  # does j learn from i (on some sample)?
            if name == "mcl" and bool(learns.any()):
                continue  # MCL: j's embedding gets gradient exactly where it learns from i (test_mcl.py)
            assert all(gr is None or (gr == 0).all() for gr in grads), (name, i, j)
