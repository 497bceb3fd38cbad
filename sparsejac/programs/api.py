"""The public entry points of programs: :func:`jacobian_of`."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import numpy as np

from .. import formats, options
from ..errors import ArgumentError, ArgumentTypeError, OperandTypeError
from . import custom, second
from . import terms as T
from .write import assemble as A
from .write.base import on_device
from .write.choose import writer_for
from .write.plans import shadow
from ..operands import numpy_dtype
from .tracer import LOCK, PREFIX, make_tracer


def load() -> Any:
    """torch, and the rules (importing them fills the registry); on the first call only."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{PREFIX}tracing needs torch: pip install 'einsum-sparsejac[torch]'") from None
    from . import rules  # noqa: F401

    return torch


def _as_tensor(torch, x: Any, where: str):
    if isinstance(x, torch.Tensor):
        if x.layout != torch.strided:
            raise OperandTypeError(f"{PREFIX}{where} has layout {x.layout}; pass a dense tensor")
        if x.device.type == "meta":
            raise OperandTypeError(f"{PREFIX}{where} is on the meta device; it has no values")
        return x.detach()
    if isinstance(x, (np.ndarray, np.generic, int, float)) and not isinstance(x, bool):
        array = np.asarray(x)
        if array.dtype.kind not in "iuf":
            raise OperandTypeError(
                f"{PREFIX}{where} has dtype {array.dtype}; expected integers or floats")
        return torch.from_numpy(np.array(array))
    raise OperandTypeError(
        f"{PREFIX}{where} is a {type(x).__name__}; pass a torch tensor, a numpy array, or a "
        "tuple, list or dict of them")


def _autograd_on(collect: Callable) -> Callable:
    """Run a trace, and what follows it, with grad mode on and inference mode off whatever the
    caller's, as ``torch.func``'s transforms ignore an outer ``no_grad``: ``fn``'s own no_grad
    and inference_mode regions are then what the tracer sees as constant
    (:func:`~sparsejac.programs.tracer.recording`), and the Hessian's backward pass runs."""

    @functools.wraps(collect)
    def collect_with_autograd(*args, **kwargs):
        torch = load()
        with torch.inference_mode(False), torch.enable_grad():
            return collect(*args, **kwargs)

    return collect_with_autograd


# under the default limit, this share of the headroom at the start is kept back from the
# allocations the guard admits (threads' stacks and arenas, Python's objects, the allocator's
# pieces), checked against the process's headroom as it runs
ROOM_RESERVE = 16


def _trace(fn, args, wrt, memory_limit, second: bool = False, skip: dict | None = None):
    """Trace ``fn(*args)``: the tracer, the differentiated positions, the arguments' leaves and
    tree specs, the output's leaves and spec, the labels, the dtype and the limit. ``second``:
    also record the steps and let torch's autograd follow them (for the adjoints), and which
    rule calls read which (:meth:`Tracer.dead_calls`); or, given ``skip`` (a refill), form no
    terms for those calls."""
    torch = load()
    from torch.utils import _pytree as pytree

    positions = options.wrt_indices(wrt, len(args), PREFIX, "argument")
    limit = options.memory_limit(memory_limit, PREFIX)
    flat_args, specs = [], []
    for i, a in enumerate(args):
        leaves, spec = pytree.tree_flatten(a)
        where = [f"argument {i}" + (f" leaf {j}" if spec.num_leaves != 1 or not spec.is_leaf()
                                    else "") for j in range(len(leaves))]
        flat_args.append([_as_tensor(torch, x, w) for x, w in zip(leaves, where)])
        specs.append(spec)
    diff = []
    for p in positions:
        for j, t in enumerate(flat_args[p]):
            if not t.is_floating_point():
                raise OperandTypeError(
                    f"{PREFIX}argument {p}" + (f" leaf {j}" if len(flat_args[p]) > 1 else "")
                    + f" (differentiated) has dtype {t.dtype}; it must be a real floating-point "
                    "tensor")
            diff.append(t)
    if not diff:
        raise OperandTypeError(f"{PREFIX}the differentiated argument(s) {positions} hold no tensor")
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in diff))
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    labels = T.Labels(limit, PREFIX)
    if memory_limit is None and limit is not None:  # the default: the process's own headroom
        labels.room, labels.reserve = options.Headroom(), limit // ROOM_RESERVE
    tracer = make_tracer(labels, dtype)
    if second:
        tracer.tape = []
        tracer.reads, tracer.skip = ([], None) if skip is None else (None, skip)
        # the argument itself (``_as_tensor`` detached it), not a copy: 8 MB at 1e6 variables
        # (an inference tensor, made under inference_mode, cannot require grad: a copy then)
        flat_args = [[(t.clone() if t.is_inference() else t).detach().requires_grad_(True)
                      if (p in positions) else t
                      for t in leaves] for p, leaves in enumerate(flat_args)]
    for p in sorted(set(positions)):
        for j, t in enumerate(flat_args[p]):
            if t.numel():  # an empty argument has no columns: nothing depends on it
                tracer.record(t, {(p, j): [T.identity(tuple(t.shape), labels, dtype, t.device)]},
                              value=False)  # the caller's tensor, beside the limit
    call_args = [pytree.tree_unflatten(leaves, spec) for leaves, spec in zip(flat_args, specs)]
    # (grad mode on, inference mode off: :func:`_autograd_on`) custom Functions reach the
    # tracer while ``fn`` runs (:func:`custom.intercepting`)
    fn = custom.rebound(fn)
    with tracer, custom.intercepting():
        out = fn(*call_args)
    out_leaves, out_spec = pytree.tree_flatten(out)
    for o in out_leaves:
        if not isinstance(o, torch.Tensor):
            raise ArgumentTypeError(
                f"{PREFIX}fn must return a torch tensor (or a tuple, list or dict of them), got "
                f"{type(o).__name__}")
    return tracer, positions, flat_args, specs, out_leaves, out_spec, labels, dtype, limit


