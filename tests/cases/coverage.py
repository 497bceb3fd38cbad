"""Cases for the rules beyond the first groups: decompositions written with other operations,
copying views, placements, order statistics, batched linear algebra, recurrent layers."""

from __future__ import annotations

import torch
import torch.nn as nn

from . import D, Case, rand

x = rand(4, 3)
pos = rand(4, 3, positive=True)
v = rand(5)
A = rand(2, 3, 3) + 3 * torch.eye(3, dtype=D)
B = rand(2, 3, seed=1)
C = rand(2, 3, seed=2)
IDX = torch.tensor([0, 2, 0, 3])
seq = rand(4, 2, 3, seed=3)


def spd(a):
    return a @ a.transpose(-1, -2) + 3 * torch.eye(a.shape[-1], dtype=a.dtype)


def _module(make, *args, **kwargs):
    torch.manual_seed(0)
    return make(*args, **kwargs).double().eval()


LSTM = _module(nn.LSTM, 3, 4)
GRU = _module(nn.GRU, 3, 4, batch_first=True)
RNN_TANH = _module(nn.RNN, 3, 4, num_layers=2, bidirectional=True)
RNN_RELU = _module(nn.RNN, 3, 4, nonlinearity="relu")
LSTM_CELL, GRU_CELL = _module(nn.LSTMCell, 3, 4), _module(nn.GRUCell, 3, 4)
RNN_CELL, RELU_CELL = _module(nn.RNNCell, 3, 4), _module(nn.RNNCell, 3, 4, nonlinearity="relu")

