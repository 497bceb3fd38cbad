"""Cases for normalisation: layer, group, RMS, batch and instance norms, F.normalize, local
response normalisation, in every spelling (torch.op, F.op, nn module), with respect to the
input and to the weight and bias."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import D, Case, rand

x = rand(4, 6)
x3 = rand(2, 6, 5, seed=1)
x4 = rand(3, 6, 3, 2, seed=2)
w, b = rand(6, seed=3), rand(6, seed=4)
rm, rv = rand(6, seed=5), rand(6, seed=6, positive=True)
w32 = rand(3, 2, seed=7)


def _bn(cls, **kw):
    m = cls(6, dtype=D, **kw)
    with torch.no_grad():
        if m.affine:
            m.weight.copy_(w)
            m.bias.copy_(b)
        if m.running_mean is not None:
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
    return m


def _eval(m):
    m.eval()
    return m


CASES = [
    # layer_norm
    Case("layer_norm", nn.LayerNorm(6, dtype=D), (x,), id="layer_norm-nn"),
    Case("layer_norm", lambda a, wt, bias: F.layer_norm(a, (6,), weight=wt, bias=bias, eps=1e-3),
         (x, w, b), wrt=(0, 1, 2), id="layer_norm-F"),
    Case("layer_norm", lambda a, wt: torch.layer_norm(a, [3, 2], wt), (x4, w32), wrt=(0, 1),
         id="layer_norm-torch-2d"),
    Case("layer_norm", nn.LayerNorm([3, 2], elementwise_affine=False, dtype=D), (x4,),
         id="layer_norm-nn-noaffine"),
    # rms_norm
    Case("rms_norm", nn.RMSNorm(6, dtype=D), (x,), id="rms_norm-nn"),
    Case("rms_norm", lambda a, wt: F.rms_norm(a, (6,), weight=wt, eps=1e-4), (x, w),
         wrt=(0, 1), id="rms_norm-F"),
    Case("rms_norm", lambda a: torch.rms_norm(a, [3, 2]), (x4,), id="rms_norm-torch"),
    # group_norm
    Case("group_norm", nn.GroupNorm(3, 6, dtype=D), (x4,), id="group_norm-nn"),
    Case("group_norm", lambda a, wt, bias: F.group_norm(a, 2, weight=wt, bias=bias, eps=1e-3),
         (x3, w, b), wrt=(0, 1, 2), id="group_norm-F"),
    Case("group_norm", lambda a: torch.group_norm(a, 6), (x4,), id="group_norm-torch"),
    # batch_norm: eval (running statistics), training (the batch's own statistics)
    Case("batch_norm", _eval(_bn(nn.BatchNorm1d)), (x,), id="batch_norm-nn1d-eval"),
    Case("batch_norm", _eval(_bn(nn.BatchNorm2d)), (x4,), id="batch_norm-nn2d-eval"),
    Case("batch_norm", _bn(nn.BatchNorm1d, track_running_stats=False), (x3,),
         id="batch_norm-nn1d-train"),
    Case("batch_norm", _bn(nn.BatchNorm2d, track_running_stats=False), (x4,),
         id="batch_norm-nn2d-train"),
    Case("batch_norm", lambda a, wt, bias: F.batch_norm(a, rm, rv, weight=wt, bias=bias,
                                                         eps=1e-3),
         (x4, w, b), wrt=(0, 1, 2), id="batch_norm-F-eval"),
    Case("batch_norm", lambda a, wt, bias: F.batch_norm(a, rm.clone(), rv.clone(), wt, bias,
                                                         training=True, momentum=0.2),
         (x3, w, b), wrt=(0, 1, 2), id="batch_norm-F-train"),
    Case("batch_norm", lambda a: F.batch_norm(a, None, None, training=True), (x,),
         id="batch_norm-F-nostats"),
    Case("batch_norm", lambda a, wt, bias: torch.batch_norm(a, wt, bias, rm, rv, False, 0.1,
                                                             1e-5, False),
         (x4, w, b), wrt=(0, 1, 2), id="batch_norm-torch-eval"),
    Case("batch_norm", lambda a, wt, bias: torch.batch_norm(a, wt, bias, rm.clone(), rv.clone(),
                                                             True, 0.1, 1e-5, False),
         (x, w, b), wrt=(0, 1, 2), id="batch_norm-torch-train"),
    # instance_norm
    Case("instance_norm", nn.InstanceNorm1d(6, dtype=D), (x3,), id="instance_norm-nn1d"),
    Case("instance_norm", _bn(nn.InstanceNorm2d, affine=True), (x4,),
         id="instance_norm-nn2d-affine"),
    Case("instance_norm", _eval(_bn(nn.InstanceNorm2d, affine=True, track_running_stats=True)),
         (x4,), id="instance_norm-nn2d-running-eval"),
    Case("instance_norm", lambda a: F.instance_norm(a, rm.clone(), rv.clone(),
                                                    use_input_stats=True),
         (x4,), id="instance_norm-F-running-train"),
    Case("instance_norm", lambda a, wt, bias: F.instance_norm(a, weight=wt, bias=bias, eps=1e-3),
         (x3, w, b), wrt=(0, 1, 2), id="instance_norm-F"),
    Case("instance_norm", lambda a, wt, bias: torch.instance_norm(a, wt, bias, None, None, True,
                                                                   0.1, 1e-5, False),
         (x3, w, b), wrt=(0, 1, 2), id="instance_norm-torch"),
    # normalize, local_response_norm
    Case("normalize", lambda a: F.normalize(a), (x,), id="normalize-F"),
    Case("normalize", lambda a: F.normalize(a, p=1.0, dim=0, eps=1e-6), (x,),
         id="normalize-F-p1"),
    Case("normalize", lambda a: F.normalize(a, p=3, dim=-1), (x4,), id="normalize-F-p3"),
    Case("local_response_norm", lambda a: F.local_response_norm(a, 3, alpha=0.1, k=2.0), (x4,),
         id="local_response_norm-F"),
    Case("local_response_norm", nn.LocalResponseNorm(4, alpha=0.1, beta=0.5), (x3,),
         id="local_response_norm-nn"),
]
