"""The contract of a knowledge term: what one member learns from its peers, given ``W``.

A term is a pure function of the step's outputs and the rule's matrix ``W`` (``W[..., i, j]`` = how
much member ``i`` learns from member ``j``) that returns one loss per member, ``[N]``. It reads the
rows of ``W`` for what a member learns as a student and, where it has a teacher side, the columns
for what a member does as a teacher. Learnable parts (adapters, projection heads) are submodules of
the term, created by :meth:`Term.build` when the group is built, and each belongs to the member
whose loss trains it (:meth:`Term.member_parameters`).

To add a term: subclass :class:`Term`, set ``needs``, implement ``forward`` (and ``build`` /
``member_parameters`` if it learns), and register it with :func:`register_term`, so a group can
name it in ``terms=["my_term"]`` (or pass an instance). What a term reads, :class:`StepOutputs`,
and the helpers that weight by ``W`` live with the step math in :mod:`competitive.losses`.
"""

from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from .._validation import check_real
from ..losses import StepOutputs, per_sample, upcast

__all__ = ["TERMS", "StepOutputs", "Term", "per_sample", "register_term", "resolve_terms", "upcast", "weighted"]


def weighted(weights: Tensor, pair: Tensor) -> Tensor:
    """``sum_j W[b, i, j] * pair[i, j, b]``, averaged over ``b``: ``[N]``.

    ``pair`` is ``[N, N, B]`` (member ``i`` towards member ``j``, per sample). A pair with weight
    0 contributes exactly 0 even where its value is NaN or inf, so a member that cannot teach
    never poisons another.
    """
    w = per_sample(weights, pair.shape[-1]).permute(1, 2, 0).to(pair.dtype)  # [N, N, B]
    return torch.where(w > 0, w * pair, 0.0).sum(dim=1).mean(dim=-1)


class Term(nn.Module):
    """Base class of the knowledge terms.

    Args:
        weight (float): the term's weight in each member's loss,
            ``L_i = CE_i + sum_terms weight * term_i``. Default: 1.

    Subclasses set ``name`` (the key of the term in ``StepResult.terms``) and ``needs`` (which of
    ``"features"`` / ``"embeddings"`` the group must capture for it). A term with ``per_position``
    reads ``W`` per row of :class:`StepOutputs` (one per position); the others get it per sample
    (at ``granularity="position"``: the share of a sample's valid positions ``j`` teaches ``i``).
    """

    name: ClassVar[str] = ""
    needs: tuple[str, ...] = ()  # a class attribute; an instance may narrow it (CWD(on='logits'))
    per_position: ClassVar[bool] = False
    reads_logits: bool = True  # False: reads hooked outputs only, so it runs beside the chunked step (chunk_rows)
    # the task losses it serves (competitive.tasks; "callable" for a task_loss of one's own): None, every task
    # if it reads hooked outputs only (reads_logits False), else "ce" alone
    tasks: ClassVar[tuple[str, ...] | None] = None
    in_group: bool = False  # set by the group whose parts it joins: a term belongs to one group

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

    def serves(self, task: str) -> bool:
        """Whether this term has a form for the task loss ``task`` (``"member"``: members' own losses)."""
        return (task == "ce" or not self.reads_logits) if self.tasks is None else task in self.tasks


# every term a group can name in ``terms=[...]``, filled by @register_term
TERMS: dict[str, type[Term]] = {}
"""Every term a group can name in ``terms=[...]``, by name (``"kl"``, ``"feature"``, ``"mcl"``, ``"adm"``,
``"cwd"``, and those registered with :func:`register_term`)."""
T = TypeVar("T", bound=type[Term])


def register_term(name: str) -> Callable[[T], T]:
    """Class decorator: make a :class:`Term` subclass known by ``name`` (its ``name`` attribute too).

    Example:
        >>> import torch
        >>> @register_term("zero")
        ... class Zero(Term):
        ...     def forward(self, outputs, weights):
        ...         return outputs.log_probs.new_zeros(outputs.log_probs.shape[0])
        >>> TERMS["zero"] is Zero and Zero().name
        'zero'
        >>> del TERMS["zero"]
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"Invalid term name {name!r}: please provide an identifier such as 'my_term'.")

    def register(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, Term)):
            raise TypeError(f"@register_term({name!r}) decorates {cls!r}; it must be a subclass of Term.")
        if TERMS.get(name, cls) is not cls:
            raise ValueError(f"A term named {name!r} is already registered ({TERMS[name].__qualname__}).")
        cls.name = name
        TERMS[name] = cls
        return cls

    return register


def resolve_terms(
    terms: Any, feature_hooks: Any, embedding_hooks: Any, settings: dict[str, dict[str, float]] | None = None
) -> list[Term]:
    """The terms a group runs: names (built with ``settings[name]`` as keyword arguments) or instances,
    checked against the hooks. A setting for a term given as an instance, or not given at all, is an
    error: the instance owns its settings."""
    settings = settings or {}
    if terms is None:
        terms = ["kl"] + (["feature"] if feature_hooks is not None else [])
    if isinstance(terms, (str, Term)) or not isinstance(terms, (list, tuple)):
        raise TypeError(f"Invalid terms ({terms!r}): please provide a list of term names or Term instances.")
    built, errors = [], []
    for i, term in enumerate(terms):
        if isinstance(term, Term):
            built.append(term)
        elif isinstance(term, str) and term in TERMS:
            built.append(TERMS[term](**settings.get(term, {})))
        else:
            errors.append(f"terms[{i}]={term!r}")
    if errors:
        raise ValueError(f"Invalid {', '.join(errors)}: known terms are {sorted(TERMS)}, or pass a Term instance.")
    names = [t.name for t in built]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated or "" in names:
        raise ValueError(f"Invalid terms: every term needs a unique, non-empty name; got {names}.")
    for owner, values in settings.items():
        if owner not in terms:
            given = ", ".join(f"{k}={v!r}" for k, v in values.items())
            where = "is an instance that holds its own settings" if owner in names else "is not in terms"
            raise ValueError(f"{given} sets the {owner!r} term, which {where} (terms={names}); set it on the term.")
    _check_hooks(built, feature_hooks, embedding_hooks)
    return built


def _check_hooks(built: list[Term], feature_hooks: Any, embedding_hooks: Any) -> None:
    names = [t.name for t in built]
    needs = {need for term in built for need in term.needs}
    for need, hooks in (("features", feature_hooks), ("embeddings", embedding_hooks)):
        argument = "feature_hooks" if need == "features" else "embedding_hooks"
        users = [t.name for t in built if need in t.needs]
        if need in needs and hooks is None:
            raise ValueError(f"The terms {users} read {need}: please provide {argument}, one per model.")
        if need not in needs and hooks is not None:
            readers = [n for n, t in TERMS.items() if need in t.needs]
            raise ValueError(
                f"{argument} is given, but no term reads {need} (terms={names}). Add one of {readers} to terms, "
                f"or pass {argument}=None."
            )
