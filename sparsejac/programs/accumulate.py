"""Orders of accumulation: the program's Jacobian contracted from its steps' own Jacobians in
an order other than the one the trace runs in (docs/how-it-works.md, "## 8. Order of
accumulation").

Forward accumulation is the trace itself: every rule composes its operation with the terms of
its inputs, so each intermediate carries its Jacobian with respect to the argument, as wide as
the part of the argument it depends on. With :attr:`Tracer.steps
<sparsejac.programs.tracer.Tracer.steps>` set, the tracer instead keeps each step's own
Jacobian (the rule applied to the identity on each of its inputs) and gives the step's result
the identity on itself. :func:`reverse` then contracts them from the outputs back: each
tensor's adjoint term, as wide as the part of the output that depends on it, is joined
(:func:`~sparsejac.programs.terms.join`) with the Jacobian of every step that read it. Narrow
outputs (a classifier's logits, a pooled head, a loss) make narrow adjoints.

:func:`choose` picks the order from the sizes: the driver (:mod:`~sparsejac.programs.collect`)
calls it, and this module imports only the terms.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import ArgumentError, ArgumentTypeError
from . import terms as T

MODES = ("auto", "forward", "reverse")


def mode_of(mode: Any, prefix: str) -> str:
    """``mode`` checked: one of :data:`MODES`."""
    if not isinstance(mode, str):
        raise ArgumentTypeError(f"{prefix}mode must be one of {MODES}, got {type(mode).__name__}")
    if mode not in MODES:
        raise ArgumentError(f"{prefix}mode must be one of {MODES}, got {mode!r}")
    return mode


def _is_step(key: Any) -> bool:
    return isinstance(key, tuple) and len(key) == 2 and key[0] == "step"


def forward(steps: dict, seeds: Sequence[dict], labels: T.Labels) -> dict:
    """:func:`reverse`'s result, contracted from the arguments forward: each step's Jacobian
    joined with those of the tensors it read (the trace's own order, over recorded steps)."""
    wanted = {key for seed in seeds for key in seed}
    last: dict[Any, int] = {}
    for n, key in enumerate(steps):
        for source in steps[key]:
            last[source] = n
    below: dict[Any, dict] = {}
    for n, key in enumerate(list(steps)):
        local = steps.pop(key)
        acc: dict[Any, list[T.Term]] = {}
        for source, outer in local.items():
            if not _is_step(source):  # an argument: its Jacobian is the identity
                acc.setdefault(source, []).extend(outer)
                continue
            for leaf, inner in below.get(source, {}).items():
                acc.setdefault(leaf, []).extend(
                    _joined(o, t, labels) for o in outer for t in inner)
            if last[source] == n and source not in wanted:
                below.pop(source, None)
        below[key] = {leaf: T.merge(ts, labels) for leaf, ts in acc.items()}
        del local, acc
    found: dict[Any, dict[int, list[T.Term]]] = {}
    for i, seed in enumerate(seeds):
        for key, terms in seed.items():
            for leaf, ts in (below.get(key, {}) if _is_step(key) else {key: terms}).items():
                per = found.setdefault(leaf, {})
                per[i] = T.merge(per.get(i, []) + list(ts), labels)
    return found


def reverse(steps: dict, seeds: Sequence[dict], labels: T.Labels) -> dict:
    """The Jacobians of the outputs with respect to each argument leaf: ``{leaf key: {output
    index: terms}}``. ``seeds``: each output's own terms (the identity on its step, or on an
    argument it returns as it is); ``steps``: the recorded steps, in the order they ran (one
    that runs after all it reads), consumed as the sweep passes them."""
    adjoint: dict[Any, dict[int, list[T.Term]]] = {}
    for i, seed in enumerate(seeds):
        for key, terms in seed.items():
            adjoint.setdefault(key, {}).setdefault(i, []).extend(terms)
    for key in reversed(list(steps)):
        local = steps.pop(key)
        above = adjoint.pop(key, None)
        if above is None:  # no output depends on this step
            continue
        for source, inner in local.items():
            into = adjoint.setdefault(source, {})
            for i, outer in above.items():
                joined = [_joined(o, t, labels) for o in outer for t in inner]
                into[i] = T.merge(into.get(i, []) + joined, labels)
        del above, local
    return adjoint


def _joined(outer: T.Term, inner: T.Term, labels: T.Labels) -> T.Term:
    """``outer`` after ``inner``, its entries on one input entry summed; the guard counts what
    it holds for as long as it lives (as the tracer counts the terms it records)."""
    term = T.collapse(T.join(outer, inner, labels), labels)
    labels.ledger.track_all(term.held())
    return term


def choose(mode: str, arg_entries: int, out_entries: int) -> str:
    """The order to accumulate in: ``mode`` itself unless it is ``"auto"``; then reverse where
    the outputs have fewer entries than the differentiated arguments (each adjoint is then
    narrower than the forward terms it replaces), else forward."""
    if mode != "auto":
        return mode
    return "reverse" if out_entries < arg_entries else "forward"
