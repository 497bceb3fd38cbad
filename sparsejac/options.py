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
from .operands import NUMERIC_KINDS


def available_memory() -> int | None:
    """Bytes this process can still allocate now, or None if unknown: the least of the
    machine's available memory (``MemAvailable``), the address space left under
    ``RLIMIT_AS`` (``ulimit -v``), the data segment left under ``RLIMIT_DATA``, and what the
    process's memory cgroup (a container's limit, ``memory.max``) has left.

    Why all of them: under a limit below the machine's memory, allocating up to
    ``MemAvailable`` fails in the allocator (an address-space limit) or gets the process
    killed (a cgroup's), instead of a refusal by the guard."""
    return Headroom()()


class Headroom:
    """What the process can still allocate, re-read at each call: :func:`available_memory`'s
    sources found once (which rlimits and cgroups limit it), then only the numbers that change
    are read (``/proc/meminfo``, ``/proc/self/statm``, the cgroups' usage): tens of
    microseconds, whatever the trace holds.

    Why the guard reads it beside its own count: the process holds more than the tensors
    alive (the allocator keeps memory freed in pieces, threads reserve address space), and
    under the default limit the machine's, the rlimit's or the cgroup's true headroom is
    what decides between a refusal and a kill."""

    def __init__(self, root: str = "/sys/fs/cgroup", proc: str = "/proc/self/cgroup") -> None:
        self._rlimits: list[tuple[int, int]] = []  # (soft limit, field of statm: 0 size, 5 data)
        try:
            import resource

            for name, field in (("RLIMIT_AS", 0), ("RLIMIT_DATA", 5)):
                which = getattr(resource, name, None)
                soft = resource.getrlimit(which)[0] if which is not None else None
                if soft is not None and soft != resource.RLIM_INFINITY:
                    self._rlimits.append((soft, field))
        except (ImportError, OSError, ValueError):
            pass
        # (usage file, limit, reclaimable page cache at the start) of each limited cgroup
        self._cgroups = [(used, limit, cache) for used, limit, cache in memory_cgroups(root, proc)]
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def __call__(self) -> int | None:
        known = [_machine_available()]
        if self._rlimits:
            try:
                with open("/proc/self/statm") as f:
                    fields = f.read().split()
                for soft, field in self._rlimits:
                    known.append(soft - int(fields[field]) * self._page)
            except (OSError, ValueError, IndexError):
                pass
        for used, limit, cache in self._cgroups:
            now = _read_int(used)
            if now is not None:
                known.append(limit - now + cache)
        known = [n for n in known if n is not None]
        return max(0, min(known)) if known else None


def _machine_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:  # "max": no limit
        return None


