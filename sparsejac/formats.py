"""Writing a :class:`~sparsejac.structure.Structure` and its values into sparse containers.

Every writer fills arrays of exactly the output's sizes, each nnz-sized array written once, by
broadcasting small per-label tables (docs/how-it-works.md, section 1: enumerating ``V`` in C order
gives the coordinates already sorted and free of duplicates). No sort, no N-D to linear conversions,
and nothing from sparse's numba kernels, so a fresh process pays no compilation.

The pattern (``indices``/``indptr`` or ``coords``) depends on the structure alone and can be kept
and reused with new values (:mod:`sparsejac.plan`).

Each output format is one :class:`Format` in :data:`REGISTRY`: its :class:`Layout` (N-D
coordinates, compressed rows, compressed columns: the writer, the bytes, the conversion from
CSR), its index width rule, its container and the package that container needs. Adding a format
is one entry there. :func:`flat_index` and :func:`unravel_into` are the one linearisation
(flat C-order index <-> N-D coordinates) every conversion uses.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from .backend import NUMPY
from .structure import Structure, distinct

INT32_MAX = np.iinfo(np.int32).max
# The attribute every container (and chunked or loaded dask array) carries: how many of its
# leading axes are the output's, which splits an N-D Jacobian into (out.size, arg.size).
OUT_NDIM = "sparsejac_out_ndim"
INNER = 4096  # entries of the innermost table that csr_pattern broadcasts (see there)


def index_dtype(nnz: int, shape: tuple[int, ...]) -> np.dtype:
    """int32 when ``nnz`` and every dimension fit in it, else int64.

    >>> index_dtype(2**31 - 1, (10, 10)), index_dtype(2**31, (10, 10))
    (dtype('int32'), dtype('int64'))
    """
    return np.dtype(np.int32 if max((nnz, *shape), default=0) <= INT32_MAX else np.int64)


def _ramp_nbytes(digits: "Digits", itemsize: int) -> int:
    """About the peak bytes :func:`_ramp` allocates: its table and the flat copy."""
    full = math.prod(size for size, _ in digits)
    table = math.prod(size for size, coef in digits if coef)
    return (full + table) * itemsize


Digits = list  # [(size, coefficient)]: an index as a mixed-radix sum, one digit per V label


def _digits(structure: Structure, side: tuple[int, ...], free: Sequence[int]) -> Digits:
    """For each label of ``free``, its size and its coefficient in the flat index of ``side``
    (the sum of the C strides of the axes of ``side`` that carry it; 0 if none does)."""
    sizes = structure.sizes
    shape = tuple(sizes[l] for l in side)
    coef: dict[int, int] = {}
    for d, label in enumerate(side):
        coef[label] = coef.get(label, 0) + math.prod(shape[d + 1 :])
    return [(sizes[l], coef.get(l, 0)) for l in free]


def _ramp(digits: Digits, dtype, xp):
    """The flat index ``sum(value * coefficient)`` enumerated over ``digits`` in C order."""
    k = len(digits)
    table = xp.zeros((1,) * k, dtype)
    for position, (size, coef) in enumerate(digits):
        if coef:
            axis = [1] * k
            axis[position] = size
            table = table + xp.arange(size, dtype).reshape(axis) * coef
    return xp.flat(xp.broadcast_to(table, tuple(size for size, _ in digits)))


def _split_tail(digits: Digits, inner: int) -> tuple[Digits, Digits]:
    """Cut ``digits`` into a head and the shortest tail of at least ``inner`` entries, cutting
    one digit in two (``size = a * b``) where the tail would otherwise be much larger."""
    tail: Digits = []
    for position in range(len(digits) - 1, -1, -1):
        have = math.prod(size for size, _ in tail)
        if have >= inner:
            return digits[: position + 1], tail
        size, coef = digits[position]
        need = -(-inner // have)
        if size > 4 * need:
            # The smallest divisor b of size with b >= need, if one is not too large.
            for b in range(need, min(size, 16 * need) + 1):
                if size % b == 0:
                    return digits[:position] + [(size // b, coef * b)], [(b, coef)] + tail
        tail.insert(0, (size, coef))
    return [], tail


def index_tables(structure: Structure) -> tuple[Digits, Digits]:
    """The two tables :func:`csr_pattern` broadcasts into ``indices`` (as digits: a table has
    the product of their sizes entries), for callers that predict its memory."""
    return _split_tail(_digits(structure, structure.cols, structure.free), INNER)


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
        # The column index is a sum over the labels of V, so split V into a head and the
        # shortest tail of at least INNER entries: index = (head part) + (tail part), one
        # broadcast add of two small tables (about nnz / INNER and INNER entries, a label cut
        # in two where needed) writes all of it; nothing nnz-sized is formed but the output.
        head, tail = index_tables(structure)
        head, tail = _ramp(head, dtype, xp), _ramp(tail, dtype, xp)
        xp.add_into(indices.reshape(-1, tail.shape[0]), head[:, None], tail[None, :])

    # Both branches write indptr in place: no second (nrows + 1)-sized array.
    if len(row_free) == len(structure.rows):
        # Every row is hit once, in order: indptr is an arithmetic progression.
        indptr = xp.scale_(xp.arange(nrows + 1, dtype), per_row)
    else:
        # A label repeated on the row side hits only the rows on its diagonal.
        hit = _ramp(_digits(structure, structure.rows, row_free), xp.index(8), xp)
        indptr = xp.zeros(nrows + 1, dtype)
        indptr[1:][hit] = per_row
        del hit
        indptr = xp.cumsum_(indptr)
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
        del ramp  # one ramp alive at a time
    return coords


def fill_values(structure: Structure, factor, labels: Sequence[int], out, xp=NUMPY):
    """Write ``factor`` (axes named by ``labels``), spread over ``V`` in C order, into ``out``."""
    xp.copy_into(out.reshape(structure.free_shape), structure.spread(factor, labels, xp))
    return out


# -- one linearisation: flat (C-order) indices <-> N-D coordinates -------------------------------


def flat_index(coords, shape: Sequence[int]) -> np.ndarray:
    """C-order flat indices (int64) of the N-D ``coords`` (one row per axis of ``shape``).

    >>> flat_index(np.array([[0, 1, 1], [2, 0, 2]]), (2, 3))
    array([2, 3, 5])
    """
    coords = np.asarray(coords)
    out = np.zeros(coords.shape[1] if coords.ndim == 2 else 0, dtype=np.int64)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        out += coords[d].astype(np.int64, copy=False) * stride
        stride *= int(shape[d])
    return out


def unravel_into(flat: np.ndarray, shape: Sequence[int], out) -> None:
    """Write the C-order coordinates of the ``flat`` indices in ``shape`` into the rows of
    ``out`` (one row per axis; ``out`` may be any integer dtype wide enough).

    >>> out = np.empty((2, 3), dtype=np.int32); unravel_into(np.array([2, 3, 5]), (2, 3), out)
    >>> out.tolist()
    [[0, 1, 1], [2, 0, 2]]
    """
    flat = np.asarray(flat, dtype=np.int64)
    for d in range(len(shape) - 1, 0, -1):
        flat, out[d] = np.divmod(flat, int(shape[d]))
    if len(shape):
        out[0] = flat


def csr_rows(indptr, dtype=np.int64) -> np.ndarray:
    """The row (of ``dtype``) of each entry of a compressed-row matrix with this ``indptr``.

    >>> csr_rows(np.array([0, 2, 2, 3])).tolist()
    [0, 0, 2]
    """
    indptr = np.asarray(indptr)
    return np.repeat(np.arange(len(indptr) - 1, dtype=dtype), np.diff(indptr))


def csr_rows_nbytes(nrows: int, nnz: int, itemsize: int, indptr_itemsize: int) -> int:
    """Bytes :func:`csr_rows` allocates for rows of ``itemsize`` bytes: the rows, and before
    them the arange, the diff of ``indptr`` and numpy's cast of that to intp for ``np.repeat``."""
    return nnz * itemsize + nrows * (itemsize + indptr_itemsize + 8 * (indptr_itemsize != 8))


