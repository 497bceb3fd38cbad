"""Losses: regression (``mse_loss``, ``l1_loss``, ``smooth_l1_loss``, ``huber_loss``),
classification (``cross_entropy``, ``nll_loss``, ``binary_cross_entropy(_with_logits)``,
``soft_margin_loss``), divergences (``kl_div``) and similarities (``cosine_similarity``,
``pairwise_distance``), each written with registered operations as torch defines it, with
every ``reduction`` and the legacy ``size_average``/``reduce`` flags read as torch reads them.

Class indices, ``ignore_index`` masks and integer targets are constants; a float target
(regression targets, class probabilities, KL targets) is differentiated where torch
differentiates it. Weights are differentiated too, also where torch does not (class weights
of ``nll_loss`` and of ``cross_entropy`` with class indices, ``binary_cross_entropy``'s
weight; the loss is a plain function of them)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import UnsupportedOperationError
from ..registry import decomposition
from ..tracer import PREFIX

LEGACY = "size_average=None reduce=None"


def _reduction(name, size_average, reduce, reduction, allowed=("none", "mean", "sum")):
    """The reduction torch applies: the legacy flags, when given, win (as in torch)."""
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce, emit_warning=False)
    if reduction == "elementwise_mean":
        reduction = "mean"
    if reduction not in allowed:
        raise UnsupportedOperationError(
            f"{PREFIX}{name!r}: reduction={reduction!r} is not one of {', '.join(allowed)}")
    return reduction


def _reduce(loss, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()


def _weighted(loss, weight, reduction, mean_by_weight: bool):
    """``loss * weight`` reduced; ``mean_by_weight``: a mean divides by the weights' sum
    (torch's weighted ``mse_loss`` and ``l1_loss``), otherwise by the count."""
    if weight is None:
        return _reduce(loss, reduction)
    loss = loss * weight
    if reduction == "mean" and mean_by_weight:
        return loss.sum() / weight.sum()
    return _reduce(loss, reduction)


# --- regression -----------------------------------------------------------------------------


@decomposition("mse_loss", f"input target {LEGACY} reduction='mean' weight=None")
def mse_loss(input, target, size_average, reduce, reduction, weight):
    reduction = _reduction("mse_loss", size_average, reduce, reduction)
    d = input - target
    return _weighted(d * d, weight, reduction, True)


@decomposition("l1_loss", f"input target {LEGACY} reduction='mean' weight=None")
def l1_loss(input, target, size_average, reduce, reduction, weight):
    reduction = _reduction("l1_loss", size_average, reduce, reduction)
    return _weighted((input - target).abs(), weight, reduction, True)


def _huber(d, delta):
    """``0.5 d**2`` within ``delta`` of zero, ``delta * (|d| - delta / 2)`` outside."""
    a = d.abs()
    return torch.where(a < delta, 0.5 * (d * d), delta * (a - 0.5 * delta))


@decomposition("smooth_l1_loss", f"input target {LEGACY} reduction='mean' beta=1.0")
def smooth_l1_loss(input, target, size_average, reduce, reduction, beta):
    reduction = _reduction("smooth_l1_loss", size_average, reduce, reduction)
    if beta < 0:
        raise UnsupportedOperationError(
            f"{PREFIX}'smooth_l1_loss': beta={beta} is negative; torch needs beta >= 0")
    d = input - target
    if beta == 0:
        return _reduce(d.abs(), reduction)
    return _reduce(_huber(d, beta) / beta, reduction)


@decomposition("huber_loss", "input target reduction='mean' delta=1.0 weight=None")
def huber_loss(input, target, reduction, delta, weight):
    reduction = _reduction("huber_loss", None, None, reduction)
    return _weighted(_huber(input - target, delta), weight, reduction, False)


# --- classification -------------------------------------------------------------------------


def _class_dim(input):
    return 0 if input.dim() == 1 else 1


def _channel_shape(input, cdim):
    shape = [1] * input.dim()
    shape[cdim] = -1
    return shape


def _nll(name, logp, target, weight, ignore_index, reduction):
    """torch's ``nll_loss`` of log-probabilities ``logp`` (N, C, ...) or (C,) at the class
    indices ``target``: ``-weight[t] * logp[t]``, zero where ``t == ignore_index``; a mean
    divides by the weights of the targets counted."""
    if target.is_floating_point() or target.is_complex():
        raise UnsupportedOperationError(
            f"{PREFIX}{name!r}: the target must hold class indices (an integer tensor); "
            f"got dtype {target.dtype}")
    cdim = _class_dim(logp)
    ignore = target == ignore_index
    safe = target.masked_fill(ignore, 0)
    picked = logp.gather(cdim, safe.unsqueeze(cdim)).squeeze(cdim)
    if weight is not None:
        w = weight[safe]
    else:
        w = torch.ones(safe.shape, dtype=logp.dtype, device=logp.device)
    w = w.masked_fill(ignore, 0.0)
    loss = picked * -w
    if reduction == "mean":
        return loss.sum() / w.sum(), w
    return _reduce(loss, reduction), w


@decomposition("nll_loss",
               f"input target weight=None size_average=None ignore_index=-100 reduce=None "
               f"reduction='mean'")
def nll_loss(input, target, weight, size_average, ignore_index, reduce, reduction):
    reduction = _reduction("nll_loss", size_average, reduce, reduction)
    return _nll("nll_loss", input, target, weight, ignore_index, reduction)[0]


@decomposition("cross_entropy",
               f"input target weight=None size_average=None ignore_index=-100 reduce=None "
               f"reduction='mean' label_smoothing=0.0")
def cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                  label_smoothing):
    reduction = _reduction("cross_entropy", size_average, reduce, reduction)
    cdim = _class_dim(input)
    classes = input.shape[cdim]
    logp = torch.log_softmax(input, cdim)
    w_ = None if weight is None else weight.reshape(_channel_shape(input, cdim))
    if target.is_floating_point():  # class probabilities
        if label_smoothing > 0:
            target = target * (1 - label_smoothing) + label_smoothing / classes
        prod = logp * target
        if w_ is not None:
            prod = prod * w_
        if reduction == "none":
            return -prod.sum(cdim)
        if reduction == "sum":
            return -prod.sum()
        return -prod.sum() / (input.numel() // classes)
    nll, w = _nll("cross_entropy", logp, target, weight, ignore_index, reduction)
    if label_smoothing <= 0:
        return nll
    ignore = target == ignore_index
    smooth = -(logp * w_ if w_ is not None else logp).sum(cdim)
    smooth = smooth.masked_fill(ignore, 0.0)
    if reduction == "none":
        ret = smooth
    elif reduction == "sum":
        ret = smooth.sum()
    else:
        count = w.sum() if weight is not None else (~ignore).sum().to(smooth.dtype)
        ret = smooth.sum() / count
    return nll * (1 - label_smoothing) + ret * (label_smoothing / classes)


def _log_clamped(x):
    return torch.clamp(torch.log(x), min=-100.0)  # torch clamps BCE's logs at -100


@decomposition("binary_cross_entropy",
               f"input target weight=None {LEGACY} reduction='mean'",
               traced="input target weight")
def binary_cross_entropy(input, target, weight, size_average, reduce, reduction):
    reduction = _reduction("binary_cross_entropy", size_average, reduce, reduction)
    loss = -(target * _log_clamped(input) + (1 - target) * _log_clamped(1 - input))
    return _weighted(loss, weight, reduction, False)


@decomposition("binary_cross_entropy_with_logits",
               f"input target weight=None {LEGACY} reduction='mean' pos_weight=None",
               traced="input target weight pos_weight")
def binary_cross_entropy_with_logits(input, target, weight, size_average, reduce, reduction,
                                     pos_weight):
    reduction = _reduction("binary_cross_entropy_with_logits", size_average, reduce, reduction)
    log_sig = F.logsigmoid(input)
    if pos_weight is not None:
        log_sig = log_sig * ((pos_weight - 1) * target + 1)
    loss = (1 - target) * input - log_sig
    return _weighted(loss, weight, reduction, False)


@decomposition("soft_margin_loss", f"input target {LEGACY} reduction='mean'",
               traced="input target")
def soft_margin_loss(input, target, size_average, reduce, reduction):
    reduction = _reduction("soft_margin_loss", size_average, reduce, reduction)
    return _reduce(-F.logsigmoid(input * target), reduction)


# --- divergences and similarities -----------------------------------------------------------


@decomposition("kl_div", f"input target {LEGACY} reduction='mean' log_target=False")
def kl_div(input, target, size_average, reduce, reduction, log_target):
    batchmean = reduction == "batchmean"
    if size_average is not None or reduce is not None:
        kind = _reduction("kl_div", size_average, reduce, reduction)
    else:
        kind = "sum" if batchmean else _reduction("kl_div", None, None, reduction,
                                                  ("none", "mean", "sum", "batchmean"))
    if log_target:
        loss = torch.exp(target) * (target - input)
    else:
        loss = torch.xlogy(target, target) - target * input
    out = _reduce(loss, kind)
    if batchmean and input.dim() != 0:
        out = out / input.shape[0]
    return out


@decomposition("cosine_similarity", "x1 x2 dim=1 eps=1e-08")
def cosine_similarity(x1, x2, dim, eps):
    shape = np.broadcast_shapes(tuple(x1.shape), tuple(x2.shape))  # torch's imports sympy
    a, b = x1.expand(shape), x2.expand(shape)
    # torch clamps the norms at eps without a derivative through the clamp
    na = a.norm(2, dim, keepdim=True).clamp(min=eps)
    nb = b.norm(2, dim, keepdim=True).clamp(min=eps)
    return ((a / na) * (b / nb)).sum(dim)


@decomposition("pairwise_distance", "x1 x2 p=2.0 eps=1e-06 keepdim=False")
def pairwise_distance(x1, x2, p, eps, keepdim):
    d = x1 - x2 + eps
    if d.dim() == 0:
        return d.norm(p, None, keepdim)
    return d.norm(p, -1, keepdim)


# --- further losses -------------------------------------------------------------------------


@decomposition("poisson_nll_loss",
               "input target log_input=True full=False size_average=None eps=1e-08 reduce=None "
               "reduction='mean'")
def poisson_nll_loss(input, target, log_input, full, size_average, eps, reduce, reduction):
    reduction = _reduction("poisson_nll_loss", size_average, reduce, reduction)
    if log_input:
        loss = torch.exp(input) - target * input
    else:
        loss = input - target * torch.log(input + eps)
    if full:  # Stirling's approximation of log(target!), for targets above 1
        stirling = (torch.xlogy(target, target) - target
                    + 0.5 * torch.log(2 * torch.pi * target))
        loss = loss + stirling.masked_fill(target <= 1, 0.0)
    return _reduce(loss, reduction)


@decomposition("gaussian_nll_loss", "input target var full=False eps=1e-06 reduction='mean'")
def gaussian_nll_loss(input, target, var, full, eps, reduction):
    reduction = _reduction("gaussian_nll_loss", None, None, reduction)
    if isinstance(var, (int, float)):
        var = torch.full(input.shape, float(var), dtype=input.dtype, device=input.device)
    if var.shape != input.shape and tuple(input.shape[:-1]) == tuple(var.shape):
        var = var.unsqueeze(-1)
    # torch clamps var at eps without a derivative through the clamp: add the difference
    var = var + (var.detach().clamp(min=eps) - var.detach())
    d = input - target
    loss = 0.5 * (torch.log(var) + d * d / var)
    if full:
        loss = loss + 0.5 * math.log(2 * math.pi)
    return _reduce(loss, reduction)


@decomposition("margin_ranking_loss",
               f"input1 input2 target margin=0 {LEGACY} reduction='mean'")
def margin_ranking_loss(input1, input2, target, margin, size_average, reduce, reduction):
    reduction = _reduction("margin_ranking_loss", size_average, reduce, reduction)
    return _reduce(torch.clamp(-target * (input1 - input2) + margin, min=0), reduction)


@decomposition("hinge_embedding_loss", f"input target margin=1.0 {LEGACY} reduction='mean'",
               traced="input")
def hinge_embedding_loss(input, target, margin, size_average, reduce, reduction):
    reduction = _reduction("hinge_embedding_loss", size_average, reduce, reduction)
    zeros = torch.zeros_like(input)
    margin_part = torch.where(target != 1, torch.clamp(margin - input, min=0), zeros)
    self_part = torch.where(target != -1, input, zeros)
    return _reduce(margin_part + self_part, reduction)


@decomposition("triplet_margin_loss",
               f"anchor positive negative margin=1.0 p=2 eps=1e-06 swap=False {LEGACY} "
               "reduction='mean'")
def triplet_margin_loss(anchor, positive, negative, margin, p, eps, swap, size_average, reduce,
                        reduction):
    reduction = _reduction("triplet_margin_loss", size_average, reduce, reduction)
    d_pos = pairwise_distance(anchor, positive, p, eps, False)
    d_neg = pairwise_distance(anchor, negative, p, eps, False)
    if swap:
        d_neg = torch.minimum(d_neg, pairwise_distance(positive, negative, p, eps, False))
    return _reduce(torch.clamp(margin + d_pos - d_neg, min=0), reduction)


@decomposition("multilabel_soft_margin_loss",
               f"input target weight=None {LEGACY} reduction='mean'")
def multilabel_soft_margin_loss(input, target, weight, size_average, reduce, reduction):
    reduction = _reduction("multilabel_soft_margin_loss", size_average, reduce, reduction)
    loss = -(target * F.logsigmoid(input) + (1 - target) * F.logsigmoid(-input))
    if weight is not None:
        loss = loss * weight
    classes = input.shape[-1]
    return _reduce(loss.sum(-1) / classes, reduction)


@decomposition("linear_cross_entropy", "input linear_weight target linear_bias=None weight=None "
               "reduction='mean' ignore_index=None label_smoothing=0.0 options=None",
               traced="input linear_weight target linear_bias weight")
def linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction,
                         ignore_index, label_smoothing, options):
    """``cross_entropy`` of the logits ``linear`` gives (torch's chunked path computes the
    same function in pieces)."""
    classes, out_features, inner = (linear_weight.shape[0], tuple(linear_weight.shape[1:-1]),
                                    linear_weight.shape[-1])
    logits = input @ linear_weight.reshape(-1, inner).T
    logits = logits.reshape(*input.shape[:-1], classes, *out_features)
    if linear_bias is not None:
        logits = logits + linear_bias
    return cross_entropy(logits, target, weight, None,
                         -100 if ignore_index is None else ignore_index, None, reduction,
                         label_smoothing)


