"""What the registry test (tests/test_rules.py) cannot check against torch.func.jacrev: the
condition number in the orders whose torch backward fails (it fills the inverse in place),
checked against the composition torch computes; and the refusals of this group's rules."""

from __future__ import annotations

import pytest
import torch

import sparsejac
from sparsejac.errors import UnsupportedOperationError

D = torch.float64
A = torch.randn(2, 3, 3, dtype=D, generator=torch.Generator().manual_seed(3)) + 3 * torch.eye(
    3, dtype=D)


@pytest.mark.parametrize("p", [1, -1, float("inf"), float("-inf"), "fro"])
def test_cond_is_the_norm_of_the_matrix_times_that_of_its_inverse(p):
    got = sparsejac.jacobian_of(lambda a: torch.linalg.cond(a, p), A)
    ref = torch.func.jacrev(lambda a: torch.linalg.matrix_norm(a, p) * torch.linalg.matrix_norm(
        torch.linalg.inv(a), p))(A)
    torch.testing.assert_close(torch.as_tensor(got.todense()), ref, rtol=1e-9, atol=1e-11)
    with pytest.raises(RuntimeError):  # why the registry test cannot take torch's own
        torch.func.jacrev(lambda a: torch.linalg.cond(a, p))(A)


def test_cond_of_a_singular_matrix_is_refused_where_torch_fills_the_inverse():
    singular = torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=D))
    with pytest.raises(UnsupportedOperationError, match="linalg.cond"):
        sparsejac.jacobian_of(lambda a: torch.linalg.cond(a, 1), singular)
    # the 2-norm's ratio of singular values is followed: torch gives inf/nan there too
    sparsejac.jacobian_of(lambda a: torch.linalg.cond(a), singular + torch.eye(3, dtype=D))


def test_a_traced_quantile_level_is_refused_by_name():
    x = torch.randn(4, 3, dtype=D)
    with pytest.raises(UnsupportedOperationError, match="quantile.*'q'"):
        sparsejac.jacobian_of(lambda q: torch.quantile(x, q), torch.tensor([0.2, 0.5], dtype=D))


def test_the_second_order_of_a_norm_below_one_is_refused_by_name():
    x = torch.randn(5, dtype=D)
    with pytest.raises(UnsupportedOperationError, match="vector_norm.*0.5"):
        sparsejac.hessian_of(lambda a: torch.linalg.vector_norm(a, 0.5), x)
    H = sparsejac.hessian_of(lambda a: torch.linalg.vector_norm(a, 0), x)  # piecewise constant
    assert H.nnz == 0


def test_a_complex_spectrum_is_refused():
    x = torch.randn(4, 3, dtype=D)
    with pytest.raises(UnsupportedOperationError, match="complex"):
        sparsejac.jacobian_of(lambda a: torch.fft.irfft(a.to(torch.complex128)), x)


def test_an_fft_factor_is_one_dense_block_over_the_transformed_axes_only():
    x = torch.randn(6, 5, dtype=D)
    J = sparsejac.jacobian_of(lambda a: torch.fft.irfft(a, dim=1), x)
    # each of the 6 rows maps 5 entries to 8: no coupling between rows
    assert J.nnz <= 6 * 8 * 5
    ref = torch.func.jacrev(lambda a: torch.fft.irfft(a, dim=1))(x)
    torch.testing.assert_close(torch.as_tensor(J.todense()), ref, rtol=1e-9, atol=1e-11)
