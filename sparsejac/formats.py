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
from typing import NamedTuple, Sequence

import numpy as np

from .structure import Structure, distinct

FORMATS = ("coo", "csr", "csc")
INT32_MAX = np.iinfo(np.int32).max


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
        np.add(row_part[:, None], col_part[None, :], out=indices.reshape(-1, per_row))

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
        np.copyto(coords[d].reshape(free_shape), ramp)
    return coords


def fill_values(
    structure: Structure, factor: np.ndarray, labels: Sequence[int], out: np.ndarray
) -> np.ndarray:
    """Write ``factor`` (axes named by ``labels``), spread over ``V`` in C order, into ``out``."""
    np.copyto(out.reshape(structure.free_shape), structure.spread(factor, labels))
    return out
