"""Resampling: ``F.interpolate`` (and ``F.upsample*``, ``nn.Upsample``) in every mode, with and
without antialiasing, and torch's antialiased kernels themselves (``_upsample_bilinear2d_aa``,
``_upsample_bicubic2d_aa``).

Each mode torch offers is separable: the output along one spatial axis is a fixed linear map of
the input along that axis (nearest and nearest-exact pick an entry, linear, bilinear and
trilinear weigh two, bicubic four, area averages a window; antialiasing widens the window by the
scale, still per axis). So the Jacobian is the einsum of the
input with one small matrix per spatial axis, and each matrix is read from torch itself: the
same call on a basis along that axis alone (the other spatial axes of size 1, kept there), so
its conventions (``align_corners``, the scale factor as given, rounding of the nearest modes)
are torch's.
"""

from __future__ import annotations

import string

import torch
import torch.nn.functional as F

from ...errors import UnsupportedOperationError
from .. import sums as S
from ..registry import rule
from ..tracer import PREFIX

MODES = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear", "area")


def axis_matrix(n_in: int, n_out: int, k: int, spatial: int, scale, mode, align_corners,
                antialias, dtype, device) -> torch.Tensor:
    """``M[o, i]``: the weight of input entry ``i`` in output entry ``o`` along spatial axis
    ``k`` (of ``spatial``), read from ``F.interpolate`` on a basis along that axis."""
    # (torch 2.13's antialiased kernels mis-read an axis of size 1: the other axes get 2 there,
    # kept at 2, and their first entry is read)
    other = 2 if antialias else 1
    shape = [n_in, 1] + [1] * spatial
    shape[2 + k] = n_in
    basis = torch.eye(n_in, dtype=dtype, device=device).reshape(shape)
    basis = basis.expand([n_in, 1] + [n_in if a == k else other for a in range(spatial)])
    if scale is not None:
        factors = [1.0] * spatial
        factors[k] = scale
        out = F.interpolate(basis, scale_factor=factors, mode=mode, align_corners=align_corners,
                            recompute_scale_factor=False, antialias=antialias)
    else:
        size = [other] * spatial
        size[k] = n_out
        out = F.interpolate(basis, size=size, mode=mode, align_corners=align_corners,
                            antialias=antialias)
    if out.shape[2 + k] != n_out:
        raise UnsupportedOperationError(
            f"{PREFIX}'interpolate': axis {k} resamples to {out.shape[2 + k]} entries alone, "
            f"{n_out} in the call (a recomputed scale factor); pass size= instead")
    out = out[(slice(None), 0) + tuple(slice(None) if a == k else 0 for a in range(spatial))]
    return out.reshape(n_in, n_out).T


@rule(("interpolate", "upsample"),
      "input size=None scale_factor=None mode='nearest' align_corners=None "
      "recompute_scale_factor=None antialias=False", traced="input", second="linear")
def interpolate(cx, result, input, size, scale_factor, mode, align_corners,
                recompute_scale_factor, antialias):
    if mode not in MODES:
        raise UnsupportedOperationError(f"{PREFIX}'interpolate' with mode={mode!r} is not supported")
    spatial = input.dim() - 2
    out_sizes = tuple(result.shape[2:])
    scales = [None] * spatial
    if scale_factor is not None and not recompute_scale_factor:
        given = scale_factor if isinstance(scale_factor, (list, tuple)) else [scale_factor] * spatial
        scales = [float(s) for s in given]
    letters = string.ascii_letters
    lead, ins, outs = letters[:2], letters[2:2 + spatial], letters[2 + spatial:2 + 2 * spatial]
    mats = [axis_matrix(input.shape[2 + k], out_sizes[k], k, spatial, scales[k], mode,
                        align_corners, antialias, input.dtype, input.device)
            for k in range(spatial)]
    spec = (lead + ins + "," + ",".join(o + i for o, i in zip(outs, ins)) + "->" + lead + outs)
    return S.einsum(cx, result, spec, (input, *mats))


def _einsum(cx, result, input, mats):
    spatial = len(mats)
    letters = string.ascii_letters
    lead, ins, outs = letters[:2], letters[2:2 + spatial], letters[2 + spatial:2 + 2 * spatial]
    spec = (lead + ins + "," + ",".join(o + i for o, i in zip(outs, ins)) + "->" + lead + outs)
    return S.einsum(cx, result, spec, (input, *mats))


def _aa(name, op):
    def aa(cx, result, input, output_size, align_corners, scale_factors, scales_w):
        """The kernel's two axis matrices, read from the kernel itself on a basis along each
        axis (its output size and scale for that axis as given, the other axis 1)."""
        if isinstance(scale_factors, (list, tuple)):  # the ``vec`` overload
            scales = [float(s) for s in scale_factors]
        else:
            scales = [scale_factors, scales_w]
        out = tuple(result.shape[2:])
        mats = []
        for k in range(2):
            n = input.shape[2 + k]
            shape = [n, 1, 1, 1]
            shape[2 + k] = n
            # (the other axis 2, kept at 2: the kernel mis-reads an axis of size 1)
            basis = torch.eye(n, dtype=input.dtype, device=input.device).reshape(shape)
            basis = basis.expand([n, 1] + [n if a == k else 2 for a in range(2)]).contiguous()
            size = [2, 2]
            size[k] = out[k]
            hw = [None, None]
            hw[k] = scales[k]
            m = op.default(basis, size, bool(align_corners), hw[0], hw[1])
            m = m[:, 0, :, 0] if k == 0 else m[:, 0, 0, :]
            mats.append(m.reshape(n, out[k]).T)
        return _einsum(cx, result, input, mats)

    aa.__name__ = name
    rule((name, f"{name}.default", f"{name}.vec"),
         "input output_size align_corners scale_factors=None scales_w=None",
         traced="input", second="linear")(aa)


_aa("_upsample_bilinear2d_aa", torch.ops.aten._upsample_bilinear2d_aa)
_aa("_upsample_bicubic2d_aa", torch.ops.aten._upsample_bicubic2d_aa)
