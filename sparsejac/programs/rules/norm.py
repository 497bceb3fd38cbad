"""Normalisation: layer, group, RMS, batch and instance norms, ``F.normalize`` and local
response normalisation, each written with registered operations (means, products, square
roots), so the Jacobian is exact and keeps the true structure: dense only within each group
of entries that shares a statistic (a row of a layer norm, a channel of a batch norm in
training mode), a diagonal where the statistics are constants (a batch norm in eval mode).

Running statistics are buffers and not traced: in training mode torch updates them in place
when it computes the result, and the traced Jacobian is that of the function of the batch
(the normalisation by the batch's own mean and biased variance)."""

from __future__ import annotations

import inspect

import torch

from ...errors import UnsupportedOperationError
from ..registry import decomposition
from ..tracer import PREFIX


def _affine(y, weight, bias, axis: int):
    """``y * weight + bias`` with per-channel ``weight``/``bias`` along ``axis`` of ``y``."""
    shape = [1] * y.dim()
    if y.dim():
        shape[axis] = -1
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _standardise(x, dims, eps):
    """``(x - mean) / sqrt(var + eps)`` over ``dims`` (biased variance, as torch's norms)."""
    centred = x - x.mean(dims, keepdim=True)
    var = (centred * centred).mean(dims, keepdim=True)
    return centred * torch.rsqrt(var + eps)


def _trailing(input, normalized_shape, name):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or k > input.dim() or tuple(input.shape[input.dim() - k:]) != shape:
        raise UnsupportedOperationError(
            f"{PREFIX}{name!r}: normalized_shape {shape} is not the trailing shape of the input "
            f"{tuple(input.shape)}")
    return tuple(range(input.dim() - k, input.dim()))


@decomposition("layer_norm",
               "input normalized_shape weight=None bias=None eps=1e-05 cudnn_enable=True")
def layer_norm(input, normalized_shape, weight, bias, eps, cudnn_enable):
    dims = _trailing(input, normalized_shape, "layer_norm")
    y = _standardise(input, dims, eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


@decomposition("rms_norm", "input normalized_shape weight=None eps=None")
def rms_norm(input, normalized_shape, weight, eps):
    dims = _trailing(input, normalized_shape, "rms_norm")
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    y = input * torch.rsqrt((input * input).mean(dims, keepdim=True) + eps)
    return y * weight if weight is not None else y


@decomposition("group_norm",
               "input num_groups weight=None bias=None eps=1e-05 cudnn_enabled=True")
def group_norm(input, num_groups, weight, bias, eps, cudnn_enabled):
    if input.dim() < 2 or input.shape[1] % num_groups:
        raise UnsupportedOperationError(
            f"{PREFIX}'group_norm': {num_groups} groups do not divide the channels of an input "
            f"of shape {tuple(input.shape)}")
    n = input.shape[0]
    grouped = input.reshape(n, num_groups, -1)
    y = _standardise(grouped, (2,), eps).reshape(input.shape)
    return _affine(y, weight, bias, 1)


# batch_norm and instance_norm reach the mode under one name from two spellings with their
# parameters in different orders: F.batch_norm(input, running_mean, running_var, weight, bias,
# training, momentum, eps) and torch.batch_norm(input, weight, bias, running_mean, running_var,
# training, momentum, eps, cudnn_enabled), whose nine parameters have no defaults.


def _f_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                  momentum=0.1, eps=1e-05):
    pass


def _torch_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps,
                      cudnn_enabled):
    pass


def _f_instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                     use_input_stats=True, momentum=0.1, eps=1e-05):
    pass


def _torch_instance_norm(input, weight, bias, running_mean, running_var, use_input_stats,
                         momentum, eps, cudnn_enabled):
    pass


def _bind(name, functional, aten, input, args, kwargs):
    """The call's arguments by name, in whichever of the two orders it was written."""
    aten_order = len(args) == 8 or "cudnn_enabled" in kwargs
    sig = inspect.signature(aten if aten_order else functional)
    try:
        bound = sig.bind(input, *args, **kwargs)
    except TypeError as error:
        raise UnsupportedOperationError(f"{PREFIX}{name!r}: {error}") from None
    bound.apply_defaults()
    return bound.arguments


def _per_channel(input, mean, var, eps):
    shape = [1] * input.dim()
    shape[1] = -1
    return (input - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)


def _by_statistics(name, input, p, batch: bool, min_dim: int, shape_text: str):
    """Batch or instance normalisation: by the input's own statistics (the function of the
    batch it is: mean and biased variance over ``dims``) or by the running ones."""
    if input.dim() < min_dim:
        raise UnsupportedOperationError(
            f"{PREFIX}{name!r} needs an input {shape_text} of at least {min_dim} dimensions; "
            f"got shape {tuple(input.shape)}")
    own = p["training"] if batch else p["use_input_stats"]
    if own or p["running_mean"] is None or p["running_var"] is None:
        dims = ((0,) if batch else ()) + tuple(range(2, input.dim()))
        y = _standardise(input, dims, p["eps"])
    else:
        y = _per_channel(input, p["running_mean"], p["running_var"], p["eps"])
    return _affine(y, p["weight"], p["bias"], 1)


@decomposition("batch_norm", "input *args **kwargs")
def batch_norm(input, args, kwargs):
    p = _bind("batch_norm", _f_batch_norm, _torch_batch_norm, input, args, kwargs)
    return _by_statistics("batch_norm", input, p, True, 2, "(N, C, ...)")


@decomposition("instance_norm", "input *args **kwargs")
def instance_norm(input, args, kwargs):
    p = _bind("instance_norm", _f_instance_norm, _torch_instance_norm, input, args, kwargs)
    return _by_statistics("instance_norm", input, p, False, 3, "(N, C, *spatial)")


@decomposition("normalize", "input p=2.0 dim=1 eps=1e-12 out=None")
def normalize(input, p, dim, eps, out):
    denom = input.norm(p, dim, keepdim=True).clamp(min=eps)
    return input / denom


@decomposition("local_response_norm", "input size alpha=0.0001 beta=0.75 k=1.0")
def local_response_norm(input, size, alpha, beta, k):
    if input.dim() < 3:
        raise UnsupportedOperationError(
            f"{PREFIX}'local_response_norm' needs an input (N, C, *spatial) of at least three "
            f"dimensions; got shape {tuple(input.shape)}")
    sq = input * input
    before = list(sq.shape)
    before[1] = size // 2
    after = list(sq.shape)
    after[1] = (size - 1) // 2
    padded = torch.cat([sq.new_zeros(before), sq, sq.new_zeros(after)], 1)
    # windows of `size` channels (torch's avg_pool counts the zero padding): a sum of shifts
    channels = input.shape[1]
    div = padded.narrow(1, 0, channels)
    for j in range(1, size):
        div = div + padded.narrow(1, j, channels)
    div = div / size
    return input / torch.pow(div * alpha + k, beta)
