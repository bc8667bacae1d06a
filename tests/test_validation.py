"""Each misuse gets an error that names the argument, shows the value and says what is allowed."""

import math

import pytest
import torch
from torch import nn

from competitive import KL, CompetitiveGroup


def _models(n=2, classes=3):
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, classes)) for _ in range(n)]


def _opts(models):
    return [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]


def _group(**kwargs):
    models = _models()
    return CompetitiveGroup(models, _opts(models), **kwargs)


def _batch(b=4, classes=3):
    return torch.randn(b, 4), torch.randint(0, classes, (b,))


def test_fewer_than_two_models():
    m = _models(1)
    with pytest.raises(ValueError, match=r"Invalid models \(1\): a group needs a list of at least 2"):
        CompetitiveGroup(m, _opts(m))


def test_lengths_of_optimizers_and_hooks():
    m = _models(3)
    with pytest.raises(ValueError, match=r"Invalid optimizers \(2\): please provide one optimizer per model \(3\)"):
        CompetitiveGroup(m, _opts(m)[:2])
    with pytest.raises(ValueError, match=r"Invalid feature_hooks \(2\): please provide one entry per model \(3\)"):
        CompetitiveGroup(m, _opts(m), feature_hooks=["0", "0"])


def test_optimizer_must_hold_its_model_parameters_every_offender_reported():
    m = _models(3)
    opts = _opts(m)
    opts[0], opts[2] = _opts(m)[1], torch.optim.SGD(list(m[2].parameters())[:2], lr=0.1)
    with pytest.raises(ValueError) as info:
        CompetitiveGroup(m, opts)
    message = str(info.value)
    assert "optimizers[0] does not hold 4 trainable parameter(s) of models[0]" in message
    assert "optimizers[0] holds parameters of models[1]" in message
    assert "optimizers[2] does not hold 2 trainable parameter(s) of models[2]" in message
    assert "Build optimizers[i] from models[i].parameters()" in message


def test_same_model_in_two_slots():
    m = _models(1) * 2
    with pytest.raises(ValueError, match=r"models\[0\] and models\[1\] are the same module"):
        CompetitiveGroup(m, _opts(m))


def test_models_without_parameters():
    m = _models() + [nn.ReLU()]
    with pytest.raises(ValueError, match=r"models\[2\] have no parameters"):
        CompetitiveGroup(m, _opts(m[:2]) + [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)])


def test_shared_parameters_are_rejected():
    a, b = _models()
    b[0] = a[0]
    with pytest.raises(ValueError, match=r"models\[0\] and models\[1\] share a parameter"):
        CompetitiveGroup([a, b], _opts([a, b]))


def test_types_of_models_and_optimizers():
    m = _models()
    with pytest.raises(TypeError, match=r"models\[1\] is a str, not an nn.Module.*optimizers\[0\] is a int"):
        CompetitiveGroup([m[0], "net"], [3, _opts(m)[1]])


def test_hook_name_that_does_not_exist_every_offender():
    m = _models()
    with pytest.raises(ValueError) as info:
        CompetitiveGroup(m, _opts(m), feature_hooks=["layer3", "fc"])
    assert "feature_hooks[0]='layer3' names no submodule of models[0]" in str(info.value)
    assert "feature_hooks[1]='fc' names no submodule of models[1]" in str(info.value)


def test_hooks_must_be_all_or_none():
    with pytest.raises(ValueError, match=r"members \[1\] have no hook"):
        _group(feature_hooks=["1", None])


