"""A small CNN against torch.func.jacrev, and the stored-entry rule of convolution and pooling.

The rule (sparsejac/programs/rules/conv.py): a convolution stores one entry per output entry
and in-bounds entry of its window (padding stores nothing), which for generic values is
exactly the set jacrev shows nonzero; a maximum pooling stores the whole in-bounds window of
each output entry (a pattern independent of the values: which entry wins is a value), so
there the count is the windows', not jacrev's. Through a network, the stored entries are the
union over paths: the boolean product of the layers' patterns (relu's pattern is its diagonal,
its zero slopes are values).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsejac
from sparsejac.programs import terms as T
from sparsejac.programs.write import choose as M
from sparsejac.programs.collect import load
from sparsejac.programs.tracer import make_tracer

D = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


def _csr(J, out_shape, in_shape):
    coords = np.asarray(J.coords)
    rows = np.ravel_multi_index(tuple(coords[: len(out_shape)]), out_shape)
    cols = np.ravel_multi_index(tuple(coords[len(out_shape):]), in_shape)
    return scipy.sparse.csr_array((np.asarray(J.data), (rows, cols)),
                                  shape=(int(np.prod(out_shape)), int(np.prod(in_shape))))


def _bool(m):
    m = scipy.sparse.csr_array(m)
    return scipy.sparse.csr_array((np.ones(m.nnz), m.indices, m.indptr), shape=m.shape)


def _same_pattern(a, b):
    a, b = _bool(a), _bool(b)
    return a.shape == b.shape and (a != b).nnz == 0


def _jacrev(fn, x):
    r = torch.func.jacrev(fn)(x)
    out = r.shape[: r.dim() - x.dim()]
    return r.reshape(int(np.prod(out)), x.numel()).detach().numpy()


def _windows(size, k, s, p, d=1, ceil=False):
    """Per output cell, the in-bounds input cells of its window (a direct loop)."""
    span = d * (k - 1) + 1
    n = size + 2 * p - span
    out = (-(-n // s) if ceil else n // s) + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return [[o * s + j * d - p for j in range(k) if 0 <= o * s + j * d - p < size]
            for o in range(out)]


# --- the CNN -----------------------------------------------------------------------------------

torch.manual_seed(0)
CONV = nn.Conv2d(3, 4, 3, padding=1).to(D)
LIN = nn.Linear(4 * 4 * 4, 5).to(D)
X = _rand(2, 3, 8, 8, seed=1)


def cnn(x, w=CONV.weight):
    h = F.conv2d(x, w, CONV.bias, padding=1)
    h = F.max_pool2d(torch.relu(h), 2)
    return LIN(torch.flatten(h, 1))


def test_cnn_against_jacrev_wrt_input_and_weight():
    J = sparsejac.jacobian_of(cnn, X)
    np.testing.assert_allclose(J.todense(), torch.func.jacrev(cnn)(X).detach().numpy(), rtol=1e-9,
                               atol=1e-11)
    Jw = sparsejac.jacobian_of(cnn, X, CONV.weight.detach(), wrt=1)
    ref = torch.func.jacrev(cnn, argnums=1)(X, CONV.weight.detach())
    np.testing.assert_allclose(Jw.todense(), ref.detach().numpy(), rtol=1e-9, atol=1e-11)
    net = nn.Sequential(CONV, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), LIN)
    Jm = sparsejac.jacobian_of(net, X)
    np.testing.assert_allclose(Jm.todense(), J.todense(), rtol=1e-12, atol=1e-13)


def test_conv_stores_jacrev_nonzeros_and_the_window_count():
    w = CONV.weight.detach()
    fn = lambda x: F.conv2d(x, w, padding=1)  # noqa: E731
    J = sparsejac.jacobian_of(fn, X)
    ref = _jacrev(fn, X)
    got = _csr(J, (2, 4, 8, 8), (2, 3, 8, 8))
    assert _same_pattern(got, ref != 0)
    # independently: per output entry, C times the in-bounds window cells
    win = _windows(8, 3, 1, 1)
    assert J.nnz == 2 * 4 * 3 * sum(len(a) * len(b) for a in win for b in win)
    # with respect to the weight: the in-bounds window entries too (zero-padded input values)
    Jw = sparsejac.jacobian_of(lambda w: F.conv2d(X, w, padding=1), w)
    refw = _jacrev(lambda w: F.conv2d(X, w, padding=1), w)
    assert _same_pattern(_csr(Jw, (2, 4, 8, 8), (4, 3, 3, 3)), refw != 0)
    assert Jw.nnz == J.nnz


@pytest.mark.parametrize("k,s,p,d,ceil", [(2, 2, 0, 1, False), (3, 2, 1, 1, True),
                                          (2, 1, 1, 2, False)])
def test_max_pool_stores_the_windows(k, s, p, d, ceil):
    x = _rand(2, 3, 7, 6, seed=2)
    fn = lambda a: F.max_pool2d(a, k, s, p, d, ceil_mode=ceil)  # noqa: E731
    J = sparsejac.jacobian_of(fn, x)
    out = tuple(fn(x).shape)
    np.testing.assert_allclose(J.todense(), torch.func.jacrev(fn)(x).numpy())
    rows, cols = _windows(7, k, s, p, d, ceil), _windows(6, k, s, p, d, ceil)
    assert out[2:] == (len(rows), len(cols))
    expected = []  # (output cell, input cell) of each window entry, per (batch, channel)
    for (i, a), (j, b) in itertools.product(enumerate(rows), enumerate(cols)):
        expected += [(i * len(cols) + j, h * 6 + w) for h in a for w in b]
    assert J.nnz == 2 * 3 * len(expected)
    got = _csr(J, out, tuple(x.shape))
    cells = len(rows) * len(cols)
    block = scipy.sparse.csr_array((np.ones(len(expected)), tuple(np.array(expected).T)),
                                   shape=(cells, 42))
    assert _same_pattern(got, scipy.sparse.block_diag([block] * 6))
    # jacrev's nonzeros (the arg max of each window) are among them
    assert (_bool(_jacrev(fn, x) != 0) - _bool(got).minimum(_bool(_jacrev(fn, x) != 0))).nnz == 0


def test_cnn_stores_the_product_of_the_layer_patterns():
    """Through conv -> relu -> max_pool -> linear the stored entries are the boolean product of
    the layers' patterns: conv's from jacrev, max_pool's windows, linear's dense blocks."""
    w = CONV.weight.detach()
    conv = _bool(_jacrev(lambda x: F.conv2d(x, w, padding=1), X) != 0)  # (2*4*64, 2*3*64)
    h = torch.relu(F.conv2d(X, w, CONV.bias, padding=1))
    pool = _bool(_csr(sparsejac.jacobian_of(lambda a: F.max_pool2d(a, 2), h),
                      (2, 4, 4, 4), (2, 4, 8, 8)))
    assert pool.nnz == 2 * 4 * 16 * 4  # the windows: 4 entries per output entry
    lin = _bool(np.kron(np.eye(2), np.ones((5, 64))))
    expected = _bool(lin @ pool @ conv)
    J = sparsejac.jacobian_of(cnn, X)
    assert _same_pattern(_csr(J, (2, 5), (2, 3, 8, 8)), expected)
    assert J.nnz == expected.nnz == 2 * 5 * 3 * 64  # per sample: every input reaches every output
    convw = _bool(_jacrev(lambda w: F.conv2d(X, w, padding=1), w) != 0)
    Jw = sparsejac.jacobian_of(cnn, X, w, wrt=1)
    assert _same_pattern(_csr(Jw, (2, 5), (4, 3, 3, 3)), _bool(lin @ pool @ convw))


def _enumerated(fn, *args, wrt=0):
    """Entries the trace's terms of ``fn(*args)`` enumerate w.r.t. ``args[wrt]``."""
    load()
    labels = T.Labels()
    tracer = make_tracer(labels, D)
    args = [a.detach() for a in args]
    tracer.record(args[wrt], {(0, 0): [T.identity(tuple(args[wrt].shape), labels, D)]})
    with tracer:
        out = fn(*args)
    return sum(t.nnz(labels) for t in tracer.terms(out)[(0, 0)])