def csr_to_coords(indptr, indices, out_shape: Sequence[int], inp_shape: Sequence[int],
                  dtype) -> np.ndarray:
    """The N-D coordinates ``(len(out_shape) + len(inp_shape), nnz)`` of the entries of a CSR
    matrix of shape ``(prod(out_shape), prod(inp_shape))``: rows sorted and columns sorted
    within rows give coordinates in lexicographic order. Each axis's coordinate is gathered
    from a table of that axis's digit over the rows (columns) rather than divided out entry
    by entry: a gather from a table of ``prod(shape)`` entries is several times faster than
    int64 division. :func:`csr_to_coords_nbytes` predicts what this allocates.

    >>> csr_to_coords(np.array([0, 1, 3]), np.array([5, 0, 2]), (2,), (2, 3), np.int64).tolist()
    [[0, 1, 1], [1, 0, 0], [2, 0, 2]]
    """
    out_shape, inp_shape = tuple(out_shape), tuple(inp_shape)
    k = len(out_shape)
    coords = np.empty((k + len(inp_shape), len(indices)), dtype)
    # intp: np.take casts narrower indices to it (a copy per axis otherwise)
    rows = csr_rows(indptr, np.intp)
    _digits_into(coords[:k], rows, out_shape)
    del rows
    _digits_into(coords[k:], np.asarray(indices), inp_shape)
    return coords