@pytest.mark.parametrize("name", ["alpha", "beta"])
@pytest.mark.parametrize("value", [-0.5, math.nan, math.inf])
def test_alpha_beta_negative_or_non_finite(name, value):
    # the deprecated group arguments: a warning, then the same check as the terms' own
    with pytest.raises(
        ValueError, match=rf"Invalid {name} value {value!r} provided\. Please provide a finite value >= 0"
    ):
        with pytest.warns(DeprecationWarning, match=name):
            _group(**{name: value})


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan])
def test_temperature_must_be_positive(value):
    with pytest.raises(
        ValueError, match=rf"Invalid temperature value {value!r} provided\. Please provide a finite value > 0"
    ):
        with pytest.warns(DeprecationWarning, match="temperature"):
            _group(temperature=value)
    with pytest.raises(ValueError, match=rf"Invalid temperature value {value!r} provided"):
        KL(temperature=value)


def test_unknown_rule_or_granularity():
    with pytest.raises(
        ValueError, match=r"Invalid rule 'worst'\. Please provide one of \('best', 'better', 'mutual', 'independent'\)"
    ):
        _group(rule="worst")
    with pytest.raises(
        ValueError, match=r"Invalid granularity 'pixel'\. Please provide one of \('batch', 'sample', 'position'\)"
    ):
        _group(granularity="pixel")


@pytest.mark.parametrize("batch", [torch.randn(4, 4), (torch.randn(4, 4),), [torch.randn(4, 4), [0, 1, 2, 0]]])
def test_batch_that_is_not_inputs_targets(batch):
    with pytest.raises(TypeError, match=r"Invalid batch .*please provide a pair of tensors \(inputs, targets\)"):
        _group().step(batch)


def test_members_disagree_on_number_of_classes():
    m = _models() + [_models(1, classes=5)[0]]
    with pytest.raises(
        ValueError, match=r"Members disagree on the number of classes or the positions: .*models\[2\]: C=5"
    ):
        CompetitiveGroup(m, _opts(m)).step(_batch())


def test_targets_out_of_range():
    group = _group()
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 3\) or be ignore_index=-100; got \[7\]"):
        group.step((torch.randn(2, 4), torch.tensor([0, 7])))
    with pytest.raises(ValueError, match=r"got \[-1\]"):
        group.step((torch.randn(2, 4), torch.tensor([-1, 1])))


def test_empty_batch():
    with pytest.raises(ValueError, match=r"inputs of shape \[0, 4\] hold no samples; the batch must not be empty"):
        _group().step((torch.randn(0, 4), torch.zeros(0, dtype=torch.long)))


def test_targets_must_match_batch():
    with pytest.raises(ValueError, match=r"targets of shape \[3\] for 4 inputs; expected \[4\]"):
        _group().step((torch.randn(4, 4), torch.zeros(3, dtype=torch.long)))


def test_float_targets_and_integer_inputs():
    with pytest.raises(TypeError, match=r"targets have dtype torch.float32; please provide class indices"):
        _group().step((torch.randn(4, 4), torch.zeros(4)))
    with pytest.raises(TypeError, match=r"inputs have dtype torch.uint8; members expect floating point inputs"):
        _group().step((torch.zeros(4, 4, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)))


def test_inputs_on_the_wrong_device():
    with pytest.raises(RuntimeError, match=r"inputs are on meta but the members are on \['cpu'\]"):
        _group().step((torch.randn(4, 4, device="meta"), torch.zeros(4, dtype=torch.long)))


def test_perturbation_and_probability():
    with pytest.raises(TypeError, match=r"Invalid perturbation \(list\): please provide a PerturbationPool or None"):
        _group(perturbation=[])
    with pytest.raises(
        ValueError, match=r"Invalid perturb_prob value 1.5 provided\. Please provide a value in \[0,1\] range"
    ):
        with pytest.warns(DeprecationWarning, match="perturb_prob"):
            _group(perturb_prob=1.5)


def test_failed_validation_leaves_the_group_unchanged():
    group = _group()
    before = [p.detach().clone() for m in group.models for p in m.parameters()]
    with pytest.raises(ValueError):
        group.step((torch.randn(2, 4), torch.tensor([0, 9])))
    assert group.stats["steps"] == 0
    assert all(torch.equal(p, q) for p, q in zip((p for m in group.models for p in m.parameters()), before))
