"""Every command-line failure is one line on stderr and a non-zero exit, never a traceback;
``--out`` never leaves a truncated file; the progress bar never holds up a run off a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.sparse

import sparsejac
from sparsejac import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(sparsejac.__file__)))
BASE = ["jacobian", "ij,jk->ik", "--shape", "3,4", "--shape", "4,5"]


def run_main(argv, capsys):
    """``sparsejac`` in this process: (exit status, stdout, stderr)."""
    try:
        code = cli.main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


TABLE = [
    # (extra arguments, words the one line must hold)
    (["--memory-limit", "nan"], ["--memory-limit 'nan'"]),
    (["--memory-limit", "1e999"], ["--memory-limit '1e999'"]),
    (["--memory-limit", "inf"], ["--memory-limit 'inf'"]),
    (["--memory-limit=-5G"], ["--memory-limit '-5G'"]),
    (["--memory-limit", "8Q"], ["--memory-limit '8Q'"]),
    (["--seed", "-1"], ["--seed -1"]),
    (["--seed", "x"], ["--seed"]),
    (["--plot", "p.foo"], ["--plot 'p.foo'", ".png"]),
    (["--plot", "noextension"], ["--plot 'noextension'"]),
    (["--dtype", "float17"], ["--dtype 'float17'"]),
    (["--dtype", "bool"], ["--dtype 'bool'"]),
    (["--wrt", "9"], ["wrt=9"]),
    (["--chunks", "a,b"], ["--chunks"]),
    (["--chunks", "0"], ["chunks=0"]),
    (["--out", "/nonexistent-dir/J.npz"], ["/nonexistent-dir"]),
    (["--format", "dense"], ["--format"]),
]


@pytest.mark.parametrize("extra, words", TABLE, ids=[" ".join(t[0]) for t in TABLE])
def test_bad_arguments_are_one_line(extra, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(BASE + extra, capsys)
    assert code not in (0, None), (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error" in lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("content, words", [
    (b"", ["empty"]),
    (b"\x93NUMPY garbage", ["cannot read operand file"]),
    (b"PK\x03\x04 not a zip", ["cannot read operand file"]),
])
def test_unreadable_operand_files_are_one_line(content, words, tmp_path, capsys):
    bad = tmp_path / "x.npy"
    bad.write_bytes(content)
    np.save(tmp_path / "w.npy", np.ones((3, 4)))
    code, _, err = run_main(["jacobian", "ij,jk->ik", "--operand", str(bad), "--operand",
                             str(tmp_path / "w.npy")], capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert all(w in err for w in words), err


@pytest.mark.parametrize("dtype, note", [("float16", "ok"), ("float128", "check skipped")])
def test_check_with_dtypes_torch_or_scipy_lack(dtype, note, capsys):
    pytest.importorskip("torch")
    if dtype == "float128" and np.dtype(np.longdouble).itemsize < 16:
        pytest.skip("no float128 here")
    code, out, err = run_main(BASE + ["--dtype", dtype, "--check"], capsys)
    assert code == 0, err
    assert note in out and "MISMATCH" not in out and err == ""


def test_unexpected_failures_are_one_line(capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(cli, "load_operands", boom)
    code, _, err = run_main(BASE, capsys)
    assert code == 1
    assert err.strip() == "sparsejac jacobian: error: RuntimeError: something unexpected"


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError])
def test_out_is_never_truncated(interrupt, tmp_path, capsys, monkeypatch):
    """An interrupted --out --overwrite leaves the old file whole and no temporary behind."""
    out = tmp_path / "J.npz"
    code, _, err = run_main(BASE + ["--out", str(out)], capsys)
    assert code == 0, err
    old = out.read_bytes()

    real = scipy.sparse.save_npz

    def dies_midway(file, matrix, compressed=True):
        with open(file, "wb") as f:
            f.write(b"PK\x03\x04 half an archive")
        raise interrupt("interrupted mid-write")

    monkeypatch.setattr(scipy.sparse, "save_npz", dies_midway)
    code, _, err = run_main(BASE + ["--seed", "7", "--out", str(out), "--overwrite"], capsys)
    assert code == (130 if interrupt is KeyboardInterrupt else 1)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert out.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["J.npz"]
    monkeypatch.setattr(scipy.sparse, "save_npz", real)
    code, _, err = run_main(BASE + ["--seed", "7", "--out", str(out), "--overwrite"], capsys)
    assert code == 0 and out.read_bytes() != old
    assert scipy.sparse.load_npz(out).shape == (15, 12)
    assert sorted(os.listdir(tmp_path)) == ["J.npz"]


def test_chunked_run_off_a_terminal_does_not_wait_for_the_progress_bar(tmp_path):
    """With stderr a pipe, a small --chunks save ends as soon as it is done (the bar's old
    10 s tick made every such run last at least 10 s)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "sparsejac", *BASE, "--chunks", "2", "--out", str(tmp_path / "J")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )
    seconds = time.perf_counter() - start
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no bar into a pipe
    assert seconds < 9.0, seconds
