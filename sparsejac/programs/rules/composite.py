"""Operations torch implements in C++ out of other operations (no Python reference to read),
written here with registered ones: differences, Kronecker products, the trapezoid rule,
pairwise distances, cross products, Vandermonde matrices, covariances and correlations,
quantiles. Their Jacobians come from the rules of what they call.
"""

from __future__ import annotations

import torch

from ...errors import UnsupportedOperationError
from .. import sums as S
from ..registry import decomposition
from ..tracer import PREFIX


@decomposition("diff", "input n=1 dim=-1 prepend=None append=None",
               traced="input prepend append")
def diff(input, n, dim, prepend, append):
    if n < 0:
        raise UnsupportedOperationError(f"{PREFIX}'diff' with n={n}: n must be non-negative")
    parts = [p for p in (prepend, input, append) if p is not None]
    x = torch.cat(parts, dim) if len(parts) > 1 else input
    d = S.dim(dim, x.dim())
    for _ in range(n):
        m = x.shape[d]
        if m == 0:
            break
        x = x.narrow(d, 1, m - 1) - x.narrow(d, 0, m - 1)
    return x


@decomposition("kron", "input other", traced="input other")
def kron(input, other):
    nd = max(input.dim(), other.dim())
    a = input.reshape((1,) * (nd - input.dim()) + tuple(input.shape))
    b = other.reshape((1,) * (nd - other.dim()) + tuple(other.shape))
    # a[i] * b[j] at index i * len(b) + j, axis by axis
    outer = a.reshape([s for n in a.shape for s in (n, 1)]) * b.reshape(
        [s for n in b.shape for s in (1, n)])
    return outer.reshape([m * n for m, n in zip(a.shape, b.shape)])


def _spacing(y, x, dx, d):
    if x is not None:
        if x.dim() == 1:
            shape = [1] * y.dim()
            shape[d] = x.shape[0] - 1
            return (x[1:] - x[:-1]).reshape(shape)
        m = x.shape[d]
        return x.narrow(d, 1, m - 1) - x.narrow(d, 0, m - 1)
    return 1.0 if dx is None else dx


@decomposition("trapezoid", "y x=None dx=None dim=-1", traced="y x")
def trapezoid(y, x, dx, dim):
    d = S.dim(dim, y.dim())
    m = y.shape[d]
    if m == 0:
        return y.sum(d)
    h = _spacing(y, x, dx, d)
    return (h * (y.narrow(d, 1, m - 1) + y.narrow(d, 0, m - 1))).sum(d) / 2


@decomposition("cumulative_trapezoid", "y x=None dx=None dim=-1", traced="y x")
def cumulative_trapezoid(y, x, dx, dim):
    d = S.dim(dim, y.dim())
    m = y.shape[d]
    if m == 0:
        return y.narrow(d, 0, 0)
    h = _spacing(y, x, dx, d)
    return (h * (y.narrow(d, 1, m - 1) + y.narrow(d, 0, m - 1)) / 2).cumsum(d)


@decomposition("cdist", "x1 x2 p=2.0 compute_mode=None", traced="x1 x2")
def cdist(x1, x2, p, compute_mode):
    # every pair's difference, then its p-norm (torch's own at zero distance: gradient 0)
    return torch.linalg.vector_norm(x1.unsqueeze(-2) - x2.unsqueeze(-3), ord=p, dim=-1)


# --- the copying forms of views (torch's functionalisation emits them): the view, copied ---

def _copying(name: str, params: str, view) -> None:
    def copy(**p):
        return view(**p).clone()

    copy.__name__ = name
    decomposition(name, params)(copy)


_copying("view_copy", "input size", lambda input, size: input.reshape(size))
_copying("expand_copy", "input size implicit=False", lambda input, size, implicit: input.expand(size))
_copying("permute_copy", "input dims", lambda input, dims: input.permute(dims))
_copying("squeeze_copy", "input dim=None",
         lambda input, dim: input.squeeze() if dim is None else input.squeeze(dim))
