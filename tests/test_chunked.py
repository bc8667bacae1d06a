"""The step math over chunks of positions (``competitive.chunked``) against the whole step: the same CE,
teacher, ``W``, ``kl`` values and logits gradients for every rule, granularity and divergence; no tensor of
the size of a member's logits is created; the group's ``chunk_rows`` and its errors."""

import itertools

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from competitive import ADM, CWD, KL, CompetitiveGroup, FeatureL2, Term, step_losses
from competitive.chunked import chunked_losses

WEIGHTS = (1.0, 0.7, 1.3)  # a different upstream gradient for each member's CE and each term


def _run(fn, logits, targets, **kw):
    """Values, teacher, W and the logits' gradients of ``sum_i a_i CE_i + sum_k b_k term_k``."""
    leaves = [z.detach().clone().requires_grad_() for z in logits]
    out = fn(leaves, targets, **kw)
    total = (out.ce * torch.tensor(WEIGHTS[: len(leaves)], dtype=out.ce.dtype)).sum()
    total = total + sum((k + 2.0) * v.sum() for k, v in enumerate(out.terms.values()))
    total.backward()
    return out, [z.grad for z in leaves]


def _assert_same(reference, chunked, tolerance=1e-10):
    (a, grads_a), (b, grads_b) = reference, chunked
    assert torch.equal(a.teacher, b.teacher) and torch.equal(a.valid, b.valid)
    torch.testing.assert_close(b.weights, a.weights, rtol=0, atol=tolerance)
    torch.testing.assert_close(b.ce, a.ce, rtol=0, atol=tolerance)
    assert a.terms.keys() == b.terms.keys()
    for name in a.terms:
        torch.testing.assert_close(b.terms[name], a.terms[name], rtol=0, atol=tolerance)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(gb, ga, rtol=0, atol=tolerance)


def _language_batch(n, batch=3, length=6, vocab=7, class_dim=-1, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(batch, length, vocab, generator=g, dtype=torch.float64) * 2 for _ in range(n)]
    if class_dim == 1:
        logits = [z.transpose(1, 2).contiguous() for z in logits]
    targets = torch.randint(0, vocab, (batch, length), generator=g)
    targets[0, 2], targets[1, :] = -100, -100  # an ignored token, and a sample with none valid
    return logits, targets


CASES = list(
    itertools.product((2, 3), ("batch", "sample", "position"), ("best", "better", "mutual", "independent"))
)


@pytest.mark.parametrize("n, granularity, rule", CASES)
@pytest.mark.parametrize("divergence, temperature", [("forward", 1), ("forward", 2), ("reverse", 1.5), ("jsd", 1)])
def test_chunks_give_the_whole_step(n, granularity, rule, divergence, temperature):
    # float64, shifted targets, chunks of 1, 4 and more rows than a sample has (one chunk per sample)
    logits, targets = _language_batch(n)
    kw = dict(rule=rule, granularity=granularity, class_dim=-1, shift_targets=True)
    kw["terms"] = [KL(temperature=temperature, divergence=divergence, beta=0.3)]
    whole = _run(step_losses, logits, targets, **kw)
    for rows in (1, 4, 100):
        _assert_same(whole, _run(chunked_losses, logits, targets, chunk_rows=rows, **kw))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("class_dim", [1, -1])
def test_chunks_with_two_kl_terms_classes_first_and_jsd_ends(beta, class_dim):
    # [B, V, T] logits (class_dim 1), no shift, two kl terms with their own settings; JSD's beta 0 and 1
    # (the forward / reverse KL without the tau^2 factor) at a temperature
    logits, targets = _language_batch(2, class_dim=class_dim)
    terms = [KL(divergence="jsd", beta=beta, temperature=2.0), KL(0.5, temperature=3.0)]
    terms[1].name = "kl_t3"  # two instances of one term: the second under its own name
    kw = dict(terms=terms, granularity="position", class_dim=class_dim)
    _assert_same(_run(step_losses, logits, targets, **kw), _run(chunked_losses, logits, targets, chunk_rows=3, **kw))


def test_chunks_with_label_rows_member_targets_and_classification():
    # label rows [N, B, C, T] (a zero row is ignored), targets per member [N, B, T], and plain [B, C] logits
    logits, targets = _language_batch(2, class_dim=1)
    rows = torch.softmax(torch.randn(2, 3, 7, 6, dtype=torch.float64), dim=2)
    rows[:, 0, :, 1] = 0.0
    per_member = torch.stack([targets, targets.roll(1, dims=1)])
    for y in (rows, per_member):
        kw = dict(terms=[KL()], granularity="sample", class_dim=1)
        _assert_same(_run(step_losses, logits, y, **kw), _run(chunked_losses, logits, y, chunk_rows=2, **kw))
    flat = [torch.randn(8, 5, dtype=torch.float64) for _ in range(3)]
    y = torch.randint(0, 5, (8,))
    kw = dict(terms=[KL(temperature=2.0)], rule="better", granularity="sample")
    _assert_same(_run(step_losses, flat, y, **kw), _run(chunked_losses, flat, y, chunk_rows=3, **kw))


