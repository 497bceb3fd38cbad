"""The writer of index-mapped sums whose terms have at most one entry in each row (shifts,
strides, slices: Rosenbrock's and a stencil's Hessian, a slice's Jacobian): the union merged
row by row, without coordinates of all entries.

:func:`rows_pattern` writes one column per term and row and merges them row by row into the
union's canonical CSR pattern, with, for each term, the slot of each of its entries in it;
the values are then added at the slots (one entry a row: distinct slots, a plain indexed add).
A plan keeps the slots, so a refill is the adds alone. This module reads terms (their public
names in :mod:`sparsejac.programs.terms`) and the formats; it never imports the tracer or the
rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from ... import formats
from ...operands import numpy_dtype
from .. import terms as T
from .base import canonical_csr
from .merged import Merged
from .plans import KeptCsr

if TYPE_CHECKING:  # annotations only
    import torch


def rows_injective(term: T.Term, labels: T.Labels) -> bool:
    """Whether the term has at most one entry in each row: every base label of ``V`` can be
    read back from the output side (a plain atom there, or an injective index map of it
    alone), so distinct assignments of ``V`` land on distinct rows."""
    read = set()
    for a in term.out_atoms:
        if a not in labels.derived:
            read.add(a)
        elif T.one_to_one(a, labels):
            read.add(labels.derived[a][1][0])
    return set(term.free(labels)) <= read


def by_rows_applies(terms: Sequence[T.Term], shape: tuple[int, int], labels: T.Labels) -> bool:
    """Whether :func:`rows_pattern` writes these terms: each has at most one entry per row,
    and its per-row tables (one column per term and row) are not much larger than the
    coordinates of every entry would be (few entries in many rows go by coordinates)."""
    n = sum(t.nnz(labels) for t in terms)
    return (len(terms) * shape[0] <= 4 * max(n, 1)
            and all(rows_injective(t, labels) for t in terms))


def rows_pattern(terms: Sequence[T.Term], shape: tuple[int, int], labels: T.Labels):
    """``(indptr, indices, slots, keeps)``: the canonical CSR pattern of the union of terms
    that have at most one entry per row (:func:`rows_injective`), built without coordinates
    of the union: one column per term and row, merged row by row. ``slots[k]`` is where each
    kept entry of term ``k`` (in :func:`terms.placed_numpy`'s order, ``keeps[k]`` the entries
    kept, None for all) lands in the data; within one term the slots are distinct (one entry
    a row). :func:`rows_pattern_nbytes` predicts what this and the values' adds allocate."""
    nrows, ncols = shape
    n = sum(t.nnz(labels) for t in terms)
    idx = formats.index_dtype(n, shape)
    cols = np.full((len(terms), nrows), -1, dtype=idx)  # term k's column in each row, or -1
    rows, keeps = [], []
    for k, term in enumerate(terms):
        r, c, keep = T.placed_numpy(term, labels)
        if keep is not None:
            r, c = r[keep], c[keep]
        cols[k, r] = c
        del c
        rows.append(r.astype(idx))  # int64 from the index maps: narrowed for the slots
        keeps.append(keep)
        del r
    # ``same[k]``: the first term with term k's column in every row (terms through the same
    # maps: Rosenbrock's two diagonal steps), whose places term k shares
    same = list(range(len(terms)))
    for k in range(1, len(terms)):
        same[k] = next((j for j in range(k) if same[j] == j and np.array_equal(cols[j], cols[k])),
                       k)
    unique = [k for k in range(len(terms)) if same[k] == k]
    # ``new[k]``: term k's column is one no earlier term has in that row (the union's entry)
    new = cols >= 0
    for k in range(len(terms)):
        if same[k] != k:
            new[k] = False
            continue
        for j in unique:
            if j >= k:
                break
            new[k] &= cols[j] != cols[k]
    indptr = np.zeros(nrows + 1, dtype=idx)
    np.cumsum(new.sum(0, dtype=idx), out=indptr[1:])
    indices = np.empty(int(indptr[-1]), dtype=idx)
    slots: list = [None] * len(terms)
    rank = np.empty(nrows, dtype=idx)
    for k in unique:
        # the place of term k's column in its row: the union's columns below it come first
        np.copyto(rank, indptr[:-1])
        for j in unique:
            if j != k:
                rank += new[j] & (cols[j] < cols[k])
        indices[rank[new[k]]] = cols[k][new[k]]
        for m in range(k, len(terms)):
            if same[m] == k:
                slots[m] = rank[rows[m]]
                rows[m] = None
    return indptr, indices, slots, keeps


