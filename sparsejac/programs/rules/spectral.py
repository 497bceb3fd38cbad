"""Discrete Fourier transforms with real results of real inputs (``fft.irfft``, ``fft.hfft``
and their 2-D and n-D forms) and the shifts of their spectra (``fft.fftshift``,
``fft.ifftshift``). Such a transform of a real input is a real linear map, dense along the
transformed axes and the identity along the others: its Jacobian is one dense factor over the
transformed axes (the transform of each basis vector, as torch computes it), shared by every
entry of the other axes. Complex inputs are refused (the tracer follows real tensors).
"""

from __future__ import annotations

import math
import string

import torch
from torch._refs.fft import _canonicalize_fft_shape_and_dim_args

from ...errors import UnsupportedOperationError
from .. import sums as S
from ..registry import decomposition, rule
from ..tracer import PREFIX


def _spectral(cx, result, input, dims, transform, name):
    """The terms of ``result = transform(input, axes)`` for a real linear ``transform`` along
    the axes ``dims`` (in the order the transform takes them)."""
    if input.is_complex():
        raise UnsupportedOperationError(f"{PREFIX}{name!r} of a complex input is not supported")
    n, k = input.dim(), len(dims)
    others = [a for a in range(n) if a not in dims]
    perm = others + list(dims)
    core = tuple(input.shape[a] for a in dims)
    out_core = tuple(result.shape[a] for a in dims)
    size = math.prod(core) * math.prod(out_core)
    cx.labels.guard((size,), result.element_size(), f"the dense factor of {name}")
    m = math.prod(core)
    basis = torch.eye(m, dtype=input.dtype, device=input.device).reshape((m,) + core)
    with torch.no_grad():
        images = transform(basis, tuple(range(-k, 0)))
    factor = images.reshape(m, -1).T.reshape(out_core + core).to(result.dtype)
    letters = iter(string.ascii_letters)
    bl = "".join(next(letters) for _ in others)
    ol = "".join(next(letters) for _ in dims)
    il = "".join(next(letters) for _ in dims)
    moved = S.stand(cx, S.permute(cx, S.of(cx, input), perm),
                    tuple(input.shape[a] for a in perm))
    terms = S.einsum(cx, None, f"{ol}{il},{bl}{il}->{bl}{ol}", (factor, moved))
    return S.permute(cx, terms, [perm.index(a) for a in range(n)])


def _one_dim(name, fn):
    def jacobian(cx, result, input, n, dim, norm):
        d = S.dim(dim, input.dim())
        return _spectral(cx, result, input, (d,),
                         lambda x, axes: fn(x, n=n, dim=axes[0], norm=norm), name)

    jacobian.__name__ = name.replace(".", "_")
    rule(name.replace(".", "_"), "input n=None dim=-1 norm=None", second="linear")(jacobian)


def _many_dims(name, fn, default_dim):
    def jacobian(cx, result, input, s, dim, norm):
        dims = tuple(_canonicalize_fft_shape_and_dim_args(input, s, dim).dims)
        return _spectral(cx, result, input, dims,
                         lambda x, axes: fn(x, s=s, dim=axes, norm=norm), name)

    jacobian.__name__ = name.replace(".", "_")
    rule(name.replace(".", "_"), f"input s=None dim={default_dim} norm=None",
         second="linear")(jacobian)


_one_dim("fft.irfft", torch.fft.irfft)
_one_dim("fft.hfft", torch.fft.hfft)
_many_dims("fft.irfft2", torch.fft.irfft2, "(-2,-1)")
_many_dims("fft.hfft2", torch.fft.hfft2, "(-2,-1)")
_many_dims("fft.irfftn", torch.fft.irfftn, "None")
_many_dims("fft.hfftn", torch.fft.hfftn, "None")


def _shift(input, dim, inverse):
    dims = (list(range(input.dim())) if dim is None
            else [dim] if isinstance(dim, int) else list(dim))
    shift = [(input.shape[d] + inverse) // 2 for d in dims]
    return torch.roll(input, shift, dims)


@decomposition("fft_fftshift", "input dim=None")
def fftshift(input, dim):
    return _shift(input, dim, 0)


@decomposition("fft_ifftshift", "input dim=None")
def ifftshift(input, dim):
    return _shift(input, dim, 1)
