"""The labels of one trace: their sizes, the index maps behind derived labels, the memory
budget every allocation of the algebra is checked against, and the memos that keep terms
mergeable (splits, identical maps, injectivity, collapses).

A label is an integer naming one axis' worth of values (docs/how-it-works.md, "## 2. Programs");
a *derived* label's value is a table over base labels ("## 3. Index maps"). The memory guard
is "## 6. Memory". This module knows no term: it imports nothing else of
:mod:`sparsejac.programs.terms`.

>>> import torch
>>> labels = Labels()
>>> (b,), (j,) = labels.fresh(4), labels.fresh(3)
>>> labels.shape((b, j)), labels.split(b, (2, 2)) == labels.split(b, (2, 2))
((4, 3), True)
>>> labels.derive(torch.arange(3), (j,), 3) == j      # an identity map is the label itself
True
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ... import options
from ...structure import distinct
from ..ledger import Ledger

if TYPE_CHECKING:  # annotations only
    import torch


# torch is imported inside the functions that call it: it is optional for the package and slow
# to import, and only :func:`sparsejac.jacobian_of` (which has it loaded) comes here.

Atoms = tuple[int, ...]  # the labels of one axis, read as a mixed-radix number in C order


# an allocation this large reads the process's headroom (:attr:`Labels.room`) before it is made
ROOM_BYTES = 1 << 20


def nothing_live() -> int:
    """The live bytes of labels that no tracer counts for: none."""
    return 0


class Labels:
    """The size of every label of one trace, fresh labels, and memoised splits (so that terms
    which split the same label the same way keep sharing labels and can still be merged).

    It also carries the trace's memory limit: every factor the algebra below allocates is
    checked against it first (:meth:`guard`), so an oversized term is refused with
    :class:`~sparsejac.errors.JacobianTooLargeError` instead of failing in torch's allocator."""

    def __init__(self, limit: float | None = None, prefix: str = "") -> None:
        self.sizes: dict[int, int] = {}
        # Index maps: a *derived* label's value is ``table[values of over]`` (an int64 tensor
        # of shape ``shape(over)``), or -1 where the entry does not exist. ``over`` are base
        # labels. Selections, shifts, padding and convolution windows are derived labels.
        self.derived: dict[int, tuple["torch.Tensor", tuple[int, ...]]] = {}
        self._maps: dict[tuple, list[int]] = {}
        self._splits: dict[tuple[int, tuple[int, ...]], Atoms] = {}
        self.injective: dict[int, bool] = {}  # memo of :func:`~.maps.one_to_one`
        # id of a factor made by :func:`scale` -> (weak reference to it, the term scaled, g)
        self.scaled: dict[int, tuple] = {}
        # collapses (:func:`~.collapse.collapse`), keyed by the input-side maps and the labels
        # summed: terms through the same maps collapse onto the same labels, and stay mergeable
        self.collapses: dict[tuple, Any] = {}
        self.limit = limit
        # under the default limit: what the process can still allocate, re-read as the trace
        # runs (:class:`~sparsejac.options.Headroom`), and what is kept back from it
        self.room: "options.Headroom | None" = None
        self.reserve = 0
        self._checks = 0
        self.prefix = prefix  # starts the guard's messages; the tracer names the current operation
        # bytes of the factors alive now (the tracer's terms of live tensors); 0 if unknown
        self.live: Callable[[], int] = nothing_live
        # the most bytes one guarded allocation brought the live factors to: the trace's peak,
        # known once it has run (what a plan refuses a refill by, before tracing again)
        self.peak = 0
        # bytes of the index maps' tables (int64, one per derived label, kept for the trace)
        self.tables_nbytes = 0
        self._table_storages: set[int] = set()
        # the storages alive that the guard counts: factors made here (a rule's new terms are
        # in use before the tracer records them: attention's matmul holds one per path, then
        # sums them), and what the tracer records (terms, the program's values)
        self.ledger = Ledger()

    def guard(self, shape: Sequence[int], itemsize: int, what: str = "a Jacobian factor") -> None:
        """Refuse, before it is allocated, a tensor of ``shape`` that would take the bytes in
        use (the live factors, the program's values, the index tables) over the memory limit;
        record the peak it would reach."""
        nbytes = math.prod(shape) * itemsize
        live = self.live() + self.tables_nbytes
        self.peak = max(self.peak, live + nbytes)
        if self.limit is not None and live + nbytes > self.limit:
            options.guard(nbytes, self.limit, self.prefix, f"{what} of shape {tuple(shape)}",
                          used=live, using="live Jacobian factors, the program's own tensors "
                                           "and index tables")
        self._checks += 1
        # the process's own headroom, read for a large allocation and now and then (small
        # ones add up): one cheap read of the process's memory, not a walk over tensors
        if self.room is not None and (nbytes >= ROOM_BYTES or self._checks % 16 == 0):
            options.guard_room(nbytes, self.room(), self.reserve, self.prefix,
                               f"{what} of shape {tuple(shape)}")

    def made(self, tensor: "torch.Tensor") -> "torch.Tensor":
        """``tensor``, a factor just allocated, counted as in use for as long as it lives."""
        self.ledger.track(tensor)
        return tensor

    def forget_scaled(self, key: int) -> None:
        """Drop the :attr:`scaled` entry of a factor that has died (its weak reference's call)."""
        self.scaled.pop(key, None)

    def derive(self, table: "torch.Tensor", over: Sequence[int], size: int) -> int:
        """A derived label of ``size`` whose value is ``table`` over the base labels ``over``;
        a table equal to its one base label (an identity map) is that label itself."""
        over = tuple(over)
        # keep only the labels the table depends on (a slice of a batched tensor maps the
        # batch label to itself, whatever the table was computed over); a dim the table is
        # broadcast along (stride 0: an expanded table) is constant, the others are read on
        # the table without it
        dims = [d for d in range(table.dim()) if table.shape[d] <= 1 or table.stride(d) != 0]
        small = table[tuple(slice(None) if d in dims else 0 for d in range(table.dim()))]
        keep = []
        for j, d in enumerate(dims):
            if small.shape[j] <= 1:
                continue
            first = small.narrow(j, 0, 1)
            # the first and last slices differ for most maps (a slice, a shift): no full scan
            if (bool((first != small.narrow(j, small.shape[j] - 1, 1)).any())
                    or not bool((small == first).all())):
                keep.append(d)
        if len(keep) < table.dim():
            index = tuple(slice(None) if d in keep else 0 for d in range(table.dim()))
            if all(table.shape[d] for d in range(table.dim())):
                table = table[index]
                over = tuple(over[d] for d in keep)
        if (len(over) == 1 and self.sizes[over[0]] == size and table.dim() == 1
                and (not table.numel() or (int(table[0]) == 0 and int(table[-1]) == size - 1))
                and bool((table == arange(size, table)).all())):
            return over[0]
        # the same map gets the same label, so that terms through it merge
        key = (over, int(size), tuple(table.shape))
        for label in self._maps.get(key, ()):
            if torch_equal(self.derived[label][0], table):
                return label
        label = len(self.sizes)
        self.sizes[label] = int(size)
        self.derived[label] = (table, over)
        # the tables stay alive as long as the labels: their memory counts beside the factors
        storage = table.untyped_storage()
        if storage.data_ptr() not in self._table_storages:
            self._table_storages.add(storage.data_ptr())
            self.tables_nbytes += storage.nbytes()
        self._maps.setdefault(key, []).append(label)
        return label

    def base(self, atoms: Sequence[int]) -> tuple[int, ...]:
        """``atoms`` with each derived label replaced by the base labels it is a function of."""
        out: list[int] = []
        for a in atoms:
            out.extend(self.derived[a][1] if a in self.derived else (a,))
        return distinct(out)

    def fresh(self, size: int) -> Atoms:
        """Atoms for a new axis of ``size``: one new label, none for size 1."""
        if size == 1:
            return ()
        label = len(self.sizes)
        self.sizes[label] = int(size)
        return (label,)

    def split(self, label: int, parts: tuple[int, ...]) -> Atoms:
        """Labels for ``label`` cut into ``parts`` (C order, product = its size)."""
        key = (label, parts)
        if key not in self._splits:
            if label in self.derived:  # digits of the table's values, -1 staying -1
                table, over = self.derived[label]
                atoms, stride = [], math.prod(parts)
                for p in parts:
                    stride //= p
                    if p > 1:
                        digit = (table // stride) % p
                        atoms.append(self.derive(digit.where(table >= 0, -1), over, p))
                self._splits[key] = tuple(atoms)
            else:
                self._splits[key] = tuple(a for p in parts for a in self.fresh(p))
        return self._splits[key]

    def merged(self, run: Atoms) -> int:
        """One label for the consecutive labels ``run`` (C order)."""
        key = (-1, run)
        if key not in self._splits:
            self._splits[key] = self.fresh(self.size(run))
        return self._splits[key][0]

    def shape(self, atoms: Sequence[int]) -> tuple[int, ...]:
        """The sizes of ``atoms``."""
        return tuple(self.sizes[a] for a in atoms)

    def size(self, atoms: Sequence[int]) -> int:
        """The product of the sizes of ``atoms`` (1 for none)."""
        return math.prod(self.sizes[a] for a in atoms)


def arange(n: int, like: "torch.Tensor") -> "torch.Tensor":
    """``0, ..., n - 1`` as int64 on ``like``'s device (an index table's values)."""
    import torch

    return torch.arange(n, dtype=torch.int64, device=like.device)


def torch_equal(a: "torch.Tensor", b: "torch.Tensor") -> bool:
    """Whether two tables are equal, on one device (tables on two devices never are)."""
    import torch

    return a.device == b.device and torch.equal(a, b)
