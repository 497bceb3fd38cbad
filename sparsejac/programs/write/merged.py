"""What the writers of merged blocks share: a block whose entries several terms (or several
assignments of one term, through index maps) hit, summed once along a major axis and written
into a format's arrays from the merge.

:class:`Merged` merges along the format's major axis: rows for CSR, COO and the torch formats
(row-major is COO's lexicographic order), columns for CSC (the terms transposed: the CSR of
``J.T`` is the CSC of ``J``); no format goes through another. COO's coordinates are written
over the tensors' own axes from the merged rows and columns (:func:`formats.csr_to_coords`);
the torch formats' tensors are made from the merged arrays, on a CUDA argument's device. Its
subclasses say how the merge is made: row by row (:mod:`.rows`) or from coordinates
(:mod:`.coordinates`). This module reads terms and the formats; it never imports the tracer
or the rules.
"""

from __future__ import annotations

import math
from typing import Sequence

from ... import formats
from ...backend import NUMPY
from .. import terms as T
from .base import Writer, on_gpu, torch_on


def transposed(term: T.Term) -> T.Term:
    """The term of the transposed block (the same factor and labels, sides swapped)."""
    return T.Term(term.inp, term.out, term.stored, term.flabels)  # a lazy product stays so


def oriented(terms: Sequence[T.Term], out_shape: tuple, inp_shape: tuple,
             transpose: bool) -> tuple[list[T.Term], tuple, tuple]:
    """The terms and shapes of the block (``transpose``: of the transposed block)."""
    if transpose:
        return [transposed(t) for t in terms], tuple(inp_shape), tuple(out_shape)
    return list(terms), tuple(out_shape), tuple(inp_shape)


class Merged(Writer):
    """A block merged once along a major axis (``transpose``: its columns, for CSC) into
    canonical compressed arrays, from which a format's arrays are written.

    Subclasses give :meth:`merge` and :meth:`merge_nbytes` for the oriented terms; a plan's
    writer merges rows (``transpose`` False)."""

    def __init__(self, out_shape: Sequence[int], inp_shape: Sequence[int],
                 transpose: bool = False) -> None:
        super().__init__(out_shape, inp_shape)
        self.transpose = transpose

    def merge(self, terms, shape: tuple[int, int], labels, dtype):
        """The canonical CSR of shape ``shape`` of the sum of ``terms`` (oriented)."""
        raise NotImplementedError

    def merge_nbytes(self, terms, shape: tuple[int, int], labels, dtype) -> tuple[int, int]:
        raise NotImplementedError

    def csr(self, terms, labels, dtype):
        """The merge of the block (``transpose``: the CSR of the transposed block)."""
        terms, major, minor = oriented(terms, self.out_shape, self.inp_shape, self.transpose)
        return self.merge(terms, (math.prod(major), math.prod(minor)), labels, dtype)

    def csr_nbytes(self, terms, labels, dtype):
        terms, major, minor = oriented(terms, self.out_shape, self.inp_shape, self.transpose)
        return self.merge_nbytes(terms, (math.prod(major), math.prod(minor)), labels, dtype)

    def _check(self, f: formats.Format) -> None:
        if (f.layout is formats.CSC) != self.transpose:
            raise ValueError(f"{self!r} merges along the other axis than {f!r}'s")

    def write(self, terms, labels, dtype, fmt, device=None):
        """The merge, written into ``fmt``'s arrays. Stored entries: the union of the terms'
        structural entries, those an index map drops (-1) dropped, structural zeros kept."""
        f = formats.get(fmt, require=False)
        self._check(f)
        out_shape, inp_shape = self.out_shape, self.inp_shape
        csr = self.csr(terms, labels, dtype)
        nnz, data = csr.nnz, csr.data
        idx = f.index_itemsize(nnz, out_shape, inp_shape)
        if f.layout is formats.COO:
            pattern = formats.csr_to_coords(csr.indptr, csr.indices, out_shape, inp_shape,
                                            NUMPY.index(idx))
        else:
            pattern = f.layout.map(formats.CompressedPattern(csr.indices, csr.indptr, csr.shape),
                                   lambda a: a.astype(NUMPY.index(idx), copy=False))
        del csr  # the compressed arrays COO does not keep are freed here
        if f.value_dtype(data.dtype) != data.dtype:
            data = data.astype(f.value_dtype(data.dtype))
        if f.on_torch:  # the torch tensors from the merged arrays, on a CUDA argument's device
            gpu = on_gpu(f, device)
            pattern = f.layout.map(pattern, lambda a: torch_on(a, device, gpu))
            data = torch_on(data, device, gpu)
        return f.container(pattern, data, out_shape, inp_shape)

    def nbytes(self, fmt, terms, labels, dtype, device=None):
        """A bound (every entry enumerated counts as stored): the merge, then COO's
        coordinates beside the merged arrays (:func:`formats.csr_to_coords_nbytes`). The
        compressed formats keep the merged arrays (a narrower index rule than the merge's
        would cast them: the merge's is that of the entries enumerated, at least as wide).
        Torch tensors share the numpy arrays on the CPU; a GPU's copies are not host memory."""
        f = formats.get(fmt, require=False)
        self._check(f)
        out_shape, inp_shape = self.out_shape, self.inp_shape
        peak, csr_bytes = self.csr_nbytes(terms, labels, dtype)
        if f.layout is not formats.COO:
            return peak, csr_bytes
        n = sum(t.nnz(labels) for t in terms)
        idx = f.index_itemsize(n, out_shape, inp_shape)
        matrix_idx = formats.index_dtype(n, self.matrix_shape).itemsize
        coords = n * (len(out_shape) + len(inp_shape)) * idx
        write = csr_bytes + coords + formats.csr_to_coords_nbytes(n, out_shape, inp_shape, idx,
                                                                 matrix_idx)
        return max(peak, write), n * dtype.itemsize + coords
