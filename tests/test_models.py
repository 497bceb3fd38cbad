"""Models as people write them, against torch.func.jacrev in float64: a transformer encoder
layer, multi-head attention, finite-difference stencils written with slices, F.pad and cat, a
model w.r.t. its embedding table through torch.func.functional_call, and pytree arguments and
results (the nesting must be jacrev's).

The stored-entry rule: the stored entries of a Jacobian are its structural nonzeros, the
couplings the program makes, and no more. Where a test states a count, it is counted here
independently of both sparsejac and jacrev (from the stencil's or the model's couplings).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

import sparsejac
from sparsejac.errors import UnsupportedOperationError

D = torch.float64
RTOL, ATOL = 1e-9, 1e-11


def _sparse(x):
    return hasattr(x, "todense")


def _check(got, ref):
    """Same nesting as jacrev (containers, keys, order) and the same values, leaf by leaf.
    Returns the sparse leaves."""
    g_leaves, g_spec = pytree.tree_flatten(got, is_leaf=_sparse)
    r_leaves, r_spec = pytree.tree_flatten(ref)
    assert g_spec == r_spec, f"nesting differs:\n{g_spec}\nvs jacrev's\n{r_spec}"
    for g, r in zip(g_leaves, r_leaves):
        assert _sparse(g)
        r = r.detach().numpy()
        assert tuple(g.shape) == r.shape
        np.testing.assert_allclose(np.asarray(g.todense()), r, rtol=RTOL, atol=ATOL)
    return g_leaves


def _against_jacrev(fn, *args, wrt=0):
    ref = torch.func.jacrev(fn, argnums=wrt)(*args)
    got = sparsejac.jacobian_of(fn, *args, wrt=wrt)
    return _check(got, ref)


def _rand(*shape, seed=0):
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


def _module(cls, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(*args, **kwargs).to(D).eval()


# --- attention -------------------------------------------------------------------------


def test_transformer_encoder_layer():
    layer = _module(nn.TransformerEncoderLayer, 16, 2, dim_feedforward=32, dropout=0.1,
                    batch_first=True)
    x = _rand(2, 5, 16, seed=1)
    (J,) = _against_jacrev(layer, x)
    # every position of a sequence couples to every position of the same sequence (attention
    # and layer norm are dense within it), none across the batch
    assert J.nnz == 2 * (5 * 16) ** 2


@pytest.mark.parametrize("norm_first, activation",
                         [(True, "relu"), (False, "gelu"), (True, "gelu")])
def test_transformer_encoder_layer_variants(norm_first, activation):
    layer = _module(nn.TransformerEncoderLayer, 16, 2, dim_feedforward=32, dropout=0.1,
                    batch_first=True, norm_first=norm_first, activation=activation)
    x = _rand(2, 3, 16, seed=1)
    (J,) = _against_jacrev(layer, x)
    assert J.nnz == 2 * (3 * 16) ** 2


def test_transformer_encoder_layer_seq_first_with_padding_mask():
    layer = _module(nn.TransformerEncoderLayer, 16, 2, dim_feedforward=32, seed=2)
    x = _rand(5, 2, 16, seed=3)  # (L, N, E)
    pad = torch.tensor([[False, False, False, True, True], [False, False, False, False, True]])
    _against_jacrev(lambda x: layer(x, src_key_padding_mask=pad), x)


def test_transformer_encoder_layer_in_training_mode_is_refused():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.1, batch_first=True)
    layer = layer.to(D).train()
    with pytest.raises(UnsupportedOperationError, match="dropout"):
        sparsejac.jacobian_of(layer, _rand(2, 5, 16))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_wrt_query(batch_first):
    mha = _module(nn.MultiheadAttention, 8, 2, batch_first=batch_first, seed=4)
    query, kv = _rand(2, 3, 8, seed=5), _rand(2, 4, 8, seed=6)
    if not batch_first:  # (L, N, E): the same batch of 2 (or 4 keys) along dim 1
        query, kv = _rand(3, 2, 8, seed=5), _rand(4, 2, 8, seed=6)
    out, weights = _against_jacrev(lambda q: mha(q, kv, kv), query)
    # with key and value fixed, output position (n, l) depends on query (n, l) alone, through
    # all its features: nnz = N * L * E * E (output) and N * L * S * E (head-averaged weights)
    assert out.nnz == 2 * 3 * 8 * 8
    assert weights.nnz == 2 * 3 * 4 * 8


def test_multihead_attention_masks_no_weights():
    mha = _module(nn.MultiheadAttention, 8, 2, batch_first=True, seed=7)
    x = _rand(2, 4, 8, seed=8)
    pad = torch.tensor([[False, False, True, False], [False, False, False, False]])
    causal = torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)

    def fn(x):
        return mha(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=False)[0]

    (J,) = _against_jacrev(fn, x)
    # causal: position l reads positions <= l that are not padded, through every feature
    count = 0
    for n, l in itertools.product(range(2), range(4)):
        seen = {s for s in range(l + 1) if not pad[n, s]} | {l}  # its own query
        count += len(seen) * 8 * 8
    assert J.nnz == count


def test_sdpa_dropout_is_refused():
    q = _rand(2, 3, 4)
    with pytest.raises(UnsupportedOperationError, match="dropout_p"):
        sparsejac.jacobian_of(lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.5), q)


def test_multihead_attention_training_dropout_is_refused():
    mha = nn.MultiheadAttention(8, 2, dropout=0.2, batch_first=True).to(D).train()
    x = _rand(2, 3, 8)
    with pytest.raises(UnsupportedOperationError, match="eval"):
        sparsejac.jacobian_of(lambda x: mha(x, x, x)[0], x)


# --- finite-difference stencils -------------------------------------------------------


def laplacian_1d(u, h=0.1):
    """-u'' with u = 0 beyond both ends (Dirichlet), written with F.pad and slices."""
    p = F.pad(u, (1, 1))
    return (2 * u - p[:-2] - p[2:]) / h**2


def laplacian_1d_cat(u, h=0.1):
    """The same operator with torch.cat and slices."""
    zero = u.new_zeros(1)
    left = torch.cat([zero, u[:-1]])
    right = torch.cat([u[1:], zero])
    return (2 * u - left - right) / h**2


def laplacian_2d(u, h=0.1):
    """The 5-point Laplacian on a grid, zero outside (F.pad along each axis and slices)."""
    p = F.pad(u, (1, 1, 1, 1))
    return (4 * u - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]) / h**2


def laplacian_2d_cat(u, h=0.1):
    row, col = u.new_zeros(1, u.shape[1]), u.new_zeros(u.shape[0], 1)
    rows = torch.cat([u[1:], row]) + torch.cat([row, u[:-1]])
    cols = torch.cat([u[:, 1:], col], 1) + torch.cat([col, u[:, :-1]], 1)
    return (4 * u - rows - cols) / h**2


def _couplings(points, neighbours):
    """The stencil's couplings counted directly: each point with itself and its neighbours
    inside the grid."""
    points = list(points)
    inside = set(points)
    return sum(1 + sum(1 for q in neighbours(p) if q in inside) for p in points)


@pytest.mark.parametrize("fn", [laplacian_1d, laplacian_1d_cat])
def test_stencil_1d(fn):
    u = _rand(50, seed=9)
    (J,) = _against_jacrev(fn, u)
    count = _couplings(range(50), lambda i: (i - 1, i + 1))
    assert count == 50 + 2 * 49
    assert J.nnz == count


@pytest.mark.parametrize("fn", [laplacian_2d, laplacian_2d_cat])
def test_stencil_2d(fn):
    u = _rand(8, 8, seed=10)
    (J,) = _against_jacrev(fn, u)
    steps = ((1, 0), (-1, 0), (0, 1), (0, -1))
    count = _couplings(itertools.product(range(8), range(8)),
                       lambda p: [(p[0] + a, p[1] + b) for a, b in steps])
    assert count == 64 + 4 * 8 * 7
    assert J.nnz == count


def test_stencil_stored_entries_are_the_nonzeros_of_jacrev():
    u = _rand(8, 8, seed=11)
    J = sparsejac.jacobian_of(laplacian_2d, u)
    ref = torch.func.jacrev(laplacian_2d)(u).numpy()
    assert J.nnz == np.count_nonzero(ref)


# --- a model w.r.t. its parameters (functional_call) --------------------------------------


class BagOfTokens(nn.Module):
    """Embedding, a linear layer, summed over tokens."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 3)

    def forward(self, tokens):
        return self.lin(self.emb(tokens)).sum(-2)


