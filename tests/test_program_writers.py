"""Blocks that are not one plain term (index maps: convolutions, pooling, slices, padding; sums
of terms not nested in one) written straight into each format (programs/write/merged.py ``Merged``):
values against ``torch.func.jacrev`` in float64, the results canonical, the stored entries the
rule's (the same in every format and as the CSR merge's), plans' refills and patterns, no
format converted from another, and the guard's prediction against the measured peak."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import sparse

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import sparsejac  # noqa: E402
from sparsejac import formats  # noqa: E402
from sparsejac.programs import collect  # noqa: E402
from sparsejac.programs.write import choose as M  # noqa: E402
from sparsejac.programs.write import structured  # noqa: E402
from test_programs import numpy_peak  # noqa: E402  (pytest puts tests/ on the path)

D = torch.float64
RTOL, ATOL = 1e-10, 1e-12
FORMATS = ("coo", "csr", "csc", "torch", "torch_csr")


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed + 31 * len(shape) + sum(shape))
    return torch.randn(*shape, dtype=D, generator=g)


_g = torch.Generator().manual_seed(5)
CONV_W = torch.randn(4, 2, 3, 3, dtype=D, generator=_g)
CONV_B = torch.randn(4, dtype=D, generator=_g)
CONV1_W = torch.randn(1, 1, 3, dtype=D, generator=_g)


def cnn(x):  # conv + relu + maxpool, no linear layer after it: the block keeps its index maps
    return F.max_pool2d(torch.relu(F.conv2d(x, CONV_W, CONV_B, padding=1)), 2)


def conv_plus_slice(x):  # two differently mapped terms: a window and a shifted slice
    return F.conv1d(x[None, None], CONV1_W)[0, 0] + x[2:] ** 2


PROGRAMS = {
    "cnn": (cnn, (2, 2, 6, 6)),
    "slice": (lambda x: x[1:] - x[:-1] ** 2, (40,)),
    "pad": (lambda x: F.pad(x, (1, 2)) * 2.0 + F.pad(x ** 2, (2, 1)), (3, 9)),
    "stencil": (lambda u: u[1:-1, 2:] + u[1:-1, :-2] + u[2:, 1:-1] + u[:-2, 1:-1]
                - 4 * u[1:-1, 1:-1] ** 2, (7, 8)),
    "conv_plus_slice": (conv_plus_slice, (30,)),
}


def blocks(fn, x):
    return collect.jacobian_blocks(fn, (x,), 0, None)


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_the_programs_take_the_merged_path(name):
    """Each program's block is one the direct writer does not write (else the tests below
    would test that writer)."""
    fn, shape = PROGRAMS[name]
    c = blocks(fn, rand(*shape))
    (terms,) = c.blocks
    assert not structured.direct(terms, c.labels)
    if name in ("pad", "stencil", "conv_plus_slice"):
        assert len(terms) > 1  # a sum of terms


def _no_conversion(monkeypatch):
    """Any format made from a CSR (the old path) fails the test."""
    def refuse(*a, **k):
        raise AssertionError("a format converted from a CSR")

    monkeypatch.setattr(formats.Format, "from_csr", refuse)
    monkeypatch.setattr(formats.Format, "pattern_from_csr", refuse)


def _canonical_compressed(indptr, indices, nmajor):
    """Sorted, duplicate-free minor indices within each major slice."""
    indptr, indices = np.asarray(indptr), np.asarray(indices)
    assert len(indptr) == nmajor + 1 and indptr[0] == 0 and indptr[-1] == len(indices)
    assert np.all(np.diff(indptr) >= 0)
    major = np.repeat(np.arange(nmajor), np.diff(indptr))
    key = major.astype(np.int64) * (int(indices.max(initial=0)) + 1) + indices
    assert np.all(np.diff(key) > 0)


def assert_canonical(J, fmt, out_shape, inp_shape):
    """``J`` in ``fmt`` is canonical; returns its sorted flat (row * ncols + col) keys and values
    in row-major order, to compare formats with each other."""
    nrows, ncols = int(np.prod(out_shape)), int(np.prod(inp_shape))
    if fmt in ("coo", "torch"):
        if fmt == "coo":
            assert isinstance(J, sparse.COO) and J.shape == out_shape + inp_shape
            coords, data = J.coords, J.data
        else:
            assert J.is_coalesced() and tuple(J.shape) == out_shape + inp_shape
            coords, data = J.indices().numpy(), J.values().numpy()
            assert J.indices().dtype == torch.int64
        flat = np.ravel_multi_index(tuple(coords), out_shape + inp_shape)
        assert np.all(np.diff(flat) > 0)  # lexicographically sorted, no duplicates
        return flat, data
    if fmt == "torch_csr":
        assert J.layout == torch.sparse_csr and tuple(J.shape) == (nrows, ncols)
        indptr, indices = J.crow_indices().numpy(), J.col_indices().numpy()
        data = J.values().numpy()
        assert indptr.dtype == indices.dtype
    else:
        cls = scipy.sparse.csr_array if fmt == "csr" else scipy.sparse.csc_array
        assert isinstance(J, cls) and J.shape == (nrows, ncols)
        assert J.has_canonical_format
        indptr, indices, data = J.indptr, J.indices, J.data
    nmajor = ncols if fmt == "csc" else nrows
    _canonical_compressed(indptr, indices, nmajor)
    major = np.repeat(np.arange(nmajor, dtype=np.int64), np.diff(indptr))
    if fmt == "csc":
        flat = indices.astype(np.int64) * ncols + major
        order = np.argsort(flat)
        return flat[order], data[order]
    return major * ncols + indices, data


def _dense(J, fmt, shape):
    if fmt == "coo":
        return J.todense().reshape(shape)
    if fmt in ("csr", "csc"):
        return J.toarray().reshape(shape)
    return J.to_dense().numpy().reshape(shape)


def check_all_formats(results, fn, x, ref=None):
    """Every format's result: canonical, the same stored entries and values, jacrev's values,
    and the stored entries the rule's (the CSR merge of the terms)."""
    out_shape, inp_shape = tuple(fn(x).shape), tuple(x.shape)
    ref = torch.func.jacrev(fn)(x).numpy() if ref is None else ref
    atol = ATOL * max(1.0, float(np.abs(ref).max(initial=0.0)))
    keys = None
    for fmt in FORMATS:
        J = results[fmt]
        assert getattr(J, formats.OUT_NDIM) == len(out_shape)
        np.testing.assert_allclose(_dense(J, fmt, ref.shape), ref, rtol=RTOL, atol=atol)
        flat, data = assert_canonical(J, fmt, out_shape, inp_shape)
        if keys is None:
            keys, values = flat, data
        else:
            np.testing.assert_array_equal(flat, keys)
            np.testing.assert_allclose(data, values, rtol=RTOL, atol=atol)
    # the rule: the union of the terms' structural entries, as the CSR merge stores them
    c = blocks(fn, x)
    csr = M.materialise(c.blocks[0], out_shape, inp_shape, c.labels, D)
    rows = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))
    np.testing.assert_array_equal(rows * csr.shape[1] + csr.indices, keys)
    return keys


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_jacobian_of_writes_every_format_directly(name, monkeypatch):
    fn, shape = PROGRAMS[name]
    x = rand(*shape)
    ref = torch.func.jacrev(fn)(x).numpy()
    _no_conversion(monkeypatch)
    results = {fmt: sparsejac.jacobian_of(fn, x, format=fmt) for fmt in FORMATS}
    keys = check_all_formats(results, fn, x, ref)
    if name == "cnn":  # relu's and the pool's entries stay where they pass nothing (values)
        assert len(keys) > np.count_nonzero(ref)
    else:
        assert len(keys) == np.count_nonzero(ref)  # random values: no entry cancels


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_plan_refills_and_patterns_in_every_format(name):
    fn, shape = PROGRAMS[name]
    x, x_new = rand(*shape), rand(*shape, seed=1)
    plan = sparsejac.plan_of(fn, x)
    for _ in range(2):  # the first refill in a format makes its pattern, the second reuses it
        results = {fmt: plan.jacobian(x_new, format=fmt) for fmt in FORMATS}
        keys = check_all_formats(results, fn, x_new)
    assert plan.nnz == len(keys)
    for fmt in FORMATS:  # the pattern: ones exactly where the refill stores entries
        P = plan.pattern(fmt)
        flat, data = assert_canonical(P, fmt, tuple(fn(x).shape), tuple(x.shape))
        np.testing.assert_array_equal(flat, keys)
        assert data.all()
    assert plan.rebuilds == 0


