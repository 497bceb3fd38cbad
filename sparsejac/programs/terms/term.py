"""The :class:`Term`: one structured summand of a Jacobian, axes named by labels times a dense
factor (docs/how-it-works.md, "## 2. Programs"), and :func:`identity`, the term every argument
starts from.

This module only defines the term; every move of the algebra is elsewhere. Of
:mod:`sparsejac.programs.terms` it imports :mod:`.labels` and :mod:`.factors`.

>>> import torch
>>> labels = Labels()
>>> x = identity((2, 3), labels, torch.float64)
>>> x.out == x.inp, x.nnz(labels)
(True, 6)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .factors import Product, align
from .labels import Atoms, Labels

if TYPE_CHECKING:  # annotations only
    import torch


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
        """The dense factor over :attr:`flabels` (an unformed product is formed now)."""
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

    @functools.cached_property
    def out_atoms(self) -> tuple[int, ...]:
        """The output side's atoms, axis after axis (kept: a term never changes)."""
        return tuple(a for axis in self.out for a in axis)

    @functools.cached_property
    def inp_atoms(self) -> tuple[int, ...]:
        """The argument side's atoms, axis after axis (kept: a term never changes)."""
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


def identity(shape: Sequence[int], labels: Labels, dtype: torch.dtype,
             device: "torch.device | str | None" = None) -> Term:
    """``d x / d x``: every axis a delta with itself, factor 1 (on ``device``: the argument's)."""
    import torch

    axes = tuple(labels.fresh(n) for n in shape)
    return Term(axes, axes, torch.ones((), dtype=dtype, device=device), ())


def aligned(term: Term, union: Sequence[int]) -> torch.Tensor:
    """The factor with its axes in ``union`` order, size 1 for labels it does not carry
    (:func:`~.factors.align` of the factor)."""
    return align(term.factor, term.flabels, union)
