"""Jacobians as sums of terms: the helpers rules are written with.

A traced tensor's Jacobian is a dict from argument leaf to a list of
:class:`~sparsejac.programs.terms.Term` (a sum). Each helper maps the terms of its inputs
through one move of the term algebra and adds the results.

It calls the algebra through the package (``T.name``: a test may patch one move) and reads the
tracer's terms; it never imports a rule, the second order or a writer.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..errors import UnsupportedOperationError
from ..grammar import bind, parse
from . import terms as T
from .tracer import PREFIX, Terms, Tracer


def of(cx: Tracer, x: Any) -> Terms:
    """The terms of ``x`` (empty for a constant)."""
    return cx.terms(x) or {}


def map_terms(terms: Terms | None, fn: Callable[[T.Term], T.Term]) -> Terms:
    return {} if not terms else {k: [fn(t) for t in ts] for k, ts in terms.items()}


def add(cx: Tracer, *parts: Terms) -> Terms:
    total: Terms = {}
    for part in parts:
        for k, ts in part.items():
            total.setdefault(k, []).extend(ts)
    return {k: T.merge(ts, cx.labels) for k, ts in total.items()}


def value(x: Any, like: Any) -> Any:
    """A Python number as a tensor of ``like``'s dtype and device."""
    import torch

    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def broadcast(cx: Tracer, x: Any, shape: Sequence[int], fresh: dict | None = None) -> Terms:
    fresh = {} if fresh is None else fresh
    return map_terms(cx.terms(x), lambda t: T.expand(t, tuple(shape), fresh, cx.labels))


def scaled(cx: Tracer, terms: Terms, g: Any) -> Terms:
    return map_terms(terms, lambda t: T.scale(t, g.detach(), cx.labels))


def times(cx: Tracer, terms: Terms, c: float) -> Terms:
    if isinstance(c, (int, float)) and c == 1:
        return terms
    return map_terms(terms, lambda t: T.multiply(t, c, cx.labels))


def reshape(cx: Tracer, terms: Terms, shape: Sequence[int]) -> Terms:
    return map_terms(terms, lambda t: T.reshape(t, tuple(shape), cx.labels))


def permute(cx: Tracer, terms: Terms, perm: Sequence[int]) -> Terms:
    return map_terms(terms, lambda t: T.permute(t, perm))


def gather(cx: Tracer, terms: Terms, axis: int, index: Any) -> Terms:
    """Entries ``index`` (int64, -1 for none) along ``axis``, which becomes ``index.shape``."""
    return map_terms(terms, lambda t: T.gather(t, axis, index, cx.labels))


def remap(cx: Tracer, terms: Terms, axes: Sequence[int], table: Any, size: int) -> Terms:
    """Send the entries of ``axes`` to ``table``'s places on one new axis of ``size``."""
    return map_terms(terms, lambda t: T.remap(t, tuple(axes), table, size, cx.labels))


def einsum_terms(cx: Tracer, inputs, output, sizes, values: Sequence[Any]) -> Terms:
    """The product rule over an einsum (integer labels): one set of terms per traced operand."""
    parts = []
    fresh: dict = {}
    vals = [v.detach() if hasattr(v, "detach") else v for v in values]
    for k, v in enumerate(values):
        terms = cx.terms(v)
        if terms is not None:
            parts.append(map_terms(
                terms, lambda t: T.compose(t, inputs, output, sizes, k, vals, cx.labels, fresh)))
    return add(cx, *parts)


def einsum(cx: Tracer, result: Any, spec: str, values: Sequence[Any]) -> Terms:
    """The product rule over ``torch.einsum(spec, *values)`` (numpy's grammar)."""
    e = bind(parse(spec, len(values)), [tuple(v.shape) for v in values])
    if result is not None and e.output_shape != tuple(result.shape):
        raise UnsupportedOperationError(
            f"{PREFIX}einsum {spec!r}: torch's result shape {tuple(result.shape)} differs from "
            f"numpy's reading of the subscripts {e.output_shape}"
        )
    return einsum_terms(cx, e.inputs, e.output, e.sizes, values)


def sum_dims(cx: Tracer, x: Any, dims: Sequence[int], keepdim: bool) -> Terms:
    """The terms of ``x.sum(dims, keepdim)``."""
    n = x.dim()
    sizes = list(x.shape)
    output = []
    for d in range(n):
        if d not in dims:
            output.append(d)
        elif keepdim:
            sizes.append(1)
            output.append(len(sizes) - 1)
    return einsum_terms(cx, (tuple(range(n)),), tuple(output), tuple(sizes), (x,))


def reduce_dims(x: Any, d: Any) -> tuple[int, ...]:
    """``dim`` of a reduction as sorted axes (None or () for all; none for a scalar, whose dims
    0 and -1 torch takes as the scalar itself)."""
    if d is None or x.dim() == 0:
        return tuple(range(x.dim()))
    dims = d if isinstance(d, (list, tuple)) else (d,)
    if len(dims) == 0:
        return tuple(range(x.dim()))
    return tuple(sorted({dim(k, x.dim()) for k in dims}))


def elementwise(cx: Tracer, result: Any, derivatives: Sequence[tuple[Any, Any]]) -> Terms:
    """Sum over ``(x, dy/dx)`` pairs: each traced ``x`` broadcast to the result and scaled."""
    shape = tuple(result.shape)
    fresh: dict = {}
    parts = []
    for x, g in derivatives:
        if cx.terms(x) is not None:
            parts.append(scaled(cx, broadcast(cx, x, shape, fresh), g))
    return add(cx, *parts)


class Stand:
    """A stand-in for a tensor that was never computed (``x * w`` before a sum, windows before
    a pooling): it carries ``terms`` of ``shape``, for the helpers above that read a tensor's
    shape and terms. Its values are never read."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(shape)

    def dim(self) -> int:
        return len(self.shape)

    def detach(self) -> "Stand":
        return self


def stand(cx: Tracer, terms: Terms, shape: Sequence[int]) -> Stand:
    s = Stand(shape)
    cx.record(s, terms)
    return s
