import pytest
import torch
from torch import nn

from competitive.features import FeatureAdapter, build_adapters, resolve_hooks


@pytest.mark.parametrize(
    "source, target",
    [
        ((8, 4, 4), (16, 4, 4)),
        ((8, 4, 4), (4, 8, 8)),
        ((8, 8, 8), (16, 2, 2)),
        ((8, 4, 4), (10,)),
        ((10,), (6,)),
        ((10,), (4, 2, 2)),
        ((5, 7), (5, 3)),
    ],
)
def test_adapter_maps_to_the_target_shape(source, target):
    adapter = FeatureAdapter(torch.Size(source), torch.Size(target))
    assert adapter(torch.randn(3, *source)).shape == (3, *target)
    assert sum(p.numel() for p in adapter.parameters()) > 0


@pytest.mark.parametrize("source, target", [((8, 8, 8), (16, 2, 2)), ((16, 2, 2), (8, 8, 8)), ((8, 4, 4), (4, 8, 6))])
def test_adapter_is_a_1x1_convolution_then_bilinear_resizing(source, target):
    # the equation as written (FitNets' regressor, then resizing): the adapter may run the two in
    # either order (they act on different axes), so values and gradients agree up to rounding
    adapter = FeatureAdapter(torch.Size(source), torch.Size(target)).double()
    x = torch.randn(3, *source, dtype=torch.float64, requires_grad=True)
    expected = nn.functional.interpolate(
        nn.functional.conv2d(x, adapter.map.weight), size=target[1:], mode="bilinear", align_corners=False
    )
    out = adapter(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, adapter.map.weight], g)
    expected_grads = torch.autograd.grad(expected, [x, adapter.map.weight], g)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_equal_shapes_need_no_adapter_and_bad_pairs_are_all_reported():
    assert build_adapters([torch.Size((4, 2, 2))] * 3) == {}
    with pytest.raises(ValueError) as info:
        build_adapters([torch.Size((2, 5)), torch.Size((3, 5)), torch.Size((3, 5))])
    message = str(info.value)
    assert message.count("No adapter maps") == 4  # 0->1, 0->2, 1->0, 2->0


def test_hooks_resolve_through_wrappers_and_modules():
    net = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 2)))
    wrapper = nn.Module()
    wrapper.module = net  # what DistributedDataParallel looks like
    other = nn.Linear(2, 2)
    assert resolve_hooks([wrapper, other], ["1.1", other]) == [net[1][1], other]
    with pytest.raises(ValueError, match=r"feature_hooks\[1\] is a module that is not part of models\[1\]"):
        resolve_hooks([net, other], ["0", net[0]])
    with pytest.raises(ValueError, match=r"feature_hooks\[0\] has type int"):
        resolve_hooks([net, other], [3, None])
