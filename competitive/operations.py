"""The operations of a :class:`~competitive.PerturbationPool` (paper §3.2) and how each moves the targets: class
indices ``[B]`` (mixing gives label rows ``[B, C]``) or dense targets ``[B, d1, d2]`` (segmentation maps),
where geometric operations warp the targets with the image: a :class:`Warp` through its own grid, a kornia
module through ``AugmentationSequential(..., data_keys=["input", "mask"])`` (nearest neighbour either way;
pixels the warp brings in are ignored), mixing gives label rows per position ``[B, C, d1, d2]`` (a row of
zeros where a pixel is ignored) and photometric operations leave the targets as they are.
"""

from collections.abc import Callable
from typing import Any, cast

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from kornia.augmentation._2d.mix.base import MixAugmentationBaseV2
from torch import Tensor, nn

from .mixing import CutMix, Mixing, MixUp
from .warps import Affine, ResizedCrop, SaltAndPepper, ThinPlateSpline, Warp, sample

Operation = nn.Module | Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class InUnitRange(nn.Module):
    """Runs an image operation that assumes ``[0, 1]`` pixels on a batch in any normalization.

    Each image is mapped to ``[0, 1]`` by its own minimum and maximum, perturbed, and mapped back,
    so salt becomes the image's maximum and pepper its minimum. Nothing is clamped.
    """

    def __init__(self, op: nn.Module):
        super().__init__()
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        span = (x.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-12)
        perturbed: Tensor = self.op((x - low) / span)
        return low + span * perturbed


def default_operations() -> dict[str, nn.Module]:
    """Every operation the paper names, at settings beyond normal augmentation (paper §3.2). All but
    the two kornia modules (noise, elastic; both draw on the batch's device) are the library's own."""
    return {
        "mixup": MixUp(lam=(0.2, 0.8)),
        "cutmix": CutMix(size=(0.3, 0.7)),
        "gaussian_noise": InUnitRange(K.RandomGaussianNoise(std=0.2, p=1.0)),
        "salt_and_pepper": InUnitRange(SaltAndPepper(amount=(0.05, 0.15))),
        "elastic": K.RandomElasticTransform(kernel_size=(15, 15), sigma=(4.0, 4.0), alpha=(2.0, 2.0), p=1.0),
        "thin_plate_spline": ThinPlateSpline(scale=0.3),
        "affine": Affine(degrees=45.0, translate=(0.2, 0.2), scale=(0.7, 1.3), shear=20.0),
        "resized_crop": ResizedCrop(scale=(0.3, 0.7)),
    }


def kind_of(op: Operation) -> str:
    """``"mix"`` (kornia mixing: images and labels), ``"image"`` (x -> x'), ``"pair"`` ((x, y) -> (x', y'))."""
    if isinstance(op, (MixAugmentationBaseV2, Mixing)):
        return "mix"
    if isinstance(op, (K.base._BasicAugmentationBase, K.AugmentationSequential, InUnitRange, Warp, SaltAndPepper)):
        return "image"
    return "pair"


def soft_labels(y: Tensor, params: Tensor, num_classes: int) -> Tensor:
    # kornia's mixing modules return rows (label, label of the pasted image, lambda)
    params = params.reshape(-1, y.shape[0], 3)  # mixup: [B, 3]; cutmix: [num_mix, B, 3]
    soft = torch.nn.functional.one_hot(y, num_classes).float()
    for mix in params.unbind(0):
        lam = mix[:, 2:3].float()
        pasted = torch.nn.functional.one_hot(mix[:, 1].long(), num_classes).float()
        soft = (1 - lam) * soft + lam * pasted
    return soft


def carries_dense_targets(op: Operation) -> bool:
    """Whether the pool can move dense targets with ``op``: mixing and photometric operations always,
    a geometric kornia module where kornia can warp masks with it (not ``RandomThinPlateSpline``)."""
    if isinstance(op, (InUnitRange, Warp, SaltAndPepper, K.IntensityAugmentationBase2D)) or kind_of(op) != "image":
        return True
    base = K.base._AugmentationBase.apply_transform_mask
    return not isinstance(op, K.base._AugmentationBase) or type(op).apply_transform_mask is not base


