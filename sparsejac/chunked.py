"""Jacobians larger than memory, chunked on dask.

:func:`jacobian` returns a lazy ``dask.array.Array`` of shape ``z.shape + operand.shape`` whose
blocks are ``sparse.COO``. Each block is computed on its own from the closed form restricted to its
index ranges (docs/how-it-works.md, section 1): every label of ``V`` is cut to the intersection of
the ranges of the axes that carry it, which leaves the same :class:`~sparsejac.structure.Structure`
with smaller sizes, its coordinates offset by each range's start and its factor ``R`` sliced on
those ranges. No global coordinate array exists anywhere; a task needs only ``R`` (over the labels
the other operands carry, usually far smaller than ``J``) and its ranges, so the graph runs on
dask's default scheduler and unchanged on a ``dask.distributed`` cluster. Save and read back such
arrays with :mod:`sparsejac.store`; :func:`sparsejac.to_scipy` gives the
``(z.size, operand.size)`` matrix of a (small enough) one.

Importing this module imports dask; ``import sparsejac`` does not. (``sparsejac.dask`` is the
same functions under their former name.)

>>> import numpy as np
>>> from sparsejac import chunked
>>> J = chunked.jacobian("ij,jk->ik", np.ones((4, 3)), np.ones((3, 5)), chunks=2)
>>> J.shape, J.numblocks
((4, 5, 4, 3), (2, 3, 2, 2))
>>> int(J.sum().compute())   # d z[i,k] / d x[i,j] = w[j,k] = 1 at 4*5*3 entries
60
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import sparse

try:
    import dask
    import dask.array as da
    from dask.base import tokenize
    from dask.utils import parse_bytes
except ImportError as error:  # the package's own error, with how to install dask
    from .errors import missing_dask

    raise missing_dask(__name__, error) from None

from . import formats, options
from .backend import broadcast_base
from .errors import ArgumentError, ArgumentTypeError, context
from .grammar import require_text
from .operands import as_arrays, result_dtype
from .plan import Plan
from .store import empty_coo, from_blocks, ranges
from .structure import Structure, einsum_factor

__all__ = ["jacobian", "auto_chunks"]


# -- computing blocks --------------------------------------------------------------------------


def restricted_block(
    structure: Structure,
    factor: np.ndarray,
    dtype: np.dtype,
    starts: Sequence[int],
    stops: Sequence[int],
) -> sparse.COO:
    """The block ``J[starts[0]:stops[0], ...]`` as a ``sparse.COO``, from the closed form alone.

    Every label of ``V`` is cut to the intersection of the ranges of the axes carrying it (a
    Kronecker delta or a diagonal meets itself there); an empty intersection is an empty block.
    """
    axes = structure.rows + structure.cols
    block_shape = tuple(int(b - a) for a, b in zip(starts, stops))
    lo: dict[int, int] = {}
    hi: dict[int, int] = {}
    for d, label in enumerate(axes):
        lo[label] = max(lo.get(label, 0), int(starts[d]))
        hi[label] = min(hi.get(label, structure.sizes[label]), int(stops[d]))
    sizes = list(structure.sizes)
    for label in lo:
        sizes[label] = max(0, hi[label] - lo[label])
    sub = replace(structure, sizes=tuple(sizes))
    nnz = sub.nnz
    if nnz == 0:
        return empty_coo(block_shape, dtype)
    # Relative to the intersections' starts, sorted; wide enough for the block's own indices.
    coo = formats.REGISTRY["coo"]
    wanted = formats.index_dtype(nnz, block_shape).itemsize
    coords = formats.coo_coords(sub, itemsize=max(wanted, coo.index_itemsize(
        nnz, sub.rows_shape, sub.cols_shape)))
    for d, label in enumerate(axes):
        offset = lo[label] - int(starts[d])
        if offset:
            coords[d] += offset  # a constant per axis keeps the lexicographic order
    piece = factor[tuple(slice(lo[l], hi[l]) for l in structure.factor_labels) + (Ellipsis,)]
    data = np.empty(nnz, dtype=dtype)
    formats.fill_values(sub, piece, structure.factor_labels, data)
    return coo.wrap(coords, data, block_shape, None)


class JacobianBlocks:
    """An array-like view of a Jacobian for ``dask.array.from_array``: indexing with slices
    computes that part of ``J`` (as ``sparse.COO``) from the structure and the factor."""

    def __init__(self, structure: Structure, factor: np.ndarray, dtype: np.dtype) -> None:
        self.structure = structure
        # Keep broadcast (zero-stride) axes of the factor at length 1: the graph then carries
        # (and a cluster pickles) only the factor's own data, never its broadcast size.
        self._factor_base = np.array(broadcast_base(factor), order="C")
        self._factor_shape = factor.shape
        self.dtype = np.dtype(dtype)
        self.shape = structure.shape
        self.ndim = len(self.shape)
        self.out_ndim = len(structure.rows)

    def __getitem__(self, index: Any) -> sparse.COO:
        starts, stops, post = ranges(index, self.shape)
        factor = np.broadcast_to(self._factor_base, self._factor_shape)
        block = restricted_block(self.structure, factor, self.dtype, starts, stops)
        return block if post is None else block[post]


def auto_chunks(structure: Structure, dtype: Any, limit: Any = None) -> tuple[tuple[int, ...], ...]:
    """Chunks for ``chunks="auto"``: blocks of about ``limit`` bytes of *nonzeros* (default
    dask's ``array.chunk-size``), counting each nonzero as its value plus one int64 index per axis.

    The sizes are dask's own "auto" choice over the labels of ``V`` (the nonzeros form a dense
    array over ``V``); a label on several axes is cut on its first axis only and left whole on the
    others, so that no block is empty by construction.
    """
    limit = parse_bytes(dask.config.get("array.chunk-size")) if limit is None else limit
    limit = parse_bytes(limit) if isinstance(limit, str) else int(limit)
    axes = structure.rows + structure.cols
    per_nnz = np.dtype(dtype).itemsize + 8 * max(len(axes), 1)
    target = max(1, limit // per_nnz)
    free = structure.free
    free_chunks = da.core.normalize_chunks(
        "auto", structure.free_shape, limit=target, dtype=np.dtype(np.uint8)
    )
    chunks, seen = [], set()
    for label in axes:
        if label in seen:
            chunks.append((structure.sizes[label],))
        else:
            seen.add(label)
            chunks.append(tuple(free_chunks[free.index(label)]))
    return tuple(chunks)


def jacobian(
    subscripts: str, *operands: Any, wrt: int = 0, chunks: Any = "auto", memory_limit: Any = None
) -> da.Array:
    """The Jacobian of ``numpy.einsum(subscripts, *operands)`` with respect to ``operands[wrt]``
    as a lazy ``dask.array.Array`` of shape ``z.shape + operand.shape`` with ``sparse.COO``
    blocks.

    ``chunks`` follows dask's convention over the Jacobian's axes (an int, a tuple per axis, a
    dict, explicit block sizes, ``-1`` for a whole axis, ``"auto"`` inside a tuple for dask's
    dense sizing). The default ``"auto"`` sizes blocks by their nonzeros (:func:`auto_chunks`).

    The block values are those of ``sparsejac.jacobian(..., format="coo")`` (same dtype, same
    stored entries); only the factor ``R`` is computed up front, here, after checking its size
    against ``memory_limit`` (bytes, or a size string such as ``"8GB"``/``"8GiB"`` as dask reads
    it; default the memory available). The array carries ``sparsejac_out_ndim`` (its output
    axes), which :func:`sparsejac.to_scipy` and :func:`sparsejac.store.save` read.
    """
    label = require_text(subscripts)
    arrays = as_arrays(operands, label)
    plan = Plan(subscripts, *(a.shape for a in arrays), wrt=wrt)
    structure = plan.structure
    dtype = result_dtype(arrays)
    if isinstance(chunks, str) and chunks == "auto":
        normalized = auto_chunks(structure, dtype)
    else:
        normalized = _normalize_chunks(chunks, structure.shape, dtype, subscripts)
    factor_size = math.prod(structure.sizes[l] for l in structure.factor_labels)
    options.guard(
        factor_size * dtype.itemsize, options.memory_limit(memory_limit, context(label)),
        context(label), f"the dense factor R over {len(structure.factor_labels)} letter(s)",
    )
    factor = einsum_factor(plan.einsum, plan.wrt, arrays, dtype)
    blocks = JacobianBlocks(structure, factor, dtype)
    name = "sparsejac-jacobian-" + tokenize(subscripts, plan.wrt, normalized, dtype.str, *arrays)
    return from_blocks(blocks, normalized, name)


def _normalize_chunks(chunks, shape, dtype, subscripts):
    if chunks is None or isinstance(chunks, bool):
        raise ArgumentTypeError(
            f"{context(subscripts)}chunks must be 'auto', an int, a tuple or a dict, "
            f"got {chunks!r}"
        )
    try:
        return da.core.normalize_chunks(chunks, shape, dtype=dtype)
    except (ValueError, TypeError, NotImplementedError, ZeroDivisionError) as error:
        raise ArgumentError(
            f"{context(subscripts)}chunks={chunks!r} do not fit the Jacobian's shape {shape}: "
            f"{error}"
        ) from None
