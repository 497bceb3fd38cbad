"""Structured Jacobian terms and their algebra (design.md section 5).

A :class:`Term` is the closed form of design.md section 1 carried through a whole program: the
Jacobian ``J[o, a] = d t[o] / d arg[a]`` of an intermediate tensor ``t`` is zero except where the
indices agree with one assignment ``v`` of values to integer *labels*, and there it equals a dense
``factor`` over some of those labels. Each axis of ``t`` (``out``) and of the argument (``inp``)
is named by a tuple of labels, its *atoms*, read as a mixed-radix number in C order: an axis made by
``flatten`` of axes labelled ``b`` and ``j`` has atoms ``(b, j)``, and its index is
``b * size(j) + j``. A label shared by an ``out`` atom and an ``inp`` atom is a Kronecker delta (per
sample structure stays a delta through the whole program); a label on two ``out`` atoms a diagonal.
Labels of size 1 never appear: a size-1 axis has no atoms.

Every operation of a program maps terms to terms without materialising anything: ``compose``
(an einsum with the other operands' values: matmul, sums, softmax's contraction), ``scale`` (an
elementwise derivative), ``expand`` (broadcasting), ``permute`` and ``reshape``. A tensor's
Jacobian is a list of terms (a sum); ``merge`` adds terms with the same axes into one. Only
:func:`materialise` writes sparse arrays, once, at the end.

>>> import torch
>>> labels = Labels()
>>> x = identity((2, 3), labels, torch.float64)          # d x / d x
>>> w = torch.arange(12.0, dtype=torch.float64).reshape(3, 4)
>>> j = compose(x, ((0, 1), (1, 2)), (0, 2), (2, 3, 4), 0, [None, w], labels)   # x @ w
>>> j.nnz(labels), materialise([j], (2, 4), (2, 3), labels, torch.float64).nnz
(24, 24)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np
import scipy.sparse

from . import formats, options
from .operands import _numpy_dtype
from .structure import Structure, distinct

if TYPE_CHECKING:  # annotations only
    import torch

# torch is imported inside the functions that call it: it is optional for the package and slow
# to import, and only :func:`sparsejac.jacobian_of` (which has it loaded) comes here.

Atoms = tuple[int, ...]
MAX_EINSUM_LABELS = 52  # torch.einsum's sublist format takes labels 0..51


class TooManyLabelsError(Exception):
    """An einsum over structured factors would need more than 52 distinct labels."""


class Labels:
    """The size of every label of one trace, fresh labels, and memoised splits (so that terms
    which split the same label the same way keep sharing labels and can still be merged).

    It also carries the trace's memory limit: every factor the algebra below allocates is
    checked against it first (:meth:`guard`), so an oversized term is refused with
    :class:`~sparsejac.errors.JacobianTooLargeError` instead of failing in torch's allocator."""

    def __init__(self, limit: float | None = None, prefix: str = "") -> None:
        self.sizes: dict[int, int] = {}
        self._splits: dict[tuple[int, tuple[int, ...]], Atoms] = {}
        self.limit = limit
        self.prefix = prefix  # starts the guard's messages; the tracer names the current operation

    def guard(self, shape: Sequence[int], itemsize: int, what: str = "a Jacobian factor") -> None:
        """Refuse, before it is allocated, a tensor of ``shape`` over the memory limit."""
        options.guard(
            math.prod(shape) * itemsize, self.limit, self.prefix, f"{what} of shape {tuple(shape)}"
        )

    def fresh(self, size: int) -> Atoms:
        """Atoms for a new axis of ``size``: one new label, none for size 1."""
        if size == 1:
            return ()
        label = len(self.sizes)
        self.sizes[label] = int(size)
        return (label,)

    def split(self, label: int, parts: tuple[int, ...]) -> Atoms:
        """Labels for ``label`` cut into ``parts`` (C order, product = its size)."""
        key = (label, parts)
        if key not in self._splits:
            self._splits[key] = tuple(a for p in parts for a in self.fresh(p))
        return self._splits[key]

    def merged(self, run: Atoms) -> int:
        """One label for the consecutive labels ``run`` (C order)."""
        key = (-1, run)
        if key not in self._splits:
            self._splits[key] = self.fresh(self.size(run))
        return self._splits[key][0]

    def shape(self, atoms: Sequence[int]) -> tuple[int, ...]:
        return tuple(self.sizes[a] for a in atoms)

    def size(self, atoms: Sequence[int]) -> int:
        return math.prod(self.sizes[a] for a in atoms)


