"""Reductions: sums and means, softmax, maxima, log-sum-exp, moments, norms (vector norms with
torch's derivative conventions; matrix norms and ``linalg.norm`` written as torch writes them),
products, cumulative sums. Which entry wins a maximum is a value (a one-hot weight), not
structure, as a relu's mask is: the pattern of a reduction is the whole reduced axis."""

from __future__ import annotations

import math

import torch

from ...errors import UnsupportedOperationError
from .. import sums as S
from ..registry import RULES, decomposition, rule
from ..tracer import PREFIX


@rule("sum", "input dim=None keepdim=False dtype=None", second="linear")
def sum_(cx, result, input, dim, keepdim, dtype):
    return S.sum_dims(cx, input, S.reduce_dims(input, dim), bool(keepdim))


@rule("mean", "input dim=None keepdim=False dtype=None", second="linear")
def mean(cx, result, input, dim, keepdim, dtype):
    dims = S.reduce_dims(input, dim)
    count = math.prod(input.shape[d] for d in dims)
    return S.times(cx, S.sum_dims(cx, input, dims, bool(keepdim)), 1 / max(count, 1))


def _softmax_dim(input, dim, name):
    if dim is None:
        raise UnsupportedOperationError(f"{PREFIX}{name!r} needs an explicit dim")
    return S.dim(dim, input.dim())


def contract_back(cx, x, weights, d):
    """``sum_j weights[..j..] J_x[..j..]`` broadcast back along axis ``d``."""
    n = x.dim()
    shape = tuple(x.shape)
    inputs = (tuple(range(n)), tuple(range(n)))
    output = tuple(l for l in range(n) if l != d)
    summed = S.einsum_terms(cx, inputs, output, shape, (x, weights.detach()))
    keep = tuple(1 if i == d else s for i, s in enumerate(shape))
    return S.broadcast(cx, S.stand(cx, S.reshape(cx, summed, keep), keep), shape)


def _softmax_expand(input, dim, _stacklevel, dtype):
    e = torch.exp(input - input.amax(dim, keepdim=True).detach())
    return e / e.sum(dim, keepdim=True)


def _logsumexp_expand(input, dim, keepdim):
    m = input.amax(dim, keepdim=True).detach()
    out = torch.log(torch.exp(input - m).sum(dim, keepdim=True)) + m
    if not keepdim:
        for d in sorted(S.reduce_dims(input, dim), reverse=True):
            out = out.squeeze(d)
    return out


@rule("softmax", "input dim=None _stacklevel=3 dtype=None", expand=_softmax_expand)
def softmax(cx, result, input, dim, _stacklevel, dtype):
    d = _softmax_dim(input, dim, "softmax")
    s = result.detach().to(cx.dtype)
    return S.add(cx, S.scaled(cx, S.of(cx, input), s),
                 S.scaled(cx, contract_back(cx, input, s, d), -s))


def _safe_softmax_expand(input, dim, dtype):
    masked = torch.isneginf(input.detach()).all(dim, keepdim=True)
    safe = torch.where(masked, torch.zeros_like(input.detach()), input)
    return torch.where(masked, 0.0, _softmax_expand(safe, dim, 3, dtype))


@rule(("_safe_softmax", "_safe_softmax.default"), "input dim dtype=None",
      expand=_safe_softmax_expand)
def safe_softmax(cx, result, input, dim, dtype):
    """aten's softmax that gives 0 (not nan) on a slice all -inf (attention's masked rows):
    the softmax's derivative, zero on those slices (torch's gradient there)."""
    return softmax(cx, result, input, dim, 3, dtype)


@decomposition(("_softmax_backward_data", "_softmax_backward_data.default"),
               "grad_output output dim input_dtype", traced="grad_output output")
def softmax_backward_data(grad_output, output, dim, input_dtype):
    """aten's gradient of a softmax (``output``) at ``grad_output``, as torch computes it."""
    y = output * (grad_output - (grad_output * output).sum(dim, keepdim=True))
    return y if y.dtype == input_dtype else y.to(input_dtype)


@rule("log_softmax", "input dim=None _stacklevel=3 dtype=None",
      expand=lambda input, dim, _stacklevel, dtype: input - _logsumexp_expand(input, dim, True))