def _digits_into(out: np.ndarray, flat: np.ndarray, shape: tuple) -> None:
    """Write the C-order coordinates in ``shape`` of the ``flat`` indices into the rows of
    ``out``: gathered from one table per axis (its digit at each flat index) where the tables
    are no larger than the entries, else divided out (a wide, sparse side)."""
    if not len(flat):  # no entries (always so where an axis has size 0): nothing to write
        return
    size = math.prod(shape)
    if len(shape) == 1:  # one axis: the flat indices themselves
        out[0] = flat
        return
    if size > len(flat):
        unravel_into(flat, shape, out)
        return
    flat = flat.astype(np.intp, copy=False)  # once per side: np.take would cast per axis
    before, after = 1, size
    for d, n in enumerate(shape):
        after //= n
        digit = np.broadcast_to(np.arange(n, dtype=out.dtype).reshape(1, n, 1),
                                (before, n, after)).reshape(-1)
        # every flat index is in range: "wrap" skips the bounds check and buffering of "raise"
        np.take(digit, flat, out=out[d], mode="wrap")
        del digit
        before *= n


def csr_to_coords_nbytes(nnz: int, out_shape: Sequence[int], inp_shape: Sequence[int], idx: int,
                         matrix_idx: int) -> int:
    """Bytes :func:`csr_to_coords` allocates beside its coordinates (of ``idx`` bytes, the
    CSR's index arrays of ``matrix_idx``): the rows (intp, :func:`csr_rows_nbytes`), then each
    side with its flat indices as intp (the rows; the columns cast where narrower) and one
    digit table at a time, or (a side larger than the entries) :func:`unravel_into`'s int64
    quotient, remainder and previous quotient."""
    out_shape, inp_shape = tuple(out_shape), tuple(inp_shape)
    rows = csr_rows_nbytes(math.prod(out_shape), nnz, 8, matrix_idx)

    def side(shape: tuple, flat: int) -> int:
        size = math.prod(shape)
        if len(shape) <= 1:  # copied as they are
            return flat if shape else 0
        if size > nnz:
            return flat + nnz * (16 + 8 * (len(shape) >= 3))
        return flat + size * idx + max(shape, default=0) * idx

    return max(rows, side(out_shape, nnz * 8), side(inp_shape, nnz * 8 * (matrix_idx != 8)))


def coords_to_csr(coords, shape: Sequence[int], split: int, dtype=None):
    """``(indices, indptr)`` of the CSR matrix ``(prod(shape[:split]), prod(shape[split:]))``
    holding the entries at the lexicographically sorted, unique N-D ``coords`` (index arrays
    of ``dtype``, default the narrowest that fits)."""
    nrows, ncols = math.prod(shape[:split]), math.prod(shape[split:])
    nnz = coords.shape[1] if np.ndim(coords) == 2 else 0
    dtype = dtype or index_dtype(nnz, (nrows, ncols))
    indptr = np.zeros(nrows + 1, dtype=dtype)
    if nnz:
        counts = np.bincount(flat_index(coords[:split], shape[:split]), minlength=nrows)
        np.cumsum(counts, out=indptr[1:])
        indices = flat_index(coords[split:], shape[split:]).astype(dtype, copy=False)
    else:
        indices = np.empty(0, dtype=dtype)
    return indices, indptr


