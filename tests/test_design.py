"""The shape of the library: settings in the objects they own, the term registry, ``group.parts``
as a module (0.3.0 checkpoints load), no import cycle, and one step through few modules."""

import ast
import io
import sys
import warnings
from pathlib import Path

import pytest
import torch
from reference import tiny_cnn
from torch import nn

import competitive
from competitive import KL, MCL, CompetitiveGroup, FeatureL2, PerturbationPool, Term, register_term
from competitive.terms import TERMS

PACKAGE = Path(competitive.__file__).parent


def _members(widths=(4, 6, 5)):
    models = [tiny_cnn(width=w, classes=5, seed=i, dtype=torch.float32) for i, w in enumerate(widths)]
    return models, [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]


def _batch(k, batch=8):
    g = torch.Generator().manual_seed(k)
    return torch.randn(batch, 3, 6, 6, generator=g), torch.randint(0, 5, (batch,), generator=g)


# -- a term of one's own, by name -------------------------------------------------------------------


def test_a_registered_term_can_be_named_in_terms():
    @register_term("confidence")
    class Confidence(Term):
        """Each student's mean entropy, weighted by how much it learns (a toy term)."""

        def forward(self, outputs, weights):
            entropy = -(outputs.log_probs.exp() * outputs.log_probs).sum(-1).mean(-1)  # [N]
            w = weights if weights.dim() == 2 else weights.mean(0)
            return w.sum(-1) * entropy

    try:
        models, optimizers = _members((4, 4, 4))
        group = CompetitiveGroup(models, optimizers, terms=["kl", "confidence"], warmup_steps=0)
        result = group.step(_batch(0))
        assert isinstance(group.terms["confidence"], Confidence) and Confidence.name == "confidence"
        assert result.terms["confidence"][result.teacher] == 0 and result.terms["confidence"].sum() > 0
        with pytest.raises(ValueError, match=r"A term named 'confidence' is already registered"):
            register_term("confidence")(type("Other", (Term,), {}))
    finally:
        del TERMS["confidence"]
    with pytest.raises(TypeError, match=r"must be a subclass of Term"):
        register_term("nope")(nn.Linear)
    with pytest.raises(ValueError, match=r"Invalid term name 'my term'"):
        register_term("my term")


def test_a_term_instance_belongs_to_one_group():
    models, optimizers = _members((4, 6))
    kl = KL(0.5)
    CompetitiveGroup(models, optimizers, terms=[kl])
    others, other_optimizers = _members((4, 6))
    with pytest.raises(ValueError, match=r"The terms \['kl'\] already belong to another group"):
        CompetitiveGroup(others, other_optimizers, terms=[kl])


@pytest.mark.parametrize("bad", [{"rule": "worst"}, {"terms": ["kl", "fitnet"]}, {"alpha": -1.0}])
def test_a_refused_group_leaves_no_hook_on_the_members(bad):
    models, optimizers = _members((4, 6))
    with pytest.raises(ValueError), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        CompetitiveGroup(models, optimizers, feature_hooks=["1", "1"], **bad)
    assert all(not m[1]._forward_hooks for m in models)


def test_a_refused_group_leaves_the_pool_as_it_was():
    models, optimizers = _members((4, 6))
    pool = PerturbationPool()
    with pytest.raises(ValueError, match="known terms"), pytest.warns(DeprecationWarning):
        CompetitiveGroup(models, optimizers, terms=["kl", "fitnet"], perturbation=pool, perturb_prob=0.5)
    assert pool.p == 0.1


def test_every_terms_parts_have_one_way_in():
    models, optimizers = _members()
    group = CompetitiveGroup(
        models,
        optimizers,
        feature_hooks=["1"] * 3,
        embedding_hooks=["4"] * 3,
        terms=["kl", "feature", "mcl", "adm"],
        example_input=torch.randn(2, 3, 6, 6),
    )
    assert group.terms.names == ["kl", "feature", "mcl", "adm"] and group.parts.terms is group.terms
    assert sorted(group.terms["adm"].adapters) == sorted(group.terms["feature"].adapters) != []
    assert group.adapters is group.terms["feature"].adapters  # the shortcut of 0.3.0
    assert [name for name, _ in group.terms.learnable()] == ["feature", "mcl", "adm"]
    with pytest.raises(KeyError, match=r"No term named 'fitnet'"):
        group.terms["fitnet"]


