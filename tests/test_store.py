"""The block store (``sparsejac.store``): atomic and concurrent saves, clobber protection, and
loads that check every block against the manifest (each damaged or edited file is refused with a
StoreError naming it)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
import scipy.sparse

pytest.importorskip("dask")
import sparsejac  # noqa: E402
import sparsejac.chunked as chunked  # noqa: E402
import sparsejac.store as store  # noqa: E402
from sparsejac import ArgumentTypeError, StoreError, StoreExistsError, StoreNotFoundError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(sparsejac.__file__)))
MANIFEST = "sparsejac-chunks.json"


def small_jacobian(scale: float = 1.0):
    x = np.arange(6.0).reshape(2, 3) + 1
    w = scale * (np.arange(12.0).reshape(3, 4) + 1)
    return chunked.jacobian("ij,jk->ik", x, w, chunks=(2, 2, 2, 3))


def saved(tmp_path, scale: float = 1.0):
    path = tmp_path / "J"
    store.save(small_jacobian(scale), path)
    return path


def manifest(path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def write_manifest(path, meta: dict) -> None:
    (path / MANIFEST).write_text(json.dumps(meta))


def block_arrays(path, name="blocks/0.0.0.0.npz") -> dict:
    with np.load(path / name) as f:
        return {k: f[k] for k in f.files}


def rewrite_block(path, arrays: dict, name="blocks/0.0.0.0.npz", nnz=None) -> None:
    """Replace a block file and update the manifest's size and checksum to match, so that only
    the structural checks can catch the edit."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    raw = buffer.getvalue()
    (path / name).write_bytes(raw)
    meta = manifest(path)
    for entry in meta["files"]:
        if entry["file"] == name:
            entry["bytes"] = len(raw)
            entry["sha256"] = hashlib.sha256(raw).hexdigest()
            if nnz is not None:
                entry["nnz"] = nnz
    meta["block_nnz"] = [e["nnz"] for e in meta["files"]]
    meta["nnz"] = sum(meta["block_nnz"])
    write_manifest(path, meta)


def read_all(path):
    return store.load(path).compute()


def test_round_trip_and_blocks_are_csr_arrays(tmp_path):
    path = saved(tmp_path)
    ref = sparsejac.jacobian("ij,jk->ik", np.arange(6.0).reshape(2, 3) + 1,
                             np.arange(12.0).reshape(3, 4) + 1)
    np.testing.assert_array_equal(read_all(path).todense(), ref.todense())
    meta = manifest(path)
    assert meta["version"] == 2 and len(meta["files"]) == 2
    assert all(len(e["sha256"]) == 64 and e["bytes"] > 0 for e in meta["files"])
    block = scipy.sparse.load_npz(path / "blocks" / "0.0.0.0.npz")
    assert isinstance(block, scipy.sparse.csr_array)
    assert sorted(os.listdir(tmp_path)) == ["J"]  # no temporary directory left behind


# -- each kind of damaged or edited block: (edit, words the message must hold) ----------------


def fewer_entries(path):
    a = block_arrays(path)
    a["data"], a["indices"] = a["data"][:-1], a["indices"][:-1]
    a["indptr"] = np.minimum(a["indptr"], len(a["data"])).astype(a["indptr"].dtype)
    rewrite_block(path, a)


def column_out_of_range(path):
    a = block_arrays(path)
    a["indices"] = a["indices"].copy()
    a["indices"][-1] = a["shape"][1]
    rewrite_block(path, a)


def column_negative(path):
    a = block_arrays(path)
    a["indices"] = a["indices"].copy()
    a["indices"][0] = -1
    rewrite_block(path, a)


def indptr_one_row_too_many(path):
    a = block_arrays(path)
    a["indptr"] = np.append(a["indptr"], a["indptr"][-1])
    rewrite_block(path, a)


def columns_unsorted(path):
    a = block_arrays(path)
    a["indices"] = a["indices"].copy()
    a["indices"][[0, 1]] = a["indices"][[1, 0]]
    rewrite_block(path, a)


def indptr_decreasing(path):
    a = block_arrays(path)
    a["indptr"] = a["indptr"].copy()
    a["indptr"][1] = a["indptr"][-1]
    rewrite_block(path, a)


def missing_key(path):
    a = block_arrays(path)
    del a["shape"]
    rewrite_block(path, a)