# -- layouts: how the entries of a Jacobian are laid out --------------------------------------


class Layout:
    """Where a format's entries go: N-D coordinates (:data:`COO`) or compressed rows of the
    ``(out.size, arg.size)`` matrix (:data:`CSR`) or of its transpose (:data:`CSC`). Each
    layout writes its pattern from a structure, predicts the bytes of that and of converting
    a CSR to it, and converts a CSR."""

    name = ""
    csr_order = True  # the values come in the order of the CSR of the same matrix

    def __repr__(self) -> str:
        return f"<layout {self.name}>"

    def index_shape(self, out_shape, inp_shape) -> tuple[int, ...]:
        """The dimensions its index arrays must hold (with nnz: the index width rule)."""
        raise NotImplementedError

    def target(self, structure: Structure) -> Structure:
        """The structure the writer enumerates (CSC writes ``J.T`` as CSR)."""
        return structure

    def nbytes(self, nnz: int, out_shape, inp_shape, itemsize: int, idx: int) -> int:
        """Bytes of the result: values of ``itemsize``, index arrays of ``idx`` bytes."""
        raise NotImplementedError

    def arrays(self, pattern) -> tuple:
        """The index arrays of a pattern."""
        raise NotImplementedError

    def map(self, pattern, fn):
        """The pattern with ``fn`` applied to each index array."""
        raise NotImplementedError


class CoordinateLayout(Layout):
    name = "coo"

    def index_shape(self, out_shape, inp_shape):
        return tuple(out_shape) + tuple(inp_shape)

    def nbytes(self, nnz, out_shape, inp_shape, itemsize, idx):
        return nnz * (itemsize + idx * (len(out_shape) + len(inp_shape)))

    def pattern_peak(self, structure: Structure, idx: int) -> int:
        ramp = max((structure.sizes[l] for l in structure.free), default=0) * idx
        return structure.nnz * len(structure.shape) * idx + (ramp if structure.nnz else 0)

    def write(self, structure: Structure, xp, idx: int):
        return coo_coords(structure, xp, idx)

    def arrays(self, pattern):
        return (pattern,)

    def map(self, pattern, fn):
        return fn(pattern)

    def from_csr(self, csr, out_shape, inp_shape, idx: int):
        coords = csr_to_coords(csr.indptr, csr.indices, out_shape, inp_shape, NUMPY.index(idx))
        return coords, csr.data

    def from_coords(self, coords, data, out_shape, inp_shape, idx: int):
        return np.asarray(coords).astype(NUMPY.index(idx), copy=False), data

    def from_csr_nbytes(self, nnz, out_shape, inp_shape, itemsize, csr_bytes, idx):
        """The coordinates and :func:`csr_to_coords`'s temporaries beside them (the CSR's
        index arrays as wide as the rule makes them); the result keeps the coordinates and
        the CSR's values."""
        matrix_idx = index_dtype(nnz, (math.prod(out_shape), math.prod(inp_shape))).itemsize
        coords = nnz * (len(out_shape) + len(inp_shape)) * idx
        extra = coords + csr_to_coords_nbytes(nnz, out_shape, inp_shape, idx, matrix_idx)
        return extra, nnz * itemsize + coords


