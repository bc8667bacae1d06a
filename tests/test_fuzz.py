"""Hypothesis drives the public API: only documented errors, and finite losses for finite inputs."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from competitive import KL, CompetitiveGroup, FeatureL2
from competitive.selection import GRANULARITIES, RULES


class Member(nn.Module):
    """A small network whose hooked feature ``feat`` has a chosen shape."""

    def __init__(self, feature: tuple, classes: int):
        super().__init__()
        if len(feature) == 3:
            c, h, w = feature
            self.body = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.AdaptiveAvgPool2d((h, w)))
            self.feat = nn.Tanh()
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, classes))
        else:
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, feature[0]))
            self.feat = nn.Tanh()
            self.head = nn.Linear(feature[0], classes)

    def forward(self, x):
        return self.head(self.feat(self.body(x)))


feature_shapes = st.one_of(
    st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4)),
    st.tuples(st.integers(1, 12)),
)
number = st.one_of(st.floats(0, 3), st.sampled_from([-1.0, math.nan, math.inf, 0.0]))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 4),
    batch=st.integers(1, 6),
    classes=st.integers(2, 7),
    rule=st.sampled_from(RULES + ("worst",)),
    granularity=st.sampled_from(GRANULARITIES),
    alpha=number,
    beta=number,
    temperature=st.one_of(st.floats(0.1, 5), st.sampled_from([0.0, -2.0])),
    shapes=st.lists(feature_shapes, min_size=4, max_size=4),
    hooks=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_public_api_raises_only_documented_errors(
    n, batch, classes, rule, granularity, alpha, beta, temperature, shapes, hooks, seed
):
    torch.manual_seed(seed)
    members = [Member(shapes[i], classes) for i in range(n)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01) for m in members]
    valid = rule in RULES and all(math.isfinite(v) and v >= 0 for v in (alpha, beta)) and temperature > 0
    try:
        kl, feature = KL(alpha, temperature=temperature), FeatureL2(beta)
        group = CompetitiveGroup(
            members,
            optimizers,
            rule=rule,
            granularity=granularity,
            terms=[kl, feature] if hooks else [kl],
            feature_hooks=["feat"] * n if hooks else None,
        )
    except ValueError as error:
        assert not valid and "Invalid" in str(error) and "Please provide" in str(error)
        return
    assert valid
    x, y = torch.randn(batch, 3, 8, 8), torch.randint(0, classes, (batch,))
    for _ in range(2):
        result = group.step((x, y))
        assert torch.isfinite(result.loss).all()
        assert result.loss.shape == (n,)
        teacher = result.teacher if granularity == "sample" else result.teacher.unsqueeze(0)
        assert ((teacher >= 0) & (teacher < n)).all()
    assert all(torch.isfinite(p).all() for m in members for p in m.parameters())