def log_softmax(cx, result, input, dim, _stacklevel, dtype):
    d = _softmax_dim(input, dim, "log_softmax")
    s = torch.exp(result.detach().to(cx.dtype))
    return S.add(cx, S.of(cx, input), S.times(cx, contract_back(cx, input, s, d), -1))


def _weighted(cx, input, weights, dims, keepdim):
    """``sum over dims of weights * input``: the Jacobian of a selection made by values."""
    shape = tuple(weights.shape)
    scaled = S.scaled(cx, S.broadcast(cx, input, shape), weights)
    return S.sum_dims(cx, S.stand(cx, scaled, shape), dims, keepdim)


def _onehot(x, index, dim):
    return torch.zeros_like(x).scatter(dim, index, 1.0)


def _extremum(elementwise: str):
    """``torch.max``/``torch.min``: over all entries, along a dimension, or, given a second
    tensor, elementwise (then as ``torch.maximum``/``torch.minimum``, whose rule it uses)."""

    def jacobian(cx, result, input, dim, keepdim):
        if isinstance(dim, torch.Tensor):
            return RULES[elementwise].fn(cx, result, input=input, other=dim)
        return max_(cx, result, input, dim, keepdim)

    jacobian.__name__ = elementwise[:3]
    return jacobian


def max_(cx, result, input, dim, keepdim):
    if dim is None:
        hit = (input.detach() == result.detach()).to(cx.dtype)
        return _weighted(cx, input, hit / hit.sum(), tuple(range(input.dim())), False)  # ties share
    d = S.dim(dim, input.dim())
    values, indices = result
    w = _onehot(input.detach(), indices.unsqueeze(d) if not keepdim else indices, d)
    return [_weighted(cx, input, w, (d,), bool(keepdim)), None]


rule("max", "input dim=None keepdim=False", traced="input dim", second="linear")(
    _extremum("maximum"))
rule("min", "input dim=None keepdim=False", traced="input dim", second="linear")(
    _extremum("minimum"))


@rule(("amax", "amin"), "input dim=() keepdim=False", second="linear")
def amax(cx, result, input, dim, keepdim):
    dims = S.reduce_dims(input, dim)
    hit = (input.detach() == _kept(result, dims, keepdim)).to(cx.dtype)
    w = hit / hit.sum(dims, keepdim=True)  # ties share, as torch's gradient does
    return _weighted(cx, input, w, dims, bool(keepdim))


@rule("logsumexp", "input dim keepdim=False", expand=_logsumexp_expand)
def logsumexp(cx, result, input, dim, keepdim):
    dims = S.reduce_dims(input, dim)
    weights = torch.exp(input.detach() - _kept(result, dims, keepdim))  # the softmax
    return _weighted(cx, input, weights, dims, bool(keepdim))


def _kept(result, dims, keepdim):
    """A reduction's result with its reduced axes back (size 1), to broadcast on the input."""
    r = result.detach()
    for d in ([] if keepdim else dims):
        r = r.unsqueeze(d)
    return r


def _correction(name, dim, unbiased, correction):
    if isinstance(dim, bool):  # var(x, True): the unbiased flag in dim's place
        dim, unbiased = None, dim
    if correction is None:
        correction = 1 if unbiased is None or unbiased else 0
    return dim, correction


@decomposition("var", "input dim=None unbiased=None keepdim=False correction=None")
def var(input, dim, unbiased, keepdim, correction):
    dim, correction = _correction("var", dim, unbiased, correction)
    dims = S.reduce_dims(input, dim)
    n = math.prod(input.shape[d] for d in dims)
    centred = input - input.mean(dims, keepdim=True)
    return (centred * centred).sum(dims, keepdim=bool(keepdim)) / max(n - correction, 0)


@rule("std", "input dim=None unbiased=None keepdim=False correction=None",
      expand=lambda input, dim, unbiased, keepdim, correction: torch.sqrt(
          var(input, dim, unbiased, keepdim, correction)))
