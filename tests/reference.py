"""A slow, obviously correct reference of the paper's equations: plain Python over members (and
samples), one term at a time, with torch's own loss functions."""

import math

import torch
import torch.nn.functional as F


def reference_weights(scores, rule):
    """W as nested lists from a list of Python floats (one teacher per batch or per sample)."""
    n = len(scores)
    key = [s if math.isfinite(s) else math.inf for s in scores]
    finite = [math.isfinite(s) for s in scores]
    w = [[0.0] * n for _ in range(n)]
    if rule == "independent" or not any(finite):
        return w
    if rule == "best":
        teacher = min((key[j], j) for j in range(n) if finite[j])[1]
        for i in range(n):
            if i != teacher:
                w[i][teacher] = 1.0
        return w
    for i in range(n):
        if rule == "better":
            peers = [j for j in range(n) if finite[j] and (key[j] < key[i] or (key[j] == key[i] and j < i))]
        else:  # mutual
            peers = [j for j in range(n) if j != i and finite[j]]
        for j in peers:
            w[i][j] = 1.0 / len(peers)
    return w


def reference_teacher(scores):
    finite = [(s, j) for j, s in enumerate(scores) if math.isfinite(s)]
    return min(finite)[1] if finite else -1


def _ce(z, t):
    return F.cross_entropy(z, t, reduction="none") if t.dim() == 1 else -(t * z.log_softmax(-1)).sum(-1)


def reference_losses(
    logits,
    targets,
    features=None,
    adapters=None,
    *,
    rule="best",
    granularity="batch",
    alpha=1.0,
    beta=1.0,
    temperature=1.0,
):
    """Per-member losses ``L_i = CE_i + alpha * sum_j W_ij KL(p_j||p_i) + beta * sum_j W_ij MSE``.

    ``targets`` is a list with one target per member (indices ``[B]`` or label rows ``[B, C]``).
    Returns a list of per-member scalar losses and the teacher(s).
    """
    n, batch = len(logits), logits[0].shape[0]
    ce = [_ce(z, t) for z, t in zip(logits, targets)]  # per sample
    if granularity == "batch":
        scores = [c.mean().item() for c in ce]
        ws = [reference_weights(scores, rule)] * batch
        teacher = reference_teacher(scores)
    else:
        ws = [reference_weights([c[b].item() for c in ce], rule) for b in range(batch)]
        teacher = [reference_teacher([c[b].item() for c in ce]) for b in range(batch)]
    losses = []
    for i in range(n):
        kl = logits[i].new_zeros(())
        feat = logits[i].new_zeros(())
        for b in range(batch):
            for j in range(n):
                if ws[b][i][j] == 0:
                    continue
                student = (logits[i][b : b + 1] / temperature).log_softmax(-1)
                target = (logits[j][b : b + 1] / temperature).log_softmax(-1).detach()
                kl = kl + ws[b][i][j] * F.kl_div(student, target, log_target=True, reduction="sum")
                if features is not None:
                    f_i = features[i][b : b + 1]
                    if adapters is not None and f"{i}_{j}" in adapters:
                        f_i = adapters[f"{i}_{j}"](f_i)
                    feat = feat + ws[b][i][j] * F.mse_loss(f_i, features[j][b : b + 1].detach())
        losses.append(ce[i].mean() + alpha * temperature**2 * kl / batch + beta * feat / batch)
    return losses, teacher


def one_hot_targets(y, n, num_classes, soft=None):
    """Per-member targets: ``y`` for every member, or label rows ``soft`` for one member."""
    targets = [y] * n
    if soft is not None:
        member, rows = soft
        targets[member] = rows
    return targets


def reference_step(models, optimizers, batch, feature_modules=None, **settings):
    """One iteration done by hand: forward, reference losses, backward per member, step."""
    x, y = batch
    captured = {}
    handles = []
    if feature_modules is not None:
        for i, m in enumerate(feature_modules):
            handles.append(m.register_forward_hook(lambda mod, inp, out, i=i: captured.__setitem__(i, out)))
    logits = [m(x) for m in models]
    for h in handles:
        h.remove()
    features = [captured[i] for i in range(len(models))] if feature_modules is not None else None
    losses, teacher = reference_losses(logits, [y] * len(models), features, **settings)
    for opt in optimizers:
        opt.zero_grad()
    for loss in losses:
        loss.backward(retain_graph=True)
    for opt in optimizers:
        opt.step()
    return losses, teacher


def tiny_cnn(width=4, classes=5, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, width, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(width * 4, classes),
    ).to(dtype)
