"""The public entry points of programs: :func:`jacobian_of`, :func:`hessian_of`, :func:`plan_of`
and the :class:`ProgramPlan` it makes.

Each checks its own arguments, has the tracing driver (:mod:`~sparsejac.programs.collect`) trace
``fn`` and the writers (:mod:`~sparsejac.programs.write`) write the result; it neither dispatches
operations nor forms terms itself, and nothing in the package imports it but the package's
``__init__``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from .. import formats, options
from ..errors import ArgumentError, ArgumentTypeError
from ..operands import numpy_dtype
from . import accumulate
from . import collect as C
from .collect import LOCK
from .naming import PREFIX, entry_point
from .write import assemble as A
from .write.base import on_device
from .write.choose import writer_for
from .write.plans import shadow


def _check(fn: Any, format: str | None = None) -> None:
    """What every entry point checks before tracing: ``fn`` is callable, and ``format`` (where
    given) is a format's name whose package is installed."""
    if not callable(fn):
        raise ArgumentTypeError(f"{PREFIX}fn must be callable, got {type(fn).__name__}")
    if format is not None:
        formats.get(format, PREFIX)


def jacobian_of(
    fn: Callable[..., Any],
    *args: Any,
    wrt: int | Sequence[int] = 0,
    format: str = "coo",
    memory_limit: float | None = None,
    mode: str = "auto",
):
    """The exact sparse Jacobian of ``fn(*args)`` with respect to ``args[wrt]``.

    ``fn`` takes torch tensors (or tuples, lists, dicts of them, such as a module's parameters
    for ``torch.func.functional_call``) and returns a tensor or such a structure, built from
    the registered operations (``sparsejac.programs.RULES``); tensors it closes over are
    constants. The result is nested as ``torch.func.jacrev(fn, argnums=wrt)`` nests it: by
    output leaf, then by ``wrt`` entry when ``wrt`` is a tuple, then by argument leaf. Each
    Jacobian is a ``sparse.COO`` of shape ``out.shape + arg.shape`` (``format="coo"``) or a
    scipy/torch array of shape ``(out.size, arg.size)`` (the formats of
    :func:`sparsejac.jacobian`). Stored entries: the union, over the Jacobian's terms, of each
    term's structural nonzeros (selections and padding drop what they drop).

    ``memory_limit`` (bytes; default the memory available) bounds every allocation that grows
    with the problem, while tracing and at the end; over it,
    :class:`~sparsejac.errors.JacobianTooLargeError` is raised with the predicted bytes.

    ``mode`` is the order the steps' Jacobians are contracted in: ``"forward"`` (from the
    argument, as the program runs), ``"reverse"`` (from the output back: narrow outputs such as
    a classifier's logits make narrow terms) or ``"auto"`` (the cheapest of those and of a cut
    between them, estimated from the steps' own Jacobians: docs/how-it-works.md, section 8).
    Every mode gives the same Jacobian.

    >>> import torch, sparsejac
    >>> x = torch.randn(8, 4, dtype=torch.float64)
    >>> w1, w2 = torch.randn(4, 6, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    >>> J = sparsejac.jacobian_of(lambda x: torch.tanh(x @ w1) @ w2, x)
    >>> J.shape, J.nnz      # per-sample blocks only: 8 * 3 * 4
    ((8, 3, 8, 4), 96)
    """
    _check(fn, format)
    with LOCK:
        return A.build(C.jacobian_blocks(fn, args, wrt, memory_limit, mode), format)


