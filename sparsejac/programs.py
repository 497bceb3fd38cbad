"""Sparse Jacobians of whole torch functions made of einsums and activations.

:func:`jacobian_of` runs ``fn`` once on the real arguments under a
:class:`torch.overrides.TorchFunctionMode`. Every torch call whose inputs depend on a
differentiated argument is looked up in :data:`OPERATIONS` and its Jacobian is propagated
forward in structured form (:mod:`sparsejac.terms`): deltas stay deltas, factors are composed by
einsum, and the sparse result is written once, at the end. Nothing dense beyond a term's own
structure is ever formed, and each factor is checked against ``memory_limit`` first.

Tracing limits: the Jacobian is that of the path the real values took (Python control flow,
including data-dependent ``if``, runs once, as with ``torch.func.jacrev``); in-place operations,
``out=`` and turning a traced tensor into a Python number (``item``, ``tolist``, ``numpy``) are
refused; slicing a traced tensor is not supported (slicing constants is).

>>> import torch, sparsejac
>>> x, w = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
>>> J = sparsejac.jacobian_of(lambda x, w: torch.tanh(x @ w), x, w, format="csr")
>>> J.shape, J.nnz          # block-diagonal over the batch: 4 blocks of 5 x 3
((20, 12), 60)
"""

from __future__ import annotations

import functools
import math
import string
from typing import Any, Callable, Sequence

import numpy as np

from . import terms as T
from .errors import (
    ArgumentTypeError,
    OperandTypeError,
    UnsupportedOperationError,
)
from . import formats, options
from .formats import FORMATS
from .grammar import bind, parse

Terms = dict[int, list[T.Term]]  # wrt position -> the Jacobian of a tensor, a sum of terms
PREFIX = "jacobian_of: "

# torch is optional for the package and takes seconds to import: it is bound here on the first
# call of jacobian_of, and every function below runs only after that.
torch: Any = None


def _load_torch() -> Any:
    global torch
    if torch is None:
        try:
            import torch as module
        except ImportError:
            raise ImportError(
                f"{PREFIX}tracing needs torch: pip install 'einsum-sparsejac[torch]'"
            ) from None
        torch = module
    return torch


# --- the tracer ------------------------------------------------------------------------------


def _name(func: Any) -> str:
    name = getattr(func, "__name__", repr(func))
    if name in ("__get__", "__set__"):  # a property such as .T, .mT, .shape
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name


def _leaves(obj: Any):
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _leaves(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _leaves(o)
    else:
        yield obj


class _Tracer:
    """Runs ``fn`` and records, for each tensor that depends on a differentiated argument, its
    Jacobian as structured terms. A ``torch.overrides.TorchFunctionMode`` (see
    :func:`_tracer`)."""

    def __init__(self, labels: T.Labels, dtype: "torch.dtype") -> None:
        super().__init__()
        self.labels = labels
        self.dtype = dtype
        # id -> (tensor, terms); the strong reference keeps ids from being reused mid-trace.
        self._traced: dict[int, tuple[torch.Tensor, Terms]] = {}

    def record(self, tensor: torch.Tensor, terms: Terms) -> None:
        terms = {k: v for k, v in terms.items() if v}
        if terms:
            self._traced[id(tensor)] = (tensor, terms)

    def terms(self, x: Any) -> Terms | None:
        entry = self._traced.get(id(x))
        return entry[1] if entry is not None and entry[0] is x else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not any(self.terms(x) is not None for x in _leaves((args, kwargs))):
            return func(*args, **kwargs)
        name = _name(func)
        if name in METADATA or name in CONSTANT_RESULT:
            return func(*args, **kwargs)
        if name in TO_PYTHON:
            raise UnsupportedOperationError(
                f"{PREFIX}{name!r} turns a traced tensor into a Python value, which would drop "
                "its dependence on the differentiated argument; keep the computation in torch"
            )
        inplace = (name.endswith("_") and not name.startswith("__")) or name.startswith("__i")
        if inplace or kwargs.get("out") is not None or kwargs.get("inplace"):
            raise UnsupportedOperationError(
                f"{PREFIX}in-place operation {name!r} on a traced tensor is not supported; "
                "write it out of place (y = y + 1, not y += 1 or y.add_(1))"
            )
        handler = OPERATIONS.get(name)
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor) and not (
            result.is_floating_point() or result.is_complex()
        ):
            # Integer and boolean results (casts such as x.to(torch.int64), x.long(),
            # x.type_as(an integer tensor), indices) carry no derivative in torch: constants.
            return result
        if handler is None:
            raise UnsupportedOperationError(
                f"{PREFIX}operation {name!r} ({func!r}) on a traced tensor is not supported. "
                f"Supported: {', '.join(sorted(OPERATIONS))}; and, on traced tensors, the "
                f"metadata queries {', '.join(sorted(METADATA))}"
            )
        if isinstance(result, torch.Tensor):
            if result.is_complex():
                raise UnsupportedOperationError(
                    f"{PREFIX}{name!r} gives a complex tensor; complex values are not supported"
                )
            args, kwargs = _normalise(func, name, args, kwargs)
            # The guard's messages name the operation; a handler's derivative values (tangents,
            # 1 / y, a condition as a mask) are each at most the result's size.
            self.labels.prefix = f"{PREFIX}{name!r}: "
            self.labels.guard(tuple(result.shape), self.dtype.itemsize, "derivative values")
            try:
                self.record(result, handler(self, result, name, args, kwargs))
            except T.TooManyLabelsError as error:
                raise UnsupportedOperationError(f"{PREFIX}{name!r}: {error}") from None
            finally:
                self.labels.prefix = PREFIX
        return result


