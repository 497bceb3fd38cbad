"""The public entry points of programs: :func:`jacobian_of`."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import numpy as np

from .. import formats, options
from ..errors import ArgumentTypeError, OperandTypeError
from ..formats import FORMATS
from . import terms as T
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
    nrows, ncols = math.prod(out_shape), math.prod(inp_shape)
    idx = formats.index_dtype(nnz, (nrows, ncols)).itemsize
    if fmt in ("csr", "torch_csr"):
        return 0, csr_bytes
    if fmt == "csc":
        extra = nnz * (idx + itemsize) + (ncols + 1) * idx
        return extra, extra
    ndim = len(out_shape) + len(inp_shape)
    cidx = 8 if fmt == "torch" else formats.index_dtype(nnz, out_shape + inp_shape).itemsize
    coords = nnz * ndim * cidx
    extra = max(nrows * (8 + idx) + nnz * 8, nnz * 8 * (1 + ndim) + coords)
    return extra, nnz * itemsize + coords


def _trace(fn, args, wrt, memory_limit, second: bool = False):
    """Trace ``fn(*args)``: the tracer, the differentiated positions, the arguments' leaves and
    tree specs, the output's leaves and spec, the labels, the dtype and the limit. ``second``:
    also record the steps and let torch's autograd follow them (for the adjoints)."""
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
    tracer = make_tracer(labels, dtype)
    if second:
        tracer.tape = []
        flat_args = [[t.clone().requires_grad_(True) if (p in positions) else t
                      for t in leaves] for p, leaves in enumerate(flat_args)]
    for p in sorted(set(positions)):
        for j, t in enumerate(flat_args[p]):
            tracer.record(t, {(p, j): [T.identity(tuple(t.shape), labels, dtype)]})
    call_args = [pytree.tree_unflatten(leaves, spec) for leaves, spec in zip(flat_args, specs)]
    import contextlib

    with tracer, (contextlib.nullcontext() if second else torch.no_grad()):
        out = fn(*call_args)
    out_leaves, out_spec = pytree.tree_flatten(out)
    for o in out_leaves:
        if not isinstance(o, torch.Tensor):
            raise ArgumentTypeError(
                f"{PREFIX}fn must return a torch tensor (or a tuple, list or dict of them), got "
                f"{type(o).__name__}")
    return tracer, positions, flat_args, specs, out_leaves, out_spec, labels, dtype, limit


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
    options.choice(format, "format", FORMATS, PREFIX)
    with LOCK:
        (tracer, positions, flat_args, specs, out_leaves, out_spec, labels, dtype,
         limit) = _trace(fn, args, wrt, memory_limit)
        from torch.utils import _pytree as pytree

        held = 0  # bytes of the results already built: all of them are returned together
        per_out = []
        for o in out_leaves:
            out_terms = tracer.terms(o) or {}
            out_shape = tuple(o.shape)
            per_wrt = []
            for p in positions:
                blocks = []
                for j, t in enumerate(flat_args[p]):
                    terms = out_terms.get((p, j), [])
                    inp_shape = tuple(t.shape)
                    nnz = sum(x.nnz(labels) for x in terms)
                    peak, csr_bytes = T.materialise_nbytes(terms, out_shape, inp_shape, labels,
                                                           dtype)
                    convert, final = _conversion_nbytes(format, nnz, out_shape, inp_shape,
                                                        dtype.itemsize, csr_bytes)
                    options.guard(
                        held + max(peak, csr_bytes + convert), limit, PREFIX,
                        f"the Jacobian w.r.t. argument {p} ({nnz:,} structural nonzeros in "
                        f"{len(terms)} term(s), format {format!r})")
                    csr = T.materialise(terms, out_shape, inp_shape, labels, dtype)
                    blocks.append(formats.from_csr(csr, format, out_shape, inp_shape))
                    del csr
                    held += final
                per_wrt.append(pytree.tree_unflatten(blocks, specs[p]))
            per_out.append(tuple(per_wrt) if isinstance(wrt, (tuple, list)) else per_wrt[0])
        return pytree.tree_unflatten(per_out, out_spec)


