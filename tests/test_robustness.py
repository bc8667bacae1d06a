"""Bad inputs and faults, one by one: each gets the exact outcome (a clear error naming the argument,
or the correct result) and leaves the group's state where it was."""

import numpy as np
import pytest
import torch
from reference import tiny_cnn
from torch import nn

from competitive import CompetitiveGroup, PerturbationPool, distillation_weights, group_loss


def _members(n=2, widths=None, classes=5):
    widths = widths or [4] * n
    return [tiny_cnn(width=w, classes=classes, seed=i, dtype=torch.float32) for i, w in enumerate(widths)]


def _group(n=2, widths=None, classes=5, **kwargs):
    models = _members(n, widths, classes)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    kwargs.setdefault("seed", 0)
    return CompetitiveGroup(models, optimizers, **kwargs), models, optimizers


def _batch(seed=0, batch=8, classes=5, dtype=torch.long):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 6, 6, generator=g), torch.randint(0, classes, (batch,), generator=g).to(dtype)


def _snapshot(group):
    return {
        "params": [p.detach().clone() for m in group.models for p in m.parameters()],
        "counters": {k: v.clone() for k, v in group.counters.state_dict().items() if k != "_extra_state"},
        "steps": group.steps,
        "generator": group.generator.get_state(),
        "momentum": [len(o.state) for o in group.optimizers if o is not None],
    }


def _assert_unchanged(group, before):
    after = _snapshot(group)
    assert after["steps"] == before["steps"]
    assert torch.equal(after["generator"], before["generator"])
    assert all(torch.equal(a, b) for a, b in zip(after["params"], before["params"]))
    assert all(torch.equal(after["counters"][k], v) for k, v in before["counters"].items())
    assert after["momentum"] == before["momentum"]


def _only(name, op):
    return PerturbationPool({name: op}, p=1.0)


# -- 2. labels returned by a perturbation ---------------------------------------------------------


def test_new_hard_labels_from_a_perturbation_are_used():
    def permute(x, y):  # a custom op that permutes the batch: the labels move with the images
        return x.flip(0), y.flip(0)

    group, models, _ = _group(perturbation=_only("permute", permute))
    x, y = _batch()
    with torch.no_grad():
        logits = [m(x.flip(0)) for m in models]
    total, result = group.loss((x, y))
    member = result.perturbed
    assert result.perturbation == "permute" and total.requires_grad
    expected = torch.nn.functional.cross_entropy(logits[member], y.flip(0))
    torch.testing.assert_close(result.ce[member], expected)
    assert not torch.isclose(result.ce[member], torch.nn.functional.cross_entropy(logits[member], y))


@pytest.mark.parametrize(
    "labels, error, match",
    [
        (lambda y: torch.full((y.shape[0], 5), 0.5), ValueError, "not distributions"),
        (lambda y: torch.eye(5)[y] * 2 - torch.eye(5)[(y + 1) % 5], ValueError, "not distributions"),
        (lambda y: y.float(), TypeError, "dtype torch.float32"),
    ],
)
def test_labels_that_are_not_distributions_or_not_integers_name_the_operation(labels, error, match):
    group, _, _ = _group(perturbation=_only("bad_labels", lambda x, y: (x, labels(y))))
    before = _snapshot(group)
    with pytest.raises(error, match=f"'bad_labels'.*{match}|{match}.*'bad_labels'"):
        group.step(_batch())
    _assert_unchanged(group, before)


# -- 3. schedulers and the group's parts ----------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=10),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5**s),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=20),
    ],
)
def test_a_scheduler_built_after_the_group_covers_the_adapters(make):
    group, _, optimizers = _group(widths=[4, 6], feature_hooks=["1", "1"], example_input=torch.randn(2, 3, 6, 6))
    assert sorted(group.adapters) == ["0_1", "1_0"]  # they exist before any step
    schedulers = [make(o) for o in optimizers]
    for k in range(3):
        group.step(_batch(k))
        for s in schedulers:
            s.step()
    for o in optimizers:
        lrs = {g["lr"] for g in o.param_groups}
        assert len(lrs) == 1, lrs  # the adapter's group follows the member's schedule


def test_a_scheduler_built_before_the_parts_exist_is_refused_before_anything_moves():
    group, _, optimizers = _group(widths=[4, 6], feature_hooks=["1", "1"])  # no example_input
    torch.optim.lr_scheduler.LinearLR(optimizers[0], start_factor=0.1)
    before = _snapshot(group)
    with pytest.raises(RuntimeError, match="example_input"):
        group.step(_batch())
    _assert_unchanged(group, before)