def perturb_dense(op: Operation, kind: str, x: Tensor, y: Tensor, num_classes: int, ignore: int) -> tuple[Tensor, Any]:
    """``op`` on images ``x`` with dense targets ``y`` ``[B, H, W]``: ``(x', y')``, ``y'`` class indices
    ``[B, H, W]`` (``ignore`` where ignored or brought in) or label rows ``[B, C, H, W]`` (mixing)."""
    batch = torch.arange(x.shape[0], device=x.device)
    if isinstance(op, (K.RandomMixUpV2, MixUp)):  # the pairs and lambdas come back as the "class" rows
        images, params = op(x, batch)
        pairs = params.reshape(-1, 3).to(x.device)
        lam, pasted = pairs[:, 2].view(-1, 1, *[1] * (y.dim() - 1)).float(), y[pairs[:, 1].long()]
        both = ((y != ignore) & (pasted != ignore)).unsqueeze(1)  # a pixel ignored in either is ignored
        rows = (1 - lam) * dense_rows(y, num_classes, ignore) + lam * dense_rows(pasted, num_classes, ignore)
        return images, rows * both
    if kind == "mix":  # a pasting operation: an extra channel says which sample each pixel comes from
        source = batch.float().view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])
        images, _ = op(torch.cat([x, source], dim=1), batch)
        index = images[:, -1]
        pasted = ((index == index.round()) & (index >= 0) & (index < x.shape[0])).all()
        message = "it blends pixels, so the targets of a pixel cannot be told (only pasting works)"
        if index.device.type != "cpu":
            torch._assert_async(pasted, message)  # checked on the device, without waiting for it
        elif not pasted:
            raise ValueError(message)
        return images[:, :-1], dense_rows(torch.gather(y, 0, index.long()), num_classes, ignore)
    inner = op.op if isinstance(op, InUnitRange) else op
    if isinstance(inner, K.IntensityAugmentationBase2D):
        return cast(nn.Module, op)(x), y
    mask = torch.where(y == ignore, 0, y + 1).unsqueeze(1).to(x.dtype)  # 0: ignored, and what a warp pads
    if isinstance(op, Warp):
        grid = op.grid(x)
        images, warped = sample(x, grid), sample(mask, grid, mode="nearest")
    else:
        images, warped = K.AugmentationSequential(cast(Any, op), data_keys=["input", "mask"])(x, mask)
    warped = warped.squeeze(1).round().long() - 1
    return images, torch.where(warped < 0, ignore, warped)


def dense_rows(y: Tensor, num_classes: int, ignore: int) -> Tensor:
    """One-hot label rows ``[B, C, ...]`` of class indices ``[B, ...]``; a row of zeros where ignored."""
    valid = y != ignore
    return F.one_hot(torch.where(valid, y, 0), num_classes).movedim(-1, 1).float() * valid.unsqueeze(1)


def member_targets(
    y: Tensor, y_p: Tensor, perturbed: int | Tensor, n: int, num_classes: int, ignore: int = -100
) -> Tensor:
    """Per-member targets: the perturbed member's own labels beside everyone else's ``y``; label rows
    ``[N, B, C, ...]`` (class dimension 1, as ``F.cross_entropy``) when it got label rows. ``perturbed``: an
    index, or a one-element tensor on the device (a CUDA graph's step: no host read)."""
    if y_p.dim() == y.dim():  # new class indices (e.g. a permuted batch, a warped map)
        targets = y.expand(n, *y.shape).clone()
        return _put(targets, perturbed, y_p)
    # mixing: member `perturbed` learns from soft labels, the rest from y
    if y.dim() == 1:
        targets = torch.nn.functional.one_hot(y, num_classes).float().expand(n, -1, -1).clone()
    else:
        targets = dense_rows(y, num_classes, ignore).expand(n, *[-1] * (y.dim() + 1)).clone()
    return _put(targets, perturbed, y_p.to(torch.float32))


def _put(targets: Tensor, perturbed: int | Tensor, value: Tensor) -> Tensor:
    if isinstance(perturbed, Tensor):
        return targets.index_copy_(0, perturbed.view(1), value.unsqueeze(0).to(targets.dtype))
    targets[perturbed] = value
    return targets


