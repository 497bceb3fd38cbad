"""The public entry points of programs: :func:`jacobian_of`."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import numpy as np

from .. import formats, options
from ..errors import ArgumentError, ArgumentTypeError, OperandTypeError
from . import custom, second
from . import terms as T
from . import write as W
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


def _conversion_nbytes(fmt, nnz, out_shape, inp_shape, itemsize, csr_bytes):
    """``(extra, final)``: the bytes :func:`formats.from_csr` allocates beside the CSR of ``nnz``
    entries (``csr_bytes``) to give ``fmt``, and those the result keeps."""
    return formats.get(fmt, require=False).from_csr_nbytes(nnz, out_shape, inp_shape, itemsize,
                                                          csr_bytes)


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


def _factors_nbytes(c: _Collected) -> int:
    """Bytes of the dense factors alive while the blocks are written: those of the blocks'
    terms, or the tracer's live factors where it holds more."""
    from .tracer import storage_nbytes

    held = storage_nbytes([f for terms in c.blocks for t in terms for f in t.held()])
    return max(held, c.labels.live()) + c.labels.tables_nbytes


def _symmetrise(csr):
    """Average a matrix with its transpose in place, where its pattern is symmetric (the two
    halves of a Hessian block are summed in other orders, so they differ by rounding)."""
    t = csr.T.tocsr()
    t.sort_indices()
    if np.array_equal(t.indptr, csr.indptr) and np.array_equal(t.indices, csr.indices):
        # in place: the mirror's values are t's copy (at 3e6 entries each temporary is 24 MB)
        np.add(csr.data, t.data, out=csr.data)
        np.multiply(csr.data, 0.5, out=csr.data)
    return csr


def _transposed(csr):
    t = csr.T.tocsr()
    t.sort_indices()
    return t


def _build(c: _Collected, fmt: str):
    """Write every block once (guarded), straight into ``fmt``'s arrays (:func:`.write.write`):
    a block that is one term (or terms nested in one) without index maps from its structure,
    the others (index maps, sums) merged once along the format's major axis. A Hessian's
    symmetric blocks (averaged with their transposes) and the blocks it also uses transposed
    (below the diagonal) keep the CSR path: merged once as CSR, which the average and the
    transpose need, then converted to ``fmt``."""
    live = _factors_nbytes(c)  # the factors stay alive while the blocks are written
    alive = ""
    if c.labels.peak:  # what the trace itself reached (checked before each allocation)
        alive = f", after a trace that peaked at {c.labels.peak:,} bytes of factors,"
    held, built = 0, []
    transposed = {b for b, tr in c.layout if tr}
    for i, (terms, (s1, s2)) in enumerate(zip(c.blocks, c.shapes)):
        nnz = sum(t.nnz(c.labels) for t in terms)
        copies = sum(1 for b, tr in c.layout if b == i)
        merged = i in c.symmetric or i in transposed
        if merged:
            peak, csr_bytes = T.materialise_nbytes(terms, s1, s2, c.labels, c.dtype)
            convert, final = _conversion_nbytes(fmt, nnz, s1, s2, c.dtype.itemsize, csr_bytes)
            peak = max(peak, csr_bytes + convert)
        else:
            peak, final = W.nbytes(terms, s1, s2, c.labels, c.dtype, fmt)
        what = (f"{c.what[i]} ({nnz:,} entries enumerated in {len(terms)} "
                f"term(s), format {fmt!r}){alive}")
        options.guard(held + peak, c.limit, PREFIX, what, used=live)
        if c.labels.room is not None:  # (what is written now is counted in the headroom)
            options.guard_room(peak, c.labels.room(), c.labels.reserve, PREFIX, what)
        if merged:
            csr = T.materialise(terms, s1, s2, c.labels, c.dtype)
            # its factors are written: freed before the average makes its transposed copy (a
            # Rosenbrock Hessian of 1e6 variables: 40 MB of factors beside 40 MB of copy); in
            # place, as the loop's zip and enumerate still hold the list
            terms.clear()
            built.append(_symmetrise(csr) if i in c.symmetric else csr)
        else:
            built.append(W.write(terms, s1, s2, c.labels, c.dtype, fmt, c.device))
        held += final * copies
    results = []
    for b, tr in c.layout:
        s1, s2 = c.shapes[b]
        if not (b in c.symmetric or b in transposed):
            results.append(built[b])
        else:
            f = formats.get(fmt, require=False)
            result = (f.from_csr(_transposed(built[b]), s2, s1) if tr
                      else f.from_csr(built[b], s1, s2))
            results.append(W.on_device(result, f, c.device))
    return c.nest(results)


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
        return _build(_jacobian_blocks(fn, args, wrt, memory_limit), format)


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
        return _build(_hessian_blocks(fn, args, wrt, memory_limit), format)


