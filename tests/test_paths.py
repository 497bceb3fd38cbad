"""The greedy contraction order (sparsejac.paths) against brute force on small einsums.

What :func:`~sparsejac.paths.greedy` guarantees, checked here for both rules of cost:

- a valid sequence: ``n - stop`` steps (none below ``stop`` operands), each of two positions
  ``i < j`` of the current list, each keeping exactly the labels of its pair that the output or
  another operand still carries, in order of first appearance; contracted that way, the
  einsum's value is unchanged (the one-shot ``numpy.einsum``, in integers: exact);
- every step the cheapest pair under the rule, the first in ``(i, j)`` order among equals (all
  pairs tried), so that the path depends on labels and shapes alone;
- nothing about the total cost: a greedy path is not the cheapest in general (the last test
  shows a case).
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings, strategies as st

from sparsejac.paths import greedy, label_sizes, loop_and_writes, removed_size

RULES = [loop_and_writes, removed_size]


@st.composite
def einsums(draw):
    """1 to 6 operands over up to 6 labels of sizes 0 to 3 (repeated labels: diagonals;
    dimensions of size 1: broadcasts), an output of distinct labels they carry, a stop."""
    n_labels = draw(st.integers(1, 6))
    size = {l: draw(st.integers(0, 3)) for l in range(n_labels)}
    inputs = draw(st.lists(st.lists(st.integers(0, n_labels - 1), max_size=4).map(tuple),
                           min_size=1, max_size=6))
    shapes = [tuple(draw(st.sampled_from([size[l], 1])) for l in ls) for ls in inputs]
    # a label repeated on an operand is a diagonal: its dimensions agree
    shapes = [tuple(shape[ls.index(l)] for l in ls) for ls, shape in zip(inputs, shapes)]
    present = list(dict.fromkeys(l for ls in inputs for l in ls))
    output = tuple(draw(st.permutations(present).flatmap(
        lambda p: st.integers(0, len(p)).map(lambda k: p[:k]))))
    stop = draw(st.integers(1, 4))
    return inputs, shapes, output, stop


def _needed(ops, i, j, output):
    elsewhere = set(output).union(*(ls for k, ls in enumerate(ops) if k not in (i, j)))
    return tuple(l for l in dict.fromkeys(ops[i] + ops[j]) if l in elsewhere)


@settings(max_examples=300, deadline=None)
@given(einsums(), st.sampled_from(RULES))
def test_a_valid_sequence_of_cheapest_pairs(case, cost):
    inputs, shapes, output, stop = case
    path = greedy(inputs, output, shapes, cost, stop)
    assert len(path) == max(len(inputs) - stop, 0)
    sizes = label_sizes(inputs, shapes)
    ops, entries = [tuple(ls) for ls in inputs], [math.prod(s) for s in shapes]
    for i, j, kept in path:
        assert 0 <= i < j < len(ops)
        assert kept == _needed(ops, i, j, output)
        # brute force: every pair's cost; the first cheapest is the one taken
        costs = {(a, b): cost(ops[a], ops[b], _needed(ops, a, b, output), sizes, entries[a],
                              entries[b])
                 for a in range(len(ops)) for b in range(a + 1, len(ops))}
        cheapest = min(costs.values())
        assert (i, j) == next(p for p, c in costs.items() if c == cheapest)
        ops = [op for k, op in enumerate(ops) if k not in (i, j)] + [kept]
        entries = [n for k, n in enumerate(entries) if k not in (i, j)] + [
            math.prod(sizes[l] for l in kept)]
    assert len(ops) == min(len(inputs), stop)


@settings(max_examples=300, deadline=None)
@given(einsums(), st.sampled_from(RULES), st.integers(0, 2**16))
def test_contracting_along_the_path_gives_the_einsum(case, cost, seed):
    inputs, shapes, output, stop = case
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(-3, 4, size=s) for s in shapes]
    want = np.einsum(*[x for a, ls in zip(arrays, inputs) for x in (a, list(ls))], list(output))
    ops = [(a, list(ls)) for a, ls in zip(arrays, inputs)]
    for i, j, kept in greedy(inputs, output, shapes, cost, stop):
        pair = np.einsum(ops[i][0], ops[i][1], ops[j][0], ops[j][1], list(kept))
        ops = [op for k, op in enumerate(ops) if k not in (i, j)] + [(pair, list(kept))]
    got = np.einsum(*[x for a, ls in ops for x in (a, ls)], list(output))
    np.testing.assert_array_equal(got, want)


def _total(inputs, output, sizes, order):
    """The loop-and-writes cost of contracting ``inputs`` in ``order`` (a path)."""
    ops, total = [tuple(ls) for ls in inputs], 0
    for i, j in order:
        kept = _needed(ops, i, j, output)
        total += loop_and_writes(ops[i], ops[j], kept, sizes, 0, 0)
        ops = [op for k, op in enumerate(ops) if k not in (i, j)] + [kept]
    return total


def test_greedy_is_not_the_cheapest_path_in_general():
    """``a[k] B[i, k] c[j]`` summed to a scalar: the cheapest first pair is ``a`` with ``c``
    (18 multiply-adds and 3 writes against 21 and 1), which leaves the dearer second step;
    brute force over every order finds ``a`` with ``B`` first."""
    inputs, output = [(2,), (0, 2), (1,)], ()
    shapes = [(3,), (7, 3), (6,)]
    sizes = label_sizes(inputs, shapes)
    path = greedy(inputs, output, shapes)
    assert [(i, j) for i, j, _ in path] == [(0, 2), (0, 1)]

    def orders(n):
        if n == 1:
            yield []
            return
        for i in range(n):
            for j in range(i + 1, n):
                for rest in orders(n - 1):
                    yield [(i, j)] + rest

    best = min(_total(inputs, output, sizes, order) for order in orders(len(inputs)))
    assert (best, _total(inputs, output, sizes, [(i, j) for i, j, _ in path])) == (29, 43)
