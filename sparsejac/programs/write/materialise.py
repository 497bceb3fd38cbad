"""Write the sum of a block's terms as one canonical CSR array, and predict its bytes.

This is the writer that every path can fall back on: Hessian blocks that are averaged with their
transposes, blocks used transposed, and index-mapped sums merged row by row or through
coordinates. It reads terms (:mod:`sparsejac.programs.terms`) and writes arrays; it never
imports the tracer or the rules.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
import scipy.sparse

from ... import formats
from ...operands import numpy_dtype
from ...structure import Structure, distinct
from ..terms import Labels, Term, align, coordinates_into, one_to_one, placed_numpy, values

if TYPE_CHECKING:  # annotations only
    import torch


def structure_of(term: Term, labels: Labels) -> tuple[Structure, tuple[int, ...]]:
    used = distinct(term.out_atoms + term.inp_atoms)
    rename = {l: k for k, l in enumerate(used)}
    structure = Structure(
        tuple(rename[a] for a in term.out_atoms),
        tuple(rename[a] for a in term.inp_atoms),
        tuple(labels.sizes[l] for l in used),
        tuple(rename[l] for l in term.free(labels) if l in term.flabels),
    )
    return structure, tuple(rename[l] for l in term.flabels)


def numpy_factor(term: Term, dtype: "torch.dtype") -> np.ndarray:
    return term.factor.detach().to(dtype).cpu().resolve_conj().resolve_neg().numpy()


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

    np_dtype = numpy_dtype(dtype)
    if not terms:
        return scipy.sparse.csr_array(shape, dtype=np_dtype)
    mapped = any(t.mapped(labels) for t in terms)
    if mapped and by_rows_applies(terms, shape, labels):
        indptr, indices, slots, keeps = rows_pattern(terms, shape, labels)
        data = np.zeros(len(indices), dtype=np_dtype)
        for term, slot, keep in zip(terms, slots, keeps):
            add_values(data, slot, term, labels, dtype, keep)
        return canonical_csr(data, indices, indptr, shape)
    if len(terms) == 1 and not mapped:
        structure, fl = structure_of(terms[0], labels)
        pattern = formats.csr_pattern(structure)
        data = np.empty(structure.nnz, dtype=np_dtype)
        formats.fill_values(structure, numpy_factor(terms[0], dtype), fl, data)
        return formats.container("csr", pattern, data, (shape[0],), (shape[1],))
    # Several terms, or index maps (a window's entries that land on one place): every term's
    # coordinates and values go straight into one COO array of all their entries, one term's
    # alive at a time; scipy sums the duplicates.
    total = sum(t.nnz(labels) for t in terms)  # a bound where an index map drops entries
    idx = formats.index_dtype(0, shape)  # scipy narrows wider coordinates (a copy): match it
    rows, cols = np.empty(total, idx), np.empty(total, idx)
    data = np.empty(total, np_dtype)
    start = 0
    for term in terms:
        write = _materialise_mapped if term.mapped(labels) else _materialise_plain
        start = write(term, labels, dtype, shape, rows, cols, data, start)
    coo = scipy.sparse.coo_array((data[:start], (rows[:start], cols[:start])), shape=shape)
    del rows, cols, data
    return coo.tocsr()  # canonical: sums duplicates, keeping sums that are zero


def _materialise_plain(term: Term, labels: Labels, dtype: "torch.dtype", shape: tuple[int, int],
                 rows: np.ndarray, cols: np.ndarray, data: np.ndarray, start: int) -> int:
    """Write a term without index maps into the entries from ``start`` on (its pattern's
    coordinates, its values spread from the factor); returns where they end."""
    structure, fl = structure_of(term, labels)
    stop = start + structure.nnz
    pattern = formats.csr_pattern(structure)
    cols[start:stop] = pattern.indices
    rows[start:stop] = formats.csr_rows(pattern.indptr, rows.dtype)
    del pattern
    formats.fill_values(structure, numpy_factor(term, dtype), fl, data[start:stop])
    return stop


def _materialise_mapped(term: Term, labels: Labels, dtype: "torch.dtype", shape: tuple[int, int],
                        rows: np.ndarray, cols: np.ndarray, data: np.ndarray, start: int) -> int:
    """Write a term with index maps into the entries from ``start`` on, those without a place
    dropped (the kept entries moved up, in order); returns where they end. The coordinates
    are written in place (:func:`coordinates_into`), the values read from the factor
    broadcast over ``V``: nothing ``V``-sized is made but the dropped entries' flags and the
    kept ones' positions."""
    m = term.nnz(labels)
    stop = start + m
    keep = coordinates_into(term, labels, rows[start:stop], cols[start:stop])
    free = term.free(labels)
    shape_v = labels.shape(free)
    factor = align(term.factor.detach(), term.flabels, free).to(dtype).cpu()
    spread = np.broadcast_to(factor.resolve_conj().resolve_neg().numpy(), shape_v)
    if keep is None:  # every entry has a place: the spread written as it is, no temporary
        np.copyto(data[start:stop].reshape(shape_v), spread)
        return stop
    kept = np.flatnonzero(keep)
    stop = start + len(kept)
    for a in (rows, cols):  # the kept entries moved up (a gather, then the copy)
        a[start:stop] = a[start:start + m][kept]
    if spread.flags.c_contiguous:  # the factor spans V in its order: read at the kept
        data[start:stop] = spread.reshape(-1)[kept]
    else:  # a broadcast or permuted view: a boolean read, not a flat copy of all of V
        data[start:stop] = spread[keep.reshape(shape_v)]
    return stop