class TokenReplace:
    """Each token replaced by a uniformly random id with probability ``rate``, drawn per call from
    ``rates``; the targets stay the clean tokens."""

    def __init__(self, vocab_size: int, rates: tuple[float, float] = (0.05, 0.25)):
        self.vocab_size, self.rates = vocab_size, rates

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        rate = float(torch.empty(()).uniform_(*self.rates))  # on the CPU: nothing is read back from a GPU
        replace = torch.rand(x.shape, device=x.device) < rate
        return torch.where(replace, torch.randint(0, self.vocab_size, x.shape, device=x.device), x), y


class SpanMask:
    """Spans of ``lengths`` tokens (about ``share`` of the tokens) replaced by ``mask_token_id``."""

    def __init__(self, mask_token_id: int, share: float = 0.15, lengths: tuple[int, int] = (2, 6)):
        self.mask_token_id, self.share, self.lengths = mask_token_id, share, lengths

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        position = torch.arange(x.shape[1], device=x.device)
        starts = torch.rand(x.shape, device=x.device) < self.share / (sum(self.lengths) / 2)
        lengths = torch.randint(self.lengths[0], self.lengths[1] + 1, x.shape, device=x.device)
        ends = torch.where(starts, position + lengths, 0)  # a span covers start <= t < end
        masked = ends.cummax(dim=1).values > position
        return torch.where(masked, self.mask_token_id, x), y


class LocalShuffle:
    """The tokens of each window of ``window`` positions shuffled with probability ``p``."""

    def __init__(self, window: int = 4, p: float = 0.5):
        self.window, self.p = window, p

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        batch, length = x.shape[0], x.shape[1] - x.shape[1] % self.window
        windows = x[:, :length].reshape(batch, -1, self.window)
        keys = torch.rand(windows.shape, device=x.device)
        keep = torch.rand(windows.shape[:2], device=x.device) >= self.p  # these windows keep their order
        keys = torch.where(keep.unsqueeze(-1), torch.arange(self.window, device=x.device).float(), keys)
        shuffled = windows.gather(-1, keys.argsort(dim=-1)).reshape(batch, length)
        return torch.cat([shuffled, x[:, length:]], dim=1), y


def token_operations(vocab_size: int, mask_token_id: int | None = None) -> dict[str, Operation]:
    """Perturbations of token ids ``[B, T]`` for a :class:`~competitive.PerturbationPool`: random token
    replacement (a rate from 5 to 25 % drawn per step), span masking when ``mask_token_id`` is given
    (about 15 % of the tokens, in spans of 2-6), and local shuffles (windows of 4 tokens, each shuffled
    with probability 0.5). The targets stay the clean tokens, so the perturbed member learns to denoise,
    and ignored targets stay ignored.

    Example:
        >>> ops = token_operations(256, mask_token_id=0)
        >>> sorted(ops)
        ['local_shuffle', 'replace', 'span_mask']
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"Invalid vocab_size {vocab_size!r}. Please provide the vocabulary size, an int >= 2.")
    if mask_token_id is not None and not (isinstance(mask_token_id, int) and 0 <= mask_token_id < vocab_size):
        raise ValueError(f"Invalid mask_token_id {mask_token_id!r}. Please provide an id in [0, {vocab_size}) or None.")
    ops: dict[str, Operation] = {"replace": TokenReplace(vocab_size)}
    if mask_token_id is not None:
        ops["span_mask"] = SpanMask(mask_token_id)
    ops["local_shuffle"] = LocalShuffle()
    return ops


def draws_on(op: Operation, x: Tensor) -> None:
    """Kornia draws an operation's parameters on the CPU unless told otherwise, and a step on a GPU then
    waits for their copy: draw them on ``x``'s device (kornia's ``set_rng_device_and_dtype``)."""
    if isinstance(op, nn.Module):
        for module in op.modules():
            if isinstance(module, K.base._BasicAugmentationBase) and module.device != x.device:
                module.set_rng_device_and_dtype(x.device, torch.float32)
