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
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np

from .structure import Structure, distinct

FORMATS = ("coo", "csr", "csc")
INT32_MAX = np.iinfo(np.int32).max


# Writing nnz-sized arrays is memory-bound; numpy releases the GIL in copies and ufuncs, so
# splitting one write into contiguous slabs on a few threads uses every core's bandwidth (and
# spreads the page faults of fresh allocations).
_THREADS = max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1), 8))
_SLAB_BYTES = 16 << 20
_pool: ThreadPoolExecutor | None = None


def _slabs(shape: tuple[int, ...], pieces: int) -> Iterator[tuple]:
    """Basic-slicing indexes that cut a C-ordered array of ``shape`` into about ``pieces``
    contiguous blocks (so every block of every broadcast source is a view)."""
    lead = 0
    while lead < len(shape) and math.prod(shape[: lead + 1]) < pieces:
        lead += 1
    if lead == len(shape):
        yield (Ellipsis,)  # the whole array, as a view even when 0-d
        return
    outer = shape[:lead]
    n = shape[lead]
    cuts = max(1, min(n, -(-pieces // max(math.prod(outer), 1))))
    bounds = [n * c // cuts for c in range(cuts + 1)]
    for head in np.ndindex(*outer):
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                yield head + (slice(a, b),)


def parallel_write(out: np.ndarray, write: Callable[[tuple], None]) -> None:
    """Call ``write(index)`` for slabs covering ``out`` (C-contiguous), on a few threads."""
    global _pool
    pieces = out.nbytes // _SLAB_BYTES
    if _THREADS == 1 or pieces < 2:
        write((Ellipsis,))
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="sparsejac")
    for future in [_pool.submit(write, index) for index in _slabs(out.shape, pieces)]:
        future.result()


def index_dtype(nnz: int, shape: tuple[int, ...]) -> np.dtype:
    """int32 when ``nnz`` and every dimension fit in it, else int64.

    >>> index_dtype(2**31 - 1, (10, 10)), index_dtype(2**31, (10, 10))
    (dtype('int32'), dtype('int64'))
    """
    return np.dtype(np.int32 if max((nnz, *shape), default=0) <= INT32_MAX else np.int64)


def predicted_nbytes(structure: Structure, fmt: str, itemsize: int) -> int:
    """Bytes of the arrays a writer allocates for ``fmt`` (values of ``itemsize`` bytes)."""
    nnz = structure.nnz
    if fmt == "coo":
        idx = index_dtype(nnz, structure.shape).itemsize
        return nnz * (itemsize + idx * len(structure.shape))
    nrows, ncols = structure.matrix_shape
    if fmt == "csc":
        nrows, ncols = ncols, nrows
    idx = index_dtype(nnz, (nrows, ncols)).itemsize
    return nnz * (itemsize + idx) + (nrows + 1) * idx


def _axis_table(structure: Structure, labels: tuple[int, ...], free: tuple[int, ...], dtype):
    """sum over axes of ``labels`` of (value of the axis's label) * (the axis's C stride),
    as a small array over the free labels it depends on (others kept as length-1 axes)."""
    sizes = structure.sizes
    shape = tuple(sizes[l] for l in labels)
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    coef: dict[int, int] = {}
    for label, stride in zip(labels, strides):
        coef[label] = coef.get(label, 0) + stride
    table = np.zeros((1,) * len(free), dtype=dtype)
    for position, label in enumerate(free):
        if label in coef:
            axis = [1] * len(free)
            axis[position] = sizes[label]
            table = table + np.arange(sizes[label], dtype=dtype).reshape(axis) * coef[label]
    return table


def _ramp(structure: Structure, labels, free: tuple[int, ...], dtype) -> np.ndarray:
    """:func:`_axis_table` enumerated over all of ``free`` in C order (flat)."""
    table = _axis_table(structure, labels, free, dtype)
    return np.broadcast_to(table, tuple(structure.sizes[l] for l in free)).ravel()


class CompressedPattern(NamedTuple):
    """``indices`` and ``indptr`` of CSR (or CSC, as CSR of the transpose)."""

    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple[int, int]


def csr_pattern(structure: Structure) -> CompressedPattern:
    """The CSR pattern of ``structure`` as a ``(rows, cols)`` matrix, in the value order of
    :meth:`Structure.spread`."""
    nrows, ncols = structure.matrix_shape
    nnz = structure.nnz
    dtype = index_dtype(nnz, (nrows, ncols))
    free = structure.free
    n_row = len(distinct(structure.rows))
    row_free, col_only = free[:n_row], free[n_row:]
    per_row = math.prod(structure.sizes[l] for l in col_only)

    indices = np.empty(nnz, dtype=dtype)
    if nnz:
        # Column index = (part from labels shared with the row side, one per row) + (part from
        # the column-only labels, the same in every row): one broadcast add writes all of it.
        row_part = _ramp(structure, structure.cols, row_free, dtype)
        col_part = _ramp(structure, structure.cols, col_only, dtype)
        grid = indices.reshape(-1, per_row)
        starts, steps = np.broadcast_arrays(row_part[:, None], col_part[None, :])
        parallel_write(grid, lambda at: np.add(starts[at], steps[at], out=grid[at]))

    if len(row_free) == len(structure.rows):
        # Every row is hit once, in order: indptr is an arithmetic progression.
        indptr = np.arange(nrows + 1, dtype=dtype) * dtype.type(per_row)
    else:
        # A label repeated on the row side hits only the rows on its diagonal.
        hit = _ramp(structure, structure.rows, row_free, np.int64)
        counts = np.zeros(nrows + 1, dtype=dtype)
        counts[hit + 1] = per_row
        indptr = np.cumsum(counts, dtype=dtype)
    return CompressedPattern(indices, indptr, (nrows, ncols))


def coo_coords(structure: Structure) -> np.ndarray:
    """Coordinates ``(ndim, nnz)`` of the N-D Jacobian, lexicographically sorted."""
    free = structure.free
    free_shape = structure.free_shape
    axes = structure.rows + structure.cols
    dtype = index_dtype(structure.nnz, structure.shape)
    coords = np.empty((len(axes), structure.nnz), dtype=dtype)
    for d, label in enumerate(axes):
        position = free.index(label)
        ramp = np.arange(structure.sizes[label], dtype=dtype).reshape(
            [structure.sizes[label] if p == position else 1 for p in range(len(free))]
        )
        target = coords[d].reshape(free_shape)
        ramp = np.broadcast_to(ramp, free_shape)
        parallel_write(target, lambda at: np.copyto(target[at], ramp[at]))
    return coords


def fill_values(
    structure: Structure, factor: np.ndarray, labels: Sequence[int], out: np.ndarray
) -> np.ndarray:
    """Write ``factor`` (axes named by ``labels``), spread over ``V`` in C order, into ``out``."""
    target = out.reshape(structure.free_shape)
    source = structure.spread(factor, labels)
    parallel_write(target, lambda at: np.copyto(target[at], source[at]))
    return out
