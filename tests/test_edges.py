"""Zero-size and 0-dim tensors through jacobian_of and hessian_of: the Jacobian of a tensor with
no entries is empty (of its shape), and a scalar's dims 0 and -1 are the scalar itself."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import sparsejac  # noqa: E402

D = torch.float64


def empty(*shape):
    return torch.empty(shape, dtype=D)


def scalar():
    return torch.tensor(1.7, dtype=D)


def vector(*shape):
    return torch.randn(shape, dtype=D, generator=torch.Generator().manual_seed(0))


def jacobian(f, x):
    """torch's Jacobian: reverse mode where anything is there to differentiate, else the
    zeros of its shape (torch's own jacobian cannot stack an empty one)."""
    y = f(x)
    if y.numel() == 0 or x.numel() == 0:
        return torch.zeros(tuple(y.shape) + tuple(x.shape), dtype=D)
    return torch.func.jacrev(f)(x)


def hessian(f, x):
    if x.numel() == 0:
        return torch.zeros(tuple(x.shape) * 2, dtype=D)
    return torch.func.hessian(f)(x)


def dense(J, shape):
    got = torch.as_tensor(J.todense())
    assert tuple(got.shape) == tuple(shape)
    return got


CASES = {
    # zero-size axes: the selections' index maps and the writers divided by an axis' size
    "fliplr": (torch.fliplr, empty(0, 3)),
    "flipud": (torch.flipud, empty(3, 0)),
    "adaptive_avg_pool1d": (lambda x: F.adaptive_avg_pool1d(x, 2), empty(2, 0, 4)),
    "adaptive_avg_pool2d": (lambda x: F.adaptive_avg_pool2d(x, 2), empty(0, 2, 4, 4)),
    "glu": (lambda x: F.glu(x, 0), empty(4, 0)),
    "pad_circular": (lambda x: F.pad(x, (1, 1), mode="circular"), empty(2, 0, 4)),
    "pad_reflect": (lambda x: F.pad(x, (1, 1), mode="reflect"), empty(0, 2, 4)),
    "pad_replicate": (lambda x: F.pad(x, (1, 1), mode="replicate"), empty(0, 2, 4)),
    "pad_constant": (lambda x: F.pad(x, (1, 1)), empty(2, 0, 4)),
    "pixel_shuffle": (lambda x: F.pixel_shuffle(x, 2), empty(0, 4, 2, 2)),
    "unfold": (lambda x: F.unfold(x, 2), empty(0, 1, 3, 3)),
    "roll": (lambda x: torch.roll(x, 1, 0), empty(0, 3)),
    "tile": (lambda x: torch.tile(x, (2, 1)), empty(0, 3)),
    "repeat": (lambda x: x.repeat(2, 1), empty(0, 3)),
    "round": (torch.round, empty(0, 3)),
    "softmax": (lambda x: x.softmax(1), empty(0, 3)),
    "matmul_empty_inner": (lambda x: x.T @ x, empty(0, 3)),
    # an empty piece of a nonempty input: its terms were formed, then met the collapse
    "cat_empty_piece": (lambda x: torch.cat([x, x[:, :0]], 1) * 2, vector(2, 3)),
    "cat_empty_constant": (lambda x: torch.cat([x, empty(2, 0)], 1), vector(2, 3)),
    "index_empty": (lambda x: x[:, torch.tensor([], dtype=torch.long)], vector(2, 3)),
    # 0-dim inputs
    "mean_dim0": (lambda x: x.mean(dim=0), scalar()),
    "sum_dim_minus1": (lambda x: x.sum(-1, keepdim=True), scalar()),
    "prod_dim0": (lambda x: x.prod(0), scalar()),
    "masked_prod": (lambda x: torch.masked.prod(x, 0, mask=torch.tensor(True)), scalar()),
    "repeat_none": (lambda x: x.repeat([]), scalar()),
    "transpose": (lambda x: x.transpose(0, -1), scalar()),
}


@pytest.mark.parametrize("name", CASES)
def test_jacobian_of_edge(name):
    f, x = CASES[name]
    ref = jacobian(f, x)
    got = dense(sparsejac.jacobian_of(f, x, format="coo"), ref.shape)
    torch.testing.assert_close(got, ref)


def test_empty_argument_beside_a_full_one():
    """An empty argument has an empty Jacobian; the other's is unchanged."""
    x, e = vector(2, 3), empty(0, 3)

    def f(x, e):
        return torch.cat([x, e]).sin()

    jx, je = sparsejac.jacobian_of(f, x, e, wrt=(0, 1), format="coo")
    torch.testing.assert_close(dense(jx, (2, 3, 2, 3)), torch.func.jacrev(f)(x, e))
    assert dense(je, (2, 3, 0, 3)).numel() == 0


def test_embedding_scale_grad_by_freq():
    """torch divides each row's gradient by its count in the indices: so does the Jacobian."""
    w, idx = vector(5, 3), torch.tensor([[1, 1, 4], [1, 0, 2]])
    for kw in ({"scale_grad_by_freq": True}, {"scale_grad_by_freq": True, "padding_idx": 1}):
        def f(w, kw=kw):
            return F.embedding(idx, w, **kw)

        ref = torch.func.jacrev(f)(w)
        torch.testing.assert_close(dense(sparsejac.jacobian_of(f, w, format="coo"), ref.shape), ref)


HESSIANS = {
    "sum_scalar": (lambda x: x.sum(-1) ** 3, scalar()),
    "sum_empty": (lambda x: x.exp().sum(), empty(0, 3)),
    "mean_scalar": (lambda x: x.mean(0) ** 2, scalar()),
    "mean_empty": (lambda x: (x.mean(0) ** 2).sum(), empty(0, 3)),
    "prod_scalar": (lambda x: x.prod(0), scalar()),
    "prod_empty": (lambda x: x.prod(), empty(0, 3)),
    "prod_rows": (lambda x: x.prod(1).sum(), vector(2, 3)),
    "prod_all_with_zero": (lambda x: (x * torch.tensor([1.0, 0.0, 1.0], dtype=D)).prod(),
                           vector(3)),
    "prod_keepdim": (lambda x: x.prod(0, keepdim=True).sum(), vector(2, 3)),
    "cat_empty_piece": (lambda x: torch.cat([x, x[:0]]).prod(), vector(3)),
    "cat_scalars": (lambda x: (torch.cat([x.reshape(1), x.reshape(1)]) ** 2).sum(), scalar()),
    "cat_empty_argument": (lambda x: torch.cat([x, torch.ones(2, 3, dtype=D)]).exp().sum(),
                           empty(0, 3)),
}


@pytest.mark.parametrize("name", HESSIANS)
def test_hessian_of_edge(name):
    f, x = HESSIANS[name]
    ref = hessian(f, x)
    got = dense(sparsejac.hessian_of(f, x, format="coo"), ref.shape)
    torch.testing.assert_close(got, ref)
