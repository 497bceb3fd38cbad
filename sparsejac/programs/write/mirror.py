"""A block and its transpose: the transposed pattern with where each entry comes from, a
symmetric block's average with its mirror image, and a block used transposed.

A Hessian's diagonal blocks are averaged with their transposes (the two halves are summed in
other orders, so they differ by rounding), and the blocks below its diagonal are the
transposes of those above (docs/how-it-works.md, "## 5. Hessians"). The one-shot path and
plans both go through :func:`transpose_order`. This module reads scipy arrays; it never
imports the terms, the tracer or the rules.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from ... import formats
from .base import canonical_csr


def transpose_order(pattern) -> tuple[formats.CompressedPattern, np.ndarray]:
    """The canonical CSR pattern of the transpose of the matrix whose CSR pattern is
    ``pattern`` (``indices``, ``indptr``, ``shape``), and for each of its entries the position
    (int64) of that entry in ``pattern``. :func:`transpose_order_nbytes` predicts its bytes."""
    nnz = len(pattern.indices)
    order = scipy.sparse.csr_array(
        (np.arange(nnz, dtype=np.int64), pattern.indices, pattern.indptr), shape=pattern.shape)
    t = order.T.tocsr()
    del order  # the arange: the transpose's data is its own copy
    t.sort_indices()
    return formats.CompressedPattern(t.indices, t.indptr, t.shape), t.data


def transpose_order_nbytes(nnz: int, ncols: int, idx: int) -> tuple[int, int]:
    """``(peak, kept)`` bytes of :func:`transpose_order` for ``nnz`` entries in ``ncols``
    columns, index arrays of ``idx`` bytes: the positions (an arange, then the transpose's
    copy), its indices and indptr."""
    kept = nnz * (8 + idx) + (ncols + 1) * idx
    return nnz * 8 + kept, kept


def mirror_of(pattern) -> np.ndarray | None:
    """Where a symmetric pattern's entries have their mirror images (the position of entry
    ``(j, i)`` for entry ``(i, j)``), or None where the pattern is not symmetric."""
    t, order = transpose_order(pattern)
    if np.array_equal(t.indptr, pattern.indptr) and np.array_equal(t.indices, pattern.indices):
        return order
    return None


def average(data: np.ndarray, mirror: np.ndarray) -> np.ndarray:
    """``(data + data[mirror]) / 2``, written over the gathered copy: two arrays at once
    whether or not numpy elides the temporaries (the same sums either way: + commutes)."""
    mirrored = data[mirror]
    mirrored += data
    mirrored *= 0.5
    return mirrored


def symmetrise(csr: scipy.sparse.csr_array) -> scipy.sparse.csr_array:
    """``csr`` averaged with its transpose where its pattern is symmetric (its values
    replaced), else as it is."""
    mirror = mirror_of(csr)
    if mirror is not None:
        csr.data = average(csr.data, mirror)
    return csr


def symmetrise_nbytes(nnz: int, nrows: int, idx: int, itemsize: int) -> int:
    """Bytes :func:`symmetrise` allocates beside the block: the transposed order, then the
    averaged values beside its positions."""
    peak, kept = transpose_order_nbytes(nnz, nrows, idx)
    return max(peak, kept + nnz * itemsize)


def transpose(csr: scipy.sparse.csr_array) -> scipy.sparse.csr_array:
    """The canonical CSR of ``csr``'s transpose (the block used below a Hessian's diagonal)."""
    t, order = transpose_order(csr)
    return canonical_csr(csr.data[order], t.indices, t.indptr, t.shape)


def transpose_nbytes(nnz: int, ncols: int, idx: int, itemsize: int) -> tuple[int, int]:
    """``(peak, kept)`` bytes of :func:`transpose`: the order, then the values gathered
    beside it; the result keeps the transposed pattern and values."""
    peak, kept = transpose_order_nbytes(nnz, ncols, idx)
    result = kept - nnz * 8 + nnz * itemsize
    return max(peak, kept + nnz * itemsize), result
