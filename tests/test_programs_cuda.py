"""Programs on a CUDA device (issue 10): the trace, the factors and the torch formats stay on
the GPU; the scipy and pydata formats are copied to the CPU once. Skipped without CUDA."""

import numpy as np
import pytest
import torch

import sparsejac

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

D = torch.float64


def mlp(w1, w2):
    return lambda x: torch.tanh(torch.tanh(x @ w1) @ w2)


@pytest.mark.parametrize("fmt", ["coo", "csr", "csc", "torch", "torch_csr"])
def test_mlp_on_the_gpu_equals_jacrev(fmt):
    g = torch.Generator().manual_seed(0)
    x, w1, w2 = (torch.randn(s, generator=g, dtype=D) for s in ((8, 5), (5, 6), (6, 3)))
    cuda = [t.cuda() for t in (x, w1, w2)]
    fn = mlp(*cuda[1:])
    J = sparsejac.jacobian_of(fn, cuda[0], format=fmt)
    ref = torch.func.jacrev(mlp(w1, w2))(x).reshape(24, 40).numpy()
    if fmt.startswith("torch"):
        assert J.device.type == "cuda"  # written on the device, never left it
    got = sparsejac.to_scipy(J.cpu() if fmt.startswith("torch") else J, out_ndim=2).toarray()
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)


def test_plan_refills_on_the_gpu():
    g = torch.Generator().manual_seed(1)
    x, x2, w1, w2 = (torch.randn(s, generator=g, dtype=D) for s in ((8, 5), (8, 5), (5, 6), (6, 3)))
    fn = mlp(w1.cuda(), w2.cuda())
    plan = sparsejac.plan_of(fn, x.cuda())
    for fmt in ("torch", "torch_csr", "csr"):
        J = plan.jacobian(x2.cuda(), format=fmt)
        if fmt.startswith("torch"):
            assert J.device.type == "cuda"
            J = J.cpu()
        ref = torch.func.jacrev(mlp(w1, w2))(x2).reshape(24, 40).numpy()
        np.testing.assert_allclose(sparsejac.to_scipy(J, out_ndim=2).toarray(), ref,
                                   rtol=1e-12, atol=1e-14)


def test_a_cnn_on_the_gpu_equals_jacrev():
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(3 * 2 * 2, 4)).to(D).eval()
    x = torch.randn(2, 2, 4, 4, dtype=D)
    ref = torch.func.jacrev(net)(x).reshape(8, 64).numpy()
    J = sparsejac.jacobian_of(net.cuda(), x.cuda(), format="torch")
    assert J.device.type == "cuda"
    np.testing.assert_allclose(sparsejac.to_scipy(J.cpu(), out_ndim=2).toarray(), ref,
                               rtol=1e-12, atol=1e-14)
