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


def _axis_table(structure: Structure, labels: tuple[int, ...], free: tuple[int, ...], dtype, xp):
    """sum over axes of ``labels`` of (value of the axis's label) * (the axis's C stride),
    as a small array over the free labels it depends on (others kept as length-1 axes)."""
    sizes = structure.sizes
    shape = tuple(sizes[l] for l in labels)
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    coef: dict[int, int] = {}
    for label, stride in zip(labels, strides):
        coef[label] = coef.get(label, 0) + stride
    table = xp.zeros((1,) * len(free), dtype)
    for position, label in enumerate(free):
        if label in coef:
            axis = [1] * len(free)
            axis[position] = sizes[label]
            table = table + xp.arange(sizes[label], dtype).reshape(axis) * coef[label]
    return table


def _ramp(structure: Structure, labels, free: tuple[int, ...], dtype, xp):
    """:func:`_axis_table` enumerated over all of ``free`` in C order (flat)."""
    table = _axis_table(structure, labels, free, dtype, xp)
    return xp.flat(xp.broadcast_to(table, tuple(structure.sizes[l] for l in free)))


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
        # Column index = (part from labels shared with the row side, one per row) + (part from
        # the column-only labels, the same in every row): one broadcast add writes all of it.
        row_part = _ramp(structure, structure.cols, row_free, dtype, xp)
        col_part = _ramp(structure, structure.cols, col_only, dtype, xp)
        xp.add_into(indices.reshape(-1, per_row), row_part[:, None], col_part[None, :])

    if len(row_free) == len(structure.rows):
        # Every row is hit once, in order: indptr is an arithmetic progression.
        indptr = xp.arange(nrows + 1, dtype) * per_row
    else:
        # A label repeated on the row side hits only the rows on its diagonal.
        hit = _ramp(structure, structure.rows, row_free, xp.index(8), xp)
        counts = xp.zeros(nrows + 1, dtype)
        counts[hit + 1] = per_row
        indptr = xp.cumsum(counts, dtype)
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
    return coords


def fill_values(structure: Structure, factor, labels: Sequence[int], out, xp=NUMPY):
    """Write ``factor`` (axes named by ``labels``), spread over ``V`` in C order, into ``out``."""
    xp.copy_into(out.reshape(structure.free_shape), structure.spread(factor, labels, xp))
    return out


def from_csr(csr, fmt: str, out_shape: Sequence[int], inp_shape: Sequence[int]):
    """A canonical scipy CSR array of shape ``(prod(out_shape), prod(inp_shape))`` in the
    container ``fmt`` names (for results that are assembled as CSR, e.g. sums of terms)."""
    import sparse

    out_shape, inp_shape = tuple(out_shape), tuple(inp_shape)
    if fmt == "csr":
        return csr
    if fmt == "csc":
        return csr.tocsc()
    if fmt == "torch_csr":
        import torch

        return torch.sparse_csr_tensor(
            torch.from_numpy(csr.indptr), torch.from_numpy(csr.indices),
            torch.from_numpy(csr.data), csr.shape, check_invariants=False,
        )
    rows = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))
    coords = [np.unravel_index(rows, out_shape)] if out_shape else []
    coords += [np.unravel_index(csr.indices, inp_shape)] if inp_shape else []
    dtype = np.int64 if fmt == "torch" else index_dtype(csr.nnz, out_shape + inp_shape)
    stacked = np.zeros((len(out_shape) + len(inp_shape), csr.nnz), dtype=dtype)
    for d, c in enumerate(c for group in coords for c in group):
        stacked[d] = c
    if fmt == "torch":
        import torch

        return torch.sparse_coo_tensor(
            torch.from_numpy(stacked), torch.from_numpy(csr.data), out_shape + inp_shape,
            is_coalesced=True, check_invariants=False,
        )
    # Rows sorted, columns sorted within rows, no duplicates: lexicographic N-D order.
    return sparse.COO(stacked, csr.data, shape=out_shape + inp_shape, sorted=True, has_duplicates=False)
