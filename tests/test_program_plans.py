"""Traced plans (sparsejac.plan_of): refills equal one-shot Jacobians and jacrev; the kept
pattern is read-only and shared; shapes are checked; value-dependent paths rebuild; threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sparsejac
from sparsejac.errors import ArgumentTypeError, ShapeError

D = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


W1, W2 = rand(5, 7, seed=1), rand(7, 3, seed=2)


def mlp(x):
    return torch.relu(x @ W1) @ W2


def stencil(u):
    return F.pad(u[2:] - 2 * u[1:-1] + u[:-2], (1, 1)) + torch.cat([u[:1], u[1:] * 0.5])


def attention(x):
    s = torch.softmax(x @ x.transpose(-1, -2) / 2.0, dim=-1)
    return s @ x


@pytest.mark.parametrize("fn,shape", [(mlp, (6, 5)), (stencil, (12,)), (attention, (2, 4, 3))])
@pytest.mark.parametrize("fmt", ["coo", "csr", "csc", "torch", "torch_csr"])
def test_refill_equals_jacrev_on_new_values(fn, shape, fmt):
    plan = sparsejac.plan_of(fn, rand(*shape))
    for seed in (3, 4):
        x = rand(*shape, seed=seed)
        J = plan.jacobian(x, format=fmt)
        ref = torch.func.jacrev(fn)(x).numpy()
        if fmt == "coo":
            dense = J.todense()
        elif fmt.startswith("torch"):
            dense = J.to_dense().numpy().reshape(ref.shape)
        else:
            dense = J.toarray().reshape(ref.shape)
        np.testing.assert_allclose(dense, ref, rtol=1e-10, atol=1e-12)
        one_shot = sparsejac.jacobian_of(fn, x, format="csr")
        assert plan.nnz == one_shot.nnz
    assert plan.rebuilds == 0


def test_refills_share_a_read_only_pattern():
    def fn(u):
        return torch.tanh(stencil(u))

    plan = sparsejac.plan_of(fn, rand(10))
    a, b = plan.jacobian(rand(10, seed=1), format="csr"), plan.jacobian(rand(10, seed=2),
                                                                       format="csr")
    assert a.indices is b.indices or np.shares_memory(a.indices, b.indices)
    with pytest.raises(ValueError):
        a.indices[0] = 1
    assert not np.array_equal(a.data, b.data)


def test_relu_masks_are_values_not_structure():
    plan = sparsejac.plan_of(mlp, rand(6, 5))
    plan.jacobian(-rand(6, 5, seed=9))  # every relu mask flips
    assert plan.rebuilds == 0


def test_a_value_dependent_path_rebuilds_and_stays_exact():
    def fn(x):
        return x[x > 0] * 2  # the result's size depends on the values

    plan = sparsejac.plan_of(fn, rand(8))
    x = rand(8, seed=5)
    J = plan.jacobian(x, format="csr")
    assert plan.rebuilds == 1
    np.testing.assert_allclose(J.toarray(), torch.func.jacrev(fn)(x).numpy())


def test_other_shapes_or_dtypes_are_refused():
    plan = sparsejac.plan_of(mlp, rand(6, 5))
    with pytest.raises(ShapeError, match="plan traced for"):
        plan.jacobian(rand(7, 5))
    with pytest.raises(ShapeError, match="float32"):
        plan.jacobian(rand(6, 5).float())


def test_plan_properties():
    plan = sparsejac.plan_of(mlp, rand(6, 5))
    assert plan.shape == (6, 3, 6, 5) and plan.matrix_shape == (18, 30)
    assert plan.nnz == 6 * 3 * 5
    J = plan.jacobian(rand(6, 5, seed=1), format="csr")
    assert plan.nbytes("csr") == J.data.nbytes + J.indices.nbytes + J.indptr.nbytes
    assert plan.pattern("csr").nnz == plan.nnz


def test_threads_give_exact_results():
    """jacobian_of and plans from 8 threads at once: each result equals jacrev's."""
    xs = [rand(6, 5, seed=s) for s in range(16)]
    refs = [torch.func.jacrev(mlp)(x).numpy() for x in xs]
    plan = sparsejac.plan_of(mlp, xs[0])
    errors, results = [], {}

    def work(i):
        try:
            for k in range(i, len(xs), 8):
                a = sparsejac.jacobian_of(mlp, xs[k]).todense()
                b = plan.jacobian(xs[k]).todense()
                results[k] = (a, b)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(results) == list(range(len(xs)))
    for k, (a, b) in results.items():
        np.testing.assert_allclose(a, refs[k], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(b, refs[k], rtol=1e-10, atol=1e-12)


def test_hessian_plans_refill_exactly():
    w = rand(5, 4, seed=7)

    def loss(x, v):
        return (torch.tanh(x @ w) ** 2).sum() + (x[1:] * v[:-1]).sum() ** 2

    x0, v0 = rand(6, 5), rand(6, 5, seed=1)
    plan = sparsejac.plan_of(loss, x0, v0, wrt=(0, 1), order=2)
    for seed in (2, 3):
        x, v = rand(6, 5, seed=seed), rand(6, 5, seed=seed + 10)
        H = plan.jacobian(x, v, format="csr")
        ref = torch.func.hessian(loss, argnums=(0, 1))(x, v)
        for i in range(2):
            for j in range(2):
                np.testing.assert_allclose(H[i][j].toarray(), ref[i][j].reshape(30, 30).numpy(),
                                           rtol=1e-10, atol=1e-10)
        assert (H[0][0] != H[0][0].T).nnz == 0 and (H[1][0] != H[0][1].T).nnz == 0
        one_shot = sparsejac.hessian_of(loss, x, v, wrt=(0, 1), format="csr")
        assert all(H[i][j].nnz == one_shot[i][j].nnz for i in range(2) for j in range(2))
    assert plan.rebuilds == 0
    with pytest.raises(sparsejac.ArgumentError, match="order"):
        sparsejac.plan_of(loss, x0, v0, order=3)


def test_a_hessian_refill_forms_no_first_order_terms_nothing_reads(monkeypatch):
    """The square and the sum after the last tanh: their results' first-order terms feed no
    second-order rule, so a refill skips their rules (and stays exact)."""
    from sparsejac.programs import terms as T

    w = rand(5, 4, seed=7)

    def loss(x):
        return (torch.tanh(x @ w) ** 2).sum()

    plan = sparsejac.plan_of(loss, rand(6, 5), order=2)
    assert sorted(plan._dead.values()) == ["pow", "sum"]
    called = []
    for name in ("scale", "compose"):  # tanh's and the square's; the product's and the sum's
        monkeypatch.setattr(T, name, lambda *a, fn=getattr(T, name), name=name, **k: (
            called.append(name), fn(*a, **k))[1])
    x = rand(6, 5, seed=4)
    H = plan.jacobian(x, format="csr")
    assert called == ["compose", "scale"]  # x @ w and tanh only: not the square, the sum
    np.testing.assert_allclose(H.toarray(), torch.func.hessian(loss)(x).reshape(30, 30).numpy(),
                               rtol=1e-10, atol=1e-12)
    assert plan.rebuilds == 0


def test_a_path_that_reads_a_skipped_term_is_traced_again_in_full():
    """Traced where ``z``'s terms are read by nothing (its sum is linear), refilled where the
    square of ``z`` reads them: the refill sees the skipped terms asked for, traces again
    without skipping, and gives the new path's Hessian."""

    def loss(x):
        y = torch.tanh(x)
        z = y * 3.0
        if bool(x.detach().sum() > 0):
            return (z ** 2).sum()
        return z.sum() + (y ** 3).sum()

    x0 = -rand(6).abs()
    plan = sparsejac.plan_of(loss, x0, order=2)
    assert "mul" in plan._dead.values()
    x = rand(6).abs()
    H = plan.jacobian(x, format="csr")
    np.testing.assert_allclose(H.toarray(), torch.func.hessian(loss)(x).numpy(), rtol=1e-10,
                               atol=1e-12)
    H = plan.jacobian(x0, format="csr")
    np.testing.assert_allclose(H.toarray(), torch.func.hessian(loss)(x0).numpy(), rtol=1e-10,
                               atol=1e-12)


def test_nbytes_defaults_to_the_default_result_and_checks_its_dtype():
    x = rand(6, 5)
    p = sparsejac.plan_of(mlp, x)
    J = p.jacobian(x)  # the default format, as the einsum plans' default
    assert p.nbytes() == p.nbytes("coo") == J.coords.nbytes + J.data.nbytes
    assert p.nbytes("csr", np.float32) < p.nbytes("csr") == p.nbytes("csr", torch.float64)
    assert p.nbytes("csr", "float32") == p.nbytes("csr", torch.float32)
    for dtype in (object, str, torch.bool, "foo"):
        with pytest.raises(ArgumentTypeError, match=r"dtype .* is not a"):
            p.nbytes("csr", dtype)


@pytest.mark.parametrize("limit", [1e9 + 0j, np.complex128(1e9), True])
def test_memory_limit_that_is_not_a_size_is_refused_by_plans(limit):
    x = rand(6, 5)
    with pytest.raises(ArgumentTypeError, match=r"memory_limit must be a number of bytes"):
        sparsejac.plan_of(mlp, x, memory_limit=limit)
    p = sparsejac.plan_of(mlp, x, memory_limit="4GB")
    with pytest.raises(ArgumentTypeError, match=r"memory_limit must be a number of bytes"):
        p.jacobian(x, memory_limit=limit)
    assert p.jacobian(x, memory_limit=float("inf")).nnz == p.nnz


@pytest.mark.parametrize("fn,shape,order", [(mlp, (6, 5), 1), (stencil, (12,), 1),
                                            (lambda u: (torch.tanh(stencil(u)) ** 2).sum(),
                                             (12,), 2)])
@pytest.mark.parametrize("fmt", ["torch", "torch_csr"])
def test_torch_refills_warn_of_nothing(fn, shape, order, fmt, monkeypatch):
    import warnings

    # torch warns once a process, so the cause is pinned too: no read-only array is wrapped
    wrapped_read_only = []
    from_numpy = torch.from_numpy

    def spy(a):
        wrapped_read_only.append(not a.flags.writeable)
        return from_numpy(a)

    monkeypatch.setattr(torch, "from_numpy", spy)
    x = rand(*shape)
    p = sparsejac.plan_of(fn, x, order=order)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "NumPy array is not writable" among them
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        first = p.jacobian(x, format=fmt)
        again = p.jacobian(rand(*shape, seed=3), format=fmt)
    assert torch.equal(first.to_dense() != 0, again.to_dense() != 0) or p.rebuilds
    assert wrapped_read_only and not any(wrapped_read_only)
    # the kept pattern is still read-only for the scipy formats
    with pytest.raises(ValueError, match="read-only"):
        p.jacobian(x, format="csr").indices[0] = 1
