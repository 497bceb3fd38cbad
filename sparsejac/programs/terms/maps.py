"""Index maps in the algebra (docs/how-it-works.md, "## 3. Index maps"): selections, shifts,
padding and windows as derived labels instead of factors. :func:`gather` selects along an axis
(the axis' labels become functions of new ones), :func:`remap` places entries (``cat``, padding,
transposed convolution), :func:`mask` zeroes entries a map drops; :func:`resolve`,
:func:`base_axis` and :func:`onehot` fall back to one-hot factors where no map can say it;
:func:`on_base` reads a value at base labels; :func:`one_to_one` is the one injectivity test.

Of :mod:`sparsejac.programs.terms` it imports :mod:`.labels`, :mod:`.factors` and :mod:`.term`;
never the layout moves or the chain rule.

>>> import torch
>>> from sparsejac.programs.terms import identity, placed
>>> labels = Labels()
>>> x = identity((5,), labels, torch.float64)
>>> y = gather(x, 0, torch.tensor([4, 2, -1]), labels)      # x[[4, 2]], then padding
>>> [r.tolist() for r in placed(y, labels)]
[[0, 1, 2], [4, 2, -1], [True, True, False]]
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ...structure import distinct
from .factors import align, contract, diagonal, einsum
from .labels import Atoms, Labels, arange
from .term import Term

if TYPE_CHECKING:  # annotations only
    import torch


def on_base(value: "torch.Tensor", atoms: Sequence[int],
            labels: Labels) -> tuple["torch.Tensor", list[int]]:
    """``value`` (one axis per atom) read at the base labels: each axis of a derived label is
    gathered through its table (an entry that does not exist reads index 0: its factor is zero).
    Returns the tensor and its labels (a label may repeat: einsum takes the diagonal)."""
    ls: list[int] = []
    for atom in atoms:
        if atom not in labels.derived:
            ls.append(atom)
            continue
        table, over = labels.derived[atom]
        k = len(ls)
        labels.guard(tuple(value.shape[:k]) + tuple(table.shape) + tuple(value.shape[k + 1 :]),
                     value.element_size(), "a gathered value")
        picked = labels.made(value.index_select(k, table.clamp(min=0).reshape(-1).to(value.device)))
        value = picked.reshape(tuple(value.shape[:k]) + tuple(table.shape)
                               + tuple(value.shape[k + 1 :]))
        ls.extend(over)
    return value, ls


def onehot(atom: int, private: int, labels: Labels,
           like: "torch.Tensor") -> tuple["torch.Tensor", tuple[int, ...]]:
    """``(tensor, labels)``: 1 where the fresh label ``private`` equals ``atom``'s value (an
    identity matrix for a base label, the table's one-hot for a derived one)."""
    import torch

    n = labels.sizes[atom]
    if atom not in labels.derived:
        labels.guard((n, n), like.element_size(), "an identity matrix")
        return labels.made(torch.eye(n, dtype=like.dtype, device=like.device)), (private, atom)
    table, over = labels.derived[atom]
    labels.guard((n,) + tuple(table.shape), like.element_size(), "a one-hot index map")
    hot = table.to(like.device).unsqueeze(0) == arange(n, table).reshape((n,) + (1,) * table.dim())
    return labels.made(hot.to(like.dtype)), (private,) + tuple(over)


def coordinate(atoms: Sequence[int], labels: Labels,
               like: "torch.Tensor") -> tuple["torch.Tensor", tuple[int, ...]]:
    """``(index, over)``: an axis' coordinate (mixed radix of its atoms) as an int64 tensor
    over the base labels ``over``, -1 where an atom's map has no entry."""
    import torch

    over = labels.base(atoms)
    total = torch.zeros((1,) * len(over), dtype=torch.int64, device=like.device)
    bad = torch.zeros((1,) * len(over), dtype=torch.bool, device=like.device)
    for a in atoms:
        if a in labels.derived:
            table, tl = labels.derived[a]
            v = align(table.to(like.device), tl, over)
            bad = bad | (v < 0)
        else:
            v = align(arange(labels.sizes[a], like), (a,), over)
        total = total * labels.sizes[a] + v
    return total.masked_fill(bad, -1), over


def mask(term: Term, valid: "torch.Tensor", over: Sequence[int], labels: Labels) -> Term:
    """Zero the factor where ``valid`` (a boolean tensor over base labels ``over``) is false:
    entries an index map drops must not add into sums over their axis."""
    if bool(valid.all()):
        return term
    keep = [d for d in range(valid.dim()) if valid.shape[d] > 1 and bool(
        (valid != valid.narrow(d, 0, 1)).any())]
    valid = valid[tuple(slice(None) if d in keep else 0 for d in range(valid.dim()))]
    over = tuple(over[d] for d in keep)  # only the labels the condition depends on
    return _times(term, valid.to(term.factor.dtype), over, labels)


