"""Jacobians larger than memory: chunked on dask, saved and read back block by block.

:func:`jacobian` returns a lazy ``dask.array.Array`` of shape ``z.shape + operand.shape`` whose
blocks are ``sparse.COO``. Each block is computed on its own from the closed form restricted to its
index ranges (design.md section 1): every label of ``V`` is cut to the intersection of the ranges
of the axes that carry it, which leaves the same :class:`~sparsejac.structure.Structure` with
smaller sizes, its coordinates offset by each range's start and its factor ``R`` sliced on those
ranges. No global coordinate array exists anywhere; a task needs only ``R`` (over the labels the
other operands carry, usually far smaller than ``J``) and its ranges, so the graph runs on dask's
default scheduler and unchanged on a ``dask.distributed`` cluster.

:func:`save` writes the blocks to a directory as they are computed (memory: a few blocks) and
:func:`load` reads such a directory back as the same lazy array.

Importing this module imports dask; ``import sparsejac`` does not.

>>> import numpy as np
>>> import sparsejac.dask
>>> J = sparsejac.dask.jacobian("ij,jk->ik", np.ones((4, 3)), np.ones((3, 5)), chunks=2)
>>> J.shape, J.numblocks
((4, 5, 4, 3), (2, 3, 2, 2))
>>> int(J.sum().compute())   # d z[i,k] / d x[i,j] = w[j,k] = 1 at 4*5*3 entries
60
"""

from __future__ import annotations

import bisect
import json
import math
import os
from dataclasses import replace
from typing import Any, Sequence

import dask
import dask.array as da
import numpy as np
import sparse
from dask.base import tokenize
from dask.utils import parse_bytes

from . import formats, options
from .backend import broadcast_base
from .errors import ArgumentError, ArgumentTypeError, context
from .grammar import require_text
from .operands import as_arrays, result_dtype
from .plan import Plan
from .structure import Structure, einsum_factor

__all__ = ["jacobian", "save", "load", "auto_chunks"]

METADATA = "sparsejac-chunks.json"
BLOCKS = "blocks"
FORMAT_NAME = "sparsejac-chunks"
FORMAT_VERSION = 1


# -- indexing helpers shared by the computed and the stored arrays ----------------------------


