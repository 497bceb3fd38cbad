"""jacobian_of against torch.func.jacrev in float64, and the stored-entries rule.

The rule: the stored entries are the union, over the Jacobian's terms after merging, of each
term's structural nonzeros (one per assignment of its labels). For the programs below that is
exactly the set of entries that can be nonzero for some values of the arguments, so every test
also checks that each stored entry is one of them (nnz equals the count jacrev shows nonzero with
random arguments, where values do not cancel).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse
import sparse
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import sparsejac
from sparsejac.errors import ArgumentError, ArgumentTypeError, OperandTypeError
from sparsejac.programs import UnsupportedOperationError

D = torch.float64
RTOL, ATOL = 1e-10, 1e-12  # float64 rounding of a few dozen operations


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed + 17 * len(shape) + sum(shape))
    return torch.randn(*shape, dtype=D, generator=g)


def reference(fn, args, wrt):
    return torch.func.jacrev(fn, argnums=wrt)(*args).numpy()


def check(fn, *args, wrt=0, exact_nnz=True):
    """Compare all three formats with jacrev; return the COO result."""
    ref = reference(fn, args, wrt)
    J = sparsejac.jacobian_of(fn, *args, wrt=wrt, format="coo")
    assert isinstance(J, sparse.COO)
    assert J.shape == ref.shape
    np.testing.assert_allclose(J.todense(), ref, rtol=RTOL, atol=ATOL)
    # coordinates as the flags claim: lexicographically sorted, no duplicates
    flat = np.ravel_multi_index(tuple(J.coords), J.shape) if J.ndim else np.zeros(J.nnz)
    assert np.all(np.diff(flat) > 0)
    out_size = math.prod(fn(*args).shape)
    for fmt, cls in (("csr", scipy.sparse.csr_array), ("csc", scipy.sparse.csc_array)):
        M = sparsejac.jacobian_of(fn, *args, wrt=wrt, format=fmt)
        assert isinstance(M, cls) and M.shape == (out_size, args[wrt].numel())
        assert M.nnz == J.nnz
        np.testing.assert_allclose(M.toarray(), ref.reshape(M.shape), rtol=RTOL, atol=ATOL)
    if exact_nnz:
        assert J.nnz == np.count_nonzero(ref)
    return J


# --- the programs the issue names -------------------------------------------------------------


def mlp(x, w1, b1, w2, b2):
    return torch.tanh(x @ w1 + b1) @ w2 + b2


MLP_ARGS = (rand(6, 5), rand(5, 7), rand(7), rand(7, 4), rand(4))


def test_mlp_wrt_input_is_block_diagonal_over_the_batch():
    J = check(mlp, *MLP_ARGS, wrt=0)
    b, n_in, n_out = 6, 5, 4
    assert J.nnz == b * n_out * n_in
    assert np.all(J.coords[0] == J.coords[2])  # output sample == input sample


def test_mlp_wrt_weights_and_bias():
    check(mlp, *MLP_ARGS, wrt=1)
    J1, J3 = sparsejac.jacobian_of(mlp, *MLP_ARGS, wrt=(1, 3))
    assert J1.nnz == 6 * 4 * 5 * 7  # every output sees all of w1
    assert J3.nnz == 6 * 4 * 7  # out[b, k] sees w2[:, k] only
    check(mlp, *MLP_ARGS, wrt=2)
    check(mlp, *MLP_ARGS, wrt=4)


def conv(patches, kernel):
    # a 2-D convolution written over unfolded patches: (batch, positions, c*kh*kw)
    return torch.relu(torch.einsum("blk,ok->bol", patches, kernel))


def test_convolution_over_unfolded_patches():
    image = rand(2, 3, 5, 5)
    patches = F.unfold(image, kernel_size=3).transpose(1, 2).contiguous()  # (2, 9, 27)
    kernel = rand(4, 27)
    J = check(conv, patches, kernel, wrt=0, exact_nnz=False)
    assert J.nnz == 2 * 4 * 9 * 27  # relu zeros are stored: the structure is value-free
    check(conv, patches, kernel, wrt=1, exact_nnz=False)


WQ, WK, WV = rand(4, 4, seed=1), rand(4, 4, seed=2), rand(4, 4, seed=3)


def attention(x):
    q, k, v = x @ WQ, x @ WK, x @ WV
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v


def test_self_attention_wrt_input():
    J = check(attention, rand(5, 4))
    assert J.nnz == (5 * 4) ** 2  # every output depends on every input


def test_batched_attention_is_block_diagonal():
    J = check(attention, rand(3, 5, 4))
    assert J.nnz == 3 * (5 * 4) ** 2


def test_gated_unit():
    w = rand(4, 4, seed=4)
    check(lambda x: x * torch.sigmoid(x @ w), rand(6, 4))


def test_deep_relu_stack():
    ws = [rand(8, 8, seed=s) / 3 for s in range(6)]

    def net(x):
        for w in ws:
            x = torch.relu(x @ w)
        return x.sum(-1)

    J = check(net, rand(5, 8), exact_nnz=False)
    assert J.nnz == 5 * 8


def test_transformer_block_with_layer_norm_like_ops():
    w1, w2 = rand(4, 8, seed=5), rand(8, 4, seed=6)

    def block(x):
        h = x + attention(x)
        mu = h.mean(-1, keepdim=True)
        h = (h - mu) / torch.sqrt(((h - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
        return h + F.gelu(h @ w1) @ w2

    check(block, rand(2, 3, 4))


# --- single operations --------------------------------------------------------------------------

X = rand(4, 6)
OPS = {
    "exp": torch.exp,
    "log": lambda x: torch.log(x * x + 1),
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "softplus": lambda x: F.softplus(x, beta=2.0),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "sin_cos": lambda x: torch.sin(x) * x.cos(),
    "pow": lambda x: x**3 - 2.0**x + torch.pow(x, 2),
    "div": lambda x: 1 / (x * x + 1) - x / 3,
    "neg": lambda x: -x,
    "rsub": lambda x: 1 - x,
    "log_softmax": lambda x: F.log_softmax(x, dim=0),
    "softmax_method": lambda x: x.softmax(-1),
    "sum_keepdim": lambda x: x.sum(dim=1, keepdim=True) * x,
    "mean_all": lambda x: x.mean(),
    "sum_tuple": lambda x: (x * x).sum((0, 1)),
    "reshape_split": lambda x: x.reshape(4, 2, 3).permute(2, 0, 1),
    "reshape_unaligned": lambda x: (x.reshape(3, 8) ** 2).T,
    "flatten_mm": lambda x: x.reshape(2, 12).flatten() @ rand(24, 3),
    "view_T": lambda x: x.view(6, 4).T @ rand(6, 2),
    "unsqueeze_squeeze": lambda x: x.unsqueeze(1).squeeze(1).unsqueeze(0),
    "transpose_mm": lambda x: torch.mm(x.t(), rand(4, 3)),
    "bmm": lambda x: torch.bmm(x.reshape(2, 2, 6), rand(2, 6, 3)),
    "matmul_vector": lambda x: x @ rand(6),
    "rmatmul": lambda x: rand(4) @ x,
    "einsum_self": lambda x: torch.einsum("ij,ik->jk", x, x),
    "einsum_diag": lambda x: torch.einsum("ii->i", x.T @ x) * torch.einsum("ij,jj->j", x, x.T @ x).sum(),
    "broadcast_add": lambda x: x.sum(0) + x,
    "broadcast_constant": lambda x: x.reshape(4, 1, 6) * rand(3, 1),
    "expand": lambda x: x.sum(0).expand(3, 6) * rand(3, 6),
    "linear": lambda x: F.linear(x, rand(5, 6), rand(5)),
    "where": lambda x: torch.where(x > 0, x, 0.1 * x),
    "clone_to": lambda x: x.clone().to(D).contiguous(),
    "closed_over_slice": lambda x: x * rand(8, 6)[:4],
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_operation(name):
    check(OPS[name], X, exact_nnz=name not in ("einsum_self",))


def test_numpy_arguments_are_converted():
    x, w = np.arange(6.0).reshape(2, 3), np.ones((3, 2))
    J = sparsejac.jacobian_of(lambda x, w: x @ w, x, w, wrt=1, format="csr")
    assert J.shape == (4, 6) and J.nnz == 12


def test_output_independent_of_the_argument():
    J = sparsejac.jacobian_of(lambda x, y: y * 2, rand(3), rand(2), wrt=0)
    assert J.shape == (2, 3) and J.nnz == 0


def test_empty_tensors():
    J = sparsejac.jacobian_of(lambda x: (x @ rand(3, 2)).reshape(-1), torch.zeros(0, 3, dtype=D))
    assert J.shape == (0, 0, 3) and J.nnz == 0


def test_float32_values_keep_their_dtype():
    x = rand(3, 4).float()
    J = sparsejac.jacobian_of(torch.tanh, x, format="csr")
    assert J.dtype == np.float32 and J.nnz == 12


# --- random programs --------------------------------------------------------------------------

UNARY = [torch.tanh, torch.sigmoid, torch.sin, F.silu, F.softplus, lambda x: x * x,
         lambda x: torch.exp(-x * x), torch.relu, F.gelu]


@st.composite
def programs(draw):
    """A random straight-line program over the supported operations, as a list of steps."""
    return draw(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 10**6)), min_size=1,
                         max_size=7))


def run_program(steps, x):
    """Interpret ``steps`` on ``x``; constants come from a generator seeded by each step."""
    seen = [x]
    for op, seed in steps:
        g = torch.Generator().manual_seed(seed)
        c = lambda *shape: torch.randn(shape, dtype=D, generator=g)  # noqa: E731
        shape = tuple(x.shape)
        if op == 0:
            x = UNARY[seed % len(UNARY)](x)
        elif op == 1 and x.dim() >= 1:
            x = x @ c(shape[-1], 1 + seed % 3)
        elif op == 2:
            x = x * c(*shape[-1:]) + c(*shape[-1:])
        elif op == 3:
            same = [s for s in seen if tuple(s.shape) == shape]
            x = x + same[seed % len(same)] * 0.5
        elif op == 4 and x.dim() >= 1:
            x = x.sum(seed % x.dim(), keepdim=bool(seed % 2))
        elif op == 5 and x.dim() >= 1:
            x = torch.softmax(x, dim=seed % x.dim()) if seed % 2 else F.log_softmax(x, -1)
        elif op == 6 and x.dim() >= 2:
            x = x.transpose(0, -1)
        elif op == 7:
            x = x.reshape(-1) if seed % 2 else x.unsqueeze(0)
        elif op == 8 and x.dim() == 1 and x.shape[0] % 2 == 0:
            x = x.reshape(2, -1)
        elif op == 9 and x.dim() >= 2:
            x = torch.einsum("...ij,...kj->...ik", x, x)
        elif op == 10:
            x = x / (1 + x * x)
        elif op == 11 and x.dim() >= 1:
            x = x.mean(-1)
        elif op == 12:
            same = [s for s in seen if tuple(s.shape) == shape]
            x = x * same[seed % len(same)]
        seen.append(x)
    return x


@given(
    steps=programs(),
    shape=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_random_programs(steps, shape, seed):
    x = rand(*shape, seed=seed)
    fn = lambda x: run_program(steps, x)  # noqa: E731
    check(fn, x, exact_nnz=False)


# --- errors -----------------------------------------------------------------------------------


def test_unsupported_operation_names_it_and_lists_the_supported():
    with pytest.raises(UnsupportedOperationError, match="cumsum") as info:
        sparsejac.jacobian_of(lambda x: torch.cumsum(x, 0), rand(3))
    assert isinstance(info.value, NotImplementedError)
    assert "einsum" in str(info.value) and "softmax" in str(info.value)


def test_in_place_and_python_values_are_refused():
    def inplace(x):
        y = x * 2
        y += 1
        return y

    with pytest.raises(UnsupportedOperationError, match="in-place"):
        sparsejac.jacobian_of(inplace, rand(3))
    with pytest.raises(UnsupportedOperationError, match="item"):
        sparsejac.jacobian_of(lambda x: x * x.sum().item(), rand(3))


def test_bad_arguments():
    with pytest.raises(ArgumentTypeError, match="callable"):
        sparsejac.jacobian_of(3, rand(3))
    with pytest.raises(ArgumentError, match="out of range"):
        sparsejac.jacobian_of(torch.tanh, rand(3), wrt=1)
    with pytest.raises(ArgumentTypeError, match="wrt"):
        sparsejac.jacobian_of(torch.tanh, rand(3), wrt="0")
    with pytest.raises(ArgumentError, match="format"):
        sparsejac.jacobian_of(torch.tanh, rand(3), format="dense")
    with pytest.raises(OperandTypeError, match="str"):
        sparsejac.jacobian_of(torch.tanh, "abc")
    with pytest.raises(OperandTypeError, match="floating"):
        sparsejac.jacobian_of(torch.tanh, torch.arange(3))
    with pytest.raises(ArgumentTypeError, match="one torch tensor"):
        sparsejac.jacobian_of(lambda x: (x, x), rand(3))


def test_torch_formats_equal_coo():
    """Every format of jacobian_of holds the same entries (torch formats included)."""
    torch.manual_seed(3)
    x, w = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)

    def fn(x):
        return torch.tanh(x @ w).sum(-1, keepdim=True) * x.mean(-1, keepdim=True)

    coo = sparsejac.jacobian_of(fn, x)
    J = sparsejac.jacobian_of(fn, x, format="torch")
    assert J.layout == torch.sparse_coo and J.is_coalesced()
    np.testing.assert_array_equal(J._indices().numpy(), coo.coords)
    np.testing.assert_array_equal(J._values().numpy(), coo.data)
    C = sparsejac.jacobian_of(fn, x, format="torch_csr")
    csr = sparsejac.jacobian_of(fn, x, format="csr")
    np.testing.assert_array_equal(C.col_indices().numpy(), csr.indices)
    np.testing.assert_array_equal(C.crow_indices().numpy(), csr.indptr)
    ref = torch.func.jacrev(fn)(x)
    torch.testing.assert_close(J.to_dense(), ref)