_copying("unsqueeze_copy", "input dim", lambda input, dim: input.unsqueeze(dim))
_copying("t_copy", "input", lambda input: input.t())
_copying("transpose_copy", "input dim0 dim1", lambda input, dim0, dim1: input.transpose(dim0, dim1))
_copying("diagonal_copy", "input offset=0 dim1=0 dim2=1",
         lambda input, offset, dim1, dim2: torch.diagonal(input, offset, dim1, dim2))
_copying("alias_copy", "input", lambda input: input)
_copying("narrow_copy", "input dim start length",
         lambda input, dim, start, length: input.narrow(dim, start, length))
_copying("resolve_conj", "input", lambda input: input)
_copying("resolve_neg", "input", lambda input: input)


@decomposition("half", "input memory_format=None")
def half(input, memory_format):
    return input.to(torch.float16)


@decomposition("bfloat16", "input memory_format=None")
def bfloat16(input, memory_format):
    return input.to(torch.bfloat16)


@decomposition("diagflat", "input offset=0")
def diagflat(input, offset):
    return torch.diag(input.reshape(-1), offset)


@decomposition("nansum", "input dim=None keepdim=False dtype=None")
def nansum(input, dim, keepdim, dtype):
    zeroed = torch.where(torch.isnan(input), 0.0, input)  # torch's gradient: zero at a nan
    x = zeroed if dtype is None else zeroed.to(dtype)
    return x.sum() if dim is None and not keepdim else x.sum(dim if dim is not None else
                                                             tuple(range(x.dim())), keepdim)


@decomposition("nanmean", "input dim=None keepdim=False dtype=None")
def nanmean(input, dim, keepdim, dtype):
    count = (~torch.isnan(input)).to(input.dtype if dtype is None else dtype)
    dims = dim if dim is not None else tuple(range(input.dim()))
    return nansum(input, dims, keepdim, dtype) / count.sum(dims, keepdim)


@decomposition("softmin", "input dim=None _stacklevel=3 dtype=None")
def softmin(input, dim, _stacklevel, dtype):
    return torch.softmax(-input, dim if dim is not None else -1, dtype=dtype)


@decomposition("logcumsumexp", "input dim")
def logcumsumexp(input, dim):
    d = S.dim(dim, input.dim())
    if input.numel() == 0:
        return input * 1
    # a constant shift per slice (cancels in the derivative) keeps the exponentials finite
    shift = input.detach().amax(d, keepdim=True).clamp_min(-1e300)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    return torch.log(torch.exp(input - shift).cumsum(d)) + shift


@decomposition("cartesian_prod", "*tensors", traced="tensors")
def cartesian_prod(tensors):
    if len(tensors) == 1:
        return tensors[0] * 1
    sizes = [t.shape[0] for t in tensors]
    grids = []
    for k, t in enumerate(tensors):
        shape = [1] * len(tensors)
        shape[k] = sizes[k]
        grids.append(t.reshape(shape).expand(sizes).reshape(-1))
    return torch.stack(grids, 1)


def _gradient_along(x, d: int, h: float, edge_order: int):
    """numpy's and torch's second-order accurate differences along ``d``, uniform spacing."""
    n = x.shape[d]
    if n < edge_order + 1:
        raise UnsupportedOperationError(
            f"{PREFIX}'gradient' needs at least {edge_order + 1} entries along dim {d}")
    at = lambda i, m=1: x.narrow(d, i % n, m)  # noqa: E731
    inner = (x.narrow(d, 2, n - 2) - x.narrow(d, 0, n - 2)) / (2 * h)
    if edge_order == 1:
        first = (at(1) - at(0)) / h
        last = (at(n - 1) - at(n - 2)) / h
    else:
        first = (-1.5 * at(0) + 2 * at(1) - 0.5 * at(2)) / h
        last = (0.5 * at(n - 3) - 2 * at(n - 2) + 1.5 * at(n - 1)) / h
    return torch.cat([first, inner, last], d)


