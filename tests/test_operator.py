"""The matrix-free operator: products equal those with the one-hot reference Jacobian (and with
sparsejac's own CSR) on random einsum problems, repeated letters and broadcasting included."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
from hypothesis import given, settings, strategies as st

import sparsejac
from reference import onehot_jacobian
from strategies import einsum_problems, operands_for


def close(got, ref, dtype):
    """Equal up to rounding: the products sum in a different order from the reference's."""
    tol = 1e-5 if np.dtype(dtype) in (np.float32, np.complex64) else 1e-12
    scale = max(1.0, float(np.max(np.abs(ref), initial=0.0)))
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * scale)


def check_operator(subscripts, shapes, dtype, seed):
    operands = operands_for(shapes, dtype, seed)
    rng = np.random.default_rng(seed + 1)
    z = np.einsum(subscripts, *operands)
    for k in range(len(operands)):
        ref = onehot_jacobian(subscripts, operands, k).reshape(z.size, operands[k].size)
        A = sparsejac.linear_operator(subscripts, *operands, wrt=k)
        assert A.shape == ref.shape
        assert A.dtype == z.dtype

        def vec(*shape):
            x = rng.standard_normal(shape)
            if np.dtype(dtype).kind == "c":
                x = x + 1j * rng.standard_normal(shape)
            return x.astype(dtype)

        v, u = vec(A.shape[1]), vec(A.shape[0])
        V, U = vec(A.shape[1], 3), vec(A.shape[0], 2)
        jv = A.matvec(v)
        assert jv.shape == (A.shape[0],) and jv.dtype == z.dtype
        close(jv, ref @ v, dtype)
        close(A @ v, ref @ v, dtype)
        jtu = A.rmatvec(u)
        assert jtu.shape == (A.shape[1],) and jtu.dtype == z.dtype
        close(jtu, ref.conj().T @ u, dtype)
        close(A.matmat(V), ref @ V, dtype)
        close(A.rmatmat(U), ref.conj().T @ U, dtype)
        close(A.H @ u, ref.conj().T @ u, dtype)
        close(A.T @ u, ref.T @ u, dtype)
        # The operator and the materialised Jacobian are the same matrix.
        J = sparsejac.jacobian(subscripts, *operands, wrt=k, format="csr")
        close(A @ v, J @ v, dtype)


@given(einsum_problems(), st.integers(0, 2**32 - 2))
def test_products_float64(problem, seed):
    check_operator(*problem, np.float64, seed)


