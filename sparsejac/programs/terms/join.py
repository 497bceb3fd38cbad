"""The product of two terms (:func:`join`): ``outer`` is the Jacobian of ``z`` with respect to
``y``, ``inner`` that of ``y`` with respect to ``x``, and the result is that of ``z`` with
respect to ``x``, with no operation in between. A rule composes a term with *its* operation;
joining composes two recorded terms, so a chain of steps can be contracted in any order
(docs/how-it-works.md, "## 8. Order of accumulation").

The two terms meet on ``y``'s axes: each of ``outer``'s input atoms is identified with the
atom of ``inner``'s output at the same place. Base labels are renamed into one another; an
index map on one side re-parametrises the other side's label through its table (a slice read
by ``outer`` selects ``inner``'s entries; a placement made by ``inner`` sends ``outer``'s
reads to where it put them); where neither side can be re-parametrised, a one-hot relation
between the two sides' coordinates joins them. Then one einsum of the two factors sums the
labels of ``y`` that neither ``z`` nor ``x`` carries.

Of :mod:`sparsejac.programs.terms` it imports :mod:`.labels`, :mod:`.factors`, :mod:`.term`,
:mod:`.maps`, :mod:`.layout` and :mod:`.chain`; no other module of the algebra imports it.

>>> import torch
>>> from sparsejac.programs.terms import compose, identity, scale
>>> labels = Labels()
>>> w = torch.arange(6.0, dtype=torch.float64).reshape(3, 2)
>>> y = compose(identity((4, 3), labels, torch.float64), ((0, 1), (1, 2)), (0, 2), (4, 3, 2),
...             0, [None, w], labels)                       # d (x @ w) / d x
>>> z = scale(identity((4, 2), labels, torch.float64), torch.full((4, 2), 2.0,
...           dtype=torch.float64), labels)                  # d (2 y) / d y
>>> j = join(z, y, labels)
>>> j.nnz(labels), [labels.shape(a) for a in j.out], j.factor.sum().item()
(24, [(4,), (2,)], 120.0)
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from .chain import multiply, operands_of, substitute
from .factors import align, factor_of
from .labels import Atoms, Labels
from .layout import split_label
from .maps import coordinate, invert, mask, one_to_one, reparametrise
from .term import Term

if TYPE_CHECKING:  # annotations only
    import torch


def labels_of(term: Term, labels: Labels) -> set[int]:
    """Every label the term names: its atoms, the base labels under them, its factor's."""
    atoms = term.out_atoms + term.inp_atoms
    return set(atoms) | set(labels.base(atoms)) | set(term.flabels)


def relabel(term: Term, labels: Labels) -> Term:
    """The same term over fresh labels (each base label renamed, each index map re-derived
    over the renamed labels): a copy that shares no label with any other term."""
    base = sorted(set(labels.base(term.out_atoms + term.inp_atoms)) | set(term.flabels))
    new = {l: labels.fresh(labels.sizes[l])[0] for l in base}
    for a in set(term.out_atoms + term.inp_atoms):
        if a in labels.derived:
            table, over = labels.derived[a]
            new[a] = labels.derive(table, tuple(new[l] for l in over), labels.sizes[a])
    sub = lambda atoms: tuple(new[a] for a in atoms)  # noqa: E731
    return Term(tuple(sub(a) for a in term.out), tuple(sub(a) for a in term.inp), term.factor,
                sub(term.flabels))


def join(outer: Term, inner: Term, labels: Labels) -> Term:
    """The term of ``outer`` after ``inner``: ``outer``'s input axes are ``inner``'s output
    axes (one tensor), and the result maps ``inner``'s input to ``outer``'s output."""
    if len(outer.inp) != len(inner.out) or any(
            labels.size(a) != labels.size(b) for a, b in zip(outer.inp, inner.out)):
        raise ValueError("join: the terms do not meet on one tensor's axes")
    if labels_of(outer, labels) & labels_of(inner, labels):
        inner = relabel(inner, labels)
    relations: list = []
    for axis in range(len(outer.inp)):
        outer, inner = _meet(outer, inner, axis, relations, labels)
    return _product(outer, inner, relations, labels)


