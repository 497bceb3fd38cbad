"""sparsejac.hessian_of against torch.func.hessian in float64, symmetry, and the stored-entry
rule: the union over the steps with curvature of each J_u^T W J_u term's structural nonzeros.
For the programs below (no cancellation with random arguments) that is exactly the set of
entries torch shows nonzero."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import sparsejac
from sparsejac.errors import JacobianTooLargeError, ShapeError

D = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


def check(fn, *args, wrt=0, exact_nnz=True):
    ref = torch.func.hessian(fn, argnums=wrt)(*args).detach().numpy()
    H = sparsejac.hessian_of(fn, *args, wrt=wrt, format="coo")
    dense = H.todense()
    np.testing.assert_allclose(dense, ref, rtol=1e-9, atol=1e-11)
    n = args[wrt].numel()
    M = sparsejac.hessian_of(fn, *args, wrt=wrt, format="csr")
    assert isinstance(M, scipy.sparse.csr_array) and M.shape == (n, n)
    assert M.has_canonical_format  # sorted, no duplicates
    assert (M != M.T).nnz == 0  # exactly symmetric
    pattern = M.copy()
    pattern.data[:] = 1
    assert (pattern != pattern.T).nnz == 0  # symmetric pattern
    if exact_nnz:
        assert M.nnz == np.count_nonzero(ref)
    return M


def check_blocks(fn, *args):
    """hessian_of with respect to every argument: each block against torch.func.hessian."""
    wrt = tuple(range(len(args)))
    ref = torch.func.hessian(fn, argnums=wrt)(*args)
    H = sparsejac.hessian_of(fn, *args, wrt=wrt)
    for i in wrt:
        for j in wrt:
            np.testing.assert_allclose(H[i][j].todense(), ref[i][j].detach().numpy(),
                                       rtol=1e-9, atol=1e-11)


x, W = rand(6, 4), rand(4, 3, seed=1)


def test_squared_norm_of_a_tanh_mlp_wrt_its_batch_input_is_block_diagonal():
    M = check(lambda x: (torch.tanh(x @ W) ** 2).sum(), x)
    assert M.nnz == 6 * 4 * 4  # one dense 4 x 4 block per sample


def test_squared_norm_wrt_a_weight():
    check(lambda w: (torch.tanh(x @ w) ** 2).sum(), W)


def test_rosenbrock_written_with_slices_is_tridiagonal():
    def rosen(z):
        return (100 * (z[1:] - z[:-1] ** 2) ** 2 + (1 - z[:-1]) ** 2).sum()

    n = 30
    M = check(rosen, rand(n, seed=2))
    assert M.nnz == 3 * n - 2


def test_einsum_energy():
    A = rand(4, 4, seed=3)
    check(lambda x: torch.einsum("bi,ij,bj->", torch.tanh(x), A, torch.tanh(x)), x)


def test_cross_entropy_of_logits():
    t = torch.tensor([0, 2, 1, 3, 0, 1])
    M = check(lambda z: F.cross_entropy(z, t), x)
    assert M.nnz == 6 * 4 * 4  # softmax couples the classes of one sample only


def test_log_sum_exp():
    check(lambda z: torch.logsumexp(z, dim=1).sum(), x)


def test_layer_normalised_network():
    def net(z):
        h = F.layer_norm(z @ W, (3,))
        return (torch.tanh(h) ** 2).mean()

    check(net, x)


def test_both_arguments_give_the_nested_blocks_of_torch():
    check_blocks(lambda x, w: (torch.tanh(x @ w) ** 2).sum(), x, W)


def test_a_dict_argument_gives_nested_dicts():
    fn = lambda d: (d["a"] * d["b"]).sum() + (d["a"] ** 3).sum()  # noqa: E731
    d = {"a": rand(3), "b": rand(3, seed=1)}
    ref = torch.func.hessian(fn)(d)
    H = sparsejac.hessian_of(fn, d)
    assert set(H) == {"a", "b"} and set(H["a"]) == {"a", "b"}
    for i in "ab":
        for j in "ab":
            np.testing.assert_allclose(H[i][j].todense(), ref[i][j].numpy(), atol=1e-12)


def test_piecewise_linear_steps_add_no_entries():
    # relu's second derivative is zero: the Hessian is that of the square alone, diagonal; its
    # mask is a value, so the pattern holds every diagonal entry, including masked ones
    M = check(lambda z: (torch.relu(z) ** 2).sum(), x, exact_nnz=False)
    assert M.nnz == x.numel()
    assert np.count_nonzero(M.data) == int((x > 0).sum())


def test_refusals_name_the_operation():
    with pytest.raises(ShapeError, match="scalar"):
        sparsejac.hessian_of(lambda z: z * 2, x)
    # (prod, refused here while it had no second order, now has one)
    H = sparsejac.hessian_of(lambda z: z.prod(), x, format="coo")
    torch.testing.assert_close(torch.as_tensor(H.todense()), torch.func.hessian(torch.prod)(x))


def test_memory_limit_refuses_before_work():
    with pytest.raises(JacobianTooLargeError):
        sparsejac.hessian_of(lambda z: (torch.tanh(z @ rand(64, 64)) ** 2).sum(),
                             rand(64, 64), memory_limit=10_000)


# bounded growth, so that compositions stay finite
UNARY = [torch.tanh, torch.sigmoid, torch.sin, lambda t: torch.exp(-t * t),
         lambda t: t * torch.tanh(t), F.softplus, lambda t: t / (1 + t * t), torch.relu]


@settings(max_examples=200)  # each example runs torch.func.hessian, the slow reference
@given(ops=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 10**6)), min_size=1,
                    max_size=5),
       rows=st.integers(1, 3), cols=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_random_scalar_programs(ops, rows, cols, seed):
    z0 = rand(rows, cols, seed=seed) * 0.5
    consts: dict = {}  # drawn on the first run: torch.func.hessian's vmap allows no random ops

    def const(i, *shape):
        if i not in consts:
            g = torch.Generator().manual_seed(ops[i][1])
            consts[i] = torch.randn(*shape, dtype=D, generator=g) * 0.5
        return consts[i]

    def fn(z):
        for i, (op, s) in enumerate(ops):
            kind = s % 4
            if kind == 0:
                z = UNARY[op](z)
            elif kind == 1:
                z = z @ const(i, z.shape[-1], 1 + s % 3)
            elif kind == 2 and z.shape[-1] >= 2:
                z = z[..., 1:] * z[..., :-1] if op % 2 else torch.softmax(z, -1)
            else:
                z = z * const(i, z.shape[-1]) + UNARY[op](z)
        return (z * z).sum() if ops[0][0] % 2 else torch.logsumexp(z.reshape(-1), 0)

    fn(z0)
    check(fn, z0, exact_nnz=False)


def test_a_small_cnn_wrt_its_input_and_a_conv_weight_jointly():
    """Convolution is bilinear in input and weight: its cross term, and pooling's none."""
    import torch.nn as nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
                        nn.Conv2d(3, 2, 3, padding=1, groups=1), nn.MaxPool2d(2),
                        nn.Flatten()).double()
    params = dict(net.named_parameters())

    def loss(x, w):
        out = torch.func.functional_call(net, {**params, "0.weight": w}, (x,))
        return (torch.tanh(out) ** 2).sum()

    check_blocks(loss, rand(2, 2, 4, 4), params["0.weight"].detach())