def block_shape_edited(path):
    a = block_arrays(path)
    a["shape"] = np.array([a["shape"][0], a["shape"][1] + 1], dtype=np.int64)
    rewrite_block(path, a)


def data_dtype_edited(path):
    a = block_arrays(path)
    a["data"] = a["data"].astype(np.float32)
    rewrite_block(path, a)


def object_member(path):
    a = block_arrays(path)
    a["data"] = a["data"].astype(object)
    buffer = io.BytesIO()
    np.savez(buffer, **a)  # pickled object array: never unpickled on load
    raw = buffer.getvalue()
    (path / "blocks/0.0.0.0.npz").write_bytes(raw)
    meta = manifest(path)
    meta["files"][0].update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    write_manifest(path, meta)


def bad_zip(path):
    raw = b"this is not a zip archive" * 10
    (path / "blocks/0.0.0.0.npz").write_bytes(raw)
    meta = manifest(path)
    meta["files"][0].update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    write_manifest(path, meta)


def flipped_byte(path):
    file = path / "blocks/0.0.0.0.npz"
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    file.write_bytes(bytes(raw))


def truncated(path):
    file = path / "blocks/0.0.0.0.npz"
    file.write_bytes(file.read_bytes()[:-10])


def missing_block(path):
    os.remove(path / "blocks/0.0.0.0.npz")


def manifest_fewer_files(path):
    meta = manifest(path)
    meta["files"] = meta["files"][:-1]
    write_manifest(path, meta)


def manifest_split(path):
    meta = manifest(path)
    meta["split"] = 1
    write_manifest(path, meta)


def manifest_negative_chunks(path):
    meta = manifest(path)
    meta["chunks"][0] = [4, -2]
    write_manifest(path, meta)


def manifest_dtype_i1(path):
    meta = manifest(path)
    meta["dtype"] = "|i1"
    write_manifest(path, meta)


def manifest_dtype_object(path):
    meta = manifest(path)
    meta["dtype"] = "|O"
    write_manifest(path, meta)


def manifest_nnz_sum(path):
    meta = manifest(path)
    meta["nnz"] += 1
    write_manifest(path, meta)


def manifest_block_nnz_too_large(path):
    meta = manifest(path)
    meta["files"][0]["nnz"] = 10**9
    meta["block_nnz"][0] = 10**9
    meta["nnz"] = sum(meta["block_nnz"])
    write_manifest(path, meta)


def manifest_missing_key(path):
    meta = manifest(path)
    del meta["shape"]
    write_manifest(path, meta)


def manifest_not_json(path):
    (path / MANIFEST).write_text("{not json")


DAMAGE = [
    (fewer_entries, "0.0.0.0.npz", r"shape|nnz"),
    (column_out_of_range, "0.0.0.0.npz", r"column index lies outside"),
    (column_negative, "0.0.0.0.npz", r"column index lies outside"),
    (indptr_one_row_too_many, "0.0.0.0.npz", r"'indptr' has shape"),
    (columns_unsorted, "0.0.0.0.npz", r"not sorted"),
    (indptr_decreasing, "0.0.0.0.npz", r"indptr decreases"),
    (missing_key, "0.0.0.0.npz", r"'shape'.*missing"),
    (block_shape_edited, "0.0.0.0.npz", r"manifest's chunks and split"),
    (data_dtype_edited, "0.0.0.0.npz", r"'data' has dtype float32, the manifest says float64"),
    (object_member, "0.0.0.0.npz", r"'data' has dtype object"),
    (bad_zip, "0.0.0.0.npz", r"not a readable block file.*BadZipFile"),
    (flipped_byte, "0.0.0.0.npz", r"sha256 does not match"),
    (truncated, "0.0.0.0.npz", r"truncated"),
    (missing_block, "0.0.0.0.npz", r"missing"),
    (manifest_fewer_files, MANIFEST, r"must list 2 block file"),
    (manifest_split, MANIFEST, r"split 1"),
    (manifest_negative_chunks, MANIFEST, r"chunks of axis 0"),
    (manifest_dtype_i1, "blocks/0.", r"'data' has dtype float64, the manifest says int8"),
    (manifest_dtype_object, MANIFEST, r"dtype '\|O'"),
    (manifest_nnz_sum, MANIFEST, r"nnz .* sum"),
    (manifest_block_nnz_too_large, MANIFEST, r"nnz 1000000000 is not an integer between"),
    (manifest_missing_key, MANIFEST, r"'shape' is missing"),
    (manifest_not_json, MANIFEST, r"not valid JSON"),
]


