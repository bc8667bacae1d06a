"""``CompetitiveGroup(cuda_graph=True)``: the step as CUDA graphs (competitive.graphs).

On the CPU: the refusals, and the graphed step's host logic (which graph a step replays, the seeding of
its perturbation, the step count and ramp on the device, learning rates as tensors, results that a later
step does not overwrite, recapture and fallback) run through a capture that keeps the body and replays
it into static outputs, as a CUDA graph does, checked against the eager group step by step. On a GPU
the same against real captures of ResNet-32 pairs."""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import CUDA, steps_without_host_sync
from torch import nn

from competitive import KL, CompetitiveGroup, FeatureL2, PerturbationPool
from competitive.graphs import WARMUP_STEPS, StepGraphs

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (cuda_graph=True captures CUDA graphs)")


class StaticCapture:
    """A capture on any device: ``replay()`` runs the body and writes its result into the tensors of the
    first run, as a CUDA graph's replay writes its static outputs. Counts captures and replays."""

    def __init__(self, fail_when=None):
        self.captures, self.replays, self.fail_when = 0, 0, fail_when

    def __call__(self, body):
        if self.fail_when is not None and self.fail_when(self.captures):
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        out = None

        def replay():
            nonlocal out
            self.replays += 1
            new = body()
            if out is None:
                out = new
                return out
            for name in ("teacher", "ce", "loss", "weights", "nonfinite"):
                getattr(out, name).copy_(getattr(new, name))
            for name, value in new.terms.items():
                out.terms[name].copy_(value)
            return out

        return replay


def _noise(x, y):
    return x + torch.randn_like(x), y


def _pool():
    return PerturbationPool({"noise": _noise, "flip": lambda x, y: (-x, y)}, p=0.5)


def _group(n=2, pool=None, terms=None, hooks=False, graphed=False, capture=None, optimizer="sgd", **kw):
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)) for _ in range(n)]
    if optimizer == "sgd":
        opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True) for m in nets]
    else:
        opts = [torch.optim.Adam(m.parameters(), lr=0.01, capturable=True) for m in nets]
    terms = [KL(1.0, temperature=3), FeatureL2(0.5)] if terms == "kl-feature" else terms
    group = CompetitiveGroup(
        nets, opts, terms=terms, feature_hooks=["1"] * n if hooks else None, perturbation=pool, seed=1, **kw
    )
    if graphed:
        group.graphs = StepGraphs(group, capture=capture or StaticCapture())
    return group


def _batches(count, batch=8):
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(batch, 6, generator=generator), torch.randint(0, 4, (batch,), generator=generator))
            for _ in range(count)]


def _params(group):
    return [p.detach().clone() for m in group.models for p in m.parameters()]


def _same_steps(eager, graphed, batches):
    for i, batch in enumerate(batches):
        a, b = eager.step(batch), graphed.step(batch)
        assert torch.equal(a.teacher, b.teacher), f"step {i}"
        assert (a.perturbed, a.perturbation) == (b.perturbed, b.perturbation), f"step {i}"
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-7)
    for p, q in zip(_params(eager), _params(graphed)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert eager.stats == graphed.stats


def test_cuda_graph_option_is_a_bool():
    with pytest.raises(TypeError, match=r"cuda_graph value 'yes'"):
        _group(cuda_graph="yes")


@pytest.mark.parametrize(
    "option, value",
    [("process_group", object()), ("skip_nonfinite", True), ("forward", lambda m, x, y: m(x)), ("loss_from", "loss")],
)
def test_cuda_graph_refuses_what_a_graph_cannot_hold_before_anything_moves(option, value):
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, fused=True) for m in nets]
    with pytest.raises(ValueError, match=rf"cuda_graph=True cannot be combined with {option}="):
        CompetitiveGroup(nets, opts, feature_hooks=["1", "1"], cuda_graph=True, **{option: value})
    assert all(not m[1]._forward_hooks for m in nets)  # no hook was left on a member


def test_cuda_graph_refuses_optimizers_that_cannot_be_captured():
    nets = [nn.Linear(6, 4) for _ in range(3)]
    opts = [
        torch.optim.SGD(nets[0].parameters(), lr=0.1, fused=True),
        torch.optim.SGD(nets[1].parameters(), lr=0.1),
        torch.optim.Adam(nets[2].parameters(), lr=0.1),
    ]
    with pytest.raises(ValueError, match=r"optimizers\[1\] \(SGD\), optimizers\[2\] \(Adam\).*capturable=True.*fused"):
        CompetitiveGroup(nets, opts, cuda_graph=True)


