"""The former name of :mod:`sparsejac.chunked` (chunked Jacobians) and :mod:`sparsejac.store`
(saving and loading them), kept so that existing code keeps working: the same public names.

>>> import numpy as np, sparsejac.dask, sparsejac.chunked
>>> sparsejac.dask.jacobian is sparsejac.chunked.jacobian
True
"""

from __future__ import annotations

from .chunked import auto_chunks, jacobian
from .errors import StoreError, StoreExistsError, StoreNotFoundError
from .store import MANIFEST, load, save

__all__ = ["jacobian", "save", "load", "auto_chunks", "MANIFEST", "StoreError",
           "StoreExistsError", "StoreNotFoundError"]
