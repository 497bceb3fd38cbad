"""The closed form of docs/how-it-works.md, section 1: a Jacobian as labels times a dense factor.

A :class:`Structure` says, for a Jacobian ``J`` of shape ``rows_shape + cols_shape``, which label
names each of its axes (a label on two axes is a Kronecker delta, a label repeated on one side a
diagonal) and over which labels the dense *factor* ``R`` lives. Its structural nonzeros are the
assignments of values to ``V``: the distinct row labels, then the column labels not among them.

:func:`einsum_structure` builds the structure of one einsum with respect to one operand, and
:func:`einsum_factor` its factor ``R``: the einsum of the other operands into the labels of ``V``
they carry, summing the labels that only they carry.

>>> from sparsejac.grammar import parse, bind
>>> s = einsum_structure(bind(parse("ij,jk->ik", 2), [(2, 3), (3, 4)]), 0)
>>> s.nnz, s.shape
(24, (2, 4, 2, 3))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .backend import NUMPY
from .errors import ShapeError, context
from .grammar import Einsum
from .paths import greedy, removed_size

# Factors up to this many elements are laid out in ``V`` order before spreading (as are those
# at most a sixteenth of the nonzeros): the broadcast copy then reads contiguous memory.
SPREAD_COPY_LIMIT = 1 << 23


def distinct(labels: Sequence[int]) -> tuple[int, ...]:
    """The labels in order of first appearance, each once."""
    return tuple(dict.fromkeys(labels))


@dataclass(frozen=True)
class Structure:
    """Where a Jacobian's nonzeros are, from labels and sizes alone (no values)."""

    rows: tuple[int, ...]  # label of each output-side axis
    cols: tuple[int, ...]  # label of each operand-side axis
    sizes: tuple[int, ...]  # size of every label (indexed by label)
    factor_labels: tuple[int, ...]  # labels of the dense factor's axes, in V order

    @property
    def free(self) -> tuple[int, ...]:
        """``V``: distinct row labels, then the column labels not among them."""
        return distinct(self.rows + self.cols)

    @property
    def free_shape(self) -> tuple[int, ...]:
        return tuple(self.sizes[label] for label in self.free)

    @property
    def rows_shape(self) -> tuple[int, ...]:
        return tuple(self.sizes[label] for label in self.rows)

    @property
    def cols_shape(self) -> tuple[int, ...]:
        return tuple(self.sizes[label] for label in self.cols)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.rows_shape + self.cols_shape

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return math.prod(self.rows_shape), math.prod(self.cols_shape)

    @property
    def nnz(self) -> int:
        return math.prod(self.free_shape)

    def transposed(self) -> "Structure":
        """The structure of ``J.T`` (operand side first), used to write CSC as CSR of ``J.T``."""
        free = distinct(self.cols + self.rows)
        order = tuple(label for label in free if label in self.factor_labels)
        return Structure(self.cols, self.rows, self.sizes, order)

    def spread_copies(self, factor_size: int) -> bool:
        """Whether :meth:`spread` lays a factor of ``factor_size`` elements out in ``V`` order
        first (a copy where it is not laid out so already): a small factor is worth it, as the
        broadcast copy that spreads it over the nonzeros then reads contiguous memory."""
        return factor_size * 16 <= max(self.nnz, 1) or factor_size <= SPREAD_COPY_LIMIT

    def spread(self, factor, labels: Sequence[int] | None = None, xp=NUMPY):
        """``factor`` (axes named by ``labels``, default ``factor_labels``) as a read-only
        broadcast view of shape ``free_shape``: the values of the nonzeros in C order."""
        labels = self.factor_labels if labels is None else tuple(labels)
        free = self.free
        order = sorted(range(len(labels)), key=lambda axis: free.index(labels[axis]))
        factor = xp.permute(factor, order)
        if self.spread_copies(math.prod(factor.shape)):
            factor = xp.contiguous(factor)
        expanded = factor.reshape(tuple(self.sizes[l] if l in labels else 1 for l in free))
        return xp.broadcast_to(expanded, self.free_shape)


def einsum_structure(einsum: Einsum, wrt: int) -> Structure:
    """The structure of ``d einsum / d operand[wrt]``."""
    cols = einsum.inputs[wrt]
    carried = {label for i, term in enumerate(einsum.inputs) if i != wrt for label in term}
    free = distinct(einsum.output + cols)
    factor_labels = tuple(label for label in free if label in carried)
    return Structure(einsum.output, cols, einsum.sizes, factor_labels)


def einsum_factor(einsum: Einsum, wrt: int, operands: Sequence, dtype, xp=NUMPY,
                  labels: Sequence[int] | None = None):
    """The dense factor ``R`` (axes: ``labels``, default
    ``einsum_structure(einsum, wrt).factor_labels``).

    Operands are cast to ``dtype`` first, so products are formed at the result's precision.
    With no other operand, ``R`` is the scalar 1.
    """
    others = [i for i in range(len(operands)) if i != wrt]
    if labels is None:
        labels = einsum_structure(einsum, wrt).factor_labels
    return labelled_einsum(einsum, others, operands, dtype, labels, xp)


