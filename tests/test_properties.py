"""Property tests: random einsum problems, every operand, both methods, every format, against
the one-hot reference and torch's autodiff."""

from __future__ import annotations

import numpy as np
import scipy.sparse
import sparse
from hypothesis import given, settings, strategies as st

import sparsejac
from reference import onehot_jacobian, torch_jacobian
from strategies import einsum_problems, operands_for

FORMATS = ("coo", "csr", "csc")
METHODS = ("direct", "embed")


def assert_canonical(J, fmt):
    """The flags the writers set (sorted, no duplicates) are true: re-derive them."""
    if fmt == "coo":
        again = sparse.COO(J.coords, J.data, shape=J.shape)  # default flags: sorts, sums
        np.testing.assert_array_equal(again.coords, J.coords)
        np.testing.assert_array_equal(again.data, J.data)
    else:
        J.check_format(full_check=True)
        copy = J.copy()
        copy.has_sorted_indices = False
        copy.has_canonical_format = False
        copy.sum_duplicates()
        np.testing.assert_array_equal(copy.indices, J.indices)
        np.testing.assert_array_equal(copy.indptr, J.indptr)


def check_problem(subscripts, shapes, dtype, seed, use_torch=True):
    operands = operands_for(shapes, dtype, seed)
    z = np.einsum(subscripts, *operands)
    for k in range(len(operands)):
        ref = onehot_jacobian(subscripts, operands, k)
        shape = np.shape(z) + operands[k].shape
        assert ref.shape == shape
        tref = torch_jacobian(subscripts, operands, k) if use_torch else None
        if tref is not None:
            np.testing.assert_allclose(tref, ref, rtol=1e-6, atol=1e-6)
        results = {}
        for method in METHODS:
            for fmt in FORMATS:
                J = sparsejac.jacobian(subscripts, *operands, wrt=k, format=fmt, method=method)
                assert J.dtype == z.dtype, (fmt, method)
                if fmt == "coo":
                    assert J.shape == shape
                else:
                    assert J.shape == (int(np.prod(np.shape(z))), operands[k].size)
                    assert isinstance(J, scipy.sparse.sparray)
                assert_canonical(J, fmt)
                got = J.todense() if fmt == "coo" else J.toarray().reshape(shape)
                tol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-12
                np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
                results[method, fmt] = J
        # Both methods store exactly the same entries.
        for fmt in FORMATS:
            a, b = results["direct", fmt], results["embed", fmt]
            if fmt == "coo":
                np.testing.assert_array_equal(a.coords, b.coords)
            else:
                np.testing.assert_array_equal(a.indices, b.indices)
                np.testing.assert_array_equal(a.indptr, b.indptr)
            np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-6)
        # Formats agree entry for entry.
        coo = results["direct", "coo"]
        assert coo.nnz == results["direct", "csr"].nnz == results["direct", "csc"].nnz
        assert coo.nnz == sparsejac.plan(subscripts, *shapes, wrt=k).nnz


@given(einsum_problems(), st.integers(0, 2**32 - 1))
def test_random_problems_float64(problem, seed):
    check_problem(*problem, np.float64, seed)


@settings(max_examples=max(settings().max_examples // 3, 10))
@given(einsum_problems(max_operands=3), st.integers(0, 2**32 - 1))
def test_random_problems_float32(problem, seed):
    check_problem(*problem, np.float32, seed)


@settings(max_examples=max(settings().max_examples // 3, 10))
@given(einsum_problems(max_operands=3), st.integers(0, 2**32 - 1))
def test_random_problems_complex128(problem, seed):
    check_problem(*problem, np.complex128, seed)


@given(einsum_problems(), st.integers(0, 2**32 - 1))
def test_pattern_is_structural(problem, seed):
    """With every other operand all ones, the one-hot reference is nonzero exactly on the
    structural pattern (as long as no sum is empty); the pattern ignores the values."""
    subscripts, shapes = problem
    operands = [np.ones(s) for s in shapes]
    random_ops = operands_for(shapes, np.float64, seed)
    for k in range(len(shapes)):
        ref = onehot_jacobian(subscripts, operands, k)
        J = sparsejac.jacobian(subscripts, *operands, wrt=k)
        J2 = sparsejac.jacobian(subscripts, *random_ops, wrt=k)
        np.testing.assert_array_equal(J.coords, J2.coords)
        if 0 in [n for s in shapes for n in s]:
            continue  # an empty sum leaves structural entries whose value is 0
        expected = np.argwhere(ref != 0).T
        assert J.coords.shape == expected.shape
        np.testing.assert_array_equal(J.coords, expected)


def broadcast_views(operands, rng):
    """The operands as zero-stride views (some axes broadcast from length 1), some float32."""
    views = []
    for x in operands:
        index = tuple(slice(0, 1) if n > 1 and rng.random() < 0.5 else slice(None) for n in x.shape)
        base = x[index].astype(np.float32 if rng.random() < 0.5 else x.dtype)
        views.append(np.broadcast_to(base, x.shape))
    return views


@settings(max_examples=max(settings().max_examples // 4, 10))
@given(einsum_problems(), st.integers(0, 2**32 - 1))
def test_broadcast_views_equal_materialised(problem, seed):
    """Zero-stride operands (mixed dtypes too) are read without materialising their broadcast
    dimensions; the Jacobian is the one of the materialised operands."""
    subscripts, shapes = problem
    rng = np.random.default_rng(seed)
    views = broadcast_views(operands_for(shapes, np.float64, seed), rng)
    dense_ops = [np.array(v) for v in views]
    for k in range(len(shapes)):
        for fmt in FORMATS:
            a = sparsejac.jacobian(subscripts, *views, wrt=k, format=fmt)
            b = sparsejac.jacobian(subscripts, *dense_ops, wrt=k, format=fmt)
            assert a.dtype == b.dtype
            got = a.todense() if fmt == "coo" else a.toarray()
            want = b.todense() if fmt == "coo" else b.toarray()
            # A broadcast sum is formed as n * value, the materialised one term by term: equal
            # up to the rounding of the dtype (as the float32 property test allows).
            tol = 1e-5 if a.dtype == np.float32 else 1e-12
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        ref = onehot_jacobian(subscripts, dense_ops, k)
        got = sparsejac.jacobian(subscripts, *views, wrt=k).todense()
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_huge_broadcast_operand_is_not_materialised():
    """'ij,j->' wrt 1: 1e5 nonzeros; the float32 (1e5, 1e5) broadcast view must not be cast in
    full (that would be 74.5 GiB)."""
    big = np.broadcast_to(np.float32(2), (100_000, 100_000))
    J = sparsejac.jacobian("ij,j->", big, np.ones(100_000), wrt=1)
    assert J.shape == (100_000,) and J.nnz == 100_000
    np.testing.assert_allclose(J.todense(), 200_000.0)
    op = sparsejac.linear_operator("ij,j->", big, np.ones(100_000), wrt=1)
    np.testing.assert_allclose(op @ np.ones(100_000), 2e10)