@pytest.mark.skipif(CUDA, reason="checks the machine without a GPU")
def test_cuda_graph_needs_a_gpu():
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU.*torch.cuda.is_available\(\) is False"):
        _group(cuda_graph=True)


def test_cuda_graph_refuses_members_off_the_gpu_before_anything_moves():
    group = _group()
    group.graphs = StepGraphs(group)  # the CUDA capture
    before, state = _params(group), group.generator.get_state()
    with pytest.raises(ValueError, match=r"members are on \['cpu', 'cpu'\]"):
        group.step(_batches(1)[0])
    assert all(torch.equal(p, q) for p, q in zip(before, _params(group)))
    assert torch.equal(state, group.generator.get_state()) and group.steps == 0


@pytest.mark.parametrize(
    "setting",
    [
        dict(),
        dict(pool=True),
        dict(pool=True, n=3),
        dict(terms="kl-feature", hooks=True, warmup_steps=8),
        dict(rule="mutual", granularity="sample", warmup_steps=0),
        dict(optimizer="adam_on_cuda"),
        dict(pool=True, compile={"backend": "aot_eager"}),
    ],
    ids=["kl", "pool", "pool-3", "kl-feature-warmup", "mutual-sample", "adam", "compiled"],
)
def test_cuda_graph_host_logic_matches_eager(setting):
    """Same teacher, perturbation, losses and counters at every step; same parameters after."""
    setting = dict(setting)
    if setting.pop("optimizer", None) == "adam_on_cuda":
        if not CUDA:
            pytest.skip("Adam(capturable=True) steps on CUDA only")
        setting["optimizer"] = "adam"
    make = lambda graphed, capture=None: _group(  # noqa: E731
        pool=_pool() if setting.get("pool") else None, graphed=graphed, capture=capture,
        **{k: v for k, v in setting.items() if k != "pool"})
    eager, capture = make(False), StaticCapture()
    graphed = make(True, capture)
    if setting.get("optimizer") == "adam":
        for g in (eager, graphed):
            for m in g.models:
                m.cuda()
            for o in g.optimizers:
                for state in o.state.values():
                    state.clear()
    batches = _batches(30)
    if setting.get("optimizer") == "adam":
        batches = [(x.cuda(), y.cuda()) for x, y in batches]
    _same_steps(eager, graphed, batches)
    assert capture.captures >= 1 and capture.replays >= 30 - graphed.graphs.eager_steps
    assert graphed.graphs.eager_steps < 30 and not graphed.graphs.failed
    operations = len(graphed.perturbation.names) if graphed.perturbation is not None else 0
    assert len(graphed.graphs.graphs) <= operations + 1  # one graph per operation, whichever member it perturbs


@pytest.mark.parametrize("dense", [False, True], ids=["classes", "maps"])
def test_cuda_graph_default_pool_on_images_matches_eager(dense):
    """Every default operation (mixing: label rows for the perturbed member, chosen on the device), on class
    indices and on segmentation maps (warped and mixed with the image, a teacher per pixel)."""

    def make(graphed):
        torch.manual_seed(0)
        head = lambda: [nn.Conv2d(4, 5, 1)] if dense else [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)]  # noqa: E731
        nets = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), *head()) for _ in range(3)]
        opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, fused=True) for m in nets]
        group = CompetitiveGroup(nets, opts, perturbation=PerturbationPool(p=0.7), seed=4, warmup_steps=5,
                                 granularity="position" if dense else "batch")
        if graphed:
            group.graphs = StepGraphs(group, capture=StaticCapture())
        return group

    generator = torch.Generator().manual_seed(3)
    targets = (8, 16, 16) if dense else (8,)
    batches = [(torch.randn(8, 3, 16, 16, generator=generator), torch.randint(0, 5, targets, generator=generator))
               for _ in range(40)]
    eager, graphed = make(False), make(True)
    _same_steps(eager, graphed, batches)
    replayed = {key[1] for key in graphed.graphs.graphs} - {None}
    assert len(replayed) >= 3 and not graphed.graphs.failed


def test_cuda_graph_results_are_not_overwritten_by_later_steps():
    group = _group(graphed=True)
    results = [group.step(b) for b in _batches(WARMUP_STEPS + 4)]
    kept = copy.deepcopy(results[-3])
    group.step(_batches(1)[0])
    for name in ("teacher", "ce", "loss", "weights", "nonfinite"):
        assert torch.equal(getattr(kept, name), getattr(results[-3], name))
    assert torch.equal(kept.kl, results[-3].kl)


