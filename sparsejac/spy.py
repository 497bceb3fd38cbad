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

from .errors import ArgumentError, ArgumentTypeError

_CHUNK = 1 << 22


def _rows_cols(J: Any, out_shape: Sequence[int] | None):
    """(rows, cols) index arrays (possibly in chunks), the matrix shape and the two N-D shapes."""
    import scipy.sparse
    import sparse

    if type(J).__module__.startswith("torch"):
        import torch

        if J.layout == torch.sparse_csr:
            J = scipy.sparse.csr_array(
                (np.ones(J._nnz(), bool), J.col_indices().cpu().numpy(), J.crow_indices().cpu().numpy()),
                shape=tuple(J.shape),
            )
        elif J.layout == torch.sparse_coo:
            J = sparse.COO(J._indices().cpu().numpy(), np.ones(J._nnz(), bool), shape=tuple(J.shape),
                           sorted=J.is_coalesced(), has_duplicates=not J.is_coalesced())
        else:
            raise ArgumentTypeError(f"spy: a torch tensor with layout {J.layout} is not sparse")
    if isinstance(J, sparse.COO):
        k = len(out_shape) if out_shape is not None else J.ndim // 2
        if tuple(J.shape[:k]) != tuple(out_shape if out_shape is not None else J.shape[:k]):
            raise ArgumentError(
                f"spy: out_shape {tuple(out_shape)} is not the leading part of the Jacobian's "
                f"shape {J.shape}"
            )
        oshape, ashape = J.shape[:k], J.shape[k:]

        def flat(coords, shape):
            return np.ravel_multi_index(tuple(coords), shape) if shape else np.zeros(coords.shape[1], np.int64)

        rows = flat(J.coords[:k], oshape)
        cols = flat(J.coords[k:], ashape)
        return rows, cols, (math.prod(oshape), math.prod(ashape)), oshape, ashape
    if isinstance(J, (scipy.sparse.sparray, scipy.sparse.spmatrix)):
        coo = J.tocoo()
        shape = tuple(J.shape)
        oshape = tuple(out_shape) if out_shape is not None else (shape[0],)
        return coo.row, coo.col, shape, oshape, (shape[1],)
    raise ArgumentTypeError(
        f"spy: expected a sparse.COO, a scipy sparse array or a torch sparse tensor, "
        f"got {type(J).__name__}"
    )


def spy(
    J: Any,
    ax: Any = None,
    max_pixels: int = 512,
    out_shape: Sequence[int] | None = None,
    operand_shape: Sequence[int] | None = None,
):
    """Draw the sparsity pattern of ``J`` on ``ax`` (a new figure's axes by default).

    ``out_shape``: the output's shape, which splits an N-D COO's axes into output and operand
    (default: the first half of the axes); with ``operand_shape`` it also labels a 2-D (scipy,
    torch CSR) Jacobian's axes. Returns the matplotlib ``Axes``.
    """
    import matplotlib.pyplot as plt

    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise ArgumentError(f"spy: max_pixels must be a positive int, got {max_pixels!r}")
    rows, cols, (m, n), oshape, ashape = _rows_cols(J, out_shape)
    if operand_shape is not None and len(ashape) == 1:
        ashape = tuple(operand_shape)
    pm, pn = max(1, min(m, max_pixels)), max(1, min(n, max_pixels))
    counts = np.zeros(pm * pn, dtype=np.int64)
    for start in range(0, len(rows), _CHUNK):  # bounded memory however many nonzeros
        r = rows[start : start + _CHUNK].astype(np.int64) * pm // max(m, 1)
        c = cols[start : start + _CHUNK].astype(np.int64) * pn // max(n, 1)
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