# --- traced plans ----------------------------------------------------------------------------


def _values(term, labels, dtype, keep=None):
    """A term's values, flat over ``V`` in the order of :func:`terms.entries` (``keep``: the
    entries that have a place)."""
    free = term.free(labels)
    shape = labels.shape(free)
    values = T._align(term.factor.to(dtype), term.flabels, free).expand(shape).reshape(-1)
    return values if keep is None else values[keep]


class _Block:
    """One Jacobian of a plan: its CSR pattern, and how each traced value lands in it."""

    def __init__(self, terms, out_shape, inp_shape, labels, dtype) -> None:
        import torch

        self.out_shape, self.inp_shape = tuple(out_shape), tuple(inp_shape)
        shape = (math.prod(out_shape), math.prod(inp_shape))
        self.direct = len(terms) == 1 and not terms[0].mapped(labels)
        self.cache: dict[str, Any] = {}
        if self.direct or not terms:
            csr = T.materialise(terms, out_shape, inp_shape, labels, dtype)
            self.slot = None
        else:  # several terms or index maps: coordinates once, then each value's slot
            rows, cols, keeps = [], [], []
            for term in terms:
                if term.mapped(labels):
                    r, c, _ = T.entries(term, labels, dtype)
                    keeps.append(self._keep(term, labels))
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
        for a in (csr.indices, csr.indptr):
            a.flags.writeable = False  # shared by every refill: read-only
        self.csr = csr
        self.nnz = csr.nnz

    @staticmethod
    def _keep(term, labels):
        import torch

        free = term.free(labels)
        bad = torch.zeros((1,) * len(free), dtype=torch.bool)
        for ax in term.out + term.inp:
            index, over = T.coordinate(ax, labels, term.factor)
            bad = bad | (T._align(index, over, free) < 0).cpu()
        return ~bad.expand(labels.shape(free)).reshape(-1)

    def data(self, terms, labels, dtype) -> np.ndarray:
        np_dtype = _np_dtype(dtype)
        if self.direct:
            s, fl = T._structure(terms[0], labels)
            data = np.empty(self.nnz, dtype=np_dtype)
            formats.fill_values(s, T._numpy_factor(terms[0], dtype), fl, data)
            return data
        if not terms:
            return np.zeros(0, dtype=np_dtype)
        parts = []
        for term, keep in zip(terms, self.keeps):
            if keep is None:
                s, fl = T._structure(term, labels)
                d = np.empty(s.nnz, dtype=np_dtype)
                formats.fill_values(s, T._numpy_factor(term, dtype), fl, d)
                parts.append(d)
            else:
                parts.append(_values(term, labels, dtype, keep.to(term.factor.device))
                              .detach().cpu().numpy())
        return np.bincount(self.slot, weights=np.concatenate(parts),
                           minlength=self.nnz).astype(np_dtype)

    def result(self, data: np.ndarray, fmt: str):
        import scipy.sparse

        if fmt in ("csr", "torch_csr"):  # the kept arrays themselves, no copy
            return formats.container(fmt, self.csr, data, self.out_shape, self.inp_shape)
        if fmt not in self.cache:  # the format's pattern, and where each CSR value goes in it
            order = scipy.sparse.csr_array(
                (np.arange(self.nnz, dtype=np.int64), self.csr.indices, self.csr.indptr),
                shape=self.csr.shape)
            converted = formats.from_csr(order, fmt, self.out_shape, self.inp_shape)
            self.cache[fmt] = converted
        template = self.cache[fmt]
        if fmt == "coo":
            import sparse

            return sparse.COO(template.coords, data, shape=template.shape, sorted=True,
                              has_duplicates=False)
        if fmt == "csc":
            perm = template.data
            return formats.container("csc", template, data[perm], self.out_shape, self.inp_shape)
        coords = template.indices()  # torch COO: the kept coordinates
        return formats.container(fmt, coords, torch_values(data), self.out_shape, self.inp_shape)


def torch_values(data):
    import torch

    return torch.from_numpy(data)