def _inactive_file(path: str, key: str) -> int:
    """Page cache the kernel reclaims before it kills (``memory.stat``'s ``key``)."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def memory_cgroups(root: str, proc: str) -> list[tuple[str, int, int]]:
    """``(usage file, limit, reclaimable page cache now)`` of the process's memory cgroup and
    each one above it that has a limit (cgroup v2's ``memory.max``, v1's
    ``memory.limit_in_bytes``)."""
    try:
        with open(proc) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: one unified hierarchy
            base, files = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base, files = os.path.join(root, "memory"), (
                "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):  # the process's cgroup, then its ancestors
            here = os.path.join(base, *parts[:depth])
            limit = _read_int(os.path.join(here, files[0]))
            if limit is None or limit >= 2**62:  # "max", or v1's "no limit" (a huge number)
                continue
            used = os.path.join(here, files[1])
            if _read_int(used) is None:
                continue
            found.append((used, limit, _inactive_file(os.path.join(here, "memory.stat"),
                                                      files[2])))
    return found


def choice(value: Any, name: str, allowed: Sequence[str], prefix: str) -> str:
    """``value`` if it is one of ``allowed`` strings."""
    if not isinstance(value, str):
        raise ArgumentTypeError(
            f"{prefix}{name} must be a str, one of {list(allowed)}, got {type(value).__name__}"
        )
    if value not in allowed:
        raise ArgumentError(f"{prefix}{name}={value!r} is not one of {list(allowed)}")
    return value


def wrt_index(wrt: Any, n: int, prefix: str, what: str = "operand", tuples: bool = True,
              within: Any = None) -> int:
    """``wrt`` as an index in ``range(n)`` (negative counts from the end); ``tuples`` says
    whether the caller also takes a tuple (for the message), ``within`` the tuple ``wrt`` is
    an entry of."""
    if isinstance(wrt, bool) or not isinstance(wrt, (int, np.integer)):
        kinds = "an int or a tuple of ints" if tuples else f"one {what}'s index, an int"
        where = f" in wrt={within!r}" if within is not None else ""
        raise ArgumentTypeError(
            f"{prefix}wrt must be {kinds}, got {type(wrt).__name__} {wrt!r}{where}")
    if not -n <= wrt < n:
        raise ArgumentError(f"{prefix}wrt={int(wrt)} is out of range for {n} {what}(s)")
    return int(wrt) % n


def wrt_indices(wrt: Any, n: int, prefix: str, what: str = "operand") -> list[int]:
    """``wrt`` (an int, or a tuple or list of ints) as a list of indices in ``range(n)``."""
    if not isinstance(wrt, (tuple, list)):
        return [wrt_index(wrt, n, prefix, what)]
    if not wrt:
        raise ArgumentError(f"{prefix}wrt is an empty sequence")
    return [wrt_index(w, n, prefix, what, within=wrt) for w in wrt]


def value_dtype(dtype: Any, prefix: str, name: str = "dtype") -> Any:
    """``dtype`` checked as the dtype of a result's values: a numeric numpy dtype (or what
    ``np.dtype`` reads as one: ``np.float32``, ``"f4"``) as an ``np.dtype``, or a torch dtype
    that is not ``torch.bool``, as it is.

    >>> value_dtype("float32", ""), value_dtype(np.int64, "")
    (dtype('float32'), dtype('int64'))
    >>> value_dtype(object, "einsum 'i->i': ")
    Traceback (most recent call last):
    ...
    sparsejac.errors.ArgumentTypeError: einsum 'i->i': dtype object is not a numeric dtype (integer, floating or complex)
    """
    if "torch" in type(dtype).__module__:  # a torch dtype (torch need not be imported here)
        if getattr(dtype, "is_floating_point", None) is None or str(dtype).endswith(".bool"):
            raise ArgumentTypeError(f"{prefix}{name} {dtype!r} is not a numeric dtype")
        return dtype
    if isinstance(dtype, bool) or dtype is None:  # np.dtype(None) is float64: no default here
        raise ArgumentTypeError(f"{prefix}{name} {dtype!r} is not a numpy or torch dtype")
    try:
        checked = np.dtype(dtype)
    except TypeError:
        raise ArgumentTypeError(f"{prefix}{name} {dtype!r} is not a numpy or torch dtype") from None
    if checked.kind not in NUMERIC_KINDS:
        raise ArgumentTypeError(f"{prefix}{name} {getattr(dtype, '__name__', dtype)!s} is not a "
                                "numeric dtype (integer, floating or complex)")
    return checked


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
    """``memory_limit`` checked and in bytes; None stays None (the caller's default).

    A real number (numpy's integers and floats too; not a bool, not a complex number) that is
    not negative nor nan; ``math.inf`` is no limit. A string is a size (:func:`parse_bytes`).

    >>> limit_bytes("4GB", ""), limit_bytes(512, ""), limit_bytes(math.inf, "")
    (4000000000, 512, inf)
    >>> limit_bytes(1e9 + 0j, "jacobian_of: ")
    Traceback (most recent call last):
    ...
    sparsejac.errors.ArgumentTypeError: jacobian_of: memory_limit must be a number of bytes, a size such as '8GB' or '8GiB', or None, got complex
    """
    if value is None:
        return None
    if isinstance(value, str):
        return parse_bytes(value, prefix)
    # np.number would let numpy's complex numbers through; np.timedelta64 is an np.integer
    if isinstance(value, (bool, np.timedelta64)) or not isinstance(
            value, (int, float, np.integer, np.floating)):
        raise ArgumentTypeError(
            f"{prefix}memory_limit must be a number of bytes, a size such as '8GB' or '8GiB', "
            f"or None, got {type(value).__name__}"
        )
    if not value >= 0:
        raise ArgumentError(f"{prefix}memory_limit={value!r} must be a number of bytes >= 0")
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


def guard_room(nbytes: int, left: int | None, reserve: int, prefix: str, what: str) -> None:
    """Refuse ``nbytes`` where the process has less than that left (``left``, from
    :class:`Headroom`) beyond ``reserve``: under the default limit, before the allocator
    fails or the kernel kills the process."""
    if left is not None and nbytes > left - reserve:
        raise JacobianTooLargeError(
            f"{prefix}{what} needs about {nbytes:,} bytes ({nbytes / 2**30:.3g} GiB), but the "
            f"process can allocate only {max(0, left):,} bytes more now (the memory available, "
            f"or what its address-space, data or cgroup limit leaves), {reserve:,} of them kept "
            "in reserve; nothing was allocated (pass memory_limit to set the limit)")