def _ranges(index: Any, shape: tuple[int, ...]):
    """A basic index (slices and ints, as dask's getters pass) as contiguous ranges per axis,
    plus the index that takes the requested entries out of the block of those ranges."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1 :]
    index = index + (slice(None),) * (len(shape) - len(index))
    if len(index) != len(shape):
        raise IndexError(f"too many indices for an array of shape {shape}")
    starts, stops, post, trivial = [], [], [], True
    for i, n in zip(index, shape):
        if isinstance(i, (int, np.integer)):
            i = int(i) + n if i < 0 else int(i)
            if not 0 <= i < n:
                raise IndexError(f"index {i} is out of bounds for an axis of size {n}")
            starts.append(i), stops.append(i + 1), post.append(0)
            trivial = False
        elif isinstance(i, slice):
            start, stop, step = i.indices(n)
            if step == 1:
                stop = max(start, stop)
                starts.append(start), stops.append(stop), post.append(slice(None))
            else:
                picked = range(start, stop, step)
                if len(picked) == 0:
                    starts.append(0), stops.append(0), post.append(slice(None))
                else:
                    lo, hi = min(picked[0], picked[-1]), max(picked[0], picked[-1]) + 1
                    starts.append(lo), stops.append(hi)
                    # The block starts at the lowest picked index: walk it with the same step.
                    post.append(slice(0, None, step) if step > 0 else slice(hi - 1 - lo, None, step))
                    trivial = False
        else:
            raise IndexError(f"unsupported index {i!r}: only slices and integers")
    return tuple(starts), tuple(stops), None if trivial else tuple(post)


def _empty_coo(shape: tuple[int, ...], dtype: np.dtype) -> sparse.COO:
    return sparse.COO(
        np.empty((len(shape), 0), dtype=np.intp),
        np.empty(0, dtype=dtype),
        shape=shape,
        sorted=True,
        has_duplicates=False,
    )


def _meta(ndim: int, dtype: np.dtype) -> sparse.COO:
    return _empty_coo((0,) * ndim, dtype)


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
        return _empty_coo(block_shape, dtype)
    # Relative to the intersections' starts, sorted; wide enough for the block's own indices.
    wanted = formats.index_dtype(nnz, block_shape).itemsize
    coords = formats.coo_coords(sub, itemsize=max(wanted, formats.coo_index_itemsize("coo", sub)))
    for d, label in enumerate(axes):
        offset = lo[label] - int(starts[d])
        if offset:
            coords[d] += offset  # a constant per axis keeps the lexicographic order
    piece = factor[tuple(slice(lo[l], hi[l]) for l in structure.factor_labels) + (Ellipsis,)]
    data = np.empty(nnz, dtype=dtype)
    formats.fill_values(sub, piece, structure.factor_labels, data)
    return sparse.COO(coords, data, shape=block_shape, sorted=True, has_duplicates=False)


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

    def __getitem__(self, index: Any) -> sparse.COO:
        starts, stops, post = _ranges(index, self.shape)
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
    against ``memory_limit`` (bytes; default the memory available).
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
    return _from_blocks(blocks, normalized, name)


def _from_blocks(blocks: Any, chunks, name: str) -> da.Array:
    """``dask.array.from_array`` over one of our array-likes, keeping its sparse blocks."""
    meta = _meta(blocks.ndim, blocks.dtype)
    return da.from_array(
        blocks, chunks=chunks, name=name, lock=False, asarray=False, fancy=False, meta=meta
    )


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


# -- saving and loading ------------------------------------------------------------------------


def _split(shape: tuple[int, ...]) -> int:
    """Where a block is cut into (rows, columns) for storage: the cut whose larger side is
    smallest, so that the column index fits in int32 whenever it can."""
    best, best_size = 0, None
    for s in range(len(shape) + 1):
        size = max(math.prod(shape[:s]), math.prod(shape[s:]))
        if best_size is None or size < best_size:
            best, best_size = s, size
    return best


def _linear(coords: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(coords.shape[1] if coords.ndim == 2 else 0, dtype=np.int64)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        out += coords[d].astype(np.int64, copy=False) * stride
        stride *= shape[d]
    return out


def _as_coo(block: Any) -> sparse.COO:
    if isinstance(block, sparse.COO):
        return block
    if isinstance(block, sparse.SparseArray):
        return block.asformat("coo")
    return sparse.COO.from_numpy(np.asarray(block))


def _block_file(directory: str, index: Sequence[int]) -> str:
    name = ".".join(str(i) for i in index) if len(index) else "0"
    return os.path.join(directory, BLOCKS, name + ".npz")


def _write_block(block, block_id=None, *, directory: str, split: int, compressed: bool):
    """Write one block as a scipy-readable CSR ``.npz`` of its matricization; return its nnz."""
    coo = _as_coo(block)
    if coo.fill_value != 0:
        raise ArgumentError(f"cannot save a block with fill value {coo.fill_value!r}, only 0")
    shape = coo.shape
    nrows, ncols = math.prod(shape[:split]), math.prod(shape[split:])
    nnz = coo.nnz
    idx = formats.index_dtype(nnz, (nrows, ncols))
    data = np.asarray(coo.data)
    if nnz == 0:
        indices = np.empty(0, dtype=idx)
        indptr = np.zeros(nrows + 1, dtype=idx)
    else:
        rows = _linear(coo.coords[:split], shape[:split])
        cols = _linear(coo.coords[split:], shape[split:])
        # A sparse.COO keeps its coordinates lexicographically sorted and free of duplicates:
        # rows come sorted, and columns sorted within each row.
        counts = np.bincount(rows, minlength=nrows)
        del rows
        indptr = np.empty(nrows + 1, dtype=idx)
        indptr[0] = 0
        np.cumsum(counts, out=indptr[1:])
        indices = cols.astype(idx, copy=False)
    path = _block_file(directory, block_id or ())
    partial = path + ".partial"
    with open(partial, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(
            f,
            indices=indices,
            indptr=indptr,
            format=np.array("csr"),
            shape=np.array([nrows, ncols], dtype=np.int64),
            data=data,
        )
    os.replace(partial, path)
    return np.full((1,) * len(shape), nnz, dtype=np.int64)


def save(
    array: da.Array,
    path: str | os.PathLike,
    *,
    compressed: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Compute ``array`` block by block and write each block to ``path`` as it is computed.

    Memory: the blocks being computed at one time (one per worker thread), never the array. The
    directory holds ``sparsejac-chunks.json`` (shape, chunks, dtype, nnz per block; written last,
    so a directory without it is incomplete) and ``blocks/I.J....npz``: each block as a CSR
    matrix of its leading axes by its trailing axes, readable by ``scipy.sparse.load_npz`` too.
    Works with whatever scheduler is active (a ``dask.distributed`` client included: the workers
    write, so ``path`` must be on a file system they share). Returns the metadata written.
    """
    if not isinstance(array, da.Array):
        raise ArgumentTypeError(f"save needs a dask.array.Array, got {type(array).__name__}")
    path = os.fspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise FileExistsError(f"{path} exists and is not a directory")
        if os.listdir(path):
            if not overwrite:
                raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True")
            if not os.path.exists(os.path.join(path, METADATA)) and not os.path.isdir(
                os.path.join(path, BLOCKS)
            ):
                raise FileExistsError(f"{path} is not a saved Jacobian: not overwriting it")
            marker = os.path.join(path, METADATA)
            if os.path.exists(marker):
                os.remove(marker)
            blocks = os.path.join(path, BLOCKS)
            if os.path.isdir(blocks):
                for name in os.listdir(blocks):
                    os.remove(os.path.join(blocks, name))
    os.makedirs(os.path.join(path, BLOCKS), exist_ok=True)
    ndim = array.ndim
    split = _split(array.shape)
    written = array.map_blocks(
        _write_block,
        directory=os.path.abspath(path),
        split=split,
        compressed=bool(compressed),
        chunks=tuple((1,) * len(c) for c in array.chunks),
        dtype=np.int64,
        meta=np.empty((0,) * ndim, dtype=np.int64),
        name="sparsejac-save-" + tokenize(array.name, os.path.abspath(path), compressed),
    )
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar(minimum=1.0):
            counts = np.asarray(written.compute())
    else:
        counts = np.asarray(written.compute())
    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "shape": list(array.shape),
        "chunks": [list(c) for c in array.chunks],
        "dtype": np.dtype(array.dtype).str,
        "split": split,
        "nnz": int(counts.sum()),
        "block_nnz": counts.ravel().tolist(),
        "blocks": "blocks/<i>.<j>....npz (C order of block indices); CSR of "
        "(prod(block.shape[:split]), prod(block.shape[split:]))",
    }
    partial = os.path.join(path, METADATA + ".partial")
    with open(partial, "w") as f:
        json.dump(metadata, f)
    os.replace(partial, os.path.join(path, METADATA))
    return metadata


