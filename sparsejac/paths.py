"""The order of an einsum's pairwise contractions, chosen greedily from labels and sizes alone.

In the style of opt_einsum's ``paths.greedy``: the operands are given by their labels
(integers; a label repeated on one operand is a diagonal) and their shapes, and the path is a
list of steps ``(i, j, kept)``: contract the operands at positions ``i < j`` of the current list
into the labels ``kept`` (those of the pair that the output or another operand still carries,
in order of first appearance), remove the two and append their product at the end. Each step
takes the pair of the lowest cost, the first one in ``(i, j)`` order among equals. Two rules of
cost serve the library's two einsums (docs/how-it-works.md, "## 1. One einsum" and
"## 2. Programs"): :func:`loop_and_writes` orders the products of Jacobian factors
(:func:`sparsejac.programs.terms.contract`), :func:`removed_size` the operands of an einsum past
the 32 that numpy's takes at once (:func:`sparsejac.structure.labelled_product`).

A greedy path is not the cheapest in general: it guarantees a valid sequence and a cheapest
next pair at every step, nothing about the total.

This module is pure: it reads labels and integers only, and imports neither numpy nor torch nor
any other module of the package.

>>> # (a @ b) @ c for a, b, c of shapes (2, 50), (50, 3), (3, 40): a @ b first, the cheap pair
>>> greedy([(0, 1), (1, 2), (2, 3)], (0, 3), [(2, 50), (50, 3), (3, 40)])
[Step(i=0, j=1, kept=(0, 2)), Step(i=0, j=1, kept=(3, 0))]
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

Cost = Callable[[Sequence[int], Sequence[int], Sequence[int], Mapping[int, int], int, int], Any]


class Step(NamedTuple):
    """One pairwise contraction: positions ``i < j`` in the current list, the labels kept."""

    i: int
    j: int
    kept: tuple[int, ...]


def label_sizes(inputs: Sequence[Sequence[int]],
                shapes: Sequence[Sequence[int]]) -> dict[int, int]:
    """Each label's size over operands of labels ``inputs`` and shapes ``shapes``: its largest
    dimension (a dimension of size 1 broadcasts), and at least 1.

    >>> label_sizes([(0, 1), (1,)], [(2, 1), (3,)])
    {0: 2, 1: 3}
    """
    size: dict[int, int] = {}
    for ls, shape in zip(inputs, shapes):
        for label, n in zip(ls, shape):
            size[label] = max(size.get(label, 1), n)
    return size


def loop_and_writes(a: Sequence[int], b: Sequence[int], kept: Sequence[int],
                    sizes: Mapping[int, int], na: int, nb: int) -> int:
    """The multiply-adds of the pair's loop plus the entries it writes: of two pairs with equal
    loops, the one that sums a widened label away goes first. A chain ``W2 diag(g) W1 J`` then
    contracts its small matrices first, and a chain of scales ``g3 g2 g1 F`` multiplies the
    scales together before it makes one pass over the large ``F``.

    >>> loop_and_writes((0, 1), (1, 2), (0, 2), {0: 2, 1: 3, 2: 4}, 6, 12)
    32
    """
    both = dict.fromkeys(tuple(a) + tuple(b))
    return math.prod(sizes[l] for l in both) + math.prod(sizes[l] for l in kept)


def removed_size(a: Sequence[int], b: Sequence[int], kept: Sequence[int],
                 sizes: Mapping[int, int], na: int, nb: int) -> tuple[bool, int]:
    """Pairs that share a label first, then the product's entries less its operands' (``na``
    and ``nb``): opt_einsum's "memory-removed". Many operands then fold into few, keeping the
    intermediates small.

    >>> removed_size((0, 1), (2,), (0, 1, 2), {0: 2, 1: 3, 2: 4}, 6, 4)
    (True, 14)
    """
    return (not set(a) & set(b), math.prod(sizes[l] for l in kept) - na - nb)


def greedy(inputs: Sequence[Sequence[int]], output: Sequence[int],
           shapes: Sequence[Sequence[int]], cost: Cost = loop_and_writes,
           stop: int = 1) -> list[Step]:
    """The greedy path that contracts ``einsum(inputs -> output)`` pairwise until ``stop``
    operands (at least one) are left; the caller contracts those into ``output``.

    ``cost(a, b, kept, sizes, na, nb)`` ranks a pair of operands of labels ``a`` and ``b`` and
    entries ``na`` and ``nb`` (a product's entries: the product of its labels' sizes), whose
    product keeps ``kept``; ``sizes`` are :func:`label_sizes`.

    >>> greedy([(0,), (0, 1), (1,)], (), [(5,), (5, 5), (5,)], cost=removed_size)
    [Step(i=0, j=1, kept=(1,)), Step(i=0, j=1, kept=())]
    """
    ops = [tuple(ls) for ls in inputs]
    sizes = label_sizes(ops, shapes)
    entries = [math.prod(shape) for shape in shapes]
    wanted = set(output)
    carriers: dict[int, int] = {}  # label -> operands carrying it
    for ls in ops:
        for label in set(ls):
            carriers[label] = carriers.get(label, 0) + 1
    path: list[Step] = []
    while len(ops) > max(stop, 1):
        best = None
        for i in range(len(ops)):
            for j in range(i + 1, len(ops)):
                a, b = ops[i], ops[j]
                kept = tuple(l for l in dict.fromkeys(a + b)
                             if l in wanted or carriers[l] > (l in a) + (l in b))
                key = cost(a, b, kept, sizes, entries[i], entries[j])
                if best is None or key < best[0]:
                    best = (key, i, j, kept)
        _, i, j, kept = best
        path.append(Step(i, j, kept))
        for label in set(ops[i]) | set(ops[j]):
            carriers[label] -= (label in ops[i]) + (label in ops[j])
        for label in kept:
            carriers[label] += 1
        ops = [op for k, op in enumerate(ops) if k not in (i, j)] + [kept]
        entries = ([n for k, n in enumerate(entries) if k not in (i, j)]
                   + [math.prod(sizes[l] for l in kept)])
    return path