def _is_method(func: Any, name: str) -> bool:
    """Whether ``func`` is the ``Tensor`` method ``name`` (its operands may come in another
    order than the function's: ``x.where(cond, y)`` is ``torch.where(cond, x, y)``)."""
    return getattr(torch.Tensor, name, None) is func


def _normalise(func: Any, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of one call with the parameters in :data:`SIGNATURES` given by keyword
    moved into place, in the function's order (a method's own order is read through
    :data:`METHOD_SIGNATURES`), so that handlers read operands positionally. Positional
    arguments beyond the signature stay (``x.permute(1, 0)``); a parameter after a gap, e.g.
    ``keepdim`` without ``dim``, stays a keyword."""
    order = SIGNATURES.get(name, ("input",))
    params = METHOD_SIGNATURES.get(name, order) if _is_method(func, name) else order
    bound = dict(zip(params, args))
    extra = tuple(args[len(params) :])
    kwargs = dict(kwargs)
    for p in params:
        if p not in bound and p in kwargs:
            bound[p] = kwargs.pop(p)
    positional = []
    for p in order:
        if p not in bound:
            break
        positional.append(bound.pop(p))
    kwargs.update(bound)
    return tuple(positional) + extra, kwargs


@functools.cache
def _tracer_class() -> type:
    from torch.overrides import TorchFunctionMode

    return type("_Tracer", (_Tracer, TorchFunctionMode), {})


def _tracer(labels: T.Labels, dtype: "torch.dtype") -> _Tracer:
    return _tracer_class()(labels, dtype)


# --- helpers over sums of terms --------------------------------------------------------------


def _map(terms: Terms | None, fn: Callable[[T.Term], T.Term]) -> Terms:
    return {} if terms is None else {k: [fn(t) for t in ts] for k, ts in terms.items()}


def _add(tr: _Tracer, *parts: Terms) -> Terms:
    total: Terms = {}
    for part in parts:
        for k, ts in part.items():
            total.setdefault(k, []).extend(ts)
    return {k: T.merge(ts, tr.labels) for k, ts in total.items()}


def _value(x: Any, like: torch.Tensor) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=like.dtype)


def _dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def _arg(args, kwargs, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _broadcast(tr: _Tracer, x: Any, shape, fresh: dict) -> Terms:
    return _map(tr.terms(x), lambda t: T.expand(t, shape, fresh, tr.labels))


def _scaled(tr: _Tracer, terms: Terms, g: torch.Tensor) -> Terms:
    return _map(terms, lambda t: T.scale(t, g, tr.labels))


def _einsum_terms(tr: _Tracer, inputs, output, sizes, values: Sequence[Any]) -> Terms:
    """The product rule over an einsum: one set of terms per traced operand."""
    parts = []
    fresh: dict = {}
    vals = list(values)  # all tensors: callers convert Python numbers first
    for k, v in enumerate(values):
        terms = tr.terms(v)
        if terms is not None:
            parts.append(
                _map(terms, lambda t: T.compose(t, inputs, output, sizes, k, vals, tr.labels, fresh))
            )
    return _add(tr, *parts)


def _spec_einsum(tr: _Tracer, result, spec: str, values: Sequence[torch.Tensor]) -> Terms:
    einsum = bind(parse(spec, len(values)), [tuple(v.shape) for v in values])
    if einsum.output_shape != tuple(result.shape):
        raise UnsupportedOperationError(
            f"{PREFIX}einsum {spec!r}: torch's result shape {tuple(result.shape)} differs from "
            f"numpy's reading of the subscripts {einsum.output_shape}"
        )
    return _einsum_terms(tr, einsum.inputs, einsum.output, einsum.sizes, values)


# --- operation handlers: (tracer, result, name, args, kwargs) -> Terms -----------------------


def _op_einsum(tr, result, name, args, kwargs):
    spec, operands = args[0], args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(spec, str):
        raise UnsupportedOperationError(f"{PREFIX}einsum: only the string form is supported")
    return _spec_einsum(tr, result, spec, operands)


def _matmul_spec(na: int, nb: int) -> str:
    """torch.matmul (and mm, bmm, mv, dot): a 1-D operand is a vector, batches broadcast."""
    if na == 1 and nb == 1:
        return "i,i->"
    if nb == 1:
        return "...ij,j->...i"
    if na == 1:
        return "j,...jk->...k"
    return "...ij,...jk->...ik"


def _inner_spec(na: int, nb: int) -> str:
    """torch.inner: the last axes of both contracted, the output ``a.shape[:-1] +
    b.shape[:-1]`` (ranks 2 and 3: ``'ai,bci->abc'``); a product where either is a scalar."""
    letters = string.ascii_letters
    if na + nb - 1 > len(letters):
        raise UnsupportedOperationError(f"{PREFIX}inner of ranks {na} and {nb}: too many axes")
    if na == 0 or nb == 0:
        both = letters[: na + nb]
        return f"{both[:na]},{both[:nb]}->{both}"
    la, lb, k = letters[: na - 1], letters[na - 1 : na + nb - 2], letters[na + nb - 2]
    return f"{la}{k},{lb}{k}->{la}{lb}"


def _op_matmul(tr, result, name, args, kwargs):
    a, b = args[0], args[1]
    if name == "__rmatmul__":
        a, b = b, a
    a, b = _value(a, result), _value(b, result)
    spec = _inner_spec if name == "inner" else _matmul_spec
    return _spec_einsum(tr, result, spec(a.dim(), b.dim()), (a, b))


def _op_linear(tr, result, name, args, kwargs):
    x, w = args[0], args[1]
    bias = _arg(args, kwargs, 2, "bias")
    # weight (out, in), or (in,) for a single output (no output axis)
    lin = _spec_einsum(tr, result, "...i,oi->...o" if w.dim() == 2 else "...i,i->...", (x, w))
    if bias is None:
        return lin
    return _add(tr, lin, _broadcast(tr, bias, tuple(result.shape), {}))


def _op_add(tr, result, name, args, kwargs):
    x, y = args[0], args[1]
    alpha = kwargs.get("alpha", 1)
    sign = -1 if name in ("sub", "__sub__", "subtract") else 1
    if name in ("__rsub__", "rsub"):
        x, y, sign = y, x, -1  # other - self
    shape = tuple(result.shape)
    fresh: dict = {}
    tx = _broadcast(tr, x, shape, fresh)
    ty = _broadcast(tr, y, shape, fresh)
    if sign * alpha != 1:
        ty = _times(tr, ty, sign * alpha)
    return _add(tr, tx, ty)


def _times(tr: _Tracer, terms: Terms, c: float) -> Terms:
    return _map(terms, lambda t: T.multiply(t, c, tr.labels))


def _op_mul(tr, result, name, args, kwargs):
    x, y = args[0], args[1]
    shape = tuple(result.shape)
    fresh: dict = {}
    tx = _scaled(tr, _broadcast(tr, x, shape, fresh), _value(y, result))
    ty = _scaled(tr, _broadcast(tr, y, shape, fresh), _value(x, result))
    return _add(tr, tx, ty)


def _op_div(tr, result, name, args, kwargs):
    if kwargs.get("rounding_mode") is not None:
        raise UnsupportedOperationError(f"{PREFIX}{name!r} with a rounding_mode is not supported")
    x, y = args[0], args[1]
    if name == "__rtruediv__" or name == "__rdiv__":
        x, y = y, x  # other / self
    shape = tuple(result.shape)
    fresh: dict = {}
    yv = _value(y, result)
    tx = _scaled(tr, _broadcast(tr, x, shape, fresh), 1 / yv)
    ty = _scaled(tr, _broadcast(tr, y, shape, fresh), -result / yv)
    return _add(tr, tx, ty)


def _op_neg(tr, result, name, args, kwargs):
    return _times(tr, tr.terms(args[0]), -1)


def _op_elementwise(tr, result, name, args, kwargs):
    """Any elementwise function: its derivative in each traced argument, broadcast to the
    result's shape, is the forward-mode tangent of a tangent of ones (torch's own formula)."""
    shape = tuple(result.shape)
    fresh: dict = {}
    parts = []
    flat_args = list(args)
    for i, x in enumerate(flat_args):
        terms = tr.terms(x)
        if terms is None:
            continue

        def f(t, i=i):
            a = list(flat_args)
            a[i] = t
            return _calls()[name](*a, **kwargs)

        _, g = torch.func.jvp(f, (x,), (torch.ones_like(x),))
        parts.append(_scaled(tr, _broadcast(tr, x, shape, fresh), g))
    for key, x in kwargs.items():
        if tr.terms(x) is not None:
            raise UnsupportedOperationError(
                f"{PREFIX}{name!r}: a traced tensor passed as keyword {key!r} is not supported"
            )
    return _add(tr, *parts)


def _op_where(tr, result, name, args, kwargs):
    cond, a, b = args[0], args[1], args[2]  # torch.where's order, also for x.where(cond, y)
    shape = tuple(result.shape)
    fresh: dict = {}
    c = cond.to(result.dtype)
    return _add(
        tr,
        _scaled(tr, _broadcast(tr, a, shape, fresh), c),
        _scaled(tr, _broadcast(tr, b, shape, fresh), 1 - c),
    )


def _reduce_dims(x: torch.Tensor, dim: Any) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(x.dim()))
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    if len(dims) == 0:
        return tuple(range(x.dim()))
    return tuple(sorted({_dim(d, x.dim()) for d in dims}))


def _sum_terms(tr: _Tracer, x: torch.Tensor, dims: Sequence[int], keepdim: bool) -> Terms:
    n = x.dim()
    sizes = list(x.shape)
    inputs = (tuple(range(n)),)
    output = []
    for d in range(n):
        if d not in dims:
            output.append(d)
        elif keepdim:
            sizes.append(1)
            output.append(len(sizes) - 1)
    return _einsum_terms(tr, inputs, tuple(output), tuple(sizes), (x,))


def _op_sum(tr, result, name, args, kwargs):
    x = args[0]
    dims = _reduce_dims(x, _arg(args, kwargs, 1, "dim"))
    keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
    terms = _sum_terms(tr, x, dims, keepdim)
    if name == "mean":
        count = math.prod(x.shape[d] for d in dims)
        terms = _times(tr, terms, 1 / count)
    return terms


def _softmax_dim(x, name, args, kwargs) -> int:
    dim = _arg(args, kwargs, 1, "dim")
    if dim is None:
        raise UnsupportedOperationError(f"{PREFIX}{name!r} needs an explicit dim")
    return _dim(dim, x.dim())


def _contract_back(tr: _Tracer, x, weights: torch.Tensor, d: int, shape, fresh) -> Terms:
    """``sum_j weights[..j..] J_x[..j..]``, broadcast back along axis ``d`` (softmax's second
    term): an einsum with ``weights``, an unsqueeze and an expand."""
    n = x.dim()
    inputs = (tuple(range(n)), tuple(range(n)))
    output = tuple(l for l in range(n) if l != d)
    summed = _einsum_terms(tr, inputs, output, tuple(x.shape), (x, weights.detach()))
    keep = tuple(1 if i == d else s for i, s in enumerate(shape))
    summed = _map(summed, lambda t: T.reshape(t, keep, tr.labels))
    return _map(summed, lambda t: T.expand(t, shape, fresh, tr.labels))


def _op_softmax(tr, result, name, args, kwargs):
    x = args[0]
    d = _softmax_dim(x, name, args, kwargs)
    shape = tuple(result.shape)
    fresh: dict = {}
    if name == "softmax":
        s = result
        first = _scaled(tr, tr.terms(x), s)
        second = _scaled(tr, _contract_back(tr, x, s, d, shape, fresh), -s)
    else:  # log_softmax: x - logsumexp(x)
        s = torch.exp(result)
        first = tr.terms(x)
        second = _times(tr, _contract_back(tr, x, s, d, shape, fresh), -1)
    return _add(tr, first, second)


def _op_reshape(tr, result, name, args, kwargs):
    return _map(tr.terms(args[0]), lambda t: T.reshape(t, tuple(result.shape), tr.labels))


def _op_expand(tr, result, name, args, kwargs):
    return _broadcast(tr, args[0], tuple(result.shape), {})


def _op_identity(tr, result, name, args, kwargs):
    return tr.terms(args[0]) or {}


def _op_permute(tr, result, name, args, kwargs):
    x = args[0]
    n = x.dim()
    if name in ("T", "t"):
        perm = list(range(n))[::-1]
    elif name == "mT":
        perm = list(range(n - 2)) + [n - 1, n - 2]
    elif name == "permute":
        dims = args[1:] if len(args) > 1 else kwargs["dims"]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple, torch.Size)):
            dims = dims[0]
        perm = [_dim(d, n) for d in dims]
    else:  # transpose, swapaxes, swapdims
        d0 = _dim(_arg(args, kwargs, 1, "dim0"), n)
        d1 = _dim(_arg(args, kwargs, 2, "dim1"), n)
        perm = list(range(n))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    return _map(tr.terms(x), lambda t: T.permute(t, perm))


# name -> handler. Every spelling torch uses for the same operation maps to one handler.
OPERATIONS: dict[str, Callable] = {}
for _names, _handler in [
    (("einsum",), _op_einsum),
    (("matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "mv", "dot", "inner"), _op_matmul),
    (("linear",), _op_linear),
    (("add", "__add__", "__radd__", "sub", "__sub__", "subtract", "__rsub__", "rsub"), _op_add),
    (("mul", "__mul__", "__rmul__", "multiply"), _op_mul),
    (("div", "__truediv__", "__rtruediv__", "__div__", "__rdiv__", "true_divide", "divide"),
     _op_div),
    (("neg", "__neg__", "negative"), _op_neg),
    (("where",), _op_where),
    (("sum", "mean"), _op_sum),
    (("softmax", "log_softmax"), _op_softmax),
    (("reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
      "ravel"), _op_reshape),
    (("expand", "expand_as", "broadcast_to"), _op_expand),
    (("contiguous", "clone", "to", "double", "float", "type_as", "__pos__", "positive"),
     _op_identity),
    (("permute", "transpose", "swapaxes", "swapdims", "t", "T", "mT"), _op_permute),
]:
    for _n in _names:
        OPERATIONS[_n] = _handler

# The parameter names of each operation's operands, in torch's order, for moving those passed by
# keyword into place (:func:`_normalise`); an operation not listed takes ``input`` first.
SIGNATURES: dict[str, tuple[str, ...]] = {}
for _names, _params in [
    (("add", "sub", "subtract", "rsub", "mul", "multiply", "div", "divide", "true_divide",
      "matmul", "inner", "maximum", "minimum", "type_as", "expand_as", "view_as", "reshape_as"),
     ("input", "other")),
    (("mm", "bmm"), ("input", "mat2")),
    (("mv",), ("input", "vec")),
    (("dot",), ("input", "tensor")),
    (("linear",), ("input", "weight", "bias")),
    (("where",), ("condition", "input", "other")),
    (("softmax", "log_softmax"), ("input", "dim")),
    (("sum", "mean"), ("input", "dim", "keepdim")),
    (("pow",), ("input", "exponent")),
    (("clamp",), ("input", "min", "max")),
    (("transpose", "swapdims"), ("input", "dim0", "dim1")),
    (("swapaxes",), ("input", "axis0", "axis1")),
]:
    for _n in _names:
        SIGNATURES[_n] = _params
# Tensor methods whose operands come in another order than the function's.
METHOD_SIGNATURES = {"where": ("input", "condition", "other")}

# Elementwise functions, differentiated by forward mode on their values. The callable used for
# the tangent is looked up by name so that every spelling (torch.tanh, Tensor.tanh, F.tanh)
# shares one implementation.
ELEMENTWISE = (
    "exp", "log", "tanh", "sigmoid", "relu", "gelu", "silu", "softplus", "sin", "cos", "pow",
    "__pow__", "__rpow__", "sqrt", "rsqrt", "square", "abs", "log1p", "expm1", "erf",
    "reciprocal", "elu", "leaky_relu", "mish", "tan", "atan", "logsigmoid", "clamp", "maximum",
    "minimum",
)


@functools.cache
def _calls() -> dict[str, Callable]:
    """The callable behind each elementwise name, for its tangent."""
    F = torch.nn.functional
    calls = {"gelu": F.gelu, "silu": F.silu, "softplus": F.softplus, "elu": F.elu,
             "leaky_relu": F.leaky_relu, "mish": F.mish, "logsigmoid": F.logsigmoid,
             "__pow__": torch.pow, "__rpow__": lambda x, c: torch.pow(c, x)}
    for name in ELEMENTWISE:
        calls.setdefault(name, getattr(torch, name, None))
    return calls


for _n in ELEMENTWISE:
    OPERATIONS[_n] = _op_elementwise

# Queries that read no values on a traced tensor; their results carry no derivative.
METADATA = frozenset({
    "shape", "size", "dim", "ndim", "ndimension", "numel", "dtype", "device", "is_floating_point",
    "is_complex", "is_contiguous", "stride", "__len__", "layout", "requires_grad",
    "is_leaf", "__format__", "__repr__", "__hash__", "element_size", "nelement",
    "storage_offset", "data_ptr", "untyped_storage", "is_sparse", "is_cuda", "names",
})
# Operations whose results are piecewise constant in the values (zero derivative almost
# everywhere, as torch has it): comparisons, signs, argmax; detach; and tensors made like a traced
# one, which take its shape and dtype but none of its values. (Any integer or boolean result is
# a constant too: see _Tracer.__torch_function__.)
CONSTANT_RESULT = frozenset({
    "gt", "lt", "ge", "le", "eq", "ne", "__gt__", "__lt__", "__ge__", "__le__", "__eq__",
    "__ne__", "greater", "less", "greater_equal", "less_equal", "equal", "sign", "argmax",
    "argmin", "isnan", "isinf", "isfinite", "detach", "__bool__", "allclose", "isclose",
    "logical_not", "round", "floor", "ceil", "trunc", "argsort", "__and__", "__or__",
    "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like",
    "randint_like", "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor",
})
TO_PYTHON = frozenset({"item", "tolist", "numpy", "__float__", "__int__", "__index__", "__array__"})


# --- the public function ---------------------------------------------------------------------


def _as_tensor(x: Any, index: int) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.layout != torch.strided:
            raise OperandTypeError(f"{PREFIX}argument {index} has layout {x.layout}; pass a dense tensor")
        return x.detach()
    if isinstance(x, (np.ndarray, np.generic, list, tuple, int, float)) and not isinstance(x, bool):
        array = np.asarray(x)
        if array.dtype.kind not in "iuf":
            raise OperandTypeError(
                f"{PREFIX}argument {index} has dtype {array.dtype}; expected integers or floats"
            )
        return torch.from_numpy(np.array(array))
    raise OperandTypeError(
        f"{PREFIX}argument {index} is a {type(x).__name__}; pass a torch tensor or a numpy array"
    )


def _conversion_nbytes(
    fmt: str, nnz: int, out_shape: tuple, inp_shape: tuple, itemsize: int, csr_bytes: int
) -> tuple[int, int]:
    """``(extra, final)``: the bytes :func:`formats.from_csr` allocates beside the CSR of ``nnz``
    entries (``csr_bytes``) to give ``fmt``, and those the result keeps."""
    nrows, ncols = math.prod(out_shape), math.prod(inp_shape)
    idx = formats.index_dtype(nnz, (nrows, ncols)).itemsize  # the CSR's index width
    if fmt in ("csr", "torch_csr"):  # torch's shares the CSR's arrays
        return 0, csr_bytes
    if fmt == "csc":
        extra = nnz * (idx + itemsize) + (ncols + 1) * idx
        return extra, extra
    # "coo" and "torch": each entry's row expanded (int64, from an arange and a diff of the row
    # pointers), rows and columns unravelled into one int64 array per axis, and the stacked
    # coordinates; the values are the CSR's own.
    ndim = len(out_shape) + len(inp_shape)
    cidx = 8 if fmt == "torch" else formats.index_dtype(nnz, out_shape + inp_shape).itemsize
    coords = nnz * ndim * cidx
    extra = max(nrows * (8 + idx) + nnz * 8, nnz * 8 * (1 + ndim) + coords)
    return extra, nnz * itemsize + coords


def jacobian_of(
    fn: Callable[..., torch.Tensor],
    *args: Any,
    wrt: int | Sequence[int] = 0,
    format: str = "coo",
    memory_limit: float | None = None,
):
    """The exact sparse Jacobian of ``fn(*args)`` with respect to ``args[wrt]``.

    ``fn`` takes torch tensors and returns one tensor, built from the operations in
    :data:`OPERATIONS`; tensors it closes over are constants. ``args`` are torch tensors or numpy
    arrays (converted). The result has the formats of :func:`sparsejac.jacobian`: ``"coo"`` gives a
    ``sparse.COO`` of shape ``out.shape + args[wrt].shape``, ``"csr"``/``"csc"`` scipy arrays of
    shape ``(out.size, args[wrt].size)``; a tuple ``wrt`` gives a tuple. The stored entries are
    the union, over the terms of the Jacobian (one per path from the argument to the output, after
    merging), of each term's structural nonzeros.

    ``memory_limit`` (bytes; default the memory available) bounds every allocation that grows
    with the problem, while tracing (each Jacobian factor, checked before it is formed) and at
    the end (the result's arrays and their temporaries in ``format``): over it,
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
    _load_torch()
    options.choice(format, "format", FORMATS, PREFIX)
    tensors = [_as_tensor(x, i) for i, x in enumerate(args)]
    positions = options.wrt_indices(wrt, len(tensors), PREFIX, "argument")
    limit = options.memory_limit(memory_limit, PREFIX)
    for p in positions:
        if not tensors[p].is_floating_point():
            raise OperandTypeError(
                f"{PREFIX}argument {p} (differentiated) has dtype {tensors[p].dtype}; "
                "it must be a real floating-point tensor"
            )
    dtype = functools.reduce(torch.promote_types, (tensors[p].dtype for p in positions))
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32

    # The limit applies while tracing too: every factor is checked before it is allocated.
    labels = T.Labels(limit, PREFIX)
    tracer = _tracer(labels, dtype)
    for p in sorted(set(positions)):
        tracer.record(tensors[p], {p: [T.identity(tuple(tensors[p].shape), labels, dtype)]})
    with tracer:
        out = fn(*tensors)
    if not isinstance(out, torch.Tensor):
        raise ArgumentTypeError(
            f"{PREFIX}fn must return one torch tensor, got {type(out).__name__}"
        )
    out_terms = tracer.terms(out) or {}
    out_shape = tuple(out.shape)

    results = []
    held = 0  # bytes of the results already built: a tuple wrt keeps them all
    itemsize = dtype.itemsize
    for p in positions:
        terms = out_terms.get(p, [])
        inp_shape = tuple(tensors[p].shape)
        nnz = sum(t.nnz(labels) for t in terms)
        peak, csr_bytes = T.materialise_nbytes(terms, out_shape, inp_shape, labels, dtype)
        convert, final = _conversion_nbytes(format, nnz, out_shape, inp_shape, itemsize, csr_bytes)
        options.guard(
            held + max(peak, csr_bytes + convert), limit, PREFIX,
            f"the Jacobian w.r.t. argument {p} ({nnz:,} structural nonzeros in {len(terms)} "
            f"term(s), format {format!r})",
        )
        csr = T.materialise(terms, out_shape, inp_shape, labels, dtype)
        results.append(formats.from_csr(csr, format, out_shape, inp_shape))
        del csr
        held += final
    return tuple(results) if isinstance(wrt, (tuple, list)) else results[0]


__all__ = ["jacobian_of", "OPERATIONS", "UnsupportedOperationError"]
