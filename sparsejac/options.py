"""Checking the options every public function shares (``wrt``, ``format``, ``method``,
``memory_limit``) and the memory guard, with one set of messages. Public functions check them
once, at their boundary, and pass checked values inward.

Each check takes a ``prefix`` that names the call, e.g. ``"einsum 'ij,jk->ik': "``
(:func:`sparsejac.errors.context`) or ``"jacobian_of: "``.

>>> wrt_indices((0, -1), 3, "einsum 'i,i,i': ")
[0, 2]
"""

from __future__ import annotations

import math
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


# dask's byte units (dask.utils.parse_bytes): kB, MB, GB, ... are powers of 1000, KiB, MiB,
# GiB, ... powers of 1024; the first letter alone (k, M, G) is decimal, "Ki", "Mi", "Gi" binary.
# Case does not matter.
_UNITS = {"b": 1, "": 1}
for _i, _p in enumerate("kmgtp", start=1):
    _UNITS[_p + "b"] = _UNITS[_p] = 1000**_i
    _UNITS[_p + "ib"] = _UNITS[_p + "i"] = 1024**_i


def parse_bytes(text: str, prefix: str = "", name: str = "memory_limit") -> int:
    """A size such as ``"8GB"`` (8 * 10**9), ``"8GiB"`` (8 * 2**30), ``"512MB"``, ``"1.5GiB"``
    or ``"8G"`` (decimal, as dask reads it) in bytes, as ``dask.utils.parse_bytes`` reads it
    (without importing dask); a bare number is bytes.

    >>> parse_bytes("8GB"), parse_bytes("8GiB"), parse_bytes("1.5 gib"), parse_bytes("8G")
    (8000000000, 8589934592, 1610612736, 8000000000)
    """
    body = text.replace(" ", "")
    cut = len(body)
    while cut and body[cut - 1].isalpha():
        cut -= 1
    number, unit = body[:cut], body[cut:]
    if not number and unit:
        number = "1"  # dask: "GB" alone is one GB
    try:
        value = float(number) * _UNITS[unit.lower()]
    except (ValueError, KeyError):
        raise ArgumentError(
            f"{prefix}{name} {text!r} is not a size such as 8GB (10**9 bytes), 8GiB (2**30 "
            "bytes), 512MB or a number of bytes"
        ) from None
    if not math.isfinite(value) or value < 0 or value >= 2.0**63:
        raise ArgumentError(f"{prefix}{name} {text!r} is not a finite, non-negative size such "
                            "as 8GB or 512MiB")
    return int(value)


def memory_limit(value: Any, prefix: str) -> float | None:
    """The limit in bytes: ``value`` (a number of bytes, or a size string such as ``"8GB"``
    or ``"8GiB"``: :func:`parse_bytes`), or the memory available when ``value`` is None."""
    return available_memory() if value is None else limit_bytes(value, prefix)


def limit_bytes(value: Any, prefix: str) -> float | None:
    """``memory_limit`` checked and in bytes; None stays None (the caller's default)."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_bytes(value, prefix)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ArgumentTypeError(
            f"{prefix}memory_limit must be a number of bytes, a size such as '8GB' or '8GiB', "
            f"or None, got {type(value).__name__}"
        )
    if not value >= 0:
        raise ArgumentError(f"{prefix}memory_limit={value} must be >= 0")
    return value


def guard(nbytes: int, limit: float | None, prefix: str, what: str, used: int = 0,
          using: str = "live Jacobian factors") -> None:
    """Refuse, before anything is allocated, a build of ``nbytes`` that would take the ``used``
    bytes already in use (of ``using``) over ``limit``. Where ``used`` alone reaches the
    limit, the message says so rather than quote a headroom below zero."""
    if limit is None or nbytes + used <= limit:
        return
    need = f"{prefix}{what} needs about {nbytes:,} bytes ({nbytes / 2**30:.3g} GiB)"
    of = f"the memory limit of {int(limit):,} bytes ({limit / 2**30:.3g} GiB)"
    if used >= limit:
        raise JacobianTooLargeError(
            f"{need}, but {used:,} bytes of {using} already use all of {of}; nothing was "
            "allocated")
    beside = f" beside {used:,} bytes of {using}" if used else ""
    raise JacobianTooLargeError(
        f"{need}{beside}, over {of}; nothing was allocated")