class _Collected:
    """What one trace gives: the terms of each block (one Jacobian or Hessian block), its
    shapes, and where each block goes in the nested result (``layout``: block index and
    whether it is transposed, in the order of the result's leaves; ``nest`` rebuilds it)."""

    def __init__(self, blocks, shapes, labels, dtype, limit, layout, nest, what, sym=()):
        # ``what``: a name for each block, for the guard's messages
        self.blocks, self.shapes, self.labels, self.dtype = blocks, shapes, labels, dtype
        self.limit, self.layout, self.nest, self.what = limit, layout, nest, what
        self.symmetric = set(sym)  # blocks that are symmetric (a Hessian's diagonal blocks)
        self.device = None  # the differentiated arguments' device (a CUDA one keeps results)
        for terms in blocks:  # products still unformed are formed now, each under the trace's
            for t in terms:   # guard, so that the writers' guard counts them as live factors
                t.factor

    def structure(self) -> tuple:
        """What the pattern depends on: every term's axes and sizes, and its index maps."""
        labels, parts = self.labels, [tuple(self.shapes)]
        for terms in self.blocks:
            for t in terms:
                atoms = t.out_atoms + t.inp_atoms
                used = labels.base(atoms) + tuple(a for a in atoms if a in labels.derived)
                tables = tuple((labels.derived[a][1], labels.derived[a][0].cpu().numpy().tobytes())
                               for a in atoms if a in labels.derived)
                parts.append((t.out, t.inp, tuple(labels.sizes[l] for l in used), tables))
        return tuple(parts)


@_autograd_on
def _jacobian_blocks(fn, args, wrt, memory_limit) -> _Collected:
    from torch.utils import _pytree as pytree

    (tracer, positions, flat_args, specs, out_leaves, out_spec, labels, dtype,
     limit) = _trace(fn, args, wrt, memory_limit)
    blocks, shapes, what = [], [], []
    for i, o in enumerate(out_leaves):
        out_terms = tracer.terms(o) or {}
        for p in positions:
            for j, t in enumerate(flat_args[p]):
                blocks.append(out_terms.get((p, j), []))
                shapes.append((tuple(o.shape), tuple(t.shape)))
                what.append("the Jacobian" + (f" of output leaf {i}" if len(out_leaves) > 1
                                              else "") + f" w.r.t. argument {p}"
                            + (f" leaf {j}" if len(flat_args[p]) > 1 else ""))
    sizes = [len(flat_args[p]) for p in positions]

    def nest(results):
        it, per_out = iter(results), []
        for _ in out_leaves:
            per_wrt = [pytree.tree_unflatten([next(it) for _ in range(n)], specs[p])
                       for p, n in zip(positions, sizes)]
            per_out.append(tuple(per_wrt) if isinstance(wrt, (tuple, list)) else per_wrt[0])
        return pytree.tree_unflatten(per_out, out_spec)

    layout = [(i, False) for i in range(len(blocks))]
    c = _Collected(blocks, shapes, labels, dtype, limit, layout, nest, what)
    c.device = flat_args[positions[0]][0].device
    return c


