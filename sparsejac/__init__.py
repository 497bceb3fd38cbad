"""sparsejac: exact sparse Jacobians of einsum expressions.

>>> import numpy as np, sparsejac
>>> J = sparsejac.jacobian("ij,jk->ik", np.ones((3, 4)), np.ones((4, 5)), format="csr")
>>> J.shape, J.nnz
((15, 12), 60)

Modules, one idea each: :mod:`~sparsejac.grammar` (einsum subscripts), :mod:`~sparsejac.structure`
(the closed form), :mod:`~sparsejac.formats` (writing COO/CSR/CSC), :mod:`~sparsejac.embed` (the
design card's embedding pipeline), :mod:`~sparsejac.plan` (plans, the public ``jacobian``), :mod:`~sparsejac.options`
(option checks, the memory guard), :mod:`~sparsejac.convert` (``to_scipy``),
:mod:`~sparsejac.chunked` (Jacobians larger than memory, on dask), :mod:`~sparsejac.store`
(saving and loading them), :mod:`~sparsejac.errors`.
"""

from .convert import to_scipy
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    JacobianTooLargeError,
    MissingDependencyError,
    OperandTypeError,
    ShapeError,
    SparsejacError,
    StoreError,
    StoreExistsError,
    StoreNotFoundError,
    SubscriptError,
    UnsupportedOperationError,
)
from .plan import Plan, Plans, jacobian, plan
from .spy import spy
from .programs import (ProgramPlan, hessian_of, jacobian_of, plan_of, register_function,
                       unregister_function)

__version__ = "0.1.0"


def __getattr__(name: str):
    # linear_operator needs scipy.sparse.linalg, half of the import time: load it on first use.
    if name == "linear_operator":
        from .operator import linear_operator

        return linear_operator
    raise AttributeError(f"module 'sparsejac' has no attribute {name!r}")

__all__ = [
    "jacobian",
    "jacobian_of",
    "plan_of",
    "hessian_of",
    "ProgramPlan",
    "register_function",
    "unregister_function",
    "plan",
    "Plan",
    "Plans",
    "linear_operator",
    "spy",
    "to_scipy",
    "SparsejacError",
    "SubscriptError",
    "ShapeError",
    "ArgumentError",
    "ArgumentTypeError",
    "OperandTypeError",
    "JacobianTooLargeError",
    "MissingDependencyError",
    "UnsupportedOperationError",
    "StoreError",
    "StoreExistsError",
    "StoreNotFoundError",
]