# --- traced plans ----------------------------------------------------------------------------


class _Block:
    """One block of a plan: its CSR pattern, and how each traced value lands in it."""

    def __init__(self, terms, out_shape, inp_shape, labels, dtype, symmetric=False) -> None:
        import torch

        self.out_shape, self.inp_shape = tuple(out_shape), tuple(inp_shape)
        shape = (math.prod(out_shape), math.prod(inp_shape))
        self.direct = W.direct(terms, labels)
        # the terms with their factors' shapes, strides and dtypes only: what a refill's
        # writers allocate is predicted from them before tracing again (:meth:`write_nbytes`)
        self.shadow = [T.Term(t.out, t.inp, _meta(t.factor), t.flabels) for t in terms]
        self.kept: list[int | None] = [None] * len(terms)  # entries kept of each mapped term
        self.cache: dict[str, Any] = {}
        self.patterns: dict[tuple, Any] = {}  # direct blocks: each format's kept pattern
        self.slots = None  # per term, where its kept values go (terms one entry a row)
        if self.direct or not terms:
            # the largest term's pattern holds the others' (W.nesting)
            csr = T.materialise([W.largest(terms, labels)] if terms else [], out_shape,
                                inp_shape, labels, dtype)
            self.slot = None
        elif any(t.mapped(labels) for t in terms) and T.by_rows_applies(terms, shape, labels):
            # the union merged row by row: no coordinates, and distinct slots within a term
            indptr, indices, self.slots, self.keeps = T.rows_pattern(terms, shape, labels)
            csr = T._csr(np.zeros(len(indices), dtype=_np_dtype(dtype)), indices, indptr, shape)
        else:  # several terms or index maps: coordinates once, then each value's slot
            rows, cols, keeps = [], [], []
            for term in terms:
                if term.mapped(labels):
                    r, c, keep = T.placed(term, labels)
                    r, c = r[keep], c[keep]
                    keeps.append(keep)
                    self.kept[len(keeps) - 1] = len(r)
                else:
                    s, _ = T._structure(term, labels)
                    pattern = formats.csr_pattern(s)
                    c = torch.from_numpy(np.asarray(pattern.indices, dtype=np.int64))
                    r = torch.from_numpy(np.repeat(np.arange(shape[0], dtype=np.int64),
                                                   np.diff(pattern.indptr)))
                    keeps.append(None)
                rows.append(r.cpu().numpy())
                cols.append(c.cpu().numpy())
            key = np.concatenate(rows) * shape[1] + np.concatenate(cols)
            unique, self.slot = np.unique(key, return_inverse=True)
            self.keeps = keeps
            idx = formats.index_dtype(max(len(unique), 1), shape)
            indptr = np.zeros(shape[0] + 1, dtype=idx)
            np.cumsum(np.bincount(unique // shape[1], minlength=shape[0]), out=indptr[1:])
            import scipy.sparse

            csr = scipy.sparse.csr_array(
                (np.zeros(len(unique), dtype=_np_dtype(dtype)), (unique % shape[1]).astype(idx),
                 indptr), shape=shape)
        # the torch formats' view of the kept arrays, made while they are writable: torch
        # warns on wrapping a read-only array (it cannot mark a tensor read-only), and a copy
        # per refill would be waste
        self.torch_csr = formats.CompressedPattern(torch.from_numpy(csr.indices),
                                                   torch.from_numpy(csr.indptr), csr.shape)
        for a in (csr.indices, csr.indptr):
            a.flags.writeable = False  # shared by every refill: read-only
        self.csr = csr
        self.nnz = csr.nnz
        self.mirror = None  # for a symmetric block: where each entry's mirror image is
        self.swap = None  # or, for one plain term, the axes of V that transposing swaps
        if symmetric:
            t = self._transpose_order()
            if np.array_equal(t.indptr, csr.indptr) and np.array_equal(t.indices, csr.indices):
                self.mirror = t.data
                if self.direct:
                    self._swap(W.largest(terms, labels), labels)

    def _swap(self, term, labels) -> None:
        """Where the block is one plain term whose transpose swaps labels of ``V`` (rows
        ``(b, i)`` and columns ``(b, k)``: ``V = (b, i, k)``, the mirror of ``v`` is ``v``
        with ``i`` and ``k`` swapped), keep that permutation of ``V``'s axes instead of the
        mirror's index array: the values are then averaged with a transposed view of
        themselves, without a gather. Checked against the mirror found from the pattern."""
        out, inp = term.out_atoms, term.inp_atoms
        sigma: dict[int, int] = {}
        for a, b in zip(out, inp):
            if sigma.setdefault(a, b) != b or sigma.setdefault(b, a) != a:
                return  # a label paired with two others: no permutation of V says it
        free = term.free(labels)
        if len(out) != len(inp) or set(sigma) != set(free):
            return
        perm = tuple(free.index(sigma[l]) for l in free)
        shape = labels.shape(free)
        order = np.arange(self.nnz, dtype=np.int64).reshape(shape).transpose(perm).reshape(-1)
        if np.array_equal(order, self.mirror):
            self.swap = (shape, perm)
            self.mirror = None

    def writes_directly(self, transposed: bool) -> bool:
        """Whether :meth:`write` writes this block: direct, used as it is (not also as a
        transpose), and not averaged with its mirror image (a symmetric Hessian block)."""
        return self.direct and self.mirror is None and self.swap is None and not transposed

    def write(self, terms, labels, dtype, fmt: str, device) -> Any:
        """A direct block (one term, no index map) written in ``fmt``: its pattern for that
        format and device made once and kept (read-only), the values written straight into
        the format's order (:mod:`.write`)."""
        f = formats.get(fmt, require=False)
        xp = W.backend(f, device)
        term = W.largest(terms, labels)
        structure, _ = T._structure(term, labels)
        key = (f.name, xp.name, str(device))
        if key not in self.patterns:
            if f.layout is formats.CSR and xp is W.NUMPY:
                pattern = self._kept_csr(f)  # the kept CSR arrays themselves
            else:
                pattern = W.pattern(term, structure, f, self.out_shape, self.inp_shape, xp)
                for a in f.layout.arrays(pattern):
                    if isinstance(a, np.ndarray):
                        a.flags.writeable = False  # shared by every refill: read-only
            self.patterns[key] = pattern
        return W.container(terms, labels, f, dtype, xp, self.patterns[key], self.out_shape,
                           self.inp_shape)

    def _kept_csr(self, f: formats.Format) -> Any:
        """The kept CSR pattern for ``f``: the arrays, or for a torch format tensors sharing
        their memory (:attr:`torch_csr`; a transposed block's mirror has no such view, and its
        arrays are writable)."""
        return self.torch_csr if f.on_torch and self.torch_csr is not None else self.csr

    def _transpose_order(self):
        """The transposed pattern, its data the position of each entry in this block's."""
        import scipy.sparse

        order = scipy.sparse.csr_array(
            (np.arange(self.nnz, dtype=np.int64), self.csr.indices, self.csr.indptr),
            shape=self.csr.shape)
        t = order.T.tocsr()
        t.sort_indices()
        return t

    def data(self, terms, labels, dtype) -> np.ndarray:
        if self.swap is not None:  # exactly symmetric: (a + b) / 2 with b a's mirror
            shape, perm = self.swap
            if len(terms) == 1:  # the values are the factor spread: a view, no copy
                s, fl = T._structure(terms[0], labels)
                spread = s.spread(T._numpy_factor(terms[0], dtype), fl)
            else:  # nested terms (W.nesting): the largest's values with the others added
                spread = W.values(terms, labels, formats.get("csr", require=False),
                                  dtype).reshape(shape)
            data = np.empty(self.nnz, dtype=_np_dtype(dtype))
            view = data.reshape(shape)
            np.add(spread, spread.transpose(perm), out=view)
            np.multiply(view, 0.5, out=view)
            return data
        data = self._data(terms, labels, dtype)
        if self.mirror is not None:  # exactly symmetric, as hessian_of gives it
            # in place on the mirrored copy: two arrays at once whether or not numpy elides
            # the temporaries of (data + data[mirror]) * 0.5 (the same sums: + commutes)
            mirrored = data[self.mirror]
            mirrored += data
            mirrored *= 0.5
            data = mirrored
        return data

    def _data(self, terms, labels, dtype) -> np.ndarray:
        np_dtype = _np_dtype(dtype)
        if self.direct:
            return W.values(terms, labels, formats.get("csr", require=False), dtype)
        if not terms:
            return np.zeros(0, dtype=np_dtype)
        if self.slots is not None:
            data = np.zeros(self.nnz, dtype=np_dtype)
            for term, slot, keep in zip(terms, self.slots, self.keeps):
                T.add_values(data, slot, term, labels, dtype, keep)
            return data
        parts = []
        for term, keep in zip(terms, self.keeps):
            if keep is None:
                s, fl = T._structure(term, labels)
                d = np.empty(s.nnz, dtype=np_dtype)
                formats.fill_values(s, T._numpy_factor(term, dtype), fl, d)
                parts.append(d)
            else:
                parts.append(T.values(term, labels, dtype, keep.to(term.factor.device))
                              .detach().cpu().numpy())
        return np.bincount(self.slot, weights=np.concatenate(parts),
                           minlength=self.nnz).astype(np_dtype)

    def result(self, data: np.ndarray, fmt: str, transposed: bool = False):
        import scipy.sparse

        if transposed:  # a Hessian's block below the diagonal: the mirror of one above
            if "T" not in self.cache:
                t = self._transpose_order()
                perm = t.data
                t.data = np.zeros(0)
                self.cache["T"] = _Block.__new__(_Block)
                mirror = self.cache["T"]
                mirror.out_shape, mirror.inp_shape = self.inp_shape, self.out_shape
                mirror.csr = scipy.sparse.csr_array(
                    (np.zeros(self.nnz, dtype=data.dtype), t.indices, t.indptr),
                    shape=t.shape)
                mirror.nnz, mirror.cache, mirror.perm = self.nnz, {}, perm
                mirror.torch_csr = None  # its arrays are its own, writable
            mirror = self.cache["T"]
            return mirror.result(data[mirror.perm], fmt)
        f = formats.get(fmt, require=False)
        if f.layout is formats.CSR:  # the kept arrays themselves, no copy
            return f.container(self._kept_csr(f), data, self.out_shape, self.inp_shape)
        if fmt not in self.cache and f.layout is formats.COO:
            # the coordinates written from the kept rows and columns (as the first call's
            # writer writes them, W.rows_to_coords): the values stay in the CSR's order
            idx = f.index_itemsize(self.nnz, self.out_shape, self.inp_shape)
            self.cache[fmt] = (W.rows_to_coords(self.csr.indptr, self.csr.indices,
                                                self.out_shape, self.inp_shape,
                                                W.NUMPY.index(idx)), None)
        if fmt not in self.cache:  # the format's pattern, and where each CSR value goes in it
            order = scipy.sparse.csr_array(
                (np.arange(self.nnz, dtype=np.int64), self.csr.indices, self.csr.indptr),
                shape=self.csr.shape)
            self.cache[fmt] = f.pattern_from_csr(order, self.out_shape, self.inp_shape)
        pattern, perm = self.cache[fmt]
        return f.container(pattern, data if f.layout.csr_order else data[perm], self.out_shape,
                           self.inp_shape)

    # --- what a refill allocates, predicted before it traces (the writers above, in step) ---

    def write_nbytes(self, fmt: str, dtype, labels: T.Labels, device) -> tuple[int, int]:
        """``(peak, kept)`` bytes of :meth:`write`: the format's pattern where it is not kept
        yet (then as :func:`.write.nbytes` predicts the first call's), else the values and the
        factor's copies (cast, laid out in ``V`` order, float16 held as float32)."""
        f = formats.get(fmt, require=False)
        xp = W.backend(f, device)
        if (f.name, xp.name, str(device)) not in self.patterns and not (
                f.layout is formats.CSR and xp is W.NUMPY):
            return W.nbytes(self.shadow, self.out_shape, self.inp_shape, labels, dtype, f)
        big = W.largest(self.shadow, labels)
        structure, fl = T._structure(big, labels)
        nnz, itemsize = structure.nnz, dtype.itemsize
        value = np.dtype(f.value_dtype(_np_dtype(dtype))).itemsize
        fill = nnz * itemsize + T._copy_nbytes(big, f.layout.target(structure), fl, dtype)
        cast = nnz * (itemsize + value) if value != itemsize else 0
        return max(fill, cast), nnz * value

    def data_nbytes(self, dtype, labels: T.Labels) -> tuple[int, int]:
        """``(peak, kept)`` bytes of :meth:`data`: each term's values, their concatenation,
        ``np.bincount``'s float64 weights and sums, the cast back (and a mirror's average)."""
        it = np.dtype(_np_dtype(dtype)).itemsize
        nnz = self.nnz
        if self.direct:
            big = W.largest(self.shadow, labels)
            s, fl = T._structure(big, labels)
            peak = nnz * it + T._copy_nbytes(big, s, fl, dtype)
            if len(self.shadow) > 1 and self.swap is not None:  # W.values, then the average
                peak += nnz * it
        elif not self.shadow:
            return 0, 0
        elif self.slots is not None:  # merged row by row: each term's values added at slots
            # (its values, numpy's gather of data[slot] and the sum; a bound: m entries kept)
            peak = nnz * it + max(3 * t.nnz(labels) * it for t in self.shadow)
        else:
            parts = peak = 0
            for term, kept in zip(self.shadow, self.kept):
                if kept is None:  # unmapped: written by its structure, as the first call
                    s, fl = T._structure(term, labels)
                    n = s.nnz * it
                    peak = max(peak, parts + n + T._copy_nbytes(term, s, fl, dtype))
                else:  # mapped: the factor cast, spread over V (a copy unless it is V), kept
                    free = term.free(labels)
                    size = labels.size(free)
                    cast = term.factor.numel() * it if term.factor.dtype != dtype else 0
                    order = [term.flabels.index(l) for l in free if l in term.flabels]
                    view = (term.factor.numel() == size
                            and term.factor.permute(order).is_contiguous())
                    n = kept * it
                    peak = max(peak, parts + cast + (0 if view else size * it) + n)
                parts += n
            wide = parts // it * 8 if it != 8 else 0  # bincount reads its weights as float64
            peak = max(peak, 2 * parts + wide + nnz * 8, parts + nnz * (8 + it))
        if self.mirror is not None:  # the mirrored copy, averaged in place
            peak = max(peak, 2 * nnz * it)
        return peak, nnz * it

    def result_nbytes(self, fmt: str, transposed: bool, itemsize: int) -> tuple[int, int]:
        """``(peak, kept)`` bytes of :meth:`result` beside its values: the format's pattern
        where it is not kept yet (an upper bound: a conversion of the CSR), the values
        permuted into its order."""
        f = formats.get(fmt, require=False)
        nnz, peak, kept = self.nnz, 0, 0
        if transposed and "T" not in self.cache:  # the transposed order, kept
            idx = self.csr.indices.itemsize
            order = nnz * (8 + idx) + (self.csr.shape[1] + 1) * idx
            peak, kept = nnz * 8 + order, order + nnz * itemsize
        if transposed:
            peak, kept = max(peak, kept + nnz * itemsize), kept + nnz * itemsize
        if f.layout is formats.CSR:
            return peak, kept
        cache = self.cache["T"].cache if transposed and "T" in self.cache else self.cache
        out, inp = ((self.inp_shape, self.out_shape) if transposed
                    else (self.out_shape, self.inp_shape))
        during = kept
        if fmt not in cache and f.layout is formats.COO:  # coordinates from the kept rows
            idx = f.index_itemsize(nnz, out, inp)
            coords = nnz * (len(out) + len(inp)) * idx
            peak = max(peak, kept + coords + W.rows_to_coords_nbytes(
                nnz, out, inp, idx, self.csr.indices.itemsize))
            during = kept = kept + coords
        elif fmt not in cache:  # the positions (int64) as a CSR, converted: the pattern kept
            csr = nnz * 8 + self.csr.indices.nbytes + self.csr.indptr.nbytes
            extra, final = _conversion_nbytes(fmt, nnz, out, inp, 8, csr)
            peak = max(peak, kept + nnz * 8 + extra)
            # the positions stay alive until the result is made
            during, kept = kept + final + nnz * 8, kept + final
        if not f.layout.csr_order:
            peak, kept = max(peak, during + nnz * itemsize), kept + nnz * itemsize
        return peak, kept


def _nothing_live() -> int:
    return 0


def _meta(factor):
    """An unallocated tensor with ``factor``'s shape, strides and dtype."""
    import torch

    return torch.empty_strided(tuple(factor.shape), factor.stride(), dtype=factor.dtype,
                               device="meta")


def _np_dtype(dtype):
    from ..operands import _numpy_dtype

    return _numpy_dtype(dtype)


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
        self._blocks = [_Block(terms, s1, s2, c.labels, c.dtype, i in c.symmetric)
                        for i, (terms, (s1, s2)) in enumerate(zip(c.blocks, c.shapes))]
        self._labels, self._device = c.labels, c.device  # what the shadow terms refer to
        self._measure(c)
        c.labels.live = _nothing_live  # kept, the labels must not keep the tracer (its tape)

    def _measure(self, c: _Collected) -> None:
        """Keep what a trace showed: the peak its factors reached (checked before each
        allocation) and the bytes of those alive when it ends, beside which the writers run."""
        self._trace_peak, self._live_end = c.labels.peak, _factors_nbytes(c)

    def _write_nbytes(self, fmt: str) -> int:
        """The bytes the writers of :meth:`jacobian` hold at their peak, every result kept
        until the last is written (as :meth:`jacobian` writes them)."""
        itemsize = np.dtype(_np_dtype(self.dtype)).itemsize
        transposed = {i for i, tr in self._layout if tr}
        held = peak = 0
        done: set[int] = set()
        for i, tr in self._layout:
            b = self._blocks[i]
            if b.writes_directly(i in transposed):
                p, kept = b.write_nbytes(fmt, self.dtype, self._labels, self._device)
            else:
                p = kept = 0
                if i not in done:  # each block's values once, kept for its transposed copy
                    p, kept = b.data_nbytes(self.dtype, self._labels)
                    done.add(i)
                p2, k2 = b.result_nbytes(fmt, tr, itemsize)
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
        return sum(self._blocks[b].nnz for b, _ in self._layout)

    @property
    def shape(self):
        """``out.shape + arg.shape`` of the first block."""
        b = self._blocks[0]
        return b.out_shape + b.inp_shape

    @property
    def matrix_shape(self):
        return self._blocks[0].csr.shape

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
            idx = 0 if f.layout is formats.COO else b.csr.indices.itemsize
            total += f.nbytes(b.nnz, out, inp, itemsize, idx)
        return total

    def pattern(self, format: str = "coo"):
        """The first block's pattern: a boolean array in ``format`` (ones where stored)."""
        b = self._blocks[0]
        return b.result(np.ones(b.nnz, dtype=bool), format)

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
            transposed = {i for i, tr in self._layout if tr}
            data: dict[int, np.ndarray] = {}
            results = []
            for i, tr in self._layout:
                b, terms = self._blocks[i], c.blocks[i]
                if b.writes_directly(i in transposed):
                    results.append(b.write(terms, c.labels, c.dtype, format, c.device))
                    continue
                if i not in data:
                    data[i] = b.data(terms, c.labels, c.dtype)
                f = formats.get(format, require=False)
                results.append(W.on_device(b.result(data[i], format, tr), f, c.device))
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


