"""Operations reached beyond the hand-written rules: torch's reference implementations, the
decompositions written here, placements, selections by returned indices, and the dense blocks
of batched linear algebra; each against torch's Jacobian in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sparsejac
from sparsejac.errors import UnsupportedOperationError

D = torch.float64
G = torch.Generator().manual_seed(0)
X = torch.randn(5, 3, dtype=D, generator=G)
V = torch.randn(5, dtype=D, generator=G)
W = torch.randn(5, dtype=D, generator=G)
A = torch.randn(4, 3, 3, dtype=D, generator=G) + 3 * torch.eye(3, dtype=D)
B = torch.randn(4, 3, dtype=D, generator=G)
IDX = torch.tensor([0, 2, 0, 4])

CASES = {
    # torch's references (rules/tables.py)
    "addcmul": (lambda v: torch.addcmul(v, v, W, value=0.5), V),
    "Tensor.addcdiv": (lambda v: v.addcdiv(W, W.abs() + 1), V),
    "logaddexp": (lambda v: torch.logaddexp(v, W), V),
    "clamp_min": (lambda v: torch.clamp_min(v, 0.1), V),
    "linalg.cross": (lambda x: torch.linalg.cross(x, x.flip(0)), X),
    "block_diag": (lambda v: torch.block_diag(v.reshape(1, 5), W.reshape(5, 1)), V),
    # written with registered operations (rules/composite.py)
    "diff": (lambda v: torch.diff(v), V),
    "diff n=2 prepend": (lambda v: torch.diff(v, n=2, prepend=v[:1] ** 2), V),
    "diff dim=0": (lambda x: torch.diff(x, dim=0), X),
    "kron": (lambda x: torch.kron(x, x[:2, :2]), X),
    "trapezoid x": (lambda x: torch.trapezoid(x, torch.tensor([0.0, 1, 3], dtype=D)), X),
    "cumulative_trapezoid dx": (lambda x: torch.cumulative_trapezoid(x, dx=0.5, dim=0), X),
    "nansum": (lambda x: torch.nansum(x, 0), X),
    "logcumsumexp": (lambda x: torch.logcumsumexp(x, 1), X),
    "cartesian_prod": (lambda v: torch.cartesian_prod(v, v[:2]), V),
    "view_copy": (lambda x: torch.view_copy(x, (3, 5)), X),
    # placements (rules/scatter.py)
    "index_add": (lambda x: torch.index_add(x, 0, IDX, x[:4] ** 2), X),
    "index_add alpha": (lambda x: x.index_add(0, IDX, x[:4] * 3, alpha=0.5), X),
    "index_copy": (lambda x: torch.index_copy(x, 0, torch.tensor([1, 3]), x[:2] ** 2), X),
    "index_put": (lambda x: torch.index_put(x, (torch.tensor([0, 2]), torch.tensor([1, 1])),
                                            x[0, :2] * 5), X),
    "index_put accumulate": (lambda x: torch.index_put(x, (torch.tensor([0, 0]),), x[1:3] * 5,
                                                       accumulate=True), X),
    "scatter_add": (lambda x: torch.scatter_add(x, 0, torch.tensor([[0, 1, 2], [0, 1, 2]]),
                                                x[1:3] * 2), X),
    "scatter src": (lambda x: torch.scatter(x, 1, torch.tensor([[2], [0]]), x[:2, :1] ** 2), X),
    "scatter value": (lambda x: torch.scatter(x, 1, torch.tensor([[2], [0]]), 3.0), X),
    "masked_scatter": (lambda x: x.masked_scatter(x > 0, x.flip(0) * 2), X),
    # selections by the indices torch returns (rules/order.py)
    "sort": (lambda x: torch.sort(x, 1).values, X),
    "sort descending": (lambda x: x.sort(0, descending=True)[0], X),
    "topk": (lambda x: torch.topk(x, 2).values, X),
    "kthvalue keepdim": (lambda x: torch.kthvalue(x, 2, 1, keepdim=True)[0], X),
    "msort": (torch.msort, X),
    # dense blocks of batched linear algebra (rules/blocks.py)
    "linalg.inv": (torch.linalg.inv, A),
    "Tensor.inverse": (lambda a: a.inverse(), A),
    "linalg.solve vectors": (lambda a: torch.linalg.solve(a, B), A),
    "linalg.solve rhs": (lambda b: torch.linalg.solve(A, b), B),
    "linalg.solve both": (lambda a: torch.linalg.solve(a, a[..., 0] * 2), A),
    "linalg.det": (torch.linalg.det, A),
    "slogdet": (lambda a: torch.linalg.slogdet(a).logabsdet, A),
    "cholesky": (lambda a: torch.linalg.cholesky(a @ a.transpose(-1, -2)), A),
    "matrix_exp": (torch.linalg.matrix_exp, A),
    "eigvalsh": (lambda a: torch.linalg.eigvalsh(a + a.transpose(-1, -2)), A),
    "pinv": (torch.linalg.pinv, A),
    "matrix_power": (lambda a: torch.linalg.matrix_power(a, 3), A),
    "inv unbatched": (torch.linalg.inv, A[0]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_against_torch(name):
    fn, x = CASES[name]
    J = sparsejac.jacobian_of(fn, x)
    ref = torch.func.jacrev(fn)(x).numpy()
    np.testing.assert_allclose(np.asarray(J.todense()), ref, rtol=1e-10, atol=1e-12)


def test_batched_blocks_store_one_block_per_batch_entry():
    J = sparsejac.jacobian_of(torch.linalg.inv, A)
    assert J.nnz == 4 * 9 * 9  # no entry between batch entries


def test_cdist_against_torch_autograd():
    """torch.func.jacrev's cdist Jacobian differs from torch.autograd's (and from the
    definition) where both arguments are traced; torch.autograd's is the reference."""
    fn = lambda x: torch.cdist(x, x[:2] * 2)  # noqa: E731
    J = np.asarray(sparsejac.jacobian_of(fn, X).todense())
    ref = torch.autograd.functional.jacobian(fn, X).numpy()
    np.testing.assert_allclose(J, ref, rtol=1e-10, atol=1e-12)


