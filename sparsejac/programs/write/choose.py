"""Which writer handles a block, decided once, from its terms and its place in the result.

:func:`writer_for` is the one place that decides: a Hessian's symmetric blocks and those it
also uses transposed go the CSR path (:class:`~.csrpath.CsrPath`, around the writer their
terms call for); one plain term, or terms nested in one, is written from its structure
(:class:`~.structured.Structured`); index-mapped terms of one entry a row are merged row by
row (:class:`~.rows.ByRows`); the rest through coordinates (:class:`~.coordinates.ByCoordinates`).
:func:`materialise` is a block's sum as canonical CSR by that writer. This module reads terms
and the formats; it never imports the tracer or the rules.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import scipy.sparse

from ... import formats
from .. import terms as T
from .base import Writer
from .coordinates import ByCoordinates
from .csrpath import CsrPath
from .merged import oriented
from .rows import ByRows, by_rows_applies
from .structured import Structured, direct

if TYPE_CHECKING:  # annotations only
    import torch


def writer_for(terms: Sequence[T.Term], out_shape: Sequence[int], inp_shape: Sequence[int],
               labels: T.Labels, fmt: Any = None, symmetric: bool = False,
               transposed: bool = False) -> Writer:
    """The writer of the block that is the sum of ``terms``, of shape ``out_shape +
    inp_shape``. ``fmt``: the format a one-shot call writes (a merge runs along its major
    axis: columns for CSC); None for a plan, whose merges run along rows. ``symmetric``: a
    Hessian's diagonal block (averaged with its transpose); ``transposed``: a block the
    Hessian also uses transposed.

    >>> import torch
    >>> from sparsejac.programs import terms as T
    >>> labels = T.Labels()
    >>> x = T.identity((3,), labels, torch.float64)
    >>> writer_for([x], (3,), (3,), labels), writer_for([x], (3,), (3,), labels, symmetric=True)
    (<Structured (3,) x (3,)>, <CsrPath of <Structured (3,) x (3,)> (symmetric)>)
    """
    if symmetric or transposed:
        return CsrPath(writer_for(terms, out_shape, inp_shape, labels), symmetric)
    if direct(terms, labels):
        return Structured(out_shape, inp_shape)
    flip = fmt is not None and formats.get(fmt, require=False).layout is formats.CSC
    major_terms, major, minor = oriented(terms, out_shape, inp_shape, flip)
    if any(t.mapped(labels) for t in terms) and by_rows_applies(
            major_terms, (math.prod(major), math.prod(minor)), labels):
        return ByRows(out_shape, inp_shape, flip)
    return ByCoordinates(out_shape, inp_shape, flip)


def materialise(terms: Sequence[T.Term], out_shape: Sequence[int], inp_shape: Sequence[int],
                labels: T.Labels, dtype: "torch.dtype") -> scipy.sparse.csr_array:
    """The sum of ``terms`` as a canonical CSR array of shape ``(out.size, arg.size)``: the
    union of the terms' structural entries (a sum that happens to be zero stays stored, as
    elsewhere in the package), written by the block's writer (:func:`writer_for`)."""
    return writer_for(terms, out_shape, inp_shape, labels).csr(terms, labels, dtype)


def materialise_nbytes(terms: Sequence[T.Term], out_shape: Sequence[int],
                       inp_shape: Sequence[int], labels: T.Labels,
                       dtype: "torch.dtype") -> tuple[int, int]:
    """``(peak, kept)``: the bytes :func:`materialise` holds at its peak, and those its result
    keeps."""
    return writer_for(terms, out_shape, inp_shape, labels).csr_nbytes(terms, labels, dtype)