class CompressedLayout(Layout):
    """Compressed rows of the matrix (``transpose=False``: CSR) or of its transpose (CSC)."""

    def __init__(self, name: str, transpose: bool) -> None:
        self.name, self.transpose = name, transpose
        self.csr_order = not transpose

    def index_shape(self, out_shape, inp_shape):
        shape = (math.prod(out_shape), math.prod(inp_shape))
        return shape[::-1] if self.transpose else shape

    def target(self, structure):
        return structure.transposed() if self.transpose else structure

    def nbytes(self, nnz, out_shape, inp_shape, itemsize, idx):
        nrows = self.index_shape(out_shape, inp_shape)[0]
        return nnz * (itemsize + idx) + (nrows + 1) * idx

    def pattern_peak(self, structure: Structure, idx: int) -> int:
        target = self.target(structure)
        nnz, nrows = target.nnz, target.matrix_shape[0]
        ramps = 0
        if nnz:
            head, tail = index_tables(target)
            ramps = _ramp_nbytes(head, idx) + _ramp_nbytes(tail, idx)
        hit = 0
        row_free = distinct(target.rows)
        if len(row_free) != len(target.rows):
            hit = _ramp_nbytes(_digits(target, target.rows, target.free[: len(row_free)]), 8)
        return nnz * idx + max(ramps, (nrows + 1) * idx + hit)

    def write(self, structure, xp, idx):
        return csr_pattern(self.target(structure), xp)

    def arrays(self, pattern):
        return (pattern.indices, pattern.indptr)

    def map(self, pattern, fn):
        return CompressedPattern(fn(pattern.indices), fn(pattern.indptr), tuple(pattern.shape))

    def from_csr(self, csr, out_shape, inp_shape, idx: int):
        matrix = csr.tocsc() if self.transpose else csr
        pattern = self.map(matrix, lambda a: a.astype(NUMPY.index(idx), copy=False))
        return pattern, matrix.data

    def from_coords(self, coords, data, out_shape, inp_shape, idx: int):
        import scipy.sparse

        indices, indptr = coords_to_csr(np.asarray(coords), out_shape + inp_shape, len(out_shape))
        csr = scipy.sparse.csr_array((data, indices, indptr),
                                     shape=(math.prod(out_shape), math.prod(inp_shape)))
        return self.from_csr(csr, out_shape, inp_shape, idx)

    def from_csr_nbytes(self, nnz, out_shape, inp_shape, itemsize, csr_bytes, idx):
        if not self.transpose:
            return 0, csr_bytes  # the CSR itself
        extra = self.nbytes(nnz, out_shape, inp_shape, itemsize, idx)
        return extra, extra


COO = CoordinateLayout()
CSR = CompressedLayout("csr", transpose=False)
CSC = CompressedLayout("csc", transpose=True)


# -- containers: what a format's result is -------------------------------------------------------


def _sparse_coo(pattern, data, shape, matrix_shape):
    import sparse

    return sparse.COO(pattern, data, shape=shape, sorted=True, has_duplicates=False)


def _scipy(name: str):
    def wrap(pattern, data, shape, matrix_shape):
        import scipy.sparse

        matrix = getattr(scipy.sparse, name)((data, pattern.indices, pattern.indptr),
                                             shape=matrix_shape)
        matrix.has_sorted_indices = True
        matrix.has_canonical_format = True
        return matrix

    wrap.__name__ = f"_scipy_{name}"
    return wrap


def as_tensor(a):
    import torch

    return torch.from_numpy(a) if isinstance(a, np.ndarray) else a


def _torch_coo(pattern, data, shape, matrix_shape):
    import torch

    # Coalesced by construction (sorted, no duplicates): no coalesce() pass.
    return torch.sparse_coo_tensor(as_tensor(pattern), as_tensor(data), shape, is_coalesced=True,
                                   check_invariants=False)


def _torch_csr(pattern, data, shape, matrix_shape):
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(as_tensor(pattern.indptr), as_tensor(pattern.indices),
                                       as_tensor(data), matrix_shape, check_invariants=False)


