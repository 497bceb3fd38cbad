"""What a plan keeps of each block: its canonical CSR pattern, read-only and shared by every
refill, the other formats' patterns made from it once, and the terms' shapes a refill's
prediction reads.

:class:`KeptCsr` is made by a writer's :meth:`~.base.Writer.keep`; a refill's values (in the
kept CSR's order, :meth:`~.base.Writer.values`) become a result in any format through
:meth:`KeptCsr.result`, whose bytes :meth:`KeptCsr.result_nbytes` predicts before the trace
runs again. It reads the formats, scipy and terms (to shadow them); it never imports the
tracer or the rules.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ... import formats
from ...backend import NUMPY
from .. import terms as T
from .mirror import mirror_of, transpose_order, transpose_order_nbytes


class KeptCsr:
    """A block's canonical CSR pattern of shape ``(prod(out_shape), prod(inp_shape))``, kept.

    ``shared``: the arrays are the plan's, read-only (every result shares them), with torch
    views of them for the torch formats, made while they are writable: torch warns on
    wrapping a read-only array (it cannot mark a tensor read-only), and a copy per refill
    would be waste. The transposed pattern a plan makes for itself is not shared so.
    """

    def __init__(self, pattern, out_shape: Sequence[int], inp_shape: Sequence[int],
                 shared: bool = True) -> None:
        import torch

        self.out_shape, self.inp_shape = tuple(out_shape), tuple(inp_shape)
        self.pattern = formats.CompressedPattern(pattern.indices, pattern.indptr,
                                                 tuple(pattern.shape))
        self.nnz = len(pattern.indices)
        self.torch = None
        if shared:
            self.torch = formats.CompressedPattern(torch.from_numpy(pattern.indices),
                                                   torch.from_numpy(pattern.indptr),
                                                   self.pattern.shape)
            for a in (pattern.indices, pattern.indptr):
                a.flags.writeable = False
        self.cache: dict[str, Any] = {}  # each format's pattern, and where each value goes
        self.perm: np.ndarray | None = None  # a transposed pattern: where its values come from

    @property
    def shape(self) -> tuple[int, int]:
        return self.pattern.shape

    @property
    def index_itemsize(self) -> int:
        return self.pattern.indices.itemsize

    def arrays(self, f: formats.Format) -> Any:
        """The kept arrays for a CSR-layout format ``f``: torch views for a torch format where
        there are, else the numpy arrays."""
        return self.torch if f.on_torch and self.torch is not None else self.pattern

    def mirror(self) -> np.ndarray | None:
        """Where each entry's mirror image is, for a symmetric pattern (else None)."""
        return mirror_of(self.pattern)

    def transposed(self) -> "KeptCsr":
        """The transposed block's pattern (made once), its :attr:`perm` the position of each
        of its entries in this one."""
        if "T" not in self.cache:
            t, perm = transpose_order(self.pattern)
            mirror = KeptCsr(t, self.inp_shape, self.out_shape, shared=False)
            mirror.perm = perm
            self.cache["T"] = mirror
        return self.cache["T"]

    def result(self, data: np.ndarray, fmt: Any, transposed: bool = False) -> Any:
        """``data`` (in the kept CSR's order) in ``fmt``'s container (``transposed``: of the
        transposed block, a Hessian's block below the diagonal)."""
        import scipy.sparse

        if transposed:
            mirror = self.transposed()
            return mirror.result(data[mirror.perm], fmt)
        f = formats.get(fmt, require=False)
        if f.layout is formats.CSR:  # the kept arrays themselves, no copy
            return f.container(self.arrays(f), data, self.out_shape, self.inp_shape)
        if f.name not in self.cache and f.layout is formats.COO:
            # the coordinates written from the kept rows and columns (as the first call's
            # writer writes them): the values stay in the CSR's order
            idx = f.index_itemsize(self.nnz, self.out_shape, self.inp_shape)
            self.cache[f.name] = (formats.csr_to_coords(
                self.pattern.indptr, self.pattern.indices, self.out_shape, self.inp_shape,
                NUMPY.index(idx)), None)
        if f.name not in self.cache:  # the format's pattern, and where each CSR value goes
            order = scipy.sparse.csr_array(
                (np.arange(self.nnz, dtype=np.int64), self.pattern.indices, self.pattern.indptr),
                shape=self.shape)
            self.cache[f.name] = f.pattern_from_csr(order, self.out_shape, self.inp_shape)
        pattern, perm = self.cache[f.name]
        return f.container(pattern, data if f.layout.csr_order else data[perm], self.out_shape,
                           self.inp_shape)

    def result_nbytes(self, fmt: Any, transposed: bool, itemsize: int) -> tuple[int, int]:
        """``(peak, kept)`` bytes of :meth:`result` beside its values: the transposed order
        where it is not kept yet, the format's pattern where it is not kept yet (an upper
        bound: a conversion of the CSR), the values permuted into its order."""
        f = formats.get(fmt, require=False)
        nnz, peak, kept = self.nnz, 0, 0
        cache = self.cache
        if transposed:
            if "T" in self.cache:
                cache = self.cache["T"].cache
            else:  # the transposed order, kept
                peak, kept = transpose_order_nbytes(nnz, self.shape[1], self.index_itemsize)
                cache = {}
            # the values gathered into the transposed order
            peak, kept = max(peak, kept + nnz * itemsize), kept + nnz * itemsize
        if f.layout is formats.CSR:
            return peak, kept
        out, inp = ((self.inp_shape, self.out_shape) if transposed
                    else (self.out_shape, self.inp_shape))
        during = kept
        if f.name not in cache and f.layout is formats.COO:  # coordinates from the kept rows
            idx = f.index_itemsize(nnz, out, inp)
            coords = nnz * (len(out) + len(inp)) * idx
            peak = max(peak, kept + coords + formats.csr_to_coords_nbytes(
                nnz, out, inp, idx, self.index_itemsize))
            during = kept = kept + coords
        elif f.name not in cache:  # the positions (int64) as a CSR, converted: the pattern kept
            csr = nnz * 8 + self.pattern.indices.nbytes + self.pattern.indptr.nbytes
            extra, final = f.from_csr_nbytes(nnz, out, inp, 8, csr)
            peak = max(peak, kept + nnz * 8 + extra)
            # the positions stay alive until the result is made
            during, kept = kept + final + nnz * 8, kept + final
        if not f.layout.csr_order:
            peak, kept = max(peak, during + nnz * itemsize), kept + nnz * itemsize
        return peak, kept


def shadow(terms: Sequence[T.Term]) -> list[T.Term]:
    """The terms with their factors' shapes, strides and dtypes only (unallocated): what a
    refill's writers allocate is predicted from them before tracing again."""
    import torch

    return [T.Term(t.out, t.inp, torch.empty_strided(tuple(t.factor.shape), t.factor.stride(),
                                                     dtype=t.factor.dtype, device="meta"),
                   t.flabels) for t in terms]
