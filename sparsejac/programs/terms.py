"""Structured Jacobian terms and their algebra (design.md section 5).

A :class:`Term` is the closed form of design.md section 1 carried through a whole program: the
Jacobian ``J[o, a] = d t[o] / d arg[a]`` of an intermediate tensor ``t`` is zero except where the
indices agree with one assignment ``v`` of values to integer *labels*, and there it equals a dense
``factor`` over some of those labels. Each axis of ``t`` (``out``) and of the argument (``inp``)
is named by a tuple of labels, its *atoms*, read as a mixed-radix number in C order: an axis made by
``flatten`` of axes labelled ``b`` and ``j`` has atoms ``(b, j)``, and its index is
``b * size(j) + j``. A label shared by an ``out`` atom and an ``inp`` atom is a Kronecker delta (per
sample structure stays a delta through the whole program); a label on two ``out`` atoms a diagonal.
Labels of size 1 never appear: a size-1 axis has no atoms.

Every operation of a program maps terms to terms without materialising anything: ``compose``
(an einsum with the other operands' values: matmul, sums, softmax's contraction), ``scale`` (an
elementwise derivative), ``expand`` (broadcasting), ``permute`` and ``reshape``. A tensor's
Jacobian is a list of terms (a sum); ``merge`` adds terms with the same axes into one. Nothing
here writes sparse arrays: :mod:`sparsejac.programs.write` does, once, at the end.

>>> import torch
>>> labels = Labels()
>>> x = identity((2, 3), labels, torch.float64)          # d x / d x
>>> w = torch.arange(12.0, dtype=torch.float64).reshape(3, 4)
>>> j = compose(x, ((0, 1), (1, 2)), (0, 2), (2, 3, 4), 0, [None, w], labels)   # x @ w
>>> j.nnz(labels), j.factor.shape
(24, torch.Size([4, 3]))
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .. import options
from .ledger import Ledger, WeakCall
from ..paths import greedy, label_sizes
from ..structure import distinct

if TYPE_CHECKING:  # annotations only
    import torch

# torch is imported inside the functions that call it: it is optional for the package and slow
# to import, and only :func:`sparsejac.jacobian_of` (which has it loaded) comes here.

Atoms = tuple[int, ...]
MAX_EINSUM_LABELS = 52  # torch.einsum's sublist format takes labels 0..51


# an allocation this large reads the process's headroom (:attr:`Labels.room`) before it is made
ROOM_BYTES = 1 << 20


class TooManyLabelsError(Exception):
    """An einsum over structured factors would need more than 52 distinct labels."""


def _nothing_live() -> int:
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
        self._one_to_one: dict[int, bool] = {}  # memo of :func:`one_to_one`
        # id of a factor made by :func:`scale` -> (weak reference to it, the term scaled, g)
        self.scaled: dict[int, tuple] = {}
        # collapses (:func:`collapse`), keyed by the input-side maps and the labels summed:
        # terms through the same maps collapse onto the same labels, and stay mergeable
        self._collapses: dict[tuple, "_Collapse | None"] = {}
        self.limit = limit
        # under the default limit: what the process can still allocate, re-read as the trace
        # runs (:class:`~sparsejac.options.Headroom`), and what is kept back from it
        self.room: "options.Headroom | None" = None
        self.reserve = 0
        self._checks = 0
        self.prefix = prefix  # starts the guard's messages; the tracer names the current operation
        # bytes of the factors alive now (the tracer's terms of live tensors); 0 if unknown
        self.live: Callable[[], int] = _nothing_live
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
        # ones add up): a few microseconds, not a walk
        if self.room is not None and (nbytes >= ROOM_BYTES or self._checks % 16 == 0):
            options.guard_room(nbytes, self.room(), self.reserve, self.prefix,
                               f"{what} of shape {tuple(shape)}")

    def made(self, tensor: "torch.Tensor") -> "torch.Tensor":
        """``tensor``, a factor just allocated, counted as in use for as long as it lives."""
        self.ledger.track(tensor)
        return tensor

    def _unscaled(self, key: int) -> None:
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
                and bool((table == _arange(size, table)).all())):
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
        return tuple(self.sizes[a] for a in atoms)

    def size(self, atoms: Sequence[int]) -> int:
        return math.prod(self.sizes[a] for a in atoms)


class Product:
    """A factor kept as the einsum of its operands (``(tensor, labels)`` pairs) over ``out``,
    contracted the first time it is read (:attr:`Term.factor`).

    Why: composing a term with a layer that widens it (a transformer's feed-forward layer,
    64 -> 2048 per token) makes a factor far larger than what it is made of, and the next
    layer narrows it again. Kept unformed, the whole chain ``W2 diag(relu') W1 J`` is
    contracted at once in the cheapest order (:func:`contract`): the widened factor (4.3 GB
    on the benchmark's transformer) is never made."""

    __slots__ = ("operands", "out", "labels", "_value")

    def __init__(self, operands: Sequence[tuple["torch.Tensor", Sequence[int]]],
                 out: Sequence[int], labels: "Labels") -> None:
        self.operands = [(t, tuple(ls)) for t, ls in operands]
        self.out = tuple(out)
        self.labels = labels
        self._value: "torch.Tensor | None" = None

    @property
    def formed(self) -> bool:
        return self._value is not None

    def value(self) -> "torch.Tensor":
        if self._value is None:
            self._value = contract(self.operands, self.out, self.labels)
            self.operands = []  # the parts are released with the product formed
        return self._value

    def tensors(self) -> list["torch.Tensor"]:
        """The tensors it holds now (the operands, or the formed factor)."""
        return [self._value] if self._value is not None else [t for t, _ in self.operands]

    def summed(self) -> set[int]:
        """Labels of the operands that the product sums (private to it)."""
        return {l for _, ls in self.operands for l in ls} - set(self.out)


@dataclass(frozen=True)
class Term:
    """One structured summand of a Jacobian: axes' atoms, and a dense factor over ``flabels``
    (``stored``: the tensor, or a :class:`Product` formed when :attr:`factor` is first read)."""

    out: tuple[Atoms, ...]
    inp: tuple[Atoms, ...]
    stored: "torch.Tensor | Product"
    flabels: tuple[int, ...]  # distinct, each a label of out or inp

    @property
    def factor(self) -> "torch.Tensor":
        s = self.stored
        return s.value() if isinstance(s, Product) else s

    @property
    def lazy(self) -> "Product | None":
        """The unformed product behind the factor, or None."""
        s = self.stored
        return s if isinstance(s, Product) and not s.formed else None

    @property
    def like(self) -> "torch.Tensor":
        """A tensor of the factor's dtype and device, without forming a product."""
        lazy = self.lazy
        return lazy.operands[0][0] if lazy is not None else self.factor

    def held(self) -> list["torch.Tensor"]:
        """The tensors whose memory the term holds."""
        s = self.stored
        return s.tensors() if isinstance(s, Product) else [s]

    @property
    def out_atoms(self) -> tuple[int, ...]:
        return tuple(a for axis in self.out for a in axis)

    @property
    def inp_atoms(self) -> tuple[int, ...]:
        return tuple(a for axis in self.inp for a in axis)

    def free(self, labels: Labels) -> tuple[int, ...]:
        """``V``: the base labels its entries are enumerated over."""
        return labels.base(self.out_atoms + self.inp_atoms)

    def mapped(self, labels: Labels) -> bool:
        """Whether an axis carries an index map (a derived label)."""
        return any(a in labels.derived for a in self.out_atoms + self.inp_atoms)

    def nnz(self, labels: Labels) -> int:
        """Entries enumerated: one per assignment of values to ``V`` (the structural nonzeros
        where no axis is an index map; an upper bound otherwise, as maps may drop or merge)."""
        return labels.size(self.free(labels))


def _einsum(
    operands: Sequence[tuple[torch.Tensor, Sequence[int]]], out: Sequence[int], labels: Labels
):
    """``torch.einsum`` in sublist form over arbitrary integer labels (renamed below 52).

    Operands are contracted pairwise from the left, each step summing the labels that neither
    the output nor a later operand carries (the order torch uses without opt_einsum), so that
    every intermediate is known, and checked against the memory limit, before it is formed."""
    used = distinct([l for _, ls in operands for l in ls] + list(out))
    if len(used) > MAX_EINSUM_LABELS:
        raise TooManyLabelsError(
            f"an einsum over Jacobian factors needs {len(used)} distinct labels; torch.einsum "
            f"takes at most {MAX_EINSUM_LABELS}"
        )
    import torch

    rename = {l: k for k, l in enumerate(used)}
    size = label_sizes([ls for _, ls in operands], [t.shape for t, _ in operands])
    itemsize = max(tensor.element_size() for tensor, _ in operands)

    def step(pairs: Sequence[tuple[torch.Tensor, Sequence[int]]], keep: Sequence[int]):
        if not (len(pairs) == 1 and set(pairs[0][1]) <= set(keep)):
            # (one operand that sums nothing: a permuted or diagonal view, no allocation)
            labels.guard([size[l] for l in keep], itemsize)
        if len(pairs) == 2:
            laid = _matmul_pair(*pairs[0], *pairs[1], keep, labels)
            if laid is not None:
                return labels.made(laid)
        args: list = [a for tensor, ls in pairs for a in (tensor, [rename[l] for l in ls])]
        return labels.made(torch.einsum(*args, [rename[l] for l in keep]))

    acc, acc_ls = operands[0]
    rest = list(operands[1:])
    if not rest:
        return step([(acc, acc_ls)], out)
    for i, (tensor, ls) in enumerate(rest):
        later = set(out).union(*(l for _, l in rest[i + 1 :]))
        last = i == len(rest) - 1
        keep = list(out) if last else [l for l in distinct(list(acc_ls) + list(ls)) if l in later]
        acc, acc_ls = step([(acc, acc_ls), (tensor, ls)], keep), keep
    return acc


def contract(
    operands: Sequence[tuple["torch.Tensor", Sequence[int]]], out: Sequence[int], labels: Labels
) -> "torch.Tensor":
    """``einsum(operands -> out)`` by pairs chosen greedily (:func:`sparsejac.paths.greedy`):
    each step contracts the pair with the fewest multiply-adds and writes
    (:func:`~sparsejac.paths.loop_and_writes`), so that a chain ``W2 diag(g) W1 J`` contracts
    its small matrices first and a chain of scales ``g3 g2 g1 F`` multiplies the scales
    together before it makes one pass over the large factor ``F``. Every pair goes through
    :func:`_einsum` (guarded, laid out for the writer); the last pair gives ``out``."""
    ops = [(t, tuple(ls)) for t, ls in operands]
    for i, j, keep in greedy([ls for _, ls in ops], out, [t.shape for t, _ in ops], stop=2):
        pair = _einsum([ops[i], ops[j]], keep, labels)
        ops = [op for k, op in enumerate(ops) if k not in (i, j)] + [(pair, keep)]
    return _einsum(ops, out, labels)


# A product is kept unformed (:class:`Product`) where forming it would make a factor this many
# times the entries of its parts: beyond it the next layer usually narrows the chain again. A
# switch for A/B runs of the benchmarks and for tests that need a product formed (or not).
LAZY_SPREAD = 4


def _product(ops: list, fl: tuple[int, ...], labels: Labels):
    """The factor ``einsum(ops -> fl)``: a :class:`Product` where it spreads its parts (see
    :data:`LAZY_SPREAD`), else formed now."""
    sizes = label_sizes([ls for _, ls in ops], [t.shape for t, _ in ops])
    entries = math.prod(sizes.get(l, 1) for l in fl)
    if len(ops) > 1 and entries > LAZY_SPREAD * sum(t.numel() for t, _ in ops):
        return Product(ops, fl, labels)
    return contract(ops, fl, labels)


def _operands_of(term: Term, new_labels: set[int]) -> list:
    """The term's factor as einsum operands: a product's parts (extended by the caller), or
    the factor itself where the product is formed or sums a label the caller brings in."""
    lazy = term.lazy
    own = set(term.out_atoms) | set(term.inp_atoms)
    if lazy is not None and not (lazy.summed() & (new_labels | own)):
        return list(lazy.operands)
    return [(term.factor, term.flabels)]


def _matmul_pair(a: torch.Tensor, la: Sequence[int], b: torch.Tensor, lb: Sequence[int],
                 keep: Sequence[int], labels: Labels | None = None) -> torch.Tensor | None:
    """``einsum(a, la, b, lb -> keep)`` as one broadcast ``torch.matmul`` whose result is
    already C-contiguous in ``keep`` order, or None where ``keep`` does not end in a run of one
    operand's own labels (then torch.einsum, which may return a permuted view).

    Why: the factors are written in ``keep`` order (the Jacobian's row-major order), and
    torch.einsum lays its result out in its own order; a copy to contiguous then costs as much
    as the contraction (a tanh MLP's refill: 39 ms einsum + 13 ms copy against 21 ms here).
    ``keep`` is read as ``P + M + N``: ``N`` the trailing labels of one operand only, ``M`` the
    run before it of the other operand only, ``P`` the rest, broadcast batch dimensions."""
    if len(set(la)) != len(la) or len(set(lb)) != len(lb) or not keep:
        return None
    sa, sb = dict(zip(la, a.shape)), dict(zip(lb, b.shape))
    if any(sa[l] != sb[l] for l in sa if l in sb):  # a size-1 broadcast: leave it to einsum
        return None
    both = {**sa, **sb}
    ones = {l for l, n in both.items() if n == 1}
    if ones:  # labels of size 1 set no layout: dropped (views), the result reshaped back
        squeezed = _matmul_pair(
            a.reshape([n for l, n in zip(la, a.shape) if l not in ones]),
            [l for l in la if l not in ones],
            b.reshape([n for l, n in zip(lb, b.shape) if l not in ones]),
            [l for l in lb if l not in ones], [l for l in keep if l not in ones], labels)
        return None if squeezed is None else squeezed.reshape(
            [both[l] for l in keep])
    # Labels of one operand only that the result drops: summed away first.
    for t, lt, other, name in ((a, la, lb, "a"), (b, lb, la, "b")):
        gone = [i for i, l in enumerate(lt) if l not in keep and l not in other]
        if gone:
            t = t.sum(gone)
            lt = [l for i, l in enumerate(lt) if i not in gone]
        if name == "a":
            a, la = t, list(lt)
        else:
            b, lb = t, list(lt)
    size = {**dict(zip(la, a.shape)), **dict(zip(lb, b.shape))}
    K = [l for l in la if l in lb and l not in keep]
    if not K:  # nothing summed: a broadcast product, written in keep order
        import torch

        out = torch.empty([size[l] for l in keep], dtype=torch.promote_types(a.dtype, b.dtype),
                          device=a.device)
        # Each operand laid out in keep order first (both are much smaller than the product
        # unless one is as large: then it is left as it is): the product then streams through
        # contiguous memory, twice as fast as through a transposed view.
        a2, b2 = align(a, la, keep), align(b, lb, keep)
        a2, b2 = (t.contiguous() if 4 * t.numel() <= out.numel() else t for t in (a2, b2))
        return torch.mul(a2, b2, out=out)
    only_a = [l for l in keep if l in la and l not in lb]
    only_b = [l for l in keep if l in lb and l not in la]
    tail = keep[-1]
    if tail in only_a:  # the trailing run is a's: compute b-side rows times a-side columns
        a, la, b, lb, only_a, only_b = b, lb, a, la, only_b, only_a
    elif tail not in only_b:
        return None  # ends in a shared label
    n = len(keep)
    while n > 0 and keep[n - 1] in only_b:
        n -= 1
    m = n
    while m > 0 and keep[m - 1] in only_a:
        m -= 1
    P, M, N = list(keep[:m]), list(keep[m:n]), list(keep[n:])
    # a as (P..., M, K), b as (P..., K, N), size 1 where a P label is the other operand's.
    a2 = a.permute([la.index(l) for l in P if l in la] + [la.index(l) for l in M + K])
    shape_a = [size[l] if l in la else 1 for l in P] + [math.prod(size[l] for l in M),
                                                       math.prod(size[l] for l in K)]
    b2 = b.permute([lb.index(l) for l in P if l in lb] + [lb.index(l) for l in K + N])
    shape_b = [size[l] if l in lb else 1 for l in P] + [math.prod(size[l] for l in K),
                                                       math.prod(size[l] for l in N)]
    if _broadcast_copies(_stand_in(a2, shape_a), _stand_in(b2, shape_b)):
        # torch.matmul would copy an operand expanded over a batch it lacks (a CNN's factor
        # times a kernel: gigabytes); torch.einsum folds such labels into the product instead
        return None
    a2, b2 = _laid(a2, shape_a, labels), _laid(b2, shape_b, labels)
    if labels is not None:  # torch.matmul's copies of the operands broadcast over P
        labels.guard((_broadcast_copies(a2, b2) + math.prod(size[l] for l in keep),),
                     max(a2.element_size(), b2.element_size()),
                     "a product's result beside its operands broadcast over its batch")
    return torch_matmul(a2, b2).reshape([size[l] for l in keep])


def _broadcast_copies(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements ``torch.matmul(a, b)`` copies: it expands each operand over the common batch
    and folds that into one axis, a copy where the strides do not allow a view (an operand of
    size 1 along a batch axis that is not the first, say). Matches the profiler's count on
    torch's CPU matmul, operands of 1 to 3 batch axes."""
    if a.dim() <= 2 and b.dim() <= 2:
        return 0
    batch = list(np.broadcast_shapes(tuple(a.shape[:-2]), tuple(b.shape[:-2])))  # not torch's:
    # its first call imports sympy (a second)
    copies = 0
    for t in (a, b):
        expanded = t.expand(batch + list(t.shape[-2:]))
        try:
            expanded.view([math.prod(batch)] + list(t.shape[-2:]))
        except RuntimeError:
            copies += expanded.numel()
    return copies


def _stand_in(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``t`` reshaped to ``shape`` where a view can, else an unallocated contiguous tensor of
    that shape (what :func:`_laid` would copy it to): for deciding before copying."""
    try:
        return t.view(shape)
    except RuntimeError:
        import torch

        return torch.empty(shape, dtype=t.dtype, device="meta")


def _laid(t: torch.Tensor, shape: Sequence[int], labels: Labels | None) -> torch.Tensor:
    """``t`` reshaped to ``shape``: a view where its strides allow, else a copy, guarded (an
    operand of a product permuted out of its order: as large as that operand)."""
    return _reshaped(t, shape, labels, "a factor laid out for a product")


def torch_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.matmul(a, b)


def identity(shape: Sequence[int], labels: Labels, dtype: torch.dtype, device=None) -> Term:
    """``d x / d x``: every axis a delta with itself, factor 1 (on ``device``: the argument's)."""
    import torch

    axes = tuple(labels.fresh(n) for n in shape)
    return Term(axes, axes, torch.ones((), dtype=dtype, device=device), ())


def _retable(term: Term, labels: Labels, change) -> Term:
    """The term with each index map whose table ``change(table, over)`` rewrites (it returns
    ``(table, over)``, or None where the map is untouched) replaced by the rewritten map."""
    new: dict[int, int] = {}
    for a in distinct(term.out_atoms + term.inp_atoms):
        if a in labels.derived:
            table, over = labels.derived[a]
            changed = change(table, over)
            if changed is not None:
                new[a] = labels.derive(changed[0], changed[1], labels.sizes[a])
    if not new:
        return term
    sub = lambda atoms: tuple(new.get(x, x) for x in atoms)  # noqa: E731
    return replace(term, out=tuple(sub(a) for a in term.out), inp=tuple(sub(a) for a in term.inp))


def _substitute(term: Term, old: int, new: int, labels: Labels) -> Term:
    """Identify label ``old`` with ``new`` (a diagonal): rename it, taking the factor's
    diagonal if it carries both (index maps over ``old`` too)."""

    def rename(table, over):
        if old not in over:
            return None
        return _diagonal(table, [new if l == old else l for l in over])

    term = _retable(term, labels, rename)
    sub = lambda atoms: tuple(new if a == old else a for a in atoms)  # noqa: E731
    fl = sub(term.flabels)
    factor = term.factor
    if len(set(fl)) < len(fl):
        fl_new = distinct(fl)
        factor = _einsum([(factor, fl)], fl_new, labels)
        fl = fl_new
    return Term(
        tuple(sub(a) for a in term.out), tuple(sub(a) for a in term.inp), factor, fl
    )


def split_label(term: Term, label: int, parts: Atoms, labels: Labels) -> Term:
    """Replace ``label`` by the finer labels ``parts`` everywhere (reshaping the factor)."""

    def sub(atoms: Atoms) -> Atoms:
        return tuple(p for a in atoms for p in (parts if a == label else (a,)))

    def split(table, over):
        if label not in over:
            return None
        k = over.index(label)
        shape = tuple(table.shape)
        return (table.reshape(shape[:k] + labels.shape(parts) + shape[k + 1 :]),
                over[:k] + tuple(parts) + over[k + 1 :])

    if label not in labels.derived:
        term = _retable(term, labels, split)
    factor, fl = term.factor, term.flabels
    if label in fl:
        pos = fl.index(label)
        shape = tuple(factor.shape)
        # (a copy, guarded, where the strides do not allow a view)
        factor = _reshaped(factor, shape[:pos] + labels.shape(parts) + shape[pos + 1 :], labels,
                           "a Jacobian factor")
        fl = fl[:pos] + parts + fl[pos + 1 :]
    return Term(tuple(sub(a) for a in term.out), tuple(sub(a) for a in term.inp), factor, fl)


def densify(term: Term, shape: Sequence[int], labels: Labels) -> Term:
    """The term with its output side made dense and private, reshaped to ``shape``.

    The fallback for reshapes and diagonals that do not fall on atom boundaries: every output
    atom is replaced by a fresh label tied to the old one by an identity matrix, which costs
    ``prod(shape)`` times the input side's distinct size in the factor."""
    import torch

    occ = term.out_atoms
    private = [labels.fresh(labels.sizes[a])[0] for a in occ]
    eyes = [onehot(a, p, labels, term.like) for p, a in zip(private, occ)]
    carried = set(term.flabels) | {l for _, ls in eyes for l in ls}
    keep_inp = [l for l in labels.base(term.inp_atoms) if l in carried]
    factor = _einsum([(term.factor, term.flabels)] + eyes, private + keep_inp, labels)
    big = [n for n in shape if n != 1]
    factor = factor.reshape(tuple(big) + tuple(factor.shape[len(private) :]))
    out, fl = [], []
    for n in shape:
        atoms = labels.fresh(n)
        out.append(atoms)
        fl += atoms
    return Term(tuple(out), term.inp, factor, tuple(fl) + tuple(keep_inp))


def onehot(atom: int, private: int, labels: Labels, like: "torch.Tensor"):
    """``(tensor, labels)``: 1 where the fresh label ``private`` equals ``atom``'s value (an
    identity matrix for a base label, the table's one-hot for a derived one)."""
    import torch

    n = labels.sizes[atom]
    if atom not in labels.derived:
        labels.guard((n, n), like.element_size(), "an identity matrix")
        return labels.made(torch.eye(n, dtype=like.dtype, device=like.device)), (private, atom)
    table, over = labels.derived[atom]
    labels.guard((n,) + tuple(table.shape), like.element_size(), "a one-hot index map")
    hot = table.to(like.device).unsqueeze(0) == _arange(n, table).reshape((n,) + (1,) * table.dim())
    return labels.made(hot.to(like.dtype)), (private,) + tuple(over)


def _arange(n: int, like: "torch.Tensor") -> "torch.Tensor":
    import torch

    return torch.arange(n, dtype=torch.int64, device=like.device)


def _partition(term: Term, shape: Sequence[int], labels: Labels):
    """Cut the output atoms into the axes of ``shape``: ("ok", out), ("split", label, parts)
    when an atom straddles a boundary and can be cut there, or ("fail",)."""
    atoms = list(term.out_atoms)
    out: list[Atoms] = []
    for n in shape:
        got: list[int] = []
        need = int(n)
        while need > 1:
            if not atoms:
                return ("fail",)
            a = atoms[0]
            s = labels.sizes[a]
            if need % s == 0:
                got.append(atoms.pop(0))
                need //= s
            elif s % need == 0:
                return ("split", a, (need, s // need))
            else:
                return ("fail",)
        out.append(tuple(got))
    return ("ok", tuple(out)) if not atoms else ("fail",)


def _replace_run(seq: Sequence[int], run: Atoms, label: int) -> tuple[int, ...] | None:
    """``seq`` with every occurrence of ``run`` replaced by ``label``; None if a label of
    ``run`` also occurs outside a complete occurrence."""
    out, i = [], 0
    while i < len(seq):
        if tuple(seq[i : i + len(run)]) == run:
            out.append(label)
            i += len(run)
        elif seq[i] in run:
            return None
        else:
            out.append(seq[i])
            i += 1
    return tuple(out)


def merge_run(term: Term, run: Atoms, labels: Labels) -> Term | None:
    """Replace the consecutive labels ``run`` by one label wherever they occur (the output side
    becomes one pseudo-axis, to be re-cut by :func:`reshape`); None where some label of ``run``
    occurs apart from the others, which no single label can express."""
    if any(a in run or set(run) & set(labels.derived[a][1])
           for a in term.out_atoms + term.inp_atoms if a in labels.derived):
        return None  # an index map on (or over) these labels: no single label can say it
    label = labels.merged(run)
    out = _replace_run(term.out_atoms, run, label)
    inp = _replace_run(term.inp_atoms, run, label)
    if out is None or inp is None:
        return None
    factor, fl = term.factor, term.flabels
    if set(run) & set(fl):
        missing = [a for a in run if a not in fl]
        # expanded over the missing labels and permuted, the reshape below copies all of it
        labels.guard(tuple(factor.shape) + labels.shape(missing), factor.element_size())
        factor = factor.reshape(tuple(factor.shape) + (1,) * len(missing))
        factor = factor.expand(tuple(factor.shape[: len(fl)]) + labels.shape(missing))
        fl = fl + tuple(missing)
        rest = [i for i, l in enumerate(fl) if l not in run]
        order = rest + [fl.index(a) for a in run]
        factor = labels.made(factor.permute(order).reshape(
            tuple(factor.shape[i] for i in rest) + (labels.size(run),)
        ))
        fl = tuple(fl[i] for i in rest) + (label,)
    return Term((out,), (inp,), factor, fl)


def _regions(atoms: Sequence[int], shape: Sequence[int], labels: Labels) -> list[Atoms]:
    """Runs of atoms between the boundaries that the atoms and ``shape`` have in common, for
    the runs that hold several atoms and several dimensions (those a reshape may mix)."""
    dims = [n for n in shape if n != 1]
    ends = [math.prod(dims[: i + 1]) for i in range(len(dims))]  # where each new axis ends
    runs, current, start, product = [], [], 1, 1
    for a in atoms:
        current.append(a)
        product *= labels.sizes[a]
        if product in ends:
            n_dims = sum(1 for e in ends if start < e <= product)
            if len(current) > 1 and n_dims > 1:
                runs.append(tuple(current))
            current, start = [], product
    return runs


def reshape(term: Term, shape: Sequence[int], labels: Labels) -> Term:
    """A C-order reshape of the output side (view, flatten, squeeze, unsqueeze, ...).

    Axes are re-cut at atom boundaries, splitting an atom where a new boundary falls inside it
    and divides it; where it does not (``(5, 4) -> (2, 10)``), the atoms of that stretch are
    merged into one label first. Only when the merged labels also occur in another arrangement
    is the output side made dense (:func:`densify`)."""
    if math.prod(shape) == 0:  # an empty tensor: no entries, whatever the labels
        out = tuple(labels.fresh(n) for n in shape)
        return Term(out, term.inp, term.like.new_zeros(()), ())
    merged = False
    while True:
        result = _partition(term, shape, labels)
        if result[0] == "ok":
            return replace(term, out=result[1])
        if result[0] == "split":
            label, parts = result[1], result[2]
            term = split_label(term, label, labels.split(label, parts), labels)
            continue
        if not merged:
            merged = True
            for run in _regions(term.out_atoms, shape, labels):
                candidate = merge_run(term, run, labels)
                if candidate is None:
                    return densify(term, shape, labels)
                term = candidate
            continue
        return densify(term, shape, labels)


def permute(term: Term, perm: Sequence[int]) -> Term:
    return replace(term, out=tuple(term.out[p] for p in perm))


def expand(term: Term, shape: Sequence[int], fresh: dict[int, Atoms], labels: Labels) -> Term:
    """Broadcast the output side to ``shape``; a broadcast axis gets a label that only the
    output carries (``fresh`` memoises it per axis so that terms stay mergeable)."""
    lead = len(shape) - len(term.out)
    out = []
    for d, n in enumerate(shape):
        old = term.out[d - lead] if d >= lead else ()
        if labels.size(old) == n:
            out.append(old)
        else:
            if d not in fresh:
                fresh[d] = labels.fresh(n)
            out.append(fresh[d])
    return replace(term, out=tuple(out))


def _on_atoms(value: torch.Tensor, axes: Sequence[Atoms], labels: Labels):
    """``value`` (one axis per entry of ``axes``, size 1 where broadcast) reshaped to one axis
    per atom, and the labels of those axes; broadcast axes are dropped."""
    shape: list[int] = []
    ls: list[int] = []
    index: list = []
    for n, atoms in zip(value.shape, axes):
        if n == 1:
            index.append(0)
        else:
            index.append(slice(None))
            shape += labels.shape(atoms)
            ls += atoms
    return on_base(value[tuple(index)].reshape(shape), ls, labels)


def on_base(value: "torch.Tensor", atoms: Sequence[int], labels: Labels):
    """``value`` (one axis per atom) read at the base labels: each axis of a derived label is
    gathered through its table (an entry that does not exist reads index 0: its factor is zero).
    Returns the tensor and its labels (a label may repeat: einsum takes the diagonal)."""
    ls: list[int] = []
    for atom in atoms:
        if atom not in labels.derived:
            ls.append(atom)
            continue
        table, over = labels.derived[atom]
        k = len(ls)
        labels.guard(tuple(value.shape[:k]) + tuple(table.shape) + tuple(value.shape[k + 1 :]),
                     value.element_size(), "a gathered value")
        picked = labels.made(value.index_select(k, table.clamp(min=0).reshape(-1).to(value.device)))
        value = picked.reshape(tuple(value.shape[:k]) + tuple(table.shape)
                               + tuple(value.shape[k + 1 :]))
        ls.extend(over)
    return value, ls


def scale(term: Term, g: torch.Tensor, labels: Labels) -> Term:
    """Multiply by ``g`` (broadcastable to the output's shape) on the output's labels: the
    Jacobian of an elementwise operation composed with the term."""
    g = g.to(term.like.dtype)
    if g.dim() == 0 or g.numel() == 1:
        return multiply(term, g.reshape(()), labels)
    axes = term.out[len(term.out) - g.dim() :]
    gv, gl = _on_atoms(g, axes, labels)
    carried = set(term.flabels) | set(gl)
    fl = tuple(l for l in term.free(labels) if l in carried)
    if term.lazy is not None:  # g joins the chain (a relu between two linear layers)
        ops = _operands_of(term, set(gl) | set(fl))
        return Term(term.out, term.inp, _product(ops + [(gv, gl)], fl, labels), fl)
    if set(gl) <= set(term.flabels) and gv.numel() < term.factor.numel():
        # a pass over the factor, put off: the scales of the steps that follow (a layer
        # norm's, an activation's) join it and are multiplied together first, then applied
        # to the factor once (:func:`contract`)
        return Term(term.out, term.inp, Product([(term.factor, term.flabels), (gv, gl)], fl,
                                                labels), fl)
    factor = _einsum([(term.factor, term.flabels), (gv, gl)], fl, labels)
    if term.factor.numel() + g.numel() < factor.numel():
        # the product spreads a smaller factor (a weight shared by a batch): remember its
        # parts, so that the second order can fold ``g`` into a step's weight and contract
        # the unscaled term (:func:`unscaled`); kept only while the product lives
        key = id(factor)
        labels.scaled[key] = (weakref.ref(factor, WeakCall(labels, "_unscaled", key)), term,
                              g.detach())
    return Term(term.out, term.inp, factor, fl)


def unscaled(term: Term, labels: Labels):
    """``(base, g)`` where ``term`` is :func:`scale` of ``base`` by ``g`` (on its output's
    trailing axes) with its axes unchanged since; else ``(term, None)``."""
    if term.lazy is not None:
        return term, None
    entry = labels.scaled.get(id(term.factor))
    if entry is None or entry[0]() is not term.factor:
        return term, None
    base, g = entry[1], entry[2]
    if base.out != term.out or base.inp != term.inp:
        return term, None
    return base, g


def multiply(term: Term, c: "float | torch.Tensor", labels: Labels) -> Term:
    """The term times a scalar ``c`` (a new factor of the same shape)."""
    import torch

    lazy = term.lazy
    # an unformed product takes ``c`` as one more operand (reading its factor would form it);
    # a formed factor puts the pass off like a scale (:func:`scale`)
    if lazy is not None or isinstance(c, torch.Tensor) or term.factor.numel() > 1:
        c = torch.as_tensor(c, dtype=term.like.dtype, device=term.like.device).reshape(())
        ops = list(lazy.operands) if lazy is not None else [(term.factor, term.flabels)]
        return replace(term, stored=Product(ops + [(c, ())], term.flabels, labels))
    labels.guard(tuple(term.factor.shape), term.factor.element_size())
    return replace(term, stored=labels.made(term.factor * c))


def _bind(term: Term, letters: Sequence[int], labels: Labels):
    """Map the einsum labels of operand ``letters`` to the term's output atoms, identifying
    atoms that a repeated letter puts on the same diagonal."""
    for _ in range(2):
        amap: dict[int, Atoms] = {}
        for d, e in enumerate(letters):
            atoms = term.out[d]
            if e not in amap:
                amap[e] = atoms
                continue
            if labels.shape(amap[e]) != labels.shape(atoms) or any(
                x in labels.derived for x in amap[e] + atoms if x not in amap[e] or x not in atoms
            ):
                break
            a, b = list(amap[e]), list(atoms)
            while a != b:
                i = next(i for i in range(len(a)) if a[i] != b[i])
                old, new = b[i], a[i]
                term = _substitute(term, old, new, labels)
                a = [new if x == old else x for x in a]
                b = [new if x == old else x for x in b]
                amap = {k: tuple(new if x == old else x for x in v) for k, v in amap.items()}
        else:
            return term, amap
        # A diagonal across atoms of different granularity: make each axis one atom first.
        term = densify(term, [labels.size(axis) for axis in term.out], labels)
    raise AssertionError("unreachable: after densify every axis is one atom")


def compose(
    term: Term,
    inputs: Sequence[Sequence[int]],
    output: Sequence[int],
    sizes: Sequence[int],
    k: int,
    values: Sequence[torch.Tensor | None],
    labels: Labels,
    fresh: dict[int, Atoms] | None = None,
) -> Term:
    """The term of ``einsum(inputs -> output)(values)`` with operand ``k`` replaced by the
    tensor ``term`` describes (einsum labels are integers, ``sizes`` indexed by them).

    The chain rule in closed form: operand ``k``'s letters take the term's output atoms, the
    other letters fresh labels (memoised in ``fresh``), and the new factor is one einsum of the old
    factor with the other operands' values, summing what neither the new output nor the argument
    carries. A summed label that no factor carries contributes its size."""
    fresh = {} if fresh is None else fresh
    term, amap = _bind(term, inputs[k], labels)
    for e, n in enumerate(sizes):
        if e not in amap:
            if e not in fresh:
                fresh[e] = labels.fresh(n)
            amap[e] = fresh[e]
    ops = []
    for j, value in enumerate(values):
        if j == k:
            continue
        value = value.to(term.like.dtype)
        shape = [s for e in inputs[j] for s in labels.shape(amap[e])]
        ops.append(on_base(value.reshape(shape), [a for e in inputs[j] for a in amap[e]], labels))
    out = tuple(amap[e] for e in output)
    free = labels.base([a for axis in out for a in axis] + list(term.inp_atoms))
    new_labels = {l for _, ls in ops for l in ls} | set(free)
    ops = _operands_of(term, new_labels) + ops
    carried = {l for _, ls in ops for l in ls}
    fl = tuple(l for l in free if l in carried)
    factor = _product(ops, fl, labels)
    term = Term(out, term.inp, factor, fl)
    uncarried = set(labels.base([a for e in inputs[k] for a in amap[e]])) - set(free) - carried
    if uncarried:
        term = multiply(term, labels.size(sorted(uncarried)), labels)
    return term


def aligned(term: Term, union: Sequence[int]) -> torch.Tensor:
    """The factor with its axes in ``union`` order, size 1 for labels it does not carry."""
    return align(term.factor, term.flabels, union)


def _signature(term: Term, labels: Labels) -> tuple:
    """The term's axes up to a renaming of labels: equal signatures, equal patterns."""
    if term.mapped(labels):  # tables name their labels: only identical terms merge
        return (term.out, term.inp)
    order = term.free(labels)
    ids = {l: i for i, l in enumerate(order)}
    return (
        tuple(tuple(ids[a] for a in axis) for axis in term.out),
        tuple(ids[a] for a in term.inp_atoms),
        labels.shape(order),
    )


def merge(terms: Sequence[Term], labels: Labels) -> list[Term]:
    """Add terms whose axes agree up to a renaming of labels into one: the paths through
    queries, keys and values of attention end in one term, and materialising writes each
    pattern once. The factors broadcast over the union of their labels, inside ``V``."""
    import torch

    groups: dict[tuple, list[Term]] = {}
    for t in terms:
        groups.setdefault(_signature(t, labels), []).append(t)
    merged = []
    for group in groups.values():
        first = group[0]
        if len(group) == 1:
            merged.append(first)
            continue
        free = first.free(labels)
        # each summand as (factor, scale) over ``union``: a product of one large factor and
        # small scales (a layer norm's, an activation's) is not formed but multiplied into
        # the sum as it is added (one pass over the factor instead of three)
        parts, present = [], set()
        for t in group:
            rename = dict(zip(t.free(labels), free))
            scaled = _scaled(t, labels)
            if scaled is None:
                scaled = ((t.factor, t.flabels), None)
            (f, fl), g = scaled
            parts.append(((f, tuple(rename[l] for l in fl)),
                          None if g is None else (g[0], tuple(rename[l] for l in g[1]))))
            present |= {rename[l] for l in t.flabels}
        union = tuple(l for l in free if l in present)
        views = [(align(f, fl, union), None if g is None else align(g[0], g[1], union))
                 for (f, fl), g in parts]
        shape = np.broadcast_shapes(*(tuple(v.shape) for pair in views for v in pair
                                      if v is not None))  # (torch's broadcast imports sympy)
        dtype = functools.reduce(torch.promote_types, (v.dtype for pair in views for v in pair
                                                        if v is not None))
        labels.guard(shape, dtype.itemsize)
        total = labels.made(torch.empty(shape, dtype=dtype, device=views[0][0].device))
        for k, (f, g) in enumerate(views):
            if k == 0:
                if g is not None and np.broadcast_shapes(tuple(f.shape), tuple(g.shape)) == shape:
                    torch.mul(f, g, out=total)
                else:  # (broadcast into the sum's shape first: ``out=`` would resize it)
                    total.copy_(f)
                    if g is not None:
                        total.mul_(g)
            elif g is not None:
                total.addcmul_(f, g)
            else:
                total.add_(f)
        merged.append(Term(first.out, first.inp, total, union))
    return merged


def _scaled(term: Term, labels: Labels):
    """``((factor, labels), (scale, labels))`` where the term is an unformed product of one
    large factor and scales over some of its labels (at most half its entries in all), the
    scales multiplied together; else None."""
    lazy = term.lazy
    if lazy is None or len(lazy.operands) < 2:
        return None
    ops = lazy.operands
    big = max(range(len(ops)), key=lambda i: ops[i][0].numel())
    f, fl = ops[big]
    rest = [op for i, op in enumerate(ops) if i != big]
    if set(fl) != set(lazy.out) or any(not set(ls) <= set(fl) for _, ls in rest):
        return None
    if 2 * sum(t.numel() for t, _ in rest) > f.numel():
        return None
    gl = tuple(l for l in fl if any(l in ls for _, ls in rest))
    return (f, fl), (contract(rest, gl, labels) if len(rest) > 1 or rest[0][1] != gl
                     else rest[0][0], gl)


def coordinates_into(term: Term, labels: Labels, rows: np.ndarray,
                      cols: np.ndarray) -> np.ndarray | None:
    """Write each entry's row and column (flat over ``V`` in C order, as :func:`placed`) into
    ``rows`` and ``cols`` (one per entry, an integer dtype wide enough for the block), in
    place: one broadcast multiply-add of each atom's index table; returns the flags of the
    entries an index map gives a place (-1: none), or None where every entry has one."""
    free = term.free(labels)
    shape = labels.shape(free)
    bad = None
    for axes, out in ((term.out, rows), (term.inp, cols)):
        grid = out.reshape(shape)
        grid[...] = 0
        for atom, index, dropped in atom_indices(axes, labels, free, out.dtype):
            if dropped is not None:
                bad = dropped if bad is None else (bad | dropped)
            grid *= labels.sizes[atom]
            grid += index  # int64 tables into narrower coordinates: same kind, in range
    return None if bad is None else ~np.broadcast_to(bad, shape).reshape(-1)


def atom_indices(axes, labels: Labels, free: Sequence[int], dtype):
    """For each atom of ``axes`` in order: the atom, its index over ``free`` (broadcastable:
    an index map's int64 table read in place, else a ramp of ``dtype``), and where the map
    gives no place (-1; None where it always gives one)."""
    for atom in (a for ax in axes for a in ax):
        if atom in labels.derived:
            table, over = labels.derived[atom]
            index = align(table, over, free).cpu().numpy()
            yield atom, index, (index < 0) if index.min(initial=0) < 0 else None
        else:
            n = labels.sizes[atom]
            yield atom, np.arange(n, dtype=dtype).reshape([n if l == atom else 1
                                                          for l in free]), None


def one_to_one(atom: int, labels: Labels) -> bool:
    """Whether a derived label is an injective map of one base label (its entries that exist
    are distinct), so that the base label can be read back from it."""
    if atom not in labels._one_to_one:
        table, over = labels.derived[atom]
        ok = len(over) == 1
        if ok:
            t = table.cpu().numpy()
            valid = t[t >= 0] if t.min(initial=0) < 0 else t
            # slices and shifts are increasing: no count needed
            ok = bool((valid[1:] > valid[:-1]).all()) or (
                not valid.size or int(np.bincount(valid, minlength=labels.sizes[atom]).max()) <= 1)
        labels._one_to_one[atom] = ok
    return labels._one_to_one[atom]


def placed_numpy(term: Term, labels: Labels):
    """``(rows, cols, keep)`` as :func:`placed`, in numpy and with fewer temporaries: an
    axis of one atom over ``V`` in order is its table itself (a view); ``keep`` is None where
    every entry has a place."""
    free = term.free(labels)
    shape = labels.shape(free)

    def side(axes):
        flat, bad = None, None
        for atom, v, dropped in atom_indices(axes, labels, free, np.int64):
            if dropped is not None:
                bad = dropped if bad is None else (bad | dropped)
            flat = v if flat is None else flat * labels.sizes[atom] + v
        if flat is None:  # no atoms: a single row or column
            flat = np.zeros((1,) * len(free), dtype=np.int64)
        return np.broadcast_to(flat, shape).reshape(-1), bad

    rows, bad_r = side(term.out)
    cols, bad_c = side(term.inp)
    bad = bad_r if bad_c is None else (bad_c if bad_r is None else bad_r | bad_c)
    keep = None if bad is None else ~np.broadcast_to(bad, shape).reshape(-1)
    return rows, cols, keep


# --- index maps: selections, shifts, windows ------------------------------------------------


def align(tensor: "torch.Tensor", ls: Sequence[int], target: Sequence[int],
           labels: Labels | None = None) -> "torch.Tensor":
    """``tensor`` (one axis per distinct label of ``ls``) permuted and unsqueezed to ``target``;
    given ``labels``, a copy the reshape must make (a permuted diagonal) is guarded."""
    order = [ls.index(l) for l in target if l in ls]
    t = tensor.permute(order) if order else tensor
    return _reshaped(t, [tensor.shape[ls.index(l)] if l in ls else 1 for l in target], labels)


def _reshaped(t: "torch.Tensor", shape: Sequence[int], labels: Labels | None,
              what: str = "a factor laid out") -> "torch.Tensor":
    """``t.reshape(shape)``: a view where the strides allow; else, given ``labels``, a copy
    guarded before it is made and counted while it lives."""
    if labels is None:
        return t.reshape(shape)
    try:
        return t.view(shape)
    except RuntimeError:
        labels.guard(tuple(t.shape), t.element_size(), what)
        return labels.made(t.reshape(shape))


def _diagonal(tensor: "torch.Tensor", ls: Sequence[int]) -> tuple["torch.Tensor", tuple[int, ...]]:
    """Take the diagonal of every repeated label (any dtype: integer tables too)."""
    ls = list(ls)
    while len(set(ls)) < len(ls):
        seen: dict[int, int] = {}
        for j, l in enumerate(ls):
            if l in seen:
                i = seen[l]
                tensor = tensor.diagonal(dim1=i, dim2=j)  # the diagonal goes last
                ls = [x for k, x in enumerate(ls) if k not in (i, j)] + [l]
                break
            seen[l] = j
    return tensor, tuple(ls)


def coordinate(atoms: Sequence[int], labels: Labels, like: "torch.Tensor"):
    """``(index, over)``: an axis' coordinate (mixed radix of its atoms) as an int64 tensor
    over the base labels ``over``, -1 where an atom's map has no entry."""
    import torch

    over = labels.base(atoms)
    total = torch.zeros((1,) * len(over), dtype=torch.int64, device=like.device)
    bad = torch.zeros((1,) * len(over), dtype=torch.bool, device=like.device)
    for a in atoms:
        if a in labels.derived:
            table, tl = labels.derived[a]
            v = align(table.to(like.device), tl, over)
            bad = bad | (v < 0)
        else:
            v = align(_arange(labels.sizes[a], like), (a,), over)
        total = total * labels.sizes[a] + v
    return total.masked_fill(bad, -1), over


def mask(term: Term, valid: "torch.Tensor", over: Sequence[int], labels: Labels) -> Term:
    """Zero the factor where ``valid`` (a boolean tensor over base labels ``over``) is false:
    entries an index map drops must not add into sums over their axis."""
    if bool(valid.all()):
        return term
    keep = [d for d in range(valid.dim()) if valid.shape[d] > 1 and bool(
        (valid != valid.narrow(d, 0, 1)).any())]
    valid = valid[tuple(slice(None) if d in keep else 0 for d in range(valid.dim()))]
    over = tuple(over[d] for d in keep)  # only the labels the condition depends on
    carried = set(term.flabels) | set(over)
    fl = tuple(l for l in term.free(labels) if l in carried)
    factor = _einsum([(term.factor, term.flabels), (valid.to(term.factor.dtype), over)], fl, labels)
    return Term(term.out, term.inp, factor, fl)


def _substitute_maps(term: Term, subs: dict[int, "torch.Tensor"], over: Atoms, labels: Labels):
    """Re-parametrise: each base label ``a`` of ``subs`` becomes a function of the new base
    labels ``over`` (``subs[a]``, a table over ``over``, -1 for no entry) everywhere it occurs:
    in atoms, in other index maps' tables (composed), and in the factor (gathered)."""

    def regather(tensor, ls):
        """``tensor`` over ``ls`` with each substituted label's axis read through its table:
        all of them in one advanced index over ``over`` (read one by one, each would add the
        whole of ``over``'s shape before the diagonal: a product of them at the peak)."""
        ls = list(ls)
        hit = [a for a in subs if a in ls]
        if not hit:
            return tensor, ls, None
        ks = [ls.index(a) for a in hit]
        rest = [i for i in range(len(ls)) if i not in ks]
        shape = labels.shape(over)
        # one flat row index over the substituted axes and a row gather (index_select) of the
        # tensor laid out (hit, rest): contiguous rows, several times faster than an advanced
        # index of one table per axis; the layout is a copy of the (smaller) gathered tensor.
        # The layout is made first and counted, so that the gather's guard sees it alive.
        import torch

        rest_shape = tuple(tensor.shape[i] for i in rest)
        rows = tensor.permute(ks + rest)
        if not rows.is_contiguous():
            labels.guard(tuple(rows.shape), tensor.element_size(), "a factor laid out to gather")
            rows = labels.made(rows.contiguous())
        rows = rows.reshape(math.prod(tensor.shape[k] for k in ks), math.prod(rest_shape))
        labels.guard((2,) + tuple(shape), 8, "a gather's index")
        flat = torch.zeros((), dtype=torch.int64, device=tensor.device)
        for a, k in zip(hit, ks):
            flat = flat * tensor.shape[k] + subs[a].clamp(min=0).reshape(shape).to(tensor.device)
        flat = labels.made(flat.expand(shape).reshape(-1))
        labels.guard(tuple(shape) + rest_shape, tensor.element_size(), "a gathered factor")
        tensor = labels.made(rows.index_select(0, flat))
        del flat
        tensor = tensor.reshape(tuple(shape) + rest_shape)
        del rows
        ls = list(over) + [ls[i] for i in rest]
        bad = subs[hit[0]] < 0
        for a in hit[1:]:
            bad = bad | (subs[a] < 0)
        tensor, ls = _diagonal(tensor, ls)
        return tensor, ls, bad

    new: dict[int, int] = {}
    for a, digit in subs.items():
        new[a] = labels.derive(digit, over, labels.sizes[a])
    for a in set(term.out_atoms + term.inp_atoms):
        if a in labels.derived and a not in new:
            table, tl = labels.derived[a]
            if set(tl) & set(subs):
                t, ls, bad = regather(table, tl)
                if bad is not None:
                    t = t.masked_fill(align(bad, over, ls), -1)
                new[a] = labels.derive(t, ls, labels.sizes[a])
    sub = lambda atoms: tuple(new.get(x, x) for x in atoms)  # noqa: E731
    factor, fl = term.factor, term.flabels
    if set(fl) & set(subs):
        factor, fl, _ = regather(factor, fl)
        # ``over`` too: the caller puts the new labels on the selected axis
        free = distinct(labels.base(sub(term.out_atoms) + sub(term.inp_atoms)) + tuple(over))
        order = tuple(l for l in free if l in fl)
        # a label the substitution left on no axis (a map made constant in it) is summed over,
        # as compose sums what no axis carries: its entries all land on one place
        factor = (align(factor, fl, order, labels) if set(fl) <= set(order)
                  else _einsum([(factor, fl)], order, labels))
        fl = order
    return Term(tuple(sub(a) for a in term.out), tuple(sub(a) for a in term.inp), factor, fl)


def resolve(term: Term, axis: int, labels: Labels) -> Term:
    """Make out axis ``axis`` one fresh base label, tied to its old coordinate by a one-hot
    factor (the fallback where an axis made of index maps is selected from again)."""
    atoms = term.out[axis]
    n = labels.size(atoms)
    (p,) = labels.fresh(n)
    index, over = coordinate(atoms, labels, term.like)
    hot = (index.unsqueeze(0) == _arange(n, index).reshape((n,) + (1,) * index.dim()))
    out = term.out[:axis] + ((p,),) + term.out[axis + 1 :]
    free = labels.base([a for ax in out for a in ax] + list(term.inp_atoms))
    carried = set(term.flabels) | {p} | set(over)
    fl = tuple(l for l in free if l in carried)
    labels.guard((n,) + tuple(index.shape), term.factor.element_size(), "a one-hot index map")
    factor = _einsum([(term.factor, term.flabels), (hot.to(term.factor.dtype), (p,) + over)],
                     fl, labels)
    return Term(out, term.inp, factor, fl)


def invert(atom: int, labels: Labels) -> tuple[int, "torch.Tensor"]:
    """For a derived label that is :func:`one_to_one`: ``(label, inverse)``, its base label
    and ``inverse[value]``, the base label's value where the map takes ``value`` (-1: none)."""
    import torch

    table, over = labels.derived[atom]
    valid = table >= 0
    inverse = torch.full((labels.sizes[atom],), -1, dtype=torch.int64, device=table.device)
    inverse[table[valid]] = torch.arange(table.numel(), device=table.device)[valid]
    return over[0], inverse


def base_axis(term: Term, axis: int, labels: Labels) -> Term:
    """Tie each atom of out axis ``axis`` that :func:`gather` cannot re-parametrise (a repeated
    label, a map of several labels or a non-injective one) to a fresh label by a one-hot factor
    over that atom alone."""
    for pos in range(len(term.out[axis])):
        atoms = term.out[axis]
        a = atoms[pos]
        if a not in atoms[:pos] and (a not in labels.derived or one_to_one(a, labels)):
            continue
        (p,) = labels.fresh(labels.sizes[a])
        hot, hl = onehot(a, p, labels, term.factor)
        new_axis = atoms[:pos] + (p,) + atoms[pos + 1 :]
        out = term.out[:axis] + (new_axis,) + term.out[axis + 1 :]
        free = labels.base([x for ax in out for x in ax] + list(term.inp_atoms))
        carried = set(term.flabels) | set(hl)
        fl = tuple(l for l in free if l in carried)
        factor = _einsum([(term.factor, term.flabels), (hot, hl)], fl, labels)
        term = Term(out, term.inp, factor, fl)
    return term


def gather(term: Term, axis: int, index: "torch.Tensor", labels: Labels) -> Term:
    """Select along out axis ``axis``: it is replaced by axes of ``index.shape``, entry ``n``
    being the old entry ``index[n]`` (-1: none, as in padding). An index map, not a factor:
    the axis' labels become functions of the new ones (:func:`_substitute_maps`); an atom that
    is itself an injective map of a label re-parametrises that label through its inverse."""
    term = base_axis(term, axis, labels)
    atoms = term.out[axis]
    new_axes = tuple(labels.fresh(n) for n in index.shape)
    over = tuple(a for ax in new_axes for a in ax)
    table = index.long().reshape(labels.shape(over))
    valid = table >= 0
    every = bool(valid.all())
    subs, stride = {}, labels.size(atoms)
    for i, a in enumerate(atoms):
        n = labels.sizes[a]
        stride //= n
        # (integer division is slow at a million entries: skipped where it is the identity,
        # the first digit needing no modulo as the table is below the axis' size)
        digit = table if stride == 1 else table // stride
        if i:
            digit = digit % n
        if not every:
            digit = digit.masked_fill(~valid, -1)
        if a in labels.derived:
            a, inverse = invert(a, labels)
            digit = inverse[digit.clamp(min=0)].masked_fill(digit < 0, -1)
        if a in subs:
            # two digits name the same label (a padded axis reshaped: the column is a map of
            # the row): an entry exists only where they agree
            digit = digit.masked_fill(digit != subs[a], -1)
        valid = valid & (digit >= 0)
        subs[a] = digit
    subs = _separate(subs, valid)
    old = term.factor
    term = _substitute_maps(term, subs, over, labels)
    term = replace(term, out=term.out[:axis] + new_axes + term.out[axis + 1 :])
    if term.factor is not old and set(over) <= set(term.flabels):
        # the factor was just gathered over the new labels (a tensor of its own): the entries
        # that do not exist are zeroed in place, not by a product that copies it
        term.factor.masked_fill_(~align(valid, over, term.flabels), 0)
        return term
    return mask(term, valid, over, labels)  # with the new axes in place: they are kept


def _depends(t: "torch.Tensor", valid: "torch.Tensor") -> list[int]:
    """The dims along which ``t`` varies among its ``valid`` entries."""
    import torch

    # the valid entries' highest value and highest negated value along each dim: it varies
    # where their sum is positive (a slice with no valid entry sums to about -2**62). amax of
    # both, as int64 amin is many times slower than amax on CPU; the filled copies are made
    # once, not per dim (the tables are as large as a window's)
    none = -(1 << 61)
    hi = t.masked_fill(~valid, none)
    neg = t.neg().masked_fill_(~valid, none)
    return [d for d in range(t.dim())
            if t.shape[d] > 1 and bool((hi.amax(d) + neg.amax(d) > 0).any())]


def _project(t: "torch.Tensor", valid: "torch.Tensor", keep: Sequence[int]) -> "torch.Tensor":
    """``t`` read only along ``keep`` (its value among the valid entries of each slice, -1
    where a slice has none), broadcast back to its shape."""
    dims = [d for d in range(t.dim()) if d not in keep and t.shape[d] > 1]
    if not dims:
        return t.masked_fill(~valid, -1)
    return t.masked_fill(~valid, -1).amax(dims, keepdim=True).expand(t.shape)


def _separate(subs: dict, valid: "torch.Tensor") -> dict:
    """Digit tables that depend on as few labels as the selection allows. Each digit is read
    where the entry exists; where it does not (padding), the marks -1 go only on the digits
    whose labels say so (a window's spatial digit), not on every digit: a batch digit marked
    by a spatial condition would depend on the spatial labels and stop being a delta."""
    if bool(valid.all()):
        return subs
    out = {}
    for a, d in subs.items():
        p = _project(d, valid, _depends(d, valid))
        # each dim alone may look constant where the valid entries lie apart (a stride's
        # holes): keep the projection only if it reads every valid entry right
        out[a] = p if bool(((p == d) | ~valid).all()) else d.masked_fill(~valid, -1)

    def covered():
        ok = valid.new_ones(valid.shape)
        for d in out.values():
            ok = ok & (d >= 0)
        return bool((ok == valid).all())

    if covered():
        return out
    keeps = {a: _depends(d, valid) for a, d in out.items()}
    for a, d in out.items():  # separable validity: each digit takes its own part
        other = [k for k in range(valid.dim()) if k not in keeps[a]]
        part = valid.any(other, keepdim=True) if other else valid
        out[a] = d.masked_fill(~part.expand(valid.shape), -1)
    if covered():
        return out
    a = next(iter(out))  # otherwise the first digit carries the whole condition
    out[a] = out[a].masked_fill(~valid, -1)
    return out


def remap(term: Term, axes: Sequence[int], table: "torch.Tensor", size: int,
          labels: Labels) -> Term:
    """Send out axes ``axes`` (consecutive) to one new axis of ``size``: the entry at their
    index ``i`` goes to ``table[i]`` (-1: dropped). Placements (``cat``, padding, transposed
    convolution) are index maps of this kind; several entries may land on one place (summed)."""
    import torch

    atoms = [a for d in axes for a in term.out[d]]
    index, over = coordinate(atoms, labels, term.like)
    flat = table.reshape(-1).to(index.device)
    value = flat[index.clamp(min=0)].masked_fill(index < 0, -1)
    valid = value >= 0
    if size == 1:
        new_axis: Atoms = ()
    else:
        new_axis = (labels.derive(value, over, size),) if over else (labels.derive(value.reshape(()), (), size),)
    term = mask(term, valid, over, labels)
    first = axes[0]
    out = term.out[:first] + (new_axis,) + term.out[axes[-1] + 1 :]
    return replace(term, out=out)


@dataclass(frozen=True)
class _Collapse:
    """How one group of input-side index maps collapses (:func:`collapse`): the labels
    ``summed`` and ``kept`` they are over, the new map of each old one (over ``kept`` and the
    window labels ``windows``, one per map, none where a map's window has one entry), and
    ``target``: for each ``(kept, summed)`` assignment flat, the flat ``(kept, windows)`` entry
    it lands on (one past the last, ``span`` times the kept size, where it has none)."""

    summed: tuple[int, ...]
    kept: tuple[int, ...]
    windows: tuple[int, ...]
    span: int  # the windows' size
    new: dict[int, int]
    target: "torch.Tensor"


def _collapse_group(maps: Sequence[int], summed: Sequence[int], labels: Labels) -> _Collapse | None:
    """The collapse of the input-side maps ``maps`` over the labels ``summed`` (which no other
    atom carries), or None where no two assignments of ``summed`` land on one place (nothing
    to gain). Memoised on ``labels``: it depends on the maps alone, not on any factor."""
    import torch

    key = (tuple(maps), tuple(summed))
    if key in labels._collapses:
        return labels._collapses[key]
    kept = distinct([l for a in maps for l in labels.derived[a][1] if l not in summed])
    dom = tuple(kept) + tuple(summed)
    shape = labels.shape(dom)
    nk = labels.size(kept)
    # the maps' tables over (kept, summed), their bounds and where each entry lands: int64
    labels.guard((len(maps) + 4, math.prod(shape)), 8, "a collapse's index tables")
    tables = []
    for a in maps:
        table, over = labels.derived[a]
        tables.append(align(table, over, dom).expand(shape).reshape(nk, -1))
    valid = tables[0] >= 0
    for t in tables[1:]:
        valid = valid & (t >= 0)
    # each map's lowest and highest place per kept assignment, over the entries that exist
    hi_int = torch.iinfo(torch.int64).max
    flat = torch.zeros(tables[0].shape, dtype=torch.int64, device=tables[0].device)
    los, spans = [], []
    for t in tables:
        lo = t.masked_fill(~valid, hi_int).amin(1, keepdim=True)
        lo = lo.masked_fill(lo == hi_int, 0)  # a kept assignment with no entry: any base
        hi = t.masked_fill(~valid, -1).amax(1, keepdim=True)
        span = max(int((hi - lo + 1).max()), 1)
        flat = flat * span + (t - lo)
        los.append(lo.reshape(-1))
        spans.append(span)
    span = math.prod(spans)
    if span >= labels.size(summed):
        labels._collapses[key] = None
        return None
    # where each entry lands, flat over (kept, windows); entries that do not exist: one past
    slots = nk * span
    target = (_arange(nk, flat)[:, None] * span + flat).masked_fill(~valid, slots).reshape(-1)
    hit = torch.zeros(slots + 1, dtype=torch.bool, device=flat.device)
    hit[target] = True
    missed = ~hit[:slots].reshape(nk, span)
    # one window label per map, so that a window that is the whole input axis is that axis
    windows = tuple(w for n in spans for w in labels.fresh(n))
    over = tuple(kept) + windows
    new, stride = {}, span
    r = _arange(span, flat)[None, :]
    for i, (a, lo, n) in enumerate(zip(maps, los, spans)):
        stride //= n
        table = lo[:, None] + (r // stride) % n
        if i == 0:  # a window entry that no entry reaches does not exist: on one map is enough
            table = table.masked_fill(missed, -1)
        new[a] = labels.derive(table.reshape(labels.shape(over)), over, labels.sizes[a])
    result = _Collapse(tuple(summed), tuple(kept), windows, span, new, target)
    labels._collapses[key] = result
    return result


def _collapse_groups(term: Term, labels: Labels) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(maps, summed)``: the term's input-side index maps grouped by the labels they are over
    that no other atom carries (the labels a sum left only in the maps and the factor), maps
    that share such a label in one group."""
    maps = distinct([a for a in term.inp_atoms if a in labels.derived])
    kept = set(labels.base(term.out_atoms)) | {a for a in term.inp_atoms if a not in labels.derived}
    groups: list[tuple[list[int], set[int]]] = []
    for a in maps:
        own = set(labels.derived[a][1]) - kept
        if not own:
            continue
        joined = [g for g in groups if g[1] & own]
        group = ([x for g in joined for x in g[0]] + [a], own.union(*(g[1] for g in joined)))
        groups = [g for g in groups if not g[1] & own] + [group]
    order = labels.base(term.inp_atoms)
    return [(tuple(ms), tuple(l for l in order if l in ls)) for ms, ls in groups]


def collapse(term: Term, labels: Labels) -> Term:
    """The term with the entries that land on the same place summed.

    A sum over a convolution's kernel offsets, a pooling's window or a linear layer's cells
    leaves labels that only the input side's index maps (and the factor) carry: the term then
    enumerates every combination of them, and combinations that reach the same input entry
    are only added by the final write (a CNN's offsets through two convolutions and poolings:
    a factor hundreds of times the Jacobian). Each group of such maps (maps that share one of
    these labels) is re-expressed over a *window* label per map instead, the offset from the
    lowest input entry the other labels (``kept``) reach, with the factor scatter-added onto
    it; where nothing is kept, the window is the input axis itself (a plain label). Entries
    that do not exist (padding, -1) stay dropped, and window entries that nothing reaches are
    -1 too, so the stored entries are unchanged: the union of the places the old entries
    reach. Applied only where it enumerates fewer entries (decided from the maps, before
    anything is allocated)."""
    import torch

    plans = [p for p in (_collapse_group(maps, summed, labels)
                         for maps, summed in _collapse_groups(term, labels)) if p is not None]
    while plans:
        # groups over disjoint kept labels (a CNN's rows and columns) in one scatter: the factor
        # is laid out (a copy) and added once
        batch: list[_Collapse] = []
        for p in list(plans):
            if not any(set(p.kept) & set(q.kept) for q in batch):
                batch.append(p)
                plans.remove(p)
        factor, fl = term.factor, term.flabels
        done = tuple(l for p in batch for l in p.kept + p.summed)
        # the other labels in the factor's memory order (outermost first): the copy below
        # then reads runs of contiguous memory
        rest = tuple(sorted((l for l in fl if l not in done),
                            key=lambda l: -factor.stride(fl.index(l))))
        lead = labels.shape(rest)
        ins = [labels.size(p.kept + p.summed) for p in batch]
        outs = [labels.size(p.kept) * p.span for p in batch]
        # the factor laid out as (kept, summed, ...) per group, then ``rest``: one row of
        # ``rest`` per entry, added onto the row of (kept, windows, ...) it lands on; beside
        # them its index (int64 targets and boolean drops, with their temporaries): one guard
        # for all that is alive at once
        index = math.prod(ins) * 16
        rows = (math.prod(ins) + math.prod(outs) + 1) * math.prod(lead) * factor.element_size()
        labels.guard((index + rows,), 1,
                     "a factor to collapse, its collapse and the collapse's index")
        target = torch.zeros((), dtype=torch.int64, device=factor.device)
        dropped = torch.zeros((), dtype=torch.bool, device=factor.device)
        for p, n_out in zip(batch, outs):
            t = p.target.to(factor.device)
            target = (target.unsqueeze(-1) * n_out + t.clamp(max=n_out - 1)).reshape(-1)
            dropped = (dropped.unsqueeze(-1) | (t == n_out)).reshape(-1)
        slots = math.prod(outs)
        target = target.masked_fill(dropped, slots)
        source = align(factor, fl, done + rest).expand(labels.shape(done) + lead)
        source = source.reshape(math.prod(ins), math.prod(lead))
        total = factor.new_zeros((slots + 1, math.prod(lead)))
        total.index_add_(0, target, source)
        del source
        fl = tuple(l for p in batch for l in p.kept + p.windows) + rest
        factor = total[:slots].reshape(labels.shape(fl))  # contiguous: a view
        new = {a: b for p in batch for a, b in p.new.items()}
        sub = lambda atoms: tuple(new.get(x, x) for x in atoms)  # noqa: E731
        term = Term(term.out, tuple(sub(a) for a in term.inp), factor, fl)
    return term


def torch_equal(a: "torch.Tensor", b: "torch.Tensor") -> bool:
    import torch

    return a.device == b.device and torch.equal(a, b)


def placed(term: Term, labels: Labels):
    """``(rows, cols, keep)``: each entry's row and column, flat over ``V`` (int64 tensors on
    the CPU, :func:`coordinates_into`), and whether it has a place (an index map may drop it)."""
    import torch

    shape = labels.shape(term.free(labels))
    labels.guard((3,) + tuple(shape), 8, "the entries of an index-mapped term")
    m = math.prod(shape)
    rows, cols = np.empty(m, np.int64), np.empty(m, np.int64)
    keep = coordinates_into(term, labels, rows, cols)
    keep = np.ones(m, dtype=bool) if keep is None else keep
    return torch.from_numpy(rows), torch.from_numpy(cols), torch.from_numpy(keep)


def values(term: Term, labels: Labels, dtype: "torch.dtype", keep=None):
    """The term's values flat over ``V``, in :func:`placed`'s order (``keep``: those kept)."""
    free = term.free(labels)
    flat = align(term.factor.to(dtype), term.flabels, free).expand(labels.shape(free))
    flat = flat.reshape(-1)
    return flat if keep is None else flat[keep]
