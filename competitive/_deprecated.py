"""The group's settings that moved to the objects they configure (0.4.0): ``alpha``, ``temperature``
(the ``KL`` term's), ``beta`` (``FeatureL2``'s) and ``perturb_prob`` (the pool's ``p``). Passed to
the group they still work, with a ``DeprecationWarning``, and read back as read-only properties;
and the settings fixed when the group is built (``rule``, ``granularity``, ``fixed_teacher``)."""

import warnings
from typing import Any

from ._validation import check_real, real_scalar
from .perturbation import PerturbationPool
from .terms import Term, resolve_terms

_DEPRECATED = {  # name -> (term name or None for the pool, attribute, what to write instead)
    "alpha": ("kl", "weight", "terms=[KL(0.5, temperature=4)]"),
    "temperature": ("kl", "temperature", "terms=[KL(0.5, temperature=4)]"),
    "beta": ("feature", "weight", 'terms=["kl", FeatureL2(0.5)]'),
    "perturb_prob": (None, "p", "perturbation=PerturbationPool(p=0.25)"),
}


def forward_deprecated(given: dict[str, Any], pool: Any, terms: Any, hooks: tuple[Any, Any]) -> list[Term]:
    """The group's terms (:func:`resolve_terms`), built with the deprecated settings forwarded to them,
    a warning for each; ``perturb_prob`` goes to the pool last, once everything else is checked."""
    unknown = sorted(set(given) - set(_DEPRECATED))
    if unknown:
        raise TypeError(f"CompetitiveGroup got unexpected keyword arguments {unknown}.")
    if pool is not None and not isinstance(pool, PerturbationPool):
        raise TypeError(f"Invalid perturbation ({type(pool).__name__}): please provide a PerturbationPool or None.")
    settings: dict[str, dict[str, float]] = {}
    for name, value in given.items():
        owner, attribute, instead = _DEPRECATED[name]
        who = "the pool" if owner is None else f"the {owner!r} term"
        warnings.warn(
            f"CompetitiveGroup({name}=...) is deprecated: {who} owns it; write {instead}.", DeprecationWarning, 3
        )
        if owner is None:
            _forward_to_pool(value, pool, apply=False)
            continue
        settings.setdefault(owner, {})[attribute] = check_real(name, value, positive=name == "temperature")
        if isinstance(terms, (list, tuple)) and owner not in terms:  # absent, or an instance with its own
            named = [t if isinstance(t, str) else getattr(t, "name", t) for t in terms]
            how = "holds as an instance with its own settings" if owner in named else "does not name"
            raise ValueError(f"{name}={value!r} sets the {owner!r} term, which terms={named} {how}; set it there.")
    if terms is None and hooks[0] is None:
        settings.pop("feature", None)  # beta with the default terms and no feature hooks: harmless, as before
    built = resolve_terms(terms, *hooks, settings)
    if "perturb_prob" in given:
        _forward_to_pool(given["perturb_prob"], pool, apply=True)
    return built


def _forward_to_pool(value: Any, pool: Any, apply: bool) -> None:
    p = real_scalar(value)
    if p is None or not 0 <= p <= 1:
        raise ValueError(f"Invalid perturb_prob value {value!r} provided. Please provide a value in [0,1] range.")
    if pool is None or pool.p_given:
        why = "perturbation is None" if pool is None else f"the pool sets p={pool.p} itself"
        raise ValueError(f"perturb_prob={p} sets the perturbation pool's p, but {why}; set p on the pool.")
    if apply:
        pool.p = p


class Moved:
    """A deprecated group setting, read from the object that owns it now; assigning raises."""

    def __init__(self, owner: str | None, attribute: str):
        self.owner, self.attribute = owner, attribute

    def __set_name__(self, cls: type, name: str) -> None:
        self.name = name

    def __get__(self, group: Any, cls: type | None = None) -> Any:
        if group is None:
            return self
        owner = group.perturbation if self.owner is None else group.parts.terms.get(self.owner)
        return None if owner is None else getattr(owner, self.attribute)

    def __set__(self, group: Any, value: Any) -> None:
        where = "the pool's p" if self.owner is None else f"group.terms[{self.owner!r}].{self.attribute}"
        raise AttributeError(f"group.{self.name} is read-only: set {where} (the object that owns it).")


class Fixed:
    """A setting the group's step math was built with (``rule``, ``granularity``, ``fixed_teacher``):
    readable, and fixed for the group's life (assigning raises rather than doing nothing)."""

    def __set_name__(self, cls: type, name: str) -> None:
        self.name = name

    def __get__(self, group: Any, cls: type | None = None) -> Any:
        return self if group is None else group.loss_fn.keywords[self.name]

    def __set__(self, group: Any, value: Any) -> None:
        raise AttributeError(f"group.{self.name} is fixed when the group is built; build a new group for another.")
