"""Layout moves: reshape, permute, broadcast (:func:`expand`), and the label surgery a reshape
needs (:func:`split_label`, :func:`merge_run`, :func:`densify`). They touch the atoms, and the
factor only where a label is cut or merged (docs/how-it-works.md, "## 2. Programs").

Of :mod:`sparsejac.programs.terms` it imports :mod:`.labels`, :mod:`.factors`, :mod:`.term`
and :mod:`.maps` (a one-hot factor); never the chain rule.

>>> import torch
>>> from sparsejac.programs.terms import identity
>>> labels = Labels()
>>> x = identity((4, 3), labels, torch.float64)
>>> y = reshape(x, (2, 6), labels)            # the first axis' label cut in two
>>> [labels.shape(axis) for axis in y.out], y.factor.shape
([(2,), (2, 3)], torch.Size([]))
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Sequence

from ...structure import distinct
from .factors import einsum, reshaped
from .labels import Atoms, Labels
from .maps import onehot
from .term import Term

if TYPE_CHECKING:  # annotations only
    import torch


def retable(term: Term, labels: Labels,
            change: Callable[["torch.Tensor", Atoms], "tuple[torch.Tensor, Atoms] | None"]) -> Term:
    """The term with each index map whose table ``change(table, over)`` rewrites (it returns
    ``(table, over)``, or None where the map is untouched) replaced by the rewritten map."""
    new: dict[int, int] = {}
    for a in distinct(term.out_atoms + term.inp_atoms):
        if a in labels.derived:
            table, over = labels.derived[a]
            changed = change(table, over)
            if changed is not None:
                new[a] = labels.derive(changed[0], changed[1], labels.sizes[a])
    if not new:
        return term
    sub = lambda atoms: tuple(new.get(x, x) for x in atoms)  # noqa: E731
    return replace(term, out=tuple(sub(a) for a in term.out), inp=tuple(sub(a) for a in term.inp))


def split_label(term: Term, label: int, parts: Atoms, labels: Labels) -> Term:
    """Replace ``label`` by the finer labels ``parts`` everywhere (reshaping the factor)."""

    def sub(atoms: Atoms) -> Atoms:
        return tuple(p for a in atoms for p in (parts if a == label else (a,)))

    def split(table, over):
        if label not in over:
            return None
        k = over.index(label)
        shape = tuple(table.shape)
        return (table.reshape(shape[:k] + labels.shape(parts) + shape[k + 1 :]),
                over[:k] + tuple(parts) + over[k + 1 :])

    if label not in labels.derived:
        term = retable(term, labels, split)
    factor, fl = term.factor, term.flabels
    if label in fl:
        pos = fl.index(label)
        shape = tuple(factor.shape)
        # (a copy, guarded, where the strides do not allow a view)
        factor = reshaped(factor, shape[:pos] + labels.shape(parts) + shape[pos + 1 :], labels,
                          "a Jacobian factor")
        fl = fl[:pos] + parts + fl[pos + 1 :]
    return Term(tuple(sub(a) for a in term.out), tuple(sub(a) for a in term.inp), factor, fl)


def densify(term: Term, shape: Sequence[int], labels: Labels) -> Term:
    """The term with its output side made dense and private, reshaped to ``shape``.

    The fallback for reshapes and diagonals that do not fall on atom boundaries: every output
    atom is replaced by a fresh label tied to the old one by an identity matrix, which costs
    ``prod(shape)`` times the input side's distinct size in the factor."""
    occ = term.out_atoms
    private = [labels.fresh(labels.sizes[a])[0] for a in occ]
    eyes = [onehot(a, p, labels, term.like) for p, a in zip(private, occ)]
    carried = set(term.flabels) | {l for _, ls in eyes for l in ls}
    keep_inp = [l for l in labels.base(term.inp_atoms) if l in carried]
    factor = einsum([(term.factor, term.flabels)] + eyes, private + keep_inp, labels)
    big = [n for n in shape if n != 1]
    factor = factor.reshape(tuple(big) + tuple(factor.shape[len(private) :]))
    out, fl = [], []
    for n in shape:
        atoms = labels.fresh(n)
        out.append(atoms)
        fl += atoms
    return Term(tuple(out), term.inp, factor, tuple(fl) + tuple(keep_inp))