def _times(term: Term, value: "torch.Tensor", vl: Sequence[int], labels: Labels,
           out: tuple[Atoms, ...] | None = None) -> Term:
    """The term, with output axes ``out`` (default its own), times ``value`` over the labels
    ``vl``: one factor over the free labels that either carries."""
    out = term.out if out is None else out
    free = labels.base([a for ax in out for a in ax] + list(term.inp_atoms))
    carried = set(term.flabels) | set(vl)
    fl = tuple(l for l in free if l in carried)
    return Term(out, term.inp, einsum([(term.factor, term.flabels), (value, vl)], fl, labels), fl)


def reparametrise(term: Term, subs: dict[int, "torch.Tensor"], over: Atoms,
                     labels: Labels) -> Term:
    """Re-parametrise: each base label ``a`` of ``subs`` becomes a function of the new base
    labels ``over`` (``subs[a]``, a table over ``over``, -1 for no entry) everywhere it occurs:
    in atoms, in other index maps' tables (composed), and in the factor (gathered)."""

    def regather(tensor, ls):
        """``tensor`` over ``ls`` with each substituted label's axis read through its table:
        all of them in one advanced index over ``over`` (read one by one, each would add the
        whole of ``over``'s shape before the diagonal: a product of them at the peak)."""
        ls = list(ls)
        hit = [a for a in subs if a in ls]
        if not hit:
            return tensor, ls, None
        ks = [ls.index(a) for a in hit]
        rest = [i for i in range(len(ls)) if i not in ks]
        shape = labels.shape(over)
        # one flat row index over the substituted axes and a row gather (index_select) of the
        # tensor laid out (hit, rest): contiguous rows, several times faster than an advanced
        # index of one table per axis; the layout is a copy of the (smaller) gathered tensor.
        # The layout is made first and counted, so that the gather's guard sees it alive.
        import torch

        rest_shape = tuple(tensor.shape[i] for i in rest)
        rows = tensor.permute(ks + rest)
        if not rows.is_contiguous():
            labels.guard(tuple(rows.shape), tensor.element_size(), "a factor laid out to gather")
            rows = labels.made(rows.contiguous())
        rows = rows.reshape(math.prod(tensor.shape[k] for k in ks), math.prod(rest_shape))
        labels.guard((2,) + tuple(shape), 8, "a gather's index")
        flat = torch.zeros((), dtype=torch.int64, device=tensor.device)
        for a, k in zip(hit, ks):
            flat = flat * tensor.shape[k] + subs[a].clamp(min=0).reshape(shape).to(tensor.device)
        flat = labels.made(flat.expand(shape).reshape(-1))
        labels.guard(tuple(shape) + rest_shape, tensor.element_size(), "a gathered factor")
        tensor = labels.made(rows.index_select(0, flat))
        del flat
        tensor = tensor.reshape(tuple(shape) + rest_shape)
        del rows
        ls = list(over) + [ls[i] for i in rest]
        bad = subs[hit[0]] < 0
        for a in hit[1:]:
            bad = bad | (subs[a] < 0)
        tensor, ls = diagonal(tensor, ls)
        return tensor, ls, bad

    new: dict[int, int] = {}
    for a, digit in subs.items():
        new[a] = labels.derive(digit, over, labels.sizes[a])
    for a in set(term.out_atoms + term.inp_atoms):
        if a in labels.derived and a not in new:
            table, tl = labels.derived[a]
            if set(tl) & set(subs):
                t, ls, bad = regather(table, tl)
                if bad is not None:
                    t = t.masked_fill(align(bad, over, ls), -1)
                new[a] = labels.derive(t, ls, labels.sizes[a])
    sub = lambda atoms: tuple(new.get(x, x) for x in atoms)  # noqa: E731
    factor, fl = term.factor, term.flabels
    if set(fl) & set(subs):
        factor, fl, _ = regather(factor, fl)
        # ``over`` too: the caller puts the new labels on the selected axis
        free = distinct(labels.base(sub(term.out_atoms) + sub(term.inp_atoms)) + tuple(over))
        order = tuple(l for l in free if l in fl)
        # a label the substitution left on no axis (a map made constant in it) is summed over,
        # as compose sums what no axis carries: its entries all land on one place
        factor = (align(factor, fl, order, labels) if set(fl) <= set(order)
                  else einsum([(factor, fl)], order, labels))
        fl = order
    return Term(tuple(sub(a) for a in term.out), tuple(sub(a) for a in term.inp), factor, fl)