TOKENS = torch.tensor([[1, 3, 3, 7, 0, 1], [2, 2, 9, 4, 5, 2]])


def test_embedding_table_as_argument():
    model = _module(BagOfTokens, seed=12)
    table = {"emb.weight": model.emb.weight.detach().clone()}

    def fn(table, tokens):
        return torch.func.functional_call(model, table, (tokens,))

    got = _check(sparsejac.jacobian_of(fn, table, TOKENS),
                 torch.func.jacrev(fn)(table, TOKENS))
    # out[b, o] reads the table rows of the distinct tokens of sequence b, all 4 features
    distinct = sum(len(set(row.tolist())) for row in TOKENS)
    assert got[0].nnz == distinct * 3 * 4


def test_functional_call_wrt_parameter_dict():
    model = _module(BagOfTokens, seed=13)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def fn(params, tokens):
        return torch.func.functional_call(model, params, (tokens,))

    got = sparsejac.jacobian_of(fn, params, TOKENS)
    ref = torch.func.jacrev(fn)(params, TOKENS)
    assert isinstance(got, dict) and list(got) == list(ref) == list(params)
    _check(got, ref)
    for name, p in params.items():
        assert tuple(got[name].shape) == (2, 3) + tuple(p.shape)


def test_functional_call_mlp_wrt_parameters_and_input():
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).to(D).eval()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def fn(params, x):
        return torch.func.functional_call(model, params, (x,))

    _against_jacrev(fn, params, _rand(3, 5, seed=15), wrt=(0, 1))


