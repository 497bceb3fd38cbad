"""The writer that every merged block can fall back on: each term's coordinates and values
written into one COO array of all their entries, one term alive at a time, and the duplicates
summed (scipy's COO to CSR).

Several terms not nested in one, or index maps with several entries in a row (a window's
entries that land on one place), go this way. A plan keeps the merged pattern and where each
entry lands in it (its slot), so that a refill sums the new values at the slots
(``np.bincount``). This module reads terms (their public names in
:mod:`sparsejac.programs.terms`) and the formats; it never imports the tracer or the rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse

from ... import formats
from ...operands import numpy_dtype
from .. import terms as T
from .base import CSR
from .merged import Merged
from .plans import KeptCsr
from .structured import copy_nbytes, numpy_factor, structure_of

if TYPE_CHECKING:  # annotations only
    import torch


def write_plain(term: T.Term, labels: T.Labels, dtype: "torch.dtype", shape: tuple[int, int],
                rows: np.ndarray, cols: np.ndarray, data: np.ndarray,
                start: int) -> tuple[int, None]:
    """Write a term without index maps into the entries from ``start`` on (its pattern's
    coordinates, its values spread from the factor); returns where they end (and None: every
    entry kept)."""
    structure, fl = structure_of(term, labels)
    stop = start + structure.nnz
    pattern = formats.csr_pattern(structure)
    cols[start:stop] = pattern.indices
    rows[start:stop] = formats.csr_rows(pattern.indptr, rows.dtype)
    del pattern
    formats.fill_values(structure, numpy_factor(term, dtype), fl, data[start:stop])
    return stop, None


def write_mapped(term: T.Term, labels: T.Labels, dtype: "torch.dtype", shape: tuple[int, int],
                 rows: np.ndarray, cols: np.ndarray, data: np.ndarray,
                 start: int) -> tuple[int, np.ndarray | None]:
    """Write a term with index maps into the entries from ``start`` on, those without a place
    dropped (the kept entries moved up, in order); returns where they end, and the flags of
    the entries kept (None: all). The coordinates are written in place
    (:func:`terms.coordinates_into`), the values read from the factor broadcast over ``V``:
    nothing ``V``-sized is made but the dropped entries' flags and the kept ones' positions."""
    m = term.nnz(labels)
    stop = start + m
    keep = T.coordinates_into(term, labels, rows[start:stop], cols[start:stop])
    free = term.free(labels)
    shape_v = labels.shape(free)
    factor = T.align(term.factor.detach(), term.flabels, free).to(dtype).cpu()
    spread = np.broadcast_to(factor.resolve_conj().resolve_neg().numpy(), shape_v)
    if keep is None:  # every entry has a place: the spread written as it is, no temporary
        np.copyto(data[start:stop].reshape(shape_v), spread)
        return stop, None
    kept = np.flatnonzero(keep)
    stop = start + len(kept)
    for a in (rows, cols):  # the kept entries moved up (a gather, then the copy)
        a[start:stop] = a[start:start + m][kept]
    if spread.flags.c_contiguous:  # the factor spans V in its order: read at the kept
        data[start:stop] = spread.reshape(-1)[kept]
    else:  # a broadcast or permuted view: a boolean read, not a flat copy of all of V
        data[start:stop] = spread[keep.reshape(shape_v)]
    return stop, keep


def _term_nbytes(term: T.Term, labels: T.Labels, dtype: "torch.dtype", shape: tuple[int, int],
                 idx: int) -> int:
    """Bytes one term's writer (:func:`write_plain`, :func:`write_mapped`) allocates beside
    the COO arrays it writes into."""
    itemsize = dtype.itemsize
    if not term.mapped(labels):  # its pattern, its rows; the factor's copies
        s, fl = structure_of(term, labels)
        pattern = CSR.nbytes(s.nnz, s.rows_shape, s.cols_shape, 0)
        pidx = formats.index_dtype(s.nnz, shape).itemsize
        rows = formats.csr_rows_nbytes(shape[0], s.nnz, idx, pidx)
        return max(CSR.pattern_peak_nbytes(s), pattern + rows, copy_nbytes(term, s, fl, dtype))
    m = term.nnz(labels)
    factor = term.factor
    cast = (factor.numel() * itemsize
            if factor.dtype != dtype or factor.device.type != "cpu" else 0)
    if not any(labels.derived[a][0].min() < 0
               for a in term.out_atoms + term.inp_atoms if a in labels.derived):
        return cast  # coordinates in place, values copied from the broadcast factor
    # the dropped entries' marks (at most V's size), the kept flags (their broadcast copy and
    # its negation), then the kept positions beside the flags: one gather of coordinates at
    # a time, or the factor's copy and the values read
    return max(3 * m, m + 8 * m + max(m * idx, cast + m * itemsize))


class ByCoordinates(Merged):
    """Terms merged through the coordinates of all their entries, duplicates summed."""

    slot = keeps = counts = None  # a plan's: each entry's place, each term's kept entries

    def entries(self, terms, shape, labels, dtype):
        """``(rows, cols, data, stop, keeps)``: every term's entries written one after the
        other (the first ``stop``; a bound is allocated where an index map drops entries), and
        each term's flags of those it keeps (None: all)."""
        total = sum(t.nnz(labels) for t in terms)
        idx = formats.index_dtype(0, shape)  # scipy narrows wider coordinates (a copy): match it
        rows, cols = np.empty(total, idx), np.empty(total, idx)
        data = np.empty(total, numpy_dtype(dtype))
        start, keeps = 0, []
        for term in terms:
            write = write_mapped if term.mapped(labels) else write_plain
            start, keep = write(term, labels, dtype, shape, rows, cols, data, start)
            keeps.append(keep)
        return rows, cols, data, start, keeps

    def merge(self, terms, shape, labels, dtype):
        if not terms:
            return scipy.sparse.csr_array(shape, dtype=numpy_dtype(dtype))
        rows, cols, data, stop, _ = self.entries(terms, shape, labels, dtype)
        coo = scipy.sparse.coo_array((data[:stop], (rows[:stop], cols[:stop])), shape=shape)
        del rows, cols, data
        return coo.tocsr()  # canonical: sums duplicates, keeping sums that are zero

    def merge_nbytes(self, terms, shape, labels, dtype):
        """Exact for the COO arrays; a bound for the rest, which takes every entry enumerated
        to be stored: each term's writer beside them, then scipy's conversion."""
        nrows, ncols = shape
        if not terms:
            return (nrows + 1) * 4, (nrows + 1) * 4
        itemsize = dtype.itemsize
        mapped = any(t.mapped(labels) for t in terms)
        n = sum(t.nnz(labels) for t in terms)
        idx = formats.index_dtype(0, shape).itemsize
        coo = n * (2 * idx + itemsize)
        fill = coo + max(_term_nbytes(t, labels, dtype, shape, idx) for t in terms)
        # tocsr: indices as wide as the entries need (a cast of the coordinates if wider),
        # then sum_duplicates' pruning copy, which it makes only when under half the entries
        # remain: never where one plain term alone has half of them (the union holds every
        # term's entries); an index map may send many of a term's entries to one place (or
        # none)
        idx2 = 8 if idx == 8 or max(n, ncols) > formats.INT32_MAX else 4
        cast = 2 * n * idx2 if idx2 != idx else 0
        csr = n * (idx2 + itemsize) + (nrows + 1) * idx2
        halves = not mapped and max(t.nnz(labels) for t in terms) >= n // 2
        prune = 0 if halves else n // 2 * (idx2 + itemsize)
        return max(fill, coo + csr + max(cast, prune)), csr

    def keep(self, terms, labels, dtype) -> KeptCsr:
        """The merge's pattern, and each entry's place in it (found from the entries'
        coordinates in the merged rows' order)."""
        shape = self.matrix_shape
        for term in terms:  # as the refill's values, every entry of a mapped term at once
            if term.mapped(labels):
                labels.guard((3,) + tuple(labels.shape(term.free(labels))), 8,
                             "the entries of an index-mapped term")
        if terms:
            rows, cols, data, stop, self.keeps = self.entries(terms, shape, labels, dtype)
            key = rows[:stop].astype(np.int64) * shape[1] + cols[:stop]
            csr = scipy.sparse.coo_array((data[:stop], (rows[:stop], cols[:stop])),
                                         shape=shape).tocsr()
            del rows, cols, data
            merged = formats.csr_rows(csr.indptr) * shape[1] + csr.indices
            self.slot = np.searchsorted(merged, key)
        else:
            csr, self.keeps = scipy.sparse.csr_array(shape, dtype=numpy_dtype(dtype)), []
            self.slot = np.zeros(0, dtype=np.int64)
        self.counts = [None if not t.mapped(labels) else (t.nnz(labels) if k is None
                                                          else int(np.count_nonzero(k)))
                       for t, k in zip(terms, self.keeps)]
        pattern = formats.CompressedPattern(csr.indices, csr.indptr, shape)
        self.kept = KeptCsr(pattern, self.out_shape, self.inp_shape)
        return self.kept

    def values(self, terms, labels, dtype) -> np.ndarray:
        """Each term's values (a plain term's spread from its factor, a mapped term's those it
        keeps) summed at their slots."""
        import torch

        np_dtype = numpy_dtype(dtype)
        if not terms:
            return np.zeros(0, dtype=np_dtype)
        parts = []
        for term, keep in zip(terms, self.keeps):
            if not term.mapped(labels):
                s, fl = structure_of(term, labels)
                d = np.empty(s.nnz, dtype=np_dtype)
                formats.fill_values(s, numpy_factor(term, dtype), fl, d)
                parts.append(d)
            else:
                keep = None if keep is None else torch.from_numpy(keep).to(term.factor.device)
                parts.append(T.values(term, labels, dtype, keep).detach().cpu().numpy())
        return np.bincount(self.slot, weights=np.concatenate(parts),
                           minlength=self.kept.nnz).astype(np_dtype)

    def values_nbytes(self, terms, labels, dtype):
        """Each term's values, their concatenation, ``np.bincount``'s float64 weights and
        sums, and the cast back."""
        it = np.dtype(numpy_dtype(dtype)).itemsize
        nnz = self.kept.nnz
        if not terms:
            return 0, 0
        parts = peak = 0
        for term, kept in zip(terms, self.counts):
            if kept is None:  # plain: written by its structure, as the first call
                s, fl = structure_of(term, labels)
                n = s.nnz * it
                peak = max(peak, parts + n + copy_nbytes(term, s, fl, dtype))
            else:  # mapped: the factor cast, spread over V (a copy unless it is V), kept
                free = term.free(labels)
                size = labels.size(free)
                cast = term.factor.numel() * it if term.factor.dtype != dtype else 0
                order = [term.flabels.index(l) for l in free if l in term.flabels]
                view = (term.factor.numel() == size
                        and term.factor.permute(order).is_contiguous())
                n = kept * it
                peak = max(peak, parts + cast + (0 if view else size * it) + n)
            parts += n
        wide = parts // it * 8 if it != 8 else 0  # bincount reads its weights as float64
        peak = max(peak, 2 * parts + wide + nnz * 8, parts + nnz * (8 + it))
        return peak, nnz * it