@dataclass(frozen=True)
class Term:
    """One structured summand of a Jacobian: axes' atoms, and a dense factor over ``flabels``."""

    out: tuple[Atoms, ...]
    inp: tuple[Atoms, ...]
    factor: torch.Tensor
    flabels: tuple[int, ...]  # distinct, each a label of out or inp

    @property
    def out_atoms(self) -> tuple[int, ...]:
        return tuple(a for axis in self.out for a in axis)

    @property
    def inp_atoms(self) -> tuple[int, ...]:
        return tuple(a for axis in self.inp for a in axis)

    @property
    def free(self) -> tuple[int, ...]:
        """``V``: the labels its nonzeros are enumerated over."""
        return distinct(self.out_atoms + self.inp_atoms)

    def nnz(self, labels: Labels) -> int:
        """Structural nonzeros: one per assignment of values to ``V``."""
        return labels.size(self.free)


def _einsum(
    operands: Sequence[tuple[torch.Tensor, Sequence[int]]], out: Sequence[int], labels: Labels
):
    """``torch.einsum`` in sublist form over arbitrary integer labels (renamed below 52).

    Operands are contracted pairwise from the left, each step summing the labels that neither
    the output nor a later operand carries (the order torch uses without opt_einsum), so that
    every intermediate is known, and checked against the memory limit, before it is formed."""
    used = distinct([l for _, ls in operands for l in ls] + list(out))
    if len(used) > MAX_EINSUM_LABELS:
        raise TooManyLabelsError(
            f"an einsum over Jacobian factors needs {len(used)} distinct labels; torch.einsum "
            f"takes at most {MAX_EINSUM_LABELS}"
        )
    import torch

    rename = {l: k for k, l in enumerate(used)}
    size: dict[int, int] = {}
    for tensor, ls in operands:
        for l, n in zip(ls, tensor.shape):
            size[l] = max(size.get(l, 1), n)
    itemsize = max(tensor.element_size() for tensor, _ in operands)

    def step(pairs: Sequence[tuple[torch.Tensor, Sequence[int]]], keep: Sequence[int]):
        labels.guard([size[l] for l in keep], itemsize)
        args: list = [a for tensor, ls in pairs for a in (tensor, [rename[l] for l in ls])]
        return torch.einsum(*args, [rename[l] for l in keep])

    acc, acc_ls = operands[0]
    rest = list(operands[1:])
    if not rest:
        return step([(acc, acc_ls)], out)
    for i, (tensor, ls) in enumerate(rest):
        later = set(out).union(*(l for _, l in rest[i + 1 :]))
        last = i == len(rest) - 1
        keep = list(out) if last else [l for l in distinct(list(acc_ls) + list(ls)) if l in later]
        acc, acc_ls = step([(acc, acc_ls), (tensor, ls)], keep), keep
    return acc


def identity(shape: Sequence[int], labels: Labels, dtype: torch.dtype) -> Term:
    """``d x / d x``: every axis a delta with itself, factor 1."""
    import torch

    axes = tuple(labels.fresh(n) for n in shape)
    return Term(axes, axes, torch.ones((), dtype=dtype), ())


def _substitute(term: Term, old: int, new: int, labels: Labels) -> Term:
    """Identify label ``old`` with ``new`` (a diagonal): rename it, taking the factor's
    diagonal if it carries both."""
    sub = lambda atoms: tuple(new if a == old else a for a in atoms)  # noqa: E731
    fl = sub(term.flabels)
    factor = term.factor
    if len(set(fl)) < len(fl):
        fl_new = distinct(fl)
        factor = _einsum([(factor, fl)], fl_new, labels)
        fl = fl_new
    return Term(
        tuple(sub(a) for a in term.out), tuple(sub(a) for a in term.inp), factor, fl
    )


def split_label(term: Term, label: int, parts: Atoms, labels: Labels) -> Term:
    """Replace ``label`` by the finer labels ``parts`` everywhere (reshaping the factor)."""

    def sub(atoms: Atoms) -> Atoms:
        return tuple(p for a in atoms for p in (parts if a == label else (a,)))

    factor, fl = term.factor, term.flabels
    if label in fl:
        pos = fl.index(label)
        shape = tuple(factor.shape)
        if not factor.is_contiguous():  # the reshape below may copy it
            labels.guard(shape, factor.element_size())
        factor = factor.reshape(shape[:pos] + labels.shape(parts) + shape[pos + 1 :])
        fl = fl[:pos] + parts + fl[pos + 1 :]
    return Term(tuple(sub(a) for a in term.out), tuple(sub(a) for a in term.inp), factor, fl)


