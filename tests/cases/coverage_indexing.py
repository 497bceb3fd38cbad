"""Cases for the placements, selections, losses, resampling and torch's internal kernels added
for OpInfo coverage (rules/scatter.py, layout.py, losses.py, resample.py, misc.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import D, Case, rand

x = rand(4, 3)
v = rand(6)
img = rand(2, 3, 5, 6, seed=1)
vol = rand(1, 2, 3, 4, 3, seed=2)
aten = torch.ops.aten
IDX = torch.tensor([0, 2, 0, 3])
GRID = rand(2, 4, 3, 2, seed=3) * 0.9
GRID3 = rand(1, 2, 3, 2, 3, seed=4) * 0.9


POOLED = F.max_pool2d(img, 2, return_indices=True)
SEG = torch.tensor([2, 0, 3, 1])

CASES = [
    # selections and index maps (rules/layout.py)
    Case("slice.Tensor", lambda a: aten.slice.Tensor(a, 0, 1, None, 2) * 2, (x,)),
    Case("slice", lambda a: aten.slice(a, 1, -2), (x,)),
    Case("combinations", lambda a: torch.combinations(a, 2, with_replacement=True), (v,)),
    Case("constant_pad_nd", lambda a: torch.constant_pad_nd(a, (1, -1, 2, 0), 0.5), (x,)),
    Case("column_stack", lambda a: torch.column_stack([a, a[:, 0], a[:, :2] ** 2]), (x,)),
    Case("as_strided", lambda a: torch.as_strided(a * 1, (3, 3), (2, 1), 1), (x,)),
    Case("as_strided", lambda a: torch.as_strided(a.t(), (2, 2), (3, 1), 2), (x,),
         id="as_strided-transposed", variants=False),
    Case("as_strided_copy", lambda a: torch.as_strided_copy(a * 1, (2, 3), (1, 2)), (x,)),
    # placements (rules/scatter.py)
    Case("put", lambda a: torch.put(a, torch.tensor([5, 0, 5]), a[0] ** 2, accumulate=True),
         (x,)),
    Case("put", lambda a: torch.put(a, torch.tensor([5, 0, 7]), a[0] ** 2), (x,), id="put-over"),
    Case("diagonal_scatter", lambda a: torch.diagonal_scatter(a, a[0] ** 2, -1), (x,)),
    Case("as_strided_scatter", lambda a: torch.as_strided_scatter(
        x, a[:2, :2] ** 2, (2, 2), (3, 1), 1), (x,)),
    *[Case("scatter_reduce", lambda a, s=s: torch.scatter_reduce(
        a * torch.tensor([[1.0], [0.0], [1.0], [1.0]], dtype=D), 0,
        torch.tensor([[0, 1, 2], [0, 1, 0], [3, 3, 3]]), a[1:4] * 2 + 1, "prod",
        include_self=s), (x,), id=f"scatter_reduce-prod-{s}") for s in (True, False)],
    *[Case("index_reduce", lambda a, r=r, s=s: torch.index_reduce(
        a, 0, IDX, a ** 2 + 1, r, include_self=s), (x,), id=f"index_reduce-{r}-{s}")
      for r in ("prod", "mean", "amax", "amin") for s in (True, False)],
    Case("max_unpool1d", lambda a: F.max_unpool1d(a, torch.tensor([[[1, 2, 5]]]), 2),
         (rand(1, 1, 3),)),
    Case("max_unpool2d", lambda a: F.max_unpool2d(*F.max_pool2d(a, 2, return_indices=True), 2),
         (img,)),
    Case("max_unpool2d", lambda a: F.max_unpool2d(a, torch.tensor([[[[0, 0], [3, 5]]]]), 2),
         (rand(1, 1, 2, 2),), id="max_unpool2d-repeated"),
    Case("max_unpool3d", lambda a: F.max_unpool3d(*F.max_pool3d(a, 2, return_indices=True), 2,
                                                  output_size=a.shape[-3:]), (vol,)),
    Case("_unsafe_masked_index_put_accumulate", lambda a: aten._unsafe_masked_index_put_accumulate(
        a, torch.tensor([True, False, True]), [torch.tensor([0, 7, -1])], a[1] ** 2), (x,)),
    # torch's internal kernels, constant derivatives (rules/misc.py)
    Case("fill", lambda a: torch.fill(a, 2.0) + a, (x,)),
    Case("fill", lambda a: torch.fill(x, a[0, 0] ** 2), (x,), id="fill-traced-value"),
    Case("angle", lambda a: torch.angle(a) + a, (x,)),
    Case("nextafter", lambda a: torch.nextafter(a, a[:1] * 2), (x,)),
    Case("__rmod__", lambda a: (a[:1] * 3 + 10).__rmod__(a + 20), (x,)),
    Case("native_dropout_backward", lambda a: aten.native_dropout_backward(
        a, x > 0, 2.0), (x,)),
    Case("native_dropout_backward.default", lambda a: aten.native_dropout_backward.default(
        a, x > 0, 0.5), (x,)),
    Case("_softmax_backward_data", lambda a: torch._softmax_backward_data(
        a, torch.softmax(a, 1), 1, D), (x,)),
    Case("_softmax_backward_data.default", lambda a: aten._softmax_backward_data.default(
        a ** 2, torch.softmax(a, 0), 0, D), (x,)),
    Case("_safe_softmax", lambda a: aten._safe_softmax(a, 1), (x,)),
    Case("_safe_softmax.default", lambda a: aten._safe_softmax.default(
        torch.where(torch.tensor([[True], [False], [True], [True]]), a, float("-inf")), 1),
        (x,)),
    Case("_unsafe_masked_index", lambda a: aten._unsafe_masked_index(
        a, torch.tensor([True, False, True]), [torch.tensor([0, 9, 3])], 0.5), (x,)),
    Case("_unsafe_masked_index.default", lambda a: aten._unsafe_masked_index.default(
        a, torch.tensor([[True], [False]]), [None, torch.tensor([[2], [1]])], -1.0), (x,)),
    Case("max_pool2d_with_indices_backward", lambda a: aten.max_pool2d_with_indices_backward(
        a, img, [2, 2], [2, 2], [0, 0], [1, 1], False, POOLED[1]), (POOLED[0],)),
    Case("max_pool2d_with_indices_backward.default",
         lambda a: aten.max_pool2d_with_indices_backward.default(
             a ** 2, img, [3, 3], [1, 1], [1, 1], [1, 1], False,
             F.max_pool2d(img, 3, 1, 1, return_indices=True)[1]),
         (F.max_pool2d(img, 3, 1, 1),)),
    *[Case("segment_reduce", lambda a, r=r, i=i: torch.segment_reduce(
        a, r, lengths=SEG, axis=0, initial=i), (v,),
        id=f"segment_reduce-{r}-{i}") for r in ("sum", "mean", "max", "min", "prod")
      for i in (None, 1.5)],
    Case("segment_reduce", lambda a: torch.segment_reduce(
        a, "max", offsets=torch.tensor([[0, 1, 3], [0, 0, 2], [0, 3, 3], [0, 1, 2]]), axis=1,
        initial=0.0), (x,), id="segment_reduce-offsets"),
    *[Case("embedding_bag", lambda a, m=m: F.embedding_bag(
        torch.tensor([1, 2, 1, 0, 3, 3]), a, torch.tensor([0, 2, 2, 5]), mode=m,
        padding_idx=0), (x,), id=f"embedding_bag-{m}") for m in ("sum", "mean", "max")],
    Case("embedding_bag", lambda a: F.embedding_bag(
        torch.tensor([[1, 2], [3, 3]]), a ** 2, mode="sum",
        per_sample_weights=a[0, :2].expand(2, 2) * a[1, :2]), (x,), id="embedding_bag-weights"),
    *[Case("grid_sample", lambda a, g, m=m, p=p, c=c: F.grid_sample(
        a, g, mode=m, padding_mode=p, align_corners=c), (img, GRID * 1.3), wrt=(0, 1),
        id=f"grid_sample-{m}-{p}-{c}")
      for m in ("bilinear", "nearest", "bicubic") for p in ("zeros", "border", "reflection")
      for c in (False, True)],
    *[Case("grid_sampler_3d", lambda a, g, m=m, p=p, c=c: torch.grid_sampler_3d(a, g, m, p, c),
           (vol, GRID3 * 1.3), wrt=(0, 1), id=f"grid_sampler_3d-{m}-{p}-{c}")
      for m in (0, 1) for p in (0, 1, 2) for c in (False, True)],
    Case("grid_sample", lambda a, g: F.grid_sample(a, g, align_corners=False),
         (vol, GRID3), wrt=(0, 1), id="grid_sample-5d"),
    # resampling (rules/resample.py)
    Case("_upsample_bilinear2d_aa", lambda a: aten._upsample_bilinear2d_aa(
        a, [3, 8], False, None), (img,)),
    Case("_upsample_bilinear2d_aa", lambda a: aten._upsample_bilinear2d_aa.default(
        a, [2, 4], True, 0.5, 0.7), (img,), id="_upsample_bilinear2d_aa-scales"),
    Case("_upsample_bilinear2d_aa.default", lambda a: aten._upsample_bilinear2d_aa.default(
        a, [4, 3], False, None, None), (img,)),
    Case("_upsample_bilinear2d_aa.vec", lambda a: aten._upsample_bilinear2d_aa.vec(
        a, None, False, [0.5, 1.5]), (img,)),
    Case("_upsample_bicubic2d_aa.default", lambda a: aten._upsample_bicubic2d_aa.default(
        a, [7, 3], True, None, None), (img,)),
    Case("_upsample_bicubic2d_aa.vec", lambda a: aten._upsample_bicubic2d_aa.vec(
        a, [2, 9], False, None), (img,)),
    Case("_upsample_bicubic2d_aa", lambda a: aten._upsample_bicubic2d_aa(
        a, None, False, [0.6, 1.5]), (img,)),
    Case("interpolate", lambda a: F.interpolate(a, size=(3, 4), mode="bicubic", antialias=True),
         (img,), id="interpolate-antialias"),
    # losses (rules/losses.py)
    Case("linear_cross_entropy", lambda a: F.linear_cross_entropy(
        a, x[:3] * 2, torch.tensor([0, 2, 1, 1]), linear_bias=x[0], label_smoothing=0.1),
        (x,)),
    Case("linear_cross_entropy", lambda a: F.linear_cross_entropy(
        a, a[:3] ** 2, torch.tensor([0, 2, -100, 1]), reduction="none"), (x,),
        id="linear_cross_entropy-none"),
    Case("cosine_embedding_loss", lambda a: F.cosine_embedding_loss(
        a, a.flip(0) ** 2, torch.tensor([1, -1, -1, 1]), margin=-0.5), (x,)),
    *[Case("multi_margin_loss", lambda a, p=p, r=r: F.multi_margin_loss(
        a, torch.tensor([0, 2, 1, 1]), p=p, margin=0.9, weight=x[0].abs(), reduction=r), (x,),
        id=f"multi_margin_loss-{p}-{r}") for p in (1, 2) for r in ("mean", "sum", "none")],
    Case("multi_margin_loss", lambda a: F.multi_margin_loss(a, torch.tensor(3), reduction="none"),
         (v,), id="multi_margin_loss-1d"),
    *[Case("multilabel_margin_loss", lambda a, r=r: F.multilabel_margin_loss(
        a, torch.tensor([[0, 2, -1], [1, -1, 0], [2, 1, 0], [-1, 1, 2]]), reduction=r), (x,),
        id=f"multilabel_margin_loss-{r}") for r in ("mean", "sum", "none")],
    Case("multilabel_margin_loss", lambda a: F.multilabel_margin_loss(
        a, torch.tensor([3, 1, -1, 0, 0, 0]), reduction="none"), (v,),
        id="multilabel_margin_loss-1d"),
    Case("triplet_margin_with_distance_loss", lambda a: F.triplet_margin_with_distance_loss(
        a, a.flip(0), a ** 2, swap=True, margin=2.0), (x,)),
    Case("triplet_margin_with_distance_loss", lambda a: F.triplet_margin_with_distance_loss(
        a, a.flip(1), a.roll(1, 0), distance_function=lambda p, q: (p - q).abs().sum(-1),
        reduction="none"), (x,), id="triplet_margin_with_distance_loss-fn"),
]