def test_conv_transpose_cross_term():
    def loss(x, w):
        return (torch.sin(F.conv_transpose1d(x, w, stride=2, padding=1)) ** 2).sum()

    check_blocks(loss, rand(2, 3, 5), rand(3, 2, 3, seed=1))


# --- terms with one entry a row: the union merged row by row (write.rows.rows_pattern) ------------


def _no_coordinates(monkeypatch):
    """Make the coordinate writer fail, so that a passing check took the row-by-row one."""
    from sparsejac.programs.write import coordinates as C

    def refuse(*args, **kwargs):
        raise AssertionError("the coordinate writer was used")

    monkeypatch.setattr(C, "write_mapped", refuse)


def test_shifted_and_strided_terms_merge_row_by_row(monkeypatch):
    """Several Hessian terms through slice maps (shifts on both axes, a stride, a product of
    two shifts): each has one entry a row, and their union is written without coordinates;
    values, symmetry and sorted rows as torch and the package's rules want them."""
    _no_coordinates(monkeypatch)

    def fn(z):
        return (((z[:, 1:] - z[:, :-1] ** 2) ** 2).sum() + torch.sin(z[1:] * z[:-1]).sum()
                + (z[::2] ** 3).sum() + torch.tanh(z[:, 2:]).sum())

    check(fn, rand(6, 7, seed=4))


def test_rosenbrock_plan_refills_row_by_row(monkeypatch):
    _no_coordinates(monkeypatch)

    def rosen(z):
        return (100 * (z[1:] - z[:-1] ** 2) ** 2 + (1 - z[:-1]) ** 2).sum()

    n = 40
    plan = sparsejac.plan_of(rosen, rand(n, seed=5), order=2)
    assert plan._blocks[0].inner.slots is not None  # the row-by-row refill
    z = rand(n, seed=6)
    H = plan.jacobian(z, format="csr")
    np.testing.assert_allclose(H.toarray(), torch.func.hessian(rosen)(z).numpy(),
                               rtol=1e-9, atol=1e-11)
    assert H.has_canonical_format and (H != H.T).nnz == 0 and H.nnz == 3 * n - 2


def test_repeated_selection_goes_by_coordinates():
    """A selection that repeats entries puts two entries of one term in a row: the row-by-row
    writer does not apply, the coordinate one sums them."""
    from sparsejac.programs.write import rows

    idx = torch.tensor([0, 2, 2, 5, 1, 0])
    fn = lambda z: (torch.tanh(z[idx]) ** 2).sum() + (z[1:] * z[:-1]).sum()  # noqa: E731
    M = check(fn, rand(7, seed=7))
    assert M.nnz == 4 + 2 * 6  # the diagonal at the 4 entries selected, the product's bands
    z = rand(7, seed=8)
    c = sparsejac.programs.collect.hessian_blocks(fn, (z,), 0, None)
    assert not rows.by_rows_applies(c.blocks[0], (7, 7), c.labels)