def placed_numpy_nbytes(term: T.Term, labels: T.Labels) -> int:
    """A bound on what :func:`terms.placed_numpy` allocates for ``term``: per side, the mixed-radix
    sums of several atoms, the copy of a side that does not span ``V``, the marks of entries
    without a place; then what is kept of the rows and columns (tables are read in place)."""
    free = term.free(labels)
    m = labels.size(free)
    total, marked = 0, False
    for axes in (term.out, term.inp):
        atoms = [a for ax in axes for a in ax]
        total += 2 * 8 * m * max(len(atoms) - 1, 0)
        derived = [a for a in atoms if a in labels.derived]
        if len(atoms) != 1 or set(labels.base(atoms)) != set(free):
            total += 8 * m  # broadcast to V: a copy
        for a in derived:
            if labels.derived[a][0].min() < 0:
                marked = True
                total += 2 * m
    if marked:  # the kept flags, and the kept rows and columns
        total += m + 2 * 8 * m
    return total


def rows_pattern_nbytes(terms: Sequence[T.Term], shape: tuple[int, int], labels: T.Labels,
                        dtype: "torch.dtype") -> tuple[int, int]:
    """``(peak, kept)`` bytes of :meth:`ByRows.merge`, :func:`rows_pattern` (a bound: an
    entry enumerated counts as kept): the per-row tables (a column and a flag per term and
    row); first one term's coordinates at a time beside the rows of those before it; then the
    merge's row-sized temporaries, the pattern and the slots (which replace the rows); last,
    the values beside the slots, each term's values with its copy and numpy's indexed add."""
    nrows = shape[0]
    sizes = [t.nnz(labels) for t in terms]
    n, big = sum(sizes), max(sizes)
    idx = formats.index_dtype(n, shape).itemsize
    itemsize = dtype.itemsize
    tables = len(terms) * nrows * (idx + 1)
    first = tables + max(sum(sizes[:k]) * idx + placed_numpy_nbytes(t, labels) + m * idx
                         for k, (t, m) in enumerate(zip(terms, sizes)))
    pattern = (nrows + 1) * idx + n * idx  # indptr, indices (the union: at most every entry)
    merge = tables + (n + big) * idx + nrows * (3 * idx + 2) + pattern
    kept = pattern + n * itemsize
    values = kept + n * idx + 2 * big * itemsize
    return max(first, merge, values), kept


def add_values(data: np.ndarray, terms: Sequence[T.Term], slots, keeps, labels: T.Labels,
               dtype: "torch.dtype") -> np.ndarray:
    """Add each term's values (:func:`terms.values`' order, ``keeps[k]``: those kept) at its
    ``slots[k]`` in ``data`` (distinct slots within a term: a plain indexed add)."""
    import torch

    for term, slot, keep in zip(terms, slots, keeps):
        v = T.values(term, labels, dtype, None if keep is None else torch.from_numpy(keep))
        data[slot] += v.detach().cpu().resolve_conj().resolve_neg().numpy()
    return data


class ByRows(Merged):
    """Index-mapped terms of at most one entry a row (:func:`by_rows_applies`), merged row by
    row (:func:`rows_pattern`); for a plan, the pattern and each term's slots are kept."""

    slots = keeps = None  # a plan's: where each term's kept values go, and which it keeps

    def merge(self, terms, shape, labels, dtype):
        indptr, indices, slots, keeps = rows_pattern(terms, shape, labels)
        data = np.zeros(len(indices), dtype=numpy_dtype(dtype))
        return canonical_csr(add_values(data, terms, slots, keeps, labels, dtype), indices,
                             indptr, shape)

    def merge_nbytes(self, terms, shape, labels, dtype):
        return rows_pattern_nbytes(terms, shape, labels, dtype)

    def keep(self, terms, labels, dtype) -> KeptCsr:
        indptr, indices, self.slots, self.keeps = rows_pattern(terms, self.matrix_shape, labels)
        pattern = formats.CompressedPattern(indices, indptr, self.matrix_shape)
        self.kept = KeptCsr(pattern, self.out_shape, self.inp_shape)
        return self.kept

    def values(self, terms, labels, dtype) -> np.ndarray:
        data = np.zeros(self.kept.nnz, dtype=numpy_dtype(dtype))
        return add_values(data, terms, self.slots, self.keeps, labels, dtype)

    def values_nbytes(self, terms, labels, dtype):
        """Each term's values added at its slots: its values, numpy's gather of
        ``data[slot]`` and the sum (a bound: every entry of a term kept)."""
        it = np.dtype(numpy_dtype(dtype)).itemsize
        nnz = self.kept.nnz * it
        return nnz + max(3 * t.nnz(labels) * it for t in terms), nnz
