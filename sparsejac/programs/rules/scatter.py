"""Placements: operations that put entries of a source at positions of a copy of their input,
overwriting (``index_put``, ``scatter``, ``index_copy``, ``masked_scatter``) or adding
(``index_put(accumulate=True)``, ``index_add``, ``scatter_add``, ``put``), the ``*_scatter``
forms of views (``diagonal_scatter``, ``as_strided_scatter``), ``max_unpool``, and the reducing
placements (``scatter_reduce``, ``index_reduce``).

Each is read as a table of targets: for each entry of the source, the flat position of the
input it lands on (computed by running the operation's own indexing on the input's positions).
The result's terms are the input's, less the overwritten entries, plus the source's sent to
their targets (an index map; entries landing on one place are summed). An overwrite that writes
one place twice is refused: torch keeps one value and differentiates as if it kept both.
"""

from __future__ import annotations

import math

import torch

from ...errors import UnsupportedOperationError
from .. import sums as S
from ..registry import decomposition, rule
from ..tracer import PREFIX
from .layout import distinct_positions, place, positions


def ramp(x: torch.Tensor) -> torch.Tensor:
    """``0, 1, 2, ...`` (int64) in ``x``'s shape: each entry's flat position."""
    return torch.arange(math.prod(x.shape), device=x.device).reshape(x.shape)


def distinct(targets: torch.Tensor, name: str) -> None:
    """Refuse an overwrite of one place twice."""
    if not distinct_positions(targets.reshape(-1)):
        raise UnsupportedOperationError(
            f"{PREFIX}{name!r} writes one element twice (a repeated index); torch keeps one of "
            "the values and differentiates as if it kept both, so it is not supported: "
            "accumulate instead, or use distinct indices")


def placed(cx, result: torch.Tensor, input: torch.Tensor, targets: torch.Tensor,
           source, accumulate: bool, name: str) -> dict:
    """The terms of ``result``: ``input``'s, with ``source`` (a tensor of ``targets``' shape,
    traced or not) written at the flat positions ``targets`` (int64), added there where
    ``accumulate``, else in place of the input's entries there."""
    n = math.prod(result.shape)
    parts = []
    if not accumulate:
        distinct(targets, name)
        kept = positions(input)  # 1 + the input's position; 0 where overwritten
        kept.view(-1)[targets.reshape(-1)] = 0
        parts.append(place(cx, result, input, kept, part=True))
    else:
        parts.append(S.of(cx, input))
    terms = S.of(cx, source) if isinstance(source, torch.Tensor) else {}
    if terms:
        flat = S.reshape(cx, S.broadcast(cx, source, tuple(targets.shape)),
                         (math.prod(targets.shape),))
        parts.append(S.reshape(cx, S.remap(cx, flat, (0,), targets.reshape(-1), n),
                               tuple(result.shape)))
    # an input's entries all overwritten land nowhere: dropped before the sum
    return S.add(cx, *({k: [t for t in ts if not nowhere(t, cx.labels)] for k, ts in p.items()}
                       for p in parts))


def nowhere(term, labels) -> bool:
    """Whether every entry of ``term`` was written over: an index map of its output that gives
    no entry a place."""
    return any(a in labels.derived and bool((labels.derived[a][0] < 0).all())
               for a in term.out_atoms)


@rule("index_put", "input indices values accumulate=False", traced="input values", second="linear")
def index_put(cx, result, input, indices, values, accumulate):
    targets = ramp(input)[tuple(indices)]
    return placed(cx, result, input, targets, values, bool(accumulate), "index_put")


@rule("index_add", "input dim index source alpha=1", traced="input source", second="linear")
def index_add(cx, result, input, dim, index, source, alpha):
    d = S.dim(dim, input.dim())
    targets = ramp(input).index_select(d, index) if input.dim() else ramp(input)
    src = source if alpha == 1 else source * alpha
    if alpha != 1:
        terms = S.times(cx, S.of(cx, source), alpha)
        cx.record(src, terms)
    return placed(cx, result, input, targets.expand(source.shape), src, True, "index_add")


@rule("index_copy", "input dim index source", traced="input source", second="linear")
def index_copy(cx, result, input, dim, index, source):
    d = S.dim(dim, input.dim())
    targets = ramp(input).index_select(d, index) if input.dim() else ramp(input)
    return placed(cx, result, input, targets.expand(source.shape), source, False, "index_copy")


def _scatter_targets(input, dim, index):
    d = S.dim(dim, input.dim())
    return ramp(input).gather(d, index) if input.dim() else ramp(input).reshape(index.shape)


@rule("scatter_add", "input dim index src", traced="input src", second="linear")
def scatter_add(cx, result, input, dim, index, src):
    targets = _scatter_targets(input, dim, index)
    part = src[tuple(slice(0, n) for n in index.shape)] if src.dim() else src
    if part is not src:
        cx.record(part, S.of(cx, src) and _corner(cx, src, index.shape))
    return placed(cx, result, input, targets, part, True, "scatter_add")


