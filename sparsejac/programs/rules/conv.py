"""Convolution and pooling: ``conv1d/2d/3d``, ``conv_transpose1d/2d/3d``, ``F.unfold`` /
``F.fold``, average, maximum, adaptive and power-average pooling.

Every rule here is built from one piece of geometry, a *window table* per spatial dimension:
``table[o, k]`` is the input cell that entry ``k`` of output cell ``o``'s window reads, -1
where there is none (padding, past the end for ``ceil_mode``; for a transposed convolution
``(o + padding - k * dilation) / stride`` where that is a whole number in bounds). The windows
of a traced input are an index map on its terms: the windows of its *positions* (1 + flat
position, 0 for none) make a gather (:func:`terms.gather`) over the axes
``(batch, group, channel, kernel..., cells...)``, never a dense selection factor, and its out
labels stay plain labels, so that later selections (a pooling after a convolution, a
convolution after a pooling) are index maps again. Then

- a (transposed) convolution is an einsum of the windows with the weight: the weight's values
  for the derivative with respect to the input; for the derivative with respect to the weight,
  the weight's entries gathered onto the window entries that exist, times the input's window
  values. Grouped channels are an axis ``g`` of both. A term enumerates
  ``B * O * cells * C/groups * K`` entries (dropped ones included).
- ``F.unfold`` is the windows themselves; ``F.fold`` gathers, per output cell and kernel
  offset, the column entry of the block that covers it, and sums over the kernel.
- average pooling sums each window times ``1 / divisor`` (torch's divisor:
  ``divisor_override``, ``count_include_pad``, ``ceil_mode``); adaptive average pooling has a
  window of its own size per output cell (absent entries -1, weight ``1 / size``).
- maximum pooling (plain and adaptive) sums each window weighted by the one-hot of the entry
  torch's own indices pick: which entry wins is a value, not structure, as in
  :func:`reduce._weighted`.

Stored entries (the structural nonzeros):

- ``conv*`` and ``conv_transpose*`` w.r.t. the input: one per output entry and input entry of
  its window that exists, in the output channel's group (padding, and the cells a stride
  skips, store nothing); w.r.t. the weight: one per output entry and weight entry of its output
  channel whose window entry exists; w.r.t. the bias: one per output entry. For values with no
  zero entry this is exactly the set of entries ``torch.func.jacrev`` shows nonzero.
- ``unfold``/``fold``: each output entry's sources.
- ``avg_pool*``, ``adaptive_avg_pool*``, ``lp_pool*``: one per output entry and window entry
  that exists (jacrev's nonzeros).
- ``max_pool*``, ``adaptive_max_pool*``: one per output entry and window entry that exists
  too: the whole window, a pattern that does not depend on the values (all but one of each
  window's stored values are zero, as in ``max(dim)``), so it is *not* jacrev's count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import UnsupportedOperationError
from ...grammar import bind, parse
from .. import sums as S
from ..registry import decomposition, rule
from ..second import pairs
from ..tracer import PREFIX
from .layout import positions

KERNEL, CELLS = "pqr", "uvw"  # einsum letters of kernel offsets and output cells (n <= 3)


# --- geometry --------------------------------------------------------------------------------


def _ntuple(v, n: int, what: str, name: str) -> tuple[int, ...]:
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        v = tuple(int(a) for a in v)
        if len(v) == 1:
            return v * n
        if len(v) != n:
            raise UnsupportedOperationError(
                f"{PREFIX}{name!r}: {what}={v!r} does not have {n} entries")
        return v
    return (int(v),) * n


def _table(out: int, k: int, stride: int, dilation: int, left: int, size: int) -> torch.Tensor:
    """``(out, k)``: the input coordinate of window entry ``k`` of output cell ``o``, -1 where
    it is not an entry of the input (padding, or past the end)."""
    t = (torch.arange(out)[:, None] * stride + torch.arange(k)[None, :] * dilation - left)
    return t.masked_fill((t < 0) | (t >= size), -1)


def _adaptive_table(out: int, size: int) -> torch.Tensor:
    """torch's adaptive windows: cell ``i`` covers ``floor(i*size/out) .. ceil((i+1)*size/out)``;
    windows narrower than the widest end in -1."""
    i = torch.arange(out)
    start = torch.div(i * size, out, rounding_mode="floor")
    end = torch.div((i + 1) * size + out - 1, out, rounding_mode="floor")
    width = int((end - start).max()) if out else 0
    t = start[:, None] + torch.arange(width)[None, :]
    return t.masked_fill(t >= end[:, None], -1)


def _windows(t: torch.Tensor, tables, fill=0) -> torch.Tensor:
    """``t`` of shape ``(N, C, *spatial)`` -> ``(N, C, k1..kn, o1..on)``: the window entries
    (``fill`` where a table says -1)."""
    n = len(tables)
    for d, tab in enumerate(tables):
        dim = 2 + 2 * d
        size = t.shape[dim]
        slot = list(t.shape)
        slot[dim] = 1
        t = torch.cat([t, t.new_full(slot, fill)], dim)
        index = tab.masked_fill(tab < 0, size).reshape(-1).to(t.device)
        t = t.index_select(dim, index).unflatten(dim, tuple(tab.shape))
    return t.permute([0, 1] + [3 + 2 * d for d in range(n)] + [2 + 2 * d for d in range(n)])


def _valid(tables) -> torch.Tensor:
    """Boolean ``(k1..kn, o1..on)``: the window entry is in bounds."""
    n = len(tables)
    ks = tuple(t.shape[1] for t in tables)
    out = tuple(t.shape[0] for t in tables)
    valid = torch.ones(ks + out, dtype=torch.bool)
    for d, tab in enumerate(tables):
        shape = [1] * (2 * n)
        shape[d], shape[n + d] = tab.shape[1], tab.shape[0]
        valid = valid & (tab >= 0).T.reshape(shape)
    return valid


def _select(cx, x, pos: torch.Tensor):
    """The terms of the entries ``pos`` (1 + a flat position of ``x``, 0 for none) of ``x``:
    always a gather over ``pos``'s axes (:func:`layout.place` would place an injective
    selection with gaps by a map over ``x``'s own labels instead, which a later sum over the
    window makes a many-to-one map that the next selection can only resolve densely)."""
    terms = S.of(cx, x)
    if not terms:
        return {}
    flat = S.reshape(cx, terms, (math.prod(x.shape),))
    return S.gather(cx, flat, 0, pos.round().to(torch.int64) - 1)


def _window_terms(cx, x, lead, spatial, tables):
    """A stand-in of shape ``lead + kernel + out`` carrying the terms of ``x``'s windows
    (``x`` of shape ``lead + spatial``): an index map, one entry per in-bounds window entry."""
    ks = tuple(t.shape[1] for t in tables)
    out = tuple(t.shape[0] for t in tables)
    pos = _windows(positions(x).reshape((1, math.prod(lead)) + tuple(spatial)), tables)
    shape = tuple(lead) + ks + out
    return S.stand(cx, _select(cx, x, pos.reshape(shape)), shape)


def _bias(cx, bias, channels: int, shape):
    """The terms of a per-channel bias broadcast over an output of ``shape`` (channel axis 1)."""
    if bias is None or cx.terms(bias) is None:
        return {}
    keep = (channels,) + (1,) * (len(shape) - 2)
    b = S.stand(cx, S.reshape(cx, S.of(cx, bias), keep), keep)
    return S.broadcast(cx, b, tuple(shape))


# --- convolution -----------------------------------------------------------------------------


def _transposed_table(out: int, k: int, stride: int, dilation: int, left: int,
                      size: int) -> torch.Tensor:
    """``(out, k)``: the input cell ``h`` that kernel offset ``k`` sends to output cell ``o`` in a
    transposed convolution (``o = h * stride + k * dilation - left``), -1 where there is none."""
    q = torch.arange(out)[:, None] + left - torch.arange(k)[None, :] * dilation
    h = torch.div(q, stride, rounding_mode="floor")
    return h.masked_fill((q - h * stride != 0) | (h < 0) | (h >= size), -1)


def _convolve(cx, result, input, weight, bias, n, tables, groups, transposed):
    """The terms of a (transposed) convolution given its window tables: the einsum of the
    input's windows with the weight, grouped channels an axis ``g`` of both."""
    x_shape = tuple(input.shape) if input.dim() == n + 2 else (1,) + tuple(input.shape)
    B, C, spatial = x_shape[0], x_shape[1], x_shape[2:]
    G = int(groups)
    Cg = C // G
    Og = weight.shape[1] if transposed else weight.shape[0] // G
    O = G * Og
    ks = tuple(weight.shape[2:])
    out = tuple(t.shape[0] for t in tables)
    K, L = KERNEL[:n], CELLS[:n]
    # the weight as (g, o, c, kernel) or, transposed, (g, c, o, kernel)
    grouped = (G, Cg, Og) + ks if transposed else (G, Og, Cg) + ks
    wl = f"gco{K}" if transposed else f"goc{K}"
    parts = []
    if cx.terms(input) is not None:
        xs = _window_terms(cx, input, (B, G, Cg), spatial, tables)
        w = weight.detach().reshape(grouped)
        parts.append(S.einsum(cx, None, f"bgc{K}{L},{wl}->bgo{L}", (xs, w)))
    if cx.terms(weight) is not None:
        # the weight's entries placed on every window entry in bounds (padding drops them)
        pos = positions(weight).reshape(grouped + (1,) * n) * _valid(tables)
        wshape = grouped + out
        ws = S.stand(cx, _select(cx, weight, pos.expand(wshape)), wshape)
        xv = _windows(input.detach().reshape(x_shape), tables).reshape((B, G, Cg) + ks + out)
        parts.append(S.einsum(cx, None, f"{wl}{L},bgc{K}{L}->bgo{L}", (ws, xv)))
    total = S.reshape(cx, S.add(cx, *parts), (B, O) + out)
    total = S.add(cx, total, _bias(cx, bias, O, (B, O) + out))
    return S.reshape(cx, total, tuple(result.shape))