def std(cx, result, input, dim, unbiased, keepdim, correction):
    dim, correction = _correction("std", dim, unbiased, correction)
    dims = S.reduce_dims(input, dim)
    n = math.prod(input.shape[d] for d in dims)
    x = input.detach().to(cx.dtype)
    s = x.std(dims, correction=correction, keepdim=True)
    # d std / d x = (x - mean) / ((n - correction) std); zero where std is (torch's choice)
    g = (x - x.mean(dims, keepdim=True)) / (max(n - correction, 0) * s)
    return _weighted(cx, input, g.masked_fill(s == 0, 0.0), dims, bool(keepdim))


def _order(p, name="norm"):
    """A vector norm's order as a number (``"fro"`` and None are 2)."""
    if p in ("fro", None):
        return 2.0
    if p in ("inf", "-inf"):
        return float(p)
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise UnsupportedOperationError(f"{PREFIX}{name!r} with ord={p!r} is not supported")
    return float(p)


def _norm_weights(x, p, dims, norm):
    """``d ||x||_p / d x`` along ``dims`` as torch's ``norm_backward`` has it (``norm`` the
    result with its reduced axes kept): zero for p = 0 (piecewise constant), ``sgn(x)`` for
    p = 1, zero where the norm is zero for p > 1, zero at a zero entry for p < 1, and for
    p = +-inf the entries equal to the norm (or nan) sharing."""
    if p == 0:
        return torch.zeros_like(x)
    if p == 1:
        return torch.sgn(x)
    if p == 2:
        return (x / norm).masked_fill(norm == 0, 0.0)
    if math.isinf(p):
        a = x.abs()
        hit = ((a == norm) | torch.isnan(a)).to(x.dtype)
        return torch.sgn(x) * hit / (hit.sum(dims, keepdim=True) if dims else hit)
    if p < 1:
        scaled = torch.sgn(x) * x.abs().pow(p - 1).masked_fill(x == 0, 0.0)
        return scaled * norm.pow(1 - p)
    scaled = torch.sgn(x) * x.abs().pow(p - 1) if p < 2 else x * x.abs().pow(p - 2)
    return scaled * (1 / norm.pow(p - 1)).masked_fill(norm == 0, 0.0)


def _norm_expand(x, ord, dim, keepdim, dtype, out):
    """The norm written with other operations, for the second order."""
    p = _order(ord, "linalg.vector_norm")
    dims = S.reduce_dims(x, dim)
    keep = bool(keepdim)
    if p == 0:  # piecewise constant
        return (x != 0).to(x.dtype).sum(dims, keepdim=keep)
    if p == 2:
        return torch.sqrt((x * x).sum(dims, keepdim=keep))
    if p == 1:
        return x.abs().sum(dims, keepdim=keep)
    if math.isinf(p):
        return (torch.amax if p > 0 else torch.amin)(x.abs(), dims, keepdim=keep)
    if p > 1:
        return torch.pow(torch.pow(torch.abs(x), p).sum(dims, keepdim=keep), 1 / p)
    raise UnsupportedOperationError(
        f"{PREFIX}the second derivative of 'linalg.vector_norm' with ord={ord!r} (below 1) is "
        "not supported")


@rule("linalg_vector_norm", "x ord=2 dim=None keepdim=False dtype=None out=None",
      expand=_norm_expand)
def vector_norm(cx, result, x, ord, dim, keepdim, dtype, out):
    dims = S.reduce_dims(x, dim)
    norm = _kept(result, dims, keepdim).to(cx.dtype)
    g = _norm_weights(x.detach().to(cx.dtype), _order(ord, "linalg.vector_norm"), dims, norm)
    return _weighted(cx, x, g, dims, bool(keepdim))


@decomposition("norm", "input p='fro' dim=None keepdim=False dtype=None out=None")
def norm(input, p, dim, keepdim, dtype, out):
    """torch.norm as torch.functional.norm dispatches it: a vector norm, or a matrix norm for
    ``"nuc"`` (and ``"fro"`` over more than two dims)."""
    dims = [dim] if isinstance(dim, int) else dim
    kw = {} if out is None else {"out": out}
    if isinstance(p, str):
        if p == "fro" and (dim is None or isinstance(dim, int) or len(dim) <= 2):
            return torch.linalg.vector_norm(input, 2, dims, keepdim, dtype=dtype, **kw)
        return torch.linalg.matrix_norm(input, p, list(range(input.dim())) if dims is None
                                        else dims, keepdim, dtype=dtype, **kw)
    return torch.linalg.vector_norm(input, 2.0 if p is None else p, dims, keepdim, dtype=dtype,
                                    **kw)