def hessian_of(
    fn: Callable[..., Any],
    *args: Any,
    wrt: int | Sequence[int] = 0,
    format: str = "coo",
    memory_limit: float | None = None,
):
    """The exact sparse Hessian of the scalar ``fn(*args)`` with respect to ``args[wrt]``.

    Computed in structured form (:mod:`sparsejac.programs.second`): the sum, over the
    program's nonlinear steps, of ``J_u^T W J_u`` with ``J_u`` the structured Jacobian of the
    step's input and ``W`` its second derivative contracted with the adjoint; never by colouring,
    never densely. The result is a ``sparse.COO`` of shape ``arg.shape + arg.shape``
    (``format="coo"``) or a scipy/torch array of shape ``(arg.size, arg.size)``; a tuple ``wrt``
    or pytree arguments give the nested blocks ``torch.func.hessian`` gives. Stored entries: the
    union, over the steps with curvature, of each ``J_u^T W J_u`` term's structural nonzeros
    (symmetric, sorted); piecewise-linear steps (relu, max, clamp) add none. Diagonal blocks
    are exactly symmetric.

    >>> import torch, sparsejac
    >>> x = torch.randn(6, 3, dtype=torch.float64)
    >>> H = sparsejac.hessian_of(lambda x: (torch.tanh(x) ** 2).sum(), x, format="csr")
    >>> H.shape, H.nnz          # elementwise: diagonal
    ((18, 18), 18)
    """
    with entry_point("hessian_of"):
        _check(fn, format)
        with LOCK:
            return A.build(C.hessian_blocks(fn, args, wrt, memory_limit), format)


# --- traced plans ----------------------------------------------------------------------------


def _nothing_live() -> int:
    return 0