def test_a_scheduler_built_before_the_group_is_refused_when_it_is_built():
    models = _members(widths=[4, 6])
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    torch.optim.lr_scheduler.LinearLR(optimizers[1])
    with pytest.raises(RuntimeError, match=r"optimizers\[1\] already have an LR scheduler"):
        CompetitiveGroup(models, optimizers, feature_hooks=["1", "1"], example_input=torch.randn(2, 3, 6, 6))


# -- 4. validation without side effects -----------------------------------------------------------


@pytest.mark.parametrize("how", ["evaluate", "no_grad"])
def test_losses_of_a_batch_without_side_effects(how):
    group, _, _ = _group(perturbation=PerturbationPool(p=1.0), warmup_steps=0)
    group.step(_batch(0))
    group.eval()
    before = _snapshot(group)
    if how == "evaluate":
        result = group.evaluate(_batch(1))
    else:
        with torch.no_grad():
            total, result = group.loss(_batch(1))
        assert not total.requires_grad
    _assert_unchanged(group, before)
    assert result.perturbed is None and result.teacher.item() in (0, 1)
    torch.testing.assert_close(result.loss, result.ce + result.kl)
    assert result.kl[1 - result.teacher] > 0  # the losses are the full ones, not the warm-up's


# -- 5. a non-finite feature map ------------------------------------------------------------------


class InfMap(nn.Module):
    """A CNN whose hooked feature map (the ``probe``'s output) can hold one inf; its logits stay finite."""

    def __init__(self, seed, inf):
        super().__init__()
        self.net, self.inf = tiny_cnn(width=4, seed=seed, dtype=torch.float32), inf
        self.probe = nn.Identity()

    def forward(self, x):
        h = self.net[1](self.net[0](x))
        if self.inf:
            h = h.clone()
            h[0, 0, 0, 0] = torch.inf
        h = self.probe(h).nan_to_num(posinf=0.0)
        return self.net[4](self.net[3](self.net[2](h)))