def test_row_by_row_writer_allocates_no_more_than_predicted():
    """The guard's prediction for the row-by-row writer bounds what it allocates (numpy's
    arrays, measured by tracemalloc; torch's tensors it reads are the terms' own)."""
    import tracemalloc

    from sparsejac.programs import collect
    from sparsejac.programs.write import choose as M
    from sparsejac.programs.write import rows

    def rosen(z):
        return (100 * (z[1:] - z[:-1] ** 2) ** 2 + (1 - z[:-1]) ** 2).sum()

    n = 200_000
    c = collect.hessian_blocks(rosen, (rand(n, seed=9),), 0, None)
    terms = c.blocks[0]
    assert rows.by_rows_applies(terms, (n, n), c.labels)
    predicted, kept = M.materialise_nbytes(terms, (n,), (n,), c.labels, D)
    tracemalloc.start()
    try:
        csr = M.materialise(terms, (n,), (n,), c.labels, D)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    result = csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes
    assert csr.nnz == 3 * n - 2 and kept >= result
    assert peak <= predicted <= 2 * peak, (peak, predicted)


# --- pairs of the same broadcast terms: contracted once (second.defer) ----------------------


def test_steps_through_one_shared_weight_contract_once():
    """tanh's pair and the square's after it are both ``J^T diag(.) J`` with ``J`` the
    batch-shared ``W``: one term, one einsum (the square's ``diag(tanh')`` folded into its
    weight), values as torch's."""
    from sparsejac.programs import collect

    fn = lambda x: (torch.tanh(x @ W) ** 2).sum()  # noqa: E731
    c = collect.hessian_blocks(fn, (x,), 0, None)
    assert len(c.blocks[0]) == 1
    check(fn, x)
    plan = sparsejac.plan_of(fn, x, order=2)
    z = rand(6, 4, seed=11)
    np.testing.assert_allclose(plan.jacobian(z, format="coo").todense(),
                               torch.func.hessian(fn)(z).numpy(), rtol=1e-9, atol=1e-11)


def test_products_of_scaled_terms_fold_their_scales():
    """A product's cross terms between two elementwise steps of shared weights (and a step
    applied twice): every scale folded, against torch."""
    W2 = rand(4, 3, seed=12)
    check(lambda x: (torch.tanh(x @ W) * torch.sin(x @ W2)).sum()
          + torch.sigmoid(torch.tanh(x @ W)).sum(), x)
    check_blocks(lambda x, w: (torch.tanh(x @ w) * torch.sin(x @ W2)).sum(), x, W)


def test_the_tape_keeps_no_step_result_alive(monkeypatch):
    """A taped step's result is freed when the program drops it (its adjoint comes from a
    hook), not kept, with its first-order terms, until the second order: at 1e6 variables
    each is 8 MB. Here the squares' results are gone when the backward pass starts, and the
    Hessian is torch's."""
    import weakref

    refs = []

    def fn(z):
        a = z[:-1] ** 2
        refs.append(weakref.ref(a))
        b = (z[1:] - a) ** 2
        refs.append(weakref.ref(b))
        return (100 * b + (1 - z[:-1]) ** 2).sum()

    z = rand(9, seed=3)
    alive = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: (
        alive.append([r() is not None for r in refs]), grad(*a, **k))[1])
    H = sparsejac.hessian_of(fn, z, format="csr")
    monkeypatch.undo()
    assert alive == [[False, False]]  # one backward pass, the squares already freed
    np.testing.assert_allclose(H.toarray(), torch.func.hessian(fn)(z).numpy(), rtol=1e-9,
                               atol=1e-11)


def test_a_merged_block_lets_its_factors_go_before_its_average(monkeypatch):
    """hessian_of's diagonal block: once written, its terms' factors are freed before the
    average with its transposed copy (at 1e6 Rosenbrock variables, 40 MB beside 40 MB)."""
    import weakref

    from sparsejac.programs.write import csrpath, merged

    refs, alive = [], []
    merge, symmetrise = merged.Merged.csr, csrpath.symmetrise

    def spy(self, terms, *a, **k):
        refs.extend(weakref.ref(t.factor) for t in terms)
        return merge(self, terms, *a, **k)

    monkeypatch.setattr(merged.Merged, "csr", spy)
    monkeypatch.setattr(csrpath, "symmetrise", lambda csr: (
        alive.append(sum(r() is not None for r in refs)), symmetrise(csr))[1])
    fn = lambda z: (100 * (z[1:] - z[:-1] ** 2) ** 2 + (1 - z[:-1]) ** 2).sum()  # noqa: E731
    z = rand(12, seed=4)
    H = sparsejac.hessian_of(fn, z, format="csr")
    monkeypatch.undo()
    assert refs and alive == [0]
    np.testing.assert_allclose(H.toarray(), torch.func.hessian(fn)(z).numpy(), rtol=1e-9,
                               atol=1e-11)