def canonical_csr(data, indices, indptr, shape) -> scipy.sparse.csr_array:
    """A CSR array around arrays that are canonical by construction (no copy, no scan)."""
    csr = scipy.sparse.csr_array((data, indices, indptr), shape=shape, copy=False)
    csr.has_sorted_indices = True
    csr.has_canonical_format = True
    return csr


def rows_injective(term: Term, labels: Labels) -> bool:
    """Whether the term has at most one entry in each row: every base label of ``V`` can be
    read back from the output side (a plain atom there, or an injective index map of it
    alone), so distinct assignments of ``V`` land on distinct rows."""
    read = set()
    for a in term.out_atoms:
        if a not in labels.derived:
            read.add(a)
        elif one_to_one(a, labels):
            read.add(labels.derived[a][1][0])
    return set(term.free(labels)) <= read


def by_rows_applies(terms: Sequence[Term], shape: tuple[int, int], labels: Labels) -> bool:
    """Whether :func:`rows_pattern` writes these terms: each has at most one entry per row,
    and its per-row tables (one column per term and row) are not much larger than the
    coordinates of every entry would be (few entries in many rows go by coordinates)."""
    n = sum(t.nnz(labels) for t in terms)
    return (len(terms) * shape[0] <= 4 * max(n, 1)
            and all(rows_injective(t, labels) for t in terms))


def rows_pattern(terms: Sequence[Term], shape: tuple[int, int], labels: Labels):
    """``(indptr, indices, slots, keeps)``: the canonical CSR pattern of the union of terms
    that have at most one entry per row (:func:`rows_injective`), built without coordinates
    of the union: one column per term and row, merged row by row. ``slots[k]`` is where each
    kept entry of term ``k`` (in :func:`placed`'s order, ``keeps[k]`` the entries kept, None
    for all) lands in the data; within one term the slots are distinct (one entry a row).
    :func:`rows_pattern_nbytes` predicts what this allocates: keep the two in step."""
    nrows, ncols = shape
    n = sum(t.nnz(labels) for t in terms)
    idx = formats.index_dtype(n, shape)
    cols = np.full((len(terms), nrows), -1, dtype=idx)  # term k's column in each row, or -1
    rows, keeps = [], []
    for k, term in enumerate(terms):
        r, c, keep = placed_numpy(term, labels)
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


