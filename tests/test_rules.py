"""One test over the whole registry: every registered spelling, on random arguments and on
strided and broadcast copies of them, against torch.func.jacrev in float64.

Cases live in tests/cases/*.py (one module per rule group); a registered name that no case
exercises fails :func:`test_every_registered_name_has_a_case`.
"""

from __future__ import annotations

import importlib
import pkgutil

import numpy as np
import pytest
import torch

import sparsejac
from sparsejac.programs import RULES

import cases as cases_pkg

CASES = []
for info in pkgutil.iter_modules(cases_pkg.__path__):
    module = importlib.import_module(f"{cases_pkg.__name__}.{info.name}")
    CASES.extend(getattr(module, "CASES", []))

RTOL, ATOL = 1e-9, 1e-11


def _dense(J):
    return J.todense() if hasattr(J, "todense") else J


def _compare(got, ref):
    from torch.utils import _pytree as pytree

    g_leaves, g_spec = pytree.tree_flatten(got, is_leaf=lambda x: hasattr(x, "todense"))
    r_leaves, r_spec = pytree.tree_flatten(ref)
    assert len(g_leaves) == len(r_leaves)
    for g, r in zip(g_leaves, r_leaves):
        r = r.detach().numpy()
        assert g.shape == r.shape
        np.testing.assert_allclose(_dense(g), r, rtol=RTOL, atol=ATOL)
    return g_leaves, r_leaves


def _variants(args):
    """The arguments as given, as non-contiguous copies (same values), and with each tensor of
    rank >= 1 replaced by a broadcast view of its first slice (new values, zero strides)."""
    yield "plain", args

    def strided(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() >= 2:
            return a.transpose(0, 1).contiguous().transpose(0, 1)
        return a

    def broadcast(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() >= 1 and a.shape[0] > 1:
            return a[:1].expand(a.shape)
        return a

    yield "strided", tuple(strided(a) for a in args)
    yield "broadcast", tuple(broadcast(a) for a in args)


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rule_against_jacrev(case, mode):
    """Every order of accumulation: the rule applied to the argument's terms (forward), or to
    the identity on its own inputs, its Jacobian then joined from either side."""
    variants = list(_variants(case.args)) if case.variants else [("plain", case.args)]
    for name, args in variants:
        ref = torch.func.jacrev(case.fn, argnums=case.wrt)(*args)
        got = sparsejac.jacobian_of(case.fn, *args, wrt=case.wrt, mode=mode)
        g, r = _compare(got, ref)
        if case.exact_nnz and name == "plain":
            for gi, ri in zip(g, r):
                assert gi.nnz == np.count_nonzero(ri.detach().numpy())


def test_every_registered_name_has_a_case():
    covered = {c.rule for c in CASES}
    missing = sorted(n for n, r in RULES.items()
                     if r.kind in ("rule", "decomposition") and n not in covered)
    assert not missing, f"registered spellings without a test case: {missing}"


def test_every_case_names_a_registered_spelling():
    unknown = sorted({c.rule for c in CASES} - set(RULES))
    assert not unknown, f"cases naming no registered spelling: {unknown}"


def test_the_docs_operation_table_is_current():
    """docs/operations.md is generated from the registry (python -m sparsejac.programs.table)."""
    from pathlib import Path

    from sparsejac.programs.table import table

    path = Path(__file__).resolve().parents[1] / "docs" / "operations.md"
    assert path.read_text() == table(), "regenerate: python -m sparsejac.programs.table > " \
                                        "docs/operations.md"


def test_every_rule_states_its_second_order():
    """hessian_of follows a rule only if it says its second order (or is a decomposition)."""
    missing = sorted(n for n, r in RULES.items()
                     if r.kind == "rule" and r.second is None and r.expand is None)
    # refused by name in hessian_of: prod (tests/test_hessians.py), and the batched
    # linear algebra whose blocks are read from torch's first derivative (tests/test_coverage.py)
    allowed = {"prod"} | {n for n, r in RULES.items() if r.group == "blocks"}
    assert set(missing) <= allowed, f"rules with no second-order information: {missing}"