def _np_dtype(dtype):
    from ..operands import _numpy_dtype

    return _numpy_dtype(dtype)


class ProgramPlan:
    """A traced program's Jacobian structure, kept: :meth:`jacobian` re-runs ``fn`` on new
    arguments of the same shapes and dtypes, recomputes the dense factors and writes values
    into the kept index arrays (read-only, shared by every result).

    Value-dependent paths: which entries a relu, max or clamp passes are values, so the
    structure holds for any arguments. Where the path itself depends on values (Python control
    flow on values, boolean-mask indexing whose result size changes), the new trace's structure
    differs; the plan then rebuilds its pattern from that trace and counts it in
    :attr:`rebuilds`, so the result is always the Jacobian of the path taken.
    """

    def __init__(self, fn, args, wrt, memory_limit) -> None:
        self.fn, self.wrt, self.memory_limit = fn, wrt, memory_limit
        self.rebuilds = 0
        self._build(args)

    def _signature(self, args):
        return tuple((tuple(t.shape), t.dtype) for a in args for t in _leaves_of(a))

    def _build(self, args) -> None:
        with LOCK:
            traced = _trace(self.fn, args, self.wrt, self.memory_limit)
            self._structure = _structure_key(traced)
            self._blocks = self._make_blocks(traced)
        self._args_key = self._signature(args)

    def _make_blocks(self, traced):
        (tracer, positions, flat_args, specs, out_leaves, out_spec, labels, dtype,
         limit) = traced
        self.dtype, self._out_spec, self._specs, self._positions = dtype, out_spec, specs, positions
        blocks = []
        for o in out_leaves:
            out_terms = tracer.terms(o) or {}
            for p in positions:
                for j, t in enumerate(flat_args[p]):
                    blocks.append(_Block(out_terms.get((p, j), []), tuple(o.shape),
                                         tuple(t.shape), labels, dtype))
        return blocks

    @property
    def nnz(self) -> int:
        return sum(b.nnz for b in self._blocks)

    @property
    def shape(self):
        """``out.shape + arg.shape`` of the first Jacobian (each block: :attr:`shapes`)."""
        b = self._blocks[0]
        return b.out_shape + b.inp_shape

    @property
    def matrix_shape(self):
        return self._blocks[0].csr.shape

    def nbytes(self, format: str = "csr", dtype: Any = None) -> int:
        """Bytes of the result's arrays in ``format`` (values in ``dtype``, default the
        plan's)."""
        options.choice(format, "format", FORMATS, PREFIX)
        itemsize = np.dtype(_np_dtype(dtype or self.dtype)).itemsize
        total = 0
        for b in self._blocks:
            idx = b.csr.indices.itemsize
            if format in ("csr", "torch_csr"):
                total += b.nnz * (idx + itemsize) + (b.csr.shape[0] + 1) * idx
            elif format == "csc":
                total += b.nnz * (idx + itemsize) + (b.csr.shape[1] + 1) * idx
            else:
                ndim = len(b.out_shape) + len(b.inp_shape)
                width = 8 if format == "torch" else formats.index_dtype(
                    b.nnz, b.out_shape + b.inp_shape).itemsize
                total += b.nnz * (ndim * width + itemsize)
        return total

    def pattern(self, format: str = "csr"):
        """The first Jacobian's pattern: a boolean array in ``format`` (ones where stored)."""
        b = self._blocks[0]
        return b.result(np.ones(b.nnz, dtype=bool), format)

    def jacobian(self, *args: Any, format: str = "coo", memory_limit: float | None = None):
        """The Jacobian at ``args`` (same shapes and dtypes as the plan's), nested as
        :func:`jacobian_of` nests it."""
        options.choice(format, "format", FORMATS, PREFIX)
        from torch.utils import _pytree as pytree

        key = self._signature(args)
        if key != self._args_key:
            from ..errors import ShapeError

            raise ShapeError(
                f"{PREFIX}plan traced for arguments of shapes and dtypes {self._args_key}; got "
                f"{key}: make a new plan with sparsejac.plan_of for these")
        limit = self.memory_limit if memory_limit is None else memory_limit
        with LOCK:
            traced = _trace(self.fn, args, self.wrt, limit)
            if _structure_key(traced) != self._structure:  # the path changed with the values
                self.rebuilds += 1
                self._structure = _structure_key(traced)
                self._blocks = self._make_blocks(traced)
            (tracer, positions, flat_args, specs, out_leaves, out_spec, labels, dtype,
             _) = traced
            options.guard(self.nbytes(format), options.memory_limit(limit, PREFIX), PREFIX,
                          f"the Jacobian(s) in format {format!r}")
            results, k = [], 0
            for o in out_leaves:
                out_terms = tracer.terms(o) or {}
                per_wrt = []
                for p in positions:
                    leaves = []
                    for j, t in enumerate(flat_args[p]):
                        block = self._blocks[k]
                        k += 1
                        terms = out_terms.get((p, j), [])
                        leaves.append(block.result(block.data(terms, labels, dtype), format))
                    per_wrt.append(pytree.tree_unflatten(leaves, specs[p]))
                results.append(tuple(per_wrt) if isinstance(self.wrt, (tuple, list))
                               else per_wrt[0])
            return pytree.tree_unflatten(results, out_spec)


