"""What a newcomer reaches for: to_scipy for every result kind, csr_array everywhere, spy of
dask results and operators, memory_limit strings read as dask reads them (in Python and on the
command line), plan with a tuple wrt, and a clear error for torch formats without torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse

import sparsejac
from sparsejac import ArgumentError, JacobianTooLargeError, MissingDependencyError
from sparsejac.options import parse_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)
X, W = RNG.standard_normal((3, 4)), RNG.standard_normal((4, 5))
CSR = sparsejac.jacobian("ij,jk->ik", X, W, format="csr")


def same_matrix(M, expected=CSR, format="csr"):
    assert type(M) is (scipy.sparse.csr_array if format == "csr" else scipy.sparse.csc_array)
    assert M.shape == expected.shape
    np.testing.assert_allclose(M.toarray(), expected.toarray())
    assert M.nnz == expected.nnz


# -- to_scipy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("format", ["csr", "csc"])
@pytest.mark.parametrize("kind", ["coo", "csr", "csc", "torch", "torch_csr"])
def test_to_scipy_of_every_in_memory_format(kind, format):
    if kind.startswith("torch"):
        pytest.importorskip("torch")
    J = sparsejac.jacobian("ij,jk->ik", X, W, format=kind)
    same_matrix(sparsejac.to_scipy(J, format=format), format=format)


def test_to_scipy_reads_the_split_sparsejac_attaches_or_asks_for_it():
    J = sparsejac.jacobian("ij,jk->ik", X, W)  # sparse.COO of shape (3, 5, 3, 4)
    assert J.sparsejac_out_ndim == 2
    same_matrix(sparsejac.to_scipy(J))
    with pytest.raises(ArgumentError, match=r"to_scipy: cannot tell where the output axes.*out_ndim"):
        sparsejac.to_scipy(J * 1.0)  # arithmetic gives a new COO without the attribute
    same_matrix(sparsejac.to_scipy(J * 1.0, out_ndim=2))
    assert sparsejac.to_scipy(J * 1.0, out_ndim=1).shape == (3, 5 * 3 * 4)
    with pytest.raises(ArgumentError, match=r"out_ndim=5 is not between 0 and"):
        sparsejac.to_scipy(J, out_ndim=5)
    # A scalar output: one row.
    g = sparsejac.jacobian("ij->", X)
    assert g.shape == (3, 4) and sparsejac.to_scipy(g).shape == (1, 12)


def test_to_scipy_of_scipy_inputs_gives_arrays_without_copying():
    assert sparsejac.to_scipy(CSR) is CSR
    same_matrix(sparsejac.to_scipy(scipy.sparse.csr_matrix(CSR)))  # a matrix becomes an array
    same_matrix(sparsejac.to_scipy(scipy.sparse.coo_array(CSR)))
    with pytest.raises(sparsejac.ArgumentTypeError, match=r"to_scipy: expected a Jacobian"):
        sparsejac.to_scipy(np.ones((2, 2)))
    with pytest.raises(ArgumentError, match=r"format='coo' is not one of \['csr', 'csc'\]"):
        sparsejac.to_scipy(CSR, format="coo")


def test_to_scipy_of_a_linear_operator_and_of_programs():
    same_matrix(sparsejac.to_scipy(sparsejac.linear_operator("ij,jk->ik", X, W)))
    torch = pytest.importorskip("torch")
    x, w = torch.from_numpy(X), torch.from_numpy(W)
    for fmt in ("coo", "csr", "csc", "torch", "torch_csr"):
        J = sparsejac.jacobian_of(lambda x: x @ w, x, format=fmt)
        same_matrix(sparsejac.to_scipy(J))
        H = sparsejac.hessian_of(lambda x: (x ** 3).sum(), x, format=fmt)
        expected = scipy.sparse.csr_array(np.diag(6 * X.ravel()))
        same_matrix(sparsejac.to_scipy(H), expected)


def test_to_scipy_of_chunked_and_loaded_jacobians(tmp_path):
    pytest.importorskip("dask")
    from sparsejac import chunked, store

    J = chunked.jacobian("ij,jk->ik", X, W, chunks=2)
    same_matrix(sparsejac.to_scipy(J))
    same_matrix(sparsejac.to_scipy(J, "csc"), format="csc")
    manifest = store.save(J, tmp_path / "J")
    assert manifest["out_ndim"] == 2
    L = store.load(tmp_path / "J")
    same_matrix(sparsejac.to_scipy(L))
    # Every block on disk reads back as a csr_array (never a csr_matrix).
    block = scipy.sparse.load_npz(tmp_path / "J" / "blocks" / "0.0.0.0.npz")
    assert isinstance(block, scipy.sparse.csr_array)
    # A generic dask array: no recorded split; say it.
    import dask.array as da

    A = da.from_array(np.eye(4).reshape(2, 2, 4), chunks=2)
    with pytest.raises(ArgumentError, match=r"pass out_ndim="):
        sparsejac.to_scipy(A)
    assert sparsejac.to_scipy(A, out_ndim=2).shape == (4, 4)


def test_no_csr_matrix_is_produced_anywhere():
    text = "".join(open(os.path.join(ROOT, "sparsejac", name)).read()
                   for name in os.listdir(os.path.join(ROOT, "sparsejac")) if name.endswith(".py"))
    assert "csr_matrix(" not in text and "csc_matrix(" not in text


# -- spy ------------------------------------------------------------------------------------------


def test_spy_of_dask_results_and_operators(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    pytest.importorskip("dask")
    from sparsejac import chunked, store
    from scipy.sparse.linalg import aslinearoperator

    reference = sparsejac.spy(CSR, out_shape=(3, 5), operand_shape=(3, 4))
    J = chunked.jacobian("ij,jk->ik", X, W, chunks=2)
    store.save(J, tmp_path / "J")
    for source in (J, store.load(tmp_path / "J"), sparsejac.linear_operator("ij,jk->ik", X, W)):
        ax = sparsejac.spy(source)
        assert ax.get_title() == reference.get_title()
        np.testing.assert_array_equal(ax.images[0].get_array(), reference.images[0].get_array())
        assert ax.get_xlabel() == "operand index, flattened (shape (3, 4))"
    with pytest.raises(sparsejac.ArgumentTypeError, match=r"linear operator.*cannot be read exactly"):
        sparsejac.spy(aslinearoperator(np.eye(3)))


# -- memory_limit strings -------------------------------------------------------------------------

SIZES = ["8GB", "8GiB", "512MB", "1.5GiB", "8G", "8Gi", "10 kB", "1e3", "5", "2TB", "3mib", "kB"]


@pytest.mark.parametrize("text", SIZES)
def test_sizes_are_read_as_dask_reads_them(text):
    dask_utils = pytest.importorskip("dask.utils")
    assert parse_bytes(text) == dask_utils.parse_bytes(text)


def test_size_units():
    assert parse_bytes("8GB") == parse_bytes("8G") == 8 * 10**9
    assert parse_bytes("8GiB") == parse_bytes("8Gi") == 8 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6 and parse_bytes("1.5GiB") == 3 * 2**29
    for bad in ("8Q", "", "nan", "-5G", "1e999", "GBB"):
        with pytest.raises(ArgumentError, match=r"memory_limit"):
            parse_bytes(bad)


def test_every_public_memory_limit_takes_strings():
    with pytest.raises(JacobianTooLargeError, match=r"memory limit of 1,000 bytes"):
        sparsejac.jacobian("ij,jk->ik", X, W, memory_limit="1kB")
    assert sparsejac.jacobian("ij,jk->ik", X, W, memory_limit="8GiB").nnz == CSR.nnz
    p = sparsejac.plan("ij,jk->ik", X.shape, W.shape)
    with pytest.raises(JacobianTooLargeError, match=r"1,024 bytes"):
        p.jacobian(X, W, memory_limit="1KiB")
    with pytest.raises(JacobianTooLargeError):
        p.pattern("csr", memory_limit="10B")
    assert p.jacobian(X, W, format="csr", memory_limit="1MB").nnz == CSR.nnz
    with pytest.raises(ArgumentError, match=r"memory_limit '8Q' is not a size"):
        sparsejac.jacobian("ij,jk->ik", X, W, memory_limit="8Q")


def test_memory_limit_strings_for_programs_and_dask():
    torch = pytest.importorskip("torch")
    x = torch.randn(64, 64, dtype=torch.float64)
    with pytest.raises(JacobianTooLargeError):
        sparsejac.jacobian_of(lambda x: torch.softmax(x, 1), x, memory_limit="10kB")
    assert sparsejac.jacobian_of(lambda x: x * 2, x, memory_limit="1GiB").nnz == 64 * 64
    with pytest.raises(JacobianTooLargeError):
        sparsejac.hessian_of(lambda x: (x @ x).sum(), x, memory_limit="10kB")
    with pytest.raises(JacobianTooLargeError):
        sparsejac.plan_of(lambda x: torch.softmax(x, 1), x, memory_limit="10kB")
    pytest.importorskip("dask")
    from sparsejac import chunked

    with pytest.raises(JacobianTooLargeError, match=r"1,000 bytes"):
        chunked.jacobian("ij,jk->ik", np.ones((40, 40)), np.ones((40, 40)), memory_limit="1kB")


def test_command_line_reads_sizes_as_python_does():
    from sparsejac.cli import parse_bytes as cli_parse_bytes

    assert cli_parse_bytes("8G") == 8 * 10**9 and cli_parse_bytes("8GiB") == 8 * 2**30
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "sparsejac", "jacobian", "ij,jk->ik", "--shape",
                        "30,30", "--shape", "30,30", "--memory-limit", "1K"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert r.returncode == 1 and "memory limit of 1,000 bytes" in r.stderr, r.stderr


# -- plan with a tuple wrt --------------------------------------------------------------------------


def test_plan_with_a_tuple_wrt_gives_tuples():
    ps = sparsejac.plan("ij,jk->ik", X.shape, W.shape, wrt=(0, 1))
    assert isinstance(ps, tuple) and len(ps) == 2 and isinstance(ps[1], sparsejac.Plan)
    expected = sparsejac.jacobian("ij,jk->ik", X, W, wrt=(0, 1), format="csr")
    got = ps.jacobian(X, W, format="csr")
    assert isinstance(got, tuple) and len(got) == 2
    for a, b in zip(got, expected):
        same_matrix(a, b)
    assert ps.nnz == (15 * 4, 15 * 4) and ps.shape == ((3, 5, 3, 4), (3, 5, 4, 5))
    assert ps.nbytes("csr") == tuple(p.nbytes("csr") for p in ps)
    assert [P.nnz for P in ps.pattern("csc")] == [60, 60]
    assert sparsejac.plan("ij,jk->ik", X.shape, W.shape, wrt=[-1]).matrix_shape == ((15, 20),)


# -- torch formats without torch ------------------------------------------------------------------


def test_torch_formats_without_torch_give_a_package_error():
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None   # as if torch were not installed
        import numpy as np, sparsejac
        for call in (lambda: sparsejac.jacobian("ij->ji", np.ones((2, 3)), format="torch_csr"),
                     lambda: sparsejac.plan("ij->ji", (2, 3)).jacobian(np.ones((2, 3)),
                                                                       format="torch")):
            try:
                call()
            except sparsejac.MissingDependencyError as error:
                assert isinstance(error, ImportError) and isinstance(error, sparsejac.SparsejacError)
                print(error)
        print(sparsejac.plan("ij->ji", (2, 3)).nbytes("torch"))   # a prediction needs no torch
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3, r.stdout
    assert "format='torch_csr' needs torch" in lines[0]
    assert "pip install 'einsum-sparsejac[torch]'" in lines[1]
    assert lines[2] == str(6 * (8 + 4 * 8))  # float64 values, four int64 coordinates
    assert issubclass(MissingDependencyError, ImportError)
