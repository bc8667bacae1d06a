"""Mixed precision: autocast (bf16 on the CPU) and GradScaler with N optimizers."""

import copy

import pytest
import torch
from reference import tiny_cnn

from competitive import CompetitiveGroup


def _members():
    models = [tiny_cnn(width=4, seed=i, dtype=torch.float32) for i in range(2)]
    return models, [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g)


def test_autocast_dtype_option_runs_members_in_bf16_and_losses_in_fp32():
    models, optimizers = _members()
    reference = copy.deepcopy(models)
    seen = []
    models[0][4].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    group = CompetitiveGroup(models, optimizers, autocast_dtype=torch.bfloat16, feature_hooks=["1", "1"])
    fp32 = CompetitiveGroup(
        reference, [torch.optim.SGD(m.parameters(), lr=0.05) for m in reference], feature_hooks=["1", "1"]
    )
    for step in range(5):
        a, b = group.step(_batch(step)), fp32.step(_batch(step))
        assert a.loss.dtype == torch.float32 and torch.isfinite(a.loss).all()
        torch.testing.assert_close(a.loss, b.loss, rtol=0.05, atol=0.05)
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert all(p.dtype == torch.float32 for m in models for p in m.parameters())


def test_user_autocast_around_loss_and_grad_scaler_with_n_optimizers():
    models, optimizers = _members()
    group = CompetitiveGroup(models, optimizers)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    params = [p for m in models for p in m.parameters()]
    before = [p.detach().clone() for p in params]
    had_gradient = [False] * len(params)
    for step in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total, result = group.loss(_batch(step))
        scaler.scale(total).backward()
        had_gradient = [h or (p.grad is not None and bool(p.grad.any())) for h, p in zip(had_gradient, params)]
        for optimizer in optimizers:
            scaler.step(optimizer)
        scaler.update()
        group.zero_grad()
        assert torch.isfinite(result.loss).all()
    assert all(torch.isfinite(p).all() for p in params)
    # every parameter that received a nonzero gradient moved (SGD at lr 0.05 moves it by far more than
    # a rounding step); what had none in exact arithmetic is not asserted either way
    moved = [not torch.equal(p, q) for p, q in zip(params, before)]
    assert any(had_gradient) and all(m for m, h in zip(moved, had_gradient) if h)


def test_step_with_a_scaler_unscales_before_stepping():
    models, optimizers = _members()
    plain_models = copy.deepcopy(models)
    plain = CompetitiveGroup(plain_models, [torch.optim.SGD(m.parameters(), lr=0.05) for m in plain_models])
    scaled = CompetitiveGroup(models, optimizers)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(3):
        scaled.step(_batch(step), scaler=scaler)
        plain.step(_batch(step))
    # the scale (a power of two) cancels exactly: the same update as without a scaler
    for m, r in zip(models, plain_models):
        for p, q in zip(m.parameters(), r.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_with_scaler(dtype):
    models, _ = _members()
    models = [m.cuda() for m in models]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    group = CompetitiveGroup(models, optimizers, autocast_dtype=dtype, feature_hooks=["1", "1"])
    scaler = torch.amp.GradScaler("cuda")
    for step in range(3):
        x, y = _batch(step)
        result = group.step((x.cuda(), y.cuda()), scaler=scaler)
        assert torch.isfinite(result.loss).all()
