"""A block store for lazy sparse arrays: saved and read back block by block.

:func:`save` writes the blocks of a ``dask.array.Array`` with sparse blocks (a Jacobian from
:func:`sparsejac.chunked.jacobian`, or any such array) to a directory as they are computed
(memory: a few blocks), atomically (a complete save or none at its path), and :func:`load` reads
such a directory back as the same lazy array, checking every block against the manifest (sizes,
sha256, indices) first. Each block is a CSR ``.npz`` of its matricization that
``scipy.sparse.load_npz`` reads as a ``csr_array``.

The manifest (:data:`MANIFEST`) also records ``out_ndim`` where the saved array carries it (a
Jacobian's output axes): :func:`sparsejac.to_scipy` then knows the ``(out.size, arg.size)``
split of a loaded Jacobian.

Importing this module imports dask; ``import sparsejac`` does not.

>>> import numpy as np, tempfile, os, sparsejac
>>> from sparsejac import chunked, store
>>> J = chunked.jacobian("ij,jk->ik", np.ones((4, 3)), np.ones((3, 5)), chunks=2)
>>> path = os.path.join(tempfile.mkdtemp(), "J")
>>> store.save(J, path)["nnz"]
60
>>> L = store.load(path)
>>> L.shape, sparsejac.to_scipy(L).shape
((4, 5, 4, 3), (20, 12))
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import io
import json
import math
import os
import shutil
import socket
import sys
import uuid
import zipfile
import zlib
from typing import Any, Sequence

import numpy as np
import sparse

try:
    import dask.array as da
    from dask.base import tokenize
except ImportError as error:  # the package's own error, with how to install dask
    from .errors import missing_dask

    raise missing_dask(__name__, error) from None

from . import formats
from .formats import OUT_NDIM
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    StoreError,
    StoreExistsError,
    StoreNotFoundError,
)

__all__ = ["save", "load", "MANIFEST"]

MANIFEST = "sparsejac-chunks.json"  # the manifest's file name in a save
BLOCKS = "blocks"
FORMAT_NAME = "sparsejac-chunks"
FORMAT_VERSION = 2


# -- indexing helpers shared by computed (sparsejac.chunked) and stored arrays ----------------------------


def ranges(index: Any, shape: tuple[int, ...]):
    """A basic index (slices and ints, as dask's getters pass) as contiguous ranges per axis,
    plus the index that takes the requested entries out of the block of those ranges."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1 :]
    index = index + (slice(None),) * (len(shape) - len(index))
    if len(index) != len(shape):
        raise IndexError(f"too many indices for an array of shape {shape}")
    starts, stops, post, trivial = [], [], [], True
    for i, n in zip(index, shape):
        if isinstance(i, (int, np.integer)):
            i = int(i) + n if i < 0 else int(i)
            if not 0 <= i < n:
                raise IndexError(f"index {i} is out of bounds for an axis of size {n}")
            starts.append(i), stops.append(i + 1), post.append(0)
            trivial = False
        elif isinstance(i, slice):
            start, stop, step = i.indices(n)
            if step == 1:
                stop = max(start, stop)
                starts.append(start), stops.append(stop), post.append(slice(None))
            else:
                picked = range(start, stop, step)
                if len(picked) == 0:
                    starts.append(0), stops.append(0), post.append(slice(None))
                else:
                    lo, hi = min(picked[0], picked[-1]), max(picked[0], picked[-1]) + 1
                    starts.append(lo), stops.append(hi)
                    # The block starts at the lowest picked index: walk it with the same step.
                    post.append(slice(0, None, step) if step > 0 else slice(hi - 1 - lo, None, step))
                    trivial = False
        else:
            raise IndexError(f"unsupported index {i!r}: only slices and integers")
    return tuple(starts), tuple(stops), None if trivial else tuple(post)


def empty_coo(shape: tuple[int, ...], dtype: np.dtype) -> sparse.COO:
    return formats.REGISTRY["coo"].wrap(np.empty((len(shape), 0), dtype=np.intp),
                                        np.empty(0, dtype=dtype), tuple(shape), None)


def _meta(ndim: int, dtype: np.dtype) -> sparse.COO:
    return empty_coo((0,) * ndim, dtype)


def from_blocks(blocks: Any, chunks, name: str) -> da.Array:
    """``dask.array.from_array`` over one of our array-likes, keeping its sparse blocks and
    its ``out_ndim`` (a Jacobian's output axes, for :func:`sparsejac.to_scipy`) if it has one."""
    meta = _meta(blocks.ndim, blocks.dtype)
    array = da.from_array(
        blocks, chunks=chunks, name=name, lock=False, asarray=False, fancy=False, meta=meta
    )
    if getattr(blocks, "out_ndim", None) is not None:
        setattr(array, OUT_NDIM, blocks.out_ndim)
    return array


# -- saving and loading ------------------------------------------------------------------------
#
# A save is written into a fresh, uniquely named hidden sibling of its path and renamed into
# place once complete (an overwrite swaps the two atomically where the system can, so the old
# save stays loadable until the new one is whole). The manifest lists every file the save wrote,
# with its size, nnz and sha256; load() checks each block against it before using it.

ALLOWED_KINDS = "biufc"  # dtypes a save may hold: bool, integers, floats, complex
HEADER_LIMIT = 4096  # bytes an .npy header may take inside a block file (numpy writes 128)
TMP_TAG = "sparsejac-tmp"
BLOCK_MEMBERS = ("data", "indices", "indptr", "shape", "format")
OPTIONAL_MEMBERS = ("_is_array",)  # scipy.sparse.load_npz then returns a csr_array


def _split(shape: tuple[int, ...]) -> int:
    """Where a block is cut into (rows, columns) for storage: the cut whose larger side is
    smallest, so that the column index fits in int32 whenever it can."""
    best, best_size = 0, None
    for s in range(len(shape) + 1):
        size = max(math.prod(shape[:s]), math.prod(shape[s:]))
        if best_size is None or size < best_size:
            best, best_size = s, size
    return best


def _as_coo(block: Any) -> sparse.COO:
    if isinstance(block, sparse.COO):
        return block
    if isinstance(block, sparse.SparseArray):
        return block.asformat("coo")
    return sparse.COO.from_numpy(np.asarray(block))


def _block_name(index: Sequence[int]) -> str:
    """The block file of ``index``, relative to the save and with '/' (as the manifest lists it)."""
    return BLOCKS + "/" + (".".join(str(i) for i in index) if len(index) else "0") + ".npz"


def _store_path(path: Any, caller: str) -> str:
    """``path`` as a non-empty str, or the package's error naming what was passed instead."""
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(
            f"sparsejac.store.{caller}: path must be a str or os.PathLike naming a directory, "
            f"got {type(path).__name__}"
        )
    path = os.fspath(path)
    if not isinstance(path, str):
        raise ArgumentTypeError(
            f"sparsejac.store.{caller}: path must be a str or os.PathLike of str, got "
            f"{type(path).__name__}"
        )
    if not path:
        raise ArgumentError(f"sparsejac.store.{caller}: path is an empty string")
    return path


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def _fsync_dir(path: str) -> None:
    """Make a directory's entries durable (where the system allows opening directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_block(block, block_id=None, *, directory: str, split: int, compressed: bool,
                 value_dtype: np.dtype):
    """Write one block as a scipy-readable CSR ``.npz`` of its matricization into the save's
    temporary directory; return its manifest entry (in a one-element object array)."""
    coo = _as_coo(block)
    if coo.fill_value != 0:
        raise ArgumentError(f"cannot save a block with fill value {coo.fill_value!r}, only 0")
    shape = coo.shape
    nrows, ncols = math.prod(shape[:split]), math.prod(shape[split:])
    nnz = coo.nnz
    data = np.ascontiguousarray(np.asarray(coo.data).astype(value_dtype, copy=False))
    # A sparse.COO keeps its coordinates lexicographically sorted and free of duplicates.
    indices, indptr = formats.coords_to_csr(coo.coords, shape, split)
    name = _block_name(block_id or ())
    path = os.path.join(directory, *name.split("/"))
    # The directory is this save's own: nothing else writes this name ("x" refuses a clash).
    with open(path, "xb") as f:
        (np.savez_compressed if compressed else np.savez)(
            f,
            indices=indices,
            indptr=indptr,
            format=np.array("csr"),
            shape=np.array([nrows, ncols], dtype=np.int64),
            data=data,
            _is_array=np.array(True),
        )
        f.flush()
        os.fsync(f.fileno())
    entry = {"file": name, "nnz": int(nnz), "bytes": os.path.getsize(path),
             "sha256": _sha256(path)}
    out = np.empty((1,) * len(shape), dtype=object)
    out[(0,) * len(shape)] = entry
    return out


def _listed_files(metadata: dict) -> list[str]:
    """Every file a save wrote, relative to it: the manifest and the blocks it lists."""
    return [MANIFEST] + [entry["file"] for entry in metadata["files"]]


def _unlisted(directory: str, metadata: dict) -> list[str]:
    """What ``directory`` holds that the save its manifest describes did not write."""
    listed = set(_listed_files(metadata))
    extra = []
    for root, dirs, files in os.walk(directory):
        rel = os.path.relpath(root, directory).replace(os.sep, "/")
        rel = "" if rel == "." else rel + "/"
        for name in dirs:
            full = os.path.join(root, name)
            if rel + name != BLOCKS or os.path.islink(full):
                extra.append(rel + name + "/")
        for name in files:
            full = os.path.join(root, name)
            if rel + name not in listed or os.path.islink(full):
                extra.append(rel + name)
        dirs[:] = [d for d in dirs if rel + d == BLOCKS and not os.path.islink(os.path.join(root, d))]
    return sorted(extra)


def _remove_save(directory: str, metadata: dict) -> None:
    """Delete what a save wrote (the files its manifest lists), then its directories if empty;
    anything else is left where it is."""
    for name in reversed(_listed_files(metadata)):  # the manifest last
        try:
            os.remove(os.path.join(directory, *name.split("/")))
        except FileNotFoundError:
            pass
    for folder in (os.path.join(directory, BLOCKS), directory):
        try:
            os.rmdir(folder)
        except OSError:
            pass


def _check_target(target: str, path: str, overwrite: bool) -> dict | None:
    """What is at ``target`` now: None for nothing (or an empty directory); the manifest of
    a previous save that ``overwrite`` allows replacing; else the reason to refuse."""
    if not os.path.lexists(target):
        return None
    if os.path.islink(target) or not os.path.isdir(target):
        raise StoreExistsError(f"{path} exists and is not a directory: not saving over it")
    if not os.listdir(target):
        return None
    if not overwrite:
        raise StoreExistsError(
            f"{path} exists and is not empty; pass overwrite=True to replace a previous save"
        )
    marker = os.path.join(target, MANIFEST)
    if not os.path.isfile(marker):
        raise StoreExistsError(
            f"{path} is not a sparsejac save (no {MANIFEST}): not overwriting it"
        )
    try:
        metadata = _read_manifest(marker)
    except StoreError as error:
        raise StoreExistsError(f"{path} is not a valid sparsejac save, not overwriting it: "
                               f"{error}") from None
    extra = _unlisted(target, metadata)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise StoreExistsError(
            f"{path} holds files that no sparsejac save wrote ({shown}): not overwriting it; "
            "move them away or save elsewhere"
        )
    return metadata


_RENAMEAT2: Any = False  # not looked up yet


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the system or file system cannot."""
    global _RENAMEAT2
    if _RENAMEAT2 is False:
        _RENAMEAT2 = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                function = libc.renameat2
                function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                     ctypes.c_char_p, ctypes.c_uint]
                function.restype = ctypes.c_int
                _RENAMEAT2 = function
            except (OSError, AttributeError):
                _RENAMEAT2 = None
    if _RENAMEAT2 is None:
        return False
    import ctypes

    at_fdcwd, rename_exchange = -100, 2
    if _RENAMEAT2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _commit(tmp: str, target: str, path: str, old: dict | None) -> None:
    """Move the complete save at ``tmp`` to ``target`` (replacing the save ``old`` describes)."""
    if old is None:
        try:
            os.rename(tmp, target)  # atomic; refused if something non-empty got there meanwhile
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise StoreExistsError(
                    f"{path} was created by another save (or program) while this one ran; "
                    "nothing was replaced and this save was discarded (pass overwrite=True to "
                    "replace it)"
                ) from None
            raise
        return
    try:
        swapped = _exchange(tmp, target)
    except FileNotFoundError:
        raise StoreError(f"{path} was removed while this save ran; this save was discarded") \
            from None
    if swapped:
        # tmp now holds what was at target: a save (this or a concurrent one's); remove it.
        _remove_save(tmp, _read_manifest_or(tmp, old))
        return
    # No atomic swap here: move the old save aside, then the new one in (a short window).
    aside = tmp + "-old"
    os.rename(target, aside)
    os.rename(tmp, target)
    _remove_save(aside, _read_manifest_or(aside, old))


