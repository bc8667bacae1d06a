"""``GroupParts``: the group's own state as one ``nn.Module``.

The terms with their learnable parts (adapters, projection heads), the counters (buffers) and the
perturbation generator's state with the shapes the parts were built for (extra state), so
``.to()``, ``state_dict()`` and a trainer's checkpointing handle them as any module. The members
stay out of it: they are the user's modules, with their own optimizers.
"""

from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from torch import nn

from . import _validation as check
from .distributed import share_parameters
from .stats import GroupStats
from .terms import Term

Shapes = dict[str, list[tuple[int, ...]]]


class TermList(nn.ModuleList):
    """The knowledge terms in order (``terms[0]``); ``terms["adm"]`` finds one by name."""

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            term = self.get(key)
            if term is None:
                raise KeyError(f"No term named {key!r}; this group's terms are {self.names}.")
            return term
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        return key in self.names if isinstance(key, str) else any(key is term for term in self)

    def terms(self) -> list[Term]:
        """The terms, typed (iterating the list itself gives the same modules)."""
        return [cast(Term, term) for term in self]

    def get(self, name: str) -> Term | None:
        """The term named ``name``, or None."""
        return next((term for term in self.terms() if term.name == name), None)

    @property
    def names(self) -> list[str]:
        return [term.name for term in self.terms()]

    def learnable(self) -> Iterator[tuple[str, Term]]:
        """``(term name, module)`` for every term that holds parameters (its adapters, its heads)."""
        for term in self.terms():
            if any(True for _ in term.parameters()):
                yield term.name, term


class GroupParts(nn.Module):
    """The terms (``parts.terms``), the counters (``parts.counters``) and the generator's state.

    Args:
        terms (sequence of Term): the group's knowledge terms.
        members (Members): the group's members, whose optimizers train the terms' parts (held as a
            plain reference: they are not part of this module or its state).
        seed (int): seed of the CPU ``torch.Generator`` the perturbation draws come from.
        process_group (ProcessGroup, optional): ranks on which the parts stay identical.
        example_input (Tensor, optional): inputs to size the parts with now (see ``Members.known_shapes``).

    Its state dict holds ``terms.*``, ``counters.*`` and ``_extra_state`` (the generator's state and
    the shapes the terms' parts were built for). Loading it before the parts exist builds them
    first, from those shapes.
    """

    def __init__(
        self, terms: Sequence[Term], members: Any, seed: int, process_group: Any = None, example_input: Any = None
    ):
        super().__init__()
        taken = [term.name for term in terms if term.in_group]
        if taken:
            raise ValueError(
                f"The terms {taken} already belong to another group (their parts train there); give each "
                "group its own Term instances."
            )
        self.terms = TermList(terms)
        self.counters = GroupStats(len(members))
        self.generator = torch.Generator()  # on the CPU, whatever .to() moves: draws never sync a device
        self.generator.manual_seed(seed)
        self.shapes: Shapes | None = None
        self.members, self.process_group = members, process_group  # a plain reference, not in the state
        self.to(members.device)
        members.needs = sorted({need for term in terms for need in term.needs})
        if (shapes := members.known_shapes(example_input)) is not None:
            self.build(shapes)  # else at the start of the first step, from its batch
        for term in terms:
            term.in_group = True

    def build(self, shapes: Shapes) -> None:
        """Create the terms' learnable parts for the members' ``shapes`` and hand each to the optimizer
        of the member whose loss trains it."""
        members, terms = self.members, self.terms.terms()
        check.check_no_scheduler_yet(members.optimizers, terms, shapes)
        for term in terms:
            if term.needs:
                term.build({need: shapes[need] for need in term.needs})
        self.to(members.device)
        # what must keep its shape from now on: the inputs of terms that hold learnable parts
        members.fixed = {need for t in terms if any(True for _ in t.parameters()) for need in t.needs}
        share_parameters(self.terms, self.process_group)  # identical on every rank, gradients averaged
        owned = [[p for term in terms for p in term.member_parameters(i)] for i in range(len(members))]
        check.check_owners(members.optimizers, owned)
        for optimizer, params in zip(members.optimizers, owned):
            if params:  # the part is trained by this member's loss, so this member's optimizer steps it
                optimizer.add_param_group({"params": params})
        members.shapes = self.shapes = shapes

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "shapes": self.shapes}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # called before the terms load their own state, so the parts they save exist by then
        if self.shapes is None and state["shapes"] is not None:
            self.build({k: [tuple(s) for s in v] for k, v in state["shapes"].items()})
        self.generator.set_state(state["generator"])

    def group_state(self, with_members: bool = False) -> dict[str, Any]:
        """The entries of ``CompetitiveGroup.state_dict()`` this module holds (the keys of 0.3.0); with
        ``with_members``, the members' and their optimizers' states too: the group's whole state dict."""
        state = {
            "shapes": self.shapes,
            "terms": self.terms.state_dict(),
            "counters": self.counters.state_dict(),
            "generator": self.generator.get_state(),
        }
        if not with_members:
            return state
        models = [m.state_dict() for m in self.members.models]
        optimizers = [None if o is None else o.state_dict() for o in self.members.optimizers]
        return {"models": models, "optimizers": optimizers, **state}

    def load_group_state(self, state: dict[str, Any], with_members: bool = False) -> None:
        """Load :meth:`group_state` (or a whole group's state dict, 0.3.0's included); with ``with_members``
        the members and their optimizers too (checked first: nothing moves on a bad state dict)."""
        if with_members:
            check.check_state_dict(state, len(self.members))
        entries = {"_extra_state": {"generator": state["generator"], "shapes": state["shapes"]}}
        entries |= {f"terms.{k}": v for k, v in state["terms"].items()}
        entries |= {f"counters.{k}": v for k, v in state["counters"].items()}
        self.load_state_dict(entries)  # builds the parts first where they do not exist yet
        if with_members:
            for model, saved in zip(self.members.models, state["models"]):
                model.load_state_dict(saved)
            for optimizer, saved in zip(self.members.optimizers, state["optimizers"]):
                if optimizer is not None:
                    optimizer.load_state_dict(saved)