@pytest.mark.parametrize("terms", [["kl", "feature"], ["kl", "adm"]])
def test_one_inf_in_a_feature_map_poisons_nobody_else(terms):
    models = [InfMap(0, inf=True), InfMap(1, inf=False), InfMap(2, inf=False)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    group = CompetitiveGroup(
        models, optimizers, feature_hooks=["probe"] * 3, terms=terms, rule="mutual", warmup_steps=0
    )
    with pytest.warns(RuntimeWarning, match=r"members \[0\]"):
        result = group.step(_batch())
    assert result.nonfinite.tolist() == [True, False, False]
    assert torch.isfinite(result.loss[1:]).all()
    assert (result.weights[:, 0] == 0).all()  # it never teaches
    assert all(torch.isfinite(p).all() for m in models[1:] for p in m.parameters())


# -- 7, 8. nothing to learn -----------------------------------------------------------------------


def test_one_class_logits_are_refused():
    group, _, _ = _group(classes=1)
    before = _snapshot(group)
    with pytest.raises(ValueError, match=r"C >= 2"):
        group.step(_batch(classes=1))
    _assert_unchanged(group, before)


def test_step_under_no_grad_is_refused_before_anything_moves():
    group, _, _ = _group(perturbation=PerturbationPool(p=1.0))
    before = _snapshot(group)
    with torch.no_grad(), pytest.raises(RuntimeError, match="no_grad"):
        group.step(_batch())
    _assert_unchanged(group, before)


def test_step_with_every_parameter_frozen_is_refused_before_anything_moves():
    group, models, _ = _group(perturbation=PerturbationPool(p=1.0))
    for m in models:
        m.requires_grad_(False)
    before = _snapshot(group)
    with pytest.raises(RuntimeError, match="requires_grad=False"):
        group.step(_batch())
    _assert_unchanged(group, before)


# -- 9, 10. targets and tiny batches --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_targets_work_with_mixing(dtype):
    group, _, _ = _group(perturbation=_only("mixup", PerturbationPool().modules_["mixup"]), warmup_steps=0)
    reference, _, _ = _group(perturbation=_only("mixup", PerturbationPool().modules_["mixup"]), warmup_steps=0)
    x, y = _batch()
    result = group.step((x, y.to(dtype)))
    expected = reference.step((x, y))
    assert result.perturbation == "mixup"
    torch.testing.assert_close(result.loss, expected.loss, rtol=0, atol=0)


def test_a_batch_of_one_skips_a_mixing_draw_and_says_so():
    group, _, _ = _group(perturbation=_only("mixup", PerturbationPool().modules_["mixup"]))
    x, y = _batch(batch=1)
    result = group.step((x, y))
    assert result.perturbed is None and result.perturbation is None
    assert "'mixup' needs a batch of at least 2" in result.skipped
    assert group.step(_batch(1)).perturbation == "mixup"  # the next full batch is perturbed again


# -- 11, 12. shapes and operations ----------------------------------------------------------------


def test_a_new_input_resolution_with_adapters_names_members_and_shapes():
    group, _, _ = _group(widths=[4, 6], feature_hooks=["1", "1"], example_input=torch.randn(2, 3, 6, 6))
    group.step(_batch())
    before = _snapshot(group)
    x = torch.randn(8, 3, 8, 8)
    with pytest.raises(ValueError, match=r"models\[0\]: \[4, 6, 6\] -> \[4, 8, 8\]; models\[1\]: \[6, 6, 6\]"):
        group.step((x, torch.zeros(8, dtype=torch.long)))
    _assert_unchanged(group, before)


@pytest.mark.parametrize(
    "op, match",
    [
        (lambda x: x, "could not be called"),  # only x
        (lambda x, y: x, "returned Tensor"),  # returns only x
    ],
)
def test_a_custom_operation_with_the_wrong_signature_names_it(op, match):
    group, _, _ = _group(perturbation=_only("mine", op))
    with pytest.raises(TypeError, match=f"'mine'.*{match}|{match}"):
        group.step(_batch())


def test_a_kornia_mixing_module_with_the_wrong_data_keys_names_it():
    import kornia.augmentation as K

    group, _, _ = _group(perturbation=_only("mix", K.RandomMixUpV2(p=1.0, data_keys=["input"])))
    with pytest.raises((TypeError, ValueError), match="'mix'"):
        group.step(_batch())


def test_images_a_pool_cannot_handle_are_refused_at_the_first_step():
    models = [nn.Sequential(nn.Conv2d(5, 4, 3), nn.Flatten(), nn.LazyLinear(5)) for _ in range(2)]
    for m in models:
        m(torch.randn(1, 5, 6, 6))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    import kornia.augmentation as K

    from competitive.perturbation import default_operations

    # kornia's salt and pepper takes 1 or 3 channels (the default pool's own takes any number)
    ops = dict(default_operations(), kornia=K.RandomSaltAndPepperNoise(p=1.0))
    group = CompetitiveGroup(models, optimizers, perturbation=PerturbationPool(ops, p=0.0), seed=0)
    with pytest.raises(ValueError, match=r"Perturbation '\w+' cannot handle inputs of shape \[5, 6, 6\]"):
        group.step((torch.randn(4, 5, 6, 6), torch.zeros(4, dtype=torch.long)))
    assert group.steps == 0


# -- 13, 14. arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"seed": 1.5}, TypeError, "seed"),
        ({"seed": "0"}, TypeError, "seed"),
        ({"autocast_dtype": torch.int8}, TypeError, "autocast_dtype"),
        ({"autocast_dtype": "bf16"}, TypeError, "autocast_dtype"),
        ({"skip_nonfinite": 1}, TypeError, "skip_nonfinite"),
        ({"compile": "yes"}, TypeError, "compile"),
        ({"compile": {"fullgraph": False}}, ValueError, r"compile keys \['fullgraph'\].*backend, mode"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"fixed_teacher": 2}, ValueError, "fixed_teacher"),
        ({"fixed_teacher": 0, "rule": "mutual"}, ValueError, "fixed_teacher"),
        ({"terms": ["kl", "fitnet"]}, ValueError, "known terms"),
        ({"terms": ["feature"], "alpha": 2.0, "feature_hooks": ["1", "1"]}, ValueError, "alpha"),
        ({"logits_from": [0, 1, 2]}, ValueError, "logits_from"),
    ],
)
def test_settings_are_validated_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        if "alpha" in kwargs:  # a deprecated argument: its warning comes first
            with pytest.warns(DeprecationWarning, match="alpha"):
                _group(**kwargs)
        else:
            _group(**kwargs)


@pytest.mark.parametrize("value", [np.float64(0.5), np.float32(2.0), np.int64(1), torch.tensor(0.5)])
def test_numpy_and_0d_tensor_scalars_are_accepted(value):
    with pytest.warns(DeprecationWarning):  # the deprecated arguments, forwarded to the kl term
        group, _, _ = _group(alpha=value, beta=value, temperature=value, warmup_steps=0)
    assert group.alpha == float(value) and isinstance(group.alpha, float)
    assert group.terms[0].temperature == float(value)


@pytest.mark.parametrize(
    "kwargs, match", [({"rule": "bets"}, "Invalid rule 'bets'"), ({"granularity": "samples"}, "granularity")]
)
def test_pure_functions_reject_unknown_rules_and_granularities(kwargs, match):
    logits = [torch.randn(4, 3), torch.randn(4, 3)]
    with pytest.raises(ValueError, match=match):
        group_loss(logits, torch.zeros(4, dtype=torch.long), **kwargs)
    if "rule" in kwargs:
        with pytest.raises(ValueError, match=match):
            distillation_weights(torch.rand(2), **kwargs)


