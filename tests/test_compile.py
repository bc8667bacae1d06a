"""The compiled path (``compile=True``) is run compiled, here on the CPU, and checked against eager.

Inductor's C++ build of a step graph takes 10-40 s on a cold cache (a fresh machine), several
times the whole suite's eager time, so one variant builds with inductor (the paper's setting: rule
``"best"``, one teacher per batch, KL and feature terms) and every other runs with
``backend="aot_eager"``: the same ``fullgraph`` capture, guards and autograd graph, with eager
kernels. Every variant also matches the plain loop eagerly (``test_group``, ``test_terms``).
"""

import copy

import pytest
import torch
import torch._dynamo
from conftest import CUDA, steps_without_host_sync
from reference import tiny_cnn

from competitive import KL, CompetitiveGroup, FeatureL2, PerturbationPool, group_loss


def _members(n=3, dtype=torch.float32, device="cpu"):
    models = [tiny_cnn(width=4 + i, seed=i, dtype=dtype).to(device) for i in range(n)]
    return models, [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]


def _batch(seed, device="cpu", batch=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 6, 6, generator=g).to(device), torch.randint(0, 5, (batch,), generator=g).to(device))


TRACED = {"backend": "aot_eager"}  # dynamo's graph and AOT autograd, eager kernels: no C++ build


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "rule, granularity, compile",
    [
        ("best", "batch", True),
        ("better", "sample", TRACED),
        ("mutual", "sample", TRACED),
        ("independent", "batch", TRACED),
    ],
)
def test_compiled_group_matches_eager_over_steps(rule, granularity, compile):
    n = 2 if compile is True else 3  # the inductor build: the smallest group that has adapters
    models, optimizers = _members(n)
    eager_models = copy.deepcopy(models)
    eager_optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in eager_models]
    settings = dict(rule=rule, granularity=granularity, feature_hooks=["1"] * n)
    # members of other widths: the feature loss goes through adapters, made equal in both groups
    example = _batch(0)[0]
    terms = [KL(temperature=2.0), FeatureL2(0.5)]
    compiled = CompetitiveGroup(models, optimizers, compile=compile, example_input=example, terms=terms, **settings)
    terms = [KL(temperature=2.0), FeatureL2(0.5)]  # each group its own terms (and adapters)
    eager = CompetitiveGroup(eager_models, eager_optimizers, example_input=example, terms=terms, **settings)
    eager.adapters.load_state_dict(compiled.adapters.state_dict())
    for step in range(8):
        # one graph, built at the first step: no recompile while the shapes stay
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            a = compiled.step(_batch(step))
        b = eager.step(_batch(step))
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.teacher, b.teacher)
    for m, e in zip(models, eager_models):
        for p, q in zip(m.parameters(), e.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_channels_last_members_compile_and_match_eager():
    # channels_last feature maps enter the step math laid out contiguously (the compiled math is
    # several times slower on channels_last inputs): same losses, teachers and updates as eager
    models, optimizers = _members()
    models = [m.to(memory_format=torch.channels_last) for m in models]
    eager_models = copy.deepcopy(models)
    eager_optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in eager_models]
    example = _batch(0)[0].contiguous(memory_format=torch.channels_last)
    settings = dict(feature_hooks=["1"] * 3, terms=["kl", "feature", "adm"], example_input=example, warmup_steps=0)
    compiled = CompetitiveGroup(models, optimizers, compile=TRACED, **settings)
    eager = CompetitiveGroup(eager_models, eager_optimizers, **settings)
    eager.terms.load_state_dict(compiled.terms.state_dict())
    for step in range(4):
        x, y = _batch(step)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            a = compiled.step((x, y))
        b = eager.step((x, y))
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.teacher, b.teacher)
    for m, e in zip(models, eager_models):
        for p, q in zip(m.parameters(), e.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_heterogeneous_adapters_and_soft_labels_compile():
    models, optimizers = _members(2)
    models[1] = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(108, 12), torch.nn.ReLU(), torch.nn.Linear(12, 5)
    )
    optimizers[1] = torch.optim.SGD(models[1].parameters(), lr=0.05)
    twins = copy.deepcopy(models)
    twin_optimizers = [type(o)(m.parameters(), **o.defaults) for o, m in zip(optimizers, twins)]
    pool = PerturbationPool({"mixup": PerturbationPool().operations[0]}, p=1.0)
    example = _batch(0)[0][:2]
    torch.manual_seed(0)
    group = CompetitiveGroup(
        models, optimizers, compile=TRACED, feature_hooks=["1", "2"], perturbation=pool, seed=0, example_input=example
    )
    torch.manual_seed(0)  # the eager twin's adapters start from the same draws
    eager = CompetitiveGroup(
        twins,
        twin_optimizers,
        feature_hooks=["1", "2"],
        perturbation=PerturbationPool({"mixup": PerturbationPool().operations[0]}, p=1.0),
        seed=0,
        example_input=example,
    )
    for step in range(4):
        result, expected = group.step(_batch(step)), eager.step(_batch(step))
        assert result.perturbation == "mixup" and result.perturbed == expected.perturbed
        torch.testing.assert_close(result.loss, expected.loss, rtol=1e-5, atol=1e-6)


def test_group_loss_compiles_with_fullgraph_for_every_rule():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(16, 10, generator=g) for _ in range(4)]
    features = [torch.randn(16, 8, 2, 2, generator=g) for _ in range(4)]
    y = torch.randint(0, 10, (16,), generator=g)
    fn = torch.compile(group_loss, fullgraph=True, **TRACED)
    for rule in ("best", "better", "mutual", "independent"):
        for granularity in ("batch", "sample"):
            (terms, teacher, w), (ref, ref_teacher, ref_w) = (
                f(logits, y, features, rule=rule, granularity=granularity) for f in (fn, group_loss)
            )
            torch.testing.assert_close(terms.loss, ref.loss)
            assert torch.equal(teacher, ref_teacher) and torch.equal(w, ref_w)


def test_members_that_are_compiled_modules():
    models, optimizers = _members(2)
    # the hooks fire inside dynamo's trace of each member, whichever backend builds it
    members = [torch.compile(m, **TRACED) for m in models]
    group = CompetitiveGroup(members, optimizers, feature_hooks=["1", "1"], compile=TRACED)
    before = [p.detach().clone() for p in models[0].parameters()]
    for step in range(3):
        result = group.step(_batch(step))
        assert result.feature[1 - result.teacher] > 0  # the hooks saw the compiled forward
    assert any(not torch.equal(p, q) for p, q in zip(models[0].parameters(), before))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_a_whole_step_has_no_host_sync_on_gpu(compiled):
    models, optimizers = _members(device="cuda")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, foreach=True) for m in models]
    # no perturbation here (tests/test_overhead.py steps with the default pool)
    group = CompetitiveGroup(models, optimizers, compile=compiled, feature_hooks=["1"] * 3)
    batches = [_batch(step, "cuda") for step in range(6)]  # on the GPU before the check starts
    group.step(batches[0])  # warm-up: compilation and lazy CUDA init may sync
    steps_without_host_sync(group.step, batches[1:])
