"""Plans, patterns, the memory guard, index dtypes and the threaded writers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse
import sparse
from hypothesis import given, settings, strategies as st

import sparsejac
from sparsejac import backend, formats
from reference import onehot_jacobian
from strategies import einsum_problems, operands_for


def array_bytes(J):
    if isinstance(J, sparse.COO):
        return J.coords.nbytes + J.data.nbytes
    return J.data.nbytes + J.indices.nbytes + J.indptr.nbytes


@settings(max_examples=max(settings().max_examples // 4, 10))
@given(einsum_problems(max_operands=3), st.integers(0, 2**32 - 1))
def test_plan_predicts_and_refills(problem, seed):
    subscripts, shapes = problem
    a, b = operands_for(shapes, np.float64, seed), operands_for(shapes, np.float64, seed + 1)
    for k in range(len(shapes)):
        p = sparsejac.plan(subscripts, *shapes, wrt=k)
        for fmt in ("coo", "csr", "csc"):
            fresh = sparsejac.jacobian(subscripts, *b, wrt=k, format=fmt)
            assert p.nbytes(fmt, np.float64) == array_bytes(fresh)
            first = p.jacobian(*a, format=fmt)
            again = p.jacobian(*b, format=fmt)  # reuses the pattern, rewrites the values
            assert first.shape == again.shape == fresh.shape
            assert first.nnz == again.nnz == fresh.nnz == p.nnz
            pat = p.pattern(fmt)
            assert pat.dtype == np.bool_ and pat.nnz == p.nnz and pat.data.all()
            if fmt == "coo":
                assert fresh.shape == p.shape
                np.testing.assert_array_equal(again.coords, fresh.coords)
                np.testing.assert_array_equal(pat.coords, fresh.coords)
                np.testing.assert_array_equal(again.data, fresh.data)
                ref = onehot_jacobian(subscripts, a, k)
                np.testing.assert_allclose(first.todense(), ref, rtol=1e-12, atol=1e-12)
            else:
                np.testing.assert_array_equal(again.indices, fresh.indices)
                np.testing.assert_array_equal(again.indptr, fresh.indptr)
                np.testing.assert_array_equal(pat.indices, fresh.indices)
                np.testing.assert_array_equal(pat.indptr, fresh.indptr)
                np.testing.assert_array_equal(again.data, fresh.data)


@settings(max_examples=max(settings().max_examples // 4, 10))
@given(einsum_problems(max_operands=3), st.integers(0, 2**32 - 1))
def test_threaded_slabs_and_split_tables_write_the_same(problem, seed):
    """Force every write through the slab splitter (tiny slabs) and csr_pattern's head/tail
    split through cut labels (a tiny tail), and compare with the default writers."""
    subscripts, shapes = problem
    ops = operands_for(shapes, np.float64, seed)
    old, old_inner = backend.SLAB_BYTES, formats.INNER
    try:
        for k in range(len(shapes)):
            backend.SLAB_BYTES, formats.INNER = old, old_inner
            expect = [sparsejac.jacobian(subscripts, *ops, wrt=k, format=f) for f in ("coo", "csr")]
            backend.SLAB_BYTES, formats.INNER = 8, 2
            got = [sparsejac.jacobian(subscripts, *ops, wrt=k, format=f) for f in ("coo", "csr")]
            np.testing.assert_array_equal(got[0].coords, expect[0].coords)
            np.testing.assert_array_equal(got[0].data, expect[0].data)
            np.testing.assert_array_equal(got[1].indices, expect[1].indices)
            np.testing.assert_array_equal(got[1].indptr, expect[1].indptr)
            np.testing.assert_array_equal(got[1].data, expect[1].data)
    finally:
        backend.SLAB_BYTES, formats.INNER = old, old_inner


def test_split_tail_cuts_a_label_by_a_divisor():
    digits = [(512, 262144), (512, 0), (512, 1)]  # x @ w wrt x, n = 512: (i, k, j)
    head, tail = formats._split_tail(digits, 4096)
    assert head == [(512, 262144), (64, 0)] and tail == [(8, 0), (512, 1)]
    assert formats._split_tail([(10**7, 1)], 4096) == ([(2000, 5000)], [(5000, 1)])
    assert formats._split_tail([(7919, 1)], 4096) == ([], [(7919, 1)])  # prime: no cut
    assert formats._split_tail([(3, 1)], 4096) == ([], [(3, 1)])
    for digits in ([(512, 262144), (512, 0), (512, 1)], [(10**7, 1)], [(6, 5), (35, 1)]):
        head, tail = formats._split_tail(digits, 4096)
        whole = formats._ramp(digits, np.int64, backend.NUMPY)
        cut = (formats._ramp(head, np.int64, backend.NUMPY)[:, None]
               + formats._ramp(tail, np.int64, backend.NUMPY)[None, :]).ravel()
        np.testing.assert_array_equal(cut, whole)


def test_slabs_cover_exactly_once():
    for shape in [(3, 5), (1, 1, 10), (7,), (), (2, 0, 3), (4, 4, 4)]:
        hits = np.zeros(shape, dtype=int)
        for index in backend.slabs(shape, 6):
            hits[index] += 1
        assert (hits == 1).all(), shape


def test_pattern_as_least_squares_sparsity():
    """The pattern serves scipy's least_squares as jac_sparsity: fit x in x @ w = y."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3))
    x_true = rng.standard_normal((5, 4))
    y = x_true @ w
    p = sparsejac.plan("ij,jk->ik", (5, 4), (4, 3))
    result = scipy.optimize.least_squares(
        lambda flat: (flat.reshape(5, 4) @ w - y).ravel(),
        np.zeros(20),
        jac_sparsity=p.pattern("csr"),
    )
    np.testing.assert_allclose(result.x.reshape(5, 4) @ w, y, atol=1e-8)
    # The plan's Jacobian is the exact one least_squares would use.
    J = p.jacobian(result.x.reshape(5, 4), w, format="csr")
    np.testing.assert_allclose(J.toarray(), np.kron(np.eye(5), w.T))


