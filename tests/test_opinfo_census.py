"""The OpInfo entries with no rule of their own (followed through torch's reference
implementations, or decompositions written here): none gives a Jacobian unlike torch's, none
raises anything but the package's own refusal. The entries with rules are checked in
tests/test_opinfo_edges.py; benchmarks/opinfo_census.py counts both."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")  # torch's test helpers import it

from opinfo import differentiable_entries, entry_id, rule_name, verdicts  # noqa: E402
from sparsejac.programs import RULES  # noqa: E402

ENTRIES = [op for op in differentiable_entries() if rule_name(op, RULES) is None]


@pytest.mark.parametrize("op", ENTRIES, ids=entry_id)
def test_an_entry_without_a_rule_is_exact_or_refused(op):
    bad = [(where, verdict, detail) for where, verdict, detail in verdicts(op)
           if verdict in ("wrong", "crash")]
    assert not bad, bad


def test_the_fallback_reaches_entries_that_had_no_rule():
    exact = {entry_id(op) for op in ENTRIES
             if (v := [verdict for _, verdict, _ in verdicts(op)]) and set(v) == {"exact"}}
    # (linalg.cross is followed through its reference too, but the entry now reads as having a
    # rule: tests/opinfo.rule_name finds torch.cross's by the name's last part)
    assert {"addcmul", "clamp_min", "linalg.vecdot", "logaddexp"} <= exact
