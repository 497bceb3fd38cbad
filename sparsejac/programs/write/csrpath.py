"""The writer of a Hessian's symmetric blocks and of the blocks it also uses transposed: the
block merged once as canonical CSR (by the writer its terms call for), which the average with
its transpose and the transpose itself need, then converted to each place it is used.

A diagonal block is averaged with its mirror image (:mod:`.mirror`); a block above the
diagonal gives the one below it as its transpose (docs/how-it-works.md, "## 5. Hessians"). A
plan keeps, beside the inner writer's pattern, where each entry's mirror image is, or for one
plain term the permutation of ``V``'s axes that transposes it (the average is then taken
against a view, without a gather). This module reads the formats; it never imports the terms'
algebra, the tracer or the rules.
"""

from __future__ import annotations

import numpy as np

from ... import formats
from ...operands import numpy_dtype
from .base import Writer, on_device
from .mirror import average, symmetrise, symmetrise_nbytes, transpose, transpose_nbytes
from .plans import KeptCsr


class CsrPath(Writer):
    """A block merged as CSR by ``inner`` (``symmetric``: averaged with its transpose), then
    converted for each place it is used, as it is or transposed."""

    def __init__(self, inner: Writer, symmetric: bool) -> None:
        super().__init__(inner.out_shape, inner.inp_shape)
        self.inner, self.symmetric = inner, symmetric
        self.mirror: np.ndarray | None = None  # a plan's: where each entry's mirror image is
        self.swapped: tuple | None = None  # or, for one plain term, the axes of V it swaps

    def __repr__(self) -> str:
        return f"<CsrPath of {self.inner!r}{' (symmetric)' if self.symmetric else ''}>"

    def write(self, terms, labels, dtype, fmt, device=None):
        """The canonical CSR (averaged, for a symmetric block). ``terms`` is emptied once it
        is merged: the factors are freed before the average makes its transposed copy (a
        Rosenbrock Hessian of 1e6 variables: 40 MB of factors beside 40 MB of copy)."""
        csr = self.inner.csr(terms, labels, dtype)
        terms.clear()
        return symmetrise(csr) if self.symmetric else csr

    def nbytes(self, fmt, terms, labels, dtype, device=None):
        """The merge; the average beside it; then the result in ``fmt`` beside the CSR, and
        for a block used transposed too, the transpose and its result beside both.
        ``kept``: one place's result."""
        f = formats.get(fmt, require=False)
        itemsize = dtype.itemsize
        nnz = sum(t.nnz(labels) for t in terms)
        peak, csr_bytes = self.inner.csr_nbytes(terms, labels, dtype)
        nrows, ncols = self.matrix_shape
        idx = formats.index_dtype(nnz, (nrows, ncols)).itemsize
        if self.symmetric:
            peak = max(peak, csr_bytes + symmetrise_nbytes(nnz, nrows, idx, itemsize))
        convert, final = f.from_csr_nbytes(nnz, self.out_shape, self.inp_shape, itemsize,
                                           csr_bytes)
        peak = max(peak, csr_bytes + convert)
        if not self.symmetric:  # used transposed too
            own = final if convert else 0  # (no conversion: the result is the CSR itself)
            _, t_bytes = transpose_nbytes(nnz, ncols, idx, itemsize)
            t_convert, _ = f.from_csr_nbytes(nnz, self.inp_shape, self.out_shape, itemsize,
                                             t_bytes)
            peak = max(peak, csr_bytes + own + t_bytes + t_convert)
        return peak, final

    def result(self, written, fmt, transposed=False, device=None):
        """The CSR :meth:`write` gave (or its transpose) converted to ``fmt``."""
        f = formats.get(fmt, require=False)
        if transposed:
            result = f.from_csr(transpose(written), self.inp_shape, self.out_shape)
        else:
            result = f.from_csr(written, self.out_shape, self.inp_shape)
        return on_device(result, f, device)

    def keep(self, terms, labels, dtype) -> KeptCsr:
        """The inner writer's pattern, and for a symmetric block its mirror image (or the
        axes of ``V`` its transpose swaps)."""
        self.kept = self.inner.keep(terms, labels, dtype)
        if self.symmetric:
            self.mirror = self.kept.mirror()
            if self.mirror is not None:
                self.swapped = self.inner.swap(terms, labels, self.mirror)
                if self.swapped is not None:
                    self.mirror = None
        return self.kept

    def values(self, terms, labels, dtype) -> np.ndarray:
        if self.swapped is not None:  # exactly symmetric: (a + b) / 2 with b a's mirror
            return self.inner.averaged(terms, labels, dtype, self.swapped)
        data = self.inner.values(terms, labels, dtype)
        if self.mirror is not None:  # exactly symmetric, as hessian_of gives it
            data = average(data, data[self.mirror])
        return data

    def values_nbytes(self, terms, labels, dtype):
        """The inner writer's values, then the average: beside a copy of the values, or
        (:meth:`Structured.averaged`) with nested terms' values beside the result."""
        peak, kept = self.inner.values_nbytes(terms, labels, dtype)
        nnz = self.kept.nnz * np.dtype(numpy_dtype(dtype)).itemsize
        if self.swapped is not None and len(terms) > 1:
            peak += nnz
        if self.mirror is not None:
            peak = max(peak, 2 * nnz)
        return peak, kept