@_autograd_on
def _hessian_blocks(fn, args, wrt, memory_limit, skip: dict | None = None) -> _Collected:
    """The Hessian's blocks on and above the diagonal (those below are their transposes).
    ``skip``: rule calls whose first-order terms nothing read in the plan's trace (a refill);
    the result's ``dead`` gives them after a full trace, ``skipped`` whether any was skipped
    and ``read_dead`` whether a rule wanted skipped terms after all (then the blocks are
    wrong: the caller traces again in full)."""
    import torch
    from torch.utils import _pytree as pytree

    from ..errors import ShapeError

    (tracer, positions, flat_args, specs, out_leaves, out_spec, labels, dtype,
     limit) = _trace(fn, args, wrt, memory_limit, second=True, skip=skip)
    if len(out_leaves) != 1 or out_leaves[0].numel() != 1:
        raise ShapeError(f"{PREFIX}hessian_of needs fn to return one scalar tensor; got "
                         f"{[tuple(o.shape) for o in out_leaves]}")
    out = out_leaves[0]
    found: dict = {}
    steps = tracer.tape
    tracer.tape = None  # ``steps`` holds what is still needed, and lets go of it step by step
    # only the first-order terms of the steps' inputs are read from here on: the others
    # (tensors the program still holds, the output's) are dropped now
    tracer.keep_only([params for _, params, _, _ in steps])
    tracer._forget(id(out))  # the output's own first-order terms (a gradient): unused
    leaves = [t for p in positions for t in flat_args[p] if t.requires_grad]
    if out.requires_grad and steps:
        # the backward pass leaves each step's adjoint in its slot (the tape's hooks); the
        # gradient it returns is dropped at once, and so is autograd's graph
        torch.autograd.grad(out.reshape(()), leaves, allow_unused=True)
        del out, out_leaves
        tracer.pending = {}
        for i in range(len(steps)):
            rule, params, result, slot = steps[i]
            ybar = slot.pop("ybar", None)
            # each step's tensors (and, through the tracer's weak references, the first-order
            # terms of those no later step uses) are freed once its terms are formed: at a
            # million variables every intermediate and its factor is 8 MB
            steps[i] = None
            if ybar is not None:  # None: the output does not depend on this step
                labels.prefix = f"{PREFIX}{rule.name!r} (second order): "
                for k1, k2, term in rule.second(tracer, result, ybar.detach().to(dtype),
                                                **params):
                    found.setdefault((k1, k2), []).append(term)
            del rule, params, result, ybar
        labels.prefix = f"{PREFIX}second order: "
        for k1, k2, term in second.flush(tracer):
            found.setdefault((k1, k2), []).append(term)
        labels.prefix = PREFIX
    # The steps' inputs hold their first-order terms in the tracer (and the tracer and the
    # labels hold each other: only the cyclic collector would free them): let them go before
    # the blocks are merged and written.
    steps = None  # noqa: F841
    keys = list(dict.fromkeys((p, j) for p in positions for j in range(len(flat_args[p]))))
    shape = {k: tuple(flat_args[k[0]][k[1]].shape) for k in keys}
    index, blocks, shapes, sym, what = {}, [], [], [], []
    for a, k1 in enumerate(keys):
        for k2 in keys[a:]:
            index[(k1, k2)] = len(blocks)
            if k1 == k2:
                sym.append(len(blocks))
            blocks.append(T.merge(found.get((k1, k2), []), labels))
            shapes.append((shape[k1], shape[k2]))
            what.append(f"the Hessian block of argument leaves {k1} and {k2}")
    layout = []
    for p1 in positions:
        for i in range(len(flat_args[p1])):
            for p2 in positions:
                for j in range(len(flat_args[p2])):
                    k1, k2 = (p1, i), (p2, j)
                    layout.append((index[(k1, k2)], False) if (k1, k2) in index
                                  else (index[(k2, k1)], True))

    def nest(results):
        it = iter(results)
        rows = []
        for p1 in positions:
            per_leaf = []
            for _ in range(len(flat_args[p1])):
                per_p2 = [pytree.tree_unflatten([next(it) for _ in flat_args[p2]], specs[p2])
                          for p2 in positions]
                per_leaf.append(tuple(per_p2) if isinstance(wrt, (tuple, list)) else per_p2[0])
            rows.append(pytree.tree_unflatten(per_leaf, specs[p1]))
        return tuple(rows) if isinstance(wrt, (tuple, list)) else rows[0]

    c = _Collected(blocks, shapes, labels, dtype, limit, layout, nest, what, sym)
    c.device = flat_args[positions[0]][0].device
    c.dead = tracer.dead_calls() if tracer.reads is not None else None
    c.skipped, c.read_dead = bool(skip), tracer.read_dead
    return c


