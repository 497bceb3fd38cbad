"""``method="embed"``: the note's pipeline (docs/how-it-works.md, "The note"), kept sparse.

The seed note embeds the other operands into a tensor of shape
``t1.shape + ... + tn.shape + tk.shape`` (zero except where all letters agree) and collapses it
with a second einsum. Here the embedding's nonzero coordinates are enumerated directly (one per
assignment of *all* labels), built into a pydata ``sparse.COO``, and the collapse runs as a
single-operand ``sparse.einsum`` that takes the diagonals, sums the letters absent from the
result and permutes. Its nnz before the collapse is the product of all label sizes.

It agrees exactly with ``method="direct"`` (stored pattern included) and exists as the
independent construction the project started from; it is slower and uses more memory.
"""

from __future__ import annotations

import math
import string

import numpy as np
import sparse

from .errors import ShapeError, context
from .formats import REGISTRY, coo_coords, fill_values, index_dtype
from .grammar import Einsum
from .structure import Structure, distinct, einsum_structure, labelled_einsum


def embedding_structure(einsum: Einsum, wrt: int) -> Structure:
    """The zero-embedding as a structure: axes ``A1 .. An`` then ``Ak``; its free labels are
    all labels, in order of first appearance (which makes the enumeration sorted)."""
    rows = tuple(label for term in einsum.inputs for label in term)
    others = {label for i, term in enumerate(einsum.inputs) if i != wrt for label in term}
    free = distinct(rows)
    return Structure(rows, einsum.inputs[wrt], einsum.sizes, tuple(l for l in free if l in others))


def embedding_nnz(einsum: Einsum) -> int:
    return math.prod(einsum.sizes[l] for l in distinct(sum(einsum.inputs, ())))


def embed_coo(einsum: Einsum, wrt: int, arrays, dtype: np.dtype) -> sparse.COO:
    """The Jacobian as a ``sparse.COO`` of shape ``output + operand``, through the embedding."""
    structure = embedding_structure(einsum, wrt)
    labels = distinct(structure.rows)
    if len(labels) > len(string.ascii_letters):
        raise ShapeError(
            f"{context(einsum.subscripts)}method='embed' names every label with a letter and "
            f"supports at most 52 labels, got {len(labels)}; use method='direct'"
        )
    others = [i for i in range(len(arrays)) if i != wrt]
    product = labelled_einsum(einsum, others, arrays, dtype, structure.factor_labels)
    data = np.empty(structure.nnz, dtype=dtype)
    fill_values(structure, product, structure.factor_labels, data)
    embedded = _coo(coo_coords(structure), data, structure.shape)

    letter = dict(zip(labels, string.ascii_letters))
    source = "".join(letter[l] for l in structure.rows + structure.cols)
    target = "".join(letter[l] for l in einsum.output + einsum.inputs[wrt])
    result = sparse.einsum(f"{source}->{target}", embedded)
    if not target:
        # sparse reduces to a scalar by moving the sum into fill_value; put it back as an entry.
        value = np.asarray(result.fill_value if isinstance(result, sparse.COO) else result)
        coords = np.zeros((0, 1), dtype=index_dtype(1, ()))
        return sparse.COO(coords, value.astype(dtype).reshape(1), shape=())
    result = result.astype(dtype, copy=False)
    # The index dtype method="direct" writes (sparse's einsum returns int64 or intp).
    result.coords = result.coords.astype(index_dtype(result.nnz, result.shape), copy=False)
    direct = einsum_structure(einsum, wrt)
    if result.nnz != direct.nnz:
        # A label summed only by the other operands has size 0: the embedding is empty, and the
        # collapse's empty sums are the zeros at every structural position.
        return _coo(coo_coords(direct), np.zeros(direct.nnz, dtype), direct.shape)
    return result


def _coo(coords, data, shape) -> sparse.COO:
    """A ``sparse.COO`` around sorted, unique coordinates (the registry's container)."""
    return REGISTRY["coo"].wrap(coords, data, tuple(shape), None)