def _leaves_of(a):
    from torch.utils import _pytree as pytree

    import torch

    return [x for x in pytree.tree_leaves(a) if isinstance(x, torch.Tensor)] + [
        _FakeMeta(x) for x in pytree.tree_leaves(a) if not isinstance(x, torch.Tensor)]


class _FakeMeta:
    def __init__(self, x):
        arr = np.asarray(x)
        self.shape, self.dtype = arr.shape, arr.dtype


def _structure_key(traced) -> tuple:
    """What a plan's pattern depends on: every term's axes and sizes, and its index maps."""
    (tracer, positions, flat_args, specs, out_leaves, out_spec, labels, dtype, _) = traced
    parts = [str(out_spec), tuple(tuple(o.shape) for o in out_leaves)]
    for o in out_leaves:
        for key, terms in sorted((tracer.terms(o) or {}).items()):
            for t in terms:
                used = labels.base(t.out_atoms + t.inp_atoms) + tuple(
                    a for a in t.out_atoms + t.inp_atoms if a in labels.derived)
                tables = tuple(
                    (labels.derived[a][1], labels.derived[a][0].cpu().numpy().tobytes())
                    for a in t.out_atoms + t.inp_atoms if a in labels.derived)
                parts.append((key, t.out, t.inp, tuple(labels.sizes[l] for l in used), tables))
    return tuple(parts)


def plan_of(fn: Callable[..., Any], *args: Any, wrt: int | Sequence[int] = 0,
            memory_limit: float | None = None) -> ProgramPlan:
    """Trace ``fn(*args)`` once and keep its Jacobian's structure: a :class:`ProgramPlan`
    whose ``.jacobian(*new_args, format=...)`` writes only values into the kept pattern.

    >>> import torch, sparsejac
    >>> w = torch.randn(4, 3, dtype=torch.float64)
    >>> p = sparsejac.plan_of(lambda x: torch.relu(x @ w), torch.randn(8, 4, dtype=torch.float64))
    >>> p.nnz, p.jacobian(torch.randn(8, 4, dtype=torch.float64), format="csr").shape
    (96, (24, 32))
    """
    if not callable(fn):
        raise ArgumentTypeError(f"{PREFIX}fn must be callable, got {type(fn).__name__}")
    return ProgramPlan(fn, args, wrt, memory_limit)