@decomposition("gradient", "input spacing=1 dim=None edge_order=1")
def gradient(input, spacing, dim, edge_order):
    dims = (list(range(input.dim())) if dim is None
            else [dim] if isinstance(dim, int) else list(dim))
    dims = [S.dim(d, input.dim()) for d in dims]
    spacings = spacing if isinstance(spacing, (list, tuple)) else [spacing] * len(dims)
    if len(spacings) != len(dims) or not all(isinstance(h, (int, float)) for h in spacings):
        raise UnsupportedOperationError(
            f"{PREFIX}'gradient' with coordinates as spacing is not supported; pass one number "
            "per dimension")
    if edge_order not in (1, 2):
        raise UnsupportedOperationError(f"{PREFIX}'gradient' with edge_order={edge_order!r}")
    return tuple(_gradient_along(input, d, float(h), edge_order) for d, h in zip(dims, spacings))


# --- written as torch's C++ implementations write them ---

@decomposition("trapz", "y x=None dim=-1 dx=None", traced="y x")
def trapz(y, x, dim, dx):
    return trapezoid(y, x, dx, dim)


@decomposition("dist", "input other p=2", traced="input other")
def dist(input, other, p):
    return torch.linalg.vector_norm(input - other, p)


@decomposition("cross", "input other dim=None out=None", traced="input other")
def cross(input, other, dim, out):
    if dim is None:  # torch's deprecated default: the first dimension of size 3
        sizes = torch.broadcast_shapes(input.shape, other.shape)
        dim = next((d for d, n in enumerate(sizes) if n == 3), None)
        if dim is None:
            raise UnsupportedOperationError(f"{PREFIX}'cross': no dimension of size 3")
    return torch.linalg.cross(input, other, dim=dim)


@decomposition("linalg_vander", "x N=None")
def vander(x, N):
    """torch's: a column of ones, then the running product of ``x`` (its derivative at zero
    is the product rule's, as torch's cumprod gives it)."""
    n = x.shape[-1] if N is None else N
    if n <= 1:
        raise UnsupportedOperationError(f"{PREFIX}'linalg.vander' needs N > 1, got {n}")
    shape = tuple(x.shape) + (n - 1,)
    powers = torch.cumprod(x.unsqueeze(-1).expand(shape), -1)
    ones = torch.ones(tuple(x.shape) + (1,), dtype=powers.dtype, device=powers.device)
    return torch.cat([ones, powers], -1)


@decomposition("cov", "input correction=1 fweights=None aweights=None", traced="input aweights")
def cov(input, correction, fweights, aweights):
    """torch's cov (Correlation.cpp): a weighted mean, then the weighted product of the centred
    observations over the normalisation factor (zero where the degrees of freedom are not
    positive, as torch sets it)."""
    if input.dim() > 2:
        raise UnsupportedOperationError(f"{PREFIX}'cov' takes at most 2 dimensions")
    x = input.reshape(1, -1) if input.dim() < 2 else input
    n = x.shape[1]
    w = fweights
    if aweights is not None:
        w = aweights if w is None else w * aweights
    if w is None:
        w_sum = n
        avg = x.sum(1) / n
    else:
        w_sum = w.sum()
        if bool(w_sum.detach() == 0):
            raise UnsupportedOperationError(f"{PREFIX}'cov': weights sum to zero")
        avg = (x * w).sum(1) / w_sum
    if w is not None and correction != 0 and aweights is not None:
        factor = w_sum - correction * (w * aweights).sum() / w_sum
    else:
        factor = w_sum - correction
    positive = bool(factor.detach() > 0) if isinstance(factor, torch.Tensor) else factor > 0
    if not positive:
        factor = factor * 0
    centred = x - avg.unsqueeze(1)
    c = torch.mm(centred, (centred if w is None else centred * w).t())
    return torch.true_divide(c, factor).squeeze()


