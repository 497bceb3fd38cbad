"""Structured Jacobian terms and their algebra (docs/how-it-works.md, "## 2. Programs" and
"## 3. Index maps").

A :class:`Term` is the closed form of "## 1. One einsum" carried through a whole program: the
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

The modules, each importing only those above it:

- :mod:`.labels`: label sizes, derived labels (index maps), the memory guard, the memos;
- :mod:`.factors`: dense factors over labels: einsum, pairwise products, greedy contraction,
  unformed products, :func:`align`;
- :mod:`.term`: the :class:`Term` and :func:`identity`;
- :mod:`.maps`: index maps: :func:`gather`, :func:`remap`, :func:`mask`, one-hot fallbacks;
- :mod:`.entries`: each entry's row, column and value, for the writers;
- :mod:`.layout`: :func:`reshape`, :func:`permute`, :func:`expand` and the label surgery they need;
- :mod:`.chain`: :func:`compose`, :func:`scale`, :func:`multiply`, :func:`merge`;
- :mod:`.collapse`: entries that land on one input entry, summed during the trace;
- :mod:`.join`: the product of two terms that meet on one tensor (orders of accumulation).

The package imports numpy and torch (torch only inside the functions that need it), never scipy,
the formats, the tracer or the rules.

>>> import torch
>>> labels = Labels()
>>> x = identity((2, 3), labels, torch.float64)          # d x / d x
>>> w = torch.arange(12.0, dtype=torch.float64).reshape(3, 4)
>>> j = compose(x, ((0, 1), (1, 2)), (0, 2), (2, 3, 4), 0, [None, w], labels)   # x @ w
>>> j.nnz(labels), j.factor.shape
(24, torch.Size([4, 3]))
"""

from __future__ import annotations

from .chain import bind, compose, merge, multiply, scale, substitute, unscaled
from .collapse import collapse
from .entries import atom_indices, coordinates_into, placed, placed_numpy, values
from .factors import (MAX_EINSUM_LABELS, Product, TooManyLabelsError, align, contract, einsum,
                      matmul_pair, torch_matmul)
from .labels import ROOM_BYTES, Atoms, Labels, nothing_live, torch_equal
from .layout import densify, expand, merge_run, permute, reshape, split_label
from .join import join, relabel
from .maps import (base_axis, coordinate, gather, invert, mask, on_base, one_to_one, onehot, remap,
                   reparametrise, resolve)
from .term import Term, aligned, identity

__all__ = [
    "Atoms", "Labels", "MAX_EINSUM_LABELS", "Product", "ROOM_BYTES", "Term", "TooManyLabelsError",
    "align", "aligned", "atom_indices", "base_axis", "bind", "collapse", "compose", "contract",
    "coordinate", "coordinates_into", "densify", "einsum", "expand", "gather", "identity",
    "invert", "join", "mask", "matmul_pair", "merge", "merge_run", "multiply", "nothing_live",
    "on_base", "one_to_one", "onehot", "permute", "placed", "placed_numpy", "relabel", "remap",
    "reparametrise", "reshape", "resolve",
    "scale", "split_label", "substitute", "torch_equal", "torch_matmul", "unscaled", "values",
]