def test_structural_zeros_stay_and_dropped_entries_go():
    """``x[1:] - x[1:]`` is zero, but its two terms' entries are structural: stored (as
    explicit zeros) in every format; padding's entries without a place (-1) are not stored."""
    fn = lambda x: x[1:] - x[1:] + F.pad(x, (1, 1))[2:-1] * 0.0  # noqa: E731
    x = rand(12)
    for fmt in FORMATS:
        J = sparsejac.jacobian_of(fn, x, format=fmt)
        flat, data = assert_canonical(J, fmt, (11,), (12,))
        np.testing.assert_array_equal(flat, np.arange(11) * 12 + np.arange(1, 12))
        assert not np.any(data)
    J = sparsejac.jacobian_of(lambda x: F.pad(x, (2, 3)), x, format="coo")
    assert J.nnz == 12 and J.shape == (17, 12)


@pytest.mark.parametrize("shapes", [((4, 5), (6, 7)), ((3,), (2, 2, 5)), ((2, 3, 4), (500, 9))])
def test_rows_to_coords_agrees_with_the_division(shapes):
    """The gathered coordinates (formats.csr_to_coords) equal those divided out
    (formats.unravel_into), where the tables are used (sides no larger than the entries) and
    where not (a wide, sparse side)."""
    out_shape, inp_shape = shapes
    g = np.random.default_rng(0)
    dense = g.random((int(np.prod(out_shape)), int(np.prod(inp_shape)))) < 0.3
    csr = scipy.sparse.csr_array(dense.astype(float))
    for dtype in (np.int32, np.int64):
        k = len(out_shape)
        expected = np.empty((k + len(inp_shape), csr.nnz), dtype)
        formats.unravel_into(formats.csr_rows(csr.indptr), out_shape, expected[:k])
        formats.unravel_into(csr.indices, inp_shape, expected[k:])
        got = formats.csr_to_coords(csr.indptr, csr.indices, out_shape, inp_shape,
                                    np.dtype(dtype))
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["slice", "conv_plus_slice", "cnn"])
def test_the_guard_bounds_what_the_merged_writer_allocates(name, fmt):
    """numpy's peak (tracemalloc) of a first call at a size where the writer dominates (the
    trace's factors are torch's): the guard's prediction of the write bounds it, and not
    loosely (the merge's bound counts every entry enumerated as stored; COO adds its
    coordinates and their temporaries)."""
    fn, _ = PROGRAMS[name]
    x = {"slice": rand(200_000), "conv_plus_slice": rand(200_000),
         "cnn": rand(4, 2, 32, 32)}[name]
    peak = numpy_peak(fn, x, fmt)
    c = blocks(fn, x)
    (terms,), ((s1, s2),) = c.blocks, c.shapes
    predicted, _ = M.writer_for(terms, s1, s2, c.labels, fmt).nbytes(fmt, terms, c.labels, D)
    # the slack under: Python's own objects, which tracemalloc counts too (about 20 KB)
    assert 0.99 * peak <= predicted <= 2 * peak, (peak, predicted, predicted / peak)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["torch", "torch_csr"])
def test_torch_formats_of_a_cuda_argument_are_on_its_device(fmt):
    fn, shape = PROGRAMS["stencil"]
    x = rand(*shape)
    J = sparsejac.jacobian_of(fn, x.cuda(), format=fmt)
    assert J.device.type == "cuda"
    ref = sparsejac.jacobian_of(fn, x, format=fmt)
    np.testing.assert_allclose(J.cpu().to_dense().numpy(), ref.to_dense().numpy(), rtol=RTOL)
