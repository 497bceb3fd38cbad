"""Plans: everything about a Jacobian that the subscripts and shapes decide, computed once.

A :class:`Plan` knows the Jacobian's shape, nnz, bytes per format and its sparsity pattern before
any operand is seen; :meth:`Plan.jacobian` writes the values and reuses the pattern it already
built. :func:`jacobian` is the one-shot use of a plan.

>>> import numpy as np, sparsejac
>>> p = sparsejac.plan("ij,jk->ik", (2, 3), (3, 4))
>>> p.nnz, p.shape
(24, (2, 4, 2, 3))
>>> J = p.jacobian(np.ones((2, 3)), np.arange(12.0).reshape(3, 4), format="csr")
>>> J.shape, J.nnz
((8, 6), 24)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import scipy.sparse

from . import formats, options
from .backend import NUMPY, TorchBackend, torch_dtype
from .embed import embed_coo, embedding_nnz
from .errors import ArgumentTypeError, ShapeError, context
from .formats import FORMATS
from .grammar import Einsum, bind, parse, require_text
from .operands import as_array, as_arrays, as_tensors, cuda_device, is_torch_tensor, result_dtype
from .structure import Structure, einsum_factor, einsum_structure, factor_is_view

METHODS = ("direct", "embed")
SCIPY_FORMATS = ("csr", "csc")


def value_dtype_for(fmt: str, dtype: np.dtype) -> np.dtype:
    """The dtype of the stored values of ``fmt`` for operands whose result dtype is ``dtype``:
    the same, except float16 for the scipy formats, which scipy cannot use (its sparse
    routines refuse float16): those are computed and stored in float32, a lossless upcast."""
    dtype = np.dtype(dtype)
    if fmt in SCIPY_FORMATS and dtype == np.float16:
        return np.dtype(np.float32)
    return dtype


class Plan:
    """The Jacobian of one einsum with respect to one operand, planned from shapes alone.

    >>> p = plan("bij,bjk->bik", (8, 4, 5), (8, 5, 6), wrt=1)
    >>> p.nnz, p.nbytes("csr", np.float32)
    (960, 7908)
    """

    def __init__(self, subscripts: str, *shapes: Sequence[int], wrt: int = 0) -> None:
        parsed = parse(subscripts, len(shapes))
        self.subscripts = subscripts
        self.shapes = tuple(options.shape(s, i, context(subscripts)) for i, s in enumerate(shapes))
        self.wrt = options.wrt_index(wrt, len(shapes), context(subscripts), tuples=False)
        self.einsum: Einsum = bind(parsed, self.shapes)
        self.structure: Structure = einsum_structure(self.einsum, self.wrt)
        self._patterns: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (
            f"Plan({self.subscripts!r}, shapes={self.shapes}, wrt={self.wrt}: "
            f"shape={self.shape}, nnz={self.nnz})"
        )

    @property
    def shape(self) -> tuple[int, ...]:
        """``z.shape + operand.shape``: the shape of the COO Jacobian."""
        return self.structure.shape

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(z.size, operand.size)``: the shape of the CSR/CSC Jacobian."""
        return self.structure.matrix_shape

    @property
    def nnz(self) -> int:
        """The number of structural nonzeros (stored entries), from shapes alone."""
        return self.structure.nnz

    def nbytes(self, format: str = "coo", dtype: Any = np.float64) -> int:
        """Bytes of the arrays a fresh build of ``format`` allocates for values of ``dtype``."""
        fmt = options.choice(format, "format", FORMATS, context(self.subscripts))
        if "torch" in type(dtype).__module__:
            itemsize = dtype.itemsize  # a torch dtype
        else:
            try:
                itemsize = np.dtype(dtype).itemsize
            except TypeError:
                raise ArgumentTypeError(
                    f"{context(self.subscripts)}dtype {dtype!r} is not a numpy or torch dtype"
                ) from None
            itemsize = value_dtype_for(fmt, np.dtype(dtype)).itemsize
        return formats.predicted_nbytes(self.structure, fmt, itemsize)

    def peak_nbytes(self, format: str = "coo", dtype: Any = np.float64) -> int:
        """The peak bytes a fresh ``method="direct"`` build of ``format`` allocates for C-ordered
        operands of ``dtype``: the result, the factor ``R`` and every temporary of the writers
        (what the memory guard checks)."""
        fmt = options.choice(format, "format", FORMATS, context(self.subscripts))
        value = value_dtype_for(fmt, np.dtype(dtype))
        return self._peak(fmt, value, None, pattern=True)

    def _factor_labels(self, fmt: str) -> tuple[int, ...]:
        """The axes ``R`` is computed with for ``fmt``: the V order of the structure written
        (CSC writes ``J.T``), so that spreading it never transposes."""
        target = self.structure.transposed() if fmt == "csc" else self.structure
        return target.factor_labels

    def _peak(self, fmt: str, value: np.dtype, arrays, pattern: bool) -> int:
        """Peak bytes of a build: ``arrays`` (None: C-ordered operands of ``value``) decide
        whether ``R`` is a view of an operand or a cast copy of it."""
        labels = self._factor_labels(fmt)
        itemsize = value.itemsize
        factor_nbytes = math.prod(self.structure.sizes[l] for l in labels) * itemsize
        others = [i for i in range(len(self.shapes)) if i != self.wrt]
        casts = 0
        if arrays is not None:
            casts = sum(math.prod(self.shapes[i]) * itemsize for i in others
                        if np.dtype(arrays[i].dtype) != value)
        view, same = factor_is_view(self.einsum, self.wrt, labels)
        owned, contiguous = True, True
        if view:
            operand = None if arrays is None else arrays[others[0]]
            if operand is not None and np.dtype(operand.dtype) != value:
                factor_nbytes = casts  # R is a view of the operand's cast copy
                contiguous = same
            else:
                owned = False
                contiguous = same and (operand is None or operand.flags.c_contiguous)
        writers = formats.predicted_peak(self.structure, fmt, itemsize, factor_nbytes, owned,
                                         contiguous, pattern)
        if view:
            return writers
        # Computing R: the operands' cast copies alongside it.
        return max(writers + casts, casts + factor_nbytes)

    def _guard(self, nbytes: int, memory_limit: Any, what: str, device: Any = None) -> None:
        if memory_limit is None and device is not None and device.type == "cuda":
            import torch

            limit = torch.cuda.mem_get_info(device)[0]  # free memory on that GPU
        else:
            limit = options.memory_limit(memory_limit, context(self.subscripts))
        options.guard(
            nbytes, limit, context(self.subscripts),
            f"{what} with {self.nnz:,} nonzeros of shape {self.shape}",
        )

    def _pattern_arrays(self, fmt: str, xp=NUMPY, keep: bool = True):
        """The index arrays for ``fmt`` on backend ``xp``: built once and kept for later calls
        (``keep``), read-only then, since every result of the plan shares them."""
        key = self._key(fmt, xp)
        if key in self._patterns:
            return self._patterns[key]
        layout = formats.LAYOUT[fmt]
        if layout == "coo":
            itemsize = formats.coo_index_itemsize(fmt, self.structure)
            pattern = formats.coo_coords(self.structure, xp, itemsize)
        elif layout == "csr":
            pattern = formats.csr_pattern(self.structure, xp)
        else:
            pattern = formats.csr_pattern(self.structure.transposed(), xp)
        if fmt in ("torch", "torch_csr") and xp is NUMPY:
            import torch

            pattern = (
                torch.from_numpy(pattern) if layout == "coo"
                else pattern._replace(indices=torch.from_numpy(pattern.indices),
                                      indptr=torch.from_numpy(pattern.indptr))
            )
        if keep:
            for array in (pattern,) if layout == "coo" else (pattern.indices, pattern.indptr):
                if isinstance(array, np.ndarray):
                    array.flags.writeable = False  # torch tensors cannot be; see the docs
            self._patterns[key] = pattern
        return pattern

    def _has_pattern(self, fmt: str, xp=NUMPY) -> bool:
        return self._key(fmt, xp) in self._patterns

    @staticmethod
    def _key(fmt: str, xp) -> tuple:
        """The cache key of a pattern: its format and where its arrays live."""
        return (fmt, xp.name, str(getattr(xp, "device", "")))

    def pattern(self, format: str = "coo", memory_limit: Any = None):
        """The structure alone: ``True`` at every structural nonzero (bool data).

        Usable as ``scipy.optimize.least_squares(..., jac_sparsity=plan.pattern("csr"))``.
        """
        fmt = options.choice(format, "format", FORMATS, context(self.subscripts))
        if not self._has_pattern(fmt):
            self._guard(self.nbytes(fmt, np.bool_), memory_limit, f"the {fmt} pattern")
        return self._assemble(fmt, np.ones(self.nnz, dtype=np.bool_))

    def _assemble(self, fmt: str, data, xp=NUMPY, keep: bool = True):
        """Wrap the pattern for ``fmt`` and ``data`` in ``fmt``'s container."""
        return self._container(fmt, self._pattern_arrays(fmt, xp, keep), data)

    def _container(self, fmt: str, pattern, data):
        n_out = len(self.einsum.output)
        return formats.container(fmt, pattern, data, self.shape[:n_out], self.shape[n_out:])

    def jacobian(
        self,
        *operands: Any,
        format: str = "coo",
        method: str = "direct",
        memory_limit: Any = None,
    ):
        """The Jacobian for these operands (their shapes must be the plan's).

        ``format``: ``"coo"`` (``sparse.COO`` of shape ``z.shape + operand.shape``), ``"csr"`` or
        ``"csc"`` (scipy arrays of shape ``(z.size, operand.size)``), ``"torch"`` (a coalesced
        ``torch.sparse_coo_tensor`` of the COO shape) or ``"torch_csr"`` (a
        ``torch.sparse_csr_tensor`` of the matrix shape). With CUDA tensor operands the torch
        formats are built on their GPU. The pattern built by an earlier call is reused; only the
        values are written, and every result shares the plan's (read-only) index arrays.
        ``memory_limit`` in bytes (default: the memory available, on the GPU for a GPU build)
        guards the build's peak memory (the result, the factor ``R`` and the writers'
        temporaries). float16 operands give float32 values in the scipy formats ``"csr"`` and
        ``"csc"`` (scipy cannot use float16; the upcast is exact), for both methods.
        """
        return self._jacobian(operands, format, method, memory_limit, keep=True)

    def _jacobian(self, operands, format, method, memory_limit, keep: bool):
        fmt = options.choice(format, "format", FORMATS, context(self.subscripts))
        how = options.choice(method, "method", METHODS, context(self.subscripts))
        device = cuda_device(operands) if fmt in ("torch", "torch_csr") and how == "direct" else None
        if device is not None:
            xp = TorchBackend(device)
            arrays, dtype = as_tensors(operands, device, self.subscripts)
            value_dtype = torch_dtype(dtype)
        else:
            xp = NUMPY
            arrays = as_arrays(operands, self.subscripts)
            dtype = value_dtype = value_dtype_for(fmt, result_dtype(arrays))
            if fmt in ("torch", "torch_csr"):
                torch_dtype(dtype, context(self.subscripts))  # refuse what torch cannot hold
        shapes = tuple(tuple(a.shape) for a in arrays)
        if shapes != self.shapes:
            raise ShapeError(
                f"{context(self.subscripts)}the plan was made for shapes {self.shapes}, "
                f"got operands of shapes {shapes}"
            )
        if how == "embed":
            return self._embed(arrays, dtype, fmt, memory_limit)

        if xp is NUMPY:
            # The peak: R (unless a view), the values, the pattern and the writers' temporaries.
            nbytes = self._peak(fmt, np.dtype(dtype), arrays, not self._has_pattern(fmt, xp))
        else:
            nbytes = self.nnz * dtype.itemsize
            if not self._has_pattern(fmt, xp):
                nbytes = max(formats.predicted_nbytes(self.structure, fmt, dtype.itemsize),
                             formats.pattern_peak_nbytes(self.structure, fmt)
                             + self.nnz * dtype.itemsize)
            # The dense factor R (at most nnz entries: "i,i->i" has R as large as J).
            nbytes += math.prod(self.structure.sizes[l] for l in self.structure.factor_labels) \
                * dtype.itemsize
        self._guard(nbytes, memory_limit, f"the {fmt} Jacobian", device)
        labels = self._factor_labels(fmt)
        factor = einsum_factor(self.einsum, self.wrt, arrays, value_dtype, xp, labels)
        target = self.structure.transposed() if fmt == "csc" else self.structure
        data = xp.empty(self.nnz, value_dtype)
        formats.fill_values(target, factor, labels, data, xp)
        del factor
        return self._assemble(fmt, data, xp, keep)

    def _embed(self, arrays, dtype: np.dtype, fmt: str, memory_limit: Any):
        einsum = self.einsum
        n_all = embedding_nnz(einsum)
        n_axes = sum(len(t) for t in einsum.inputs) + len(einsum.inputs[self.wrt])
        # The embedding (coords + values), then the collapse's sorted copy and its result.
        nbytes = n_all * (8 * n_axes + dtype.itemsize) * 2 + self.nbytes(fmt, dtype)
        self._guard(nbytes, memory_limit, "method='embed'")
        result = embed_coo(einsum, self.wrt, arrays, dtype)
        if fmt == "coo":
            return result
        if fmt == "torch":
            return self._container(fmt, result.coords.astype(np.int64), result.data)
        n_out = len(einsum.output)
        out_shape, op_shape = self.shape[:n_out], self.shape[n_out:]
        rows = formats.flat_index(result.coords[:n_out], out_shape)
        cols = formats.flat_index(result.coords[n_out:], op_shape)
        coo = scipy.sparse.coo_array((result.data, (rows, cols)), shape=self.matrix_shape)
        matrix = coo.tocsc() if fmt == "csc" else coo.tocsr()
        # The same index dtype as method="direct" writes.
        index = formats.index_dtype(self.nnz, self.matrix_shape)
        matrix.indices = matrix.indices.astype(index, copy=False)
        matrix.indptr = matrix.indptr.astype(index, copy=False)
        return matrix if fmt in ("csr", "csc") else self._container(fmt, matrix, matrix.data)


