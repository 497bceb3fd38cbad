"""Dense factors over integer labels: ``torch.einsum`` over any labels, guarded before it
allocates (:func:`einsum`); the pairwise product laid out for the writer (:func:`matmul_pair`);
products of several factors contracted in a greedy order (:func:`contract`, the order from
:func:`sparsejac.paths.greedy`) or kept unformed until read (:class:`Product`); and the one
permutation helper (:func:`align`).

Factors are tensors with a label per axis (docs/how-it-works.md, "## 2. Programs": "Products are
formed when read"). This module knows no term and no index map: of
:mod:`sparsejac.programs.terms` it imports :mod:`.labels` alone.

>>> import torch
>>> a, b = torch.ones(2, 3, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64)
>>> contract([(a, (0, 1)), (b, (1, 2))], (0, 2), Labels()).shape
torch.Size([2, 4])
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ...paths import greedy, label_sizes
from ...structure import distinct
from .labels import Labels

if TYPE_CHECKING:  # annotations only
    import torch


MAX_EINSUM_LABELS = 52  # torch.einsum's sublist format takes labels 0..51


class TooManyLabelsError(Exception):
    """An einsum over structured factors would need more than 52 distinct labels."""


def einsum(
    operands: Sequence[tuple[torch.Tensor, Sequence[int]]], out: Sequence[int], labels: Labels
) -> "torch.Tensor":
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
            laid = matmul_pair(*pairs[0], *pairs[1], keep, labels)
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
    :func:`einsum` (guarded, laid out for the writer); the last pair gives ``out``."""
    ops = [(t, tuple(ls)) for t, ls in operands]
    for i, j, keep in greedy([ls for _, ls in ops], out, [t.shape for t, _ in ops], stop=2):
        pair = einsum([ops[i], ops[j]], keep, labels)
        ops = [op for k, op in enumerate(ops) if k not in (i, j)] + [(pair, keep)]
    return einsum(ops, out, labels)


# A product is kept unformed (:class:`Product`) where forming it would make a factor this many
# times the entries of its parts: beyond it the next layer usually narrows the chain again. A
# switch for A/B runs of the benchmarks and for tests that need a product formed (or not).
LAZY_SPREAD = 4


def factor_of(ops: Sequence[tuple["torch.Tensor", Sequence[int]]], fl: tuple[int, ...],
              labels: Labels) -> "torch.Tensor | Product":
    """The factor ``einsum(ops -> fl)``: a :class:`Product` where it spreads its parts (see
    :data:`LAZY_SPREAD`), else formed now."""
    sizes = label_sizes([ls for _, ls in ops], [t.shape for t, _ in ops])
    entries = math.prod(sizes.get(l, 1) for l in fl)
    if len(ops) > 1 and entries > LAZY_SPREAD * sum(t.numel() for t, _ in ops):
        return Product(ops, fl, labels)
    return contract(ops, fl, labels)


class Product:
    """A factor kept as the einsum of its operands (``(tensor, labels)`` pairs) over ``out``,
    contracted the first time it is read (:attr:`Term.factor`).

    Why: composing a term with a layer that widens it (a transformer's feed-forward layer,
    64 -> 2048 per token) makes a factor far larger than what it is made of, and the next
    layer narrows it again. Kept unformed, the whole chain ``W2 diag(relu') W1 J`` is
    contracted at once in the cheapest order (:func:`contract`): the widened factor, the
    largest of the chain, is never made."""

    __slots__ = ("operands", "out", "labels", "_value")

    def __init__(self, operands: Sequence[tuple["torch.Tensor", Sequence[int]]],
                 out: Sequence[int], labels: "Labels") -> None:
        self.operands = [(t, tuple(ls)) for t, ls in operands]
        self.out = tuple(out)
        self.labels = labels
        self._value: "torch.Tensor | None" = None

    @property
    def formed(self) -> bool:
        """Whether the product has been contracted (read)."""
        return self._value is not None

    def value(self) -> "torch.Tensor":
        """The factor: contracted on the first call, then kept (its operands released)."""
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


def matmul_pair(a: torch.Tensor, la: Sequence[int], b: torch.Tensor, lb: Sequence[int],
                 keep: Sequence[int], labels: Labels | None = None) -> torch.Tensor | None:
    """``einsum(a, la, b, lb -> keep)`` as one broadcast ``torch.matmul`` whose result is
    already C-contiguous in ``keep`` order, or None where ``keep`` does not end in a run of one
    operand's own labels (then torch.einsum, which may return a permuted view).

    Why: the factors are written in ``keep`` order (the Jacobian's row-major order), and
    torch.einsum lays its result out in its own order; a copy to contiguous then costs about
    as much as the contraction, and the einsum itself more than this one matmul.
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
        squeezed = matmul_pair(
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
        # contiguous memory, faster than through a transposed view.
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
    # its first call imports sympy, slowly
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
    return reshaped(t, shape, labels, "a factor laid out for a product")


def torch_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a, b)``, torch imported on first use."""
    import torch

    return torch.matmul(a, b)


def align(tensor: "torch.Tensor", ls: Sequence[int], target: Sequence[int],
           labels: Labels | None = None) -> "torch.Tensor":
    """``tensor`` (one axis per distinct label of ``ls``) permuted and unsqueezed to ``target``;
    given ``labels``, a copy the reshape must make (a permuted diagonal) is guarded."""
    order = [ls.index(l) for l in target if l in ls]
    t = tensor.permute(order) if order else tensor
    return reshaped(t, [tensor.shape[ls.index(l)] if l in ls else 1 for l in target], labels)


def reshaped(t: "torch.Tensor", shape: Sequence[int], labels: Labels | None,
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


def diagonal(tensor: "torch.Tensor", ls: Sequence[int]) -> tuple["torch.Tensor", tuple[int, ...]]:
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
