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
from typing import Any, NamedTuple, Sequence

import numpy as np

from . import formats, options
from .backend import NUMPY, TorchBackend, broadcast_base, torch_dtype
from .embed import embed_coo, embedding_nnz
from .errors import ShapeError, context
from .formats import Format
from .grammar import Einsum, bind, parse, require_text
from .operands import as_array, as_tensors, cuda_device, is_torch_tensor, result_dtype
from .structure import Structure, einsum_factor, einsum_structure, factor_is_view

METHODS = ("direct", "embed")


class Options(NamedTuple):
    """The options of a build, checked once at the public boundary."""

    format: Format
    method: str
    memory_limit: float | None  # bytes; None: the memory available (on the GPU for a GPU build)


def check_options(prefix: str, format: Any, method: Any = "direct",
                  memory_limit: Any = None) -> Options:
    return Options(formats.get(format, prefix), options.choice(method, "method", METHODS, prefix),
                   options.limit_bytes(memory_limit, prefix))


class Plan:
    """The Jacobian of one einsum with respect to one operand, planned from shapes alone.

    >>> p = plan("bij,bjk->bik", (8, 4, 5), (8, 5, 6), wrt=1)
    >>> p.nnz, p.nbytes("csr", np.float32)   # 960 values and indices, 8*4*6 + 1 row pointers
    (960, 8452)
    """

    def __init__(self, subscripts: str, *shapes: Sequence[int], wrt: int = 0) -> None:
        parsed = parse(subscripts, len(shapes))
        self.subscripts = subscripts
        self.shapes = tuple(options.shape(s, i, context(subscripts)) for i, s in enumerate(shapes))
        self.wrt = options.wrt_index(wrt, len(shapes), context(subscripts), tuples=False)
        self.einsum: Einsum = bind(parsed, self.shapes)
        self.structure: Structure = einsum_structure(self.einsum, self.wrt)
        self._patterns: dict[tuple, Any] = {}

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

    @property
    def out_ndim(self) -> int:
        """The number of output axes: ``shape[:out_ndim]`` is ``z.shape``."""
        return len(self.einsum.output)

    def _prefix(self) -> str:
        return context(self.subscripts)

    def _itemsize(self, fmt: Format, dtype: Any) -> int:
        return fmt.value_itemsize(options.value_dtype(dtype, self._prefix()))

    def nbytes(self, format: str = "coo", dtype: Any = np.float64) -> int:
        """Bytes of the arrays a fresh build of ``format`` allocates for values of ``dtype``."""
        fmt = formats.get(format, self._prefix(), require=False)
        return fmt.structure_nbytes(self.structure, self._itemsize(fmt, dtype))

    def peak_nbytes(self, format: str = "coo", dtype: Any = np.float64) -> int:
        """The peak bytes a fresh ``method="direct"`` build of ``format`` allocates for C-ordered
        operands of ``dtype``: the result, the factor ``R`` and every temporary of the writers
        (what the memory guard checks)."""
        fmt = formats.get(format, self._prefix(), require=False)
        checked = options.value_dtype(dtype, self._prefix())
        # without operands only the values' size matters: a torch dtype's as a numpy one
        value = (fmt.value_dtype(checked) if isinstance(checked, np.dtype)
                 else np.dtype(f"V{fmt.value_itemsize(checked)}"))
        return self._peak(fmt, value, None, pattern=True)

    def _factor_labels(self, fmt: Format) -> tuple[int, ...]:
        """The axes ``R`` is computed with for ``fmt``: the V order of the structure written
        (CSC writes ``J.T``), so that spreading it never transposes."""
        return fmt.layout.target(self.structure).factor_labels

    def _peak(self, fmt: Format, value: np.dtype, arrays, pattern: bool) -> int:
        """Peak bytes of a build: ``arrays`` (None: C-ordered operands of ``value``) decide
        whether ``R`` is a view of an operand or a cast copy of it."""
        fmt = formats.get(fmt, require=False)
        labels = self._factor_labels(fmt)
        itemsize = value.itemsize
        factor_nbytes = math.prod(self.structure.sizes[l] for l in labels) * itemsize
        others = [i for i in range(len(self.shapes)) if i != self.wrt]
        casts = 0
        if arrays is not None:
            # A cast copies only the data an operand holds, never its broadcast dimensions.
            casts = sum(broadcast_base(arrays[i]).size * itemsize for i in others
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

    def _guard(self, nbytes: int, limit: float | None, what: str, device: Any = None) -> None:
        if limit is None:
            if device is not None and device.type == "cuda":
                import torch

                limit = torch.cuda.mem_get_info(device)[0]  # free memory on that GPU
            else:
                limit = options.available_memory()
        options.guard(
            nbytes, limit, self._prefix(),
            f"{what} with {self.nnz:,} nonzeros of shape {self.shape}",
        )

    def _pattern_arrays(self, fmt: Format, xp=NUMPY, keep: bool = True):
        """The index arrays for ``fmt`` on backend ``xp``: built once and kept for later calls
        (``keep``), read-only then, since every result of the plan shares them."""
        key = self._key(fmt, xp)
        if key in self._patterns:
            return self._patterns[key]
        pattern = fmt.write_pattern(self.structure, xp)
        if keep:
            for array in fmt.layout.arrays(pattern):
                if isinstance(array, np.ndarray):
                    array.flags.writeable = False  # torch tensors cannot be; see the docs
            self._patterns[key] = pattern
        return pattern

    def _has_pattern(self, fmt: Format, xp=NUMPY) -> bool:
        return self._key(fmt, xp) in self._patterns

    @staticmethod
    def _key(fmt: Format, xp) -> tuple:
        """The cache key of a pattern: its format and where its arrays live."""
        return (fmt.name, xp.name, str(getattr(xp, "device", "")))

    def pattern(self, format: str = "coo", memory_limit: Any = None):
        """The structure alone: ``True`` at every structural nonzero (bool data).

        Usable as ``scipy.optimize.least_squares(..., jac_sparsity=plan.pattern("csr"))``.
        """
        fmt, _, limit = check_options(self._prefix(), format, "direct", memory_limit)
        return self._pattern(fmt, limit)

    def _pattern(self, fmt: Format, limit: float | None):
        if not self._has_pattern(fmt):
            self._guard(fmt.structure_nbytes(self.structure, 1), limit, f"the {fmt.name} pattern")
        return self._assemble(fmt, np.ones(self.nnz, dtype=np.bool_))

    def _assemble(self, fmt: Format, data, xp=NUMPY, keep: bool = True):
        """Wrap the pattern for ``fmt`` and ``data`` in ``fmt``'s container."""
        return self._container(fmt, self._pattern_arrays(fmt, xp, keep), data)

    def _container(self, fmt: Format, pattern, data):
        n = self.out_ndim
        return fmt.container(pattern, data, self.shape[:n], self.shape[n:])

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
        ``memory_limit`` in bytes or a size string such as ``"8GB"`` (10**9) or ``"8GiB"``
        (2**30), as dask reads it (default: the memory available, on the GPU for a GPU build)
        guards the build's peak memory (the result, the factor ``R`` and the writers'
        temporaries). float16 operands give float32 values in the scipy formats ``"csr"`` and
        ``"csc"`` (scipy cannot use float16; the upcast is exact), for both methods.
        """
        checked = check_options(self._prefix(), format, method, memory_limit)
        return self._build(operands, checked, keep=True)

    def _build(self, operands, checked: Options, keep: bool, numpy_checked: bool = False):
        """The Jacobian for ``operands`` with checked options (``numpy_checked``: the numpy
        arrays among the operands went through :func:`as_array` already)."""
        fmt, how, limit = checked
        label = self.subscripts
        device = cuda_device(operands) if fmt.on_torch and how == "direct" else None
        if device is not None:
            xp = TorchBackend(device)
            arrays, dtype = as_tensors(operands, device, label)
            value_dtype = torch_dtype(dtype)
        else:
            xp = NUMPY
            arrays = [x if numpy_checked and isinstance(x, np.ndarray) else as_array(x, i, label)
                      for i, x in enumerate(operands)]
            dtype = value_dtype = fmt.value_dtype(result_dtype(arrays))
            if fmt.on_torch:
                torch_dtype(dtype, self._prefix())  # refuse what torch cannot hold
        shapes = tuple(tuple(a.shape) for a in arrays)
        if shapes != self.shapes:
            raise ShapeError(
                f"{self._prefix()}the plan was made for shapes {self.shapes}, "
                f"got operands of shapes {shapes}"
            )
        if how == "embed":
            return self._embed(arrays, dtype, fmt, limit)

        if xp is NUMPY:
            # The peak: R (unless a view), the values, the pattern and the writers' temporaries.
            nbytes = self._peak(fmt, np.dtype(dtype), arrays, not self._has_pattern(fmt, xp))
        else:
            nbytes = self.nnz * dtype.itemsize
            if not self._has_pattern(fmt, xp):
                nbytes = max(fmt.structure_nbytes(self.structure, dtype.itemsize),
                             fmt.pattern_peak_nbytes(self.structure) + self.nnz * dtype.itemsize)
            # The dense factor R (at most nnz entries: "i,i->i" has R as large as J).
            nbytes += math.prod(self.structure.sizes[l] for l in self.structure.factor_labels) \
                * dtype.itemsize
        self._guard(nbytes, limit, f"the {fmt.name} Jacobian", device)
        labels = self._factor_labels(fmt)
        factor = einsum_factor(self.einsum, self.wrt, arrays, value_dtype, xp, labels)
        target = fmt.layout.target(self.structure)
        data = xp.empty(self.nnz, value_dtype)
        formats.fill_values(target, factor, labels, data, xp)
        del factor
        return self._assemble(fmt, data, xp, keep)

    def _embed(self, arrays, dtype: np.dtype, fmt: Format, limit: float | None):
        einsum = self.einsum
        n_all = embedding_nnz(einsum)
        n_axes = sum(len(t) for t in einsum.inputs) + len(einsum.inputs[self.wrt])
        # The embedding (coords + values), then the collapse's sorted copy and its result.
        nbytes = n_all * (8 * n_axes + dtype.itemsize) * 2 + self.nbytes(fmt, dtype)
        self._guard(nbytes, limit, "method='embed'")
        result = embed_coo(einsum, self.wrt, arrays, dtype)
        n = self.out_ndim
        return fmt.from_coords(result.coords, result.data, self.shape[:n], self.shape[n:])


class Plans(tuple):
    """The plans of one einsum for several operands (``plan(..., wrt=(0, 1))``): a tuple of
    :class:`Plan` whose methods give tuples, one entry per ``wrt``, as
    ``sparsejac.jacobian(..., wrt=(0, 1))`` does.

    >>> ps = plan("ij,jk->ik", (2, 3), (3, 4), wrt=(0, 1))
    >>> ps.nnz
    (24, 24)
    >>> Jx, Jw = ps.jacobian(np.ones((2, 3)), np.ones((3, 4)), format="csr")
    >>> Jx.shape, Jw.shape
    ((8, 6), (8, 12))
    """

    def __repr__(self) -> str:
        return f"Plans({', '.join(map(repr, self))})"

    @property
    def nnz(self) -> tuple[int, ...]:
        return tuple(p.nnz for p in self)

    @property
    def shape(self) -> tuple[tuple[int, ...], ...]:
        return tuple(p.shape for p in self)

    @property
    def matrix_shape(self) -> tuple[tuple[int, int], ...]:
        return tuple(p.matrix_shape for p in self)

    def nbytes(self, format: str = "coo", dtype: Any = np.float64) -> tuple[int, ...]:
        return tuple(p.nbytes(format, dtype) for p in self)

    def peak_nbytes(self, format: str = "coo", dtype: Any = np.float64) -> tuple[int, ...]:
        return tuple(p.peak_nbytes(format, dtype) for p in self)

    def pattern(self, format: str = "coo", memory_limit: Any = None) -> tuple:
        checked = check_options(self[0]._prefix(), format, "direct", memory_limit)
        return tuple(p._pattern(checked.format, checked.memory_limit) for p in self)

    def jacobian(self, *operands: Any, format: str = "coo", method: str = "direct",
                 memory_limit: Any = None) -> tuple:
        """The Jacobians for these operands, one per plan (see :meth:`Plan.jacobian`)."""
        checked = check_options(self[0]._prefix(), format, method, memory_limit)
        return _build_all(self, operands, checked, keep=True)


def _convert(operands, label: str) -> list:
    """The operands checked and converted once (torch tensors stay tensors, so that a GPU build
    of the torch formats keeps them on their device)."""
    return [x if is_torch_tensor(x) else as_array(x, i, label) for i, x in enumerate(operands)]


def _build_all(plans: Sequence[Plan], operands, checked: Options, keep: bool) -> tuple:
    """Each plan's Jacobian, the operands converted once."""
    arrays = _convert(operands, plans[0].subscripts)
    return tuple(p._build(arrays, checked, keep, numpy_checked=True) for p in plans)