def _check_input(name, input, n):
    if input.dim() not in (n + 1, n + 2):
        raise UnsupportedOperationError(f"{PREFIX}{name!r}: input of {input.dim()} dimensions")


def _conv_tables(result, input, weight, stride, padding, dilation):
    name, n = "conv", weight.dim() - 2
    _check_input(name, input, n)
    ks, spatial, out = tuple(weight.shape[2:]), tuple(input.shape[-n:]), tuple(result.shape[-n:])
    stride = _ntuple(stride, n, "stride", name)
    dilation = _ntuple(dilation, n, "dilation", name)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise UnsupportedOperationError(f"{PREFIX}{name!r}: padding={padding!r}")
        # "same": total padding dilation*(k-1), the odd one on the right (as torch)
        left = ((0,) * n if padding == "valid"
                else tuple(d * (k - 1) // 2 for d, k in zip(dilation, ks)))
    else:
        left = _ntuple(padding, n, "padding", name)
    return [_table(*a) for a in zip(out, ks, stride, dilation, left, spatial)]


def _transposed_tables(result, input, weight, stride, padding, dilation):
    name, n = "conv_transpose", weight.dim() - 2
    _check_input(name, input, n)
    ks, spatial, out = tuple(weight.shape[2:]), tuple(input.shape[-n:]), tuple(result.shape[-n:])
    if isinstance(padding, str):
        raise UnsupportedOperationError(f"{PREFIX}{name!r}: padding={padding!r}")
    stride = _ntuple(stride, n, "stride", name)
    dilation = _ntuple(dilation, n, "dilation", name)
    padding = _ntuple(padding, n, "padding", name)
    return [_transposed_table(*a) for a in zip(out, ks, stride, dilation, padding, spatial)]


def _conv_second(transposed: bool):
    """Second order of a convolution: linear in the input and in the weight, a cross term
    between the two where both are traced (the input's windows times the weight, on the
    letters of :func:`_convolve`'s einsum, contracted with the adjoint)."""

    def second(hx, result, ybar, input, weight, bias, stride, padding, dilation, groups,
               output_padding=0):
        if hx.terms(input) is None or hx.terms(weight) is None:
            return []
        geometry = _transposed_tables if transposed else _conv_tables
        tables = geometry(result, input, weight, stride, padding, dilation)
        n = len(tables)
        x_shape = tuple(input.shape) if input.dim() == n + 2 else (1,) + tuple(input.shape)
        B, C, spatial = x_shape[0], x_shape[1], x_shape[2:]
        G = int(groups)
        Og = weight.shape[1] if transposed else weight.shape[0] // G
        ks, out = tuple(weight.shape[2:]), tuple(t.shape[0] for t in tables)
        grouped = (G, C // G, Og) + ks if transposed else (G, Og, C // G) + ks
        K, L = KERNEL[:n], CELLS[:n]
        wl = f"gco{K}" if transposed else f"goc{K}"
        xs = _window_terms(hx, input, (B, G, C // G), spatial, tables)
        ws = S.stand(hx, S.reshape(hx, S.of(hx, weight), grouped), grouped)
        yb = ybar.reshape((B, G, Og) + out)
        e = bind(parse(f"bgc{K}{L},{wl},bgo{L}->", 3), [xs.shape, ws.shape, tuple(yb.shape)])
        xt, wt = hx.terms(xs), hx.terms(ws)
        return (pairs(hx, xt, e.inputs[0], wt, e.inputs[1], [(yb, e.inputs[2])])
                + pairs(hx, wt, e.inputs[1], xt, e.inputs[0], [(yb, e.inputs[2])]))

    return second


@rule(("conv1d", "conv2d", "conv3d"),
      "input weight bias=None stride=1 padding=0 dilation=1 groups=1",
      second=_conv_second(False))
def conv(cx, result, input, weight, bias, stride, padding, dilation, groups):
    tables = _conv_tables(result, input, weight, stride, padding, dilation)
    return _convolve(cx, result, input, weight, bias, len(tables), tables, groups, False)


@rule(("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"),
      "input weight bias=None stride=1 padding=0 output_padding=0 groups=1 dilation=1",
      second=_conv_second(True))
def conv_transpose(cx, result, input, weight, bias, stride, padding, output_padding, groups,
                   dilation):
    """Written as a gather too: output cell ``o`` reads, for kernel offset ``k``, the input
    cell ``(o + padding - k * dilation) / stride`` where that is a whole number in bounds."""
    tables = _transposed_tables(result, input, weight, stride, padding, dilation)
    return _convolve(cx, result, input, weight, bias, len(tables), tables, groups, True)


# --- windows: F.unfold (and Tensor.unfold), F.fold -------------------------------------------


@rule("unfold", "input kernel_size dilation=1 padding=0 stride=1",
      method="input dimension size step", traced="input", second="linear")
def unfold(cx, result, input, **p):
    """``F.unfold(input, kernel_size, ...)`` (the windows of an image as columns) and
    ``Tensor.unfold(dimension, size, step)`` (windows along one axis) share torch's name; the
    method binds its own parameters. Both are selections."""
    if "dimension" in p:
        pos = positions(input).unfold(p["dimension"], p["size"], p["step"])
    else:
        pos = F.unfold(positions(input), p["kernel_size"], p["dilation"], p["padding"],
                       p["stride"])
    return _select(cx, input, pos)


@rule("fold", "input output_size kernel_size dilation=1 padding=0 stride=1", second="linear")
def fold(cx, result, input, output_size, kernel_size, dilation, padding, stride):
    """Each output cell sums, per kernel offset, the column entry of the block that covers it
    with that offset: a gather (the transposed windows) and a sum over the kernel."""
    name = "fold"
    out = tuple(result.shape[-2:])
    ks = _ntuple(kernel_size, 2, "kernel_size", name)
    dilation = _ntuple(dilation, 2, "dilation", name)
    padding = _ntuple(padding, 2, "padding", name)
    stride = _ntuple(stride, 2, "stride", name)
    blocks = [(o + 2 * p - d * (k - 1) - 1) // s + 1
              for o, p, d, k, s in zip(out, padding, dilation, ks, stride)]
    th, tw = [_transposed_table(*a).T for a in zip(out, ks, stride, dilation, padding, blocks)]
    lead = tuple(input.shape[:-2])
    C = input.shape[-2] // math.prod(ks)
    pos = positions(input).reshape((math.prod(lead), C) + ks + tuple(blocks))
    pos = F.pad(pos, (0, 1, 0, 1))  # a zero slot: "no entry" (tables' -1)
    kh, kw = torch.arange(ks[0]), torch.arange(ks[1])
    pos = pos[:, :, kh[:, None, None, None], kw[None, :, None, None],
              th.masked_fill(th < 0, blocks[0])[:, None, :, None],
              tw.masked_fill(tw < 0, blocks[1])[None, :, None, :]]
    shape = lead + (C,) + ks + out
    cells = S.stand(cx, _select(cx, input, pos.reshape(shape)), shape)
    return S.sum_dims(cx, cells, (len(lead) + 1, len(lead) + 2), False)


# --- pooling ---------------------------------------------------------------------------------


def _spatial(name, input, n):
    if input.dim() not in (n + 1, n + 2):
        raise UnsupportedOperationError(f"{PREFIX}{name!r}: input of {input.dim()} dimensions")
    return tuple(input.shape[:-n]), tuple(input.shape[-n:])


def _pool_tables(name, input, n, result_out, kernel_size, stride, padding, dilation):
    lead, spatial = _spatial(name, input, n)
    ks = _ntuple(kernel_size, n, "kernel_size", name)
    if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0):
        stride = ks
    stride = _ntuple(stride, n, "stride", name)
    padding = _ntuple(padding, n, "padding", name)
    dilation = _ntuple(dilation, n, "dilation", name)
    tables = [_table(*a) for a in zip(result_out, ks, stride, dilation, padding, spatial)]
    return lead, spatial, tables


def _picked(cx, input, lead, spatial, tables, indices):
    """Window sums weighted by the one-hot of ``indices`` (torch's arg max, flat over the
    spatial cells): the terms of a maximum pooling."""
    n = len(tables)
    win = _window_terms(cx, input, lead, spatial, tables)
    cells = _windows(positions(torch.empty((1, 1) + tuple(spatial))), tables)[0, 0]
    shape = tuple(win.shape)
    out = shape[len(lead) + n:]
    hot = (cells.round().to(torch.int64).to(indices.device)
           == (indices + 1).reshape(tuple(lead) + (1,) * n + out)).to(cx.dtype)
    weighted = S.stand(cx, S.scaled(cx, S.of(cx, win), hot), shape)
    return S.sum_dims(cx, weighted, tuple(range(len(lead), len(lead) + n)), False)


def _tensor_result(result):
    return result if isinstance(result, torch.Tensor) else result[0]


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_ADAPTIVE_MAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}


def _max_pool(name, n):
    @rule((name, f"{name}_with_indices"),
          "input kernel_size stride=None padding=0 dilation=1 ceil_mode=False "
          "return_indices=False", traced="input", second="linear")
    def max_pool(cx, result, input, kernel_size, stride, padding, dilation, ceil_mode,
                 return_indices):
        r = _tensor_result(result)
        lead, spatial, tables = _pool_tables(name, input, n, tuple(r.shape[-n:]), kernel_size,
                                             stride, padding, dilation)
        if isinstance(result, torch.Tensor):
            st = None if stride is None or (isinstance(stride, (list, tuple)) and not stride) \
                else stride
            _, indices = _MAX_POOL[n](input.detach(), kernel_size, st, padding, dilation,
                                      ceil_mode=bool(ceil_mode), return_indices=True)
        else:
            indices = result[1]
        terms = _picked(cx, input, lead, spatial, tables, indices)
        return terms if isinstance(result, torch.Tensor) else [terms, None]

    max_pool.__name__ = name


for _n in (1, 2, 3):
    _max_pool(f"max_pool{_n}d", _n)


def _avg_pool(name, n):
    @rule(name, "input kernel_size stride=None padding=0 ceil_mode=False "
          "count_include_pad=True divisor_override=None", traced="input", second="linear")
    def avg_pool(cx, result, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                 divisor_override):
        out = tuple(result.shape[-n:])
        lead, spatial, tables = _pool_tables(name, input, n, out, kernel_size, stride, padding,
                                             1)
        win = _window_terms(cx, input, lead, spatial, tables)
        count = _valid(tables).sum(tuple(range(n))).to(cx.dtype)  # in-bounds entries per cell
        st = None if stride is None or (isinstance(stride, (list, tuple)) and not stride) \
            else stride
        ones = torch.ones((1, 1) + spatial, dtype=cx.dtype)
        extra = {} if n == 1 else {"divisor_override": divisor_override}
        mean = _AVG_POOL[n](ones, kernel_size, st, padding, bool(ceil_mode),
                            bool(count_include_pad), **extra)[0, 0]  # count / divisor
        weight = (mean / count.clamp(min=1)).masked_fill(count == 0, 0.0)
        summed = S.sum_dims(cx, win, tuple(range(len(lead), len(lead) + n)), False)
        return S.scaled(cx, summed, weight)

    avg_pool.__name__ = name


for _n in (1, 2, 3):
    _avg_pool(f"avg_pool{_n}d", _n)


def _adaptive(name, n, maximum):
    params = "input output_size return_indices=False" if maximum else "input output_size"
    names = (name, f"{name}_with_indices") if maximum else name

    @rule(names, params, traced="input", second="linear")
    def adaptive(cx, result, input, output_size, return_indices=False):
        r = _tensor_result(result)
        lead, spatial = _spatial(name, input, n)
        out = tuple(r.shape[-n:])
        tables = [_adaptive_table(o, s) for o, s in zip(out, spatial)]
        if maximum:
            indices = (_ADAPTIVE_MAX[n](input.detach(), output_size, return_indices=True)[1]
                       if isinstance(result, torch.Tensor) else result[1])
            terms = _picked(cx, input, lead, spatial, tables, indices)
            return terms if isinstance(result, torch.Tensor) else [terms, None]
        win = _window_terms(cx, input, lead, spatial, tables)
        count = _valid(tables).sum(tuple(range(n))).to(cx.dtype)
        summed = S.sum_dims(cx, win, tuple(range(len(lead), len(lead) + n)), False)
        return S.scaled(cx, summed, 1.0 / count)

    adaptive.__name__ = name


for _n in (1, 2, 3):
    _adaptive(f"adaptive_avg_pool{_n}d", _n, False)
    _adaptive(f"adaptive_max_pool{_n}d", _n, True)


def _lp_pool(name, n):
    @decomposition(name, "input norm_type kernel_size stride=None ceil_mode=False",
                   traced="input")
    def lp_pool(input, norm_type, kernel_size, stride, ceil_mode):
        # torch: (sign(out) * relu(|out|)) * K, to the power 1/p, out = avg_pool(x**p): the
        # sign and relu leave out unchanged
        ks = _ntuple(kernel_size, n, "kernel_size", name)
        pooled = _AVG_POOL[n](input.pow(norm_type), kernel_size, stride, 0, bool(ceil_mode))
        return pooled.mul(math.prod(ks)).pow(1.0 / norm_type)

    lp_pool.__name__ = name


for _n in (1, 2, 3):
    _lp_pool(f"lp_pool{_n}d", _n)
