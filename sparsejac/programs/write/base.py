"""What every way of writing a block shares: the :class:`Writer` interface, and where a block's
arrays live.

:func:`~sparsejac.programs.write.choose.writer_for` picks one writer per block, once, from its
terms; the one-shot path (:mod:`.assemble`) and a plan (:class:`~sparsejac.programs.api.ProgramPlan`)
then call the same object. Each method that allocates has its byte model beside it, so a
prediction sits next to the code it predicts. A writer is told the block's shapes when it is
chosen and the block's terms at each call (a plan's refill brings new ones, of the same
structure); it holds no term, so that a block's factors go as soon as its caller lets them.

Results of the torch formats are written on a CUDA argument's device; everything else on the
host. This module reads the formats and the backends; it never imports the terms' algebra,
the tracer or the rules.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import scipy.sparse

from ... import formats
from ...backend import NUMPY, TorchBackend

if TYPE_CHECKING:  # annotations only
    import torch

    from .plans import KeptCsr

CSR = formats.get("csr", require=False)  # the canonical CSR every merge gives


class Writer:
    """One way of writing a block of shape ``out_shape + inp_shape``.

    The one-shot path: :meth:`write` (predicted by :meth:`nbytes`) and :meth:`result` for each
    place the block is used. The block as one canonical CSR: :meth:`csr` (:meth:`csr_nbytes`).
    A plan: :meth:`keep` once (the pattern, and where each value lands in it), then at each
    refill :meth:`values` (:meth:`values_nbytes`) in the kept pattern's order, or
    :meth:`write` itself where :attr:`writes_directly`.
    """

    writes_directly = False  # a plan's refill writes it straight into the format

    def __init__(self, out_shape: Sequence[int], inp_shape: Sequence[int]) -> None:
        self.out_shape, self.inp_shape = tuple(out_shape), tuple(inp_shape)
        self.kept: KeptCsr | None = None  # a plan's pattern (:meth:`keep`)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.out_shape} x {self.inp_shape}>"

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return math.prod(self.out_shape), math.prod(self.inp_shape)

    # --- the one-shot path ---

    def write(self, terms, labels, dtype: "torch.dtype", fmt: Any, device: Any = None) -> Any:
        """The sum of ``terms`` written once for ``fmt`` (what :meth:`result` turns into the
        results)."""
        raise NotImplementedError

    def nbytes(self, fmt: Any, terms, labels, dtype: "torch.dtype",
               device: Any = None) -> tuple[int, int]:
        """``(peak, kept)``: the bytes :meth:`write` holds at its peak, and those its result
        keeps (the factors themselves, alive already, not counted)."""
        raise NotImplementedError

    def result(self, written: Any, fmt: Any, transposed: bool = False, device: Any = None) -> Any:
        """The block's result where it is used (``transposed``: below a Hessian's diagonal)
        from what :meth:`write` gave: that itself, unless the writer says otherwise."""
        return written

    # --- the block as one canonical CSR ---

    def csr(self, terms, labels, dtype: "torch.dtype") -> scipy.sparse.csr_array:
        """The sum of ``terms`` as a canonical CSR array of shape :attr:`matrix_shape`: the
        union of the terms' structural entries (those an index map drops, -1, dropped),
        sums that happen to be zero kept."""
        raise NotImplementedError

    def csr_nbytes(self, terms, labels, dtype: "torch.dtype") -> tuple[int, int]:
        """``(peak, kept)`` bytes of :meth:`csr`."""
        raise NotImplementedError

    # --- plans ---

    def keep(self, terms, labels, dtype: "torch.dtype") -> "KeptCsr":
        """Make and keep (:attr:`kept`) the block's canonical CSR pattern, and what a refill
        needs to put new values into it."""
        raise NotImplementedError

    def values(self, terms, labels, dtype: "torch.dtype") -> np.ndarray:
        """A refill's values (the sum of ``terms``) in the kept pattern's order."""
        raise NotImplementedError

    def values_nbytes(self, terms, labels, dtype: "torch.dtype") -> tuple[int, int]:
        """``(peak, kept)`` bytes of :meth:`values`."""
        raise NotImplementedError

    def swap(self, terms, labels, mirror: np.ndarray) -> tuple | None:
        """Where a symmetric block's mirror image is a permutation of ``V``'s axes: that
        (see :class:`~sparsejac.programs.write.structured.Structured`), else None."""
        return None


def canonical_csr(data, indices, indptr, shape) -> scipy.sparse.csr_array:
    """A CSR array around arrays that are canonical by construction (no copy, no scan)."""
    csr = scipy.sparse.csr_array((data, indices, indptr), shape=shape, copy=False)
    csr.has_sorted_indices = True
    csr.has_canonical_format = True
    return csr


def on_gpu(fmt: formats.Format, device: Any) -> bool:
    """Whether ``fmt``'s results belong on ``device``: a torch format and a CUDA device."""
    return fmt.on_torch and device is not None and getattr(device, "type", "cpu") == "cuda"


def backend(fmt: formats.Format, device: Any):
    """Where a block is written: on ``device`` for a torch format on a CUDA device, else numpy."""
    return TorchBackend(device) if on_gpu(fmt, device) else NUMPY


def torch_on(array: np.ndarray, device: Any, gpu: bool) -> "torch.Tensor":
    """A numpy array as a torch tensor: the same memory on the CPU, a copy on a GPU."""
    tensor = formats.as_tensor(array)
    return tensor.to(device) if gpu else tensor


def on_device(result: Any, fmt: formats.Format, device: Any) -> Any:
    """A torch-format result moved to ``device`` (once, at the end) where that is a GPU."""
    if on_gpu(fmt, device):
        moved = result.to(device)
        setattr(moved, formats.OUT_NDIM, getattr(result, formats.OUT_NDIM))
        return moved
    return result
