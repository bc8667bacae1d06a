"""The contract of a knowledge term: what one member learns from its peers, given ``W``.

A term is a pure function of the step's outputs and the rule's matrix ``W`` (``W[..., i, j]`` = how
much member ``i`` learns from member ``j``) that returns one loss per member, ``[N]``. It reads the
rows of ``W`` for what a member learns as a student and, where it has a teacher side, the columns
for what a member does as a teacher. Learnable parts (adapters, projection heads) are submodules of
the term, created by :meth:`Term.build` when the group is built, and each belongs to the member
whose loss trains it (:meth:`Term.member_parameters`).

To add a term: subclass :class:`Term`, set ``name`` and ``needs``, implement ``forward`` (and
``build`` / ``member_parameters`` if it learns), and pass an instance in ``terms=[...]``.
"""

from collections.abc import Iterator, Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from .._validation import check_real


def upcast(x: Tensor) -> Tensor:
    """``x`` in at least float32, also when the members run in bf16 / fp16 under autocast."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def per_sample(weights: Tensor, batch: int) -> Tensor:
    """``W`` as ``[B, N, N]``: ``[N, N]`` (one teacher per batch) is broadcast over the batch."""
    return weights.expand(batch, -1, -1) if weights.dim() == 2 else weights


def weighted(weights: Tensor, pair: Tensor) -> Tensor:
    """``sum_j W[b, i, j] * pair[i, j, b]``, averaged over ``b``: ``[N]``.

    ``pair`` is ``[N, N, B]`` (member ``i`` towards member ``j``, per sample). A pair with weight
    0 contributes exactly 0 even where its value is NaN or inf, so a member that cannot teach
    never poisons another.
    """
    w = per_sample(weights, pair.shape[-1]).permute(1, 2, 0).to(pair.dtype)  # [N, N, B]
    return torch.where(w > 0, w * pair, 0.0).sum(dim=1).mean(dim=-1)


class StepOutputs(NamedTuple):
    """What the members produced this step, as every term sees it.

    Attributes:
        logits (list of Tensor): ``N`` tensors ``[B, C]``, as the members returned them.
        log_probs (Tensor): ``[N, B, C]`` log-softmax of the logits (at least float32).
        labels (Tensor): ``[N, B]`` the class each member was trained towards per sample (the
            argmax of a mixed label).
        teaches (BoolTensor): ``[N, B]`` where member ``j``'s outputs on sample ``b`` are all finite,
            so it may act as a target; terms mask every other value out of the targets.
        features (list of Tensor or None): the hooked feature maps, ``[B, ...]`` per member.
        embeddings (list of Tensor or None): the hooked embeddings, ``[B, D_i]`` per member.
    """

    logits: Sequence[Tensor]
    log_probs: Tensor
    labels: Tensor
    teaches: Tensor
    features: Sequence[Tensor] | None = None
    embeddings: Sequence[Tensor] | None = None


class Term(nn.Module):
    """Base class of the knowledge terms.

    Args:
        weight (float): the term's weight in each member's loss,
            ``L_i = CE_i + sum_terms weight * term_i``. Default: 1.

    Subclasses set ``name`` (the key of the term in ``StepResult.terms``) and ``needs`` (which of
    ``"features"`` / ``"embeddings"`` the group must capture for it).
    """

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = check_real("weight", weight, owner=self.name or type(self).__name__)

    def build(self, shapes: dict[str, list[tuple[int, ...]]]) -> None:  # noqa: B027
        """Create the learnable parts from the members' shapes (without the batch dim), once.

        ``shapes`` maps each entry of ``needs`` to one shape per member. Default: nothing to build.
        """

    def member_parameters(self, member: int) -> Iterator[nn.Parameter]:
        """The parameters that member ``member``'s loss trains (added to its optimizer)."""
        return iter(())

    def forward(self, outputs: StepOutputs, weights: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight}"