@dataclass(frozen=True, eq=False)
class Format:
    """One output format: its layout, index width, bytes, writer, container and conversion.

    ``package``: the module its container needs (refused with an install hint when missing);
    ``index_bytes``: a fixed width of the index arrays (torch's sparse COO takes int64 only),
    else the narrowest that fits (:func:`index_dtype`); ``float16``: whether the container
    holds float16 values (scipy's routines refuse them: stored as float32, an exact upcast);
    ``wrap(pattern, data, shape, matrix_shape)``: the container around index arrays and values,
    copying neither.
    """

    name: str
    layout: Layout
    wrap: Callable[..., Any]
    package: str
    extra: str = ""  # the extra of einsum-sparsejac that installs ``package``
    index_bytes: int = 0
    float16: bool = True
    doc: str = ""

    def __repr__(self) -> str:
        return f"<format {self.name!r}>"

    @property
    def on_torch(self) -> bool:
        """A torch container: its pattern is held as torch tensors (built on a GPU for CUDA
        operands)."""
        return self.package == "torch"

    def require(self, prefix: str = "") -> None:
        """Import the container's package, or raise :class:`MissingDependencyError`."""
        try:
            importlib.import_module(self.package)
        except ImportError as error:
            from .errors import MissingDependencyError

            hint = f"pip install 'einsum-sparsejac[{self.extra}]'" if self.extra else \
                f"pip install {self.package}"
            raise MissingDependencyError(
                f"{prefix}format={self.name!r} needs {self.package}, which is not installed "
                f"({error}): {hint}") from None

    def value_dtype(self, dtype) -> np.dtype:
        """The dtype of the stored values for results of ``dtype``."""
        dtype = np.dtype(dtype)
        return np.dtype(np.float32) if dtype == np.float16 and not self.float16 else dtype

    def value_itemsize(self, dtype) -> int:
        """Bytes of one stored value for results of ``dtype``, a checked numpy or torch dtype
        (:func:`sparsejac.options.value_dtype`): float16 as :meth:`value_dtype` stores it."""
        if isinstance(dtype, np.dtype):
            return self.value_dtype(dtype).itemsize
        half = str(dtype) == "torch.float16"  # a torch dtype (torch need not be imported)
        return 4 if half and not self.float16 else dtype.itemsize

    def index_itemsize(self, nnz: int, out_shape, inp_shape) -> int:
        """The index width rule: ``index_bytes``, else the narrowest that fits."""
        return self.index_bytes or index_dtype(nnz, self.layout.index_shape(out_shape,
                                                                            inp_shape)).itemsize

    def nbytes(self, nnz: int, out_shape, inp_shape, itemsize: int, idx: int = 0) -> int:
        """Bytes of a result of ``nnz`` entries (index arrays of ``idx`` bytes: default the
        rule's)."""
        idx = idx or self.index_itemsize(nnz, out_shape, inp_shape)
        return self.layout.nbytes(nnz, out_shape, inp_shape, itemsize, idx)

    def structure_nbytes(self, structure: Structure, itemsize: int) -> int:
        """Bytes of the arrays a writer allocates for ``structure`` (the result)."""
        return self.nbytes(structure.nnz, structure.rows_shape, structure.cols_shape, itemsize)

    def pattern_peak_nbytes(self, structure: Structure) -> int:
        """The peak bytes of writing the pattern: the index arrays and the writer's
        temporaries alongside them (ramps, diagonal row hits)."""
        idx = self.index_itemsize(structure.nnz, structure.rows_shape, structure.cols_shape)
        return self.layout.pattern_peak(structure, idx)

    def write_pattern(self, structure: Structure, xp=NUMPY):
        """The index arrays of ``structure`` (on the backend ``xp``), in this format's
        arrays: torch tensors for a torch container."""
        idx = self.index_itemsize(structure.nnz, structure.rows_shape, structure.cols_shape)
        pattern = self.layout.write(structure, xp, idx)
        return self.layout.map(pattern, as_tensor) if self.on_torch and xp is NUMPY else pattern

    def container(self, pattern, data, out_shape, inp_shape):
        """The container around ``pattern`` (sorted, free of duplicates: it is told so, no
        scan) and ``data``, copying neither; it carries ``sparsejac_out_ndim``
        (:data:`OUT_NDIM`), the number of output axes, for :func:`sparsejac.to_scipy`."""
        shape = tuple(out_shape) + tuple(inp_shape)
        result = self.wrap(pattern, data, shape, (math.prod(out_shape), math.prod(inp_shape)))
        setattr(result, OUT_NDIM, len(out_shape))
        return result

    def pattern_from_csr(self, csr, out_shape, inp_shape):
        """``(pattern, values)``: the pattern of a canonical CSR of shape
        ``(prod(out_shape), prod(inp_shape))`` in this layout, and its values in that order."""
        idx = self.index_itemsize(csr.nnz, out_shape, inp_shape)
        return self.layout.from_csr(csr, tuple(out_shape), tuple(inp_shape), idx)

    def from_csr(self, csr, out_shape, inp_shape):
        """A canonical CSR as this format's container (for results assembled as CSR)."""
        pattern, data = self.pattern_from_csr(csr, out_shape, inp_shape)
        return self.container(pattern, data, out_shape, inp_shape)

    def from_csr_nbytes(self, nnz, out_shape, inp_shape, itemsize, csr_bytes) -> tuple[int, int]:
        """``(extra, final)``: the bytes :meth:`from_csr` allocates beside the CSR (of
        ``csr_bytes``), and those the result keeps."""
        idx = self.index_itemsize(nnz, out_shape, inp_shape)
        return self.layout.from_csr_nbytes(nnz, tuple(out_shape), tuple(inp_shape), itemsize,
                                           csr_bytes, idx)

    def from_coords(self, coords, data, out_shape, inp_shape):
        """The container of the entries at sorted, unique N-D ``coords``."""
        out_shape, inp_shape = tuple(out_shape), tuple(inp_shape)
        idx = self.index_itemsize(len(data), out_shape, inp_shape)
        pattern, data = self.layout.from_coords(coords, data, out_shape, inp_shape, idx)
        return self.container(pattern, data, out_shape, inp_shape)