def _placed_numpy_nbytes(term: Term, labels: Labels) -> int:
    """A bound on what :func:`placed_numpy` allocates for ``term``: per side, the mixed-radix
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


def rows_pattern_nbytes(terms: Sequence[Term], shape: tuple[int, int], labels: Labels,
                        dtype: "torch.dtype") -> tuple[int, int]:
    """``(peak, kept)`` bytes of :func:`materialise` through :func:`rows_pattern` (a bound: an
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
    first = tables + max(sum(sizes[:k]) * idx + _placed_numpy_nbytes(t, labels) + m * idx
                         for k, (t, m) in enumerate(zip(terms, sizes)))
    pattern = (nrows + 1) * idx + n * idx  # indptr, indices (the union: at most every entry)
    merge = tables + (n + big) * idx + nrows * (3 * idx + 2) + pattern
    kept = pattern + n * itemsize
    values = kept + n * idx + 2 * big * itemsize
    return max(first, merge, values), kept


def add_values(data: np.ndarray, slot: np.ndarray, term: Term, labels: Labels,
               dtype: "torch.dtype", keep=None) -> None:
    """Add a term's values (:func:`values`' order, ``keep``: those kept) at ``slot`` in
    ``data`` (distinct slots: a plain indexed add)."""
    import torch

    v = values(term, labels, dtype, None if keep is None else torch.from_numpy(keep))
    data[slot] += v.detach().cpu().resolve_conj().resolve_neg().numpy()


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


def copy_nbytes(term: Term, structure: Structure, fl: Sequence[int], dtype: "torch.dtype") -> int:
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
    return cast + (size if structure.spread_copies(factor.numel()) and not laid_out else 0)


def materialise_nbytes(
    terms: Sequence[Term],
    out_shape: Sequence[int],
    inp_shape: Sequence[int],
    labels: Labels,
    dtype: "torch.dtype",
) -> tuple[int, int]:
    """``(peak, kept)``: the bytes :func:`materialise` holds at its peak, and those its result
    keeps. Exact for one term without index maps (up to small Python objects); for several,
    or through index maps, an upper bound that takes every entry enumerated to be stored."""

    itemsize = dtype.itemsize
    shape = (math.prod(out_shape), math.prod(inp_shape))
    nrows, ncols = shape
    if not terms:
        return (nrows + 1) * 4, (nrows + 1) * 4
    mapped = any(t.mapped(labels) for t in terms)
    if mapped and by_rows_applies(terms, shape, labels):
        return rows_pattern_nbytes(terms, shape, labels, dtype)
    if len(terms) == 1 and not mapped:
        structure, fl = structure_of(terms[0], labels)
        nnz = structure.nnz
        peak, kept = _pattern_nbytes(structure, shape)
        copy = copy_nbytes(terms[0], structure, fl, dtype)
        return max(peak, kept + nnz * itemsize + copy), kept + nnz * itemsize
    n = sum(t.nnz(labels) for t in terms)
    idx = formats.index_dtype(0, shape).itemsize
    coo = n * (2 * idx + itemsize)
    fill = coo + max(_materialise_term_nbytes(t, labels, dtype, shape, idx) for t in terms)
    # tocsr: indices as wide as the entries need (a cast of the coordinates if wider), then
    # sum_duplicates' pruning copy, which it makes only when under half the entries remain:
    # never where one plain term alone has half of them (the union holds every term's
    # entries); an index map may send many of a term's entries to one place (or none)
    idx2 = 8 if idx == 8 or max(n, ncols) > formats.INT32_MAX else 4
    cast = 2 * n * idx2 if idx2 != idx else 0
    csr = n * (idx2 + itemsize) + (nrows + 1) * idx2
    halves = not mapped and max(t.nnz(labels) for t in terms) >= n // 2
    prune = 0 if halves else n // 2 * (idx2 + itemsize)
    return max(fill, coo + csr + max(cast, prune)), csr


def _materialise_term_nbytes(term: Term, labels: Labels, dtype: "torch.dtype",
                             shape: tuple[int, int], idx: int) -> int:
    """Bytes one term's writer (:func:`_materialise_plain`, :func:`_materialise_mapped`)
    allocates beside the COO arrays it writes into."""
    itemsize = dtype.itemsize
    if not term.mapped(labels):  # its pattern, the repeated row indices; the factor's copies
        s, fl = structure_of(term, labels)
        peak, kept = _pattern_nbytes(s, shape)
        ramps = shape[0] * (idx + formats.index_dtype(s.nnz, shape).itemsize)  # arange, diff
        return max(peak, kept + ramps + s.nnz * idx, copy_nbytes(term, s, fl, dtype))
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
