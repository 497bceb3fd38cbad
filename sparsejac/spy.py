"""A picture of a Jacobian's sparsity pattern (matplotlib, an optional dependency).

The Jacobian is shown as the ``(z.size, operand.size)`` matrix. When it has more rows or
columns than ``max_pixels``, entries are binned and each pixel shows the fraction of its cell
that is stored (density), so a 262144 x 262144 pattern still renders in a moment and in bounded
memory.

>>> import numpy as np, sparsejac, matplotlib
>>> matplotlib.use("Agg")
>>> J = sparsejac.jacobian("ij,jk->ik", np.ones((8, 5)), np.ones((5, 6)))
>>> ax = sparsejac.spy(J, out_shape=(8, 6))
>>> ax.get_xlabel()
'operand index, flattened (shape (8, 5))'
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from . import formats
from .convert import is_dask, is_torch, out_ndim_of
from .errors import ArgumentError, ArgumentTypeError

_CHUNK = 1 << 22


def _compressed_chunks(indptr: np.ndarray, indices: np.ndarray, row_major: bool):
    """(rows, cols) of a CSR (``row_major``) or CSC matrix, a chunk of entries at a time."""
    for start in range(0, len(indices), _CHUNK):
        stop = min(start + _CHUNK, len(indices))
        major = np.searchsorted(indptr, np.arange(start, stop), side="right") - 1
        minor = indices[start:stop]
        yield (major, minor) if row_major else (minor, major)


def _coordinate_chunks(coords: np.ndarray, k: int, oshape, ashape):
    """(rows, cols) of N-D coordinates split after axis ``k``, a chunk of entries at a time."""
    for start in range(0, coords.shape[1], _CHUNK):
        piece = coords[:, start : start + _CHUNK]
        yield formats.flat_index(piece[:k], oshape), formats.flat_index(piece[k:], ashape)


def _block_chunks(J: Any, k: int, oshape, ashape):
    """(rows, cols) of a dask array's stored entries, one block computed at a time."""
    import sparse

    bounds = [np.concatenate([[0], np.cumsum(c)]).astype(np.int64) for c in J.chunks]
    for index in np.ndindex(*J.numblocks):
        block = J.blocks[index].compute()
        coo = block if isinstance(block, sparse.COO) else sparse.COO.from_numpy(np.asarray(block))
        coords = coo.coords.astype(np.int64)
        for d, i in enumerate(index):
            coords[d] += bounds[d][i]
        yield from _coordinate_chunks(coords, k, oshape, ashape)


