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


def _trace(fn, args, wrt, memory_limit):
    """Trace ``fn(*args)``: ``(out_leaves, out_spec, in_leaves, labels, dtype, keys)`` where
    ``keys[p]`` lists, for differentiated argument ``p``, ``(key, leaf, spec)``."""
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
    for p in sorted(set(positions)):
        for j, t in enumerate(flat_args[p]):
            tracer.record(t, {(p, j): [T.identity(tuple(t.shape), labels, dtype)]})
    call_args = [pytree.tree_unflatten(leaves, spec) for leaves, spec in zip(flat_args, specs)]
    with tracer:
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
