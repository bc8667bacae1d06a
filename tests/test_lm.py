"""Language models: token ids as inputs, causal targets (``shift_targets``) against Hugging Face's own
loss, and the ``kl`` term's divergences against TRL's ``generalized_jsd_loss``."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from competitive import KL, CompetitiveGroup, step_losses


class TinyLM(nn.Module):
    """Token ids ``[B, T]`` -> logits ``[B, T, V]`` (an embedding, a GRU, a head)."""

    def __init__(self, vocab: int = 11, width: int = 8):
        super().__init__()
        self.embed, self.rnn, self.head = (
            nn.Embedding(vocab, width),
            nn.GRU(width, width, batch_first=True),
            nn.Linear(width, vocab),
        )

    def forward(self, ids):
        return self.head(self.rnn(self.embed(ids))[0])


def _group(models, **kwargs):
    return CompetitiveGroup(models, [torch.optim.SGD(m.parameters(), lr=0.1) for m in models], warmup_steps=0, **kwargs)


def test_token_ids_train_and_uint8_images_keep_their_error():
    torch.manual_seed(0)
    models = [TinyLM(), TinyLM(width=12)]
    group = _group(models, class_dim=-1, granularity="position")
    ids = torch.randint(0, 11, (4, 7))
    result = group.step((ids, ids))
    assert result.teacher.shape == (4, 7) and torch.isfinite(result.loss).all()
    with pytest.raises(TypeError, match=r"inputs have dtype torch.uint8; .*x.float\(\) / 255"):
        _group([nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)]).step(
            (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, 4, 4, dtype=torch.long))
        )


def test_shift_targets_is_hugging_faces_causal_lm_loss():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    configs = [transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2),
               transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)]  # fmt: skip
    models = [transformers.GPT2LMHeadModel(c) for c in configs]
    for m in models:
        m.eval()  # no dropout: the group's forward and Hugging Face's see the same network
    ids = torch.randint(0, 50, (3, 12))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[2, 9:] = -100  # padding
    group = _group(models, class_dim=-1, shift_targets=True, granularity="position")
    result = group.evaluate((ids, labels))
    with torch.no_grad():
        expected = torch.stack([m(ids, labels=labels).loss for m in models])
    torch.testing.assert_close(result.ce, expected, rtol=0, atol=1e-6)
    assert result.teacher.shape == (3, 11)  # positions 0..10 learn the tokens 1..11
    assert (result.teacher[labels[:, 1:] == -100] == -1).all()


@pytest.mark.parametrize("ids_shape", [(3,), (3, 1)])
def test_shift_targets_needs_a_sequence_of_two(ids_shape):
    models = [TinyLM(), TinyLM()]
    group = _group(models, class_dim=-1, shift_targets=True)
    ids = torch.randint(0, 11, ids_shape)
    match = "so the logits need positions" if len(ids_shape) == 1 else "needs sequences of length >= 2"
    with pytest.raises(ValueError, match=rf"shift_targets=True .*{match}"):
        group.step((ids, ids))


def test_token_ids_outside_the_vocabulary_and_members_with_other_vocabularies_are_refused():
    models = [TinyLM(), TinyLM()]
    before = [p.detach().clone() for m in models for p in m.parameters()]
    with pytest.raises(ValueError, match=r"models\[0\] could not embed the token ids .*\(values in \[0, 40\]\)"):
        _group(models, class_dim=-1, shift_targets=True).step((torch.tensor([[0, 40, 3]]), torch.tensor([[0, 1, 3]])))
    with pytest.raises(ValueError, match=r"Members disagree on the number of classes.*the same vocabulary; mapping"):
        _group([TinyLM(), TinyLM(vocab=12)], class_dim=-1).step((torch.randint(0, 11, (2, 5)),) * 2)
    with pytest.raises(ValueError, match=r"every position of the batch is ignore_index=-100"):
        _group(models, class_dim=-1, shift_targets=True).step((torch.randint(0, 11, (2, 5)), torch.full((2, 5), -100)))
    assert all(torch.equal(a, p) for a, p in zip(before, [p for m in models for p in m.parameters()]))


def trl_generalized_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0):
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (trl/experimental/gkd/gkd_trainer.py, 1.16), transcribed."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-beta), teacher_log_probs + torch.log(beta)]), dim=0
        )
        jsd = beta * F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True)
        jsd = jsd + (1 - beta) * F.kl_div(mixture, student_log_probs, reduction="none", log_target=True)
    mask = labels != -100
    return jsd[mask].sum() / mask.sum().clamp_min(1)


def _trl():
    try:
        from trl.experimental.gkd import GKDTrainer
    except Exception:  # trl not installed (a test extra): the transcription above stands in
        return [trl_generalized_jsd]
    return [trl_generalized_jsd, GKDTrainer.generalized_jsd_loss]


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergences_are_trls_generalized_jsd(beta, temperature):
    g = torch.Generator().manual_seed(int(beta * 10) + int(temperature))
    logits = [torch.randn(3, 6, 9, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    labels = torch.randint(0, 9, (3, 6), generator=g)
    labels[0, :2], labels[2, 4:] = -100, -100
    term = KL(divergence="jsd", beta=beta, temperature=temperature)
    out = step_losses(logits, labels, terms=[term], rule="best", class_dim=-1, granularity="batch")
    teacher = int(out.teacher)
    student = 1 - teacher
    for reference in _trl():
        expected = reference(logits[student], logits[teacher].detach(), labels, beta=beta, temperature=temperature)
        torch.testing.assert_close(out.terms["kl"][student], expected, rtol=1e-6, atol=1e-9)
        (ours,) = torch.autograd.grad(out.terms["kl"][student], logits[student], retain_graph=True)
        (theirs,) = torch.autograd.grad(expected, logits[student])
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    assert out.terms["kl"][teacher] == 0


@pytest.mark.parametrize("divergence", ["reverse", "jsd"])
def test_divergences_per_position_teacher_and_masks(divergence):
    # per token: each position's teacher gets nothing there, ignored positions give nothing and no NaN
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(2, 5, 7, generator=g, requires_grad=True) for _ in range(3)]
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[1, 3:] = -100
    out = step_losses(logits, labels, terms=[KL(divergence=divergence)], class_dim=-1, granularity="position")
    grads = torch.autograd.grad(out.terms["kl"].sum(), logits)
    for i, grad in enumerate(grads):
        assert (grad[out.teacher == i] == 0).all() and (grad[labels == -100] == 0).all()
        assert torch.isfinite(grad).all()
    reverse = step_losses(logits, labels, terms=[KL(divergence="reverse")], class_dim=-1, granularity="position")
    one = step_losses(logits, labels, terms=[KL(divergence="jsd", beta=1.0)], class_dim=-1, granularity="position")
    torch.testing.assert_close(reverse.terms["kl"], one.terms["kl"])  # beta 1 is the reverse KL


def test_bad_divergence_settings():
    with pytest.raises(ValueError, match=r"Invalid divergence 'js' for the 'kl' term"):
        KL(divergence="js")
    with pytest.raises(ValueError, match=r"Invalid beta value 1.5 .* in \[0, 1\]"):
        KL(divergence="jsd", beta=1.5)


def test_token_operations_keep_the_targets_and_repeat_from_their_seed():
    from competitive import PerturbationPool, token_operations

    pool = PerturbationPool(token_operations(50, mask_token_id=0), p=1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 50, (4, 24), generator=g)
    y = x.clone()
    y[0, :5] = -100
    for index, name in enumerate(pool.names):
        x2, y2 = pool.perturb(index, x, y, seed=7, num_classes=50)
        again, _ = pool.perturb(index, x, y, seed=7, num_classes=50)
        assert torch.equal(y2, y) and torch.equal(x2, again) and not torch.equal(x2, x), name
        if name == "span_mask":
            assert set(x2[x2 != x].tolist()) == {0}
        if name == "local_shuffle":  # every window of 4 holds the same tokens, maybe in another order
            assert torch.equal(x2.view(4, 6, 4).sort(-1).values, x.view(4, 6, 4).sort(-1).values)
        if name == "replace":
            assert 0 < (x2 != x).float().mean() < 0.3


def test_a_token_pool_trains_two_lms_and_checks_at_the_first_step():
    from competitive import PerturbationPool, token_operations

    torch.manual_seed(0)
    models = [TinyLM(), TinyLM(width=12)]
    pool = PerturbationPool(token_operations(11, mask_token_id=0), p=1.0)
    group = _group(models, class_dim=-1, shift_targets=True, granularity="position", perturbation=pool)
    seen = set()
    for _ in range(8):
        ids = torch.randint(0, 11, (4, 9))
        result = group.step((ids, ids))
        seen.add(result.perturbation)
        assert torch.isfinite(result.loss).all() and result.teacher.shape == (4, 8)
    assert seen == {"replace", "span_mask", "local_shuffle"}
    with pytest.raises(ValueError, match=r"Invalid mask_token_id 11"):
        token_operations(11, mask_token_id=11)