def _read_block(directory: str, index: tuple[int, ...], shape: tuple[int, ...], split: int,
                dtype: np.dtype) -> sparse.COO:
    with np.load(_block_file(directory, index)) as f:
        data, indices, indptr = f["data"], f["indices"], f["indptr"]
    nnz = data.shape[0]
    if nnz == 0:
        return _empty_coo(shape, dtype)
    nrows = indptr.shape[0] - 1
    rows = np.repeat(np.arange(nrows, dtype=np.int64), np.diff(indptr))
    idx = formats.index_dtype(nnz, shape)
    coords = np.empty((len(shape), nnz), dtype=idx)
    for offset, part, sub in ((0, rows, shape[:split]),
                              (split, indices.astype(np.int64, copy=False), shape[split:])):
        for d in range(len(sub) - 1, -1, -1):
            part, coords[offset + d] = np.divmod(part, sub[d])
    return sparse.COO(coords, data.astype(dtype, copy=False), shape=shape, sorted=True,
                      has_duplicates=False)


class StoredBlocks:
    """An array-like view of a saved directory for ``dask.array.from_array``: indexing reads the
    blocks it touches (only those)."""

    def __init__(self, directory: str, metadata: dict) -> None:
        self.directory = directory
        self.shape = tuple(metadata["shape"])
        self.chunks = tuple(tuple(c) for c in metadata["chunks"])
        self.dtype = np.dtype(metadata["dtype"])
        self.ndim = len(self.shape)
        self.split = int(metadata["split"])
        self.bounds = [np.concatenate([[0], np.cumsum(c)]).tolist() for c in self.chunks]

    def _block(self, index: tuple[int, ...]) -> sparse.COO:
        shape = tuple(self.chunks[d][i] for d, i in enumerate(index))
        return _read_block(self.directory, index, shape, self.split, self.dtype)

    def __getitem__(self, index: Any) -> sparse.COO:
        starts, stops, post = _ranges(index, self.shape)
        # The blocks each axis's range touches, and the part of each.
        per_axis = []
        for d, (a, b) in enumerate(zip(starts, stops)):
            bounds = self.bounds[d]
            if a == b:
                per_axis.append([])
                continue
            first = bisect.bisect_right(bounds, a) - 1
            last = bisect.bisect_left(bounds, b) - 1
            per_axis.append([
                (i, max(a, bounds[i]) - bounds[i], min(b, bounds[i + 1]) - bounds[i])
                for i in range(first, last + 1)
            ])
        shape = tuple(b - a for a, b in zip(starts, stops))
        if any(not p for p in per_axis):
            result = _empty_coo(shape, self.dtype)
        else:
            result = self._assemble(per_axis, ())
        return result if post is None else result[post]

    def _assemble(self, per_axis, prefix):
        d = len(prefix)
        if d == len(per_axis):
            block = self._block(tuple(i for i, _, _ in prefix))
            cut = tuple(slice(a, b) for _, a, b in prefix)
            whole = all(a == 0 and b == n for (_, a, b), n in zip(prefix, block.shape))
            return block if whole else block[cut]
        parts = [self._assemble(per_axis, prefix + (p,)) for p in per_axis[d]]
        return parts[0] if len(parts) == 1 else sparse.concatenate(parts, axis=d)


def load(path: str | os.PathLike) -> da.Array:
    """A directory written by :func:`save`, as a lazy ``dask.array.Array`` with ``sparse.COO``
    blocks and the saved chunks; each task reads one block file."""
    path = os.fspath(path)
    marker = os.path.join(path, METADATA)
    if not os.path.exists(marker):
        raise FileNotFoundError(
            f"{path} is not a saved sparsejac Jacobian (no {METADATA}; an interrupted save "
            "leaves none)"
        )
    with open(marker) as f:
        metadata = json.load(f)
    if metadata.get("format") != FORMAT_NAME or metadata.get("version") != FORMAT_VERSION:
        raise ArgumentError(f"{marker}: unknown format {metadata.get('format')!r} "
                            f"version {metadata.get('version')!r}")
    reader = StoredBlocks(os.path.abspath(path), metadata)
    name = "sparsejac-load-" + tokenize(os.path.abspath(path), os.stat(marker).st_mtime_ns)
    return _from_blocks(reader, reader.chunks, name)
