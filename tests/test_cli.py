"""The command line through subprocess, on small shapes: reports, saved files, error exits."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse
import sparse

import sparsejac

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(sparsejac.__file__)))


def run(*args, cwd=None, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "sparsejac", *args],
        capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=timeout,
    )


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "error" in lines[0]
    for word in words:
        assert word in lines[0], lines[0]


def test_random_operands_report_and_check():
    r = run("jacobian", "ij,jk->ik", "--shape", "3,4", "--shape", "4,5", "--check")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "shape (3, 5, 3, 4)" in out and "matrix (15, 12)" in out
    assert "nnz 60" in out and "density 0.333" in out
    assert "1.44 KB dense" in out  # 180 float64 elements
    assert " s:" in out  # the time
    assert "ok" in out and "MISMATCH" not in out


def test_operand_files_out_csr_coo_csc(tmp_path):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((4, 3)), rng.standard_normal((3, 5))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "w.npy", w)
    for fmt in ("csr", "csc", "coo"):
        out = tmp_path / f"J_{fmt}.npz"
        r = run("jacobian", "ij,jk->ik", "--operand", str(tmp_path / "x.npy"),
                "--operand", str(tmp_path / "w.npy"), "--wrt", "1", "--format", fmt,
                "--out", str(out), "--check")
        assert r.returncode == 0, r.stderr
        assert "saved to" in r.stdout and "ok" in r.stdout
        ref = sparsejac.jacobian("ij,jk->ik", x, w, wrt=1, format=fmt)
        if fmt == "coo":
            J = sparse.load_npz(out)
            np.testing.assert_array_equal(J.coords, ref.coords)
        else:
            J = scipy.sparse.load_npz(out)
            assert J.format == fmt
            np.testing.assert_array_equal(J.indices, ref.indices)
            np.testing.assert_array_equal(J.indptr, ref.indptr)
        np.testing.assert_array_equal(J.data, ref.data)


def test_seeded_operands_are_reproducible(tmp_path):
    outs = []
    for name in ("a", "b"):
        r = run("jacobian", "ij,jk->ik", "--shape", "2,3", "--shape", "3,2", "--dtype",
                "float32", "--seed", "3", "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        outs.append(scipy.sparse.load_npz(tmp_path / f"{name}.npz"))
    assert outs[0].dtype == np.float32
    np.testing.assert_array_equal(outs[0].data, outs[1].data)


def test_chunked_directory(tmp_path):
    import sparsejac.chunked as chunked
    import sparsejac.store as store

    out = tmp_path / "J"
    r = run("jacobian", "bij,bjk->bik", "--shape", "2,3,4", "--shape", "2,4,3", "--wrt", "1",
            "--chunks", "1,2,auto,-1,2,2", "--out", str(out), "--check")
    assert r.returncode == 0, r.stderr
    assert "blocks" in r.stdout and "saved" in r.stdout and "ok" in r.stdout
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 4, 3))
    ref = sparsejac.jacobian("bij,bjk->bik", x, w, wrt=1)
    J = store.load(out)
    assert J.shape == ref.shape and J.chunks[0] == (1, 1) and J.chunks[3] == (2,)
    np.testing.assert_array_equal(J.compute().todense(), ref.todense())
    # Without --out the blocks are built and counted.
    r = run("jacobian", "ij,jk->ik", "--shape", "30,20", "--shape", "20,10", "--chunks", "auto")
    assert r.returncode == 0, r.stderr
    assert "built 6,000 nonzeros" in r.stdout
    # An existing directory is not clobbered without --overwrite.
    r = run("jacobian", "bij,bjk->bik", "--shape", "2,3,4", "--shape", "2,4,3", "--chunks", "2",
            "--out", str(out))
    assert_one_line_error(r, "exists")
    r = run("jacobian", "bij,bjk->bik", "--shape", "2,3,4", "--shape", "2,4,3", "--chunks", "2",
            "--out", str(out), "--overwrite")
    assert r.returncode == 0, r.stderr


def test_check_skips_large_and_scalar():
    r = run("jacobian", "ij,jk->ik", "--shape", "60,60", "--shape", "60,60", "--check")
    assert r.returncode == 0, r.stderr
    assert "check skipped" in r.stdout
    r = run("jacobian", "i,->i", "--shape", "3", "--shape", "", "--wrt", "1", "--check")
    assert r.returncode == 0, r.stderr
    assert "nnz 3" in r.stdout and "ok" in r.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["jacobian", "ij,jk->iq", "--shape", "3,4", "--shape", "4,5"], ["'q'"]),
        (["jacobian", "ij,jk->ik", "--shape", "3,4", "--shape", "5,5"], ["'j'"]),
        (["jacobian", "ij,jk->ik", "--shape", "3,4"], ["2 operand(s)"]),
        (["jacobian", "ij,jk->ik", "--operand", "missing.npy", "--operand", "w.npy"],
         ["missing.npy", "does not exist"]),
        (["jacobian", "ij,jk->ik", "--shape", "300,300", "--shape", "300,300",
          "--memory-limit", "1M"], ["memory limit", "nothing was allocated"]),
        (["jacobian", "ij,jk->ik", "--shape", "3,4", "--shape", "4,5", "--wrt", "5"], ["wrt=5"]),
        (["jacobian", "ij,jk->ik", "--shape", "3,x", "--shape", "4,5"], ["--shape"]),
        (["jacobian", "ij,jk->ik", "--shape", "3,4", "--shape", "4,5", "--dtype", "bogus"],
         ["--dtype"]),
        (["jacobian", "ij,jk->ik", "--shape", "3,4", "--shape", "4,5", "--chunks", "2,2"],
         ["chunks"]),
        (["jacobian", "ij,jk->ik", "--shape", "3,4", "--shape", "4,5", "--chunks", "2",
          "--format", "csr"], ["--format"]),
        (["jacobian", "ij,jk->ik"], ["--operand", "--shape"]),  # usage error: exit 2
        (["jacobian", "ij,jk->ik", "--shape", "3,4", "--format", "dok"], ["dok"]),
        (["frobnicate"], ["frobnicate"]),
    ],
)
def test_errors_exit_nonzero_with_one_line(args, words, tmp_path):
    r = run(*args, cwd=tmp_path)
    assert_one_line_error(r, *words)
    assert r.stdout.count("Traceback") == 0


def test_bad_operand_file(tmp_path):
    (tmp_path / "bad.npy").write_text("not an array")
    np.save(tmp_path / "w.npy", np.ones((3, 3)))
    r = run("jacobian", "ij,jk->ik", "--operand", "bad.npy", "--operand", "w.npy", cwd=tmp_path)
    assert_one_line_error(r, "bad.npy")
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    r = run("jacobian", "i,i->", "--operand", "s.npy", "--operand", "s.npy", cwd=tmp_path)
    assert_one_line_error(r, "dtype")


def test_memory_error_exit_code_is_one():
    r = run("jacobian", "ij,jk->ik", "--shape", "300,300", "--shape", "300,300",
            "--memory-limit", "1K")
    assert r.returncode == 1


def test_usage_error_exit_code_is_two():
    assert run("jacobian", "ij,jk->ik").returncode == 2


def test_help_lists_the_jacobian_command():
    r = run("--help")
    assert r.returncode == 0 and "jacobian" in r.stdout and "demo" in r.stdout
    r = run("jacobian", "--help")
    assert r.returncode == 0 and "--chunks" in r.stdout and "--check" in r.stdout


def test_console_script_entry_point_is_cli_main():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["sparsejac"] == "sparsejac.cli:main"
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", "import sys; from sparsejac.cli import main; "
                        "sys.exit(main(['jacobian', 'ij->ji', '--shape', '2,3']))"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "nnz 6" in r.stdout


def test_plot_writes_a_picture(tmp_path):
    from PIL import Image

    png = tmp_path / "pattern.png"
    r = run("jacobian", "bij,bjk->bik", "--shape", "2,3,4", "--shape", "2,4,5", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert f"pattern drawn to {png}" in r.stdout
    pixels = np.asarray(Image.open(png).convert("L"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels.min() < 50 and pixels.max() > 200
    r = run("jacobian", "ij,jk->ik", "--shape", "3,4", "--shape", "4,5", "--chunks", "auto",
            "--plot", str(png))
    assert_one_line_error(r, "--plot applies to in-memory builds")


def test_operands_too_large_to_draw_are_refused_up_front():
    r = run("jacobian", "ij,jk->ik", "--shape", "100000,100000", "--shape", "100000,100000")
    assert_one_line_error(r, "random operands", "alone need about")
