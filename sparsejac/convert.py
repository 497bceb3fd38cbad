"""Any Jacobian sparsejac returns as a scipy matrix of shape ``(out.size, arg.size)``.

:func:`to_scipy` takes every result kind: a ``sparse.COO`` of shape ``out.shape + arg.shape``,
scipy sparse arrays (and matrices), torch sparse tensors (COO, CSR, CSC), lazy dask arrays from
:func:`sparsejac.chunked.jacobian` or :func:`sparsejac.store.load`, and the operators of
:func:`sparsejac.linear_operator` (whose Jacobian it builds exactly from their operands).

Where the output axes end in an N-D result: ``out_ndim=`` when given; else the
``sparsejac_out_ndim`` attribute that sparsejac attaches to every result it returns (and that a
save records in its manifest, so loaded Jacobians have it too). An N-D array without either (for
example one produced by arithmetic on a result, which drops attributes) is refused with a message
asking for ``out_ndim``.

>>> import numpy as np, sparsejac
>>> J = sparsejac.jacobian("ij,jk->ik", np.ones((2, 3)), np.ones((3, 4)))   # sparse.COO
>>> J.shape, sparsejac.to_scipy(J).shape, type(sparsejac.to_scipy(J, "csc")).__name__
((2, 4, 2, 3), (8, 6), 'csc_array')
>>> sparsejac.to_scipy(J * 2, out_ndim=2).nnz   # J * 2 is a new COO: no attribute, say it
24
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import formats
from .errors import ArgumentError, ArgumentTypeError
from .options import choice

PREFIX = "to_scipy: "


def out_ndim_of(J: Any, out_ndim: Any, ndim: int, prefix: str = PREFIX) -> int:
    """The number of output axes of the N-D ``J``: ``out_ndim`` if given, else the attribute
    sparsejac attached, else an :class:`ArgumentError` asking for it."""
    if out_ndim is None:
        out_ndim = getattr(J, formats.OUT_NDIM, None)
        if out_ndim is None:
            raise ArgumentError(
                f"{prefix}cannot tell where the output axes of this {ndim}-D "
                f"{type(J).__name__} end (it carries no {formats.OUT_NDIM}); pass out_ndim=, "
                "the number of output axes (len(out.shape))"
            )
    if isinstance(out_ndim, bool) or not isinstance(out_ndim, (int, np.integer)):
        raise ArgumentTypeError(f"{prefix}out_ndim must be an int, got {type(out_ndim).__name__}")
    if not 0 <= out_ndim <= ndim:
        raise ArgumentError(f"{prefix}out_ndim={int(out_ndim)} is not between 0 and the "
                            f"array's {ndim} axes")
    return int(out_ndim)


def is_dask(J: Any) -> bool:
    return type(J).__module__.startswith("dask") and hasattr(J, "chunks")


def is_torch(J: Any) -> bool:
    return type(J).__module__.startswith("torch") and hasattr(J, "layout")


def _matrix_from_coords(coords, data, shape, k: int):
    """The CSR of N-D entries at sorted, unique ``coords`` (one row per axis), split after
    axis ``k``."""
    import scipy.sparse

    indices, indptr = formats.coords_to_csr(coords, shape, k)
    return scipy.sparse.csr_array((data, indices, indptr),
                                  shape=(math.prod(shape[:k]), math.prod(shape[k:])))


def _csr(J: Any, out_ndim: Any):
    """``J`` as a scipy sparse array (CSR, or CSC where it is one already)."""
    import scipy.sparse
    import sparse

    if isinstance(J, (scipy.sparse.sparray, scipy.sparse.spmatrix)):
        if J.ndim != 2:
            raise ArgumentError(f"{PREFIX}a {J.ndim}-D scipy array is not a Jacobian matrix")
        return J if isinstance(J, scipy.sparse.sparray) else scipy.sparse.csr_array(J)
    if isinstance(J, sparse.SparseArray):
        coo = J if isinstance(J, sparse.COO) else J.asformat("coo")
        if coo.fill_value != 0:
            raise ArgumentError(f"{PREFIX}a sparse array with fill value {coo.fill_value!r} "
                                "is not a sparse Jacobian")
        k = out_ndim_of(J, out_ndim, coo.ndim)
        # sparse.COO keeps its coordinates sorted and free of duplicates (its constructor
        # canonicalises them unless told they are).
        return _matrix_from_coords(coo.coords, coo.data, coo.shape, k)
    if is_torch(J):
        return _torch(J, out_ndim)
    if is_dask(J):
        # The whole array in memory as COO, then the matrix: for arrays that fit.
        k = out_ndim_of(J, out_ndim, J.ndim)
        block = J.compute()
        if not isinstance(block, sparse.SparseArray):
            block = sparse.COO.from_numpy(np.asarray(block))
        return _csr(block, k)
    from .operator import EinsumJacobianOperator

    if isinstance(J, EinsumJacobianOperator):
        from .plan import jacobian

        return jacobian(J.subscripts, *J.operands, wrt=J.wrt, format="csr")
    raise ArgumentTypeError(
        f"{PREFIX}expected a Jacobian (sparse.COO, a scipy sparse array, a torch sparse tensor, "
        f"a dask array of sparse blocks or a sparsejac.linear_operator), got {type(J).__name__}"
    )


def _torch(J: Any, out_ndim: Any):
    import scipy.sparse
    import torch

    if J.layout in (torch.sparse_csr, torch.sparse_csc):
        row_major = J.layout == torch.sparse_csr
        indptr = (J.crow_indices() if row_major else J.ccol_indices()).cpu().numpy()
        indices = (J.col_indices() if row_major else J.row_indices()).cpu().numpy()
        cls = scipy.sparse.csr_array if row_major else scipy.sparse.csc_array
        return cls((_numpy_values(J.values()), indices, indptr), shape=tuple(J.shape))
    if J.layout != torch.sparse_coo:
        raise ArgumentTypeError(f"{PREFIX}a torch tensor with layout {J.layout} is not sparse")
    k = out_ndim_of(J, out_ndim, J.ndim)
    C = J if J.is_coalesced() else J.coalesce()  # coalesced: sorted, no duplicates
    return _matrix_from_coords(C.indices().cpu().numpy(), _numpy_values(C.values()),
                               tuple(J.shape), k)


def _numpy_values(values):
    from .operands import as_array

    return as_array(values, 0, "")  # bfloat16 and friends upcast exactly, as for operands


def to_scipy(J: Any, format: str = "csr", out_ndim: int | None = None):
    """``J`` as a scipy ``csr_array`` (``format="csr"``) or ``csc_array`` (``"csc"``) of shape
    ``(out.size, arg.size)``, both sides flattened in C order.

    ``J``: any result of sparsejac (``sparse.COO``, scipy arrays, torch sparse tensors, dask
    arrays of :mod:`sparsejac.chunked` or :mod:`sparsejac.store`, which are computed whole
    here) or a :func:`sparsejac.linear_operator`. ``out_ndim``: the number of output axes of an
    N-D ``J`` (default: the ``sparsejac_out_ndim`` sparsejac attaches; see the module). No
    copy where ``J`` is already a scipy array of that format.
    """
    fmt = choice(format, "format", ("csr", "csc"), PREFIX)
    matrix = _csr(J, out_ndim)
    import scipy.sparse

    if isinstance(matrix, scipy.sparse.spmatrix):
        matrix = scipy.sparse.csr_array(matrix)
    return matrix.asformat(fmt)  # no copy where it is in that format already