@decomposition("cosine_embedding_loss", f"input1 input2 target margin=0 {LEGACY} "
               "reduction='mean'", traced="input1 input2")
def cosine_embedding_loss(input1, input2, target, margin, size_average, reduce, reduction):
    """torch's: ``1 - cos`` where the target is 1, ``max(0, cos - margin)`` where it is -1;
    the squared norms carry torch's 1e-12."""
    reduction = _reduction("cosine_embedding_loss", size_average, reduce, reduction)
    d = input1.dim() - 1
    prod = (input1 * input2).sum(d)
    m1 = (input1 * input1).sum(d) + 1e-12
    m2 = (input2 * input2).sum(d) + 1e-12
    cos = prod / torch.sqrt(m1 * m2)
    zeros = torch.zeros_like(cos)
    loss = (torch.where(target == 1, 1 - cos, zeros)
            + torch.where(target == -1, torch.clamp(cos - margin, min=0), zeros))
    return _reduce(loss, reduction)


@decomposition("multi_margin_loss", f"input target p=1 margin=1.0 weight=None {LEGACY} "
               "reduction='mean'", traced="input weight")
def multi_margin_loss(input, target, p, margin, weight, size_average, reduce, reduction):
    """torch's decomposition: ``max(0, margin - x[y] + x[i])**p`` (weighted by the target's
    class weight) over the classes ``i != y``, divided by the number of classes."""
    reduction = _reduction("multi_margin_loss", size_average, reduce, reduction)
    if p not in (1, 2):
        raise UnsupportedOperationError(f"{PREFIX}'multi_margin_loss': p={p}; torch takes 1 or 2")
    single = input.dim() <= 1
    x = torch.atleast_2d(input)
    t = torch.atleast_1d(target).unsqueeze(1)
    z = torch.clamp(margin - x.gather(1, t) + x, min=0)
    z = z if p == 1 else z * z
    if weight is not None:
        z = z * torch.atleast_1d(weight)[t]
    z = torch.where(torch.arange(x.shape[1], device=x.device) != t, z, torch.zeros_like(z))
    if reduction == "mean":
        return z.mean()
    if reduction == "sum":
        return z.sum() / z.shape[1]
    out = z.mean(1)
    return out[0] if single else out


