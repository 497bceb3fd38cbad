"""One error hierarchy for the package.

Every exception raised on bad user input is a :class:`SparsejacError` and also a subclass of the
builtin that callers would catch anyway (``ValueError``, ``TypeError``, ``MemoryError``), so
``except ValueError`` keeps working. Messages quote the subscripts and name the culprit.
"""

from __future__ import annotations


class SparsejacError(Exception):
    """Base class of every error this package raises on purpose."""


class SubscriptError(SparsejacError, ValueError):
    """The subscripts string is malformed (bad character, arrows, ellipsis, output letters)."""


class ShapeError(SparsejacError, ValueError):
    """Operands do not fit the subscripts: count, rank, a letter's size, a broadcast."""


class ArgumentError(SparsejacError, ValueError):
    """An option (``wrt``, ``format``, ``method``, ...) has a value outside its range."""


class ArgumentTypeError(SparsejacError, TypeError):
    """An argument has the wrong type (subscripts not a string, ``wrt`` not an int, ...)."""


class OperandTypeError(SparsejacError, TypeError):
    """An operand is not a numeric array (strings, objects, booleans, ...)."""


class UnsupportedOperationError(SparsejacError, NotImplementedError):
    """``jacobian_of``'s function applied an operation to a traced tensor that cannot be
    followed; the message names it and lists the supported ones."""


class JacobianTooLargeError(SparsejacError, MemoryError):
    """The Jacobian would need more memory than the limit allows; nothing was allocated."""


class MissingDependencyError(SparsejacError, ImportError):
    """An optional package a call needs (torch for ``format="torch"``, dask, matplotlib) is not
    installed; the message says which ``pip install`` adds it."""


# How to add dask, for those who installed the package from the index (its ``dask`` extra)
# and for everyone else (the packages themselves).
DASK_HINT = "pip install 'einsum-sparsejac[dask]' (or: pip install 'dask[array]' distributed)"


def missing_dask(module: str, error: ImportError) -> MissingDependencyError:
    """The error of importing ``module`` (chunked Jacobians, their store) without dask."""
    return MissingDependencyError(
        f"{module} needs dask, which is not installed ({error}): {DASK_HINT}")


class StoreError(SparsejacError, ValueError):
    """A saved Jacobian (``sparsejac.store.save``/``load``) is damaged, edited, incomplete or
    cannot be written; the message names the file and what is wrong with it."""


class StoreExistsError(StoreError, FileExistsError):
    """``sparsejac.store.save`` found something at its path that it may not replace."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """``sparsejac.store.load`` found no complete save at its path (or a listed block is gone)."""


def context(subscripts: object) -> str:
    """The prefix every message starts with: the subscripts, quoted."""
    return f"einsum {subscripts!r}: "