def test_conv_terms_enumerate_batch_out_cells_channels_kernel():
    x, w = _rand(2, 4, 9, 7, seed=3), _rand(6, 2, 3, 2, seed=4)  # groups=2
    B, O, L, Cg, K = 2, 6, 0, 2, 6
    fn = lambda a, b: F.conv2d(a, b, stride=2, padding=1, groups=2)  # noqa: E731
    L = fn(x, w).shape[2] * fn(x, w).shape[3]
    assert _enumerated(fn, x, w, wrt=0) <= B * O * L * Cg * K
    assert _enumerated(fn, x, w, wrt=1) <= B * O * L * Cg * K


# --- the collapse: entries that land on one input entry summed during the trace ----------------


def _no_collapse(monkeypatch):
    """Trace without :func:`terms.collapse` (every combination of offsets enumerated to the
    end, as before it): the reference for the stored pattern."""
    monkeypatch.setattr(T, "collapse", lambda term, labels: term)


@pytest.mark.parametrize("conv1,pool1,conv2,pool2", [
    (dict(padding=1), ("max", 2, 2, 0), dict(padding=1), ("max", 2, 2, 0)),
    (dict(padding=2, dilation=2), ("avg", 3, 1, 1), dict(stride=2), ("max", 2, 1, 0)),
    (dict(stride=2, padding=1), ("max", 3, 2, 1), dict(padding=2, dilation=2), ("avg", 2, 2, 0)),
    (dict(padding=0), ("avg", 2, 1, 0), dict(padding=2, stride=1), ("max", 3, 3, 1)),
])
def test_collapsed_cnn_against_jacrev_and_the_uncollapsed_pattern(conv1, pool1, conv2, pool2,
                                                                   monkeypatch):
    """Two convolutions and poolings (kernel offsets that overlap on the input, padding,
    strides, dilations): the collapsed trace gives jacrev's values, and stores the same entries
    as the trace that enumerates every combination of offsets (the union of their places)."""
    g = torch.Generator().manual_seed(5)
    w1 = torch.randn(4, 2, 3, 3, dtype=D, generator=g)
    w2 = torch.randn(3, 4, 3, 2, dtype=D, generator=g)
    x = _rand(2, 2, 11, 10, seed=6)

    def pool(h, kind, k, s, p):
        return (F.max_pool2d(h, k, s, p) if kind == "max"
                else F.avg_pool2d(h, k, s, p, count_include_pad=False))

    def fn(a):
        h = pool(torch.tanh(F.conv2d(a, w1, **conv1)), *pool1)
        h = pool(torch.relu(F.conv2d(h, w2, **conv2)), *pool2)
        return h.flatten(1) @ torch.ones(h[0].numel(), 3, dtype=D)

    ref = _jacrev(fn, x)
    J = sparsejac.jacobian_of(fn, x, format="csr")
    np.testing.assert_allclose(J.toarray(), ref, rtol=1e-9, atol=1e-11)
    assert _enumerated(fn, x) < _enumerated_uncollapsed(fn, x, monkeypatch)
    _no_collapse(monkeypatch)
    assert _same_pattern(J, sparsejac.jacobian_of(fn, x, format="csr"))


