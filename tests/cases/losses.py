"""Cases for losses, in every reduction and spelling (F.op, nn module, legacy size_average /
reduce), with respect to the input and, where torch differentiates it, the target and
weights. Integer targets are constants (the variants leave them as they are)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import D, Case, rand

x, y = rand(4, 5, seed=11), rand(4, 5, seed=12)
wt = rand(4, 5, seed=13, positive=True)
prob = torch.sigmoid(rand(4, 5, seed=14)) * 0.8 + 0.1  # in (0.1, 0.9)
tgt = torch.sigmoid(rand(4, 5, seed=15))  # in (0, 1)
soft = torch.softmax(rand(4, 5, seed=16), 1)  # class probabilities
cw = rand(5, seed=17, positive=True)
idx = torch.tensor([1, 0, 4, 2])
idx_ign = torch.tensor([1, -100, 4, 2])
x4 = rand(2, 5, 3, 2, seed=18)
idx4 = torch.tensor([[[0, 1], [2, 3], [4, 0]], [[1, 1], [3, -100], [2, 4]]])
sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=D)
signs = torch.where(rand(4, 5, seed=19) > 0, 1.0, -1.0).to(D)
var = rand(4, 5, seed=20, positive=True)
labels = (rand(4, 5, seed=21) > 0).to(D)

REDUCTIONS = ("mean", "sum", "none")

CASES = []
for r in REDUCTIONS:
    CASES += [
        # regression losses, with respect to input and target (and torch 2.x's weight)
        Case("mse_loss", lambda a, b, r=r: F.mse_loss(a, b, reduction=r), (x, y), wrt=(0, 1),
             id=f"mse_loss-F-{r}"),
        Case("mse_loss", lambda a, b, c, r=r: F.mse_loss(a, b, reduction=r, weight=c),
             (x, y, wt), wrt=(0, 1, 2), id=f"mse_loss-F-weight-{r}"),
        Case("mse_loss", nn.MSELoss(reduction=r), (x, y), wrt=(0, 1), id=f"mse_loss-nn-{r}"),
        Case("l1_loss", lambda a, b, r=r: F.l1_loss(a, b, reduction=r), (x, y), wrt=(0, 1),
             id=f"l1_loss-F-{r}"),
        Case("l1_loss", nn.L1Loss(reduction=r), (x, y), wrt=(0, 1), id=f"l1_loss-nn-{r}"),
        Case("smooth_l1_loss", lambda a, b, r=r: F.smooth_l1_loss(a, b, reduction=r, beta=0.7),
             (x, y), wrt=(0, 1), id=f"smooth_l1_loss-F-{r}"),
        Case("smooth_l1_loss", nn.SmoothL1Loss(reduction=r, beta=0.0), (x, y), wrt=(0, 1),
             id=f"smooth_l1_loss-nn-beta0-{r}"),
        Case("huber_loss", lambda a, b, r=r: F.huber_loss(a, b, reduction=r, delta=0.6), (x, y),
             wrt=(0, 1), id=f"huber_loss-F-{r}"),
        Case("huber_loss", lambda a, b, c, r=r: F.huber_loss(a, b, reduction=r, weight=c),
             (x, y, wt), wrt=(0, 1, 2), id=f"huber_loss-F-weight-{r}"),
        Case("huber_loss", nn.HuberLoss(reduction=r, delta=1.5), (x, y), wrt=(0, 1),
             id=f"huber_loss-nn-{r}"),
        # classification by class indices (constants) and by class probabilities
        Case("cross_entropy", lambda a, r=r: F.cross_entropy(a, idx_ign, reduction=r), (x,),
             id=f"cross_entropy-F-{r}"),
        Case("cross_entropy", lambda a, r=r: F.cross_entropy(
            a, idx_ign, weight=cw, reduction=r, label_smoothing=0.2), (x,),
            id=f"cross_entropy-F-weight-smoothing-{r}"),
        Case("cross_entropy", lambda a, r=r: F.cross_entropy(
            a, idx, reduction=r, label_smoothing=0.3, ignore_index=2), (x,),
            id=f"cross_entropy-F-smoothing-ignore-{r}"),
        Case("cross_entropy", lambda a, r=r: F.cross_entropy(
            a, idx4, weight=cw, reduction=r, label_smoothing=0.1), (x4,),
            id=f"cross_entropy-F-spatial-{r}"),
        Case("cross_entropy", lambda a, b, r=r: F.cross_entropy(a, b, reduction=r), (x, soft),
             wrt=(0, 1), id=f"cross_entropy-F-probs-{r}"),
        Case("cross_entropy", lambda a, b, c, r=r: F.cross_entropy(
            a, b, weight=c, reduction=r, label_smoothing=0.3), (x, soft, cw), wrt=(0, 1, 2),
            id=f"cross_entropy-F-probs-weight-smoothing-{r}"),
        Case("cross_entropy", lambda a, r=r: F.cross_entropy(a, torch.tensor(3), reduction=r),
             (x[0],), id=f"cross_entropy-F-1d-{r}"),
        Case("cross_entropy", nn.CrossEntropyLoss(reduction=r, label_smoothing=0.1), (x, idx),
             variants=False, id=f"cross_entropy-nn-{r}"),
        Case("nll_loss", lambda a, r=r: F.nll_loss(a, idx_ign, weight=cw, reduction=r), (x,),
             id=f"nll_loss-F-{r}"),
        Case("nll_loss", lambda a, r=r: F.nll_loss(a, idx4, reduction=r), (x4,),
             id=f"nll_loss-F-spatial-{r}"),
        Case("nll_loss", nn.NLLLoss(reduction=r, ignore_index=0), (x, idx), variants=False,
             id=f"nll_loss-nn-{r}"),
        Case("binary_cross_entropy", lambda a, b, r=r: F.binary_cross_entropy(
            a, b, weight=cw, reduction=r), (prob, tgt), wrt=(0, 1),
            id=f"binary_cross_entropy-F-{r}"),
        Case("binary_cross_entropy", nn.BCELoss(reduction=r), (prob, tgt), wrt=(0, 1),
             id=f"binary_cross_entropy-nn-{r}"),
        Case("binary_cross_entropy_with_logits",
             lambda a, b, r=r: F.binary_cross_entropy_with_logits(a, b, reduction=r), (x, tgt),
             wrt=(0, 1), id=f"binary_cross_entropy_with_logits-F-{r}"),
        Case("binary_cross_entropy_with_logits",
             lambda a, b, c, d, r=r: F.binary_cross_entropy_with_logits(
                 a, b, weight=c, pos_weight=d, reduction=r), (x, tgt, wt, cw),
             wrt=(0, 1, 2, 3), id=f"binary_cross_entropy_with_logits-F-weights-{r}"),
        Case("binary_cross_entropy_with_logits",
             nn.BCEWithLogitsLoss(reduction=r, pos_weight=cw), (x, tgt), wrt=(0, 1),
             id=f"binary_cross_entropy_with_logits-nn-{r}"),
        Case("soft_margin_loss", lambda a, r=r: F.soft_margin_loss(a, signs, reduction=r), (x,),
             id=f"soft_margin_loss-F-{r}"),
        Case("multilabel_soft_margin_loss", lambda a, b, r=r: F.multilabel_soft_margin_loss(
            a, b, weight=cw, reduction=r), (x, labels), wrt=(0, 1),
            id=f"multilabel_soft_margin_loss-F-{r}"),
        # divergences, likelihoods, margins
        Case("kl_div", lambda a, b, r=r: F.kl_div(a, b, reduction=r), (x, tgt), wrt=(0, 1),
             id=f"kl_div-F-{r}"),
        Case("kl_div", nn.KLDivLoss(reduction=r, log_target=True), (x, y), wrt=(0, 1),
             id=f"kl_div-nn-log_target-{r}"),
        Case("poisson_nll_loss", lambda a, b, r=r: F.poisson_nll_loss(a, b, reduction=r),
             (x, tgt * 3), wrt=(0, 1), id=f"poisson_nll_loss-F-{r}"),
        Case("poisson_nll_loss", nn.PoissonNLLLoss(log_input=False, full=True, reduction=r),
             (prob, tgt * 3), wrt=(0, 1), id=f"poisson_nll_loss-nn-full-{r}"),
        Case("gaussian_nll_loss", lambda a, b, c, r=r: F.gaussian_nll_loss(
            a, b, c, full=True, reduction=r), (x, y, var), wrt=(0, 1, 2),
            id=f"gaussian_nll_loss-F-{r}"),
        Case("gaussian_nll_loss", nn.GaussianNLLLoss(reduction=r), (x, y, var[:, 0]),
             wrt=(0, 1, 2), id=f"gaussian_nll_loss-nn-homoscedastic-{r}"),
        Case("margin_ranking_loss", lambda a, b, r=r: F.margin_ranking_loss(
            a, b, sign, margin=0.1, reduction=r), (x[:, 0], y[:, 0]), wrt=(0, 1),
            id=f"margin_ranking_loss-F-{r}"),
        Case("hinge_embedding_loss", lambda a, r=r: F.hinge_embedding_loss(
            a, signs, margin=0.5, reduction=r), (x,), id=f"hinge_embedding_loss-F-{r}"),
        Case("triplet_margin_loss", lambda a, b, c, r=r: F.triplet_margin_loss(
            a, b, c, margin=2.0, reduction=r), (x, y, prob), wrt=(0, 1, 2),
            id=f"triplet_margin_loss-F-{r}"),
    ]

CASES += [
    Case("kl_div", lambda a, b: F.kl_div(a, b, reduction="batchmean"), (x, tgt), wrt=(0, 1),
         id="kl_div-F-batchmean"),
    Case("triplet_margin_loss", nn.TripletMarginLoss(margin=2.0, p=1, swap=True),
         (x, y, prob), wrt=(0, 1, 2), id="triplet_margin_loss-nn-swap"),
    # legacy flags: size_average / reduce win over reduction, as in torch
    Case("mse_loss", lambda a, b: F.mse_loss(a, b, size_average=False), (x, y), wrt=(0, 1),
         id="mse_loss-legacy-sum"),
    Case("cross_entropy", lambda a: F.cross_entropy(a, idx, reduce=False), (x,),
         id="cross_entropy-legacy-none"),
    Case("kl_div", lambda a, b: F.kl_div(a, b, size_average=False), (x, tgt), wrt=(0, 1),
         id="kl_div-legacy-sum"),
    Case("binary_cross_entropy", lambda a: F.binary_cross_entropy(a, tgt, reduce=False),
         (prob,), id="binary_cross_entropy-legacy-none"),
    # similarities
    Case("cosine_similarity", lambda a, b: F.cosine_similarity(a, b), (x, y), wrt=(0, 1),
         id="cosine_similarity-F"),
    Case("cosine_similarity", nn.CosineSimilarity(dim=0), (x, y), wrt=(0, 1),
         id="cosine_similarity-nn"),
    Case("cosine_similarity", lambda a, b: torch.cosine_similarity(a, b, dim=-1), (x, y[0]),
         wrt=(0, 1), id="cosine_similarity-torch-broadcast"),
    Case("pairwise_distance", lambda a, b: F.pairwise_distance(a, b), (x, y), wrt=(0, 1),
         id="pairwise_distance-F"),
    Case("pairwise_distance", nn.PairwiseDistance(p=1.0, keepdim=True), (x, y), wrt=(0, 1),
         id="pairwise_distance-nn"),
    Case("pairwise_distance", lambda a, b: torch.pairwise_distance(a, b, p=3), (x, y),
         wrt=(0, 1), id="pairwise_distance-torch"),
]