def _partition(term: Term, shape: Sequence[int], labels: Labels):
    """Cut the output atoms into the axes of ``shape``: ("ok", out), ("split", label, parts)
    when an atom straddles a boundary and can be cut there, or ("fail",)."""
    atoms = list(term.out_atoms)
    out: list[Atoms] = []
    for n in shape:
        got: list[int] = []
        need = int(n)
        while need > 1:
            if not atoms:
                return ("fail",)
            a = atoms[0]
            s = labels.sizes[a]
            if need % s == 0:
                got.append(atoms.pop(0))
                need //= s
            elif s % need == 0:
                return ("split", a, (need, s // need))
            else:
                return ("fail",)
        out.append(tuple(got))
    return ("ok", tuple(out)) if not atoms else ("fail",)


def _replace_run(seq: Sequence[int], run: Atoms, label: int) -> tuple[int, ...] | None:
    """``seq`` with every occurrence of ``run`` replaced by ``label``; None if a label of
    ``run`` also occurs outside a complete occurrence."""
    out, i = [], 0
    while i < len(seq):
        if tuple(seq[i : i + len(run)]) == run:
            out.append(label)
            i += len(run)
        elif seq[i] in run:
            return None
        else:
            out.append(seq[i])
            i += 1
    return tuple(out)


def merge_run(term: Term, run: Atoms, labels: Labels) -> Term | None:
    """Replace the consecutive labels ``run`` by one label wherever they occur (the output side
    becomes one pseudo-axis, to be re-cut by :func:`reshape`); None where some label of ``run``
    occurs apart from the others, which no single label can express."""
    if any(a in run or set(run) & set(labels.derived[a][1])
           for a in term.out_atoms + term.inp_atoms if a in labels.derived):
        return None  # an index map on (or over) these labels: no single label can say it
    label = labels.merged(run)
    out = _replace_run(term.out_atoms, run, label)
    inp = _replace_run(term.inp_atoms, run, label)
    if out is None or inp is None:
        return None
    factor, fl = term.factor, term.flabels
    if set(run) & set(fl):
        missing = [a for a in run if a not in fl]
        # expanded over the missing labels and permuted, the reshape below copies all of it
        labels.guard(tuple(factor.shape) + labels.shape(missing), factor.element_size())
        factor = factor.reshape(tuple(factor.shape) + (1,) * len(missing))
        factor = factor.expand(tuple(factor.shape[: len(fl)]) + labels.shape(missing))
        fl = fl + tuple(missing)
        rest = [i for i, l in enumerate(fl) if l not in run]
        order = rest + [fl.index(a) for a in run]
        factor = labels.made(factor.permute(order).reshape(
            tuple(factor.shape[i] for i in rest) + (labels.size(run),)
        ))
        fl = tuple(fl[i] for i in rest) + (label,)
    return Term((out,), (inp,), factor, fl)


def _regions(atoms: Sequence[int], shape: Sequence[int], labels: Labels) -> list[Atoms]:
    """Runs of atoms between the boundaries that the atoms and ``shape`` have in common, for
    the runs that hold several atoms and several dimensions (those a reshape may mix)."""
    dims = [n for n in shape if n != 1]
    ends = [math.prod(dims[: i + 1]) for i in range(len(dims))]  # where each new axis ends
    runs, current, start, product = [], [], 1, 1
    for a in atoms:
        current.append(a)
        product *= labels.sizes[a]
        if product in ends:
            n_dims = sum(1 for e in ends if start < e <= product)
            if len(current) > 1 and n_dims > 1:
                runs.append(tuple(current))
            current, start = [], product
    return runs


def reshape(term: Term, shape: Sequence[int], labels: Labels) -> Term:
    """A C-order reshape of the output side (view, flatten, squeeze, unsqueeze, ...).

    Axes are re-cut at atom boundaries, splitting an atom where a new boundary falls inside it
    and divides it; where it does not (``(5, 4) -> (2, 10)``), the atoms of that stretch are
    merged into one label first. Only when the merged labels also occur in another arrangement
    is the output side made dense (:func:`densify`)."""
    if math.prod(shape) == 0:  # an empty tensor: no entries, whatever the labels
        out = tuple(labels.fresh(n) for n in shape)
        return Term(out, term.inp, term.like.new_zeros(()), ())
    merged = False
    while True:
        result = _partition(term, shape, labels)
        if result[0] == "ok":
            return replace(term, out=result[1])
        if result[0] == "split":
            label, parts = result[1], result[2]
            term = split_label(term, label, labels.split(label, parts), labels)
            continue
        if not merged:
            merged = True
            for run in _regions(term.out_atoms, shape, labels):
                candidate = merge_run(term, run, labels)
                if candidate is None:
                    return densify(term, shape, labels)
                term = candidate
            continue
        return densify(term, shape, labels)


def permute(term: Term, perm: Sequence[int]) -> Term:
    """The output side's axes in the order ``perm`` (a transpose: atoms only)."""
    return replace(term, out=tuple(term.out[p] for p in perm))


def expand(term: Term, shape: Sequence[int], fresh: dict[int, Atoms], labels: Labels) -> Term:
    """Broadcast the output side to ``shape``; a broadcast axis gets a label that only the
    output carries (``fresh`` memoises it per axis so that terms stay mergeable)."""
    lead = len(shape) - len(term.out)
    out = []
    for d, n in enumerate(shape):
        old = term.out[d - lead] if d >= lead else ()
        if labels.size(old) == n:
            out.append(old)
        else:
            if d not in fresh:
                fresh[d] = labels.fresh(n)
            out.append(fresh[d])
    return replace(term, out=tuple(out))
