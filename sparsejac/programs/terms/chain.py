"""The chain rule on terms: :func:`compose` (an einsum with the other operands' values),
:func:`scale` (an elementwise derivative), :func:`multiply` (a scalar), :func:`unscaled` (a
scale undone, for the second order), and :func:`merge`, which adds terms whose axes agree up to
a renaming of labels (docs/how-it-works.md, "## 2. Programs"). :func:`bind` and
:func:`substitute` put an einsum's letters on a term's atoms (the second order pairs terms with
them, "## 5. Hessians").

Of :mod:`sparsejac.programs.terms` it imports :mod:`.labels`, :mod:`.factors`, :mod:`.term`,
:mod:`.maps` and :mod:`.layout`; no other module of the algebra imports it.

>>> import torch
>>> from sparsejac.programs.terms import identity
>>> labels = Labels()
>>> x = identity((2, 3), labels, torch.float64)
>>> y = scale(x, torch.full((2, 3), 2.0, dtype=torch.float64), labels)    # d (2 x) / d x
>>> [t.nnz(labels) for t in merge([y, x], labels)], merge([y, x], labels)[0].factor.max()
([6], tensor(3., dtype=torch.float64))
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ...structure import distinct
from ..ledger import WeakCall
from .factors import Product, align, contract, diagonal, einsum, factor_of
from .labels import Atoms, Labels
from .layout import densify, retable
from .maps import on_base
from .term import Term

if TYPE_CHECKING:  # annotations only
    import torch


def _on_atoms(value: torch.Tensor, axes: Sequence[Atoms],
              labels: Labels) -> tuple["torch.Tensor", list[int]]:
    """``value`` (one axis per entry of ``axes``, size 1 where broadcast) reshaped to one axis
    per atom, and the labels of those axes; broadcast axes are dropped."""
    shape: list[int] = []
    ls: list[int] = []
    index: list = []
    for n, atoms in zip(value.shape, axes):
        if n == 1:
            index.append(0)
        else:
            index.append(slice(None))
            shape += labels.shape(atoms)
            ls += atoms
    return on_base(value[tuple(index)].reshape(shape), ls, labels)


def scale(term: Term, g: torch.Tensor, labels: Labels) -> Term:
    """Multiply by ``g`` (broadcastable to the output's shape) on the output's labels: the
    Jacobian of an elementwise operation composed with the term."""
    g = g.to(term.like.dtype)
    if g.dim() == 0 or g.numel() == 1:
        return multiply(term, g.reshape(()), labels)
    axes = term.out[len(term.out) - g.dim() :]
    gv, gl = _on_atoms(g, axes, labels)
    carried = set(term.flabels) | set(gl)
    fl = tuple(l for l in term.free(labels) if l in carried)
    if term.lazy is not None:  # g joins the chain (a relu between two linear layers)
        ops = operands_of(term, set(gl) | set(fl))
        return Term(term.out, term.inp, factor_of(ops + [(gv, gl)], fl, labels), fl)
    if set(gl) <= set(term.flabels) and gv.numel() < term.factor.numel():
        # a pass over the factor, put off: the scales of the steps that follow (a layer
        # norm's, an activation's) join it and are multiplied together first, then applied
        # to the factor once (:func:`contract`)
        return Term(term.out, term.inp, Product([(term.factor, term.flabels), (gv, gl)], fl,
                                                labels), fl)
    factor = einsum([(term.factor, term.flabels), (gv, gl)], fl, labels)
    if term.factor.numel() + g.numel() < factor.numel():
        # the product spreads a smaller factor (a weight shared by a batch): remember its
        # parts, so that the second order can fold ``g`` into a step's weight and contract
        # the unscaled term (:func:`unscaled`); kept only while the product lives
        key = id(factor)
        labels.scaled[key] = (weakref.ref(factor, WeakCall(labels, "forget_scaled", key)), term,
                              g.detach())
    return Term(term.out, term.inp, factor, fl)


def unscaled(term: Term, labels: Labels) -> tuple[Term, "torch.Tensor | None"]:
    """``(base, g)`` where ``term`` is :func:`scale` of ``base`` by ``g`` (on its output's
    trailing axes) with its axes unchanged since; else ``(term, None)``."""
    if term.lazy is not None:
        return term, None
    entry = labels.scaled.get(id(term.factor))
    if entry is None or entry[0]() is not term.factor:
        return term, None
    base, g = entry[1], entry[2]
    if base.out != term.out or base.inp != term.inp:
        return term, None
    return base, g


def multiply(term: Term, c: "float | torch.Tensor", labels: Labels) -> Term:
    """The term times a scalar ``c`` (a new factor of the same shape)."""
    import torch

    lazy = term.lazy
    # an unformed product takes ``c`` as one more operand (reading its factor would form it);
    # a formed factor puts the pass off like a scale (:func:`scale`)
    if lazy is not None or isinstance(c, torch.Tensor) or term.factor.numel() > 1:
        c = torch.as_tensor(c, dtype=term.like.dtype, device=term.like.device).reshape(())
        ops = list(lazy.operands) if lazy is not None else [(term.factor, term.flabels)]
        return replace(term, stored=Product(ops + [(c, ())], term.flabels, labels))
    labels.guard(tuple(term.factor.shape), term.factor.element_size())
    return replace(term, stored=labels.made(term.factor * c))


def bind(term: Term, letters: Sequence[int], labels: Labels) -> tuple[Term, dict[int, Atoms]]:
    """Map the einsum labels of operand ``letters`` to the term's output atoms, identifying
    atoms that a repeated letter puts on the same diagonal: the term so identified, and the
    map from each letter to its atoms."""
    for _ in range(2):
        amap: dict[int, Atoms] = {}
        for d, e in enumerate(letters):
            atoms = term.out[d]
            if e not in amap:
                amap[e] = atoms
                continue
            if labels.shape(amap[e]) != labels.shape(atoms) or any(
                x in labels.derived for x in amap[e] + atoms if x not in amap[e] or x not in atoms
            ):
                break
            a, b = list(amap[e]), list(atoms)
            while a != b:
                i = next(i for i in range(len(a)) if a[i] != b[i])
                old, new = b[i], a[i]
                term = substitute(term, old, new, labels)
                a = [new if x == old else x for x in a]
                b = [new if x == old else x for x in b]
                amap = {k: tuple(new if x == old else x for x in v) for k, v in amap.items()}
        else:
            return term, amap
        # A diagonal across atoms of different granularity: make each axis one atom first.
        term = densify(term, [labels.size(axis) for axis in term.out], labels)
    raise AssertionError("unreachable: after densify every axis is one atom")


def substitute(term: Term, old: int, new: int, labels: Labels) -> Term:
    """Identify label ``old`` with ``new`` (a diagonal): rename it, taking the factor's
    diagonal if it carries both (index maps over ``old`` too)."""

    def rename(table, over):
        if old not in over:
            return None
        return diagonal(table, [new if l == old else l for l in over])

    term = retable(term, labels, rename)
    sub = lambda atoms: tuple(new if a == old else a for a in atoms)  # noqa: E731
    fl = sub(term.flabels)
    factor = term.factor
    if len(set(fl)) < len(fl):
        fl_new = distinct(fl)
        factor = einsum([(factor, fl)], fl_new, labels)
        fl = fl_new
    return Term(
        tuple(sub(a) for a in term.out), tuple(sub(a) for a in term.inp), factor, fl
    )


def compose(
    term: Term,
    inputs: Sequence[Sequence[int]],
    output: Sequence[int],
    sizes: Sequence[int],
    k: int,
    values: Sequence[torch.Tensor | None],
    labels: Labels,
    fresh: dict[int, Atoms] | None = None,
) -> Term:
    """The term of ``einsum(inputs -> output)(values)`` with operand ``k`` replaced by the
    tensor ``term`` describes (einsum labels are integers, ``sizes`` indexed by them).

    The chain rule in closed form: operand ``k``'s letters take the term's output atoms, the
    other letters fresh labels (memoised in ``fresh``), and the new factor is one einsum of the old
    factor with the other operands' values, summing what neither the new output nor the argument
    carries. A summed label that no factor carries contributes its size."""
    fresh = {} if fresh is None else fresh
    term, amap = bind(term, inputs[k], labels)
    for e, n in enumerate(sizes):
        if e not in amap:
            if e not in fresh:
                fresh[e] = labels.fresh(n)
            amap[e] = fresh[e]
    ops = []
    for j, value in enumerate(values):
        if j == k:
            continue
        value = value.to(term.like.dtype)
        shape = [s for e in inputs[j] for s in labels.shape(amap[e])]
        ops.append(on_base(value.reshape(shape), [a for e in inputs[j] for a in amap[e]], labels))
    out = tuple(amap[e] for e in output)
    free = labels.base([a for axis in out for a in axis] + list(term.inp_atoms))
    new_labels = {l for _, ls in ops for l in ls} | set(free)
    ops = operands_of(term, new_labels) + ops
    carried = {l for _, ls in ops for l in ls}
    fl = tuple(l for l in free if l in carried)
    factor = factor_of(ops, fl, labels)
    term = Term(out, term.inp, factor, fl)
    uncarried = set(labels.base([a for e in inputs[k] for a in amap[e]])) - set(free) - carried
    if uncarried:
        term = multiply(term, labels.size(sorted(uncarried)), labels)
    return term


def operands_of(term: Term, new_labels: set[int]) -> list:
    """The term's factor as einsum operands: a product's parts (extended by the caller), or
    the factor itself where the product is formed or sums a label the caller brings in."""
    lazy = term.lazy
    own = set(term.out_atoms) | set(term.inp_atoms)
    if lazy is not None and not (lazy.summed() & (new_labels | own)):
        return list(lazy.operands)
    return [(term.factor, term.flabels)]


def _signature(term: Term, labels: Labels) -> tuple:
    """The term's axes up to a renaming of labels: equal signatures, equal patterns."""
    if not set(term.flabels) <= set(term.free(labels)):
        # a factor label no axis enumerates (an index map that no longer reads it): summed
        # when the term is written, so it merges with nothing
        return ("alone", id(term))
    if term.mapped(labels):
        # tables name their labels: a derived label and the labels its table reads stay as
        # they are; the others may be renamed (a recurrence's paths to one input step differ
        # only in those)
        fixed = {a for a in term.out_atoms + term.inp_atoms if a in labels.derived}
        fixed |= {b for a in fixed for b in labels.derived[a][1]}
        order = term.free(labels)
        ids = {l: i for i, l in enumerate(l for l in order if l not in fixed)}

        def name(a: int):
            return ("fixed", a) if a in fixed else ids[a]

        return (tuple(tuple(name(a) for a in axis) for axis in term.out),
                tuple(tuple(name(a) for a in axis) for axis in term.inp),
                tuple(labels.sizes[l] for l in order if l not in fixed))
    order = term.free(labels)
    ids = {l: i for i, l in enumerate(order)}
    return (
        tuple(tuple(ids[a] for a in axis) for axis in term.out),
        tuple(ids[a] for a in term.inp_atoms),
        labels.shape(order),
    )


def merge(terms: Sequence[Term], labels: Labels) -> list[Term]:
    """Add terms whose axes agree up to a renaming of labels into one: the paths through
    queries, keys and values of attention end in one term, and materialising writes each
    pattern once. The factors broadcast over the union of their labels, inside ``V``."""
    import torch

    groups: dict[tuple, list[Term]] = {}
    for t in terms:
        groups.setdefault(_signature(t, labels), []).append(t)
    merged = []
    for group in groups.values():
        first = group[0]
        if len(group) == 1:
            merged.append(first)
            continue
        free = first.free(labels)
        # each summand as (factor, scale) over ``union``: a product of one large factor and
        # small scales (a layer norm's, an activation's) is not formed but multiplied into
        # the sum as it is added (one pass over the factor instead of three)
        parts, present = [], set()
        for t in group:
            rename = dict(zip(t.free(labels), free))
            scaled = _scaled(t, labels)
            if scaled is None:
                scaled = ((t.factor, t.flabels), None)
            (f, fl), g = scaled
            parts.append(((f, tuple(rename[l] for l in fl)),
                          None if g is None else (g[0], tuple(rename[l] for l in g[1]))))
            present |= {rename[l] for l in t.flabels}
        union = tuple(l for l in free if l in present)
        views = [(align(f, fl, union), None if g is None else align(g[0], g[1], union))
                 for (f, fl), g in parts]
        shape = np.broadcast_shapes(*(tuple(v.shape) for pair in views for v in pair
                                      if v is not None))  # (torch's broadcast imports sympy)
        dtype = functools.reduce(torch.promote_types, (v.dtype for pair in views for v in pair
                                                        if v is not None))
        labels.guard(shape, dtype.itemsize)
        total = labels.made(torch.empty(shape, dtype=dtype, device=views[0][0].device))
        for k, (f, g) in enumerate(views):
            if k == 0:
                if g is not None and np.broadcast_shapes(tuple(f.shape), tuple(g.shape)) == shape:
                    torch.mul(f, g, out=total)
                else:  # (broadcast into the sum's shape first: ``out=`` would resize it)
                    total.copy_(f)
                    if g is not None:
                        total.mul_(g)
            elif g is not None:
                total.addcmul_(f, g)
            else:
                total.add_(f)
        merged.append(Term(first.out, first.inp, total, union))
    return merged


def _scaled(term: Term, labels: Labels) -> tuple[tuple, tuple] | None:
    """``((factor, labels), (scale, labels))`` where the term is an unformed product of one
    large factor and scales over some of its labels (at most half its entries in all), the
    scales multiplied together; else None."""
    lazy = term.lazy
    if lazy is None or len(lazy.operands) < 2:
        return None
    ops = lazy.operands
    big = max(range(len(ops)), key=lambda i: ops[i][0].numel())
    f, fl = ops[big]
    rest = [op for i, op in enumerate(ops) if i != big]
    if set(fl) != set(lazy.out) or any(not set(ls) <= set(fl) for _, ls in rest):
        return None
    if 2 * sum(t.numel() for t, _ in rest) > f.numel():
        return None
    gl = tuple(l for l in fl if any(l in ls for _, ls in rest))
    return (f, fl), (contract(rest, gl, labels) if len(rest) > 1 or rest[0][1] != gl
                     else rest[0][0], gl)