def _backshift(d0, d1, n):
    """The permutation moving axes ``d0``, ``d1`` (in that order) to the end."""
    return [k for k in range(n) if k not in (d0, d1)] + [d0, d1]


@decomposition("linalg_matrix_norm", "A ord='fro' dim=(-2,-1) keepdim=False dtype=None")
def matrix_norm(A, ord, dim, keepdim, dtype):
    """torch's linalg_matrix_norm (LinearAlgebra.cpp): "fro" a vector norm over both axes,
    "nuc" and +-2 sums and extremes of the singular values (a dense block per matrix), +-1 and
    +-inf extremes of absolute column (row) sums."""
    if A.dim() < 2 or len(dim) != 2:
        raise UnsupportedOperationError(f"{PREFIX}'linalg.matrix_norm' takes matrices, two dims")
    d0, d1 = S.dim(dim[0], A.dim()), S.dim(dim[1], A.dim())
    if d0 == d1:
        raise UnsupportedOperationError(f"{PREFIX}'linalg.matrix_norm': dims must differ")
    keep = bool(keepdim)
    if ord == "fro":
        return torch.linalg.vector_norm(A, 2, (d0, d1), keep, dtype=dtype)
    if isinstance(ord, str) and ord != "nuc":
        raise UnsupportedOperationError(f"{PREFIX}'linalg.matrix_norm' with ord={ord!r}")
    if ord == "nuc" or abs(ord) == 2:
        perm = _backshift(d0, d1, A.dim())
        x = A if dtype is None else A.to(dtype)
        s = torch.linalg.svdvals(x.permute(perm))
        if ord == "nuc":
            r = s.sum(-1)
        else:
            r = _extreme(s, -1, ord > 0, False)
        if keep:
            back = [perm.index(k) for k in range(A.dim())]
            r = r.unsqueeze(-1).unsqueeze(-1).permute(back)
        return r
    if abs(ord) not in (1, float("inf")):
        raise UnsupportedOperationError(f"{PREFIX}'linalg.matrix_norm' with ord={ord!r}")
    if abs(ord) == float("inf"):
        d0, d1 = d1, d0
    if not keep and d0 < d1:
        d1 -= 1
    return _extreme(torch.linalg.vector_norm(A, 1.0, d0, keep, dtype=dtype), d1, ord > 0, keep)


def _extreme(x, d, largest, keepdim):
    """amax (amin) along ``d``; the maximum of no entries 0 (as torch's reference has it)."""
    if x.shape[d] == 0 and largest:
        return x.sum(d, keepdim=keepdim) * 0
    return (torch.amax if largest else torch.amin)(x, d, keepdim=keepdim)


@decomposition("linalg_norm", "input ord=None dim=None keepdim=False out=None dtype=None")
def linalg_norm(input, ord, dim, keepdim, out, dtype):
    """torch's linalg_norm: a matrix norm where ``ord`` is given over two dims (a 2-D input's
    when ``dim`` is None), else a vector norm (of order 2 where ``ord`` is None)."""
    dims = (dim,) if isinstance(dim, int) else dim
    if dims is not None and len(dims) not in (1, 2):
        raise UnsupportedOperationError(f"{PREFIX}'linalg.norm' takes 1 or 2 dims")
    if ord is not None and ((dims is not None and len(dims) == 2)
                            or (dims is None and input.dim() == 2)):
        return torch.linalg.matrix_norm(input, ord, (0, 1) if dims is None else dims, keepdim,
                                        dtype=dtype)
    if isinstance(ord, str):
        raise UnsupportedOperationError(f"{PREFIX}'linalg.norm' with ord={ord!r} over one dim")
    return torch.linalg.vector_norm(input, 2.0 if ord is None else ord, dims, keepdim,
                                    dtype=dtype)


