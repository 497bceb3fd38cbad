"""Selections made by values: sorting and order statistics (``sort``, ``msort``, ``topk``,
``kthvalue``, ``median`` and ``nanmedian``, ``mode``). Which entries are
chosen is a value, the indices torch returns; the values' terms are the input's gathered at
those indices, so the derivative goes where torch's gradient goes, ties included.
"""

from __future__ import annotations

from .. import sums as S
from ..registry import rule
from .layout import place, positions


def _chosen(cx, result, input, dim, keepdim=True):
    """``[terms of the values, None]`` for a ``(values, indices)`` result along ``dim``."""
    values, indices = result[0], result[1]
    if input.dim() == 0:
        return [S.of(cx, input), None]
    d = S.dim(dim, input.dim())
    index = indices if keepdim else indices.unsqueeze(d)
    pos = positions(input).gather(d, index)
    return [place(cx, values, input, pos if keepdim else pos.squeeze(d)), None]


@rule("sort", "input dim=-1 descending=False stable=False", second="linear")
def sort(cx, result, input, dim, descending, stable):
    return _chosen(cx, result, input, dim)


@rule("topk", "input k dim=-1 largest=True sorted=True", second="linear")
def topk(cx, result, input, k, dim, largest, sorted):
    return _chosen(cx, result, input, dim)


@rule(("kthvalue",), "input k dim=-1 keepdim=False", second="linear")
def kthvalue(cx, result, input, k, dim, keepdim):
    return _chosen(cx, result, input, dim, bool(keepdim))


@rule(("mode",), "input dim=-1 keepdim=False", second="linear")
def mode(cx, result, input, dim, keepdim):
    return _chosen(cx, result, input, dim, bool(keepdim))


@rule("msort", "input", second="linear")
def msort(cx, result, input):
    import torch

    indices = torch.sort(input.detach(), dim=0).indices
    return _chosen(cx, (result, indices), input, 0)[0]


def _median(cx, result, input, dim, keepdim):
    if dim is None:
        # torch spreads the gradient evenly over the entries equal to the median
        hit = (input.detach() == result.detach()).to(result.dtype)
        weights = (hit / hit.sum()).reshape(-1)
        flat = S.reshape(cx, S.of(cx, input), (input.numel(),))
        return S.einsum(cx, result, "i,i->", (weights, S.stand(cx, flat, (input.numel(),))))
    return _chosen(cx, result, input, dim, bool(keepdim))


@rule("median", "input dim=None keepdim=False", second="linear")
def median(cx, result, input, dim, keepdim):
    return _median(cx, result, input, dim, keepdim)


@rule("nanmedian", "input dim=None keepdim=False", second="linear")
def nanmedian(cx, result, input, dim, keepdim):
    return _median(cx, result, input, dim, keepdim)