class ProgramPlan:
    """A traced program's Jacobian (or Hessian) structure, kept: :meth:`jacobian` re-runs
    ``fn`` on new arguments of the same shapes and dtypes, recomputes the dense factors and
    writes values into the kept index arrays (read-only, shared by every result).

    Value-dependent paths: which entries a relu, max or clamp passes are values, so the
    structure holds for any arguments. Where the path itself depends on values (Python control
    flow on values, boolean-mask indexing whose result size changes), the new trace's structure
    differs; the plan then rebuilds its pattern from that trace and counts it in
    :attr:`rebuilds`, so the result is always the derivative of the path taken.
    """

    def __init__(self, fn, args, wrt, memory_limit, order: int = 1, mode: str = "auto") -> None:
        self.fn, self.wrt, self.memory_limit, self.order = fn, wrt, memory_limit, order
        # the order of accumulation asked for; "auto" resolves from the shapes alone, so every
        # refill resolves it as the first trace did (:attr:`mode`: the order it chose)
        self._mode = accumulate.mode_of(mode, PREFIX)
        self.rebuilds = 0
        with LOCK:
            c = self._collect(args, memory_limit)
            self.mode = c.mode
            if self._mode == "auto" and self.mode == "forward":
                # forward chosen (or fallen back to): the refills run the trace's own forward
                # composition, without recording the steps (a second trace, once, here)
                self._mode = "forward"
                if not c.fell_back:
                    c = self._collect(args, memory_limit)
            self._adopt(c)
        self._args_key = C.signature(args)

    def _collect(self, args, limit, skip: bool = False) -> C.Collected:
        """Trace ``fn(*args)``; ``skip``: a Hessian's first-order terms that the last full
        trace showed nobody reads are not formed
        (:meth:`~sparsejac.programs.tape.Tape.dead_calls`)."""
        if self.order != 2:
            return C.jacobian_blocks(self.fn, args, self.wrt, limit, self._mode)
        c = C.hessian_blocks(self.fn, args, self.wrt, limit, self._dead if skip else None)
        if c.read_dead:  # the path changed and reads what was skipped: trace it in full
            c = C.hessian_blocks(self.fn, args, self.wrt, limit)
        return c

    def _adopt(self, c: C.Collected) -> None:
        self._dead = getattr(c, "dead", None) or {}
        self._structure, self.dtype, self._layout = c.structure(), c.dtype, c.layout
        # each block's writer, chosen once, keeps its pattern; the shadow terms (the factors'
        # shapes and strides only) are what a refill's predictions read
        transposed = {i for i, tr in c.layout if tr}
        self._blocks, self._shadows = [], []
        for i, (terms, (s1, s2)) in enumerate(zip(c.blocks, c.shapes)):
            w = writer_for(terms, s1, s2, c.labels, None, i in c.symmetric, i in transposed)
            w.keep(terms, c.labels, c.dtype)
            self._blocks.append(w)
            self._shadows.append(shadow(terms))
        self._labels, self._device = c.labels, c.device  # what the shadow terms refer to
        self._measure(c)
        c.labels.live = _nothing_live  # kept, the labels must not keep the tracer (its tape)

    def _measure(self, c: C.Collected) -> None:
        """Keep what a trace showed: the peak its factors reached (checked before each
        allocation) and the bytes of those alive when it ends, beside which the writers run."""
        self._trace_peak, self._live_end = c.labels.peak, A.factors_nbytes(c)

    def _write_nbytes(self, fmt: str) -> int:
        """The bytes the writers of :meth:`jacobian` hold at their peak, every result kept
        until the last is written (as :meth:`jacobian` writes them)."""
        itemsize = np.dtype(numpy_dtype(self.dtype)).itemsize
        held = peak = 0
        done: set[int] = set()
        for i, tr in self._layout:
            w, terms = self._blocks[i], self._shadows[i]
            if w.writes_directly:
                p, kept = w.nbytes(fmt, terms, self._labels, self.dtype, self._device)
            else:
                p = kept = 0
                if i not in done:  # each block's values once, kept for its transposed copy
                    p, kept = w.values_nbytes(terms, self._labels, self.dtype)
                    done.add(i)
                p2, k2 = w.kept.result_nbytes(fmt, tr, itemsize)
                p, kept = max(p, kept + p2), kept + k2
            peak, held = max(peak, held + p), held + kept
        return peak

    def peak_nbytes(self, format: str = "coo") -> int:
        """The predicted peak of the next :meth:`jacobian` in ``format``, in bytes: the most
        the trace's dense factors reach (the live ones and the one being made), or the factors
        alive at its end plus every result's arrays and the writers' temporaries, whichever
        is more. A pattern not kept yet for ``format`` is counted (the first refill in a format
        makes it). ``jacobian(..., memory_limit=L)`` refuses at once where this exceeds ``L``.
        ``format`` defaults to ``"coo"``, as :meth:`jacobian`'s and :meth:`nbytes`'s.

        >>> import torch, sparsejac
        >>> w = torch.randn(16, 16, dtype=torch.float64)
        >>> x = torch.randn(32, 16, dtype=torch.float64)
        >>> p = sparsejac.plan_of(lambda x: torch.tanh(x @ w), x)
        >>> p.peak_nbytes("csr") >= p.nbytes("csr")
        True
        >>> try:
        ...     p.jacobian(x, format="coo", memory_limit=p.peak_nbytes("coo") - 1)
        ... except sparsejac.JacobianTooLargeError:
        ...     print("refused before tracing")
        refused before tracing
        >>> p.jacobian(x, format="coo", memory_limit=p.peak_nbytes("coo")).nnz
        8192
        """
        formats.get(format, PREFIX)  # the name, and its package installed
        return max(self._trace_peak, self._live_end + self._write_nbytes(format))

    @property
    def nnz(self) -> int:
        """Stored entries of every block of the result (transposed blocks counted again)."""
        return sum(self._blocks[b].kept.nnz for b, _ in self._layout)

    @property
    def shape(self):
        """``out.shape + arg.shape`` of the first block."""
        b = self._blocks[0]
        return b.out_shape + b.inp_shape

    @property
    def matrix_shape(self):
        return self._blocks[0].kept.shape

    def nbytes(self, format: str = "coo", dtype: Any = None) -> int:
        """Bytes of the result's arrays in ``format`` (default ``"coo"``, what :meth:`jacobian`
        returns by default, as :meth:`sparsejac.plan.Plan.nbytes`), values in ``dtype`` (a
        numpy or torch dtype; default the plan's)."""
        formats.get(format, PREFIX)  # the name, and its package installed
        f = formats.get(format, require=False)
        itemsize = f.value_itemsize(self.dtype if dtype is None
                                    else options.value_dtype(dtype, PREFIX))
        total = 0
        for index, transposed in self._layout:
            b = self._blocks[index]
            out, inp = (b.inp_shape, b.out_shape) if transposed else (b.out_shape, b.inp_shape)
            # Compressed layouts keep the CSR's own index width; COO the rule's.
            idx = 0 if f.layout is formats.COO else b.kept.index_itemsize
            total += f.nbytes(b.kept.nnz, out, inp, itemsize, idx)
        return total

    def pattern(self, format: str = "coo"):
        """The first block's pattern: a boolean array in ``format`` (ones where stored)."""
        kept = self._blocks[0].kept
        return kept.result(np.ones(kept.nnz, dtype=bool), format)

    def jacobian(self, *args: Any, format: str = "coo", memory_limit: float | None = None):
        """The Jacobian (the Hessian, for a plan of ``order=2``) at ``args`` (same shapes and
        dtypes as the plan's), nested as :func:`jacobian_of` (:func:`hessian_of`) nests it.
        Its messages name the method called (``ProgramPlan.jacobian``, ``ProgramPlan.hessian``)."""
        with entry_point(f"ProgramPlan.{'hessian' if self.order == 2 else 'jacobian'}"):
            return self._refill(args, format, memory_limit)

    hessian = jacobian

    def _refill(self, args: tuple, format: str, memory_limit: float | None):
        formats.get(format, PREFIX)  # the name, and its package installed
        key = C.signature(args)
        if key != self._args_key:
            from ..errors import ShapeError

            raise ShapeError(
                f"{PREFIX}plan traced for arguments of shapes and dtypes {self._args_key}; got "
                f"{key}: make a new plan with sparsejac.plan_of for these")
        limit = self.memory_limit if memory_limit is None else memory_limit
        bound = options.memory_limit(limit, PREFIX)
        with LOCK:
            # all is known from the last trace: refuse before any work
            options.guard(self.peak_nbytes(format), bound, PREFIX,
                          f"a refill in format {format!r} (predicted peak: the trace's "
                          f"{self._trace_peak:,} bytes of factors, or {self._live_end:,} bytes "
                          "of factors alive as the result is written, its arrays and the "
                          "writers' temporaries)")
            c = self._collect(args, limit, skip=True)
            if c.structure() != self._structure:  # the path changed with the values
                self.rebuilds += 1
                if c.skipped:  # the new path's own liveness, in full
                    c = self._collect(args, limit)
                self._adopt(c)
            else:
                self._measure(c)
            # the path may have changed: the write checked again, as this trace showed it
            options.guard(self._live_end + self._write_nbytes(format), bound, PREFIX,
                          f"the result(s) in format {format!r}, beside {self._live_end:,} "
                          "bytes of live Jacobian factors,")
            f = formats.get(format, require=False)
            data: dict[int, np.ndarray] = {}
            results = []
            for i, tr in self._layout:
                w, terms = self._blocks[i], c.blocks[i]
                if w.writes_directly:  # its pattern kept per format: the values alone
                    results.append(w.write(terms, c.labels, c.dtype, format, c.device))
                    continue
                if i not in data:  # once, for the block and its transposed copy
                    data[i] = w.values(terms, c.labels, c.dtype)
                results.append(on_device(w.kept.result(data[i], format, tr), f, c.device))
            return c.nest(results)


