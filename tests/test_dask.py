"""Chunked Jacobians on dask: every block equals the same part of the in-memory Jacobian (values
and stored entries), for varied chunks; the saved directory round-trips; a distributed cluster
runs the same graph."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.sparse
import sparse
from hypothesis import given, settings, strategies as st

da = pytest.importorskip("dask.array")

import sparsejac
import sparsejac.chunked as chunked
import sparsejac.store as store
from strategies import einsum_problems, operands_for


def assert_canonical(block):
    again = sparse.COO(block.coords, block.data, shape=block.shape)  # default flags: sorts, sums
    np.testing.assert_array_equal(again.coords, block.coords)
    np.testing.assert_array_equal(again.data, block.data)


def check_blocks(J, ref):
    """Each block of the dask array ``J`` is the same slice of the in-memory COO ``ref``: same
    stored entries (zeros included), same values, sorted coordinates."""
    assert J.shape == ref.shape and J.dtype == ref.dtype
    total = 0
    for index in np.ndindex(*J.numblocks):
        # (dask's .blocks is broken for 0-d arrays: it yields the key; compute the array)
        block = J.blocks[index].compute() if J.ndim else J.compute()
        assert isinstance(block, sparse.COO)
        starts = [sum(c[:i]) for c, i in zip(J.chunks, index)]
        cut = tuple(slice(a, a + c[i]) for a, c, i in zip(starts, J.chunks, index))
        expected = ref[cut] if ref.ndim else ref
        assert block.shape == expected.shape and block.dtype == ref.dtype
        # The in-memory Jacobian stores exactly its structural entries; a slice keeps those
        # whose value is nonzero, so compare coordinates through the pattern.
        pattern = sparse.COO(ref.coords, np.ones(ref.nnz, dtype=bool), shape=ref.shape)
        want = pattern[cut] if ref.ndim else pattern
        assert block.nnz == want.nnz, index
        np.testing.assert_array_equal(block.coords, want.coords)
        np.testing.assert_array_equal(block.todense(), expected.todense())
        assert_canonical(block)
        total += block.nnz
    assert total == ref.nnz


@st.composite
def chunked_problems(draw):
    subscripts, shapes = draw(einsum_problems(max_operands=3, max_jacobian=1024))
    z = np.einsum(subscripts, *[np.empty(s) for s in shapes])
    k = draw(st.integers(0, len(shapes) - 1))
    shape = z.shape + tuple(shapes[k])
    chunks = tuple(draw(st.integers(1, max(n, 1))) for n in shape)
    return subscripts, shapes, k, chunks


@settings(max_examples=max(settings().max_examples // 2, 10))
@given(chunked_problems(), st.integers(0, 2**32 - 1))
def test_blocks_equal_in_memory_jacobian(problem, seed):
    subscripts, shapes, k, chunks = problem
    operands = operands_for(shapes, np.float64, seed)
    ref = sparsejac.jacobian(subscripts, *operands, wrt=k)
    J = chunked.jacobian(subscripts, *operands, wrt=k, chunks=chunks)
    check_blocks(J, ref)
    np.testing.assert_array_equal(J.compute().todense(), ref.todense())


@pytest.mark.parametrize(
    "chunks",
    [
        "auto",
        2,
        (3, 2, 4, 1),
        (-1, 2, -1, 3),
        {0: 2, 3: 1},
        ((1, 4), (2, 2, 2), (5,), (1, 1, 2)),
        (2, "auto", 2, "auto"),
    ],
)
def test_varied_chunks(chunks):
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((5, 4)), rng.standard_normal((4, 6))
    ref = sparsejac.jacobian("ij,jk->ik", x, w)
    J = chunked.jacobian("ij,jk->ik", x, w, chunks=chunks)
    if isinstance(chunks, tuple) and isinstance(chunks[0], tuple):
        assert J.chunks == chunks
    check_blocks(J, ref)


@pytest.mark.parametrize(
    "subscripts, shapes, wrt",
    [
        ("ii,ij->j", [(4, 4), (4, 3)], 0),  # a diagonal on the operand side
        ("bij,bjk->bik", [(3, 4, 5), (3, 5, 2)], 1),  # two deltas
        ("ij,jk->ik", [(3, 1), (4, 5)], 0),  # a broadcast dimension
        ("...i,...i->...", [(1, 3), (2, 3)], 0),
        ("abcd,efd->", [(2, 3, 2, 4), (3, 2, 4)], 1),  # a collapse, scalar output
        ("ij->", [(3, 4)], 0),  # one operand, no factor
        (",->", [(), ()], 0),  # a 0-d Jacobian
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.complex128])
def test_named_cases(subscripts, shapes, wrt, dtype):
    operands = operands_for(shapes, dtype, 3)
    ref = sparsejac.jacobian(subscripts, *operands, wrt=wrt)
    for chunks in ("auto", 1, 2):
        check_blocks(chunked.jacobian(subscripts, *operands, wrt=wrt, chunks=chunks), ref)


def test_slicing_computes_only_the_part():
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((6, 5)), rng.standard_normal((5, 7))
    ref = sparsejac.jacobian("ij,jk->ik", x, w).todense()
    J = chunked.jacobian("ij,jk->ik", x, w, chunks=(4, 3, 2, 2))
    for index in [(slice(1, 5), slice(None, None, 2), 3), (2, 3), (slice(None, None, -2), 0, 0, 1)]:
        np.testing.assert_array_equal(J[index].compute().todense(), ref[index])


def test_auto_chunks_bound_block_size_and_leave_no_block_empty():
    n = 1500  # J has 3.4e9 nonzeros: building the graph and one block must stay small and fast
    x = np.zeros((n, n), dtype=np.float32)
    w = np.arange(n * n, dtype=np.float32).reshape(n, n)
    J = chunked.jacobian("ij,jk->ik", x, w)
    assert J.shape == (n, n, n, n)
    assert J.chunks[2] == (n,)  # the delta's second axis is left whole: no empty block
    per_nnz = 4 + 8 * 4
    import dask
    from dask.utils import parse_bytes

    limit = parse_bytes(dask.config.get("array.chunk-size"))
    block = J.blocks[1, 2, 0, 3].compute()
    assert 0 < block.nnz * per_nnz <= limit
    assert block.nnz == J.chunks[0][1] * J.chunks[1][2] * J.chunks[3][3]
    # d z[i,k] / d x[i,j] = w[j,k]
    i, k, j = block.coords[0][0], block.coords[1][0], block.coords[3][0]
    i0, k0, j0 = sum(J.chunks[0][:1]), sum(J.chunks[1][:2]), sum(J.chunks[3][:3])
    assert block.coords[2][0] == i + i0
    assert block.data[0] == w[j + j0, k + k0]


def test_bad_chunks_are_refused():
    x, w = np.ones((2, 3)), np.ones((3, 4))
    with pytest.raises(sparsejac.ArgumentError):
        chunked.jacobian("ij,jk->ik", x, w, chunks=(1, 2))
    with pytest.raises(sparsejac.ArgumentTypeError):
        chunked.jacobian("ij,jk->ik", x, w, chunks=None)
    with pytest.raises(sparsejac.SubscriptError):
        chunked.jacobian("ij,jk->iq", x, w)


def test_save_load_float16(tmp_path):
    """scipy has no float16 sparse matrices; the block files store the values as they are."""
    operands = operands_for([(5, 4), (4, 6)], np.float16, 4)
    J = chunked.jacobian("ij,jk->ik", *operands, chunks=(2, 4, 3, 3))
    store.save(J, tmp_path / "J")
    L = store.load(tmp_path / "J")
    assert L.dtype == np.float16
    for index in np.ndindex(*J.numblocks):
        a, b = J.blocks[index].compute(), L.blocks[index].compute()
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.data, b.data)
        assert b.data.dtype == np.float16


@pytest.mark.parametrize("dtype", [np.float32, np.complex128])
def test_save_load_round_trip(tmp_path, dtype):
    operands = operands_for([(5, 4), (4, 6)], dtype, 4)
    J = chunked.jacobian("ij,jk->ik", *operands, chunks=(2, 4, 3, 3))
    ref = sparsejac.jacobian("ij,jk->ik", *operands)
    meta = store.save(J, tmp_path / "J")
    assert meta["nnz"] == ref.nnz
    L = store.load(tmp_path / "J")
    assert L.chunks == J.chunks and L.dtype == J.dtype and L.shape == J.shape
    for index in np.ndindex(*J.numblocks):
        a, b = J.blocks[index].compute(), L.blocks[index].compute()  # J.ndim > 0 here
        assert isinstance(b, sparse.COO)
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.data, b.data)
        assert a.data.dtype == b.data.dtype
    check_blocks(L, ref)
    # Reductions read back lazily: row sums and J @ v.
    dense = ref.todense()
    tol = 1e-12 if dtype == np.complex128 else 1e-5
    got = L.sum(axis=(2, 3)).compute()
    np.testing.assert_allclose(getattr(got, "todense", lambda: got)(), dense.sum(axis=(2, 3)),
                               rtol=tol, atol=tol)
    v = np.arange(20, dtype=dtype).reshape(5, 4)
    Jv = da.tensordot(L, da.from_array(v, chunks=(2, 3)), axes=((2, 3), (0, 1))).compute()
    np.testing.assert_allclose(getattr(Jv, "todense", lambda: Jv)(),
                               np.tensordot(dense, v, axes=((2, 3), (0, 1))), rtol=tol, atol=tol)


def test_saved_blocks_are_scipy_csr(tmp_path):
    x, w = np.arange(6.0).reshape(2, 3), np.arange(12.0).reshape(3, 4)
    store.save(chunked.jacobian("ij,jk->ik", x, w, chunks=-1), tmp_path / "J")
    meta = json.loads((tmp_path / "J" / "sparsejac-chunks.json").read_text())
    assert meta["shape"] == [2, 4, 2, 3] and meta["split"] == 2
    m = scipy.sparse.load_npz(tmp_path / "J" / "blocks" / "0.0.0.0.npz")
    ref = sparsejac.jacobian("ij,jk->ik", x, w, format="csr")
    np.testing.assert_array_equal(m.toarray(), ref.toarray())


def test_save_refuses_to_clobber_and_load_needs_metadata(tmp_path):
    J = chunked.jacobian("ij,jk->ik", np.ones((2, 3)), np.ones((3, 4)), chunks=2)
    store.save(J, tmp_path / "J")
    with pytest.raises(FileExistsError):
        store.save(J, tmp_path / "J")
    J2 = chunked.jacobian("ij,jk->ik", 2 * np.ones((2, 3)), 2 * np.ones((3, 4)), chunks=3)
    store.save(J2, tmp_path / "J", overwrite=True)
    L = store.load(tmp_path / "J")
    assert L.chunks == J2.chunks
    assert float(L.sum().compute()) == 2.0 * 24
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        store.save(J, tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "keep.txt").exists()
    os.remove(tmp_path / "J" / "sparsejac-chunks.json")
    with pytest.raises(FileNotFoundError):
        store.load(tmp_path / "J")


def test_save_a_generic_dask_array(tmp_path):
    x = np.zeros((6, 5))
    x[1, 2], x[4, 0], x[5, 4] = 1.0, -2.0, 3.0
    A = da.from_array(x, chunks=(4, 3))  # dense numpy blocks
    store.save(A, tmp_path / "A")
    np.testing.assert_array_equal(store.load(tmp_path / "A").compute().todense(), x)


def test_import_sparsejac_does_not_import_dask():
    import subprocess
    import sys

    code = "import sys, sparsejac; print('dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(chunked.__file__)), check=True)
    assert out.stdout.strip() == "False"


def test_distributed_local_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((6, 5)), rng.standard_normal((5, 4))
    ref = sparsejac.jacobian("ij,jk->ik", x, w)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            J = chunked.jacobian("ij,jk->ik", x, w, chunks=(2, 3, 6, 2))
            got = client.compute(J).result()
            np.testing.assert_array_equal(got.todense(), ref.todense())
            store.save(J, tmp_path / "J")  # the workers write the blocks
            L = store.load(tmp_path / "J")
            rows = L.sum(axis=(2, 3)).compute()
            np.testing.assert_allclose(rows.todense(), ref.todense().sum(axis=(2, 3)),
                                       rtol=1e-12, atol=1e-12)
    check_blocks(store.load(tmp_path / "J"), ref)


@pytest.mark.parametrize(
    "subscripts, shapes",
    [(",->", [(), ()]), ("i,j->ij", [(0,), (3,)]), ("ii,ij->j", [(3, 3), (3, 2)])],
)
def test_save_load_edge_shapes(tmp_path, subscripts, shapes):
    operands = operands_for(shapes, np.float64, 6)
    ref = sparsejac.jacobian(subscripts, *operands)
    meta = store.save(chunked.jacobian(subscripts, *operands, chunks=1), tmp_path / "J")
    assert meta["nnz"] == ref.nnz
    got = store.load(tmp_path / "J").compute()
    assert got.shape == ref.shape and got.nnz == ref.nnz
    np.testing.assert_array_equal(got.todense(), ref.todense())


def test_huge_factor_is_refused_and_broadcast_factor_stays_small():
    big = np.broadcast_to(1.0, (100_000, 100_000))
    with pytest.raises(sparsejac.JacobianTooLargeError, match=r"'ij,jk->ik'.*dense factor R"):
        chunked.jacobian("ij,jk->ik", big, big)
    # 'ij,j->ij' wrt 1: the factor is x itself; a broadcast x stays a length-1 base in the graph.
    x = np.broadcast_to(np.arange(3.0)[:, None], (3, 50_000))
    J = chunked.jacobian("ij,j->ij", x, np.ones(50_000), wrt=1, chunks=(3, 10_000, 10_000))
    ref = sparsejac.jacobian("ij,j->ij", np.array(x), np.ones(50_000), wrt=1)
    assert J.blocks[0, 0, 0].compute().nnz == 3 * 10_000
    got = J.sum(axis=(0, 1)).compute().todense()
    np.testing.assert_allclose(got, ref.sum(axis=(0, 1)).todense())


def test_zero_chunks_are_an_argument_error():
    with pytest.raises(sparsejac.ArgumentError, match=r"chunks=0"):
        chunked.jacobian("ij,jk->ik", np.ones((2, 3)), np.ones((3, 4)), chunks=0)