@pytest.mark.parametrize("damage, file, words", DAMAGE, ids=[d[0].__name__ for d in DAMAGE])
def test_damaged_or_edited_saves_are_refused(tmp_path, damage, file, words):
    path = saved(tmp_path)
    read_all(path)  # intact: loads
    damage(path)
    with pytest.raises(StoreError, match=words) as info:
        read_all(path)  # load() checks the manifest, the read checks each block
    assert file in str(info.value)
    if damage is missing_block:
        assert isinstance(info.value, StoreNotFoundError)


def test_zip_bomb_is_refused_without_inflating(tmp_path):
    """A block whose 'data' member inflates far past what the manifest's nnz allows is refused
    from the member's declared size, and a member lying about its size is read no further than
    the manifest allows."""
    path = saved(tmp_path)
    a = block_arrays(path)
    nnz = len(a["data"])
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (nnz,)})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for key in ("indices", "indptr", "shape", "format", "_is_array"):
            with z.open(key + ".npy", "w") as f:
                np.lib.format.write_array(f, a[key])
        with z.open("data.npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            zeros = bytes(1 << 20)
            for _ in range(300):  # 300 MB of zeros: about 0.3 MB compressed
                f.write(zeros)
    raw = buffer.getvalue()
    assert len(raw) < 2_000_000
    (path / "blocks/0.0.0.0.npz").write_bytes(raw)
    meta = manifest(path)
    meta["files"][0].update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    write_manifest(path, meta)
    tracemalloc.start()
    try:
        with pytest.raises(StoreError, match=r"0\.0\.0\.0\.npz.*'data' would inflate"):
            read_all(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000, peak

    # The same member with its declared size forged small: reading stops where the header ends.
    forged = bytearray(raw)
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        info = z.getinfo("data.npy")
        small = len(header.getvalue()) + 8 * nnz
    # Patch the central directory's zip64 extra field (uncompressed size) to the allowed size.
    big = info.file_size.to_bytes(8, "little")
    at = forged.rfind(big)
    assert at > 0
    forged[at:at + 8] = small.to_bytes(8, "little")
    forged = bytes(forged)
    (path / "blocks/0.0.0.0.npz").write_bytes(forged)
    meta["files"][0].update(bytes=len(forged), sha256=hashlib.sha256(forged).hexdigest())
    write_manifest(path, meta)
    tracemalloc.start()
    try:
        try:
            read_all(path)  # reads nnz zeros as the data; no more
        except StoreError as error:
            assert "0.0.0.0.npz" in str(error)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000, peak


def test_overwrite_refuses_a_directory_that_is_not_a_save(tmp_path):
    user = tmp_path / "thesis"
    (user / "blocks").mkdir(parents=True)
    (user / "blocks" / "0.npz").write_bytes(b"mine")
    (user / "thesis-chapter1.tex").write_text("\\chapter{One}")
    (user / "data.csv").write_text("1,2\n")
    before = sorted(p.name for p in user.rglob("*"))
    with pytest.raises(StoreExistsError, match=r"thesis.*not a sparsejac save"):
        store.save(small_jacobian(), user, overwrite=True)
    assert sorted(p.name for p in user.rglob("*")) == before
    assert (user / "data.csv").read_text() == "1,2\n"
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_overwrite_refuses_a_save_with_user_files_and_replaces_a_clean_one(tmp_path):
    path = saved(tmp_path)
    (path / "notes.txt").write_text("keep me")
    with pytest.raises(StoreExistsError, match=r"notes\.txt.*not overwriting"):
        store.save(small_jacobian(2.0), path, overwrite=True)
    assert (path / "notes.txt").read_text() == "keep me"
    np.testing.assert_array_equal(read_all(path).todense(),
                                  small_jacobian(1.0).compute().todense())
    os.remove(path / "notes.txt")
    with pytest.raises(StoreExistsError, match=r"overwrite=True"):
        store.save(small_jacobian(2.0), path)
    store.save(small_jacobian(2.0), path, overwrite=True)
    np.testing.assert_array_equal(read_all(path).todense(),
                                  small_jacobian(2.0).compute().todense())
    assert sorted(os.listdir(tmp_path)) == ["J"]
    with pytest.raises(StoreExistsError, match=r"not a directory"):
        (tmp_path / "file").write_text("x")
        store.save(small_jacobian(), tmp_path / "file", overwrite=True)


@pytest.mark.parametrize("bad", [None, 3, b"/tmp/x", ["a"]])
def test_bad_paths_are_argument_type_errors(bad):
    with pytest.raises(ArgumentTypeError, match=r"save: path must be"):
        store.save(small_jacobian(), bad)
    with pytest.raises(ArgumentTypeError, match=r"load: path must be"):
        store.load(bad)


# -- other processes: concurrent saves, and saves killed mid-way ------------------------------

CHILD = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    import dask
    import sparsejac.chunked as chunked
    import sparsejac.store as store

    path, scale, overwrite, go, slow = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], float(sys.argv[5])
    x = np.arange(30.0).reshape(6, 5) + 1
    w = scale * (np.arange(20.0).reshape(5, 4) + 1)
    J = chunked.jacobian("ij,jk->ik", x, w, chunks=(1, 2, 3, 5))   # 24 blocks

    def slowly(block):
        time.sleep(slow)
        return block

    J = J.map_blocks(slowly, dtype=J.dtype, meta=J._meta)
    while not os.path.exists(go):
        time.sleep(0.005)
    try:
        with dask.config.set(scheduler="threads", num_workers=2):
            store.save(J, path, overwrite=overwrite)
    except store.StoreError as error:
        print("StoreError:", error, file=sys.stderr)
        sys.exit(3)
""")


def child(tmp_path, path, scale, overwrite, go, slow=0.0):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = tmp_path / "child.py"
    script.write_text(CHILD.replace("store.StoreError", "__import__('sparsejac').StoreError"))
    return subprocess.Popen(
        [sys.executable, str(script), str(path), str(scale), "1" if overwrite else "0", str(go),
         str(slow)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def reference(scale: float):
    x = np.arange(30.0).reshape(6, 5) + 1
    w = scale * (np.arange(20.0).reshape(5, 4) + 1)
    return sparsejac.jacobian("ij,jk->ik", x, w).todense()


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_concurrent_saves_give_one_whole_save_or_a_clear_error(tmp_path, overwrite):
    path, go = tmp_path / "J", tmp_path / "go"
    if overwrite:
        store.save(small_jacobian(), path)  # something to overwrite
    procs = [child(tmp_path, path, scale, overwrite, go, slow=0.01) for scale in (1.0, 2.0)]
    time.sleep(0.2)
    go.write_text("")
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    codes = [r[2] for r in results]
    if overwrite:
        assert codes == [0, 0], results
    else:
        assert sorted(codes) == [0, 3], results  # one saved; the other refused, clearly
        loser = results[codes.index(3)]
        assert "StoreError" in loser[1] and "Traceback" not in loser[1]
    got = store.load(path).compute().todense()
    assert any(np.array_equal(got, reference(s)) for s in (1.0, 2.0)), "a mix of two saves"
    assert sorted(os.listdir(tmp_path)) == ["J", "child.py", "go"]


def wait_for_blocks(tmp_path, proc, timeout=60.0) -> None:
    """Until the child's temporary directory holds a block file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in os.listdir(tmp_path):
            if ".J.sparsejac-tmp-" in name and os.listdir(tmp_path / name / "blocks"):
                return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("the child never wrote a block")


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_save_killed_midway_leaves_nothing_or_the_old_save(tmp_path, overwrite):
    path, go = tmp_path / "J", tmp_path / "go"
    go.write_text("")
    if overwrite:
        store.save(small_jacobian(), path)
    proc = child(tmp_path, path, 2.0, overwrite, go, slow=0.2)
    wait_for_blocks(tmp_path, proc)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    if overwrite:
        np.testing.assert_array_equal(read_all(path).todense(),
                                      small_jacobian().compute().todense())
    else:
        assert not path.exists()
        with pytest.raises(StoreNotFoundError):
            store.load(path)
    # The killed save's temporary directory is hidden, and the next save to the path removes it.
    assert any(".J.sparsejac-tmp-" in n for n in os.listdir(tmp_path))
    store.save(small_jacobian(3.0), path, overwrite=True)
    np.testing.assert_array_equal(read_all(path).todense(),
                                  small_jacobian(3.0).compute().todense())
    assert not any(".J.sparsejac-tmp-" in n for n in os.listdir(tmp_path))