def _read_manifest_or(directory: str, fallback: dict) -> dict:
    try:
        return _read_manifest(os.path.join(directory, MANIFEST))
    except StoreError:
        return fallback


def _clean_stale(parent: str, base: str) -> None:
    """Remove this host's temporary directories of saves to the same path whose process died
    (a save killed mid-way leaves one)."""
    prefix = f".{base}.{TMP_TAG}-{socket.gethostname()}-"
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive: its save is still running
        except ProcessLookupError:
            pass
        except OSError:
            continue
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def save(
    array: da.Array,
    path: str | os.PathLike,
    *,
    compressed: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Compute ``array`` block by block and write each block as it is computed.

    Memory: the blocks being computed at one time (one per worker thread), never the array. The
    directory holds ``sparsejac-chunks.json`` (the manifest: shape, chunks, dtype and, for every
    block file, its nnz, size and sha256) and ``blocks/I.J....npz``: each block as a CSR matrix
    of its leading axes by its trailing axes, readable by ``scipy.sparse.load_npz`` too (as a
    ``csr_array``). Works with whatever scheduler is active (a ``dask.distributed`` client
    included: the workers write, so ``path`` must be on a file system they share). Returns the
    manifest written.

    Guarantees: the save is written into a fresh hidden sibling directory and renamed to
    ``path`` only once complete, so an interrupted save leaves nothing at ``path`` and an
    interrupted ``overwrite`` leaves the previous save loadable. Of two saves to one path at
    once, one completes and the other raises :class:`~sparsejac.StoreExistsError` (with
    ``overwrite=True`` the last one to finish wins, whole). ``overwrite=True`` replaces only a
    previous save: a directory holding anything its manifest does not list is refused.
    """
    if not isinstance(array, da.Array):
        raise ArgumentTypeError(f"save needs a dask.array.Array, got {type(array).__name__}")
    path = _store_path(path, "save")
    dtype = np.dtype(array.dtype)
    if dtype.kind not in ALLOWED_KINDS or dtype.fields is not None:
        raise ArgumentError(f"sparsejac.store.save: cannot save dtype {dtype}; only bool, "
                            "integer, floating and complex arrays")
    target = os.path.abspath(path)
    parent, base = os.path.split(target)
    if not base or not os.path.isdir(parent):
        raise StoreError(f"{path}: its parent directory {parent!r} does not exist")
    old = _check_target(target, path, overwrite)
    _clean_stale(parent, base)
    tmp = os.path.join(
        parent, f".{base}.{TMP_TAG}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    )
    os.mkdir(tmp)
    committed = False
    try:
        os.mkdir(os.path.join(tmp, BLOCKS))
        ndim = array.ndim
        split = _split(array.shape)
        written = array.map_blocks(
            _write_block,
            directory=tmp,
            split=split,
            compressed=bool(compressed),
            value_dtype=dtype,
            dtype=object,
            chunks=tuple((1,) * len(c) for c in array.chunks),
            meta=np.empty((0,) * ndim, dtype=object),
            name="sparsejac-save-" + tokenize(array.name, tmp, compressed),
        )
        if progress:
            from dask.diagnostics import ProgressBar

            with ProgressBar(minimum=1.0):
                entries = np.asarray(written.compute(), dtype=object)
        else:
            entries = np.asarray(written.compute(), dtype=object)
        files = list(entries.ravel())  # C order of block indices
        metadata = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "shape": list(array.shape),
            "chunks": [list(c) for c in array.chunks],
            "dtype": dtype.str,
            "split": split,
            "nnz": int(sum(entry["nnz"] for entry in files)),
            "block_nnz": [entry["nnz"] for entry in files],
            "files": files,
            "layout": "blocks/<i>.<j>....npz (C order of block indices); CSR of "
            "(prod(block.shape[:split]), prod(block.shape[split:]))",
        }
        out_ndim = getattr(array, OUT_NDIM, None)
        if out_ndim is not None:
            metadata["out_ndim"] = int(out_ndim)  # the Jacobian's output axes (to_scipy)
        with open(os.path.join(tmp, MANIFEST), "x") as f:
            json.dump(metadata, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(os.path.join(tmp, BLOCKS))
        _fsync_dir(tmp)
        _commit(tmp, target, path, old)
        committed = True
        _fsync_dir(parent)
    finally:
        if not committed:
            shutil.rmtree(tmp, ignore_errors=True)  # this save's own directory, never shared
    return metadata


# -- reading and checking ----------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_manifest(marker: str) -> dict:
    """The manifest at ``marker``, checked to describe a consistent save (or a StoreError)."""
    try:
        with open(marker, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        raise StoreNotFoundError(f"{marker}: no such file") from None
    except OSError as error:
        raise StoreError(f"{marker}: cannot be read ({error})") from None
    try:
        metadata = json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        raise StoreError(f"{marker}: not valid JSON ({error})") from None
    _check_manifest(metadata, marker)
    return metadata


def _check_manifest(m: Any, where: str) -> None:
    def bad(what: str) -> StoreError:
        return StoreError(f"{where}: {what}")

    if not isinstance(m, dict):
        raise bad(f"expected a JSON object, found {type(m).__name__}")
    if m.get("format") != FORMAT_NAME:
        raise bad(f"unknown format {m.get('format')!r} (expected {FORMAT_NAME!r})")
    if m.get("version") != FORMAT_VERSION:
        raise bad(f"format version {m.get('version')!r} is not {FORMAT_VERSION} (saved by "
                  "another sparsejac version; save it again)")
    for key in ("shape", "chunks", "dtype", "split", "nnz", "block_nnz", "files"):
        if key not in m:
            raise bad(f"the key {key!r} is missing")
    shape = m["shape"]
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    chunks = m["chunks"]
    if not isinstance(chunks, list) or len(chunks) != len(shape):
        raise bad(f"chunks {chunks!r} do not give one list of block sizes per axis of {shape}")
    for d, (c, n) in enumerate(zip(chunks, shape)):
        if (not isinstance(c, list) or not c or not all(_is_int(k) and k >= 0 for k in c)
                or sum(c) != n):
            raise bad(f"chunks of axis {d} {c!r} are not non-negative block sizes summing to "
                      f"its length {n}")
    try:
        dtype = np.dtype(m["dtype"]) if isinstance(m["dtype"], str) else None
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.kind not in ALLOWED_KINDS or dtype.fields is not None:
        raise bad(f"dtype {m['dtype']!r} is not a bool, integer, floating or complex dtype")
    if not _is_int(m["split"]) or m["split"] != _split(tuple(shape)):
        raise bad(f"split {m['split']!r} is not the one a save of shape {shape} uses "
                  f"({_split(tuple(shape))})")
    numblocks = tuple(len(c) for c in chunks)
    files = m["files"]
    if not isinstance(files, list) or len(files) != math.prod(numblocks):
        raise bad(f"'files' must list {math.prod(numblocks)} block file(s), one per block")
    for flat, entry in enumerate(files):
        index = np.unravel_index(flat, numblocks) if numblocks else ()
        name = _block_name(tuple(int(i) for i in index))
        size = math.prod(chunks[d][int(i)] for d, i in enumerate(index))
        if not isinstance(entry, dict) or entry.get("file") != name:
            raise bad(f"entry {flat} of 'files' does not describe {name}")
        if not _is_int(entry.get("nnz")) or not 0 <= entry["nnz"] <= size:
            raise bad(f"{name}: nnz {entry.get('nnz')!r} is not an integer between 0 and the "
                      f"block's {size} elements")
        if not _is_int(entry.get("bytes")) or entry["bytes"] <= 0:
            raise bad(f"{name}: bytes {entry.get('bytes')!r} is not a positive integer")
        digest = entry.get("sha256")
        if (not isinstance(digest, str) or len(digest) != 64
                or any(ch not in "0123456789abcdef" for ch in digest)):
            raise bad(f"{name}: sha256 {digest!r} is not a hex SHA-256 digest")
    if m["block_nnz"] != [entry["nnz"] for entry in files]:
        raise bad("block_nnz does not match the nnz of the files listed")
    if not _is_int(m["nnz"]) or m["nnz"] != sum(entry["nnz"] for entry in files):
        raise bad(f"nnz {m['nnz']!r} is not the sum of the blocks' nnz")
    if "out_ndim" in m and not (_is_int(m["out_ndim"]) and 0 <= m["out_ndim"] <= len(shape)):
        raise bad(f"out_ndim {m['out_ndim']!r} is not an axis count between 0 and {len(shape)}")


def _member(archive: zipfile.ZipFile, file: str, key: str, shape: tuple[int, ...],
            dtype: np.dtype | None = None, kinds: str = "", itemsize: int = 8) -> np.ndarray:
    """The array ``key`` of a block file, refused unless its header gives ``shape`` and
    ``dtype`` (or a kind in ``kinds``), and never inflated past what those allow."""
    info = archive.getinfo(key + ".npy")
    limit = HEADER_LIMIT + math.prod(shape) * (dtype.itemsize if dtype is not None else itemsize)
    if info.file_size > limit:
        raise StoreError(
            f"{file}: {key!r} would inflate to {info.file_size:,} bytes, more than the {limit:,} "
            "its manifest allows; not reading it (damaged or malicious file)"
        )
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            got_shape, fortran, got = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            got_shape, fortran, got = np.lib.format.read_array_header_2_0(f)
        else:
            raise StoreError(f"{file}: {key!r} has .npy version {version}, expected 1.0 or 2.0")
        if dtype is not None and got != dtype:
            raise StoreError(f"{file}: {key!r} has dtype {got}, the manifest says {dtype}")
        if dtype is None and (got.kind not in kinds or got.hasobject or got.itemsize > itemsize):
            raise StoreError(f"{file}: {key!r} has dtype {got}, which a block never has")
        if tuple(got_shape) != shape:
            raise StoreError(f"{file}: {key!r} has shape {tuple(got_shape)}, expected {shape} "
                             "from the manifest")
        n = math.prod(shape) * got.itemsize
        raw = f.read(n + 1)
    if len(raw) != n:
        raise StoreError(f"{file}: {key!r} holds {len(raw):,} bytes of data, its header "
                         f"declares {n:,}")
    return np.frombuffer(raw, dtype=got).reshape(shape, order="F" if fortran else "C")


def read_block_csr(file: str, entry: dict, shape: tuple[int, ...], split: int,
                   dtype: np.dtype):
    """The block file ``file`` checked against its manifest ``entry`` (size, sha256, arrays,
    index ranges, sorted rows) as ``(data, indices, indptr, (nrows, ncols))``."""
    nrows, ncols = math.prod(shape[:split]), math.prod(shape[split:])
    nnz = entry["nnz"]
    try:
        with open(file, "rb") as f:
            raw = f.read(entry["bytes"] + 1)
    except FileNotFoundError:
        raise StoreNotFoundError(f"{file}: missing (the manifest lists it)") from None
    except OSError as error:
        raise StoreError(f"{file}: cannot be read ({error})") from None
    if len(raw) != entry["bytes"]:
        raise StoreError(f"{file}: {len(raw):,}{'+' if len(raw) > entry['bytes'] else ''} bytes, "
                         f"the manifest lists {entry['bytes']:,} (truncated or replaced)")
    if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise StoreError(f"{file}: its sha256 does not match the manifest's (damaged or edited "
                         "bytes)")
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
        names = set(archive.namelist())
        missing = [k for k in BLOCK_MEMBERS if k + ".npy" not in names]
        if missing:
            raise StoreError(f"{file}: the array(s) {missing} are missing")
        extra = sorted(names - {k + ".npy" for k in BLOCK_MEMBERS + OPTIONAL_MEMBERS})
        if extra:
            raise StoreError(f"{file}: unexpected member(s) {extra}")
        fmt = _member(archive, file, "format", (), kinds="U", itemsize=16)
        if str(fmt[()]) != "csr":
            raise StoreError(f"{file}: format {str(fmt[()])!r}, expected 'csr'")
        stored = _member(archive, file, "shape", (2,), kinds="iu")
        if tuple(int(n) for n in stored) != (nrows, ncols):
            raise StoreError(f"{file}: holds a ({int(stored[0])}, {int(stored[1])}) matrix, the "
                             f"manifest's chunks and split give ({nrows}, {ncols})")
        indptr = _member(archive, file, "indptr", (nrows + 1,), kinds="iu")
        indices = _member(archive, file, "indices", (nnz,), kinds="iu")
        data = _member(archive, file, "data", (nnz,), dtype=dtype)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as error:
        if isinstance(error, StoreError):
            raise
        raise StoreError(f"{file}: not a readable block file ({type(error).__name__}: {error})") \
            from None
    if indptr[0] != 0 or indptr[-1] != nnz:
        raise StoreError(f"{file}: indptr runs from {int(indptr[0])} to {int(indptr[-1])}, "
                         f"expected 0 to nnz={nnz}")
    if nrows and np.any(indptr[1:] < indptr[:-1]):
        raise StoreError(f"{file}: indptr decreases (rows out of order)")
    if nnz:
        if int(indices.min()) < 0 or int(indices.max()) >= ncols:
            raise StoreError(f"{file}: a column index lies outside 0..{ncols - 1} (found "
                             f"{int(indices.min())}..{int(indices.max())})")
        # Strictly increasing within each row: sorted, no duplicates.
        rising = indices[1:].astype(np.int64) > indices[:-1]
        starts = indptr[1:-1].astype(np.int64)
        starts = starts[(starts > 0) & (starts < nnz)]
        rising[starts - 1] = True  # a new row may start lower
        if not np.all(rising):
            raise StoreError(f"{file}: column indices are not sorted and unique within a row")
    return data, indices, indptr, (nrows, ncols)


def _read_block(directory: str, index: tuple[int, ...], shape: tuple[int, ...], split: int,
                dtype: np.dtype, entry: dict) -> sparse.COO:
    file = os.path.join(directory, *entry["file"].split("/"))
    data, indices, indptr, _ = read_block_csr(file, entry, shape, split, dtype)
    if data.shape[0] == 0:
        return empty_coo(shape, dtype)
    coords = formats.csr_to_coords(indptr, indices, shape[:split], shape[split:],
                                   formats.index_dtype(data.shape[0], shape))
    return formats.REGISTRY["coo"].wrap(coords, data.copy(), shape, None)


class StoredBlocks:
    """An array-like view of a saved directory for ``dask.array.from_array``: indexing reads the
    blocks it touches (only those), each checked against the manifest first."""

    def __init__(self, directory: str, metadata: dict) -> None:
        self.directory = directory
        self.shape = tuple(metadata["shape"])
        self.chunks = tuple(tuple(c) for c in metadata["chunks"])
        self.dtype = np.dtype(metadata["dtype"])
        self.ndim = len(self.shape)
        self.split = int(metadata["split"])
        self.out_ndim = metadata.get("out_ndim")
        self.files = metadata["files"]
        self.numblocks = tuple(len(c) for c in self.chunks)
        self.bounds = [np.concatenate([[0], np.cumsum(c)]).tolist() for c in self.chunks]

    def _block(self, index: tuple[int, ...]) -> sparse.COO:
        shape = tuple(self.chunks[d][i] for d, i in enumerate(index))
        flat = int(np.ravel_multi_index(index, self.numblocks)) if index else 0
        return _read_block(self.directory, index, shape, self.split, self.dtype, self.files[flat])

    def __getitem__(self, index: Any) -> sparse.COO:
        starts, stops, post = ranges(index, self.shape)
        # The blocks each axis's range touches, and the part of each.
        per_axis = []
        for d, (a, b) in enumerate(zip(starts, stops)):
            bounds = self.bounds[d]
            if a == b:
                per_axis.append([])
                continue
            first = bisect.bisect_right(bounds, a) - 1
            last = bisect.bisect_left(bounds, b) - 1
            per_axis.append([
                (i, max(a, bounds[i]) - bounds[i], min(b, bounds[i + 1]) - bounds[i])
                for i in range(first, last + 1)
            ])
        shape = tuple(b - a for a, b in zip(starts, stops))
        if any(not p for p in per_axis):
            result = empty_coo(shape, self.dtype)
        else:
            result = self._assemble(per_axis, ())
        return result if post is None else result[post]

    def _assemble(self, per_axis, prefix):
        d = len(prefix)
        if d == len(per_axis):
            block = self._block(tuple(i for i, _, _ in prefix))
            cut = tuple(slice(a, b) for _, a, b in prefix)
            whole = all(a == 0 and b == n for (_, a, b), n in zip(prefix, block.shape))
            return block if whole else block[cut]
        parts = [self._assemble(per_axis, prefix + (p,)) for p in per_axis[d]]
        return parts[0] if len(parts) == 1 else sparse.concatenate(parts, axis=d)


def load(path: str | os.PathLike) -> da.Array:
    """A directory written by :func:`save`, as a lazy ``dask.array.Array`` with ``sparse.COO``
    blocks and the saved chunks; each task reads one block file.

    The manifest is checked now (every field, and that each listed file exists with its listed
    size); each block is checked when read, before use: sha256, array shapes and dtypes, index
    ranges, sorted rows, and no array inflated past what the manifest allows. Any failure is a
    :class:`~sparsejac.StoreError` naming the file and what is wrong.
    """
    path = _store_path(path, "load")
    directory = os.path.abspath(path)
    marker = os.path.join(directory, MANIFEST)
    if not os.path.isfile(marker):
        raise StoreNotFoundError(
            f"{path} is not a saved sparsejac Jacobian (no {MANIFEST}; an interrupted save "
            "leaves none)"
        )
    metadata = _read_manifest(marker)
    for entry in metadata["files"]:
        file = os.path.join(directory, *entry["file"].split("/"))
        try:
            size = os.stat(file).st_size
        except FileNotFoundError:
            raise StoreNotFoundError(f"{file}: missing (listed in {marker})") from None
        if size != entry["bytes"]:
            raise StoreError(f"{file}: {size:,} bytes, the manifest lists {entry['bytes']:,} "
                             "(truncated or replaced)")
    reader = StoredBlocks(directory, metadata)
    name = "sparsejac-load-" + tokenize(directory, os.stat(marker).st_mtime_ns,
                                        [entry["sha256"] for entry in metadata["files"]])
    return from_blocks(reader, reader.chunks, name)
