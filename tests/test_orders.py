"""Orders of accumulation (sparsejac/programs/accumulate.py): forward, reverse and every cut give
torch's Jacobian (float64, against torch.func.jacrev) on narrow-output models, branching
programs and residual blocks; the order ``mode="auto"`` picks on the benchmark shapes is pinned;
plans keep their order and never rebuild on new values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsejac
from sparsejac.errors import ArgumentError, ArgumentTypeError
from sparsejac.programs import accumulate
from sparsejac.programs import collect as C

D = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


def _module(make):
    torch.manual_seed(0)
    return make().double().eval()


class Block(nn.Module):
    """torchvision's BasicBlock, as it writes it: in-place relu, ``out += identity``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


RESNET = _module(lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
                                       Block(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                       nn.Linear(4, 3)))
CNN = _module(lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                    nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                    nn.Flatten(), nn.Linear(4 * 2 * 2, 3)))
ENCODER = _module(lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True))
HEAD = _module(lambda: nn.Linear(8, 3))
MLP_HEAD = _module(lambda: nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)))
W = rand(5, 5, seed=7)


def encoder_head(x):
    return HEAD(ENCODER(x).mean(1))


def branches(x):
    """Three uses of the input and a merge, a narrow middle, a wide end."""
    h = torch.tanh(x @ W)
    a = torch.softmax(h @ h.transpose(-1, -2), -1) @ x
    z = (a + h).sum(-1, keepdim=True)
    return torch.cat([z * x, F.pad(x[:, 1:], (0, 1))], -1)


def stencil(u):
    return torch.cat([u[:1], u[2:] - 2 * u[1:-1] + u[:-2], u[-1:]]) + 0.1 * torch.tanh(u)


MODELS = {
    "resnet block + head": (RESNET, (2, 3, 8, 8)),
    "cnn": (CNN, (2, 2, 8, 8)),
    "encoder + head": (encoder_head, (2, 4, 8)),
    "mlp head": (MLP_HEAD, (4, 12)),
    "branches": (branches, (3, 5)),
    "stencil": (stencil, (9,)),
}


def _dense(J):
    return J.todense() if hasattr(J, "todense") else J


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("name", MODELS)
def test_every_order_gives_torchs_jacobian(name, mode):
    fn, shape = MODELS[name]
    x = rand(*shape, seed=1)
    ref = torch.func.jacrev(fn)(x).detach().numpy()
    J = sparsejac.jacobian_of(fn, x, mode=mode)
    np.testing.assert_allclose(_dense(J), ref, rtol=1e-10, atol=1e-12)
    assert J.nnz == np.count_nonzero(ref) or name in ("branches",)  # (cancellations there)


@pytest.mark.parametrize("name", ["resnet block + head", "encoder + head", "branches"])
def test_every_cut_gives_torchs_jacobian(name):
    """Forward over the first ``at`` steps, reverse over the rest, for every ``at``."""
    fn, shape = MODELS[name]
    x = rand(*shape, seed=2)
    ref = torch.func.jacrev(fn)(x).detach().numpy()
    n = len(_trace_steps(fn, x)[0])
    for at in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        got = _at_cut(fn, x, at)
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12, err_msg=f"cut at {at}")


def _trace_steps(fn, x):
    """``(steps, seeds, labels)`` of one trace that keeps its steps."""
    tracer, _, _, _, out_leaves, _, labels, _, _ = C.trace(fn, (x,), 0, None, steps=True)
    return tracer.steps, [tracer.terms(o) or {} for o in out_leaves], labels


def _at_cut(fn, x, at):
    """The dense Jacobian by :func:`accumulate.cut` at ``at`` (one fresh trace)."""
    orig = accumulate.plan
    try:
        accumulate.plan = lambda steps, *a, **k: accumulate.Order("cut", at, 0.0)
        return _dense(sparsejac.jacobian_of(fn, x, mode="auto"))
    finally:
        accumulate.plan = orig


@pytest.mark.parametrize("fn,shape,expected", [
    (CNN, (32, 2, 8, 8), "reverse"),            # a classifier: 3 outputs per sample
    (MLP_HEAD, (64, 12), "reverse"),
    (RESNET, (4, 3, 8, 8), "reverse"),
    (stencil, (1000,), "forward"),               # square and local: forward, as before
    (lambda x: torch.tanh(torch.tanh(x @ W) @ W), (64, 5), "forward"),  # a square MLP
    (lambda x: F.interpolate(x, scale_factor=4, mode="nearest").sum((-1, -2)) @ W[:3, :2],
     (2, 3, 4, 4), "reverse"),
])
def test_the_order_auto_picks_is_pinned(fn, shape, expected):
    plan = sparsejac.plan_of(fn, rand(*shape))
    assert plan.mode == expected


def test_the_order_on_a_dense_result_with_respect_to_parameters():
    """Parameters of a small CNN (a dense result): from the 3 outputs per sample back."""
    params = {k: v.detach() for k, v in CNN.named_parameters()}
    x = rand(4, 2, 8, 8, seed=3)

    def fn(p):
        return torch.func.functional_call(CNN, p, (x,))

    plan = sparsejac.plan_of(fn, params)
    assert plan.mode == "reverse"
    ref = torch.func.jacrev(fn)(params)
    got = plan.jacobian(params)
    for k in params:
        np.testing.assert_allclose(_dense(got[k]), ref[k].detach().numpy(), rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
def test_plans_keep_their_order_and_never_rebuild(mode):
    fn, shape = MODELS["resnet block + head"]
    plan = sparsejac.plan_of(fn, rand(*shape), mode=mode)
    chosen = plan.mode
    for seed in (4, 5, 6):
        x = rand(*shape, seed=seed)
        np.testing.assert_allclose(_dense(plan.jacobian(x)), torch.func.jacrev(fn)(x).detach().numpy(),
                                   rtol=1e-10, atol=1e-12)
    assert plan.rebuilds == 0 and plan.mode == chosen


def test_the_cost_model_prefers_forward_on_a_near_tie():
    """A square MLP costs the same in both orders up to the estimate: forward stays."""
    steps, seeds, labels = _trace_steps(lambda x: torch.tanh(x @ W) @ W, rand(8, 5))
    order = accumulate.plan(steps, seeds, labels, 40, 40)
    assert order.name == "forward" and order.at == len(steps)


def test_a_mode_that_is_not_one_is_refused():
    with pytest.raises(ArgumentError, match="mode must be one of .*'sideways'"):
        sparsejac.jacobian_of(torch.sin, rand(3), mode="sideways")
    with pytest.raises(ArgumentTypeError, match="mode must be one of .* got int"):
        sparsejac.plan_of(torch.sin, rand(3), mode=1)


def test_a_decomposition_whose_value_has_another_shape_joins_in_reverse():
    """Regression (the OpInfo census): ``vander`` of a 0-dim input gives torch's (1, N) result
    from a value of shape (N,); its terms are reshaped to the result's axes."""
    x = torch.tensor(0.7, dtype=D)
    fn = lambda x: torch.linalg.vander(x, N=3)  # noqa: E731
    for mode in ("forward", "reverse"):
        np.testing.assert_allclose(_dense(sparsejac.jacobian_of(fn, x, mode=mode)),
                                   torch.func.jacrev(fn)(x).numpy(), rtol=1e-12, atol=1e-14)