def resolve(term: Term, axis: int, labels: Labels) -> Term:
    """Make out axis ``axis`` one fresh base label, tied to its old coordinate by a one-hot
    factor (the fallback where an axis made of index maps is selected from again)."""
    atoms = term.out[axis]
    n = labels.size(atoms)
    (p,) = labels.fresh(n)
    index, over = coordinate(atoms, labels, term.like)
    hot = (index.unsqueeze(0) == arange(n, index).reshape((n,) + (1,) * index.dim()))
    out = term.out[:axis] + ((p,),) + term.out[axis + 1 :]
    labels.guard((n,) + tuple(index.shape), term.factor.element_size(), "a one-hot index map")
    return _times(term, hot.to(term.factor.dtype), (p,) + over, labels, out)


def one_to_one(atom: int, labels: Labels) -> bool:
    """Whether a derived label is an injective map of one base label (its entries that exist
    are distinct), so that the base label can be read back from it."""
    if atom not in labels.injective:
        table, over = labels.derived[atom]
        ok = len(over) == 1
        if ok:
            t = table.cpu().numpy()
            valid = t[t >= 0] if t.min(initial=0) < 0 else t
            # slices and shifts are increasing: no count needed
            ok = bool((valid[1:] > valid[:-1]).all()) or (
                not valid.size or int(np.bincount(valid, minlength=labels.sizes[atom]).max()) <= 1)
        labels.injective[atom] = ok
    return labels.injective[atom]


def invert(atom: int, labels: Labels) -> tuple[int, "torch.Tensor"]:
    """For a derived label that is :func:`one_to_one`: ``(label, inverse)``, its base label
    and ``inverse[value]``, the base label's value where the map takes ``value`` (-1: none)."""
    import torch

    table, over = labels.derived[atom]
    valid = table >= 0
    inverse = torch.full((labels.sizes[atom],), -1, dtype=torch.int64, device=table.device)
    inverse[table[valid]] = torch.arange(table.numel(), device=table.device)[valid]
    return over[0], inverse


def base_axis(term: Term, axis: int, labels: Labels) -> Term:
    """Tie each atom of out axis ``axis`` that :func:`gather` cannot re-parametrise (a repeated
    label, a map of several labels or a non-injective one) to a fresh label by a one-hot factor
    over that atom alone."""
    for pos in range(len(term.out[axis])):
        atoms = term.out[axis]
        a = atoms[pos]
        if a not in atoms[:pos] and (a not in labels.derived or one_to_one(a, labels)):
            continue
        (p,) = labels.fresh(labels.sizes[a])
        hot, hl = onehot(a, p, labels, term.factor)
        new_axis = atoms[:pos] + (p,) + atoms[pos + 1 :]
        out = term.out[:axis] + (new_axis,) + term.out[axis + 1 :]
        term = _times(term, hot, hl, labels, out)
    return term


def gather(term: Term, axis: int, index: "torch.Tensor", labels: Labels) -> Term:
    """Select along out axis ``axis``: it is replaced by axes of ``index.shape``, entry ``n``
    being the old entry ``index[n]`` (-1: none, as in padding). An index map, not a factor:
    the axis' labels become functions of the new ones (:func:`reparametrise`); an atom that
    is itself an injective map of a label re-parametrises that label through its inverse."""
    term = base_axis(term, axis, labels)
    atoms = term.out[axis]
    new_axes = tuple(labels.fresh(n) for n in index.shape)
    over = tuple(a for ax in new_axes for a in ax)
    table = index.long().reshape(labels.shape(over))
    valid = table >= 0
    every = bool(valid.all())
    subs, stride = {}, labels.size(atoms)
    for i, a in enumerate(atoms):
        n = labels.sizes[a]
        stride //= n
        # (integer division is slow at a million entries: skipped where it is the identity,
        # the first digit needing no modulo as the table is below the axis' size)
        digit = table if stride == 1 else table // stride
        if i:
            digit = digit % n
        if not every:
            digit = digit.masked_fill(~valid, -1)
        if a in labels.derived:
            a, inverse = invert(a, labels)
            digit = inverse[digit.clamp(min=0)].masked_fill(digit < 0, -1)
        if a in subs:
            # two digits name the same label (a padded axis reshaped: the column is a map of
            # the row): an entry exists only where they agree
            digit = digit.masked_fill(digit != subs[a], -1)
        valid = valid & (digit >= 0)
        subs[a] = digit
    subs = _separate(subs, valid)
    old = term.factor
    term = reparametrise(term, subs, over, labels)
    term = replace(term, out=term.out[:axis] + new_axes + term.out[axis + 1 :])
    if term.factor is not old and set(over) <= set(term.flabels):
        # the factor was just gathered over the new labels (a tensor of its own): the entries
        # that do not exist are zeroed in place, not by a product that copies it
        term.factor.masked_fill_(~align(valid, over, term.flabels), 0)
        return term
    return mask(term, valid, over, labels)  # with the new axes in place: they are kept


