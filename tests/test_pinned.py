"""Hand-picked cases: the note's four patterns and the behaviours issue 2 names."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import sparse
import torch

import sparsejac
from reference import onehot_jacobian, torch_jacobian

RNG = np.random.default_rng(1234)

PATTERNS = {
    "ij,jk->ik": [(6, 5), (5, 4)],
    "bij,bjk->bik": [(3, 4, 5), (3, 5, 2)],
    "bchwkt,fckt->bfhw": [(2, 3, 5, 4, 2, 3), (4, 3, 2, 3)],
    "abcd,efd->": [(2, 3, 2, 4), (3, 2, 4)],
}


@pytest.mark.parametrize("subscripts", list(PATTERNS))
@pytest.mark.parametrize("method", ["direct", "embed"])
def test_note_patterns_against_torch(subscripts, method):
    operands = [RNG.standard_normal(s) for s in PATTERNS[subscripts]]
    for k in range(len(operands)):
        ref = torch_jacobian(subscripts, operands, k)
        assert ref is not None
        J = sparsejac.jacobian(subscripts, *operands, wrt=k, method=method)
        np.testing.assert_allclose(J.todense(), ref, rtol=1e-12, atol=1e-12)


def test_matmul_closed_form():
    """The closed form of docs/how-it-works.md, "## 1. One einsum", for a matmul:
    J[i,k,m,n] = delta(i,m) w[n,k], nnz = I*J*K."""
    x, w = RNG.standard_normal((4, 3)), RNG.standard_normal((3, 5))
    J = sparsejac.jacobian("ij,jk->ik", x, w)
    assert J.nnz == 4 * 3 * 5
    expected = np.einsum("im,nk->ikmn", np.eye(4), w)
    np.testing.assert_array_equal(J.todense(), expected)


def test_abcd_efd_sums_letters_only_the_other_operand_carries():
    x, w = RNG.standard_normal((2, 3, 2, 4)), RNG.standard_normal((3, 2, 4))
    J = sparsejac.jacobian("abcd,efd->", x, w, wrt=0)
    assert J.shape == x.shape and J.nnz == x.size
    np.testing.assert_allclose(J.todense(), np.broadcast_to(w.sum((0, 1)), x.shape))


@pytest.mark.parametrize(
    "subscripts, shapes",
    [
        ("ii,ij->j", [(3, 3), (3, 4)]),  # diagonal of the operand
        ("ii", [(4, 4)]),  # trace, implicit scalar output
        ("i...i", [(2, 3, 2)]),  # repeated letter across an ellipsis
        ("...ij,...jk", [(2, 1, 3, 4), (5, 4, 2)]),  # batch broadcasting, implicit output
        ("ij,ij->ij", [(1, 3), (2, 3)]),  # size-1 broadcast of a named letter
        ("Ab,bA", [(2, 3), (3, 2)]),  # upper-case letters
        (" i j , j k -> i k ", [(2, 3), (3, 4)]),  # spaces ignored
        (",->", [(), ()]),  # scalars
        ("i,->i", [(3,), ()]),
        ("ij,jk->ik", [(0, 3), (3, 4)]),  # zero-size dimension
        ("ij,jk->ik", [(2, 0), (0, 4)]),  # empty contraction
        ("abc,cd,de,ef->af", [(2, 2, 3), (3, 2), (2, 3), (3, 2)]),  # four operands
    ],
)
def test_grammar_cases(subscripts, shapes):
    operands = [RNG.standard_normal(s) for s in shapes]
    for k in range(len(operands)):
        ref = onehot_jacobian(subscripts, operands, k)
        for fmt in ("coo", "csr", "csc"):
            J = sparsejac.jacobian(subscripts, *operands, wrt=k, format=fmt)
            got = J.todense() if fmt == "coo" else J.toarray().reshape(ref.shape)
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_dtypes_follow_numpy():
    x32, w32 = np.ones((2, 3), np.float32), np.ones((3, 4), np.float32)
    assert sparsejac.jacobian("ij,jk->ik", x32, w32).dtype == np.float32
    assert sparsejac.jacobian("ij,jk->ik", x32, w32.astype(np.float64)).dtype == np.float64
    xc = RNG.standard_normal((2, 3)) + 1j * RNG.standard_normal((2, 3))
    w = RNG.standard_normal((3, 4))
    J = sparsejac.jacobian("ij,jk->ik", xc, w, wrt=1, format="csr")
    assert J.dtype == np.complex128
    np.testing.assert_allclose(J.toarray().reshape(2, 4, 3, 4), onehot_jacobian("ij,jk->ik", [xc, w], 1))
    xi = np.arange(6).reshape(2, 3)
    assert sparsejac.jacobian("ij,jk->ik", xi, np.ones((3, 4), int), wrt=0).dtype == np.result_type(xi)


def test_operand_kinds_readonly_broadcast_lists_torch():
    x = RNG.standard_normal((3, 4))
    x.setflags(write=False)
    w = np.broadcast_to(RNG.standard_normal((4, 1)), (4, 5))  # zero-stride view
    ref = onehot_jacobian("ij,jk->ik", [x, np.array(w)], 0)
    np.testing.assert_allclose(sparsejac.jacobian("ij,jk->ik", x, w).todense(), ref)
    np.testing.assert_allclose(sparsejac.jacobian("ij,jk->ik", x.tolist(), w.tolist()).todense(), ref)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(np.array(w)).to(torch.float32)
    J = sparsejac.jacobian("ij,jk->ik", tx, tw)
    assert J.dtype == np.float64
    np.testing.assert_allclose(J.todense(), ref, rtol=1e-6)
    # A conjugated (lazy) torch view is resolved, not silently ignored.
    y = RNG.standard_normal((4, 5))
    tc = torch.tensor(y + 1j * y).conj()
    Jc = sparsejac.jacobian("ij,jk->ik", x, tc, wrt=0)
    np.testing.assert_allclose(Jc.todense(), onehot_jacobian("ij,jk->ik", [x, y - 1j * y], 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_are_copied_to_host():
    x, w = torch.randn(3, 4, device="cuda"), torch.randn(4, 2, device="cuda")
    J = sparsejac.jacobian("ij,jk->ik", x, w)
    np.testing.assert_allclose(J.todense(), onehot_jacobian("ij,jk->ik", [x.cpu().numpy(), w.cpu().numpy()], 0))


def test_wrt_tuple_and_negative():
    x, w = RNG.standard_normal((2, 3)), RNG.standard_normal((3, 4))
    Jx, Jw = sparsejac.jacobian("ij,jk->ik", x, w, wrt=(0, -1))
    np.testing.assert_allclose(Jx.todense(), onehot_jacobian("ij,jk->ik", [x, w], 0))
    np.testing.assert_allclose(Jw.todense(), onehot_jacobian("ij,jk->ik", [x, w], 1))
    assert sparsejac.jacobian("ij,jk->ik", x, w, wrt=np.int64(1)).shape == (2, 4, 3, 4)


def test_numeric_zeros_stay_stored_and_nan_propagates():
    x, w = np.ones((2, 3)), np.zeros((3, 4))
    w[0, 0] = np.nan
    w[1, 1] = np.inf
    J = sparsejac.jacobian("ij,jk->ik", x, w, format="csr")
    assert J.nnz == 2 * 3 * 4  # the pattern ignores the values
    dense = J.toarray().reshape(2, 4, 2, 3)
    assert np.isnan(dense[0, 0, 0, 0]) and np.isinf(dense[1, 1, 1, 1])
    assert (J.data == 0).sum() == J.nnz - 4


def test_result_types():
    x, w = np.ones((2, 3)), np.ones((3, 4))
    assert isinstance(sparsejac.jacobian("ij,jk->ik", x, w), sparse.COO)
    assert isinstance(sparsejac.jacobian("ij,jk->ik", x, w, format="csr"), scipy.sparse.csr_array)
    assert isinstance(sparsejac.jacobian("ij,jk->ik", x, w, format="csc"), scipy.sparse.csc_array)
