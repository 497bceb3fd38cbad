"""The running count of bytes behind the memory guard of a trace: the distinct storages of
the tensors it tracks (Jacobian factors, the program's own values), kept up to date as they
are made and as they die, so that a check reads one number.

Why not a walk over the live tensors at each check: a Hessian's trace checks about 1500 times
with 245,000 storages alive, and walking them all each time is quadratic in the live tensors
(88% of a refill). Here each tensor is visited once when it is tracked and once when it dies
(a weak reference's callback); a storage shared by views, or by a factor and the value it was
made of, counts once (a reference count keyed by the storage).

>>> import torch
>>> book = Ledger()
>>> a = torch.zeros(1000, dtype=torch.float64)
>>> book.track(a); book.track(a.reshape(10, 100)); book.nbytes   # a view: one storage
8000
>>> del a
>>> book.nbytes, book.walk()
(0, 0)
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable


class WeakCall:
    """``getattr(owner, method)(*args)`` while ``owner`` lives, else ``default``; any
    arguments of the call itself are ignored (a weak reference's callback gets the dead
    reference). It holds ``owner`` weakly: a callback that held it (a bound method, a lambda
    over ``self``) stored in ``owner``'s own dicts would make a reference cycle, which only the
    cyclic collector frees; a trace's tracer, labels and index tables would then outlive it
    (hundreds of MB a refill at millions of entries) until the collector ran."""

    __slots__ = ("_owner", "_method", "_args", "_default")

    def __init__(self, owner: object, method: str, *args: object, default: object = None) -> None:
        self._owner, self._method = weakref.ref(owner), method
        self._args, self._default = args, default

    @property
    def owner(self) -> object:
        """The owner, or None once it is gone."""
        return self._owner()

    def __call__(self, *ignored: object) -> object:
        owner = self._owner()
        return self._default if owner is None else getattr(owner, self._method)(*self._args)


def storage_key(tensor: Any) -> tuple[int, int]:
    """``(address, bytes)`` of the storage behind ``tensor``: equal for views of one tensor."""
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def storage_nbytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one tensor count once)."""
    seen, total = set(), 0
    for f in tensors:
        key = storage_key(f)
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


class Ledger:
    """Bytes of the distinct storages behind the tracked tensors that are alive."""

    def __init__(self) -> None:
        self.nbytes = 0
        # id of a tracked tensor -> (weak reference to it, its storage's key); the entry goes
        # with the tensor (the callback), so an id is never reused while its entry stands
        self._tensors: dict[int, tuple[weakref.ref, tuple[int, int]]] = {}
        self._refs: dict[tuple[int, int], int] = {}  # storage key -> tracked tensors on it
        # storages visited, by tracking, forgetting and walking: what a check costs is read
        # here (a check reads :attr:`nbytes` and visits none)
        self.visits = 0

    def track(self, tensor: Any) -> None:
        """Count ``tensor``'s storage for as long as the tensor lives (once per storage)."""
        key = id(tensor)
        entry = self._tensors.get(key)
        if entry is not None and entry[0]() is tensor:
            return
        self.visits += 1
        skey = storage_key(tensor)
        try:
            ref = weakref.ref(tensor, WeakCall(self, "_drop", key))
        except TypeError:  # not weakly referenceable: nothing tells when it dies, not counted
            return
        self._tensors[key] = (ref, skey)
        count = self._refs.get(skey, 0)
        if not count:
            self.nbytes += skey[1]
        self._refs[skey] = count + 1

    def track_all(self, tensors: Iterable[Any]) -> None:
        for t in tensors:
            self.track(t)

    def _drop(self, key: int) -> None:
        entry = self._tensors.pop(key, None)
        if entry is None:
            return
        self.visits += 1
        skey = entry[1]
        count = self._refs[skey] - 1
        if count:
            self._refs[skey] = count
        else:
            del self._refs[skey]
            self.nbytes -= skey[1]

    def tensors(self) -> list[Any]:
        """The tracked tensors alive now."""
        alive = (ref() for ref, _ in list(self._tensors.values()))
        return [t for t in alive if t is not None]

    def walk(self) -> int:
        """:attr:`nbytes` recounted from scratch over every tracked tensor alive (for checks:
        the two agree, or the running count has drifted)."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for t in self.tensors():
            self.visits += 1
            skey = storage_key(t)
            if skey not in seen:
                seen.add(skey)
                total += skey[1]
        return total