def test_a_member_with_non_finite_logits_does_not_reach_the_others():
    # member 1 has NaN / inf logits at some tokens: it does not teach there, and member 0's gradient is
    # finite and equal to the whole step's
    logits, targets = _language_batch(2)
    logits[1][0, 3, 2], logits[1][2, 1, 0] = torch.nan, torch.inf
    for divergence in ("forward", "reverse", "jsd"):
        kw = dict(terms=[KL(divergence=divergence)], granularity="position", class_dim=-1, rule="mutual")
        (a, grads_a), (b, grads_b) = (_run(f, logits, targets, **kw) for f in (step_losses, chunked_losses))
        assert torch.isfinite(grads_b[0]).all()
        torch.testing.assert_close(grads_b[0], grads_a[0], rtol=0, atol=1e-10)
        assert torch.equal(a.teacher, b.teacher) and torch.isnan(b.ce[1])


def test_terms_on_hooked_outputs_run_beside_chunked_kl():
    logits, targets = _language_batch(2)
    features = [torch.randn(3, 4, 5, 5, dtype=torch.float64) for _ in range(2)]
    embeddings = [torch.randn(3, 6, dtype=torch.float64) for _ in range(2)]
    feature, adm = FeatureL2(), ADM()
    feature.build({"features": [(4, 5, 5)] * 2})
    feature.double()
    kw = dict(terms=[KL(), feature, adm], features=features, embeddings=embeddings, granularity="position")
    kw.update(class_dim=-1)
    _assert_same(_run(step_losses, logits, targets, **kw), _run(chunked_losses, logits, targets, chunk_rows=2, **kw))