@decomposition("multilabel_margin_loss", f"input target {LEGACY} reduction='mean'",
               traced="input")
def multilabel_margin_loss(input, target, size_average, reduce, reduction):
    """torch's: for each target class ``j`` (the target's entries up to the first -1) and each
    class ``i`` not among them, ``max(0, 1 - (x[j] - x[i]))``, summed over the classes'
    count."""
    reduction = _reduction("multilabel_margin_loss", size_average, reduce, reduction)
    single = input.dim() <= 1
    x = input.reshape(1, -1) if single else input
    t = target.reshape(1, -1) if single else target
    n, c = x.shape
    valid = torch.cumprod((t >= 0).to(torch.int64), 1).bool()  # up to the first -1
    safe = t.clamp(min=0)
    is_target = torch.zeros((n, c), dtype=torch.int64, device=x.device).scatter_add(
        1, safe, valid.to(torch.int64)) > 0
    z = torch.clamp(1 - x.gather(1, safe).unsqueeze(2) + x.unsqueeze(1), min=0)  # (n, k, c)
    mask = valid.unsqueeze(2) & ~is_target.unsqueeze(1)
    loss = torch.where(mask, z, torch.zeros_like(z)).sum((1, 2)) / c
    if reduction == "none":
        return loss.reshape(()) if single else loss
    return loss.sum() if reduction == "sum" else loss.mean()


@decomposition("triplet_margin_with_distance_loss", "anchor positive negative "
               "distance_function=None margin=1.0 swap=False reduction='mean'",
               traced="anchor positive negative")
def triplet_margin_with_distance_loss(anchor, positive, negative, distance_function, margin,
                                      swap, reduction):
    reduction = _reduction("triplet_margin_with_distance_loss", None, None, reduction)
    dist = distance_function if distance_function is not None else F.pairwise_distance
    d_pos = dist(anchor, positive)
    d_neg = dist(anchor, negative)
    if swap:
        d_neg = torch.minimum(d_neg, dist(positive, negative))
    return _reduce(torch.clamp(margin + d_pos - d_neg, min=0), reduction)
