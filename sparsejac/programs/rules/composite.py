"""Operations torch implements in C++ out of other operations (no Python reference to read),
written here with registered ones: differences, Kronecker products, the trapezoid rule,
pairwise distances. Their Jacobians come from the rules of what they call.
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