@settings(max_examples=max(settings().max_examples // 3, 10))
@given(einsum_problems(max_operands=3), st.integers(0, 2**32 - 2))
def test_products_float32(problem, seed):
    check_operator(*problem, np.float32, seed)


@settings(max_examples=max(settings().max_examples // 3, 10))
@given(einsum_problems(max_operands=3), st.integers(0, 2**32 - 2))
def test_products_complex128(problem, seed):
    check_operator(*problem, np.complex128, seed)


@pytest.mark.parametrize(
    "subscripts, shapes",
    [
        ("ii,ij->j", [(3, 3), (3, 2)]),  # a repeated letter: the adjoint writes a diagonal
        ("iij->ij", [(2, 2, 3)]),
        ("ii->", [(4, 4)]),  # the trace: one operand, no factor
        ("ij,jk->ik", [(3, 1), (4, 5)]),  # size-1 dimension of x broadcasts over j
        ("...i,...i->...", [(1, 3), (2, 3)]),  # broadcast under the ellipsis
        ("ij->", [(3, 4)]),  # letters only the operand carries: the same gradient along them
        (",i->i", [(), (3,)]),  # scalar operand
        ("abcd,efd->", [(2, 3, 2, 4), (3, 2, 4)]),
    ],
)
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
def test_named_cases(subscripts, shapes, dtype):
    check_operator(subscripts, shapes, dtype, seed=7)


def test_diagonal_is_written_not_summed():
    A = sparsejac.linear_operator("ii,ij->j", np.eye(3), np.arange(6.0).reshape(3, 2))
    g = A.rmatvec(np.array([1.0, 10.0])).reshape(3, 3)
    # d z[j] / d x[i, i] = w[i, j]: g[i, i] = sum_j w[i, j] u[j]; off-diagonal exactly 0.
    np.testing.assert_array_equal(np.diag(g), [10.0, 32.0, 54.0])
    assert np.count_nonzero(g - np.diag(np.diag(g))) == 0


def test_complex_convention():
    """matvec is J @ v, rmatvec is J^H @ u (conjugated), as scipy's LinearOperator defines."""
    x = np.array([[1 + 2j, 3 - 1j]])
    w = np.array([[2 - 1j], [1j]])
    A = sparsejac.linear_operator("ij,jk->ik", x, w)
    J = sparsejac.jacobian("ij,jk->ik", x, w, format="csr").toarray()
    u = np.array([1 + 1j])
    v = np.array([1j, 2.0])
    np.testing.assert_allclose(A @ v, J @ v, rtol=0, atol=1e-15)
    np.testing.assert_allclose(A.rmatvec(u), J.conj().T @ u, rtol=0, atol=1e-15)
    assert not np.allclose(A.rmatvec(u), J.T @ u)  # the conjugate matters here


def test_real_operator_complex_vector():
    x, w = np.ones((2, 3)), np.arange(12.0).reshape(3, 4)
    A = sparsejac.linear_operator("ij,jk->ik", x, w)
    J = sparsejac.jacobian("ij,jk->ik", x, w, format="csr").toarray()
    v = np.arange(6) * (1 + 2j)
    u = np.arange(8) * (2 - 1j)
    np.testing.assert_allclose(A @ v, J @ v, rtol=1e-14)
    np.testing.assert_allclose(A.rmatvec(u), J.T @ u, rtol=1e-14)


def test_wrong_length_is_refused():
    A = sparsejac.linear_operator("ij,jk->ik", np.ones((2, 3)), np.ones((3, 4)))
    with pytest.raises(ValueError):
        A.matvec(np.ones(5))
    with pytest.raises(ValueError):
        A.rmatvec(np.ones(6))


def test_errors_are_sparsejac_errors():
    with pytest.raises(sparsejac.SubscriptError):
        sparsejac.linear_operator("ij,jk->iq", np.ones((2, 3)), np.ones((3, 4)))
    with pytest.raises(sparsejac.ShapeError):
        sparsejac.linear_operator("ij,jk->ik", np.ones((2, 3)), np.ones((4, 4)))
    with pytest.raises(sparsejac.ArgumentError):
        sparsejac.linear_operator("ij,jk->ik", np.ones((2, 3)), np.ones((3, 4)), wrt=2)


@pytest.mark.parametrize("wrt", [(0, 1), [1], (0,)])
def test_a_tuple_wrt_is_refused_as_one_operand_per_operator(wrt):
    with pytest.raises(sparsejac.ArgumentTypeError) as info:
        sparsejac.linear_operator("ij,jk->ik", np.ones((2, 3)), np.ones((3, 4)), wrt=wrt)
    message = str(info.value)
    assert "one operand" in message and f"wrt={wrt!r}" in message
    assert "tuple of ints" not in message  # a tuple of ints is what it was given


def test_a_wrong_wrt_is_named():
    with pytest.raises(sparsejac.ArgumentTypeError, match=r"got float 1\.0$"):
        sparsejac.linear_operator("ij,jk->ik", np.ones((2, 3)), np.ones((3, 4)), wrt=1.0)
    with pytest.raises(sparsejac.ArgumentTypeError, match=r"got float 1\.0 in wrt=\(0, 1\.0\)"):
        sparsejac.jacobian("ij,jk->ik", np.ones((2, 3)), np.ones((3, 4)), wrt=(0, 1.0))


def test_gauss_newton_step_with_lsqr():
    """The README's example: one Gauss-Newton step for min ||x @ w - y|| over x solves the
    linear least-squares problem exactly (the residual is linear in x)."""
    rng = np.random.default_rng(0)
    x_true = rng.standard_normal((20, 8))
    w = rng.standard_normal((8, 30))
    y = x_true @ w
    x = np.zeros_like(x_true)
    A = sparsejac.linear_operator("ij,jk->ik", x, w)
    r = (x @ w - y).ravel()
    step = scipy.sparse.linalg.lsqr(A, -r, atol=1e-14, btol=1e-14, iter_lim=500)[0]
    x = x + step.reshape(x.shape)
    np.testing.assert_allclose(x, x_true, rtol=1e-8, atol=1e-8)
    # cg on the normal equations gives the same step.
    N = A.H @ A
    step2, info = scipy.sparse.linalg.cg(N, -(A.H @ r), rtol=1e-13, maxiter=500)
    assert info == 0
    np.testing.assert_allclose(step2, step, rtol=1e-6, atol=1e-6)


def test_operands_are_not_copied():
    x = np.ones((50, 60))
    w = np.ones((60, 70))
    A = sparsejac.linear_operator("ij,jk->ik", x, w)
    assert np.shares_memory(A.operands[0], x) and np.shares_memory(A.operands[1], w)


@pytest.mark.parametrize(
    "call, arg, words",
    [
        (lambda A: A.matvec, np.ones(5), r"matvec needs a vector of length 6, got shape \(5,\)"),
        (lambda A: A.matvec, np.ones((6, 2, 2)), r"matvec needs a vector of length 6"),
        (lambda A: A.rmatvec, np.ones(3), r"rmatvec needs a vector of length 8"),
        (lambda A: A.__matmul__, np.ones(7), r"matvec needs a vector of length 6"),
        (lambda A: A.matmat, np.ones((5, 2)), r"matmat needs a block of shape \(6, k\)"),
        (lambda A: A.H.matvec, np.ones(6), r"matvec needs a vector of length 8"),
        (lambda A: A.H.rmatmat, np.ones((8, 2)), r"rmatmat needs a block of shape \(6, k\)"),
    ],
)
def test_wrong_vector_lengths_are_shape_errors(call, arg, words):
    A = sparsejac.linear_operator("ij,jk->ik", np.ones((2, 3)), np.ones((3, 4)))
    with pytest.raises(sparsejac.ShapeError, match=r"'ij,jk->ik': " + words):
        call(A)(arg)
    # The right lengths still work, through every entry point.
    assert A.matvec(np.ones(6)).shape == (8,) and (A @ np.ones((6, 2))).shape == (8, 2)
    assert A.H.matvec(np.ones(8)).shape == (6,) and A.rmatmat(np.ones((8, 3))).shape == (6, 3)
