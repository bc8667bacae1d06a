import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import reference_teacher, reference_weights

from competitive import distillation_weights, teacher_index
from competitive.selection import RULES

# CE values with many exact ties (drawn from a small set) and non-finite entries
ce_value = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0]),
    st.floats(0, 10, allow_nan=False, width=32),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)
ce_lists = st.lists(ce_value, min_size=2, max_size=8)


@given(ce_lists)
def test_teacher_is_first_argmin_over_finite_values(values):
    ce = torch.tensor(values, dtype=torch.float64)
    teacher = teacher_index(ce)
    assert teacher.dtype == torch.long and teacher.shape == ()
    assert teacher.item() == reference_teacher(values)
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        assert values[teacher.item()] == min(finite)
        assert values.index(min(finite)) == teacher.item()  # ties: the lowest index


@given(ce_lists, st.sampled_from(RULES))
def test_weights_match_reference(values, rule):
    w = distillation_weights(torch.tensor(values, dtype=torch.float64), rule=rule)
    assert torch.equal(w, torch.tensor(reference_weights(values, rule), dtype=torch.float64))


@given(ce_lists, st.sampled_from(["best", "better"]))
def test_teacher_row_is_zero_and_student_rows_sum_to_one(values, rule):
    ce = torch.tensor(values)
    w = distillation_weights(ce, rule=rule)
    teacher = teacher_index(ce).item()
    if teacher == -1:
        assert torch.all(w == 0)
        return
    assert torch.all(w[teacher] == 0)
    students = [i for i in range(len(values)) if i != teacher]
    assert torch.allclose(w[students].sum(dim=1), torch.ones(len(students)))
    # a non-finite member never teaches
    for j, v in enumerate(values):
        if not math.isfinite(v):
            assert torch.all(w[:, j] == 0)
    if rule == "best":
        assert torch.all((w > 0).sum(dim=1) <= 1) and torch.all(w[students, teacher] == 1)


@given(ce_lists)
def test_mutual_rows_average_over_finite_peers(values):
    w = distillation_weights(torch.tensor(values), rule="mutual")
    finite = [math.isfinite(v) for v in values]
    for i in range(len(values)):
        peers = sum(finite) - finite[i]
        assert torch.isclose(w[i].sum(), torch.tensor(1.0 if peers else 0.0))
        assert w[i, i] == 0


@given(ce_lists, st.sampled_from(RULES), st.randoms(use_true_random=False))
def test_permuting_members_permutes_the_result(values, rule, rnd):
    n = len(values)
    # distinct values so that the tie-break by index does not depend on the order
    values = [v if not math.isfinite(v) else v + 1e-3 * i for i, v in enumerate(values)]
    if sum(math.isfinite(v) for v in values) < n and rule == "better":
        values = [v if math.isfinite(v) else math.inf for v in values]
    perm = list(range(n))
    rnd.shuffle(perm)
    ce = torch.tensor(values, dtype=torch.float64)
    p = torch.tensor(perm)
    w, w_perm = distillation_weights(ce, rule=rule), distillation_weights(ce[p], rule=rule)
    t, t_perm = teacher_index(ce), teacher_index(ce[p])
    if rule == "better" and sum(not math.isfinite(v) for v in values) > 0:
        # non-finite members tie among themselves; rows of finite members still permute
        finite = torch.isfinite(ce[p])
        assert torch.equal(w_perm[finite], w[p][:, p][finite])
    else:
        assert torch.equal(w_perm, w[p][:, p])
    if t.item() >= 0:
        assert perm[t_perm.item()] == t.item()


@given(st.lists(st.lists(ce_value, min_size=3, max_size=3), min_size=1, max_size=6), st.sampled_from(RULES))
def test_per_sample_selection_is_one_selection_per_row(rows, rule):
    ce = torch.tensor(rows, dtype=torch.float64)  # [B, N]
    w = distillation_weights(ce, rule=rule)
    t = teacher_index(ce)
    assert w.shape == (len(rows), 3, 3) and t.shape == (len(rows),)
    for b, row in enumerate(rows):
        assert torch.equal(w[b], torch.tensor(reference_weights(row, rule), dtype=torch.float64))
        assert t[b].item() == reference_teacher(row)


def test_unknown_rule_is_rejected():
    with pytest.raises(ValueError, match=r"Invalid rule 'worst'.*'best', 'better', 'mutual', 'independent'"):
        distillation_weights(torch.zeros(2), rule="worst")


@pytest.mark.parametrize("rule", RULES)
def test_selection_compiles_without_graph_breaks(rule):
    # dynamo's capture is what fullgraph checks; aot_eager runs it without inductor's C++ build
    select = lambda ce: (distillation_weights(ce, rule=rule), teacher_index(ce))  # noqa: E731
    fn = torch.compile(select, fullgraph=True, backend="aot_eager")
    ce = torch.tensor([[0.3, 0.1, 0.1, math.nan], [math.inf, 2.0, 1.0, 1.0]])
    w, t = fn(ce)
    assert torch.equal(w, distillation_weights(ce, rule=rule))
    assert torch.equal(t, teacher_index(ce))
