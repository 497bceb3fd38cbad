"""A plan's blocks: each block's pattern kept, and how each traced value lands in it.

:class:`PlanBlock` keeps, for one block of a :class:`~sparsejac.programs.api.ProgramPlan`, the
CSR pattern found by the first trace and, for the terms of each later trace, where their values
go; it writes results in any format from the kept arrays, and predicts the bytes of doing so
before the trace runs again. It reads terms and writes arrays; it never imports the tracer.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ... import formats
from ...operands import numpy_dtype
from .. import terms as T
from . import blocks as B
from . import materialise as M
from .assemble import conversion_nbytes


class PlanBlock:
    """One block of a plan: its CSR pattern, and how each traced value lands in it."""

    def __init__(self, terms, out_shape, inp_shape, labels, dtype, symmetric=False) -> None:
        import torch

        self.out_shape, self.inp_shape = tuple(out_shape), tuple(inp_shape)
        shape = (math.prod(out_shape), math.prod(inp_shape))
        self.direct = B.direct(terms, labels)
        # the terms with their factors' shapes, strides and dtypes only: what a refill's
        # writers allocate is predicted from them before tracing again (:meth:`write_nbytes`)
        self.shadow = [T.Term(t.out, t.inp, _meta(t.factor), t.flabels) for t in terms]
        self.kept: list[int | None] = [None] * len(terms)  # entries kept of each mapped term
        self.cache: dict[str, Any] = {}
        self.patterns: dict[tuple, Any] = {}  # direct blocks: each format's kept pattern
        self.slots = None  # per term, where its kept values go (terms one entry a row)
        if self.direct or not terms:
            # the largest term's pattern holds the others' (B.nesting)
            csr = M.materialise([B.largest(terms, labels)] if terms else [], out_shape,
                                inp_shape, labels, dtype)
            self.slot = None
        elif any(t.mapped(labels) for t in terms) and M.by_rows_applies(terms, shape, labels):
            # the union merged row by row: no coordinates, and distinct slots within a term
            indptr, indices, self.slots, self.keeps = M.rows_pattern(terms, shape, labels)
            csr = M.canonical_csr(np.zeros(len(indices), dtype=numpy_dtype(dtype)), indices, indptr, shape)
        else:  # several terms or index maps: coordinates once, then each value's slot
            rows, cols, keeps = [], [], []
            for term in terms:
                if term.mapped(labels):
                    r, c, keep = T.placed(term, labels)
                    r, c = r[keep], c[keep]
                    keeps.append(keep)
                    self.kept[len(keeps) - 1] = len(r)
                else:
                    s, _ = M.structure_of(term, labels)
                    pattern = formats.csr_pattern(s)
                    c = torch.from_numpy(np.asarray(pattern.indices, dtype=np.int64))
                    r = torch.from_numpy(formats.csr_rows(pattern.indptr))
                    keeps.append(None)
                rows.append(r.cpu().numpy())
                cols.append(c.cpu().numpy())
            key = np.concatenate(rows) * shape[1] + np.concatenate(cols)
            unique, self.slot = np.unique(key, return_inverse=True)
            self.keeps = keeps
            idx = formats.index_dtype(max(len(unique), 1), shape)
            indptr = np.zeros(shape[0] + 1, dtype=idx)
            np.cumsum(np.bincount(unique // shape[1], minlength=shape[0]), out=indptr[1:])
            import scipy.sparse

            csr = scipy.sparse.csr_array(
                (np.zeros(len(unique), dtype=numpy_dtype(dtype)), (unique % shape[1]).astype(idx),
                 indptr), shape=shape)
        # the torch formats' view of the kept arrays, made while they are writable: torch
        # warns on wrapping a read-only array (it cannot mark a tensor read-only), and a copy
        # per refill would be waste
        self.torch_csr = formats.CompressedPattern(torch.from_numpy(csr.indices),
                                                   torch.from_numpy(csr.indptr), csr.shape)
        for a in (csr.indices, csr.indptr):
            a.flags.writeable = False  # shared by every refill: read-only
        self.csr = csr
        self.nnz = csr.nnz
        self.mirror = None  # for a symmetric block: where each entry's mirror image is
        self.swap = None  # or, for one plain term, the axes of V that transposing swaps
        if symmetric:
            t = self._transpose_order()
            if np.array_equal(t.indptr, csr.indptr) and np.array_equal(t.indices, csr.indices):
                self.mirror = t.data
                if self.direct:
                    self._swap(B.largest(terms, labels), labels)

    def _swap(self, term, labels) -> None:
        """Where the block is one plain term whose transpose swaps labels of ``V`` (rows
        ``(b, i)`` and columns ``(b, k)``: ``V = (b, i, k)``, the mirror of ``v`` is ``v``
        with ``i`` and ``k`` swapped), keep that permutation of ``V``'s axes instead of the
        mirror's index array: the values are then averaged with a transposed view of
        themselves, without a gather. Checked against the mirror found from the pattern."""
        out, inp = term.out_atoms, term.inp_atoms
        sigma: dict[int, int] = {}
        for a, b in zip(out, inp):
            if sigma.setdefault(a, b) != b or sigma.setdefault(b, a) != a:
                return  # a label paired with two others: no permutation of V says it
        free = term.free(labels)
        if len(out) != len(inp) or set(sigma) != set(free):
            return
        perm = tuple(free.index(sigma[l]) for l in free)
        shape = labels.shape(free)
        order = np.arange(self.nnz, dtype=np.int64).reshape(shape).transpose(perm).reshape(-1)
        if np.array_equal(order, self.mirror):
            self.swap = (shape, perm)
            self.mirror = None

    def writes_directly(self, transposed: bool) -> bool:
        """Whether :meth:`write` writes this block: direct, used as it is (not also as a
        transpose), and not averaged with its mirror image (a symmetric Hessian block)."""
        return self.direct and self.mirror is None and self.swap is None and not transposed

    def write(self, terms, labels, dtype, fmt: str, device) -> Any:
        """A direct block (one term, no index map) written in ``fmt``: its pattern for that
        format and device made once and kept (read-only), the values written straight into
        the format's order (:mod:`.write`)."""
        f = formats.get(fmt, require=False)
        xp = B.backend(f, device)
        term = B.largest(terms, labels)
        structure, _ = M.structure_of(term, labels)
        key = (f.name, xp.name, str(device))
        if key not in self.patterns:
            if f.layout is formats.CSR and xp is B.NUMPY:
                pattern = self._kept_csr(f)  # the kept CSR arrays themselves
            else:
                pattern = B.pattern(term, structure, f, self.out_shape, self.inp_shape, xp)
                for a in f.layout.arrays(pattern):
                    if isinstance(a, np.ndarray):
                        a.flags.writeable = False  # shared by every refill: read-only
            self.patterns[key] = pattern
        return B.container(terms, labels, f, dtype, xp, self.patterns[key], self.out_shape,
                           self.inp_shape)

    def _kept_csr(self, f: formats.Format) -> Any:
        """The kept CSR pattern for ``f``: the arrays, or for a torch format tensors sharing
        their memory (:attr:`torch_csr`; a transposed block's mirror has no such view, and its
        arrays are writable)."""
        return self.torch_csr if f.on_torch and self.torch_csr is not None else self.csr

    def _transpose_order(self):
        """The transposed pattern, its data the position of each entry in this block's."""
        import scipy.sparse

        order = scipy.sparse.csr_array(
            (np.arange(self.nnz, dtype=np.int64), self.csr.indices, self.csr.indptr),
            shape=self.csr.shape)
        t = order.T.tocsr()
        t.sort_indices()
        return t

    def data(self, terms, labels, dtype) -> np.ndarray:
        if self.swap is not None:  # exactly symmetric: (a + b) / 2 with b a's mirror
            shape, perm = self.swap
            if len(terms) == 1:  # the values are the factor spread: a view, no copy
                s, fl = M.structure_of(terms[0], labels)
                spread = s.spread(M.numpy_factor(terms[0], dtype), fl)
            else:  # nested terms (B.nesting): the largest's values with the others added
                spread = B.values(terms, labels, formats.get("csr", require=False),
                                  dtype).reshape(shape)
            data = np.empty(self.nnz, dtype=numpy_dtype(dtype))
            view = data.reshape(shape)
            np.add(spread, spread.transpose(perm), out=view)
            np.multiply(view, 0.5, out=view)
            return data
        data = self._data(terms, labels, dtype)
        if self.mirror is not None:  # exactly symmetric, as hessian_of gives it
            # in place on the mirrored copy: two arrays at once whether or not numpy elides
            # the temporaries of (data + data[mirror]) * 0.5 (the same sums: + commutes)
            mirrored = data[self.mirror]
            mirrored += data
            mirrored *= 0.5
            data = mirrored
        return data

    def _data(self, terms, labels, dtype) -> np.ndarray:
        np_dtype = numpy_dtype(dtype)
        if self.direct:
            return B.values(terms, labels, formats.get("csr", require=False), dtype)
        if not terms:
            return np.zeros(0, dtype=np_dtype)
        if self.slots is not None:
            data = np.zeros(self.nnz, dtype=np_dtype)
            for term, slot, keep in zip(terms, self.slots, self.keeps):
                M.add_values(data, slot, term, labels, dtype, keep)
            return data
        parts = []
        for term, keep in zip(terms, self.keeps):
            if keep is None:
                s, fl = M.structure_of(term, labels)
                d = np.empty(s.nnz, dtype=np_dtype)
                formats.fill_values(s, M.numpy_factor(term, dtype), fl, d)
                parts.append(d)
            else:
                parts.append(T.values(term, labels, dtype, keep.to(term.factor.device))
                              .detach().cpu().numpy())
        return np.bincount(self.slot, weights=np.concatenate(parts),
                           minlength=self.nnz).astype(np_dtype)

    def result(self, data: np.ndarray, fmt: str, transposed: bool = False):
        import scipy.sparse

        if transposed:  # a Hessian's block below the diagonal: the mirror of one above
            if "T" not in self.cache:
                t = self._transpose_order()
                perm = t.data
                t.data = np.zeros(0)
                self.cache["T"] = PlanBlock.__new__(PlanBlock)
                mirror = self.cache["T"]
                mirror.out_shape, mirror.inp_shape = self.inp_shape, self.out_shape
                mirror.csr = scipy.sparse.csr_array(
                    (np.zeros(self.nnz, dtype=data.dtype), t.indices, t.indptr),
                    shape=t.shape)
                mirror.nnz, mirror.cache, mirror.perm = self.nnz, {}, perm
                mirror.torch_csr = None  # its arrays are its own, writable
            mirror = self.cache["T"]
            return mirror.result(data[mirror.perm], fmt)
        f = formats.get(fmt, require=False)
        if f.layout is formats.CSR:  # the kept arrays themselves, no copy
            return f.container(self._kept_csr(f), data, self.out_shape, self.inp_shape)
        if fmt not in self.cache and f.layout is formats.COO:
            # the coordinates written from the kept rows and columns (as the first call's
            # writer writes them, formats.csr_to_coords): the values stay in the CSR's order
            idx = f.index_itemsize(self.nnz, self.out_shape, self.inp_shape)
            self.cache[fmt] = (formats.csr_to_coords(self.csr.indptr, self.csr.indices,
                                                     self.out_shape, self.inp_shape,
                                                     B.NUMPY.index(idx)), None)
        if fmt not in self.cache:  # the format's pattern, and where each CSR value goes in it
            order = scipy.sparse.csr_array(
                (np.arange(self.nnz, dtype=np.int64), self.csr.indices, self.csr.indptr),
                shape=self.csr.shape)
            self.cache[fmt] = f.pattern_from_csr(order, self.out_shape, self.inp_shape)
        pattern, perm = self.cache[fmt]
        return f.container(pattern, data if f.layout.csr_order else data[perm], self.out_shape,
                           self.inp_shape)

    # --- what a refill allocates, predicted before it traces (the writers above, in step) ---

    def write_nbytes(self, fmt: str, dtype, labels: T.Labels, device) -> tuple[int, int]:
        """``(peak, kept)`` bytes of :meth:`write`: the format's pattern where it is not kept
        yet (then as :func:`.write.nbytes` predicts the first call's), else the values and the
        factor's copies (cast, laid out in ``V`` order, float16 held as float32)."""
        f = formats.get(fmt, require=False)
        xp = B.backend(f, device)
        if (f.name, xp.name, str(device)) not in self.patterns and not (
                f.layout is formats.CSR and xp is B.NUMPY):
            return B.nbytes(self.shadow, self.out_shape, self.inp_shape, labels, dtype, f)
        big = B.largest(self.shadow, labels)
        structure, fl = M.structure_of(big, labels)
        nnz, itemsize = structure.nnz, dtype.itemsize
        value = np.dtype(f.value_dtype(numpy_dtype(dtype))).itemsize
        fill = nnz * itemsize + M.copy_nbytes(big, f.layout.target(structure), fl, dtype)
        cast = nnz * (itemsize + value) if value != itemsize else 0
        return max(fill, cast), nnz * value

    def data_nbytes(self, dtype, labels: T.Labels) -> tuple[int, int]:
        """``(peak, kept)`` bytes of :meth:`data`: each term's values, their concatenation,
        ``np.bincount``'s float64 weights and sums, the cast back (and a mirror's average)."""
        it = np.dtype(numpy_dtype(dtype)).itemsize
        nnz = self.nnz
        if self.direct:
            big = B.largest(self.shadow, labels)
            s, fl = M.structure_of(big, labels)
            peak = nnz * it + M.copy_nbytes(big, s, fl, dtype)
            if len(self.shadow) > 1 and self.swap is not None:  # B.values, then the average
                peak += nnz * it
        elif not self.shadow:
            return 0, 0
        elif self.slots is not None:  # merged row by row: each term's values added at slots
            # (its values, numpy's gather of data[slot] and the sum; a bound: m entries kept)
            peak = nnz * it + max(3 * t.nnz(labels) * it for t in self.shadow)
        else:
            parts = peak = 0
            for term, kept in zip(self.shadow, self.kept):
                if kept is None:  # unmapped: written by its structure, as the first call
                    s, fl = M.structure_of(term, labels)
                    n = s.nnz * it
                    peak = max(peak, parts + n + M.copy_nbytes(term, s, fl, dtype))
                else:  # mapped: the factor cast, spread over V (a copy unless it is V), kept
                    free = term.free(labels)
                    size = labels.size(free)
                    cast = term.factor.numel() * it if term.factor.dtype != dtype else 0
                    order = [term.flabels.index(l) for l in free if l in term.flabels]
                    view = (term.factor.numel() == size
                            and term.factor.permute(order).is_contiguous())
                    n = kept * it
                    peak = max(peak, parts + cast + (0 if view else size * it) + n)
                parts += n
            wide = parts // it * 8 if it != 8 else 0  # bincount reads its weights as float64
            peak = max(peak, 2 * parts + wide + nnz * 8, parts + nnz * (8 + it))
        if self.mirror is not None:  # the mirrored copy, averaged in place
            peak = max(peak, 2 * nnz * it)
        return peak, nnz * it

    def result_nbytes(self, fmt: str, transposed: bool, itemsize: int) -> tuple[int, int]:
        """``(peak, kept)`` bytes of :meth:`result` beside its values: the format's pattern
        where it is not kept yet (an upper bound: a conversion of the CSR), the values
        permuted into its order."""
        f = formats.get(fmt, require=False)
        nnz, peak, kept = self.nnz, 0, 0
        if transposed and "T" not in self.cache:  # the transposed order, kept
            idx = self.csr.indices.itemsize
            order = nnz * (8 + idx) + (self.csr.shape[1] + 1) * idx
            peak, kept = nnz * 8 + order, order + nnz * itemsize
        if transposed:
            peak, kept = max(peak, kept + nnz * itemsize), kept + nnz * itemsize
        if f.layout is formats.CSR:
            return peak, kept
        cache = self.cache["T"].cache if transposed and "T" in self.cache else self.cache
        out, inp = ((self.inp_shape, self.out_shape) if transposed
                    else (self.out_shape, self.inp_shape))
        during = kept
        if fmt not in cache and f.layout is formats.COO:  # coordinates from the kept rows
            idx = f.index_itemsize(nnz, out, inp)
            coords = nnz * (len(out) + len(inp)) * idx
            peak = max(peak, kept + coords + formats.csr_to_coords_nbytes(
                nnz, out, inp, idx, self.csr.indices.itemsize))
            during = kept = kept + coords
        elif fmt not in cache:  # the positions (int64) as a CSR, converted: the pattern kept
            csr = nnz * 8 + self.csr.indices.nbytes + self.csr.indptr.nbytes
            extra, final = conversion_nbytes(fmt, nnz, out, inp, 8, csr)
            peak = max(peak, kept + nnz * 8 + extra)
            # the positions stay alive until the result is made
            during, kept = kept + final + nnz * 8, kept + final
        if not f.layout.csr_order:
            peak, kept = max(peak, during + nnz * itemsize), kept + nnz * itemsize
        return peak, kept


def _meta(factor):
    """An unallocated tensor with ``factor``'s shape, strides and dtype."""
    import torch

    return torch.empty_strided(tuple(factor.shape), factor.stride(), dtype=factor.dtype,
                               device="meta")
