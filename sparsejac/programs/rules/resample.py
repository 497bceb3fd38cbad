"""Resampling: ``F.interpolate`` (and ``F.upsample*``, ``nn.Upsample``) in every mode.

Each mode torch offers is separable: the output along one spatial axis is a fixed linear map of
the input along that axis (nearest and nearest-exact pick an entry, linear, bilinear and
trilinear weigh two, bicubic four, area averages a window). So the Jacobian is the einsum of the
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
    shape = [n_in, 1] + [1] * spatial
    shape[2 + k] = n_in
    basis = torch.eye(n_in, dtype=dtype, device=device).reshape(shape)
    if scale is not None:
        factors = [1.0] * spatial
        factors[k] = scale
        out = F.interpolate(basis, scale_factor=factors, mode=mode, align_corners=align_corners,
                            recompute_scale_factor=False, antialias=antialias)
    else:
        size = [1] * spatial
        size[k] = n_out
        out = F.interpolate(basis, size=size, mode=mode, align_corners=align_corners,
                            antialias=antialias)
    if out.shape[2 + k] != n_out:
        raise UnsupportedOperationError(
            f"{PREFIX}'interpolate': axis {k} resamples to {out.shape[2 + k]} entries alone, "
            f"{n_out} in the call (a recomputed scale factor); pass size= instead")
    return out.reshape(n_in, n_out).T


@rule(("interpolate", "upsample"),
      "input size=None scale_factor=None mode='nearest' align_corners=None "
      "recompute_scale_factor=None antialias=False", traced="input", second="linear")
def interpolate(cx, result, input, size, scale_factor, mode, align_corners,
                recompute_scale_factor, antialias):
    if mode not in MODES:
        raise UnsupportedOperationError(f"{PREFIX}'interpolate' with mode={mode!r} is not supported")
    if antialias:
        raise UnsupportedOperationError(f"{PREFIX}'interpolate' with antialias=True is not supported")
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