@pytest.mark.parametrize("case", ["transpose", "fold", "conv1d", "conv3d"])
def test_collapsed_windows_of_other_layers(case, monkeypatch):
    """Transposed convolutions, fold after unfold, 1-d and 3-d windows: jacrev's values and the
    uncollapsed trace's stored entries."""
    g = torch.Generator().manual_seed(13)
    if case == "transpose":
        w1, w2 = (torch.randn(2, 3, 3, 3, dtype=D, generator=g),
                  torch.randn(4, 3, 2, 3, dtype=D, generator=g))
        x = _rand(2, 2, 5, 4, seed=14)
        fn = lambda a: F.conv2d(F.conv_transpose2d(a, w1, stride=2, padding=1), w2,  # noqa: E731
                                padding=1, dilation=2).sum((2, 3))
    elif case == "fold":
        x = _rand(1, 2, 6, 5, seed=15)
        fn = lambda a: F.avg_pool2d(F.fold(F.unfold(a, 3, padding=1), (6, 5), 3,  # noqa: E731
                                           padding=1), 2, 1)
    elif case == "conv1d":
        w = torch.randn(3, 2, 4, dtype=D, generator=g)
        x = _rand(2, 2, 13, seed=16)
        fn = lambda a: F.avg_pool1d(F.conv1d(F.max_pool1d(a, 3, 1, 1), w, padding=2),  # noqa: E731
                                    3, 2)
    else:
        w = torch.randn(2, 1, 2, 3, 2, dtype=D, generator=g)
        x = _rand(1, 1, 5, 6, 4, seed=17)
        fn = lambda a: F.max_pool3d(F.conv3d(a, w, padding=1), 2, 1).sum(-1)  # noqa: E731
    ref = _jacrev(fn, x)
    J = sparsejac.jacobian_of(fn, x, format="csr")
    np.testing.assert_allclose(J.toarray(), ref, rtol=1e-9, atol=1e-11)
    _no_collapse(monkeypatch)
    assert _same_pattern(J, sparsejac.jacobian_of(fn, x, format="csr"))


def _enumerated_uncollapsed(fn, x, monkeypatch):
    with monkeypatch.context() as m:
        _no_collapse(m)
        return _enumerated(fn, x)


def _traced_terms(fn, x):
    """The terms of ``fn(x)`` w.r.t. ``x`` traced without the collapse, and the labels."""
    load()
    labels = T.Labels()
    tracer = make_tracer(labels, D)
    tracer.record(x, {(0, 0): [T.identity(tuple(x.shape), labels, D)]})
    collapse = T.collapse
    T.collapse = lambda term, labels: term
    try:
        with tracer:
            out = fn(x)
    finally:
        T.collapse = collapse
    return tracer.terms(out)[(0, 0)], tuple(out.shape), labels