def densify(term: Term, shape: Sequence[int], labels: Labels) -> Term:
    """The term with its output side made dense and private, reshaped to ``shape``.

    The fallback for reshapes and diagonals that do not fall on atom boundaries: every output
    atom is replaced by a fresh label tied to the old one by an identity matrix, which costs
    ``prod(shape)`` times the input side's distinct size in the factor."""
    import torch

    occ = term.out_atoms
    private = [labels.fresh(labels.sizes[a])[0] for a in occ]
    for a in occ:
        labels.guard((labels.sizes[a],) * 2, term.factor.element_size(), "an identity matrix")
    eyes = [
        (torch.eye(labels.sizes[a], dtype=term.factor.dtype), (p, a))
        for p, a in zip(private, occ)
    ]
    carried = set(term.flabels) | set(occ)
    keep_inp = [l for l in distinct(term.inp_atoms) if l in carried]
    factor = _einsum([(term.factor, term.flabels)] + eyes, private + keep_inp, labels)
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
        factor = factor.permute(order).reshape(
            tuple(factor.shape[i] for i in rest) + (labels.size(run),)
        )
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
        return Term(out, term.inp, term.factor.new_zeros(()), ())
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


def _on_atoms(value: torch.Tensor, axes: Sequence[Atoms], labels: Labels):
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
    return value[tuple(index)].reshape(shape), ls


def scale(term: Term, g: torch.Tensor, labels: Labels) -> Term:
    """Multiply by ``g`` (broadcastable to the output's shape) on the output's labels: the
    Jacobian of an elementwise operation composed with the term."""
    g = g.to(term.factor.dtype)
    if g.dim() == 0 or g.numel() == 1:
        return multiply(term, g.reshape(()), labels)
    axes = term.out[len(term.out) - g.dim() :]
    gv, gl = _on_atoms(g, axes, labels)
    carried = set(term.flabels) | set(gl)
    fl = tuple(l for l in term.free if l in carried)
    factor = _einsum([(term.factor, term.flabels), (gv, gl)], fl, labels)
    return Term(term.out, term.inp, factor, fl)


def multiply(term: Term, c: "float | torch.Tensor", labels: Labels) -> Term:
    """The term times a scalar ``c`` (a new factor of the same shape)."""
    labels.guard(tuple(term.factor.shape), term.factor.element_size())
    return replace(term, factor=term.factor * c)


def _bind(term: Term, letters: Sequence[int], labels: Labels):
    """Map the einsum labels of operand ``letters`` to the term's output atoms, identifying
    atoms that a repeated letter puts on the same diagonal."""
    for _ in range(2):
        amap: dict[int, Atoms] = {}
        for d, e in enumerate(letters):
            atoms = term.out[d]
            if e not in amap:
                amap[e] = atoms
                continue
            if labels.shape(amap[e]) != labels.shape(atoms):
                break
            a, b = list(amap[e]), list(atoms)
            while a != b:
                i = next(i for i in range(len(a)) if a[i] != b[i])
                old, new = b[i], a[i]
                term = _substitute(term, old, new, labels)
                a = [new if x == old else x for x in a]
                b = [new if x == old else x for x in b]
                amap = {k: tuple(new if x == old else x for x in v) for k, v in amap.items()}
        else:
            return term, amap
        # A diagonal across atoms of different granularity: make each axis one atom first.
        term = densify(term, [labels.size(axis) for axis in term.out], labels)
    raise AssertionError("unreachable: after densify every axis is one atom")


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
    term, amap = _bind(term, inputs[k], labels)
    for e, n in enumerate(sizes):
        if e not in amap:
            if e not in fresh:
                fresh[e] = labels.fresh(n)
            amap[e] = fresh[e]
    ops = [(term.factor, term.flabels)]
    for j, value in enumerate(values):
        if j == k:
            continue
        value = value.to(term.factor.dtype)
        shape = [s for e in inputs[j] for s in labels.shape(amap[e])]
        ops.append((value.reshape(shape), [a for e in inputs[j] for a in amap[e]]))
    out = tuple(amap[e] for e in output)
    free = distinct([a for axis in out for a in axis] + list(term.inp_atoms))
    carried = {l for _, ls in ops for l in ls}
    fl = tuple(l for l in free if l in carried)
    factor = _einsum(ops, fl, labels)
    term = Term(out, term.inp, factor, fl)
    uncarried = {a for e in inputs[k] for a in amap[e]} - set(free) - carried
    if uncarried:
        term = multiply(term, labels.size(sorted(uncarried)), labels)
    return term


