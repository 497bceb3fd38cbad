"""torch's internal kernels that programs and OpInfo reach (backward kernels, masked indexing,
``segment_reduce``, ``embedding_bag``, ``grid_sample``), and ``fill``, whose derivative is zero
(or the value's), written with registered operations or as rules of a few lines. (``angle``,
``nextafter``, ``__rmod__`` are elementwise rules; the softmax kernels are in
:mod:`.reduce`.)

Where torch's own decomposition (``torch._decomp``) is written with registered operations it
is followed (``grid_sample``); elsewhere each is written as torch's decomposition or kernel
defines it, so its derivative is torch's.
"""

from __future__ import annotations

import math

import torch

from ...errors import UnsupportedOperationError
from .. import sums as S
from ..registry import decomposition, rule
from ..tracer import PREFIX
from .scatter import placed

# --- derivative zero, or the identity ------------------------------------------------------


@rule("fill", "input value", traced="input value", second="linear")
def fill(cx, result, input, value):
    """Every element set to ``value``: the input's derivative is zero; a traced 0-dim value
    is broadcast."""
    if isinstance(value, torch.Tensor) and S.of(cx, value):
        return S.broadcast(cx, value, tuple(result.shape))
    return {}


# --- backward kernels and safe variants (as torch._decomp writes them) ----------------------


@decomposition(("native_dropout_backward", "native_dropout_backward.default"),
               "grad_output mask scale", traced="grad_output")
def native_dropout_backward(grad_output, mask, scale):
    return grad_output * (mask.to(grad_output.dtype) * scale)


@decomposition(("_unsafe_masked_index", "_unsafe_masked_index.default"),
               "input mask indices fill", traced="input")
def unsafe_masked_index(input, mask, indices, fill):
    """torch's decomposition: indices clamped into the input, then masked."""
    if input.numel() == 0:
        shape = torch.empty(input.shape, device="meta")[
            tuple(slice(None) if i is None else i.to("meta") for i in indices)].shape
        return torch.full(shape, float(fill), dtype=input.dtype, device=input.device)
    idx = tuple(slice(None) if i is None else i.clamp(min=0, max=input.shape[k] - 1)
                for k, i in enumerate(indices))
    return input[idx].masked_fill(~mask, fill)


@rule(("max_pool2d_with_indices_backward", "max_pool2d_with_indices_backward.default"),
      "grad_output input kernel_size stride padding dilation ceil_mode indices",
      traced="grad_output input", second="linear")
def max_pool2d_with_indices_backward(cx, result, grad_output, input, kernel_size, stride,
                                     padding, dilation, ceil_mode, indices):
    """Each output gradient added at the input position its index names (``input`` gives only
    the shape: no derivative)."""
    if not S.of(cx, grad_output):
        return {}
    plane = math.prod(result.shape[-2:])
    lead = grad_output.shape[:-2]
    base = torch.arange(math.prod(lead), device=result.device).reshape(
        (*lead, 1, 1)) * plane
    targets = (indices + base).expand(grad_output.shape)
    return placed(cx, result, result, targets, grad_output, True,
                  "max_pool2d_with_indices_backward")


# --- reductions over segments: a padded gather, then a registered reduction -----------------


IDENTITY = {"sum": 0.0, "mean": 0.0, "prod": 1.0, "max": -math.inf, "min": math.inf}


def _segments(lengths: torch.Tensor, n: int):
    """For segments of ``lengths`` (``(lead, segments)``) over an axis of ``n``: the
    ``(lead, segments, longest)`` positions along the axis, clamped, and which are inside."""
    starts = torch.cumsum(lengths, -1) - lengths
    longest = int(lengths.max()) if lengths.numel() else 0
    j = torch.arange(max(longest, 1), device=lengths.device)
    pos = starts.unsqueeze(-1) + j
    valid = j < lengths.unsqueeze(-1)
    return pos.clamp(0, max(n - 1, 0)), valid


@decomposition("segment_reduce", "data reduce lengths=None indices=None offsets=None axis=0 "
               "unsafe=False initial=None", traced="data")
