"""Orders of accumulation: the program's Jacobian contracted from its steps' own Jacobians in
the order a cost model picks (docs/how-it-works.md, "## 8. Order of accumulation").

Forward accumulation is the trace itself: every rule composes its operation with the terms of
its inputs, so each intermediate carries its Jacobian with respect to the argument, as wide as
the part of the argument it depends on. With :attr:`Tracer.steps
<sparsejac.programs.tracer.Tracer.steps>` set, the tracer instead keeps each step's own
Jacobian (the rule applied to the identity on each of its inputs) and gives the step's result
the identity on itself. The steps are then contracted (:func:`~sparsejac.programs.terms.join`)
by :func:`cut`: forward over the steps before a point in the program (each step's Jacobian
joined after those of what it read), reverse over those after it (each tensor's adjoint, as
wide as the part of the output that depends on it, joined before the Jacobian of every step
that read it), and the two joined where the later steps read the earlier ones' results. A cut
after the last step is forward accumulation, one before the first is reverse: narrow outputs
(a classifier's logits, a pooled head, a loss) make narrow adjoints.

:func:`plan` picks the order: every step's width in each direction is estimated from the sizes
of its terms (:func:`widths`), and the cost of an order is the entries its terms would hold,
summed over the steps (what the joins' contractions and collapses cost beyond that is not
counted). Only shapes and labels enter it, so a plan's refills choose as its first trace did. The driver
(:mod:`~sparsejac.programs.collect`) calls it; this module imports only the terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import ArgumentError, ArgumentTypeError
from . import terms as T

MODES = ("auto", "forward", "reverse")

# The estimates are upper bounds that can be off by the overlap of paths (:func:`widths`): an
# order other than forward is taken only where it is estimated this many times cheaper, so that
# a near tie (a square MLP, a stencil) stays in the order the rules were first tuned for.
MARGIN = 2.0


def mode_of(mode: Any, prefix: str) -> str:
    """``mode`` checked: one of :data:`MODES`."""
    if not isinstance(mode, str):
        raise ArgumentTypeError(f"{prefix}mode must be one of {MODES}, got {type(mode).__name__}")
    if mode not in MODES:
        raise ArgumentError(f"{prefix}mode must be one of {MODES}, got {mode!r}")
    return mode


def _is_step(key: Any) -> bool:
    return isinstance(key, tuple) and len(key) == 2 and key[0] == "step"


def _joined(outer: T.Term, inner: T.Term, labels: T.Labels) -> T.Term:
    """``outer`` after ``inner``, its entries on one input entry summed; the guard counts what
    it holds for as long as it lives (as the tracer counts the terms it records)."""
    term = T.collapse(T.join(outer, inner, labels), labels)
    labels.ledger.track_all(term.held())
    return term


def _below(steps: dict, wanted: set, labels: T.Labels) -> dict:
    """Forward over ``steps`` (consumed): ``{step key: {argument leaf: terms}}`` for the steps
    in ``wanted`` (the others are dropped once the last step reading them has run)."""
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
                acc.setdefault(leaf, []).extend(_joined(o, t, labels) for o in outer for t in inner)
            if last[source] == n and source not in wanted:
                below.pop(source, None)
        below[key] = {leaf: T.merge(ts, labels) for leaf, ts in acc.items()}
        del local, acc
    return {k: v for k, v in below.items() if k in wanted}


def _adjoints(steps: dict, seeds: Sequence[dict], labels: T.Labels) -> dict:
    """Reverse over ``steps`` (consumed): ``{key: {output index: terms}}`` for every key the
    steps read but do not make (arguments, and steps before them)."""
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


def cut(steps: dict, seeds: Sequence[dict], labels: T.Labels, at: int) -> dict:
    """The Jacobians of the outputs with respect to each argument leaf, ``{leaf: {output index:
    terms}}``: forward over the first ``at`` steps, reverse over the rest (``at = 0``: all in
    reverse; ``at = len(steps)``: all forward), joined where the two meet."""
    keys = list(steps)
    early = {k: steps.pop(k) for k in keys[:at]}
    adjoint = _adjoints(steps, seeds, labels)
    below = _below(early, {k for k in adjoint if _is_step(k)}, labels)
    found: dict[Any, dict[int, list[T.Term]]] = {}
    for key, per_out in adjoint.items():
        for i, outer in per_out.items():
            if not _is_step(key):  # an argument read after the cut: the adjoint is its block
                parts = {key: list(outer)}
            else:
                parts = {leaf: [_joined(o, t, labels) for o in outer for t in inner]
                         for leaf, inner in below.get(key, {}).items()}
            for leaf, ts in parts.items():
                per = found.setdefault(leaf, {})
                per[i] = T.merge(per.get(i, []) + ts, labels)
    return found


@dataclass(frozen=True)
class Order:
    """An order of accumulation: ``name`` ("forward", "reverse" or "cut") and, for a cut, the
    steps accumulated forward (``at``); ``cost``: the model's estimate (entries held)."""

    name: str
    at: int
    cost: float


