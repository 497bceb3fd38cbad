"""Checking the options every public function shares (``wrt``, ``format``, ``method``,
``memory_limit``) and the memory guard, with one set of messages.

Each check takes a ``prefix`` that names the call, e.g. ``"einsum 'ij,jk->ik': "``
(:func:`sparsejac.errors.context`) or ``"jacobian_of: "``.

>>> wrt_indices((0, -1), 3, "einsum 'i,i,i': ")
[0, 2]
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from .errors import ArgumentError, ArgumentTypeError, JacobianTooLargeError, ShapeError


def available_memory() -> int | None:
    """Bytes of memory the machine has available now (``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def choice(value: Any, name: str, allowed: Sequence[str], prefix: str) -> str:
    """``value`` if it is one of ``allowed`` strings."""
    if not isinstance(value, str):
        raise ArgumentTypeError(
            f"{prefix}{name} must be a str, one of {list(allowed)}, got {type(value).__name__}"
        )
    if value not in allowed:
        raise ArgumentError(f"{prefix}{name}={value!r} is not one of {list(allowed)}")
    return value


def wrt_index(wrt: Any, n: int, prefix: str, what: str = "operand", tuples: bool = True) -> int:
    """``wrt`` as an index in ``range(n)`` (negative counts from the end); ``tuples`` says
    whether the caller also takes a tuple (for the message)."""
    if isinstance(wrt, bool) or not isinstance(wrt, (int, np.integer)):
        kinds = "an int or a tuple of ints" if tuples else "an int"
        raise ArgumentTypeError(f"{prefix}wrt must be {kinds}, got {type(wrt).__name__}")
    if not -n <= wrt < n:
        raise ArgumentError(f"{prefix}wrt={int(wrt)} is out of range for {n} {what}(s)")
    return int(wrt) % n


def wrt_indices(wrt: Any, n: int, prefix: str, what: str = "operand") -> list[int]:
    """``wrt`` (an int, or a tuple or list of ints) as a list of indices in ``range(n)``."""
    if not isinstance(wrt, (tuple, list)):
        return [wrt_index(wrt, n, prefix, what)]
    if not wrt:
        raise ArgumentError(f"{prefix}wrt is an empty sequence")
    return [wrt_index(w, n, prefix, what) for w in wrt]


def shape(value: Any, index: int, prefix: str) -> tuple[int, ...]:
    """``value`` as a shape: a sequence of non-negative ints (numpy ints too)."""
    try:
        dims = tuple(value)
    except TypeError:
        raise ArgumentTypeError(
            f"{prefix}shape {index} must be a sequence of ints such as (3, 4), "
            f"got {type(value).__name__}"
        ) from None
    for n in dims:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise ArgumentTypeError(
                f"{prefix}shape {index} {dims} has a dimension {n!r} of type "
                f"{type(n).__name__}; dimensions are ints"
            )
        if n < 0:
            raise ShapeError(f"{prefix}shape {index} {dims} has a negative dimension {n}")
    return tuple(int(n) for n in dims)


def memory_limit(value: Any, prefix: str) -> float | None:
    """The limit in bytes: ``value``, or the memory available when ``value`` is None."""
    if value is None:
        return available_memory()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ArgumentTypeError(
            f"{prefix}memory_limit must be a number of bytes or None, got {type(value).__name__}"
        )
    if not value >= 0:
        raise ArgumentError(f"{prefix}memory_limit={value} must be >= 0")
    return value


def guard(nbytes: int, limit: float | None, prefix: str, what: str) -> None:
    """Refuse, before anything is allocated, a build of ``nbytes`` over ``limit``."""
    if limit is not None and nbytes > limit:
        raise JacobianTooLargeError(
            f"{prefix}{what} needs about {nbytes:,} bytes ({nbytes / 2**30:.3g} GiB), over the "
            f"memory limit of {int(limit):,} bytes ({limit / 2**30:.3g} GiB); nothing was allocated"
        )