def segment_reduce(data, reduce, lengths, indices, offsets, axis, unsafe, initial):
    if reduce not in IDENTITY or indices is not None:
        raise UnsupportedOperationError(
            f"{PREFIX}'segment_reduce' with reduce={reduce!r}"
            + (" and indices" if indices is not None else "") + " is not supported")
    if lengths is None:
        if offsets is None:
            raise UnsupportedOperationError(f"{PREFIX}'segment_reduce' needs lengths or offsets")
        lengths = offsets[..., 1:] - offsets[..., :-1]
    d = S.dim(axis, data.dim())
    lead_shape, n, rest = data.shape[:d], data.shape[d], data.shape[d + 1:]
    lead, segs = math.prod(lead_shape), lengths.shape[-1]
    x = data.reshape(lead, n, math.prod(rest))
    pos, valid = _segments(lengths.reshape(lead, segs).to(torch.int64), n)
    rows = torch.arange(lead, device=data.device).reshape(lead, 1, 1)
    if n == 0:
        x = torch.zeros((lead, 1, x.shape[2]), dtype=data.dtype, device=data.device) + x.sum(1,
                                                                                         True)
    g = x[rows, pos]  # (lead, segments, longest, rest)
    pad = IDENTITY[reduce]
    g = torch.where(valid.unsqueeze(-1), g, torch.full((), pad, dtype=g.dtype, device=g.device))
    start = float(initial) if initial is not None else pad
    if reduce in ("sum", "mean"):
        out = g.sum(2) + start
        if reduce == "mean":
            count = lengths.reshape(lead, segs, 1).to(out.dtype)
            out = out / count.clamp(min=1)
            if initial is None:  # an empty segment's mean is nan, its derivative zero
                out = torch.where(count == 0, torch.full((), math.nan, dtype=out.dtype,
                                                         device=out.device), out)
    else:
        first = torch.full(g[:, :, :1].shape, start, dtype=g.dtype, device=g.device)
        g = torch.cat([first, g], 2)
        out = {"prod": torch.prod, "max": torch.amax, "min": torch.amin}[reduce](g, 2)
    return out.reshape(*lead_shape, segs, *rest)


@decomposition("embedding_bag", "input weight offsets=None max_norm=None norm_type=2 "
               "scale_grad_by_freq=False mode='mean' sparse=False per_sample_weights=None "
               "include_last_offset=False padding_idx=None",
               traced="weight per_sample_weights")
def embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode,
                  sparse, per_sample_weights, include_last_offset, padding_idx):
    """The bags' rows gathered (a padded gather), weighted, then summed, averaged over the
    rows not at ``padding_idx`` or their maximum taken (0 for an empty bag)."""
    if max_norm is not None or scale_grad_by_freq:
        raise UnsupportedOperationError(
            f"{PREFIX}'embedding_bag' with max_norm or scale_grad_by_freq is not supported")
    if mode not in ("sum", "mean", "max"):
        raise UnsupportedOperationError(f"{PREFIX}'embedding_bag' with mode={mode!r}")
    if input.dim() == 2:
        bags, width = input.shape
        flat = input.reshape(-1)
        lengths = torch.full((bags,), width, dtype=torch.int64, device=input.device)
    else:
        flat = input
        ends = offsets[1:] if include_last_offset else torch.cat(
            [offsets[1:], torch.tensor([flat.numel()], device=offsets.device)])
        starts = offsets[:-1] if include_last_offset else offsets
        lengths = (ends - starts).to(torch.int64)
    rows = weight[flat]  # (n, D)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.reshape(-1, 1)
    pos, valid = _segments(lengths.reshape(1, -1), flat.numel())
    pos, valid = pos[0], valid[0]
    if padding_idx is not None and flat.numel():
        valid = valid & (flat[pos] != padding_idx % weight.shape[0])
    if flat.numel() == 0:
        return torch.zeros((lengths.numel(), weight.shape[1]), dtype=weight.dtype,
                           device=weight.device) + weight.sum() * 0
    g = rows[pos]  # (bags, longest, D)
    mask = valid.unsqueeze(-1)
    count = valid.sum(1, keepdim=True)
    if mode == "max":
        # torch's gradient goes to the first maximum of each bag (its kernel keeps the
        # index of the first one), not shared among ties
        values = torch.where(mask, g.detach(), torch.full((), -math.inf, dtype=g.dtype,
                                                          device=g.device))
        out = g.gather(1, values.argmax(1, keepdim=True)).squeeze(1)
        return torch.where(count > 0, out, torch.zeros_like(out))
    out = torch.where(mask, g, torch.zeros_like(g)).sum(1)
    if mode == "mean":
        out = out / count.clamp(min=1).to(out.dtype)
    return out


# --- sampling at positions a grid gives ------------------------------------------------------

_MODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
_PADDING = {"zeros": 0, "border": 1, "reflection": 2}


