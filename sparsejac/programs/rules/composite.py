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