def plan(subscripts: str, *shapes: Sequence[int], wrt: int = 0) -> Plan:
    """Plan the Jacobian of ``einsum(subscripts, *operands)`` w.r.t. ``operands[wrt]`` from the
    operands' shapes alone.

    >>> plan("ij,jk->ik", (512, 512), (512, 512)).nnz
    134217728
    """
    return Plan(subscripts, *shapes, wrt=wrt)


def jacobian(
    subscripts: str,
    *operands: Any,
    wrt: int | Sequence[int] = 0,
    format: str = "coo",
    method: str = "direct",
    memory_limit: Any = None,
):
    """The exact sparse Jacobian of ``numpy.einsum(subscripts, *operands)``.

    Returns, for ``wrt=k``, the Jacobian with respect to ``operands[k]``: a ``sparse.COO`` of
    shape ``z.shape + operands[k].shape`` (``format="coo"``) or a scipy ``csr_array`` /
    ``csc_array`` of shape ``(z.size, operands[k].size)``, both sides flattened in C order. A
    tuple ``wrt`` gives a tuple of Jacobians. The stored entries are exactly the structural
    nonzeros, which depend on the subscripts and shapes only (zeros in the operands stay stored).

    float16 policy: scipy's sparse arrays cannot hold float16 (their routines refuse it), so
    with float16 operands ``format="csr"``/``"csc"`` computes and stores the values in float32
    (exactly the float16 products, upcast), for ``method="direct"`` and ``method="embed"``
    alike; ``"coo"`` and the torch formats keep float16. Any number of operands works (products
    of many operands are contracted pairwise). ``memory_limit`` (bytes; default the memory
    available) is checked against the build's predicted peak before anything is allocated.

    >>> import numpy as np, sparsejac
    >>> x, w = np.ones((2, 3)), np.arange(12.0).reshape(3, 4)
    >>> J = sparsejac.jacobian("ij,jk->ik", x, w)
    >>> J.shape, J.nnz
    ((2, 4, 2, 3), 24)
    >>> float(J[1, 2, 1, 0]), float(J[1, 2, 0, 0])   # d z[1,2] / d x[1,0] = w[0,2]
    (2.0, 0.0)
    """
    label = require_text(subscripts)
    # Convert once here (not once per wrt); torch tensors stay tensors, so that a GPU build
    # of the torch formats keeps them on their device.
    arrays = [x if is_torch_tensor(x) else as_array(x, i, label) for i, x in enumerate(operands)]
    shapes = [tuple(a.shape) for a in arrays]
    positions = options.wrt_indices(wrt, len(arrays), context(label))
    # Each plan is private to this call: its index arrays go to the result alone (writable).
    results = tuple(
        Plan(subscripts, *shapes, wrt=k)._jacobian(arrays, format, method, memory_limit, keep=False)
        for k in positions
    )
    return results if isinstance(wrt, (tuple, list)) else results[0]