def _entries(J: Any, out_shape: Sequence[int] | None):
    """A generator of (rows, cols) chunks over ``J``'s stored entries (never all at once), the
    matrix shape, and the output and operand shapes."""
    import scipy.sparse
    import sparse

    if is_dask(J):
        k = len(out_shape) if out_shape is not None else out_ndim_of(J, None, J.ndim, "spy: ")
        full = tuple(J.shape)
        oshape, ashape = full[:k], full[k:]
        matrix = (math.prod(oshape), math.prod(ashape))
        return _block_chunks(J, k, oshape, ashape), matrix, oshape, ashape
    if is_torch(J):
        import torch

        if J.layout in (torch.sparse_csr, torch.sparse_csc):
            row_major = J.layout == torch.sparse_csr
            indptr = (J.crow_indices() if row_major else J.ccol_indices()).cpu().numpy()
            indices = (J.col_indices() if row_major else J.row_indices()).cpu().numpy()
            shape = tuple(J.shape)
            oshape = tuple(out_shape) if out_shape is not None else (shape[0],)
            return _compressed_chunks(indptr, indices, row_major), shape, oshape, (shape[1],)
        if J.layout != torch.sparse_coo:
            raise ArgumentTypeError(f"spy: a torch tensor with layout {J.layout} is not sparse")
        coords, full = J._indices().cpu().numpy(), tuple(J.shape)
    elif isinstance(J, sparse.COO):
        coords, full = J.coords, tuple(J.shape)
    elif isinstance(J, (scipy.sparse.sparray, scipy.sparse.spmatrix)):
        shape = tuple(J.shape)
        oshape = tuple(out_shape) if out_shape is not None else (shape[0],)
        if J.format not in ("csr", "csc"):  # scipy's COO, BSR, DIA, ...: as CSR
            J = J.tocsr()
        row_major = J.format == "csr"
        return _compressed_chunks(J.indptr, J.indices, row_major), shape, oshape, (shape[1],)
    else:
        raise ArgumentTypeError(
            f"spy: expected a sparse.COO, a scipy sparse array, a torch sparse tensor, a dask "
            f"array of sparse blocks or a sparsejac.linear_operator, got {type(J).__name__}"
        )
    # The output axes: out_shape's, else those sparsejac recorded, else the first half.
    k = len(out_shape) if out_shape is not None else getattr(J, formats.OUT_NDIM, len(full) // 2)
    if out_shape is not None and tuple(full[:k]) != tuple(out_shape):
        raise ArgumentError(
            f"spy: out_shape {tuple(out_shape)} is not the leading part of the Jacobian's "
            f"shape {full}"
        )
    oshape, ashape = full[:k], full[k:]
    matrix = (math.prod(oshape), math.prod(ashape))
    return _coordinate_chunks(coords, k, oshape, ashape), matrix, oshape, ashape


def spy(
    J: Any,
    ax: Any = None,
    max_pixels: int = 512,
    out_shape: Sequence[int] | None = None,
    operand_shape: Sequence[int] | None = None,
):
    """Draw the sparsity pattern of ``J`` on ``ax`` (a new figure's axes by default).

    ``J``: a ``sparse.COO``, a scipy sparse array, a torch sparse tensor, a dask array of sparse
    blocks (:mod:`sparsejac.chunked`, :mod:`sparsejac.store`; read one block at a time) or the
    operator of :func:`sparsejac.linear_operator`, whose exact pattern comes from its plan
    (``operator.plan``: the subscripts and shapes decide it; products with vectors could miss
    entries that cancel, so no other ``LinearOperator`` is accepted).

    ``out_shape``: the output's shape, which splits an N-D Jacobian's axes into output and
    operand (default: the split sparsejac records on its results, else the first half of the
    axes); with ``operand_shape`` it also labels a 2-D (scipy, torch CSR) Jacobian's axes.
    Returns the matplotlib ``Axes``.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import MissingDependencyError

        raise MissingDependencyError(
            "spy needs matplotlib: pip install 'einsum-sparsejac[plot]'") from None

    if type(J).__name__ == "EinsumJacobianOperator":
        if out_shape is None:
            out_shape = J.output_shape
        if operand_shape is None:
            operand_shape = J.operand_shape
        J = J.plan.pattern("csr")
    elif hasattr(J, "matvec") and hasattr(J, "rmatvec") and not hasattr(J, "nnz"):
        raise ArgumentTypeError(
            f"spy: {type(J).__name__} is a linear operator; its pattern cannot be read exactly "
            "from products (entries can cancel). Pass the Jacobian itself, or a "
            "sparsejac.linear_operator, whose pattern comes from its plan"
        )

    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise ArgumentError(f"spy: max_pixels must be a positive int, got {max_pixels!r}")
    chunks, (m, n), oshape, ashape = _entries(J, out_shape)
    if operand_shape is not None and len(ashape) == 1:
        ashape = tuple(operand_shape)
    pm, pn = max(1, min(m, max_pixels)), max(1, min(n, max_pixels))
    counts = np.zeros(pm * pn, dtype=np.int64)
    for rows, cols in chunks:  # bounded memory however many nonzeros
        r = rows.astype(np.int64) * pm // max(m, 1)
        c = cols.astype(np.int64) * pn // max(n, 1)
        counts += np.bincount(r * pn + c, minlength=pm * pn)
    # The number of matrix cells that fall in each pixel, for a density in [0, 1]: index r goes
    # to pixel r * pm // m, so pixel p holds the indices from ceil(p * m / pm) on.
    row_cells = np.diff(-(-np.arange(pm + 1) * m // pm)) if m else np.ones(pm, int)
    col_cells = np.diff(-(-np.arange(pn + 1) * n // pn)) if n else np.ones(pn, int)
    density = counts.reshape(pm, pn) / np.maximum(np.outer(row_cells, col_cells), 1)

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6 * min(max(pm / pn, 0.4), 2)), layout="constrained")
    binned = m > max_pixels or n > max_pixels
    image = ax.imshow(
        density, cmap="Greys", vmin=0, vmax=1 if not binned else max(density.max(), 1e-12),
        extent=(0, n, m, 0), aspect="auto", interpolation="nearest",
    )
    if binned:
        ax.figure.colorbar(image, ax=ax, label="fraction of entries stored")
    ax.set_xlabel(f"operand index, flattened (shape {tuple(ashape)})")
    ax.set_ylabel(f"output index, flattened (shape {tuple(oshape)})")
    nnz = int(counts.sum())
    ax.set_title(f"{m} x {n}, nnz {nnz:,}, density {nnz / max(m * n, 1):.3g}"
                 + (f" (binned to {pm} x {pn})" if binned else ""))
    return ax