# -- group.parts: one nn.Module ------------------------------------------------------------------


def _parts_group(**kwargs):
    models, optimizers = _members()
    torch.manual_seed(0)  # the parts' initial draws
    group = CompetitiveGroup(
        models,
        optimizers,
        feature_hooks=["1"] * 3,
        perturbation=PerturbationPool(p=1.0),
        seed=5,
        warmup_steps=0,
        **kwargs,
    )
    return group, models, optimizers


def test_parts_state_dict_holds_terms_counters_and_generator_and_resumes_bitwise():
    group, models, optimizers = _parts_group()
    for k in range(3):
        group.step(_batch(k))
    assert isinstance(group.parts, nn.Module) and not any(m in group.parts.modules() for m in models)
    state = group.parts.state_dict()
    assert "_extra_state" in state and "counters.teacher_count" in state
    assert any(k.startswith("terms.1.adapters.") for k in state)
    buffer = io.BytesIO()
    torch.save(
        {"parts": state, "models": [m.state_dict() for m in models], "opt": [o.state_dict() for o in optimizers]},
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    twin, twin_models, twin_optimizers = _parts_group()  # parts not built yet (no example_input)
    assert twin.shapes is None
    twin.parts.load_state_dict(saved["parts"])  # builds them first, then loads
    for m, s in zip(twin_models, saved["models"]):
        m.load_state_dict(s)
    for o, s in zip(twin_optimizers, saved["opt"]):
        o.load_state_dict(s)
    assert twin.stats == group.stats
    for k in range(3, 6):
        a, b = group.step(_batch(k)), twin.step(_batch(k))
        assert torch.equal(a.loss, b.loss) and a.perturbed == b.perturbed and a.perturbation == b.perturbation


def test_parts_follow_to():
    group, _, _ = _parts_group(example_input=torch.randn(2, 3, 6, 6))
    group.parts.to(torch.float64)
    assert group.parts.counters.teacher_count.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in group.terms.parameters())
    assert group.parts.generator.device.type == "cpu"  # the draws never move to a device


def test_a_checkpoint_written_by_0_3_0_loads():
    """``tests/data/group-0.3.0.pt`` was written by competitive 0.3.0: three ``tiny`` members
    (Conv2d(3, w, 3, padding=1), ReLU, AdaptiveAvgPool2d(2), Flatten, Linear(4w, 5), w = 4, 6, 5;
    ``torch.manual_seed(0)``), SGD(lr=0.05, momentum=0.9), ``feature_hooks=["1"] * 3``,
    ``embedding_hooks=["4"] * 3``, ``terms=["kl", "feature", MCL(dim=8), "adm"]``,
    ``PerturbationPool()`` (every step perturbed in 0.3.0), ``seed=3``, ``warmup_steps=2``, four
    steps on ``randn(8, 3, 6, 6)`` batches from ``Generator().manual_seed(1)``."""
    saved = torch.load(Path(__file__).parent / "data" / "group-0.3.0.pt", weights_only=False)
    assert saved["version"] == "0.3.0"
    torch.manual_seed(0)
    models = [
        nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * w, 5)
        )
        for w in (4, 6, 5)
    ]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    group = CompetitiveGroup(
        models,
        optimizers,
        feature_hooks=["1"] * 3,
        embedding_hooks=["4"] * 3,
        terms=["kl", "feature", MCL(dim=8), "adm"],
        perturbation=PerturbationPool(p=1.0),
        warmup_steps=2,
    )
    group.load_state_dict(saved["state"])
    assert group.stats["steps"] == 4 and group.stats["teacher_count"] == [2.0, 1.0, 1.0]
    assert group.stats["perturbed_count"] == [1, 0, 3]
    for key, value in saved["state"]["terms"].items():
        assert torch.equal(group.terms.state_dict()[key], value)
    assert torch.equal(group.generator.get_state(), saved["state"]["generator"])
    assert group.state_dict().keys() == saved["state"].keys()
    result = group.step(_batch(0))
    assert torch.isfinite(result.loss).all() and group.steps == 5