def jacobian_of(
    fn: Callable[..., Any],
    *args: Any,
    wrt: int | Sequence[int] = 0,
    format: str = "coo",
    memory_limit: float | None = None,
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

    >>> import torch, sparsejac
    >>> x = torch.randn(8, 4, dtype=torch.float64)
    >>> w1, w2 = torch.randn(4, 6, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    >>> J = sparsejac.jacobian_of(lambda x: torch.tanh(x @ w1) @ w2, x)
    >>> J.shape, J.nnz      # per-sample blocks only: 8 * 3 * 4
    ((8, 3, 8, 4), 96)
    """
    if not callable(fn):
        raise ArgumentTypeError(f"{PREFIX}fn must be callable, got {type(fn).__name__}")
    formats.get(format, PREFIX)  # the name, and its package installed
    with LOCK:
        return A.build(_jacobian_blocks(fn, args, wrt, memory_limit), format)


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
    if not callable(fn):
        raise ArgumentTypeError(f"hessian_of: fn must be callable, got {type(fn).__name__}")
    formats.get(format, PREFIX)  # the name, and its package installed
    with LOCK:
        return A.build(_hessian_blocks(fn, args, wrt, memory_limit), format)


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

    def __init__(self, fn, args, wrt, memory_limit, order: int = 1) -> None:
        self.fn, self.wrt, self.memory_limit, self.order = fn, wrt, memory_limit, order
        self.rebuilds = 0
        with LOCK:
            self._adopt(self._collect(args, memory_limit))
        self._args_key = _signature(args)

    def _collect(self, args, limit, skip: bool = False) -> _Collected:
        """Trace ``fn(*args)``; ``skip``: a Hessian's first-order terms that the last full
        trace showed nobody reads are not formed (:meth:`Tracer.dead_calls`)."""
        if self.order != 2:
            return _jacobian_blocks(self.fn, args, self.wrt, limit)
        c = _hessian_blocks(self.fn, args, self.wrt, limit, self._dead if skip else None)
        if c.read_dead:  # the path changed and reads what was skipped: trace it in full
            c = _hessian_blocks(self.fn, args, self.wrt, limit)
        return c

    def _adopt(self, c: _Collected) -> None:
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

    def _measure(self, c: _Collected) -> None:
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
        dtypes as the plan's), nested as :func:`jacobian_of` (:func:`hessian_of`) nests it."""
        formats.get(format, PREFIX)  # the name, and its package installed
        key = _signature(args)
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
                if getattr(c, "skipped", False):  # the new path's own liveness, in full
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

    hessian = jacobian


def _signature(args) -> tuple:
    """Shapes and dtypes of every leaf of ``args``."""
    from torch.utils import _pytree as pytree

    return tuple((tuple(np.shape(x)), getattr(x, "dtype", np.asarray(x).dtype))
                 for x in pytree.tree_leaves(args))


def plan_of(fn: Callable[..., Any], *args: Any, wrt: int | Sequence[int] = 0,
            memory_limit: float | None = None, order: int = 1) -> ProgramPlan:
    """Trace ``fn(*args)`` once and keep its Jacobian's structure (``order=2``: its Hessian's,
    for a scalar ``fn``): a :class:`ProgramPlan` whose ``.jacobian(*new_args, format=...)``
    writes only values into the kept pattern.

    >>> import torch, sparsejac
    >>> w = torch.randn(4, 3, dtype=torch.float64)
    >>> p = sparsejac.plan_of(lambda x: torch.relu(x @ w), torch.randn(8, 4, dtype=torch.float64))
    >>> p.nnz, p.jacobian(torch.randn(8, 4, dtype=torch.float64), format="csr").shape
    (96, (24, 32))
    """
    if not callable(fn):
        raise ArgumentTypeError(f"{PREFIX}fn must be callable, got {type(fn).__name__}")
    if order not in (1, 2) or isinstance(order, bool):
        raise ArgumentError(f"{PREFIX}order={order!r}: 1 (Jacobians) or 2 (Hessians)")
    return ProgramPlan(fn, args, wrt, memory_limit, order)


