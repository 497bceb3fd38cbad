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


def transpose_order(pattern, data: np.ndarray | None = None
                    ) -> tuple[formats.CompressedPattern, np.ndarray]:
    """The canonical CSR pattern of the transpose of the matrix whose CSR pattern is
    ``pattern`` (``indices``, ``indptr``, ``shape``), and its values: ``data`` transposed
    with it, or (None) for each of its entries the position (int64) of that entry in
    ``pattern``. :func:`transpose_order_nbytes` predicts its bytes."""
    nnz = len(pattern.indices)
    carried = np.arange(nnz, dtype=np.int64) if data is None else data
    order = scipy.sparse.csr_array((carried, pattern.indices, pattern.indptr),
                                   shape=pattern.shape)
    del carried
    t = order.T.tocsr()
    del order  # (the positions: the transpose's values are its own copy)
    t.sort_indices()
    return formats.CompressedPattern(t.indices, t.indptr, t.shape), t.data


def transpose_order_nbytes(nnz: int, ncols: int, idx: int,
                           itemsize: int | None = None) -> tuple[int, int]:
    """``(peak, kept)`` bytes of :func:`transpose_order` for ``nnz`` entries in ``ncols``
    columns, index arrays of ``idx`` bytes: the transpose's values (of ``itemsize`` bytes; None:
    the positions, from an arange), its indices and indptr."""
    kept = nnz * ((itemsize or 8) + idx) + (ncols + 1) * idx
    return kept + (nnz * 8 if itemsize is None else 0), kept


def mirror_of(pattern) -> np.ndarray | None:
    """Where a symmetric pattern's entries have their mirror images (the position of entry
    ``(j, i)`` for entry ``(i, j)``), or None where the pattern is not symmetric."""
    t, order = transpose_order(pattern)
    return order if same_pattern(t, pattern) else None


def same_pattern(a, b) -> bool:
    return np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)


def average(data: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
    """``(data + mirrored) / 2`` (``mirrored``: the values at the mirror images), written over
    ``mirrored``: the same sums however the mirror images are found (+ commutes)."""
    np.add(mirrored, data, out=mirrored)
    np.multiply(mirrored, 0.5, out=mirrored)
    return mirrored


def symmetrise(csr: scipy.sparse.csr_array) -> scipy.sparse.csr_array:
    """``csr`` averaged with its transpose where its pattern is symmetric (its values
    replaced), else as it is."""
    t, values = transpose_order(csr, csr.data)
    if same_pattern(t, csr):
        csr.data = average(csr.data, values)
    return csr


def symmetrise_nbytes(nnz: int, nrows: int, idx: int, itemsize: int) -> int:
    """Bytes :func:`symmetrise` allocates beside the block: the transpose, values carried, and
    the flags of the patterns' comparison."""
    return transpose_order_nbytes(nnz, nrows, idx, itemsize)[0] + nnz


def transpose(csr: scipy.sparse.csr_array) -> scipy.sparse.csr_array:
    """The canonical CSR of ``csr``'s transpose (the block used below a Hessian's diagonal)."""
    t, values = transpose_order(csr, csr.data)
    return canonical_csr(values, t.indices, t.indptr, t.shape)


def transpose_nbytes(nnz: int, ncols: int, idx: int, itemsize: int) -> tuple[int, int]:
    """``(peak, kept)`` bytes of :func:`transpose`: the transposed pattern and values."""
    return transpose_order_nbytes(nnz, ncols, idx, itemsize)