def plan_of(fn: Callable[..., Any], *args: Any, wrt: int | Sequence[int] = 0,
            memory_limit: float | None = None, order: int = 1,
            mode: str = "auto") -> ProgramPlan:
    """Trace ``fn(*args)`` once and keep its Jacobian's structure (``order=2``: its Hessian's,
    for a scalar ``fn``): a :class:`ProgramPlan` whose ``.jacobian(*new_args, format=...)``
    writes only values into the kept pattern. ``mode``: the order of accumulation, as for
    :func:`jacobian_of` (``"auto"`` is resolved on this trace and kept, :attr:`mode`).

    >>> import torch, sparsejac
    >>> w = torch.randn(4, 3, dtype=torch.float64)
    >>> p = sparsejac.plan_of(lambda x: torch.relu(x @ w), torch.randn(8, 4, dtype=torch.float64))
    >>> p.nnz, p.jacobian(torch.randn(8, 4, dtype=torch.float64), format="csr").shape
    (96, (24, 32))
    """
    with entry_point("plan_of"):
        _check(fn)
        if order not in (1, 2) or isinstance(order, bool):
            raise ArgumentError(f"{PREFIX}order={order!r}: 1 (Jacobians) or 2 (Hessians)")
        return ProgramPlan(fn, args, wrt, memory_limit, order, mode)