def _depends(t: "torch.Tensor", valid: "torch.Tensor") -> list[int]:
    """The dims along which ``t`` varies among its ``valid`` entries."""
    # the valid entries' highest value and highest negated value along each dim: it varies
    # where their sum is positive (a slice with no valid entry sums to about -2**62). amax of
    # both, as int64 amin is many times slower than amax on CPU; the filled copies are made
    # once, not per dim (the tables are as large as a window's)
    none = -(1 << 61)
    hi = t.masked_fill(~valid, none)
    neg = t.neg().masked_fill_(~valid, none)
    return [d for d in range(t.dim())
            if t.shape[d] > 1 and bool((hi.amax(d) + neg.amax(d) > 0).any())]


def _project(t: "torch.Tensor", valid: "torch.Tensor", keep: Sequence[int]) -> "torch.Tensor":
    """``t`` read only along ``keep`` (its value among the valid entries of each slice, -1
    where a slice has none), broadcast back to its shape."""
    dims = [d for d in range(t.dim()) if d not in keep and t.shape[d] > 1]
    if not dims:
        return t.masked_fill(~valid, -1)
    return t.masked_fill(~valid, -1).amax(dims, keepdim=True).expand(t.shape)


def _separate(subs: dict, valid: "torch.Tensor") -> dict:
    """Digit tables that depend on as few labels as the selection allows. Each digit is read
    where the entry exists; where it does not (padding), the marks -1 go only on the digits
    whose labels say so (a window's spatial digit), not on every digit: a batch digit marked
    by a spatial condition would depend on the spatial labels and stop being a delta."""
    if bool(valid.all()):
        return subs
    out = {}
    for a, d in subs.items():
        p = _project(d, valid, _depends(d, valid))
        # each dim alone may look constant where the valid entries lie apart (a stride's
        # holes): keep the projection only if it reads every valid entry right
        out[a] = p if bool(((p == d) | ~valid).all()) else d.masked_fill(~valid, -1)

    def covered():
        ok = valid.new_ones(valid.shape)
        for d in out.values():
            ok = ok & (d >= 0)
        return bool((ok == valid).all())

    if covered():
        return out
    keeps = {a: _depends(d, valid) for a, d in out.items()}
    for a, d in out.items():  # separable validity: each digit takes its own part
        other = [k for k in range(valid.dim()) if k not in keeps[a]]
        part = valid.any(other, keepdim=True) if other else valid
        out[a] = d.masked_fill(~part.expand(valid.shape), -1)
    if covered():
        return out
    a = next(iter(out))  # otherwise the first digit carries the whole condition
    out[a] = out[a].masked_fill(~valid, -1)
    return out


def remap(term: Term, axes: Sequence[int], table: "torch.Tensor", size: int,
          labels: Labels) -> Term:
    """Send out axes ``axes`` (consecutive) to one new axis of ``size``: the entry at their
    index ``i`` goes to ``table[i]`` (-1: dropped). Placements (``cat``, padding, transposed
    convolution) are index maps of this kind; several entries may land on one place (summed)."""
    atoms = [a for d in axes for a in term.out[d]]
    index, over = coordinate(atoms, labels, term.like)
    flat = table.reshape(-1).to(index.device)
    value = flat[index.clamp(min=0)].masked_fill(index < 0, -1)
    valid = value >= 0
    if size == 1:
        new_axis: Atoms = ()
    else:
        new_axis = (labels.derive(value if over else value.reshape(()), over, size),)
    term = mask(term, valid, over, labels)
    first = axes[0]
    out = term.out[:first] + (new_axis,) + term.out[axes[-1] + 1 :]
    term = replace(term, out=out)
    # a label the new map does not read (its entries all land on one place) and no other axis
    # carries is summed now: the factor over it is added up, as the placement adds the entries
    free = set(term.free(labels))
    orphan = [l for l in term.flabels if l not in free]
    if orphan:
        keep = tuple(l for l in term.flabels if l in free)
        term = Term(term.out, term.inp, contract([(term.factor, term.flabels)], keep, labels), keep)
    return term