# --- Hessians --------------------------------------------------------------------------------


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
    (symmetric, sorted); piecewise-linear steps (relu, max, clamp) add none.

    >>> import torch, sparsejac
    >>> x = torch.randn(6, 3, dtype=torch.float64)
    >>> H = sparsejac.hessian_of(lambda x: (torch.tanh(x) ** 2).sum(), x, format="csr")
    >>> H.shape, H.nnz          # elementwise: diagonal
    ((18, 18), 18)
    """
    if not callable(fn):
        raise ArgumentTypeError(f"hessian_of: fn must be callable, got {type(fn).__name__}")
    options.choice(format, "format", FORMATS, PREFIX)
    from ..errors import ShapeError
    from . import sums as S

    with LOCK:
        (tracer, positions, flat_args, specs, out_leaves, out_spec, labels, dtype,
         limit) = _trace(fn, args, wrt, memory_limit, second=True)
        import torch
        from torch.utils import _pytree as pytree

        if len(out_leaves) != 1 or out_leaves[0].numel() != 1:
            raise ShapeError(
                f"{PREFIX}hessian_of needs fn to return one scalar tensor; got "
                f"{[tuple(o.shape) for o in out_leaves]}")
        out = out_leaves[0]
        blocks: dict = {}
        steps = [(r, p, res) for r, p, res in tracer.tape
                 if any(isinstance(t, torch.Tensor) and t.requires_grad
                        for t in ([res] if isinstance(res, torch.Tensor) else res))]
        if out.requires_grad and steps:
            results = [res if isinstance(res, torch.Tensor) else res[0] for _, _, res in steps]
            adjoints = torch.autograd.grad(out.reshape(()), results, allow_unused=True)
            for (rule, params, res), ybar in zip(steps, adjoints):
                if ybar is None:
                    continue  # the output does not depend on this step
                labels.prefix = f"{PREFIX}{rule.name!r} (second order): "
                result = res if isinstance(res, torch.Tensor) else res[0]
                for k1, k2, term in rule.second(tracer, result.detach(), ybar.detach().to(dtype),
                                                **params):
                    blocks.setdefault((k1, k2), []).append(term)
        labels.prefix = PREFIX
        keys = list(dict.fromkeys((p, j) for p in positions for j in range(len(flat_args[p]))))
        held, built = 0, {}
        for a, k1 in enumerate(keys):
            for k2 in keys[a:]:  # the blocks below the diagonal are these transposed
                terms = T.merge(blocks.get((k1, k2), []), labels)
                s1 = tuple(flat_args[k1[0]][k1[1]].shape)
                s2 = tuple(flat_args[k2[0]][k2[1]].shape)
                nnz = sum(t.nnz(labels) for t in terms)
                peak, csr_bytes = T.materialise_nbytes(terms, s1, s2, labels, dtype)
                convert, final = _conversion_nbytes(format, nnz, s1, s2, dtype.itemsize,
                                                    csr_bytes)
                options.guard(held + max(peak, csr_bytes + convert), limit, PREFIX,
                              f"the Hessian block {k1}, {k2} ({nnz:,} entries enumerated in "
                              f"{len(terms)} term(s), format {format!r})")
                csr = T.materialise(terms, s1, s2, labels, dtype)
                if k1 == k2:  # exactly symmetric: the two halves were summed in other orders
                    t = csr.T.tocsr()
                    t.sort_indices()
                    if np.array_equal(t.indptr, csr.indptr) and np.array_equal(t.indices,
                                                                               csr.indices):
                        csr.data = (csr.data + t.data) * 0.5  # same (symmetric) pattern
                built[(k1, k2)] = formats.from_csr(csr, format, s1, s2)
                if k1 != k2:
                    held += final
                    t = csr.T.tocsr()
                    t.sort_indices()
                    built[(k2, k1)] = formats.from_csr(t, format, s2, s1)
                held += final

        def nest(p1):
            rows = []
            for p2 in positions:
                leaves = [built[((p1, i), (p2, j))] for i in range(len(flat_args[p1]))
                          for j in range(len(flat_args[p2]))]
                n1, n2 = len(flat_args[p1]), len(flat_args[p2])
                inner = [pytree.tree_unflatten(leaves[i * n2:(i + 1) * n2], specs[p2])
                         for i in range(n1)]
                rows.append(pytree.tree_unflatten(inner, specs[p1]))
            return tuple(rows) if isinstance(wrt, (tuple, list)) else rows[0]

        result = [nest(p1) for p1 in positions]
        return tuple(result) if isinstance(wrt, (tuple, list)) else result[0]