@rule("scatter", "input dim index src=None value=None reduce=None", traced="input src", second="linear")
def scatter(cx, result, input, dim, index, src, value, reduce):
    if reduce is not None:
        raise UnsupportedOperationError(
            f"{PREFIX}'scatter' with reduce={reduce!r} is not supported; use scatter_add or "
            "scatter_reduce's functional forms")
    targets = _scatter_targets(input, dim, index)
    if src is None or not isinstance(src, torch.Tensor):
        return placed(cx, result, input, targets, None, False, "scatter")
    part = src[tuple(slice(0, n) for n in index.shape)] if src.dim() else src
    if part is not src:
        cx.record(part, S.of(cx, src) and _corner(cx, src, index.shape))
    return placed(cx, result, input, targets, part, False, "scatter")


def _corner(cx, src, shape):
    """The terms of ``src``'s leading corner of ``shape`` (what scatter reads of it)."""
    pos = positions(src)[tuple(slice(0, n) for n in shape)]
    return place(cx, pos, src, pos)


@rule("masked_scatter", "input mask source", traced="input source", second="linear")
def masked_scatter(cx, result, input, mask, source):
    full = mask.expand(input.shape) if mask.shape != input.shape else mask
    targets = ramp(input)[full]
    count = targets.numel()
    part = source.reshape(-1)[:count]
    cx.record(part, place(cx, part, source, positions(source).reshape(-1)[:count]))
    return placed(cx, result, input, targets, part, False, "masked_scatter")


def _reduce_second(hx, result, ybar, input, dim, index, src, reduce, include_self):
    """Sums, means and selections have no curvature; a product has, and is refused."""
    if reduce == "prod":
        raise UnsupportedOperationError(
            f"{PREFIX}'scatter_reduce' with reduce='prod' has no second-order rule, so "
            "hessian_of cannot follow it")
    return []


@rule("scatter_reduce", "input dim index src reduce include_self=True", traced="input src",
      second=_reduce_second)
def scatter_reduce(cx, result, input, dim, index, src, reduce, include_self):
    """``sum`` and ``mean`` weigh each entry that lands on a place (1, or 1 over the count
    there); ``amax`` and ``amin`` weigh the entries equal to the result there, ties sharing, as
    torch's gradient does; ``prod`` weighs each by the product of the others there."""
    if reduce not in ("sum", "mean", "amax", "amin", "prod"):
        raise UnsupportedOperationError(
            f"{PREFIX}'scatter_reduce' with reduce={reduce!r} is not supported")
    targets = _scatter_targets(input, dim, index)
    flat_t = targets.reshape(-1)
    part = src[tuple(slice(0, n) for n in index.shape)] if src.dim() else src
    n = math.prod(input.shape)
    dtype = result.dtype
    hits = torch.zeros(n, dtype=dtype, device=input.device).index_add_(
        0, flat_t, torch.ones(flat_t.numel(), dtype=dtype, device=input.device))
    touched = (hits > 0).reshape(input.shape)
    keep = torch.ones(input.shape, dtype=dtype, device=input.device)
    if reduce == "prod":
        w_in, w_src = _prod_weights(input.detach().reshape(-1), part.detach().reshape(-1),
                                    flat_t, hits > 0, bool(include_self))
        w_in = w_in.reshape(input.shape)
    elif reduce in ("sum", "mean"):
        count = hits.reshape(input.shape) + (1.0 if include_self else 0.0)
        w_in = torch.where(touched, (1.0 / count) if reduce == "mean" else keep,
                           keep) if include_self else torch.where(touched, 0.0 * keep, keep)
        w_src = (1.0 / count.reshape(-1))[flat_t] if reduce == "mean" else torch.ones_like(
            flat_t, dtype=dtype)
    else:
        out = result.detach().reshape(-1)
        hit_src = (part.detach().reshape(-1) == out[flat_t]).to(dtype)
        hit_in = ((input.detach().reshape(-1) == out) & (hits > 0)).to(dtype) if include_self \
            else torch.zeros(n, dtype=dtype, device=input.device)
        ties = hit_in + torch.zeros(n, dtype=dtype, device=input.device).index_add_(
            0, flat_t, hit_src)
        ties = ties.clamp_min(1.0)
        w_in = torch.where(touched, (hit_in / ties).reshape(input.shape), keep)
        w_src = hit_src / ties[flat_t]
    parts = [S.scaled(cx, S.of(cx, input), w_in)]
    terms = S.of(cx, part) if part is src else _corner(cx, src, index.shape)
    if terms:
        flat = S.scaled(cx, S.reshape(cx, terms, (flat_t.numel(),)), w_src)
        parts.append(S.reshape(cx, S.remap(cx, flat, (0,), flat_t, n), tuple(result.shape)))
    return S.add(cx, *parts)