def test_functional_call_attention_wrt_parameters():
    mha = _module(nn.MultiheadAttention, 8, 2, batch_first=True, seed=16)
    params = {k: v.detach().clone() for k, v in mha.named_parameters()}

    def fn(params, x):
        return torch.func.functional_call(mha, params, (x, x, x))

    _against_jacrev(fn, params, _rand(2, 3, 8, seed=17))


# --- pytree arguments and results ------------------------------------------------------


def _outputs(x, y):
    a = torch.tanh(x) * 2
    b = (x[:, :2] * y).sum(0)
    return a, b, {"s": torch.sin(y), "p": x.T @ y}


@pytest.mark.parametrize("wrt", [0, 1, (0, 1), (1,)])
def test_tuple_and_dict_results(wrt):
    x, y = _rand(3, 4, seed=18), _rand(3, 2, seed=19)
    _against_jacrev(_outputs, x, y, wrt=wrt)


def test_pytree_arguments_wrt_both():
    def fn(layer, data):
        w, b = layer
        h = torch.tanh(data["x"] @ w.T + b)
        return {"h": h, "r": (h * data["scale"][0]).sum(), "both": [h, data["scale"][1] * 2]}

    layer = (_rand(4, 3, seed=20), _rand(4, seed=21))
    data = {"x": _rand(5, 3, seed=22), "scale": [_rand(5, 4, seed=23), _rand(2, seed=24)]}
    _against_jacrev(fn, layer, data, wrt=(0, 1))
    _against_jacrev(fn, layer, data, wrt=1)


@pytest.mark.parametrize("container", [tuple, list])
def test_sequence_argument(container):
    def fn(xs):
        return xs[0] * xs[1] + torch.cat([xs[2], xs[2]])

    xs = container([_rand(4, seed=25), _rand(4, seed=26), _rand(2, seed=27)])
    _against_jacrev(fn, xs)