def _prod_expand(input, dim, keepdim, dtype):
    """The product as a chain of elementwise products of slices, for the second order (each
    product's cross terms are the Hessian; exact with zeros, unlike a sum of logarithms)."""
    x = input.reshape(-1) if dim is None else input
    d = 0 if dim is None else S.dim(dim, x.dim())
    if x.dim() == 0:
        return x
    out = torch.ones_like(x.select(d, 0)) if x.shape[d] == 0 else x.select(d, 0)
    for i in range(1, x.shape[d]):
        out = out * x.select(d, i)
    if dim is None:
        return out.reshape((1,) * input.dim()) if keepdim else out
    return out.unsqueeze(d) if keepdim else out


@rule("prod", "input dim=None keepdim=False dtype=None", expand=_prod_expand)
def prod(cx, result, input, dim, keepdim, dtype):
    x = input.detach().to(cx.dtype)
    if dim is None:
        flat = x.reshape(-1)
        g = _others(flat, 0).reshape(x.shape)
        return _weighted(cx, input, g, tuple(range(x.dim())), False)
    if x.dim() == 0:  # the product along a scalar's dim 0 is the scalar
        return S.of(cx, input)
    d = S.dim(dim, x.dim())
    return _weighted(cx, input, _others(x, d), (d,), bool(keepdim))


def _others(x, d):
    """The product of the other entries along ``d`` (exact with zeros: no division)."""
    ones = torch.ones_like(x.narrow(d, 0, 1))
    left = torch.cat([ones, x.narrow(d, 0, x.shape[d] - 1)], d).cumprod(d)
    flipped = x.flip(d)
    right = torch.cat([ones, flipped.narrow(d, 0, x.shape[d] - 1)], d).cumprod(d).flip(d)
    return left * right


@rule("cumsum", "input dim dtype=None", second="linear")
def cumsum(cx, result, input, dim, dtype):
    if input.dim() == 0:
        return S.of(cx, input)
    d = S.dim(dim, input.dim())
    n = input.shape[d]
    i = torch.arange(n)
    index = i[:, None] - i[None, :]  # y[i] = sum over k of x[i - k], k <= i
    index = index.masked_fill(index < 0, -1)
    shape = tuple(input.shape[:d]) + (n, n) + tuple(input.shape[d + 1 :])
    windows = S.stand(cx, S.gather(cx, S.of(cx, input), d, index), shape)
    return S.sum_dims(cx, windows, (d + 1,), False)


def _cumprod_expand(input, dim, dtype):
    """For the Hessian: the running product written one step at a time."""
    d = S.dim(dim, input.dim()) if input.dim() else 0
    if input.dim() == 0 or input.shape[d] == 0:
        return input * 1
    steps = list(input.unbind(d))
    for k in range(1, len(steps)):
        steps[k] = steps[k - 1] * steps[k]
    return torch.stack(steps, d)


@rule("cumprod", "input dim dtype=None", expand=_cumprod_expand)
def cumprod(cx, result, input, dim, dtype):
    """``d y[i] / d x[j] = prod of x[k] for k <= i, k != j`` (j <= i), formed without a
    division so that zeros give torch's derivative: the product before ``j`` times the product
    after it up to ``i``. A dense lower triangle per slice along ``dim``."""
    if input.dim() == 0:
        return S.of(cx, input)
    d = S.dim(dim, input.dim())
    x = input.detach().movedim(d, -1)
    n = x.shape[-1]
    ones = torch.ones(x.shape[:-1] + (1,), dtype=x.dtype, device=x.device)
    before = torch.cat([ones, x[..., :-1]], -1).cumprod(-1)  # prod of x[k], k < j
    later = torch.arange(n, device=x.device)
    below = later[:, None] > later[None, :]  # k > j
    # after[..., i, j] = prod of x[k], j < k <= i
    after = torch.where(below, x[..., :, None], torch.ones((), dtype=x.dtype)).cumprod(-2)
    weights = torch.tril(after * before[..., None, :])
    letters = "".join(chr(ord("a") + k) for k in range(input.dim() - 1))
    spec = f"{letters}ij,{letters}j->{letters}i"
    moved = S.permute(cx, S.of(cx, input), [k for k in range(input.dim()) if k != d] + [d])
    stand = S.stand(cx, moved, tuple(x.shape))
    terms = S.einsum(cx, None, spec, (weights, stand))
    back = list(range(input.dim() - 1))
    back.insert(d, input.dim() - 1)
    return S.permute(cx, terms, back)