def _prod_weights(x, v, t, touched, include_self):
    """The derivatives of ``out[p] = (x[p] if include_self) * prod(v[j] for t[j] == p)`` (at
    touched places; elsewhere ``x[p]``): each factor's is the product of the others, read
    without dividing by a zero (one zero among them: its weight is the product of the rest;
    two: every weight is zero), as torch's gradient has it."""
    n, dtype = x.numel(), x.dtype
    ones = torch.ones(n, dtype=dtype, device=x.device)
    zero_v = v == 0
    nz = torch.ones(n, dtype=dtype, device=x.device).index_reduce_(
        0, t, torch.where(zero_v, 1.0, v), "prod")  # the product of the nonzero factors
    zeros = torch.zeros(n, dtype=dtype, device=x.device).index_add_(0, t, zero_v.to(dtype))
    if include_self:
        nz = nz * torch.where(x == 0, 1.0, x)
        zeros = zeros + (x == 0).to(dtype)

    def others(value, is_zero, at):
        z = zeros[at] - is_zero.to(dtype)  # zeros among the other factors
        rest = torch.where(is_zero, nz[at], nz[at] / torch.where(is_zero, 1.0, value))
        return torch.where(z == 0, rest, torch.zeros_like(rest))

    w_src = others(v, zero_v, t)
    at = torch.arange(n, device=x.device)
    w_in = torch.where(touched, others(x, x == 0, at) if include_self else 0.0 * ones, ones)
    return w_in, w_src


@decomposition("index_reduce", "input dim index source reduce include_self=True",
               traced="input source")
def index_reduce(input, dim, index, source, reduce, include_self):
    """``scatter_reduce`` with the index spread over the source's other dimensions."""
    if input.dim() == 0:
        return torch.scatter_reduce(input, 0, index.reshape(()), source, reduce,
                                    include_self=include_self)
    d = S.dim(dim, input.dim())
    shape = [1] * source.dim()
    shape[d] = -1
    spread = index.reshape(shape).expand(source.shape)
    return torch.scatter_reduce(input, d, spread, source, reduce, include_self=include_self)


@rule("put", "input index source accumulate=False", traced="input source", second="linear")
def put(cx, result, input, index, source, accumulate):
    targets = ramp(input).reshape(-1)[index.reshape(-1)].reshape(source.shape)
    return placed(cx, result, input, targets, source, bool(accumulate), "put")


@rule("diagonal_scatter", "input src offset=0 dim1=0 dim2=1", traced="input src",
      second="linear")
def diagonal_scatter(cx, result, input, src, offset, dim1, dim2):
    targets = torch.diagonal(ramp(input), offset, dim1, dim2)
    return placed(cx, result, input, targets, src, False, "diagonal_scatter")


@rule("as_strided_scatter", "input src size stride storage_offset=None", traced="input src",
      second="linear")
def as_strided_scatter(cx, result, input, src, size, stride, storage_offset):
    if S.of(cx, input):
        # torch 2.13's gradient for the input is the complement of its derivative (it passes
        # the gradient at the written elements and drops it elsewhere): refused, not copied
        raise UnsupportedOperationError(
            f"{PREFIX}'as_strided_scatter' differentiated through its input is not supported "
            "(torch's own gradient there is not the derivative); use index_put or "
            "scatter on a flat view, or differentiate through src only")
    # torch writes into a contiguous copy of the input: offsets count from its first element
    targets = ramp(input).as_strided(size, stride, storage_offset or 0)
    return placed(cx, result, input, targets, src, False, "as_strided_scatter")


def _unpool(name, k):
    def unpool(cx, result, input, indices, kernel_size, stride, padding, output_size):
        """Each entry sent to the place its index names in a zero output; entries sent to one
        place add there, as torch's gradient (a gather at the indices) has them, whichever
        one torch's value keeps."""
        batched = input.dim() == k + 2
        plane = math.prod(result.shape[-k:])
        lead = input.shape[:2] if batched else input.shape[:1]
        base = torch.arange(math.prod(lead), device=input.device).reshape(
            (*lead,) + (1,) * k) * plane
        targets = (indices + base).expand(input.shape)
        return placed(cx, result, result, targets, input, True, name)

    unpool.__name__ = name
    rule(name, "input indices kernel_size stride=None padding=0 output_size=None",
         traced="input", second="linear")(unpool)


for _k in (1, 2, 3):
    _unpool(f"max_unpool{_k}d", _k)


@decomposition("_unsafe_masked_index_put_accumulate", "input mask indices values",
               traced="input values")
def unsafe_masked_index_put_accumulate(input, mask, indices, values):
    """torch's decomposition: indices clamped to the input, values masked, accumulated."""
    if input.numel() == 0:
        return input * 1
    idx = [None if i is None else i.clamp(min=-input.shape[k], max=input.shape[k] - 1)
           for k, i in enumerate(indices)]
    return torch.index_put(input, idx, values.masked_fill(~mask, 0), accumulate=True)