# The registry: adding a format is one entry here.
REGISTRY: dict[str, Format] = {f.name: f for f in (
    Format("coo", COO, _sparse_coo, "sparse",
           doc="sparse.COO of shape out.shape + arg.shape"),
    Format("csr", CSR, _scipy("csr_array"), "scipy", float16=False,
           doc="scipy.sparse.csr_array of shape (out.size, arg.size)"),
    Format("csc", CSC, _scipy("csc_array"), "scipy", float16=False,
           doc="scipy.sparse.csc_array of shape (out.size, arg.size)"),
    Format("torch", COO, _torch_coo, "torch", extra="torch", index_bytes=8,
           doc="coalesced torch.sparse_coo_tensor of shape out.shape + arg.shape"),
    Format("torch_csr", CSR, _torch_csr, "torch", extra="torch",
           doc="torch.sparse_csr_tensor of shape (out.size, arg.size)"),
)}
FORMATS = tuple(REGISTRY)


def get(format: Any, prefix: str = "", require: bool = True) -> Format:
    """The registered format named ``format`` (a :class:`Format` passes through), checked once
    at the public boundary: its name, and (``require``) that its package is installed.

    >>> get("csr").layout, get("torch").index_bytes
    (<layout csr>, 8)
    """
    if isinstance(format, Format):
        return format
    from .options import choice

    fmt = REGISTRY[choice(format, "format", tuple(REGISTRY), prefix)]
    if require:
        fmt.require(prefix)
    return fmt


def pattern_peak_nbytes(structure: Structure, fmt: Any) -> int:
    """The peak bytes of building the pattern of ``fmt`` (see :meth:`Format.pattern_peak_nbytes`)."""
    return get(fmt, require=False).pattern_peak_nbytes(structure)


def predicted_peak(
    structure: Structure,
    fmt: Any,
    itemsize: int,
    factor_nbytes: int,
    factor_owned: bool = True,
    factor_contiguous: bool = True,
    pattern: bool = True,
) -> int:
    """The peak bytes of one build of ``fmt``: the factor ``R`` (``factor_nbytes``, counted
    when the build allocates it: ``factor_owned``), the values, the laid-out copy of a
    non-contiguous factor, and the pattern with its temporaries (``pattern``: not yet built)."""
    size = factor_nbytes // max(itemsize, 1)
    copy = factor_nbytes if not factor_contiguous and structure.spread_copies(size) else 0
    patterns = pattern_peak_nbytes(structure, fmt) if pattern else 0
    owned = factor_nbytes if factor_owned else 0
    return owned + structure.nnz * itemsize + max(copy, patterns)


def container(fmt: Any, pattern, data, out_shape: Sequence[int], inp_shape: Sequence[int]):
    """The container ``fmt`` names around index arrays and values (:meth:`Format.container`)."""
    return get(fmt, require=False).container(pattern, data, out_shape, inp_shape)