def _aligned(term: Term, union: Sequence[int]) -> torch.Tensor:
    """The factor with its axes in ``union`` order, size 1 for labels it does not carry."""
    order = sorted(range(len(term.flabels)), key=lambda i: union.index(term.flabels[i]))
    f = term.factor.permute(order) if order else term.factor
    shape = [f.shape[order.index(term.flabels.index(l))] if l in term.flabels else 1 for l in union]
    return f.reshape(shape)


def _signature(term: Term, labels: Labels) -> tuple:
    """The term's axes up to a renaming of labels: equal signatures, equal patterns."""
    order = term.free
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
        free = first.free
        renamed = []
        for t in group:
            rename = dict(zip(t.free, free))
            renamed.append(Term(first.out, first.inp, t.factor,
                                tuple(rename[l] for l in t.flabels)))
        present = {l for t in renamed for l in t.flabels}
        union = tuple(l for l in free if l in present)
        aligned = [_aligned(t, union) for t in renamed]
        # each partial sum is a new tensor of the broadcast shape (at most the union's)
        labels.guard(
            torch.broadcast_shapes(*(a.shape for a in aligned)),
            max(a.element_size() for a in aligned),
        )
        total = aligned[0]
        for a in aligned[1:]:
            total = total + a
        merged.append(Term(first.out, first.inp, total, union))
    return merged


def _structure(term: Term, labels: Labels) -> tuple[Structure, tuple[int, ...]]:
    used = distinct(term.out_atoms + term.inp_atoms)
    rename = {l: k for k, l in enumerate(used)}
    structure = Structure(
        tuple(rename[a] for a in term.out_atoms),
        tuple(rename[a] for a in term.inp_atoms),
        tuple(labels.sizes[l] for l in used),
        tuple(rename[l] for l in term.free if l in term.flabels),
    )
    return structure, tuple(rename[l] for l in term.flabels)


def _numpy_factor(term: Term, dtype: "torch.dtype") -> np.ndarray:
    return term.factor.detach().to(dtype).resolve_conj().resolve_neg().numpy()


def materialise(
    terms: Sequence[Term],
    out_shape: Sequence[int],
    inp_shape: Sequence[int],
    labels: Labels,
    dtype: "torch.dtype",
) -> scipy.sparse.csr_array:
    """The sum of ``terms`` as a canonical CSR array of shape ``(out.size, arg.size)``.

    Each term's pattern and values are written directly (:mod:`sparsejac.formats`); several terms
    are summed as coordinates so that the stored entries are the union of their structural
    nonzeros (a sum that happens to be zero stays stored, as elsewhere in the package).
    :func:`materialise_nbytes` predicts what this allocates: keep the two in step."""
    shape = (math.prod(out_shape), math.prod(inp_shape))

    np_dtype = _numpy_dtype(dtype)
    structures = [_structure(term, labels) for term in terms]
    if not terms:
        return scipy.sparse.csr_array(shape, dtype=np_dtype)
    if len(terms) == 1:
        (structure, fl), = structures
        pattern = formats.csr_pattern(structure)
        data = np.empty(structure.nnz, dtype=np_dtype)
        formats.fill_values(structure, _numpy_factor(terms[0], dtype), fl, data)
        return formats.container("csr", pattern, data, (shape[0],), (shape[1],))
    # Several terms: every term's coordinates and values go straight into one COO array of all
    # their entries, one term's pattern alive at a time; scipy sums the duplicates.
    total = sum(structure.nnz for structure, _ in structures)
    idx = formats.index_dtype(0, shape)  # scipy narrows wider coordinates (a copy): match it
    rows, cols = np.empty(total, idx), np.empty(total, idx)
    data = np.empty(total, np_dtype)
    start = 0
    for term, (structure, fl) in zip(terms, structures):
        stop = start + structure.nnz
        pattern = formats.csr_pattern(structure)
        cols[start:stop] = pattern.indices
        rows[start:stop] = np.repeat(np.arange(shape[0], dtype=idx), np.diff(pattern.indptr))
        del pattern
        formats.fill_values(structure, _numpy_factor(term, dtype), fl, data[start:stop])
        start = stop
    coo = scipy.sparse.coo_array((data, (rows, cols)), shape=shape)
    del rows, cols, data
    return coo.tocsr()  # canonical: sums duplicates, keeping sums that are zero