# -- 15. nn.Module.apply --------------------------------------------------------------------------


def test_a_module_holding_a_pool_can_apply_an_init_function():
    holder = nn.Module()
    holder.pool = PerturbationPool()
    seen = []
    holder.apply(lambda m: seen.append(type(m).__name__))
    assert "PerturbationPool" in seen


# -- 16. where the logits are ---------------------------------------------------------------------


class Wrapped(nn.Module):
    def __init__(self, net, kind):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        z = self.net(x)
        if self.kind == "tuple":
            return z.sum(), z
        if self.kind == "dict":
            return {"out": z}
        return type("Output", (), {"logits": z, "loss": None})()


@pytest.mark.parametrize("kind, spec", [("object", None), ("tuple", 1), ("dict", "out"), ("tuple", lambda o: o[1])])
def test_logits_can_come_out_of_tuples_dicts_and_output_objects(kind, spec):
    nets = _members()
    plain, _, _ = _group(warmup_steps=0)
    models = [Wrapped(n, kind) for n in nets]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    group = CompetitiveGroup(models, optimizers, logits_from=spec, seed=0, warmup_steps=0)
    torch.testing.assert_close(group.step(_batch()).loss, plain.step(_batch()).loss)


def test_an_output_without_logits_names_the_member_and_the_fix():
    models = [Wrapped(n, "tuple") for n in _members()]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    group = CompetitiveGroup(models, optimizers)
    with pytest.raises(ValueError, match=r"models\[0\] returned a tuple.*logits_from"):
        group.step(_batch())


# -- 17. offline KD -------------------------------------------------------------------------------


def test_a_frozen_pretrained_member_always_teaches():
    models = _members(widths=[8, 4])
    teacher = models[0].requires_grad_(False)
    before = [p.clone() for p in teacher.parameters()]
    optimizers = [None, torch.optim.SGD(models[1].parameters(), lr=0.1)]
    group = CompetitiveGroup(models, optimizers, fixed_teacher=0, warmup_steps=0)
    for k in range(5):
        result = group.step(_batch(k))
        assert result.teacher.item() == 0 and result.kl[0] == 0 and result.kl[1] > 0
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), before))
    assert group.stats["teacher_count"] == [5.0, 0.0]


def test_a_fixed_teacher_with_a_nonfinite_loss_does_not_teach():
    group, models, _ = _group(fixed_teacher=1, warmup_steps=0)
    models[1][4].bias.data.fill_(float("nan"))
    with pytest.warns(RuntimeWarning):
        result = group.step(_batch())
    assert result.teacher.item() == -1 and (result.weights == 0).all()


# -- 18. seed=None --------------------------------------------------------------------------------


def test_seed_none_leaves_the_global_rng_alone():
    models = _members()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    pool = PerturbationPool()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    group = CompetitiveGroup(models, optimizers, seed=None, perturbation=pool)
    group.step(_batch())
    assert torch.equal(torch.rand(3), expected)
    assert group.seed == 123  # torch.initial_seed(): read, not drawn


_SEEDED_SCRIPT = """
import torch
from torch import nn
from competitive import CompetitiveGroup, PerturbationPool
if {seed} is not None:
    torch.manual_seed({seed})
models = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5)) for _ in range(2)]
optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
group = CompetitiveGroup(models, optimizers, perturbation=PerturbationPool(), warmup_steps=0)
draws = []
for _ in range(20):
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
    result = group.step((x, y))
    draws.append((result.perturbed, result.perturbation))
params = torch.cat([p.detach().flatten() for m in models for p in m.parameters()])
print(group.seed, draws, params.numpy().tobytes().hex())
"""


def _run_scripts(*seeds):
    """Each seed's script in its own fresh process, all at once; their outputs."""
    import subprocess
    import sys

    runs = [
        subprocess.Popen([sys.executable, "-c", _SEEDED_SCRIPT.format(seed=s)], stdout=subprocess.PIPE, text=True)
        for s in seeds
    ]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs)
    return outputs


def test_a_script_seeded_with_torch_manual_seed_repeats_bit_for_bit():
    first, second = _run_scripts(7, 7)
    assert first == second  # draws, seed and every parameter's bits, in two fresh processes


def test_an_unseeded_run_takes_a_fresh_seed():
    # a fresh process starts torch from a nondeterministic seed, as torch.seed() does here
    models = _members(2, None, 5)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    seeds = []
    with torch.random.fork_rng(devices=[]):  # the suite's global stream is restored afterwards
        for _ in range(2):
            torch.seed()
            seeds.append(CompetitiveGroup(models, optimizers, perturbation=PerturbationPool(), seed=None).seed)
            assert seeds[-1] == torch.initial_seed()
    assert seeds[0] != seeds[1]
