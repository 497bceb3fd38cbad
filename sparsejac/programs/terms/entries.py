"""Where each entry of a term lands: its row and column flat over ``V`` in C order
(:func:`coordinates_into`, :func:`placed`, :func:`placed_numpy`) and its value
(:func:`values`), what the writers (:mod:`sparsejac.programs.write`) read.

It reads terms and index maps and writes no container; of :mod:`sparsejac.programs.terms` it
imports :mod:`.labels`, :mod:`.factors` and :mod:`.term`.

>>> import torch
>>> from sparsejac.programs.terms import identity
>>> labels = Labels()
>>> x = identity((2,), labels, torch.float64)
>>> rows, cols, keep = placed_numpy(x, labels)
>>> rows.tolist(), cols.tolist(), keep
([0, 1], [0, 1], None)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from .factors import align
from .labels import Atoms, Labels
from .term import Term

if TYPE_CHECKING:  # annotations only
    import torch


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


def atom_indices(axes: Sequence[Atoms], labels: Labels, free: Sequence[int],
                 dtype: "np.dtype | type") -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
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


def placed_numpy(term: Term, labels: Labels
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
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


def placed(term: Term, labels: Labels
           ) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
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


def values(term: Term, labels: Labels, dtype: "torch.dtype",
           keep: "torch.Tensor | None" = None) -> "torch.Tensor":
    """The term's values flat over ``V``, in :func:`placed`'s order (``keep``: those kept)."""
    free = term.free(labels)
    flat = align(term.factor.to(dtype), term.flabels, free).expand(labels.shape(free))
    flat = flat.reshape(-1)
    return flat if keep is None else flat[keep]