def _pattern_nbytes(structure: Structure, shape: tuple[int, int]) -> tuple[int, int]:
    """``(peak, kept)`` bytes of :func:`formats.csr_pattern`: ``indices`` and ``indptr``, and
    before them the two index tables it broadcasts, then ``indptr``'s temporaries (see there)."""
    nnz = structure.nnz
    idx = formats.index_dtype(nnz, shape).itemsize
    tables = 0
    if nnz:  # as csr_pattern: the tables only for a nonempty pattern
        head, tail = formats.index_tables(structure)
        tables = 2 * (math.prod(n for n, _ in head) + math.prod(n for n, _ in tail)) * idx
    rows = distinct(structure.rows)
    hit = 0  # a diagonal on the row side: the int64 indices of the rows it hits
    if len(rows) < len(structure.rows):
        hit = 2 * math.prod(structure.sizes[l] for l in rows) * 8
    indptr = (shape[0] + 1) * idx
    return nnz * idx + max(tables, 2 * indptr + hit), nnz * idx + indptr


def _copy_nbytes(term: Term, structure: Structure, fl: Sequence[int], dtype: "torch.dtype") -> int:
    """Bytes of the copies of a factor that writing its values makes: the cast to ``dtype``,
    and :meth:`Structure.spread`'s contiguous layout in ``V`` order (when it is not already)."""
    factor = term.factor
    itemsize = dtype.itemsize
    size = factor.numel() * itemsize
    cast = size if factor.dtype != dtype else 0
    if factor.dim() == 0:
        return cast
    free = structure.free
    order = sorted(range(len(fl)), key=lambda axis: free.index(fl[axis]))
    laid_out = factor.permute(order).is_contiguous()
    small = factor.numel() * 16 <= max(structure.nnz, 1) or factor.numel() <= 1 << 23
    return cast + (size if small and not laid_out else 0)


def materialise_nbytes(
    terms: Sequence[Term],
    out_shape: Sequence[int],
    inp_shape: Sequence[int],
    labels: Labels,
    dtype: "torch.dtype",
) -> tuple[int, int]:
    """``(peak, kept)``: the bytes :func:`materialise` holds at its peak, and those its result
    keeps. Exact for one term (up to small Python objects); for several, an upper bound that
    takes no two terms to share an entry."""

    itemsize = dtype.itemsize
    shape = (math.prod(out_shape), math.prod(inp_shape))
    nrows, ncols = shape
    if not terms:
        return (nrows + 1) * 4, (nrows + 1) * 4
    structures = [_structure(term, labels) for term in terms]
    copies = [_copy_nbytes(t, s, fl, dtype) for t, (s, fl) in zip(terms, structures)]
    patterns = [_pattern_nbytes(s, shape) for s, _ in structures]
    if len(terms) == 1:
        nnz = structures[0][0].nnz
        (peak, kept), copy = patterns[0], copies[0]
        return max(peak, kept + nnz * itemsize + copy), kept + nnz * itemsize
    n = sum(s.nnz for s, _ in structures)
    idx = formats.index_dtype(0, shape).itemsize
    coo = n * (2 * idx + itemsize)
    fill = coo + max(
        max(peak, kept + nrows * (idx + formats.index_dtype(s.nnz, shape).itemsize)  # arange, diff
            + s.nnz * idx, copy)  # the repeated row indices; then the factor's copies
        for (s, _), (peak, kept), copy in zip(structures, patterns, copies)
    )
    # tocsr: indices as wide as the entries need (a cast of the coordinates if wider), then
    # sum_duplicates' pruning copy, which it makes only when under half the entries remain:
    # never where one term alone has half of them (the union holds every term's entries)
    idx2 = 8 if idx == 8 or max(n, ncols) > formats.INT32_MAX else 4
    cast = 2 * n * idx2 if idx2 != idx else 0
    csr = n * (idx2 + itemsize) + (nrows + 1) * idx2
    prune = 0 if max(s.nnz for s, _ in structures) >= n // 2 else n // 2 * (idx2 + itemsize)
    return max(fill, coo + csr + max(cast, prune)), csr
