"""Every registered operation on torch's own OpInfo samples: the zero-size and 0-dim inputs of
each, and a few small ordinary ones, against torch's Jacobian in float64.

A sample passes when :func:`sparsejac.jacobian_of` gives torch's Jacobian (an empty one where
the input or the output has no entries) or refuses it with the package's own error; a raw
``ZeroDivisionError``, ``IndexError``, ``TypeError`` or ``RuntimeError`` fails it.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")  # torch's test helpers import it

from sparsejac.programs import RULES  # noqa: E402

from opinfo import differentiable_entries, entry_id, rule_name, verdicts  # noqa: E402

ENTRIES = [op for op in differentiable_entries() if rule_name(op, RULES) is not None]


@pytest.mark.parametrize("op", ENTRIES, ids=entry_id)
def test_opinfo_samples(op):
    seen = list(verdicts(op))
    if not seen:
        pytest.skip("no sample checked: none torch can run and differentiate with a floating "
                    "tensor in and out")
    bad = [v for v in seen if v[1] in ("wrong", "crash")]
    assert not bad, bad
