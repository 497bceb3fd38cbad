"""Edges of the placements, strided views and internal kernels added for OpInfo coverage:
products with zeros (torch's gradient, where jacrev cannot batch it), refusals where torch's
own gradient is not the derivative, and second order where it is followed or refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsejac
from sparsejac.errors import UnsupportedOperationError

D = torch.float64


def _torch_jacobian(f, x):
    return torch.autograd.functional.jacobian(f, x)  # one backward per row: no batching rule


def _ours(f, x):
    return torch.as_tensor(sparsejac.jacobian_of(f, x).todense()).reshape(
        tuple(f(x).shape) + tuple(x.shape))


@pytest.mark.parametrize("include_self", [True, False])
def test_scatter_reduce_prod_with_zeros_is_torchs_gradient(include_self):
    index = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 1, 2]])
    mask = torch.tensor([[0.0, 2, 1], [1, 0, 1], [0, 3, 1]], dtype=D)

    def f(a):
        return torch.scatter_reduce(a[:3] * 0 + a[3:].sum(0), 0, index, a[:3] * mask, "prod",
                                    include_self=include_self)

    a = torch.randn(4, 3, dtype=D)
    torch.testing.assert_close(_ours(f, a), _torch_jacobian(f, a), rtol=1e-9, atol=1e-12)


def test_index_reduce_prod_with_a_zero_in_the_input():
    def f(a):
        return torch.index_reduce(a * torch.tensor([[0.0], [1], [1]], dtype=D), 0,
                                  torch.tensor([0, 0, 2]), a ** 2, "prod")

    a = torch.randn(3, 2, dtype=D)
    torch.testing.assert_close(_ours(f, a), _torch_jacobian(f, a), rtol=1e-9, atol=1e-12)


def test_as_strided_scatter_through_its_input_is_refused():
    # torch 2.13's gradient for the input passes the written elements and drops the others
    src = torch.ones(2, dtype=D)
    with pytest.raises(UnsupportedOperationError, match="as_strided_scatter"):
        sparsejac.jacobian_of(lambda a: torch.as_strided_scatter(a, src, (2,), (2,)),
                              torch.randn(4, dtype=D))


def test_as_strided_of_an_expanded_view_is_refused():
    with pytest.raises(UnsupportedOperationError, match="share memory"):
        sparsejac.jacobian_of(lambda a: torch.as_strided(a.expand(3, 2), (2,), (1,)),
                              torch.randn(2, dtype=D))


def test_as_strided_reads_the_storage_of_a_view():
    def f(a):
        v = (a * 1)[1:, ::2]  # offset 3, strides (3, 2)
        return torch.as_strided(v, (2, 2), (4, 1), 5)

    a = torch.randn(4, 3, dtype=D)
    with pytest.raises(UnsupportedOperationError, match="outside"):
        sparsejac.jacobian_of(f, a)  # element 6 of the storage is not one of the view's

    def g(a):
        v = (a * 1)[1:, ::2]
        return torch.as_strided(v, (2,), (6,), 3)

    torch.testing.assert_close(_ours(g, a), _torch_jacobian(g, a))


def test_zero_of_a_copy_has_no_derivative():
    a = torch.randn(5, dtype=D)
    J = sparsejac.jacobian_of(lambda x: x.clone().zero_() + x[0], a).todense()
    expected = torch.zeros(5, 5, dtype=D)
    expected[:, 0] = 1
    torch.testing.assert_close(torch.as_tensor(J), expected)


def test_scatter_reduce_prod_has_no_second_order():
    index = torch.tensor([[0, 0], [1, 0]])
    with pytest.raises(UnsupportedOperationError, match="prod"):
        sparsejac.hessian_of(lambda a: torch.scatter_reduce(a, 0, index, a, "prod").sum(),
                             torch.randn(2, 2, dtype=D))


def test_scatter_reduce_amax_keeps_its_second_order():
    index = torch.tensor([[0, 0], [1, 0]])

    def f(a):
        return (torch.scatter_reduce(a, 0, index, a * 2, "amax") ** 2).sum()

    a = torch.randn(2, 2, dtype=D)
    H = torch.as_tensor(sparsejac.hessian_of(f, a).todense()).reshape(2, 2, 2, 2)
    torch.testing.assert_close(H, torch.autograd.functional.hessian(f, a))


@pytest.mark.parametrize("f", [
    lambda a: F.triplet_margin_with_distance_loss(a, a.flip(0), a ** 2, margin=5.0),
    lambda a: F.cosine_embedding_loss(a, a.flip(0) ** 2, torch.tensor([1, -1])),
    lambda a: F.linear_cross_entropy(a, a.T @ a, torch.tensor([0, 2])),
    lambda a: F.grid_sample(a.reshape(1, 1, 2, 3), a[:, :2].reshape(1, 1, 2, 2) * 0.7).sum() ** 2,
], ids=["triplet_margin_with_distance_loss", "cosine_embedding_loss", "linear_cross_entropy",
        "grid_sample"])
def test_hessians_of_decompositions(f):
    a = torch.randn(2, 3, dtype=D)
    H = torch.as_tensor(sparsejac.hessian_of(f, a).todense()).reshape(2, 3, 2, 3)
    torch.testing.assert_close(H, torch.autograd.functional.hessian(f, a))