# -- deprecated group settings -------------------------------------------------------------------


def test_deprecated_settings_warn_forward_and_read_back():
    models, optimizers = _members((4, 4, 4))
    with pytest.warns(DeprecationWarning) as caught:
        group = CompetitiveGroup(models, optimizers, alpha=0.5, temperature=4.0)
    messages = [str(w.message) for w in caught]
    assert any(
        "alpha=...) is deprecated: the 'kl' term owns it; write terms=[KL(0.5, temperature=4)]" in m for m in messages
    )
    assert any("temperature=...) is deprecated" in m for m in messages)
    assert group.terms["kl"].weight == group.alpha == 0.5 and group.temperature == 4.0
    with pytest.raises(AttributeError, match=r"group.alpha is read-only: set group.terms\['kl'\].weight"):
        group.alpha = 1.0
    assert group.beta is None  # no feature term
    with pytest.raises(ValueError, match=r"alpha=0.5 sets the 'kl' term, which terms=\['kl'\] holds as an instance"):
        with pytest.warns(DeprecationWarning):
            CompetitiveGroup(models, optimizers, terms=[KL(2.0)], alpha=0.5)
    with pytest.warns(DeprecationWarning, match="beta"):
        group = CompetitiveGroup(models, optimizers, feature_hooks=["1"] * 3, beta=0.25)
    assert isinstance(group.terms["feature"], FeatureL2) and group.beta == 0.25
    assert group.rule == "best" and group.granularity == "batch" and group.fixed_teacher is None
    with pytest.raises(AttributeError, match=r"group.rule is fixed when the group is built"):
        group.rule = "mutual"  # the step math was built with "best": assigning must not pretend
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['gamma'\]"):
        CompetitiveGroup(models, optimizers, gamma=1.0)


# -- the modules ----------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """The ``competitive`` modules a file imports, at any depth of the file (functions included)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = node.module or ""
            if node.level:
                target = f"{base}.{target}".rstrip(".")
            if target.startswith("competitive"):
                found.add(target.removesuffix(".__init__"))
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("competitive")}
    return found - {module}


def test_no_import_cycle_in_the_package():
    files = {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }
    # a package's __init__ re-exports its modules; an edge to a package stands for its __init__ only
    graph = {name: {t for t in _imports(path) if t in files} for name, path in files.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(trail + [node, nxt])}")
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])
    assert (
        "competitive.terms"
        not in {t.rsplit(".", 1)[0] for t in graph["competitive._validation"]} | graph["competitive._validation"]
    )


def _functions_and_classes(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node


def test_module_class_and_function_sizes():
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().count("\n")
        assert lines <= 300, f"{path.name}: {lines} lines"
        for node in _functions_and_classes(ast.parse(path.read_text())):
            size = node.end_lineno - node.lineno + 1
            limit = 250 if isinstance(node, ast.ClassDef) else 40
            assert size <= limit, f"{path.name}:{node.lineno} {node.name}: {size} lines"
    assert (PACKAGE / "group.py").read_text().count("\n") <= 260


def _visited(group, batch):
    files = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(str(PACKAGE)):
            files.add(str(Path(frame.f_code.co_filename).relative_to(PACKAGE)))

    sys.setprofile(profile)
    try:
        group.step(batch)
    finally:
        sys.setprofile(None)
    return files


@pytest.mark.parametrize("hooks", [None, ["1", "1"]])
def test_one_step_visits_at_most_six_modules(hooks):
    # the default group, and the README's three lines (KL and feature terms on hooked maps)
    models, optimizers = _members((4, 4))
    example = torch.randn(2, 3, 6, 6) if hooks else None  # the parts are built now, not at the first step
    group = CompetitiveGroup(models, optimizers, feature_hooks=hooks, example_input=example)
    first = _visited(group, _batch(0))  # the first step also keeps freed memory
    later = _visited(group, _batch(1))
    assert len(later) <= 6, sorted(later)
    assert later <= first and len(first - later) <= 1, sorted(first - later)  # memory.py, once