def factor_is_view(einsum: Einsum, wrt: int, labels: Sequence[int]) -> tuple[bool, bool]:
    """Whether ``R`` over ``labels`` is a view of the one other operand (einsum allocates
    nothing: only a diagonal or a transpose is taken), and whether that view is the operand
    itself (contiguous when the operand is). Assumes the operand needs no cast."""
    others = [term for i, term in enumerate(einsum.inputs) if i != wrt]
    if len(others) != 1:
        return False, False
    term = others[0]
    view = set(term) == set(labels) and len(distinct(labels)) == len(labels)
    return view, view and tuple(term) == tuple(labels)


def labelled_einsum(
    einsum: Einsum, which: Sequence[int], operands: Sequence, dtype, out: Sequence[int], xp=NUMPY
):
    """``einsum`` of ``operands[which]`` (labelled as in ``einsum``) into labels ``out``,
    computed in ``dtype``; the empty product is 1."""
    if not which:
        return xp.ones((), dtype)
    pairs = [(operands[i], einsum.inputs[i]) for i in which]
    return labelled_product(einsum.subscripts, pairs, out, xp, dtype=dtype)


MAX_EINSUM_OPERANDS = 32  # more at once are contracted pairwise first (numpy stops at 64)


def _contract_pair(terms: list, out: Sequence[int], xp) -> list:
    """One greedy step (:func:`sparsejac.paths.greedy` by :func:`~sparsejac.paths.removed_size`):
    contract the two terms whose product keeps the fewest elements (labels that no other term
    and not ``out`` carries are summed), preferring pairs that share a label. Any number of
    operands then works, and intermediates stay small."""
    (i, j, kept), = greedy([labels for _, labels in terms], out,
                           [array.shape for array, _ in terms], removed_size, len(terms) - 1)
    product = xp.einsum(terms[i][0], terms[i][1], terms[j][0], terms[j][1], list(kept))
    return [t for k, t in enumerate(terms) if k not in (i, j)] + [(product, list(kept))]


def _compact(array, labels: Sequence[int], xp):
    """``array`` with its broadcast (zero-stride) dimensions cut to length 1, and the labels so
    cut with their sizes. A letter repeated in the operand is cut only if all its axes are
    broadcast (einsum needs a diagonal's axes equal)."""
    strides, shape = xp.strides(array), array.shape
    cut: dict[int, int] = {}
    for label in set(labels):
        axes = [d for d, l in enumerate(labels) if l == label]
        if all(strides[d] == 0 and shape[d] > 1 for d in axes):
            cut[label] = shape[axes[0]]
    if cut:
        array = array[tuple(slice(0, 1) if l in cut else slice(None) for l in labels)]
    return array, cut


def labelled_product(
    subscripts: str, pairs: Sequence[tuple], out: Sequence[int], xp=NUMPY, dtype=None
):
    """The einsum of ``(array, labels)`` pairs into labels ``out``, computed in ``dtype``.

    Labels are integers of any value (broadcast and batch labels go past 52); they are renamed
    densely, as numpy's and torch's einsum take labels below 52. Broadcast (zero-stride)
    dimensions are read as length 1, never materialised by the cast: a label seen only on such
    dimensions is scaled for (when summed) or broadcast back (when kept).
    """
    compacted, full, lost = [], set(), {}
    for array, labels in pairs:
        array, cut = _compact(array, labels, xp)
        lost.update(cut)
        full.update(l for l in labels if l not in cut)
        compacted.append((array if dtype is None else xp.cast(array, dtype), labels))
    lost = {l: n for l, n in lost.items() if l not in full}
    used = sorted({label for _, labels in pairs for label in labels} | set(out))
    if len(used) > 52:
        raise ShapeError(
            f"{context(subscripts)}the product uses {len(used)} distinct labels (letters, "
            "'...' dimensions and any batch of vectors); einsum handles at most 52"
        )
    rename = {label: k for k, label in enumerate(used)}
    terms = [(array, [rename[l] for l in labels]) for array, labels in compacted]
    target = [rename[l] for l in out]
    while len(terms) > MAX_EINSUM_OPERANDS:
        terms = _contract_pair(terms, target, xp)
    args: list = []
    for array, labels in terms:
        args += [array, labels]
    result = xp.einsum(*args, target)
    scale = math.prod(n for l, n in lost.items() if l not in out)
    if scale != 1:
        result = result * scale  # a sum over n equal terms
    if any(l in lost for l in out):
        result = xp.broadcast_to(result, tuple(lost.get(l, n) for l, n in zip(out, result.shape)))
    return result