def widths(steps: dict, seeds: Sequence[dict], labels: T.Labels,
           arg_entries: int, out_entries: int) -> tuple[dict, dict, dict]:
    """``(entries, forward, backward)`` per tensor (step or argument): its entries, and
    estimates of how many argument entries each of them depends on, and how many output
    entries depend on each. A step's Jacobian term of ``nnz`` entries reads ``nnz / entries``
    inputs per output entry and reaches ``nnz / source entries`` per input entry; the widths
    multiply along a path and add over paths (an upper estimate where paths meet again: two
    3x3 windows make 25 inputs, estimated 81), bounded by the argument's (the outputs') size
    shared among the blocks a delta keeps apart: the labels a term's two sides share (a batch)
    split the entries into independent groups, and the fewest groups met along the way bound
    the width."""
    size: dict[Any, int] = {}
    fan: dict[Any, list[tuple[Any, float, float, int]]] = {}
    for key, local in steps.items():
        for source, ts in local.items():
            for t in ts:
                n_out = labels.size([a for ax in t.out for a in ax])
                n_in = labels.size([a for ax in t.inp for a in ax])
                size[key] = n_out
                size.setdefault(source, n_in)
                nnz = t.nnz(labels)
                # (a label under an index map is no delta: a window's offset varies with it)
                shared = ({a for a in t.out_atoms if a not in labels.derived}
                          & {a for a in t.inp_atoms if a not in labels.derived})
                fan.setdefault(key, []).append((source, nnz / max(n_out, 1), nnz / max(n_in, 1),
                                                labels.size(sorted(shared))))
    fwd: dict[Any, float] = {}
    groups: dict[Any, int] = {}
    for key in steps:
        w, g = 0.0, None
        for src, f_in, _, delta in fan.get(key, ()):
            step = _is_step(src)
            w += f_in * (fwd.get(src, 1.0) if step else 1.0)
            d = min(delta, groups.get(src, delta)) if step else delta
            g = d if g is None else min(g, d)
        groups[key] = g or 1
        fwd[key] = min(arg_entries / groups[key], w)
    bwd: dict[Any, float] = {}
    back: dict[Any, int] = {}
    for seed in seeds:
        for key in seed:
            bwd[key] = 1.0
    for key in reversed(list(steps)):
        w = bwd.get(key)
        if w is None:
            continue
        for src, _, f_out, delta in fan.get(key, ()):
            back[src] = min(back.get(src, delta), delta, back.get(key, delta))
            bwd[src] = min(out_entries / back[src], bwd.get(src, 0.0) + f_out * w)
    return size, fwd, bwd


def plan(steps: dict, seeds: Sequence[dict], labels: T.Labels, arg_entries: int,
         out_entries: int, mode: str = "auto") -> Order:
    """The order to contract ``steps`` in: ``mode`` itself where it names one, else the cheapest
    of every cut by the cost model (:func:`widths`): a step accumulated forward holds its
    entries times its forward width, one in reverse its entries times its backward width, and
    each tensor where the two meet the product of both."""
    keys = list(steps)
    size, fwd, bwd = widths(steps, seeds, labels, arg_entries, out_entries)
    index = {k: n for n, k in enumerate(keys)}
    # the last step reading each tensor (a step's result, or an argument); an output is read
    # after every step
    last = {k: len(keys) for seed in seeds for k in seed if k in index}
    for n, k in enumerate(keys):
        for source in steps[k]:
            last[source] = max(last.get(source, 0), n)
    # cost of the steps before and after each cut position, and of the tensors crossing it
    before = [0.0]
    for k in keys:
        before.append(before[-1] + size.get(k, 0) * fwd.get(k, 0.0))
    after = [0.0]
    for k in reversed(keys):
        after.append(after[-1] + size.get(k, 0) * bwd.get(k, 0.0))
    after.reverse()
    # the arguments' own adjoints, formed wherever a step after the cut reads them (the
    # forward side's last terms are counted in its last steps)
    for source, n in last.items():
        if source not in index:
            c = size.get(source, 0) * bwd.get(source, 0.0)
            for at in range(n + 1):  # (a handful of arguments)
                after[at] += c
    # a tensor made before a cut and read at or after it is where the two directions meet:
    # its entries times both widths, for every cut between its step and its last reader
    meet = [0.0] * (len(keys) + 2)
    for k, end in last.items():
        if k in index:
            c = size.get(k, 0) * fwd.get(k, 0.0) * bwd.get(k, 0.0)
            meet[index[k] + 1] += c
            meet[end + 1] -= c
    costs, running = [], 0.0
    for at in range(len(keys) + 1):
        running += meet[at]
        costs.append(before[at] + after[at] + running)
    if mode == "forward":
        return Order("forward", len(keys), costs[-1])
    if mode == "reverse":
        return Order("reverse", 0, costs[0])
    best = min(range(len(costs)), key=lambda at: (costs[at], at != len(keys), at != 0))
    if costs[best] * MARGIN >= costs[-1]:
        best = len(keys)  # forward unless another order is clearly cheaper
    name = "forward" if best == len(keys) else "reverse" if best == 0 else "cut"
    return Order(name, best, costs[best])