def plan(subscripts: str, *shapes: Sequence[int], wrt: int | Sequence[int] = 0):
    """Plan the Jacobian of ``einsum(subscripts, *operands)`` w.r.t. ``operands[wrt]`` from the
    operands' shapes alone: a :class:`Plan`, or for a tuple ``wrt`` (as
    :func:`jacobian` takes) a :class:`Plans`, whose methods give tuples.

    >>> plan("ij,jk->ik", (512, 512), (512, 512)).nnz
    134217728
    """
    label = require_text(subscripts)
    if isinstance(wrt, (tuple, list)):
        positions = options.wrt_indices(wrt, len(shapes), context(label))
        return Plans(Plan(subscripts, *shapes, wrt=k) for k in positions)
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
    ``csc_array`` of shape ``(z.size, operands[k].size)``, both sides flattened in C order
    (``sparsejac.to_scipy`` turns any of them into the matrix). A tuple ``wrt`` gives a tuple of
    Jacobians. The stored entries are exactly the structural nonzeros, which depend on the
    subscripts and shapes only (zeros in the operands stay stored).

    float16 policy: scipy's sparse arrays cannot hold float16 (their routines refuse it), so
    with float16 operands ``format="csr"``/``"csc"`` computes and stores the values in float32
    (exactly the float16 products, upcast), for ``method="direct"`` and ``method="embed"``
    alike; ``"coo"`` and the torch formats keep float16. Any number of operands works (products
    of many operands are contracted pairwise). ``memory_limit`` (bytes, or a size string such as
    ``"8GB"`` = 8 * 10**9 or ``"8GiB"`` = 8 * 2**30, as dask reads it; default the memory
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
    checked = check_options(context(label), format, method, memory_limit)
    arrays = _convert(operands, label)
    shapes = [tuple(a.shape) for a in arrays]
    positions = options.wrt_indices(wrt, len(arrays), context(label))
    # Each plan is private to this call: its index arrays go to the result alone (writable).
    results = tuple(Plan(subscripts, *shapes, wrt=k)._build(arrays, checked, False, True)
                    for k in positions)
    return results if isinstance(wrt, (tuple, list)) else results[0]