def test_cuda_graph_learning_rate_schedulers_and_assigned_floats_reach_the_graph():
    eager, graphed = _group(), _group(graphed=True)
    schedulers = [
        [torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5) for o in g.optimizers] for g in (eager, graphed)
    ]
    for i, batch in enumerate(_batches(20)):
        _same_steps(eager, graphed, [batch])
        for s in schedulers[0] + schedulers[1]:
            s.step()
        if i == 12:  # a manual schedule: a float into param_groups
            for g in (eager, graphed):
                g.optimizers[0].param_groups[0]["lr"] = 0.003
    lr = graphed.optimizers[1].param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr is graphed.graphs.lrs.tensors[(1, 0)]
    assert lr.item() == pytest.approx(eager.optimizers[1].param_groups[0]["lr"])


def test_cuda_graph_refuses_another_hyperparameter_changed_after_capture():
    group = _group(graphed=True)
    for batch in _batches(WARMUP_STEPS + 2):
        group.step(batch)
    group.optimizers[1].param_groups[0]["momentum"] = 0.5
    before, state, steps = _params(group), group.generator.get_state(), group.steps
    with pytest.raises(ValueError, match=r"optimizers\[1\].param_groups\[0\]: 'momentum' from 0.9 to 0.5"):
        group.step(_batches(1)[0])
    assert all(torch.equal(p, q) for p, q in zip(before, _params(group)))
    assert torch.equal(state, group.generator.get_state()) and group.steps == steps


def test_cuda_graph_state_dict_between_eager_and_graphed_groups():
    batches = _batches(24)
    reference, graphed = _group(pool=_pool()), _group(pool=_pool(), graphed=True)
    _same_steps(reference, graphed, batches[:8])
    eager = _group(pool=_pool())
    eager.load_state_dict(graphed.state_dict())  # graphed -> eager
    _same_steps(reference, eager, batches[8:16])
    with pytest.warns(RuntimeWarning, match=r"optimizers' state were replaced.*captured again"):
        graphed.load_state_dict(eager.state_dict())  # eager -> a graphed group that holds graphs
        _same_steps(reference, graphed, batches[8:16])
    _same_steps(reference, graphed, batches[16:])


def test_cuda_graph_a_batch_of_a_new_shape_is_captured_anew_once():
    eager, graphed = _group(), _group(graphed=True)
    _same_steps(eager, graphed, _batches(6))
    with pytest.warns(RuntimeWarning, match=r"inputs \[3, 6\] and targets \[3\].*captured anew, once") as caught:
        _same_steps(eager, graphed, _batches(4, batch=3) + _batches(2))
    said = [w for w in caught if "anew" in str(w.message)]
    assert len(said) == 1 and said[0].filename == __file__
    assert {key[0][0] for key in graphed.graphs.graphs} == {(8, 6), (3, 6)}


def test_cuda_graph_a_failed_capture_leaves_that_step_eager_said_once():
    eager = _group(pool=_pool())
    graphed = _group(pool=_pool(), graphed=True, capture=StaticCapture(fail_when=lambda captures: captures >= 1))
    with pytest.warns(RuntimeWarning, match=r"runs eagerly: capturing it failed \(RuntimeError") as caught:
        _same_steps(eager, graphed, _batches(30))
    said = [w for w in caught if "runs eagerly" in str(w.message)]
    assert len(said) == 1 and said[0].filename == __file__  # said at the caller of group.step()
    assert len(graphed.graphs.graphs) == 1 and graphed.graphs.failed


def test_cuda_graph_a_replayed_step_dispatches_only_its_copies():
    """Around a replay the host does little: the batch copied in (2 ops), the results copied out (one clone per
    tensor of the result), the non-finite flags read; counted with a capture whose replay runs nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    def kept(body):  # the body runs once, at the capture; a replay returns its outputs
        out = body()
        return lambda: out

    group = _group(graphed=True, capture=kept)
    for batch in _batches(WARMUP_STEPS + 2):
        group.step(batch)
    batch = _batches(1)[0]
    with Count() as count:
        result = group.step(batch)
    tensors = 5 + len(result.terms) + (result.valid is not None)  # teacher, ce, loss, weights, nonfinite, ...
    assert count.ops.count("aten.copy_.default") == 2 and count.ops.count("aten.clone.default") == tensors
    rest = [op for op in count.ops if op not in ("aten.copy_.default", "aten.clone.default")]
    assert set(rest) <= {"aten.detach.default", "aten._to_copy.default"}, count.ops  # the flags' read


def test_cuda_graph_refuses_a_scaler_and_batches_that_are_not_tensors():
    group = _group(graphed=True)
    x, y = _batches(1)[0]
    with pytest.raises(ValueError, match=r"scaler: a GradScaler"):
        group.step((x, y), scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match=r"pair of tensors"):
        group.step((x, [int(t) for t in y]))
    assert group.steps == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_cuda_graph_seeding_the_device_generator_gives_each_operation_its_seeded_draws(device):
    """What a perturbed graph's replay relies on: the device's generator seeded with the draw's seed, then the
    operation run without a seed (as captured), gives the eager step's draws, for every default operation."""
    from competitive.capture import default_generator

    pool = PerturbationPool()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 24, 24, generator=generator).to(device)
    y = torch.randint(0, 10, (6,), generator=generator).to(device)
    for index, name in enumerate(pool.names):
        seeded = pool.perturb(index, x, y, seed=11 + index, num_classes=10)
        default_generator(x.device).manual_seed(11 + index)
        unseeded = pool.perturb(index, x, y, seed=None, num_classes=10)
        for a, b in zip(seeded, unseeded):
            assert torch.equal(a, b), name