@decomposition("corrcoef", "input")
def corrcoef(input):
    c = cov(input, 1, None, None)
    if c.dim() == 0:
        return c / c
    stddev = torch.sqrt(c.diagonal())
    c = c / stddev.reshape(-1, 1)
    c = c / stddev.reshape(1, -1)
    return c.clip(-1, 1)


_MODES = ("linear", "lower", "higher", "midpoint", "nearest")


def _quantile(input, q, dim, keepdim, interpolation, ignore_nan):
    """torch's quantile_compute (Sorting.cpp): sort, then interpolate between the two sorted
    entries around each quantile's rank (``lerp``), so the derivative goes where torch's
    gradient goes: to the entries its sort places there, ties included."""
    name = "nanquantile" if ignore_nan else "quantile"
    if interpolation not in _MODES:
        raise UnsupportedOperationError(f"{PREFIX}{name!r} with interpolation={interpolation!r}")
    if isinstance(q, torch.Tensor) and q.dim() > 1:
        raise UnsupportedOperationError(f"{PREFIX}{name!r}: q must be a scalar or 1-D")
    if input.numel() == 0:
        raise UnsupportedOperationError(f"{PREFIX}{name!r} of an empty tensor")
    qs = torch.as_tensor(q.detach() if isinstance(q, torch.Tensor) else q, dtype=input.dtype,
                         device=input.device)
    scalar_q = qs.dim() == 0
    qs = qs.reshape(-1)
    if dim is None:
        values = input.reshape(-1).sort().values
    else:
        d = S.dim(dim, input.dim()) if input.dim() else 0
        if input.dim() == 0:
            values = input.reshape(1).sort().values
        elif d == input.dim() - 1:
            values = input.sort().values
        else:  # as torch sorts it (the same call, the same order of ties)
            values = input.unsqueeze(-1).transpose(d, -1).sort().values.squeeze(d)
    sorted_ = values.detach()
    n = sorted_.shape[-1]
    if ignore_nan:
        count = (~torch.isnan(sorted_)).sum(-1, keepdim=True)
        ranks = (qs * (count - 1)).clamp_min(0)
    else:
        ranks = (qs * (n - 1)).expand(sorted_.shape[:-1] + qs.shape)
        ranks = torch.where(torch.isnan(sorted_).any(-1, keepdim=True),
                            torch.full_like(ranks, n - 1), ranks)
    if interpolation == "lower":
        ranks = ranks.floor()
    elif interpolation == "higher":
        ranks = ranks.ceil()
    elif interpolation == "nearest":
        ranks = ranks.round()
    below = ranks.to(torch.long)
    out = values.gather(-1, below)
    if interpolation in ("linear", "midpoint"):
        weights = torch.full_like(ranks, 0.5) if interpolation == "midpoint" else ranks - below
        out = torch.lerp(out, values.gather(-1, ranks.ceil().to(torch.long)), weights)
    out = out.movedim(-1, 0)  # (quantiles, kept dims...)
    if keepdim:
        if dim is None:
            out = out.reshape((out.shape[0],) + (1,) * input.dim())
        elif input.dim():
            out = out.unsqueeze(d + 1)
    return out.squeeze(0) if scalar_q else out


@decomposition("quantile", "input q dim=None keepdim=False interpolation='linear' out=None",
               traced="input")
def quantile(input, q, dim, keepdim, interpolation, out):
    return _quantile(input, q, dim, keepdim, interpolation, False)


@decomposition("nanquantile", "input q dim=None keepdim=False interpolation='linear' out=None",
               traced="input")
def nanquantile(input, q, dim, keepdim, interpolation, out):
    return _quantile(input, q, dim, keepdim, interpolation, True)