def _dense(terms, out_shape, in_shape, labels):
    return M.materialise(terms, out_shape, in_shape, labels, D)


def _three_convs(seed: int):
    """Three 1-d convolutions (kernel 3, padding 1) of a 12-long signal, and the signal."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(1, 1, 3, dtype=D, generator=g) for _ in range(3)]
    x = _rand(1, 1, 12, seed=seed + 1)

    def fn(a):
        for w in ws:
            a = F.conv1d(a, w, padding=1)
        return a

    return fn, x


def test_collapse_sums_offsets_that_reach_one_input_entry():
    """Three 1-d convolutions (kernel 3, padding 1): the input entry reached from output cell
    ``o`` is ``o + k1 + k2 + k3 - 3``, 27 combinations of offsets over 7 places. The collapse
    keeps the output cell and puts one window label of 7 on the input side; padding (-1) stays
    dropped, so the stored entries and values are the uncollapsed term's."""
    fn, x = _three_convs(7)
    (term,), out_shape, labels = _traced_terms(fn, x)
    assert term.nnz(labels) == 12 * 27
    after = T.collapse(term, labels)
    assert after.nnz(labels) == 12 * 7
    assert after.factor.numel() == 12 * 7
    (m,) = [a for a in after.inp_atoms if a in labels.derived]
    table, over = labels.derived[m]
    assert labels.shape(over) == (12, 7)
    # the cells padding cuts off are -1: cell 0 reaches inputs 0..3 only
    assert sorted(table[0][table[0] >= 0].tolist()) == [0, 1, 2, 3]
    before = _dense([term], out_shape, tuple(x.shape), labels)
    got = _dense([after], out_shape, tuple(x.shape), labels)
    assert _same_pattern(got, before) and got.nnz == before.nnz == sum(
        min(o + 3, 11) - max(o - 3, 0) + 1 for o in range(12))
    np.testing.assert_allclose(got.toarray(), before.toarray(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got.toarray(), _jacrev(fn, x), rtol=1e-12, atol=1e-14)
    # the same maps collapse onto the same labels (terms through them stay mergeable)
    assert T.collapse(term, labels).inp == after.inp


def test_collapse_onto_the_input_axis_and_joint_maps():
    """A sum over every output cell leaves nothing kept: the window is the input axis itself (a
    plain label, no map). Windows over a flattened axis make two maps (row and column digits)
    over the same offsets: one group, collapsed jointly."""
    g = torch.Generator().manual_seed(9)
    ws = [torch.randn(1, 1, 3, dtype=D, generator=g) for _ in range(3)]
    v = torch.randn(16, dtype=D, generator=g)
    x = _rand(2, 4, 4, seed=10)

    def fn(a):
        a = a.reshape(2, 1, 16)
        for w in ws:
            a = F.conv1d(a, w, padding=1)
        return a.reshape(2, 16) @ v

    (term,), out_shape, labels = _traced_terms(fn, x)
    maps = [a for a in term.inp_atoms if a in labels.derived]
    assert len(maps) == 2  # row and column of the flattened axis, over the same offsets
    after = T.collapse(term, labels)
    assert after.nnz(labels) < term.nnz(labels)
    assert not after.mapped(labels) and after.nnz(labels) == 2 * 16  # (batch, input cell)
    got = _dense([after], out_shape, tuple(x.shape), labels)
    before = _dense([term], out_shape, tuple(x.shape), labels)
    assert _same_pattern(got, before)
    np.testing.assert_allclose(got.toarray(), _jacrev(fn, x), rtol=1e-12, atol=1e-14)

    def rows(a):  # keep the output cell: the two maps stay, over (cell, window)
        a = a.reshape(2, 1, 16)
        for w in ws:
            a = F.conv1d(a, w, padding=1)
        return a

    (term,), out_shape, labels = _traced_terms(rows, x)
    after = T.collapse(term, labels)
    assert after.nnz(labels) < term.nnz(labels)
    got = _dense([after], out_shape, tuple(x.shape), labels)
    assert _same_pattern(got, _dense([term], out_shape, tuple(x.shape), labels))
    np.testing.assert_allclose(got.toarray(), _jacrev(rows, x), rtol=1e-12, atol=1e-14)


def test_collapse_is_refused_by_the_guard_before_allocating():
    """The collapse's scatter is checked against the memory limit like every factor."""
    fn, x = _three_convs(11)
    (term,), _, labels = _traced_terms(fn, x)
    labels.limit = 8 * 12 * 27  # the source alone, not the source and the collapsed factor
    with pytest.raises(sparsejac.errors.JacobianTooLargeError):
        T.collapse(term, labels)