class _Sizes(TorchDispatchMode):
    """The number of elements of the largest tensor any op returns."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_no_tensor_of_the_logits_size_is_created(divergence):
    # forward and backward of the chunked step create no tensor larger than a few chunks: the gradients are
    # written over the logits; the whole step creates [N, R, V] tensors
    logits, targets = _language_batch(2, batch=4, length=32, vocab=512)
    leaves = [z.float().requires_grad_() for z in logits]
    for fn, kw in ((chunked_losses, {"chunk_rows": 4}), (step_losses, {})):
        sizes = _Sizes()
        sizes.inputs = {z.untyped_storage().data_ptr() for z in leaves}
        with sizes:
            out = fn(leaves, targets, terms=[KL(divergence=divergence)], granularity="position", class_dim=-1,
                     shift_targets=True, **kw)
            (out.ce.sum() + out.terms["kl"].sum()).backward()
        if fn is chunked_losses:
            assert sizes.largest <= 4 * 512, sizes.largest  # one chunk of one member's logits
            assert all(z.grad.untyped_storage().data_ptr() == z.untyped_storage().data_ptr() for z in leaves)
        else:
            assert sizes.largest >= 2 * 4 * 31 * 512
        for z in leaves:
            z.grad = None
            z.data = z.data.clone()


def test_compiled_chunks_give_the_eager_chunks():
    logits, targets = _language_batch(2, length=9)
    kw = dict(terms=[KL(divergence="jsd")], granularity="position", class_dim=-1, shift_targets=True, chunk_rows=4)
    eager = _run(chunked_losses, logits, targets, **kw)
    _assert_same(eager, _run(chunked_losses, logits, targets, compile={}, **kw), tolerance=1e-9)


class _LM(nn.Module):
    """A token-level model: logits ``[B, T, V]``, or their log-softmax (whose backward reads its output)."""

    def __init__(self, vocab=40, width=8, log_softmax=False):
        super().__init__()
        self.embed, self.out, self.log_softmax = nn.Embedding(vocab, width), nn.Linear(width, vocab), log_softmax
        self.mix = nn.Conv1d(width, width, 3, padding=2)

    def forward(self, ids):
        h = self.mix(self.embed(ids).transpose(1, 2))[..., : ids.shape[1]].transpose(1, 2).tanh()
        z = self.out(h)
        return z.log_softmax(-1) if self.log_softmax else z


def _pair(**kw):
    torch.manual_seed(0)
    models = [_LM(**kw), _LM(width=12, **kw)]
    return models, [torch.optim.SGD(m.parameters(), lr=0.5) for m in models]


@pytest.mark.parametrize("compile", [False, True])
def test_a_group_with_chunk_rows_trains_as_the_whole_step(compile):
    ids = torch.randint(0, 40, (4, 10), generator=torch.Generator().manual_seed(1))
    params = []
    for chunk_rows in (0, 3):
        models, optimizers = _pair()
        kw = dict(class_dim=-1, shift_targets=True, granularity="position", terms=[KL(divergence="jsd")])
        group = CompetitiveGroup(models, optimizers, chunk_rows=chunk_rows, warmup_steps=0, compile=compile, **kw)
        results = [group.step((ids, ids)) for _ in range(3)]
        params.append([p.detach() for m in models for p in m.parameters()])
        if chunk_rows:
            assert all(torch.isfinite(r.loss).all() for r in results)
    for a, b in zip(*params, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


class _Entropy(Term):
    name = "entropy"

    def forward(self, outputs, weights):
        return -(outputs.log_probs.exp() * outputs.log_probs).sum(-1).mean(-1)


def test_chunk_rows_errors():
    models, optimizers = _pair()
    for bad in (-1, 2.5, True, "4"):
        with pytest.raises(ValueError, match=r"chunk_rows value .* int >= 0"):
            CompetitiveGroup(models, optimizers, class_dim=-1, chunk_rows=bad)
    ids = torch.randint(0, 40, (4, 10))
    before = [p.detach().clone() for m in models for p in m.parameters()]
    for term in (CWD(on="logits"), _Entropy()):  # terms read the logits unless they say otherwise
        group = CompetitiveGroup(models, optimizers, class_dim=-1, chunk_rows=4, terms=[term], warmup_steps=0)
        with pytest.raises(ValueError, match=r"chunk_rows=4 .* read every member's logits whole"):
            group.step((ids, ids))
        group.close()
    assert all(torch.equal(a, p) for a, p in zip(before, (p for m in models for p in m.parameters())))


def test_a_member_whose_backward_reads_its_logits_gets_a_clear_error():
    # the chunked backward writes each gradient over the logits; a member returning log_softmax (whose
    # backward reads its output) cannot take that: a RuntimeError that says so, and nothing moves
    models, optimizers = _pair(log_softmax=True)
    group = CompetitiveGroup(models, optimizers, class_dim=-1, shift_targets=True, chunk_rows=4)
    before = [p.detach().clone() for m in models for p in m.parameters()]
    with pytest.raises(RuntimeError, match="chunk_rows=0"):
        group.step((torch.randint(0, 40, (4, 10)),) * 2)
    assert all(torch.equal(a, p) for a, p in zip(before, (p for m in models for p in m.parameters())))
    group = CompetitiveGroup(models, optimizers, class_dim=-1, shift_targets=True, chunk_rows=0)
    assert torch.isfinite(group.step((torch.randint(0, 40, (4, 10)),) * 2).loss).all()


def test_chunk_rows_none_chunks_large_logits_unless_a_term_reads_them(monkeypatch):
    # None: chunk where a member's logits hold more than AUTO_VALUES values (2**24; here 1,000, so a batch of
    # 4 x 10 x 40 is chunked and one of 1 x 10 x 40 is not), with the whole step where a term reads the logits
    import competitive.chunked
    import competitive.group

    for module in (competitive.group, competitive.chunked):
        monkeypatch.setattr(module, "AUTO_VALUES", 1000)
    ids = torch.randint(0, 40, (4, 10))
    for terms, chunk_rows, size, chunked in [
        (["kl"], None, 4, True),
        (["kl"], None, 1, False),
        ([CWD(on="logits")], None, 4, False),
        (["kl"], 0, 4, False),
        (["kl"], 5, 1, True),
    ]:
        models, optimizers = _pair()
        group = CompetitiveGroup(models, optimizers, class_dim=-1, chunk_rows=chunk_rows, terms=terms)
        calls, fn = [], group.chunked_fn
        group.chunked_fn = lambda *a, fn=fn, calls=calls, **k: calls.append(1) or fn(*a, **k)
        group.step((ids[:size], ids[:size]))
        assert bool(calls) == chunked, (terms, chunk_rows, size)


def test_loss_and_evaluate_take_the_chunked_step_too():
    # group.loss(): one backward of the summed losses through the members' own graphs (no cut), and
    # group.evaluate(): values only; both equal the whole step's
    ids = torch.randint(0, 40, (4, 10), generator=torch.Generator().manual_seed(3))
    grads, evaluated = [], []
    for chunk_rows in (0, 4):
        models, optimizers = _pair()
        group = CompetitiveGroup(models, optimizers, class_dim=-1, shift_targets=True, chunk_rows=chunk_rows)
        evaluated.append(group.evaluate((ids, ids)))
        total, _ = group.loss((ids, ids))
        total.backward()
        grads.append([p.grad for m in models for p in m.parameters()])
    torch.testing.assert_close(evaluated[1].loss, evaluated[0].loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(evaluated[1].teacher, evaluated[0].teacher)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