def test_an_overwrite_of_one_place_twice_is_refused():
    with pytest.raises(UnsupportedOperationError, match="twice"):
        sparsejac.jacobian_of(lambda x: torch.index_put(x, (torch.tensor([1, 1]),), x[:2]), X)


def test_sampling_is_not_read_as_a_reparametrisation():
    """torch defines normal's derivative in its mean as zero; its reference implementation is
    a reparametrisation, so it is not followed."""
    with pytest.raises(UnsupportedOperationError, match="normal"):
        sparsejac.jacobian_of(lambda v: torch.normal(v, 1.0), V)


RECURRENT = {
    "LSTM 2 layers bidirectional": lambda: torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True),
    "GRU batch_first": lambda: torch.nn.GRU(3, 4, batch_first=True),
    "RNN relu": lambda: torch.nn.RNN(3, 4, nonlinearity="relu"),
    "RNN without bias": lambda: torch.nn.RNN(3, 4, bias=False),
}


@pytest.mark.parametrize("name", sorted(RECURRENT))
def test_recurrent_layers(name):
    torch.manual_seed(0)
    m = RECURRENT[name]().double().eval()
    x = torch.randn(8, 2, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    fn = lambda x: m(x)[0]  # noqa: E731
    J = sparsejac.jacobian_of(fn, x)
    np.testing.assert_allclose(np.asarray(J.todense()), torch.func.jacrev(fn)(x).detach().numpy(),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell", [torch.nn.LSTMCell, torch.nn.GRUCell, torch.nn.RNNCell])
def test_recurrent_cells(cell):
    torch.manual_seed(0)
    m = cell(3, 4).double()
    fn = (lambda x: m(x)[0]) if cell is torch.nn.LSTMCell else m
    x = torch.randn(2, 3, dtype=D, generator=torch.Generator().manual_seed(2))
    J = sparsejac.jacobian_of(fn, x)
    np.testing.assert_allclose(np.asarray(J.todense()), torch.func.jacrev(fn)(x).detach().numpy(),
                               rtol=1e-10, atol=1e-12)


def test_a_recurrence_carries_terms_linear_in_its_length():
    """The paths through an LSTM's hidden and cell states to one input step merge into one
    term: at 6 steps, 21 terms (they were 15,978 when they did not)."""
    from sparsejac.programs import collect

    m = torch.nn.LSTM(3, 4).double().eval()
    x = torch.randn(6, 2, 3, dtype=D)
    c = collect.jacobian_blocks(lambda x: m(x)[0], (x,), 0, None)
    assert len(c.blocks[0]) <= 6 * 7 // 2


def test_hessians_through_batched_linear_algebra_are_refused_by_name():
    with pytest.raises(UnsupportedOperationError, match="'linalg_inv' has no second-order rule"):
        sparsejac.hessian_of(lambda a: torch.linalg.inv(a).sum(), A)
