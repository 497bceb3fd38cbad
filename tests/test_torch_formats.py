"""format="torch" / "torch_csr": equal to the COO result, marked coalesced, on the operands'
device and dtype, with no copies of arrays that already have the right layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sparsejac
from reference import onehot_jacobian
from strategies import einsum_problems, operands_for

CUDA = torch.cuda.is_available()


def check_torch_formats(subscripts, ops, k, device="cpu"):
    coo = sparsejac.jacobian(subscripts, *[np.asarray(o) for o in ops], wrt=k)
    tensors = [torch.as_tensor(np.asarray(o), device=device) for o in ops]
    J = sparsejac.jacobian(subscripts, *tensors, wrt=k, format="torch")
    assert J.layout == torch.sparse_coo and J.is_coalesced()
    assert tuple(J.shape) == coo.shape and J.device.type == device
    assert J.dtype == torch.from_numpy(coo.data).dtype
    indices = J._indices().cpu().numpy()
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, coo.coords)
    np.testing.assert_allclose(J._values().cpu().numpy(), coo.data, rtol=1e-6)

    C = sparsejac.jacobian(subscripts, *tensors, wrt=k, format="torch_csr")
    csr = sparsejac.jacobian(subscripts, *[np.asarray(o) for o in ops], wrt=k, format="csr")
    assert C.layout == torch.sparse_csr and tuple(C.shape) == csr.shape
    assert C.device.type == device
    np.testing.assert_array_equal(C.crow_indices().cpu().numpy(), csr.indptr)
    np.testing.assert_array_equal(C.col_indices().cpu().numpy(), csr.indices)
    np.testing.assert_allclose(C.values().cpu().numpy(), csr.data, rtol=1e-6)


@settings(max_examples=max(settings().max_examples // 4, 10))
@given(einsum_problems(max_operands=3), st.integers(0, 2**32 - 1))
def test_torch_formats_equal_coo(problem, seed):
    subscripts, shapes = problem
    ops = operands_for(shapes, np.float64, seed)
    for k in range(len(shapes)):
        check_torch_formats(subscripts, ops, k)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@settings(max_examples=max(settings().max_examples // 4, 10))
@given(einsum_problems(max_operands=3), st.integers(0, 2**32 - 1))
def test_torch_formats_on_cuda_equal_coo(problem, seed):
    subscripts, shapes = problem
    ops = operands_for(shapes, np.float64, seed)
    for k in range(len(shapes)):
        check_torch_formats(subscripts, ops, k, device="cuda")


def test_torch_values_match_torch_autograd_and_keep_dtype():
    x = torch.randn(4, 3, dtype=torch.float32)
    w = torch.randn(3, 5, dtype=torch.float32)
    J = sparsejac.jacobian("ij,jk->ik", x, w, format="torch")
    assert J.dtype == torch.float32
    ref = torch.autograd.functional.jacobian(lambda t: t @ w, x)
    torch.testing.assert_close(J.to_dense(), ref)
    Jw = sparsejac.jacobian("ij,jk->ik", x, w, wrt=1, format="torch_csr")
    refw = torch.autograd.functional.jacobian(lambda t: x @ t, w).reshape(20, 15)
    torch.testing.assert_close(Jw.to_dense(), refw)


def test_no_copies_and_plan_reuse():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((6, 5)), rng.standard_normal((5, 4))
    p = sparsejac.plan("ij,jk->ik", x.shape, w.shape)
    a = p.jacobian(x, w, format="torch")
    b = p.jacobian(x, w * 2, format="torch")
    # The refill shares the index tensor and writes new values only.
    assert a._indices().data_ptr() == b._indices().data_ptr()
    torch.testing.assert_close(b._values(), 2 * a._values())
    c = p.jacobian(x, w, format="torch_csr")
    d = p.jacobian(x, w * 3, format="torch_csr")
    assert c.col_indices().data_ptr() == d.col_indices().data_ptr()
    # torch's own pattern: the same structure as the plan's.
    pat = p.pattern("torch")
    assert pat.dtype == torch.bool and pat._nnz() == p.nnz


def test_embed_method_torch_formats():
    rng = np.random.default_rng(1)
    ops = [rng.standard_normal((2, 3, 3)), rng.standard_normal((3, 4))]
    for fmt in ("torch", "torch_csr"):
        a = sparsejac.jacobian("bii,ij->bj", *ops, format=fmt)
        b = sparsejac.jacobian("bii,ij->bj", *ops, format=fmt, method="embed")
        torch.testing.assert_close(a.to_dense(), b.to_dense())
    ref = onehot_jacobian("bii,ij->bj", ops, 0)
    np.testing.assert_allclose(a.to_dense().numpy().reshape(ref.shape), ref)


@settings(max_examples=max(settings().max_examples // 4, 10))
@given(einsum_problems(max_operands=3), st.integers(0, 2**32 - 1))
def test_torch_backend_on_cpu_equals_numpy_backend(problem, seed):
    """The GPU code path (the torch backend), forced onto the CPU so that CI runs it."""
    from unittest import mock

    subscripts, shapes = problem
    ops = operands_for(shapes, np.float64, seed)
    tensors = [torch.from_numpy(o) for o in ops]
    with mock.patch("sparsejac.plan.cuda_device", lambda operands: torch.device("cpu")):
        for k in range(len(shapes)):
            coo = sparsejac.jacobian(subscripts, *ops, wrt=k)
            csr = sparsejac.jacobian(subscripts, *ops, wrt=k, format="csr")
            J = sparsejac.jacobian(subscripts, *tensors, wrt=k, format="torch")
            C = sparsejac.jacobian(subscripts, *tensors, wrt=k, format="torch_csr")
            np.testing.assert_array_equal(J._indices().numpy(), coo.coords)
            np.testing.assert_allclose(J._values().numpy(), coo.data, rtol=1e-12)
            np.testing.assert_array_equal(C.crow_indices().numpy(), csr.indptr)
            np.testing.assert_array_equal(C.col_indices().numpy(), csr.indices)
            np.testing.assert_allclose(C.values().numpy(), csr.data, rtol=1e-12)


def test_torch_backend_takes_numpy_broadcast_operands_without_expanding():
    from unittest import mock

    x = np.broadcast_to(np.arange(4.0), (3, 4))  # zero-stride rows
    w = np.arange(20.0).reshape(4, 5)
    expect = sparsejac.jacobian("ij,jk->ik", np.array(x), w, wrt=1)
    with mock.patch("sparsejac.plan.cuda_device", lambda operands: torch.device("cpu")):
        got = sparsejac.jacobian("ij,jk->ik", x, torch.from_numpy(w), wrt=1, format="torch")
    np.testing.assert_array_equal(got._indices().numpy(), expect.coords)
    np.testing.assert_allclose(got._values().numpy(), expect.data)
    from sparsejac.operands import as_tensors

    tensors, _ = as_tensors([x, w], torch.device("cpu"), "ij,jk->ik")
    assert tensors[0].stride()[0] == 0  # still a broadcast, not 3 copies