CASES = [
    # written with other operations (rules/composite.py)
    Case("diff", lambda a: torch.diff(a, n=2, dim=0, append=a[:1] ** 2), (x,)),
    Case("gradient", lambda a: torch.stack(torch.gradient(a, spacing=[2.0, 0.5], edge_order=2)),
         (x,)),
    Case("kron", lambda a: torch.kron(a, a[:2, :2]), (x,)),
    Case("trapezoid", lambda a: torch.trapezoid(a, torch.tensor([0.0, 1, 3], dtype=D)), (x,)),
    Case("cumulative_trapezoid", lambda a: torch.cumulative_trapezoid(a, dx=0.5, dim=0), (x,)),
    # (torch.func.jacrev of cdist is right only in this compute mode, torch 2.13)
    Case("cdist", lambda a: torch.cdist(a, C, compute_mode="use_mm_for_euclid_dist"), (x,)),
    Case("nansum", lambda a: torch.nansum(a, 0), (x,)),
    Case("nanmean", lambda a: torch.nanmean(a, 1, keepdim=True), (x,)),
    Case("softmin", lambda a: torch.nn.functional.softmin(a, dim=1), (x,)),
    Case("logcumsumexp", lambda a: torch.logcumsumexp(a, 1), (x,)),
    Case("cartesian_prod", lambda a: torch.cartesian_prod(a, a[:2]), (v,)),
    Case("diagflat", lambda a: torch.diagflat(a, 1), (v,)),
    Case("half", lambda a: a.half().double(), (x,)),
    Case("bfloat16", lambda a: a.bfloat16().double(), (x,)),
    Case("view_copy", lambda a: torch.view_copy(a, (3, 4)), (x,)),
    Case("expand_copy", lambda a: torch.expand_copy(a, (2, 4, 3)), (x,)),
    Case("permute_copy", lambda a: torch.permute_copy(a, (1, 0)), (x,)),
    Case("squeeze_copy", lambda a: torch.squeeze_copy(a[None], 0), (x,)),
    Case("unsqueeze_copy", lambda a: torch.unsqueeze_copy(a, 1), (x,)),
    Case("t_copy", lambda a: torch.t_copy(a), (x,)),
    Case("transpose_copy", lambda a: torch.transpose_copy(a, 0, 1), (x,)),
    Case("diagonal_copy", lambda a: torch.diagonal_copy(a), (x,)),
    Case("alias_copy", lambda a: torch.alias_copy(a) * 2, (x,)),
    Case("narrow_copy", lambda a: torch.narrow_copy(a, 0, 1, 2), (x,)),
    Case("resolve_conj", lambda a: torch.resolve_conj(a) * 2, (x,)),
    Case("resolve_neg", lambda a: torch.resolve_neg(a) * 2, (x,)),
    # placements (rules/scatter.py)
    Case("index_add", lambda a: torch.index_add(a, 0, IDX, a ** 2, alpha=0.5), (x,)),
    Case("index_copy", lambda a: torch.index_copy(a, 0, torch.tensor([1, 3]), a[:2] ** 2), (x,)),
    Case("index_put", lambda a: torch.index_put(a, (torch.tensor([0, 0]),), a[1:3] * 5,
                                                accumulate=True), (x,)),
    Case("scatter", lambda a: torch.scatter(a, 1, torch.tensor([[2], [0]]), a[:2, :1] ** 2), (x,)),
    Case("scatter_add", lambda a: torch.scatter_add(a, 0, torch.tensor([[0, 1, 2], [0, 1, 2]]),
                                                    a[1:3] * 2), (x,)),
    *[Case("scatter_reduce", lambda a, r=r, s=s: torch.scatter_reduce(
        a, 0, torch.tensor([[0, 1, 2], [0, 1, 0], [3, 3, 3]]), a[1:4] * 2 + 1, r,
        include_self=s), (x,), id=f"scatter_reduce-{r}-{s}")
      for r in ("sum", "mean", "amax", "amin") for s in (True, False)],
    Case("masked_scatter", lambda a: a.masked_scatter(a > 0, a.flip(0) * 2), (x,)),
    # torch.max / torch.min of two tensors (rules/reduce.py): elementwise
    Case("max", lambda a, b: torch.max(a, b), (x, rand(4, 3, seed=4)), wrt=(0, 1), id="max-binary"),
    Case("min", lambda a: a.min(a.flip(0)), (x,), id="min-binary"),
    # smooth elementwise functions read from torch's forward mode (rules/elementwise.py)
    *[Case(name, fn, (pos,)) for name, fn in [
        ("acosh", lambda a: torch.acosh(a + 1)), ("arccosh", lambda a: torch.arccosh(a + 1)),
        ("arcsinh", torch.arcsinh), ("arctanh", lambda a: torch.arctanh(a / 4)),
        ("i0", torch.i0), ("sinc", torch.sinc), ("special_i0e", torch.special.i0e),
        ("special_i1", torch.special.i1), ("special_i1e", torch.special.i1e),
        ("special_erfcx", torch.special.erfcx), ("special_ndtr", torch.special.ndtr),
        ("special_ndtri", lambda a: torch.special.ndtri(a / 4)),
        ("special_log_ndtr", torch.special.log_ndtr), ("special_entr", torch.special.entr),
        ("polygamma", lambda a: torch.polygamma(1, a)),
        ("special_polygamma", lambda a: torch.special.polygamma(2, a)),
        ("mvlgamma", lambda a: torch.mvlgamma(a + 1, 2)),
        ("fmod", lambda a: torch.fmod(a * 3, 1.3)), ("remainder", lambda a: torch.remainder(a * 3, 1.3)),
        ("__mod__", lambda a: (a * 3) % 1.3), ("copysign", lambda a: torch.copysign(a, -1.0)),
        ("ldexp", lambda a: torch.ldexp(a, torch.tensor([2]))),
    ]],
    Case("cumprod", lambda a: torch.cumprod(a, 1), (x,)),
    Case("cumprod", lambda a: a.cumprod(0) * 1, (torch.tensor([[1.0, 0.0], [2.0, 3.0], [0.0, 5.0]],
                                                                dtype=D),), id="cumprod-zeros"),
    # resampling (rules/resample.py)
    Case("interpolate", lambda a: torch.nn.functional.interpolate(
        a[None], scale_factor=1.5, mode="linear"), (x,)),
    Case("interpolate", lambda a: torch.nn.functional.interpolate(
        a[None, None], size=(5, 7), mode="bicubic", align_corners=True), (x,), id="interpolate-2d"),
    Case("interpolate", nn.Upsample(scale_factor=2, mode="nearest"), (x[None],), id="Upsample"),
    Case("upsample", lambda a: torch.nn.functional.upsample(a[None], scale_factor=2), (x,)),
    # order statistics (rules/order.py)
    Case("sort", lambda a: torch.sort(a, 1, descending=True).values, (x,)),
    Case("msort", torch.msort, (x,)),
    Case("topk", lambda a: torch.topk(a, 2, dim=0).values, (x,)),
    Case("kthvalue", lambda a: torch.kthvalue(a, 2, 1, keepdim=True).values, (x,)),
    Case("mode", lambda a: torch.mode(a, 1).values, (x,)),
    Case("median", torch.median, (x,)),
    Case("median", lambda a: a.median(1, keepdim=True).values, (x,), id="median-dim"),
    Case("nanmedian", lambda a: torch.nanmedian(a, 0).values, (x,)),
    # batched small linear algebra (rules/blocks.py)
    Case("linalg_inv", torch.linalg.inv, (A,)),
    Case("inverse", lambda a: a.inverse(), (A,)),
    Case("linalg_solve", lambda a, b: torch.linalg.solve(a, b), (A, B), wrt=(0, 1)),
    Case("linalg_det", torch.linalg.det, (A,)),
    Case("det", torch.det, (A,)),
    Case("logdet", lambda a: torch.logdet(spd(a)), (A,)),
    Case("slogdet", lambda a: torch.slogdet(a)[1], (A,)),
    Case("linalg_slogdet", lambda a: torch.linalg.slogdet(a).logabsdet, (A,)),
    Case("linalg_cholesky", lambda a: torch.linalg.cholesky(spd(a)), (A,)),
    Case("cholesky", lambda a: torch.cholesky(spd(a)), (A,)),
    Case("linalg_matrix_exp", torch.linalg.matrix_exp, (A,)),
    Case("matrix_exp", torch.matrix_exp, (A,)),
    Case("linalg_matrix_power", lambda a: torch.linalg.matrix_power(a, 3), (A,)),
    Case("matrix_power", lambda a: torch.matrix_power(a, 2), (A,)),
    Case("linalg_eigvalsh", lambda a: torch.linalg.eigvalsh(spd(a)), (A,)),
    Case("linalg_pinv", torch.linalg.pinv, (A,)),
    Case("pinverse", torch.pinverse, (A,)),
    Case("linalg_svdvals", torch.linalg.svdvals, (A,)),
    Case("linalg_solve_triangular", lambda a, b: torch.linalg.solve_triangular(
        a.tril() + 3 * torch.eye(3, dtype=D), b, upper=False), (A, rand(2, 3, 2)), wrt=(0, 1)),
    Case("cholesky_solve", lambda b, a: torch.cholesky_solve(b, torch.linalg.cholesky(spd(a))),
         (rand(2, 3, 2), A), wrt=(0, 1)),
    Case("cholesky_inverse", lambda a: torch.cholesky_inverse(torch.linalg.cholesky(spd(a))),
         (A[0],)),
    # recurrent layers (rules/recurrent.py)
    Case("lstm", lambda s: LSTM(s)[0], (seq,)),
    Case("gru", lambda s: GRU(s)[0], (seq,)),
    Case("rnn_tanh", lambda s: RNN_TANH(s)[0], (seq,)),
    Case("rnn_relu", lambda s: RNN_RELU(s)[0], (seq,)),
    Case("lstm_cell", lambda a: LSTM_CELL(a)[1], (B,)),
    Case("gru_cell", GRU_CELL, (B,)),
    Case("rnn_tanh_cell", RNN_CELL, (B,)),
    Case("rnn_relu_cell", RELU_CELL, (B,)),
]
