"""Products with a Jacobian without forming it: a ``scipy.sparse.linalg.LinearOperator``.

``J`` is the Jacobian of ``z = einsum(subscripts, *operands)`` with respect to ``operands[wrt]``,
seen as a matrix of shape ``(z.size, operand.size)`` (both sides flattened in C order, as
``sparsejac.jacobian(..., format="csr")``). Since ``z`` is linear in the operand:

- ``J @ v`` (JVP) is the einsum itself with ``v`` in the operand's slot;
- ``J^H @ u`` (VJP) is one einsum of the other operands and ``u`` into the operand's labels. A
  letter repeated in the operand (``"ii,ij->j"``) writes the result onto a diagonal of a zero array
  of the operand's shape; a letter that only the operand carries (a summed letter, or a size-1
  dimension that broadcasts) gets the same value along its axis.

Memory: the operands (cast once to the result dtype where they differ from it) plus the vectors.

>>> import numpy as np, sparsejac
>>> x, w = np.ones((2, 3)), np.arange(12.0).reshape(3, 4)
>>> A = sparsejac.linear_operator("ij,jk->ik", x, w)
>>> A.shape, A.dtype
((8, 6), dtype('float64'))
>>> np.allclose(A @ x.ravel(), (x @ w).ravel())   # the einsum is linear in x: J @ x = z
True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator

from .errors import ArgumentTypeError, ShapeError, context
from .grammar import bind, parse, require_text
from .operands import as_arrays, result_dtype
from . import options
from .structure import distinct, labelled_product


class EinsumJacobianOperator(LinearOperator):
    """The Jacobian of one einsum with respect to one operand, as a matrix-free operator.

    Use :func:`linear_operator` to make one.
    """

    def __init__(self, subscripts: str, *operands: Any, wrt: int = 0) -> None:
        label = require_text(subscripts)
        arrays = as_arrays(operands, label)
        parsed = parse(subscripts, len(arrays))
        self.subscripts = subscripts
        if isinstance(wrt, (tuple, list)):  # sparsejac.jacobian takes these; an operator is one J
            raise ArgumentTypeError(
                f"{context(label)}linear_operator is the Jacobian w.r.t. one operand: wrt must "
                f"be an int, got wrt={wrt!r}; make one operator per operand")
        self.wrt = options.wrt_index(wrt, len(arrays), context(label), tuples=False)
        self.einsum = bind(parsed, [a.shape for a in arrays])
        dtype = result_dtype(arrays)
        # Kept as given: each product casts them to its dtype (the result's precision, as
        # sparsejac.jacobian forms the values) without materialising broadcast dimensions.
        self.operands = arrays
        self.operand_shape = self.einsum.shape(self.wrt)
        self.output_shape = self.einsum.output_shape
        # A fresh label for the columns of a block of vectors (matmat/rmatmat).
        self._batch = len(self.einsum.sizes)
        self._plan = None
        super().__init__(dtype, (math.prod(self.output_shape), math.prod(self.operand_shape)))

    @property
    def plan(self):
        """The :class:`~sparsejac.plan.Plan` of this Jacobian (made once): its exact pattern
        (``plan.pattern("csr")``), nnz and bytes, from the subscripts and shapes alone."""
        if self._plan is None:
            from .plan import Plan

            self._plan = Plan(self.subscripts, *(a.shape for a in self.operands), wrt=self.wrt)
        return self._plan

    def __repr__(self) -> str:
        return (
            f"<{self.shape[0]}x{self.shape[1]} Jacobian operator of einsum {self.subscripts!r} "
            f"with respect to operand {self.wrt}, dtype {self.dtype}>"
        )

    # -- checked entry points: the package's error, naming the length expected ------------------
    def _check(self, x: Any, n: int, what: str) -> None:
        """Refuse a vector (``matvec``) or block of vectors (``matmat``) of the wrong length."""
        shape = np.shape(x)
        block = what.endswith("mat")
        if shape in ((n,), (n, 1)) or (block and len(shape) == 2 and shape[0] == n):
            return
        expected = f"a block of shape ({n}, k)" if block else f"a vector of length {n}"
        raise ShapeError(f"{context(self.subscripts)}{what} needs {expected}, got shape {shape}")

    def matvec(self, x):
        self._check(x, self.shape[1], "matvec")
        return LinearOperator.matvec(self, x)

    def rmatvec(self, x):
        self._check(x, self.shape[0], "rmatvec")
        return LinearOperator.rmatvec(self, x)

    def matmat(self, X):
        self._check(X, self.shape[1], "matmat")
        return LinearOperator.matmat(self, X)

    def rmatmat(self, X):
        self._check(X, self.shape[0], "rmatmat")
        return LinearOperator.rmatmat(self, X)

    # -- forward: J @ V --------------------------------------------------------------------
    def _jvp(self, v: np.ndarray, batch: bool) -> np.ndarray:
        e = self.einsum
        k = np.shape(v)[1] if batch else None
        extra = (self._batch,) if batch else ()
        v = np.reshape(v, self.operand_shape + ((k,) if batch else ()))
        dtype = np.result_type(self.dtype, v.dtype)
        pairs = []
        for i, (array, labels) in enumerate(zip(self.operands, e.inputs)):
            if i == self.wrt:
                pairs.append((v, labels + extra))
            else:
                pairs.append((array, labels))
        z = labelled_product(e.subscripts, pairs, e.output + extra, dtype=dtype)
        return np.reshape(z, (self.shape[0], k) if batch else (self.shape[0],))

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._jvp(np.ravel(x), batch=False)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        return self._jvp(np.asarray(X), batch=True)

    # -- adjoint: J^H @ U ------------------------------------------------------------------
    def _vjp(self, u: np.ndarray, batch: bool) -> np.ndarray:
        """``J^T @ u`` (no conjugation) into an array of the operand's shape (+ batch)."""
        e = self.einsum
        k = np.shape(u)[1] if batch else None
        extra = (self._batch,) if batch else ()
        u = np.reshape(u, self.output_shape + ((k,) if batch else ()))
        dtype = np.result_type(self.dtype, u.dtype)
        cols = e.inputs[self.wrt]
        carried = set(e.output)
        pairs = [(u, e.output + extra)]
        for i, (array, labels) in enumerate(zip(self.operands, e.inputs)):
            if i != self.wrt:
                pairs.append((array, labels))
                carried.update(labels)
        own = distinct(cols)  # the operand's distinct labels, in order of first appearance
        kept = tuple(l for l in own if l in carried)
        g = labelled_product(e.subscripts, pairs, kept + extra, dtype=dtype)
        # Labels only the operand carries were summed in the forward einsum: the gradient is
        # the same along them (a size-1 broadcast dimension included).
        g = np.reshape(g, tuple(e.sizes[l] if l in carried else 1 for l in own) + g.shape[len(kept):])
        out = np.zeros(self.operand_shape + ((k,) if batch else ()), dtype=dtype)
        # A view of `out` with one axis per distinct label: axes sharing a label walk the
        # diagonal (strides add up), so writing into it writes exactly the structural entries.
        strides = [0] * len(own)
        for d, l in enumerate(cols):
            strides[own.index(l)] += out.strides[d]
        view = np.lib.stride_tricks.as_strided(
            out,
            shape=tuple(e.sizes[l] for l in own) + out.shape[len(cols):],
            strides=tuple(strides) + out.strides[len(cols):],
            writeable=True,
        )
        view[...] = g
        return np.reshape(out, (self.shape[1], k) if batch else (self.shape[1],))

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        x = np.ravel(x)
        if self.dtype.kind == "c" or np.iscomplexobj(x):
            # J^H u = conj(J^T conj(u)): conjugating the vectors, never the operands.
            return np.conj(self._vjp(np.conj(x), batch=False))
        return self._vjp(x, batch=False)

    def _rmatmat(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        if self.dtype.kind == "c" or np.iscomplexobj(X):
            return np.conj(self._vjp(np.conj(X), batch=True))
        return self._vjp(X, batch=True)

    def _adjoint(self) -> LinearOperator:
        return _Adjoint(self)


class _Adjoint(LinearOperator):
    """``J^H`` with ``J``'s products swapped (scipy's generic adjoint goes through matvec)."""

    def __init__(self, op: EinsumJacobianOperator) -> None:
        self.op = op
        self.subscripts = op.subscripts
        super().__init__(op.dtype, (op.shape[1], op.shape[0]))

    _check = EinsumJacobianOperator._check
    matvec = EinsumJacobianOperator.matvec
    rmatvec = EinsumJacobianOperator.rmatvec
    matmat = EinsumJacobianOperator.matmat
    rmatmat = EinsumJacobianOperator.rmatmat

    def _matvec(self, x):
        return self.op._rmatvec(x)

    def _matmat(self, X):
        return self.op._rmatmat(X)

    def _rmatvec(self, x):
        return self.op._matvec(x)

    def _rmatmat(self, X):
        return self.op._matmat(X)

    def _adjoint(self):
        return self.op


def linear_operator(subscripts: str, *operands: Any, wrt: int = 0) -> EinsumJacobianOperator:
    """The Jacobian of ``numpy.einsum(subscripts, *operands)`` with respect to ``operands[wrt]``
    as a :class:`scipy.sparse.linalg.LinearOperator` of shape ``(z.size, operand.size)`` and the
    result dtype, never formed.

    ``A @ v`` / ``A.matvec`` / ``A.matmat`` are ``J @ v`` (one einsum with ``v`` in the operand's
    slot); ``A.rmatvec`` / ``A.rmatmat`` / ``A.H @ u`` are ``J^H @ u`` (conjugate transpose, scipy's
    convention; ``J.T @ u`` for real dtypes). Vectors are flat (C order), blocks of vectors are
    ``(n, k)``. Works with ``scipy.sparse.linalg.lsqr``, ``lsmr``, ``cg`` (on ``A.H @ A``), ...

    >>> import numpy as np, sparsejac
    >>> A = sparsejac.linear_operator("ii,ij->j", np.eye(3), np.ones((3, 2)))   # wrt the eye
    >>> A.rmatvec(np.array([1.0, 2.0])).reshape(3, 3)   # a repeated letter: only the diagonal
    array([[3., 0., 0.],
           [0., 3., 0.],
           [0., 0., 3.]])
    """
    return EinsumJacobianOperator(subscripts, *operands, wrt=wrt)