@decomposition("grid_sample", "input grid mode='bilinear' padding_mode='zeros' "
               "align_corners=None", traced="input grid")
def grid_sample(input, grid, mode, padding_mode, align_corners):
    """torch's own decomposition (``torch._decomp``) of the 2-d sampler: each output a
    weighted gather of the input at the corners around its grid position; the weights are
    functions of the grid, the corners constants (as torch's gradient has them)."""
    from torch._decomp.decompositions import _grid_sampler_2d

    if input.dim() not in (4, 5) or mode not in _MODES or padding_mode not in _PADDING:
        raise UnsupportedOperationError(
            f"{PREFIX}'grid_sample' of a {input.dim()}-d input (mode={mode!r}, "
            f"padding_mode={padding_mode!r}) is not supported")
    if input.dim() == 5:
        return grid_sampler_3d(input, grid, _MODES[mode], _PADDING[padding_mode],
                               bool(align_corners))
    return _grid_sampler_2d(input, grid, _MODES[mode], _PADDING[padding_mode],
                            bool(align_corners), _expand_grid=True)


def _source_index(coords, size: int, padding_mode: int, align_corners: bool):
    """torch's grid_sampler_compute_source_index: grid coordinates in [-1, 1] to positions,
    clamped (border) or reflected (reflection) as torch's kernels do."""
    mul = (size * 0.5 - 0.5) if align_corners else size * 0.5
    x = coords * mul + (size * 0.5 - 0.5)
    if padding_mode == 0:
        return x
    if padding_mode == 2:
        low, high = (0, 2 * (size - 1)) if align_corners else (-1, 2 * size - 1)
        if low == high:
            x = torch.zeros_like(x)
        else:
            lo, span = low / 2, (high - low) / 2
            a = (x - lo).abs()
            extra = torch.fmod(a, span)
            flips = torch.floor(a.detach() / span).to(torch.int64)
            x = torch.where(flips % 2 == 0, extra + lo, span + lo - extra)
    return torch.clamp(x, 0, size - 1)


@decomposition("grid_sampler_3d", "input grid interpolation_mode padding_mode align_corners",
               traced="input grid")
def grid_sampler_3d(input, grid, interpolation_mode, padding_mode, align_corners):
    """As torch's 2-d decomposition, in three dimensions: trilinear (eight corners, weights
    from the grid) or nearest (the rounded position; no derivative in the grid)."""
    if interpolation_mode not in (0, 1) or padding_mode not in (0, 1, 2):
        raise UnsupportedOperationError(
            f"{PREFIX}'grid_sampler_3d' with interpolation_mode={interpolation_mode!r}, "
            f"padding_mode={padding_mode!r} is not supported")
    n, c, d_in, h_in, w_in = input.shape
    _, d_out, h_out, w_out, _ = grid.shape
    g = grid.reshape(n, 1, d_out, h_out, w_out, 3)
    ix = _source_index(g[..., 0], w_in, padding_mode, align_corners)
    iy = _source_index(g[..., 1], h_in, padding_mode, align_corners)
    iz = _source_index(g[..., 2], d_in, padding_mode, align_corners)
    n_idx = torch.arange(n, device=input.device).reshape(n, 1, 1, 1, 1)
    c_idx = torch.arange(c, device=input.device).reshape(1, c, 1, 1, 1)
    shape = (n, c, d_out, h_out, w_out)

    def corner(x, y, z):
        """The input at integer positions ``x, y, z`` (constants), zero outside."""
        inside = (x >= 0) & (x < w_in) & (y >= 0) & (y < h_in) & (z >= 0) & (z < d_in)
        at = [torch.where(inside, t, torch.zeros_like(t)).to(torch.int64).expand(shape)
              for t in (x, y, z)]
        value = input[n_idx, c_idx, at[2], at[1], at[0]]
        return torch.where(inside.expand(shape), value, torch.zeros_like(value))

    if interpolation_mode == 1:
        r = [torch.round(t.detach()) for t in (ix, iy, iz)]
        return corner(*r)
    x0, y0, z0 = (torch.floor(t.detach()) for t in (ix, iy, iz))
    out = None
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                wx = (ix - x0) if dx else (x0 + 1 - ix)
                wy = (iy - y0) if dy else (y0 + 1 - iy)
                wz = (iz - z0) if dz else (z0 + 1 - iz)
                term = corner(x0 + dx, y0 + dy, z0 + dz) * (wx * wy * wz)
                out = term if out is None else out + term
    return out
