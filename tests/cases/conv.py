"""Cases for convolution and pooling (sparsejac/programs/rules/conv.py): every spelling
(torch.op, F.op, nn.Module, Tensor method), with respect to the input, the weight and the
bias; strides, padding (ints, tuples, "same", "valid"), dilation, groups, ceil_mode."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import D, Case, rand

x1 = rand(2, 4, 7)  # (batch, channels, length)
x2 = rand(2, 4, 6, 5)  # (batch, channels, height, width)
x3 = rand(1, 2, 4, 3, 4)  # (batch, channels, depth, height, width)
w1, b1 = rand(6, 2, 3, seed=1), rand(6, seed=2)  # groups=2: 4 / 2 input channels per group
w2, b2 = rand(3, 4, 3, 2, seed=3), rand(3, seed=4)
w2g = rand(4, 2, 2, 3, seed=5)  # groups=2
w3, b3 = rand(3, 2, 2, 2, 3, seed=6), rand(3, seed=7)
wt1 = rand(4, 3, 3, seed=8)  # conv_transpose: (in, out / groups, k)
wt2, bt2 = rand(4, 1, 3, 2, seed=9), rand(2, seed=10)  # groups=2: 2 output channels
wt3 = rand(2, 2, 2, 2, 2, seed=11)
cols = rand(2, 4 * 2 * 3, 20, seed=12)  # F.fold input: (B, C*kh*kw, L)
# jacrev's cost grows with the output (torch's batching fallbacks loop over it): small ones
# where it differentiates a weight or a transposed convolution
s1, s2 = rand(1, 4, 5, seed=14), rand(1, 4, 3, 2, seed=15)


def _module(m):
    return m.to(D)


CASES = [
    # conv1d / conv2d / conv3d
    Case("conv1d", lambda a, w, b: F.conv1d(a, w, b, stride=2, padding=1, groups=2),
         (s1, w1, b1), wrt=(0, 1, 2), exact_nnz=True, id="conv1d-F"),
    Case("conv1d", lambda a, w: torch.conv1d(a, w, None, 1, "same", 2, 2), (x1, w1),
         wrt=(0, 1), exact_nnz=True, id="conv1d-torch-same-dilated"),
    Case("conv1d", _module(nn.Conv1d(4, 3, 2, padding="valid")), (x1,), exact_nnz=True,
         id="conv1d-module"),
    Case("conv1d", _module(nn.Conv1d(4, 2, 3, padding=2, padding_mode="circular")), (x1,),
         id="conv1d-module-circular"),
    Case("conv1d", lambda a, w: F.conv1d(a, w, groups=2), (x1[0], w1), wrt=(0, 1),
         exact_nnz=True, id="conv1d-unbatched"),
    Case("conv2d", lambda a, w, b: F.conv2d(a, w, b, stride=(2, 1), padding=(1, 2)),
         (x2, w2, b2), wrt=(0, 1, 2), exact_nnz=True, id="conv2d-F"),
    Case("conv2d", lambda a, w: torch.conv2d(a, w, padding="same", dilation=(2, 1), groups=2),
         (x2, w2g), wrt=(0, 1), exact_nnz=True, id="conv2d-torch-same-groups"),
    Case("conv2d", _module(nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=True)),
         (x2,), exact_nnz=True, id="conv2d-module-depthwise"),
    Case("conv2d", _module(nn.Conv2d(4, 2, 2, padding=1, padding_mode="reflect")), (x2,),
         id="conv2d-module-reflect"),
    Case("conv2d", lambda a: F.conv2d(a, w2, stride=3), (x2[0],), exact_nnz=True,
         id="conv2d-unbatched-stride3"),
    Case("conv3d", lambda a, w, b: F.conv3d(a, w, b, padding=(1, 0, 1), stride=(1, 2, 2)),
         (x3, w3, b3), wrt=(0, 1, 2), exact_nnz=True, id="conv3d-F"),
    Case("conv3d", _module(nn.Conv3d(2, 2, 2, dilation=(1, 2, 1), padding="same")), (x3,),
         exact_nnz=True, id="conv3d-module-same"),
    # transposed convolution
    Case("conv_transpose1d",
         lambda a, w: F.conv_transpose1d(a, w, stride=2, padding=1, output_padding=1),
         (s1[..., :3], wt1), wrt=(0, 1), exact_nnz=True, id="conv_transpose1d-F"),
    Case("conv_transpose1d", _module(nn.ConvTranspose1d(4, 2, 3, dilation=2)), (x1[0],),
         exact_nnz=True, id="conv_transpose1d-module-unbatched"),
    Case("conv_transpose2d",
         lambda a, w, b: torch.conv_transpose2d(a, w, b, (2, 1), (1, 0), (1, 0), 2, (1, 2)),
         (s2, wt2, bt2), wrt=(0, 1, 2), exact_nnz=True, id="conv_transpose2d-torch-groups"),
    Case("conv_transpose2d", _module(nn.ConvTranspose2d(4, 3, 2, stride=2)), (s2,),
         exact_nnz=True, id="conv_transpose2d-module"),
    Case("conv_transpose3d", lambda a, w: F.conv_transpose3d(a, w, stride=2, padding=1),
         (rand(1, 2, 2, 3, 2, seed=16), wt3), wrt=(0, 1), exact_nnz=True),
    # windows
    Case("unfold", lambda a: F.unfold(a, (2, 3), dilation=(1, 2), padding=1, stride=2), (x2,),
         exact_nnz=True, id="unfold-F"),
    Case("unfold", nn.Unfold(kernel_size=2, stride=1), (x2,), exact_nnz=True,
         id="unfold-module"),
    Case("unfold", lambda a: a.unfold(2, 3, 2), (x2,), exact_nnz=True, id="unfold-method"),
    Case("unfold", lambda a: a.unfold(dimension=-1, size=2, step=1), (x1,),
         id="unfold-method-keywords"),
    Case("fold", lambda a: F.fold(a, (4, 5), (2, 3), padding=(1, 0), stride=(1, 2)),
         (rand(2, 2 * 6, 5 * 2, seed=13),), exact_nnz=True, id="fold-F"),
    Case("fold", nn.Fold(output_size=(5, 6), kernel_size=(2, 3), dilation=(2, 1)),
         (cols[0, :, :12],), id="fold-module-unbatched"),
    # average pooling
    Case("avg_pool1d", lambda a: F.avg_pool1d(a, 3, stride=2, padding=1, ceil_mode=True,
                                              count_include_pad=False), (x1,), exact_nnz=True),
    Case("avg_pool1d", _module(nn.AvgPool1d(2)), (x1,), exact_nnz=True,
         id="avg_pool1d-module"),
    Case("avg_pool2d", lambda a: F.avg_pool2d(a, (3, 2), stride=(2, 1), padding=1,
                                              ceil_mode=True), (x2,), exact_nnz=True),
    Case("avg_pool2d", _module(nn.AvgPool2d(2, padding=1, divisor_override=3)), (x2[0],),
         exact_nnz=True, id="avg_pool2d-module-divisor-unbatched"),
    Case("avg_pool3d", _module(nn.AvgPool3d(2, stride=1, count_include_pad=False, padding=1)),
         (x3,), exact_nnz=True),
    Case("adaptive_avg_pool1d", lambda a: torch.adaptive_avg_pool1d(a, 3), (x1,),
         exact_nnz=True),
    Case("adaptive_avg_pool2d", _module(nn.AdaptiveAvgPool2d((4, None))), (x2,),
         exact_nnz=True),
    Case("adaptive_avg_pool2d", lambda a: F.adaptive_avg_pool2d(a, 4), (x2,), exact_nnz=True,
         id="adaptive_avg_pool2d-F-overlapping"),
    Case("adaptive_avg_pool3d", _module(nn.AdaptiveAvgPool3d((2, 2, 3))), (x3,),
         exact_nnz=True),
    # maximum pooling (stored: the whole window; tests/test_conv_structure.py counts it)
    Case("max_pool1d", lambda a: F.max_pool1d(a, 3, stride=2, padding=1, ceil_mode=True),
         (x1,)),
    Case("max_pool1d", lambda a: torch.max_pool1d(a, 2, 1, 0, 2), (x1,),
         id="max_pool1d-torch-dilated"),
    Case("max_pool1d_with_indices", lambda a: nn.MaxPool1d(2, return_indices=True)(a)[0], (x1,)),
    Case("max_pool2d", _module(nn.MaxPool2d((2, 3), stride=(2, 1), padding=1)), (x2,)),
    Case("max_pool2d", lambda a: F.max_pool2d(a, 2, ceil_mode=True, dilation=(1, 2)), (x2[0],),
         id="max_pool2d-F-unbatched"),
    Case("max_pool2d_with_indices",
         lambda a: F.max_pool2d(a, 3, stride=2, padding=1, return_indices=True)[0], (x2,)),
    Case("max_pool3d", _module(nn.MaxPool3d(2, stride=1, padding=(1, 0, 1))), (x3,)),
    Case("max_pool3d_with_indices",
         lambda a: F.max_pool3d_with_indices(a, (2, 2, 3), ceil_mode=True)[0], (x3,)),
    Case("adaptive_max_pool1d", _module(nn.AdaptiveMaxPool1d(3)), (x1,)),
    Case("adaptive_max_pool1d_with_indices",
         lambda a: F.adaptive_max_pool1d(a, 4, return_indices=True)[0], (x1,)),
    Case("adaptive_max_pool2d", lambda a: F.adaptive_max_pool2d(a, (4, 3)), (x2,)),
    Case("adaptive_max_pool2d_with_indices",
         lambda a: nn.AdaptiveMaxPool2d(4, return_indices=True)(a)[0], (x2,)),
    Case("adaptive_max_pool3d", lambda a: F.adaptive_max_pool3d(a, (3, 2, 2)), (x3,)),
    Case("adaptive_max_pool3d_with_indices",
         lambda a: F.adaptive_max_pool3d(a, 2, return_indices=True)[0], (x3,)),
    # power-average pooling (a decomposition: avg_pool of x**p)
    Case("lp_pool1d", _module(nn.LPPool1d(2, 3, stride=2)), (x1,)),
    Case("lp_pool2d", lambda a: F.lp_pool2d(a, 3.0, (2, 2), ceil_mode=True), (x2.abs() + 0.1,)),
    Case("lp_pool3d", lambda a: F.lp_pool3d(a, 2, 2), (x3,)),
]
