"""Writing a :class:`~sparsejac.structure.Structure` and its values into sparse containers.

Every writer fills arrays of exactly the output's sizes, each nnz-sized array written once, by
broadcasting small per-label tables (design.md section 1: enumerating ``V`` in C order gives the
coordinates already sorted and free of duplicates). No sort, no N-D to linear conversions, and
nothing from sparse's numba kernels, so a fresh process pays no compilation.

The pattern (``indices``/``indptr`` or ``coords``) depends on the structure alone and can be kept
and reused with new values (:mod:`sparsejac.plan`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np

from .backend import NUMPY
from .structure import Structure, distinct

FORMATS = ("coo", "csr", "csc", "torch", "torch_csr")
# The shape each format takes: "coo"-like (N-D coordinates) or "csr"-like (compressed rows).
LAYOUT = {"coo": "coo", "torch": "coo", "csr": "csr", "torch_csr": "csr", "csc": "csc"}
INT32_MAX = np.iinfo(np.int32).max
INNER = 4096  # entries of the innermost table that csr_pattern broadcasts (see there)
SPREAD_COPY_LIMIT = 1 << 23  # factors up to this many elements are laid out before spreading


def index_dtype(nnz: int, shape: tuple[int, ...]) -> np.dtype:
    """int32 when ``nnz`` and every dimension fit in it, else int64.

    >>> index_dtype(2**31 - 1, (10, 10)), index_dtype(2**31, (10, 10))
    (dtype('int32'), dtype('int64'))
    """
    return np.dtype(np.int32 if max((nnz, *shape), default=0) <= INT32_MAX else np.int64)


def coo_index_itemsize(fmt: str, structure: Structure) -> int:
    """torch's sparse COO takes int64 indices only; pydata's takes the narrowest that fits."""
    return 8 if fmt == "torch" else index_dtype(structure.nnz, structure.shape).itemsize


def predicted_nbytes(structure: Structure, fmt: str, itemsize: int) -> int:
    """Bytes of the arrays a writer allocates for ``fmt`` (values of ``itemsize`` bytes)."""
    nnz = structure.nnz
    if LAYOUT[fmt] == "coo":
        return nnz * (itemsize + coo_index_itemsize(fmt, structure) * len(structure.shape))
    nrows, ncols = structure.matrix_shape
    if fmt == "csc":
        nrows, ncols = ncols, nrows
    idx = index_dtype(nnz, (nrows, ncols)).itemsize
    return nnz * (itemsize + idx) + (nrows + 1) * idx


def _ramp_nbytes(digits: "Digits", itemsize: int) -> int:
    """About the peak bytes :func:`_ramp` allocates: its table and the flat copy."""
    full = math.prod(size for size, _ in digits)
    table = math.prod(size for size, coef in digits if coef)
    return (full + table) * itemsize


def pattern_peak_nbytes(structure: Structure, fmt: str) -> int:
    """The peak bytes of building the pattern (index arrays) of ``fmt``: the arrays themselves
    and the temporaries the writer allocates alongside them (ramps, diagonal row hits)."""
    nnz = structure.nnz
    if LAYOUT[fmt] == "coo":
        idx = coo_index_itemsize(fmt, structure)
        ramp = max((structure.sizes[l] for l in structure.free), default=0) * idx
        return nnz * len(structure.shape) * idx + (ramp if nnz else 0)
    target = structure.transposed() if fmt == "csc" else structure
    nrows, ncols = target.matrix_shape
    idx = index_dtype(nnz, (nrows, ncols)).itemsize
    ramps = 0
    if nnz:
        head, tail = index_tables(target)
        ramps = _ramp_nbytes(head, idx) + _ramp_nbytes(tail, idx)
    hit = 0
    row_free = distinct(target.rows)
    if len(row_free) != len(target.rows):
        hit = _ramp_nbytes(_digits(target, target.rows, target.free[: len(row_free)]), 8)
    return nnz * idx + max(ramps, (nrows + 1) * idx + hit)


def spread_copies(structure: Structure, factor_size: int) -> bool:
    """Whether :meth:`Structure.spread` lays a non-contiguous factor of ``factor_size``
    elements out contiguously first (a copy of the factor)."""
    return factor_size * 16 <= max(structure.nnz, 1) or factor_size <= SPREAD_COPY_LIMIT


def predicted_peak(
    structure: Structure,
    fmt: str,
    itemsize: int,
    factor_nbytes: int,
    factor_owned: bool = True,
    factor_contiguous: bool = True,
    pattern: bool = True,
) -> int:
    """The peak bytes of one build of ``fmt``: the factor ``R`` (``factor_nbytes``, counted
    when the build allocates it: ``factor_owned``), the values, the laid-out copy of a
    non-contiguous factor, and the pattern with its temporaries (``pattern``: not yet built)."""
    size = factor_nbytes // max(itemsize, 1)
    copy = factor_nbytes if not factor_contiguous and spread_copies(structure, size) else 0
    patterns = pattern_peak_nbytes(structure, fmt) if pattern else 0
    owned = factor_nbytes if factor_owned else 0
    return owned + structure.nnz * itemsize + max(copy, patterns)


Digits = list  # [(size, coefficient)]: an index as a mixed-radix sum, one digit per V label


def _digits(structure: Structure, side: tuple[int, ...], free: Sequence[int]) -> Digits:
    """For each label of ``free``, its size and its coefficient in the flat index of ``side``
    (the sum of the C strides of the axes of ``side`` that carry it; 0 if none does)."""
    sizes = structure.sizes
    shape = tuple(sizes[l] for l in side)
    coef: dict[int, int] = {}
    for d, label in enumerate(side):
        coef[label] = coef.get(label, 0) + math.prod(shape[d + 1 :])
    return [(sizes[l], coef.get(l, 0)) for l in free]


def _ramp(digits: Digits, dtype, xp):
    """The flat index ``sum(value * coefficient)`` enumerated over ``digits`` in C order."""
    k = len(digits)
    table = xp.zeros((1,) * k, dtype)
    for position, (size, coef) in enumerate(digits):
        if coef:
            axis = [1] * k
            axis[position] = size
            table = table + xp.arange(size, dtype).reshape(axis) * coef
    return xp.flat(xp.broadcast_to(table, tuple(size for size, _ in digits)))


def _split_tail(digits: Digits, inner: int) -> tuple[Digits, Digits]:
    """Cut ``digits`` into a head and the shortest tail of at least ``inner`` entries, cutting
    one digit in two (``size = a * b``) where the tail would otherwise be much larger."""
    tail: Digits = []
    for position in range(len(digits) - 1, -1, -1):
        have = math.prod(size for size, _ in tail)
        if have >= inner:
            return digits[: position + 1], tail
        size, coef = digits[position]
        need = -(-inner // have)
        if size > 4 * need:
            # The smallest divisor b of size with b >= need, if one is not too large.
            for b in range(need, min(size, 16 * need) + 1):
                if size % b == 0:
                    return digits[:position] + [(size // b, coef * b)], [(b, coef)] + tail
        tail.insert(0, (size, coef))
    return [], tail


def index_tables(structure: Structure) -> tuple[Digits, Digits]:
    """The two tables :func:`csr_pattern` broadcasts into ``indices`` (as digits: a table has
    the product of their sizes entries), for callers that predict its memory."""
    return _split_tail(_digits(structure, structure.cols, structure.free), INNER)


class CompressedPattern(NamedTuple):
    """``indices`` and ``indptr`` of CSR (or CSC, as CSR of the transpose)."""

    indices: Any
    indptr: Any
    shape: tuple[int, int]


def csr_pattern(structure: Structure, xp=NUMPY) -> CompressedPattern:
    """The CSR pattern of ``structure`` as a ``(rows, cols)`` matrix, in the value order of
    :meth:`Structure.spread` (arrays of the backend ``xp``)."""
    nrows, ncols = structure.matrix_shape
    nnz = structure.nnz
    dtype = xp.index(index_dtype(nnz, (nrows, ncols)).itemsize)
    free = structure.free
    n_row = len(distinct(structure.rows))
    row_free, col_only = free[:n_row], free[n_row:]
    per_row = math.prod(structure.sizes[l] for l in col_only)

    indices = xp.empty(nnz, dtype)
    if nnz:
        # The column index is a sum over the labels of V, so split V into a head and the
        # shortest tail of at least INNER entries: index = (head part) + (tail part), one
        # broadcast add of two small tables (about nnz / INNER and INNER entries, a label cut
        # in two where needed) writes all of it; nothing nnz-sized is formed but the output.
        head, tail = index_tables(structure)
        head, tail = _ramp(head, dtype, xp), _ramp(tail, dtype, xp)
        xp.add_into(indices.reshape(-1, tail.shape[0]), head[:, None], tail[None, :])

    # Both branches write indptr in place: no second (nrows + 1)-sized array.
    if len(row_free) == len(structure.rows):
        # Every row is hit once, in order: indptr is an arithmetic progression.
        indptr = xp.scale_(xp.arange(nrows + 1, dtype), per_row)
    else:
        # A label repeated on the row side hits only the rows on its diagonal.
        hit = _ramp(_digits(structure, structure.rows, row_free), xp.index(8), xp)
        indptr = xp.zeros(nrows + 1, dtype)
        indptr[1:][hit] = per_row
        del hit
        indptr = xp.cumsum_(indptr)
    return CompressedPattern(indices, indptr, (nrows, ncols))


def coo_coords(structure: Structure, xp=NUMPY, itemsize: int | None = None):
    """Coordinates ``(ndim, nnz)`` of the N-D Jacobian, lexicographically sorted (index
    ``itemsize`` in bytes: default the narrowest that fits)."""
    free = structure.free
    free_shape = structure.free_shape
    axes = structure.rows + structure.cols
    dtype = xp.index(itemsize or index_dtype(structure.nnz, structure.shape).itemsize)
    coords = xp.empty((len(axes), structure.nnz), dtype)
    for d, label in enumerate(axes):
        position = free.index(label)
        ramp = xp.arange(structure.sizes[label], dtype).reshape(
            [structure.sizes[label] if p == position else 1 for p in range(len(free))]
        )
        xp.copy_into(coords[d].reshape(free_shape), ramp)
        del ramp  # one ramp alive at a time
    return coords


def fill_values(structure: Structure, factor, labels: Sequence[int], out, xp=NUMPY):
    """Write ``factor`` (axes named by ``labels``), spread over ``V`` in C order, into ``out``."""
    xp.copy_into(out.reshape(structure.free_shape), structure.spread(factor, labels, xp))
    return out


def flat_index(coords: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """C-order flat indices of the N-D ``coords`` (one row per axis) in ``shape``."""
    if not len(shape):
        return np.zeros(coords.shape[1], dtype=np.int64)
    return np.ravel_multi_index(tuple(coords), tuple(shape))


def container(fmt: str, pattern, data, out_shape: Sequence[int], inp_shape: Sequence[int]):
    """The container ``fmt`` names around index arrays and values, copying neither.

    ``pattern``: the coordinates (COO layouts) or anything with ``indices`` and ``indptr``
    (CSR/CSC layouts); numpy arrays or torch tensors. They must be sorted and free of
    duplicates (the writers' output is), and the container is told so: no scan, no sort.
    """
    shape = tuple(out_shape) + tuple(inp_shape)
    matrix_shape = (math.prod(out_shape), math.prod(inp_shape))
    if fmt == "coo":
        import sparse

        return sparse.COO(pattern, data, shape=shape, sorted=True, has_duplicates=False)
    if fmt in ("csr", "csc"):
        import scipy.sparse

        cls = scipy.sparse.csr_array if fmt == "csr" else scipy.sparse.csc_array
        matrix = cls((data, pattern.indices, pattern.indptr), shape=matrix_shape)
        matrix.has_sorted_indices = True
        matrix.has_canonical_format = True
        return matrix
    import warnings

    import torch

    def tensor(a):
        return torch.from_numpy(a) if isinstance(a, np.ndarray) else a

    if fmt == "torch":
        # Coalesced by construction (sorted, no duplicates): no coalesce() pass.
        return torch.sparse_coo_tensor(
            tensor(pattern), tensor(data), shape, is_coalesced=True, check_invariants=False
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            tensor(pattern.indptr), tensor(pattern.indices), tensor(data), matrix_shape,
            check_invariants=False,
        )


def from_csr(csr, fmt: str, out_shape: Sequence[int], inp_shape: Sequence[int]):
    """A canonical scipy CSR array of shape ``(prod(out_shape), prod(inp_shape))`` in the
    container ``fmt`` names (for results that are assembled as CSR, e.g. sums of terms)."""
    out_shape, inp_shape = tuple(out_shape), tuple(inp_shape)
    if fmt == "csc":
        csc = csr.tocsc()
        return container(fmt, csc, csc.data, out_shape, inp_shape)
    if LAYOUT[fmt] == "csr":
        return container(fmt, csr, csr.data, out_shape, inp_shape)
    rows = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))
    coords = [np.unravel_index(rows, out_shape)] if out_shape else []
    coords += [np.unravel_index(csr.indices, inp_shape)] if inp_shape else []
    dtype = np.int64 if fmt == "torch" else index_dtype(csr.nnz, out_shape + inp_shape)
    stacked = np.zeros((len(out_shape) + len(inp_shape), csr.nnz), dtype=dtype)
    for d, c in enumerate(c for group in coords for c in group):
        stacked[d] = c
    # Rows sorted, columns sorted within rows, no duplicates: lexicographic N-D order.
    return container(fmt, stacked, csr.data, out_shape, inp_shape)