def test_guard_refuses_huge_without_allocating():
    big = np.broadcast_to(np.float32(1), (100_000, 100_000))  # zero-stride: 4 bytes of data
    with pytest.raises(sparsejac.JacobianTooLargeError) as info:
        sparsejac.jacobian("ij,jk->ik", big, big, format="csr")
    message = str(info.value)
    assert "'ij,jk->ik'" in message
    assert "1,000,000,000,000,000 nonzeros" in message
    assert "memory limit" in message
    assert isinstance(info.value, MemoryError)


@pytest.mark.parametrize("fmt", ["coo", "csr", "csc"])
def test_guard_uses_memory_limit(fmt):
    x, w = np.ones((20, 30)), np.ones((30, 40))
    p = sparsejac.plan("ij,jk->ik", x.shape, w.shape)
    # The peak: the arrays, the factor R (here a copy of w laid out for spreading) and the
    # writers' temporaries; never less than the result itself.
    need = p.peak_nbytes(fmt, np.float64)
    assert need >= p.nbytes(fmt, np.float64)
    J = p.jacobian(x, w, format=fmt, memory_limit=need)  # exactly enough
    assert J.nnz == 20 * 30 * 40
    with pytest.raises(sparsejac.JacobianTooLargeError, match=f"{need:,} bytes"):
        sparsejac.jacobian("ij,jk->ik", x, w, format=fmt, memory_limit=need - 1)
    with pytest.raises(sparsejac.JacobianTooLargeError):
        sparsejac.jacobian("ij,jk->ik", x, w, format=fmt, method="embed", memory_limit=need)


def test_index_dtype_boundary():
    edge = 2**31 - 1
    assert formats.index_dtype(edge, (10, 10)) == np.int32
    assert formats.index_dtype(edge + 1, (10, 10)) == np.int64
    assert formats.index_dtype(10, (edge, 1)) == np.int32
    assert formats.index_dtype(10, (edge + 1, 1)) == np.int64
    # Plans of Jacobians either side of the boundary, predicted without allocating.
    # x @ w wrt x has nnz = n^2 * m: n = 2**15, m = 2 gives exactly 2**31.
    below = sparsejac.plan("ij,jk->ik", (2**15, 2), (2, 2**15 - 1))
    above = sparsejac.plan("ij,jk->ik", (2**15, 2), (2, 2**15))
    assert below.nnz < 2**31 <= above.nnz
    rows_below = below.matrix_shape[0] + 1
    assert below.nbytes("csr", np.float32) == below.nnz * (4 + 4) + rows_below * 4
    assert above.nbytes("csr", np.float32) == above.nnz * (4 + 8) + (above.matrix_shape[0] + 1) * 8
    assert below.nbytes("coo", np.float32) == below.nnz * (4 + 4 * 4)
    assert above.nbytes("coo", np.float32) == above.nnz * (4 + 8 * 4)


def test_plan_checks_shapes_and_describes_itself():
    p = sparsejac.plan("ij,jk->ik", (2, 3), (3, 4), wrt=-1)
    assert p.wrt == 1 and p.shape == (2, 4, 3, 4) and p.matrix_shape == (8, 12)
    assert "nnz=24" in repr(p)
    with pytest.raises(sparsejac.ShapeError, match=r"plan was made for shapes"):
        p.jacobian(np.ones((2, 3)), np.ones((3, 5)))


def test_plan_results_share_read_only_patterns_one_shot_results_do_not():
    """A plan's results share its index arrays, so they are read-only (an in-place edit of one
    result cannot corrupt the next); sparsejac.jacobian's results own writable arrays."""
    x, w = np.ones((2, 3)), np.arange(6.0).reshape(3, 2)
    w[0, 0] = 0
    p = sparsejac.plan("ij,jk->ik", x.shape, w.shape)
    J1 = p.jacobian(x, w, format="csr")
    with pytest.raises(ValueError, match="read-only"):
        J1.eliminate_zeros()
    J2 = p.jacobian(x, w + 1, format="csr")
    np.testing.assert_array_equal(J2.toarray(), np.kron(np.eye(2), (w + 1).T))
    assert not p.jacobian(x, w).coords.flags.writeable
    J = sparsejac.jacobian("ij,jk->ik", x, w, format="csr")
    J.eliminate_zeros()  # its own arrays
    assert J.nnz == 2 * 3 * 2 - 2


def test_embed_writes_the_same_index_dtypes_as_direct():
    ops = [np.ones((3, 4)), np.ones((4, 5))]
    for fmt in ("coo", "csr", "csc"):
        a = sparsejac.jacobian("ij,jk->ik", *ops, format=fmt)
        b = sparsejac.jacobian("ij,jk->ik", *ops, format=fmt, method="embed")
        if fmt == "coo":
            assert a.coords.dtype == b.coords.dtype == np.int32
        else:
            assert a.indices.dtype == b.indices.dtype == a.indptr.dtype == b.indptr.dtype == np.int32
    a = sparsejac.jacobian(",->", 2.0, 3.0, method="embed")
    assert a.coords.dtype == sparsejac.jacobian(",->", 2.0, 3.0).coords.dtype