def _meet(outer: Term, inner: Term, axis: int, relations: list,
          labels: Labels) -> tuple[Term, Term]:
    """Make ``outer.inp[axis]`` and ``inner.out[axis]`` the same atoms. A label both terms
    name means one value in both: every renaming and re-parametrisation is applied to both.
    Once a relation stands (it names labels as they are now), no label changes: the axes left
    are related too."""
    if relations:
        return outer, _related(outer, inner, axis, relations, labels)
    for _ in range(4 * (len(outer.inp[axis]) + len(inner.out[axis])) + 4):
        ra, la = outer.inp[axis], inner.out[axis]
        if ra == la:
            return outer, inner
        rs, ls = labels.shape(ra), labels.shape(la)
        k = next((i for i in range(min(len(ra), len(la))) if ra[i] != la[i]), None)
        if k is None or rs[:k + 1] != ls[:k + 1]:
            # atoms of different sizes: cut the larger at the smaller's boundary
            k = next(i for i in range(min(len(ra), len(la)) + 1)
                     if i == min(len(ra), len(la)) or rs[i] != ls[i])
            if k >= min(len(ra), len(la)) or not _cut(rs[k], ls[k]):
                return outer, _related(outer, inner, axis, relations, labels)
            big, small = (ra[k], ls[k]) if rs[k] > ls[k] else (la[k], rs[k])
            parts = labels.split(big, (small, labels.sizes[big] // small))
            outer, inner = (split_label(t, big, parts, labels) if big in labels_of(t, labels)
                            else t for t in (outer, inner))
            continue
        met = _identify(outer, inner, axis, k, labels)
        if met is None:
            return outer, _related(outer, inner, axis, relations, labels)
        outer, inner = met
    raise AssertionError("join: the axes did not meet")  # pragma: no cover


def _cut(a: int, b: int) -> bool:
    return (a > b and a % b == 0) or (b > a and b % a == 0)


def _force(term: Term, axis: int, k: int | None, atoms) -> Term:
    """``term`` with its output atom ``k`` of ``axis`` (the whole axis: ``k`` None) set to
    ``atoms``: the caller has made them name the same entries where the entry exists, and
    zeroed the factor (or added a relation) where they do not."""
    new = tuple(atoms) if k is None else term.out[axis][:k] + (atoms,) + term.out[axis][k + 1:]
    return replace(term, out=term.out[:axis] + (new,) + term.out[axis + 1:])


def _through(terms: tuple[Term, Term], label: int, table: "torch.Tensor", over: Atoms,
             labels: Labels) -> tuple[Term, Term]:
    """Both terms with the base label ``label`` made the function ``table`` of ``over``
    wherever they name it, the factors zeroed where the table has no entry (-1)."""
    valid = table >= 0
    every = bool(valid.all())
    out = []
    for term in terms:
        if label in labels_of(term, labels):
            term = reparametrise(term, {label: table}, tuple(over), labels)
            if not every:
                term = mask(term, valid, tuple(over), labels)
        out.append(term)
    return out[0], out[1]


def _related(outer: Term, inner: Term, axis: int, relations: list, labels: Labels) -> Term:
    """``inner`` with its output axis ``axis`` named by ``outer``'s input atoms there, and the
    relation between the two (:func:`_relation`) kept for the product."""
    relations.append(_relation(outer.inp[axis], inner.out[axis], labels, outer.like))
    return _force(inner, axis, None, outer.inp[axis])


def _identify(outer: Term, inner: Term, axis: int, k: int,
              labels: Labels) -> tuple[Term, Term] | None:
    """Make atom ``k`` of the meeting axis the same on both sides (their sizes agree); None
    where neither side's map can be re-parametrised."""
    r, l = outer.inp[axis][k], inner.out[axis][k]
    rd, ld = r in labels.derived, l in labels.derived
    if not rd and not ld:  # two base labels: one
        return tuple(substitute(t, l, r, labels) if l in labels_of(t, labels) else t
                     for t in (outer, inner))
    if rd and not ld:  # outer reads y through a map: inner's label becomes that map
        table, over = labels.derived[r]
        outer, inner = _through((outer, inner), l, table, over, labels)
        return outer, _force(inner, axis, k, r)
    if ld and not rd:  # inner places y through a map: outer reads where it placed
        table, over = labels.derived[l]
        outer, inner = _through((outer, inner), r, table, over, labels)
        return outer, _force(inner, axis, k, outer.inp[axis][k])
    table, over = labels.derived[r]
    if one_to_one(l, labels):  # inner's map read back through its inverse
        b, inverse = invert(l, labels)
        back = inverse[table.clamp(min=0)].masked_fill(table < 0, -1)
        outer, inner = _through((outer, inner), b, back, over, labels)
        return outer, _force(inner, axis, k, outer.inp[axis][k])
    table_l, over_l = labels.derived[l]
    if one_to_one(r, labels):
        b, inverse = invert(r, labels)
        back = inverse[table_l.clamp(min=0)].masked_fill(table_l < 0, -1)
        outer, inner = _through((outer, inner), b, back, over_l, labels)
        return outer, _force(inner, axis, k, outer.inp[axis][k])
    return None


def _relation(ra: Atoms, la: Atoms, labels: Labels,
              like: "torch.Tensor") -> tuple["torch.Tensor", tuple[int, ...]]:
    """``(tensor, labels)``: 1 where the atoms ``ra`` and ``la`` name the same existing entry
    (a one-hot over the base labels under both): the fallback where neither side's maps can
    be re-parametrised."""
    ir, over_r = coordinate(ra, labels, like)
    il, over_l = coordinate(la, labels, like)
    union = tuple(dict.fromkeys(over_r + over_l))
    labels.guard(labels.shape(union), like.element_size(), "an index relation")
    a, b = align(ir, over_r, union), align(il, over_l, union)
    hot = (a == b) & (a >= 0)
    return labels.made(hot.to(like.dtype).expand(labels.shape(union)).contiguous()), union


def _product(outer: Term, inner: Term, relations: list, labels: Labels) -> Term:
    """The einsum of the two factors (and any relations) once the terms meet: the labels of
    the meeting axes that neither the result's output nor its input carries are summed (their
    size, where no factor carries them either)."""
    out, inp = outer.out, inner.inp
    free = labels.base([a for ax in out for a in ax] + [a for ax in inp for a in ax])
    middle = set(labels.base(outer.inp_atoms))
    new_labels = set(free) | middle | {l for _, ls in relations for l in ls}
    ops = operands_of(outer, new_labels) + operands_of(inner, new_labels) + list(relations)
    carried = {l for _, ls in ops for l in ls}
    fl = tuple(l for l in free if l in carried)
    term = Term(out, inp, factor_of(ops, fl, labels), fl)
    uncarried = middle - set(free) - carried
    if uncarried:
        term = multiply(term, labels.size(sorted(uncarried)), labels)
    return term
