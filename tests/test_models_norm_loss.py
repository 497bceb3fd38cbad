"""Models with normalisation and losses against torch.func.jacrev in float64: an MLP with
LayerNorm, a ResNet basic block with BatchNorm in eval mode, cross-entropy losses of a small
model; and derivatives in weights that torch itself does not differentiate, against a hand-
written formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsejac
from sparsejac.errors import UnsupportedOperationError
from sparsejac.programs import RULES

D = torch.float64


def _close(got, ref):
    dense = got.todense() if hasattr(got, "todense") else got
    assert dense.shape == tuple(ref.shape)
    np.testing.assert_allclose(dense, ref.detach().numpy(), rtol=1e-9, atol=1e-11)


def _seeded(seed):
    torch.manual_seed(seed)


def test_mlp_with_layernorm_gelu_dropout_eval():
    _seeded(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 8),
        nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 3),
    ).to(D).eval()
    x = torch.randn(5, 6, dtype=D)
    J = sparsejac.jacobian_of(model, x)
    _close(J, torch.func.jacrev(model)(x))
    # rows of the batch do not mix: each output row depends on its own input row only
    assert J.nnz == 5 * 3 * 6


class BasicBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


@pytest.mark.skipif("conv2d" not in RULES, reason="conv2d is not registered yet")
def test_resnet_basic_block_batchnorm_eval():
    _seeded(1)
    block = BasicBlock(3).to(D)
    with torch.no_grad():
        for bn in (block.bn1, block.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    block.eval()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    J = sparsejac.jacobian_of(block, x)
    _close(J, torch.func.jacrev(block)(x))


def test_batchnorm_training_is_the_function_of_the_batch():
    _seeded(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh()).to(D)
    x = torch.randn(7, 4, dtype=D)
    model.train()
    before = model[1].running_mean.clone()
    J = sparsejac.jacobian_of(model, x)
    assert not torch.equal(before, model[1].running_mean)  # torch updated its buffers once
    ref_model = nn.Sequential(model[0], nn.BatchNorm1d(6, track_running_stats=False), nn.Tanh())
    ref_model = ref_model.to(D)
    with torch.no_grad():
        ref_model[1].weight.copy_(model[1].weight)
        ref_model[1].bias.copy_(model[1].bias)
    _close(J, torch.func.jacrev(ref_model)(x))


def _classifier(seed):
    _seeded(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).to(D)


def test_cross_entropy_of_a_model_wrt_input():
    model = _classifier(3)
    x = torch.randn(5, 6, dtype=D)
    target = torch.tensor([0, 3, 1, 2, 3])

    def loss(inp):
        return F.cross_entropy(model(inp), target, label_smoothing=0.1)

    J = sparsejac.jacobian_of(loss, x)
    _close(J, torch.func.jacrev(loss)(x))


def test_cross_entropy_of_a_model_wrt_a_weight():
    model = _classifier(4)
    x = torch.randn(5, 6, dtype=D)
    target = torch.tensor([0, 3, 1, 2, 3])
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(w):
        p = dict(params, **{"0.weight": w})
        return nn.CrossEntropyLoss(reduction="none")(torch.func.functional_call(model, p, (x,)),
                                                     target)

    w = params["0.weight"]
    J = sparsejac.jacobian_of(loss, w)
    _close(J, torch.func.jacrev(loss)(w))


# --- weights torch does not differentiate: against the formula --------------------------------


def test_nll_loss_wrt_class_weights():
    x = torch.log_softmax(torch.randn(6, 4, dtype=D), 1)
    target = torch.tensor([0, 3, 1, -100, 3, 2])
    w = torch.rand(4, dtype=D) + 0.5

    def formula(weight):
        keep = target != -100
        t = target[keep]
        picked = x[keep].gather(1, t[:, None])[:, 0]
        return -(weight[t] * picked).sum() / weight[t].sum()

    J = sparsejac.jacobian_of(lambda c: F.nll_loss(x, target, weight=c), w)
    _close(J, torch.func.jacrev(formula)(w))


def test_binary_cross_entropy_wrt_weight():
    p = torch.rand(3, 4, dtype=D) * 0.8 + 0.1
    t = torch.rand(3, 4, dtype=D)
    w = torch.rand(4, dtype=D)

    def formula(weight):
        return (-(t * torch.log(p) + (1 - t) * torch.log(1 - p)) * weight).mean()

    J = sparsejac.jacobian_of(lambda c: F.binary_cross_entropy(p, t, weight=c), w)
    _close(J, torch.func.jacrev(formula)(w))


def test_soft_margin_loss_wrt_target():
    x = torch.randn(3, 4, dtype=D)
    y = torch.randn(3, 4, dtype=D)
    J = sparsejac.jacobian_of(lambda b: F.soft_margin_loss(x, b, reduction="none"), y)
    _close(J, torch.func.jacrev(lambda b: torch.log1p(torch.exp(-x * b)))(y))


# --- refusals -------------------------------------------------------------------------------


def test_normalisation_refusals_name_the_operation():
    x = torch.randn(2, 6, dtype=D)
    with pytest.raises(UnsupportedOperationError, match="instance_norm"):
        sparsejac.jacobian_of(lambda a: torch.instance_norm(a, None, None, None, None, True,
                                                            0.1, 1e-5, False), x)
    # out= is followed as the out-of-place call (torch's autograd refuses out= outright)
    _close(sparsejac.jacobian_of(lambda a: F.normalize(a, out=torch.empty_like(a)), x),
           torch.func.jacrev(F.normalize)(x))
