"""The former name of :mod:`sparsejac.chunked` (chunked Jacobians) and :mod:`sparsejac.store`
(saving and loading them), kept so that existing code keeps working: the same public names.

>>> import numpy as np, sparsejac.dask, sparsejac.chunked
>>> sparsejac.dask.jacobian is sparsejac.chunked.jacobian
True
"""

from __future__ import annotations

try:
    import dask  # noqa: F401  (first: the error names this module, not the one it imports)
except ImportError as error:
    from .errors import missing_dask

    raise missing_dask(__name__, error) from None

from .chunked import auto_chunks, jacobian
from .errors import StoreError, StoreExistsError, StoreNotFoundError
from .store import MANIFEST, load, save

__all__ = ["jacobian", "save", "load", "auto_chunks", "MANIFEST", "StoreError",
           "StoreExistsError", "StoreNotFoundError"]