# ---------------------------------------------------------------- on a GPU: real captures

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _resnet_groups(graphed, n=2, pool=False, terms=None, autocast=None, seed=0):
    from models import build

    torch.manual_seed(seed)
    nets = [build("resnet32")[0].cuda() for _ in range(n)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, fused=True) for m in nets]
    terms = [KL(), FeatureL2()] if terms == "kl-feature" else None
    hooks = ["layer3"] * n if terms else None
    return CompetitiveGroup(
        nets, opts, terms=terms, feature_hooks=hooks, perturbation=PerturbationPool(p=0.3) if pool else None,
        seed=3, autocast_dtype=autocast, cuda_graph=graphed, warmup_steps=20,
    )


def _cifar_batches(count, batch=128):
    generator = torch.Generator().manual_seed(7)
    return [(torch.randn(batch, 3, 32, 32, generator=generator).cuda(),
             torch.randint(0, 10, (batch,), generator=generator).cuda()) for _ in range(count)]


@needs_cuda
@pytest.mark.parametrize(
    "setting",
    [dict(), dict(pool=True), dict(autocast=torch.bfloat16), dict(terms="kl-feature"), dict(n=3)],
    ids=["fp32", "pool", "bf16", "kl-feature", "three"],
)
def test_cuda_graph_matches_eager_on_resnet32_pairs(setting):
    """50 steps from the same state: the same teacher every step, parameters within 1e-4 relative."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    eager, graphed = _resnet_groups(False, **setting), _resnet_groups(True, **setting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a pool operation that cannot be captured runs eagerly (said once)
        for i, batch in enumerate(_cifar_batches(50)):
            a, b = eager.step(batch), graphed.step(batch)
            assert torch.equal(a.teacher, b.teacher), f"step {i}"
            assert a.perturbation == b.perturbation, f"step {i}"
    assert len(graphed.graphs.graphs) >= 1
    for p, q in zip(_params(eager), _params(graphed)):
        assert (p - q).norm() <= 1e-4 * p.norm() + 1e-12
    assert eager.stats == graphed.stats


@needs_cuda
def test_cuda_graph_state_dict_and_replays_without_host_sync():
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    batches = _cifar_batches(20)
    reference, graphed = _resnet_groups(False), _resnet_groups(True)
    for batch in batches[:10]:
        reference.step(batch), graphed.step(batch)
    eager = _resnet_groups(False, seed=1)
    eager.load_state_dict(graphed.state_dict())
    steps_without_host_sync(graphed.step, batches[10:15])  # replays of the captured step
    for batch in batches[10:15]:
        reference.step(batch), eager.step(batch)
    for p, q, r in zip(_params(reference), _params(graphed), _params(eager)):
        assert (p - q).norm() <= 1e-4 * p.norm() + 1e-12 and (p - r).norm() <= 1e-4 * p.norm() + 1e-12


class _Syncing(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 4)

    def forward(self, x):
        if x.sum().item() > 1e30:  # a host read in the forward
            x = x * 0
        return self.linear(x)


@needs_cuda
def test_cuda_graph_names_a_forward_that_syncs_and_trains_eagerly():
    torch.manual_seed(0)
    nets = [_Syncing().cuda(), _Syncing().cuda()]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, fused=True) for m in nets]
    group = CompetitiveGroup(nets, opts, cuda_graph=True)
    with pytest.warns(RuntimeWarning, match=r"synchronizes with the host at .*test_cuda_graph.py:\d+"):
        for x, y in _batches(WARMUP_STEPS + 3):
            result = group.step((x.cuda(), y.cuda()))
    assert not group.graphs.graphs and bool(torch.isfinite(result.loss).all())
