"""The command line: ``sparsejac jacobian ...`` for large-shape runs, ``sparsejac demo`` (also
plain ``python -m sparsejac``).

    sparsejac jacobian SUBSCRIPTS (--operand FILE.npy ... | --shape 512,512 ...) [--wrt K]
              [--format coo|csr|csc] [--chunks SPEC] [--out PATH] [--dtype float32] [--check]
              [--plot FILE.png] [--seed N] [--memory-limit 8GB] [--overwrite]

``--memory-limit`` reads sizes as dask and ``memory_limit=`` in Python do: ``8GB`` and ``8G`` are
8 * 10**9 bytes, ``8GiB`` and ``8Gi`` are 8 * 2**30 (:func:`sparsejac.options.parse_bytes`).

Errors (bad subscripts, missing files, a Jacobian over the memory limit, ...) print one line on
stderr and exit with status 1 (2 for a malformed command line, 130 for Ctrl-C), never a
traceback. ``--out FILE.npz`` is written to a temporary file beside it and renamed into place, so
the final name never holds a truncated file and an old file stays intact until the new one is
complete. The progress bar of ``--chunks`` runs is drawn only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from typing import Sequence

import numpy as np

from . import formats, options
from .errors import DASK_HINT, ArgumentError
from .report import compare_with_torch, human_bytes, size_ratio

CHECK_LIMIT = 2_000_000  # dense elements up to which --check compares with torch
# The formats a run can save to an .npz: those whose container has a save_npz.
SAVE_NPZ = {"sparse": "sparse", "scipy": "scipy.sparse"}
CLI_FORMATS = tuple(f.name for f in formats.REGISTRY.values() if f.package in SAVE_NPZ)


class CommandError(Exception):
    """A problem with what the command line asks for (reported in one line, exit 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + line
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsejac", description="Exact sparse Jacobians of einsum expressions.")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    commands.add_parser("demo", help="check small cases against torch, then build large ones")
    jac = commands.add_parser(
        "jacobian",
        help="build the Jacobian of one einsum, report it, optionally save it",
        description="Build the exact sparse Jacobian of numpy.einsum(SUBSCRIPTS, *operands) with "
        "respect to operand K, print its shape, nnz, density, bytes against the dense bytes and "
        "the time, and optionally save it.",
    )
    jac.add_argument("subscripts", metavar="SUBSCRIPTS", help="einsum subscripts, e.g. 'ij,jk->ik'")
    source = jac.add_mutually_exclusive_group(required=True)
    source.add_argument("--operand", action="append", metavar="FILE.npy",
                        help="an operand saved with numpy.save (once per operand, in order)")
    source.add_argument("--shape", action="append", metavar="N,M,...",
                        help="the shape of a seeded random operand (once per operand; '' or () "
                        "for a scalar)")
    jac.add_argument("--wrt", type=int, default=0, metavar="K",
                     help="differentiate with respect to operand K (default 0)")
    jac.add_argument("--format", choices=CLI_FORMATS, default=None,
                     help="in-memory format (default csr: (z.size, operand.size))")
    jac.add_argument("--chunks", metavar="SPEC",
                     help="build block by block on dask: 'auto', N, or one entry per Jacobian "
                     "axis such as 100,auto,-1,50")
    jac.add_argument("--out", metavar="PATH",
                     help="write the Jacobian: a .npz (scipy's save_npz for csr/csc, sparse's for "
                     "coo), or with --chunks a directory of blocks (sparsejac.store.load reads it)")
    jac.add_argument("--dtype", metavar="DTYPE",
                     help="cast the operands to DTYPE (random operands default to float64)")
    jac.add_argument("--check", action="store_true",
                     help="compare with torch.autograd.functional.jacobian where the dense "
                     f"Jacobian has at most {CHECK_LIMIT:,} elements")
    jac.add_argument("--seed", type=int, default=0, help="seed of the random operands (default 0)")
    jac.add_argument("--memory-limit", metavar="BYTES",
                     help="refuse a build (in memory, or the factor R of a --chunks build) over "
                     "this many bytes: 8GB or 8G = 8*10^9, 8GiB or 8Gi = 8*2^30, as dask and "
                     "memory_limit= read them (default: the memory available)")
    jac.add_argument("--plot", metavar="FILE.png",
                     help="draw the sparsity pattern (sparsejac.spy) to an image; needs matplotlib")
    jac.add_argument("--overwrite", action="store_true",
                     help="replace an existing --out file or chunk directory")
    return parser


# -- parsing option values ---------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, ...]:
    """``"512,512"`` -> ``(512, 512)``; ``""``, ``"()"`` -> ``()``."""
    body = text.strip().strip("()[]").strip()
    if not body:
        return ()
    try:
        shape = tuple(int(part) for part in body.split(",") if part.strip() != "")
    except ValueError:
        raise CommandError(f"--shape {text!r} is not a list of integers such as 512,512") from None
    if any(n < 0 for n in shape):
        raise CommandError(f"--shape {text!r} has a negative size")
    return shape


def parse_chunks(text: str):
    text = text.strip()
    if text == "auto":
        return "auto"
    parts = [p.strip() for p in text.strip("()").split(",")]
    values: list = []
    for part in parts:
        if part == "auto":
            values.append("auto")
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise CommandError(
                f"--chunks {text!r}: expected 'auto', an integer, or one entry (integer, -1 or "
                "auto) per Jacobian axis separated by commas"
            ) from None
    return values[0] if len(values) == 1 else tuple(values)


def parse_bytes(text: str) -> int:
    """``--memory-limit``: a size as :func:`sparsejac.options.parse_bytes` (and dask) read it."""
    try:
        return options.parse_bytes(text, name="--memory-limit")
    except ArgumentError as error:
        raise CommandError(str(error)) from None


def _dtype(text: str | None) -> np.dtype | None:
    if text is None:
        return None
    try:
        dtype = np.dtype(text)
    except TypeError:
        raise CommandError(f"--dtype {text!r} is not a numpy dtype") from None
    if dtype.kind not in "iufc":
        raise CommandError(f"--dtype {text!r} is not numeric")
    return dtype


def _random(shape, dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    if dtype.kind in "iu":
        return rng.integers(-5 if dtype.kind == "i" else 0, 6, size=shape).astype(dtype)
    x = rng.standard_normal(shape)
    if dtype.kind == "c":
        x = x + 1j * rng.standard_normal(shape)
    return np.asarray(x).astype(dtype)


def load_operands(args) -> list[np.ndarray]:
    """The operands the command line names: ``--operand`` files, or seeded random arrays."""
    if args.seed < 0:
        raise CommandError(f"--seed {args.seed} must be a non-negative integer")
    dtype = _dtype(args.dtype)
    if args.operand:
        operands = []
        for path in args.operand:
            if not os.path.exists(path):
                raise CommandError(f"operand file {path!r} does not exist")
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                raise CommandError(f"operand file {path!r} is empty, not an .npy array")
            try:
                x = np.load(path, allow_pickle=False)
            except Exception as error:  # numpy raises ValueError, EOFError, OSError, zip errors
                raise CommandError(
                    f"cannot read operand file {path!r} as .npy: {type(error).__name__}: {error}"
                ) from None
            if not isinstance(x, np.ndarray):
                raise CommandError(f"operand file {path!r} is an .npz archive, not one array")
            operands.append(x if dtype is None else x.astype(dtype, copy=False))
        return operands
    rng = np.random.default_rng(args.seed)
    dtype = dtype or np.dtype(np.float64)
    shapes = [parse_shape(s) for s in args.shape]
    # Random operands are drawn in float64 before the cast: refuse sizes that cannot fit
    # before numpy tries (the Jacobian's own guard comes later).
    need = sum(math.prod(shape) for shape in shapes) * max(16, 2 * dtype.itemsize)
    available = options.available_memory()
    if available is not None and need > available:
        raise CommandError(
            f"the random operands of shapes {shapes} alone need about {human_bytes(need)}, over the "
            f"{human_bytes(available)} of memory available"
        )
    return [_random(shape, dtype, rng) for shape in shapes]


# -- the jacobian command ----------------------------------------------------------------------


def _summary(print_, plan, dtype) -> None:
    dense = math.prod(plan.shape)
    density = plan.nnz / dense if dense else 0.0
    print_(f"Jacobian of einsum {plan.subscripts!r} with respect to operand {plan.wrt} "
           f"(operand shapes {', '.join(str(s) for s in plan.shapes)}, {dtype})")
    print_(f"  shape {plan.shape} = matrix {plan.matrix_shape}")
    print_(f"  nnz {plan.nnz:,}  density {density:.3g}  dense would be {dense:,} elements "
           f"({human_bytes(dense * dtype.itemsize)})")


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(root, name))
    return total


def _check_plot_path(path: str) -> None:
    """Refuse, before any work, a --plot file whose format matplotlib cannot write."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise CommandError("--plot needs matplotlib: pip install 'einsum-sparsejac[plot]'") from None
    extension = os.path.splitext(path)[1][1:].lower()
    supported = FigureCanvasBase.get_supported_filetypes()
    if extension not in supported:
        raise CommandError(
            f"--plot {path!r}: cannot draw to {'.' + extension if extension else 'a file without an extension'}; "
            f"use one of {', '.join('.' + e for e in sorted(supported))}"
        )


def _torch_can_check(dtype: np.dtype) -> bool:
    """Whether torch has ``dtype`` (float128 and friends it has not)."""
    try:
        from .backend import torch_dtype

        torch_dtype(dtype)
    except ImportError:
        return True  # compare_with_torch reports the missing torch itself
    except Exception:
        return False
    return True


def write_npz_atomically(out: str, write, overwrite: bool = True) -> None:
    """Call ``write(temporary_path)`` for a sibling temporary ``.npz``, then rename it to
    ``out``: the final name never holds a partial file (without ``overwrite``, a file that
    appeared at ``out`` meanwhile is kept and the new one refused)."""
    directory = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(out) + ".", suffix=".tmp.npz",
                               dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)  # atomic, and never replaces
            except FileExistsError:
                raise CommandError(f"{out} appeared while this run wrote it; pass --overwrite "
                                   "to replace it") from None
            os.remove(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def run_jacobian(args, print_=print) -> int:
    from .plan import Plan

    if args.memory_limit:
        parse_bytes(args.memory_limit)  # refuse a bad size before any work
    if args.plot:
        _check_plot_path(args.plot)
    if args.out and args.chunks is None:
        out = args.out if args.out.endswith(".npz") else args.out + ".npz"
        if os.path.exists(out) and not args.overwrite:
            raise CommandError(f"{out} exists; pass --overwrite to replace it")
        if os.path.isdir(out):
            raise CommandError(f"{out} is a directory, not an .npz file")
        if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise CommandError(f"--out {args.out!r}: its directory does not exist")
    operands = load_operands(args)
    plan = Plan(args.subscripts, *(x.shape for x in operands), wrt=args.wrt)
    from .operands import as_arrays, result_dtype

    arrays = as_arrays(operands, args.subscripts)
    dtype = result_dtype(arrays)
    _summary(print_, plan, dtype)
    dense_bytes = math.prod(plan.shape) * dtype.itemsize
    want_check = args.check and math.prod(plan.shape) <= CHECK_LIMIT
    if args.check and not want_check:
        print_(f"  check skipped: the dense Jacobian has {math.prod(plan.shape):,} elements, "
               f"over the {CHECK_LIMIT:,} that torch is asked to build")
    elif want_check and not _torch_can_check(dtype):
        want_check = False
        print_(f"  check skipped: torch has no {dtype} to compare with")

    if args.chunks is not None:
        if args.plot:
            raise CommandError("--plot applies to in-memory builds, not to --chunks")
        if args.format not in (None, "coo"):
            raise CommandError("--format applies to in-memory builds; --chunks builds sparse.COO "
                               "blocks (saved as per-block CSR files)")
        return _run_chunked(args, print_, plan, arrays, dtype, dense_bytes, want_check)

    fmt = args.format or "csr"
    limit = parse_bytes(args.memory_limit) if args.memory_limit else None
    predicted = plan.nbytes(fmt, dtype)
    print_(f"  building {fmt} in memory (about {human_bytes(predicted)}) ...", flush=True)
    start = time.perf_counter()
    J = plan.jacobian(*arrays, format=fmt, memory_limit=limit)
    seconds = time.perf_counter() - start
    nbytes = plan.nbytes(fmt, J.dtype)  # exactly the arrays built
    print_(f"  built {fmt} in {seconds:.3f} s: {human_bytes(nbytes)} against {human_bytes(dense_bytes)} "
           f"dense ({size_ratio(dense_bytes, nbytes)})")
    ok = True
    if want_check:
        from .convert import to_scipy

        got = to_scipy(J, out_ndim=plan.out_ndim).toarray().reshape(plan.shape)
        # float16 operands give float32 scipy arrays (sparsejac.jacobian's policy): compare
        # with torch on the operands in that dtype, which is what was computed.
        check = arrays if J.dtype == dtype else [a.astype(J.dtype) for a in arrays]
        ok = compare_with_torch(print_, args.subscripts, check, plan.wrt, np.asarray(got))
    if args.plot:
        _plot(print_, J, plan, args.plot)
    if args.out:
        out = args.out if args.out.endswith(".npz") else args.out + ".npz"
        if os.path.exists(out) and not args.overwrite:
            raise CommandError(f"{out} exists; pass --overwrite to replace it")
        start = time.perf_counter()
        import importlib

        module = importlib.import_module(SAVE_NPZ[formats.get(fmt).package])
        write_npz_atomically(out, lambda tmp: module.save_npz(tmp, J, compressed=False),
                             args.overwrite)
        print_(f"  saved to {out} ({human_bytes(os.path.getsize(out))}) in "
               f"{time.perf_counter() - start:.3f} s")
    return 0 if ok else 1


def _plot(print_, J, plan, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise CommandError("--plot needs matplotlib: pip install 'einsum-sparsejac[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .spy import spy

    ax = spy(J, out_shape=plan.einsum.output_shape, operand_shape=plan.shapes[plan.wrt])
    ax.figure.suptitle(f"einsum {plan.subscripts!r}, d z / d operand {plan.wrt}", fontsize=10)
    try:
        ax.figure.savefig(path, dpi=100, bbox_inches="tight")
    except (ValueError, OSError) as error:
        raise CommandError(f"--plot {path!r}: {error}") from None
    finally:
        plt.close(ax.figure)
    print_(f"  pattern drawn to {path}")


def _run_chunked(args, print_, plan, arrays, dtype, dense_bytes, want_check) -> int:
    try:
        import dask  # noqa: F401
    except ImportError:
        raise CommandError(f"--chunks needs dask: {DASK_HINT}") from None
    from . import chunked, store

    limit = parse_bytes(args.memory_limit) if args.memory_limit else None
    J = chunked.jacobian(args.subscripts, *arrays, wrt=plan.wrt, chunks=parse_chunks(args.chunks),
                     memory_limit=limit)
    largest = tuple(max(c, default=0) for c in J.chunks)
    print_(f"  {math.prod(J.numblocks):,} blocks of at most {largest}, built and "
           f"{'written' if args.out else 'counted'} one at a time", flush=True)
    start = time.perf_counter()
    # A bar redrawn 10 times a second on a terminal; none into a log file or a pipe (its timer
    # thread would hold up the end of the run and Ctrl-C until its next tick).
    if sys.stderr.isatty():
        from dask.diagnostics import ProgressBar

        bar = ProgressBar(minimum=1.0, dt=0.1, out=sys.stderr)
    else:
        bar = contextlib.nullcontext()
    with bar:
        if args.out:
            if os.path.exists(args.out) and not os.path.isdir(args.out):
                raise CommandError(f"{args.out} exists and is not a directory")
            try:
                meta = store.save(J, args.out, overwrite=args.overwrite)
            except FileExistsError as error:
                raise CommandError(f"{error} (--overwrite)") from None
            nnz = meta["nnz"]
        else:
            counts = J.map_blocks(
                lambda b: np.full((1,) * b.ndim, b.nnz, dtype=np.int64),
                chunks=tuple((1,) * len(c) for c in J.chunks),
                dtype=np.int64,
                meta=np.empty((0,) * J.ndim, dtype=np.int64),
            ).compute()
            nnz = int(np.sum(counts))
    seconds = time.perf_counter() - start
    if nnz != plan.nnz:
        raise CommandError(f"the blocks hold {nnz:,} entries, expected {plan.nnz:,}")
    if args.out:
        nbytes = _dir_bytes(args.out)
        print_(f"  built and saved {nnz:,} nonzeros in {seconds:.3f} s to {args.out}: "
               f"{human_bytes(nbytes)} on disk against {human_bytes(dense_bytes)} dense "
               f"({size_ratio(dense_bytes, nbytes)})")
    else:
        nbytes = plan.nbytes("coo", dtype)
        print_(f"  built {nnz:,} nonzeros in {seconds:.3f} s (about {human_bytes(nbytes)} as COO "
               f"against {human_bytes(dense_bytes)} dense, {size_ratio(dense_bytes, nbytes)})")
    ok = True
    if want_check:
        ok = compare_with_torch(print_, args.subscripts, arrays, plan.wrt, np.asarray(J.compute().todense()))
    return 0 if ok else 1


def _error_line(message: str) -> None:
    """One line on stderr, whatever the message holds."""
    line = " ".join(str(message).split())
    print(f"sparsejac jacobian: {line}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in (None, "demo"):
        from .demo import main as demo

        return demo()
    if args.command == "jacobian":
        from .errors import SparsejacError

        try:
            return run_jacobian(args)
        except (CommandError, SparsejacError, OSError) as error:
            _error_line(f"error: {error}")
            return 1
        except MemoryError as error:
            _error_line(f"error: out of memory ({error or 'allocation failed'}); try --chunks")
            return 1
        except KeyboardInterrupt:
            _error_line("interrupted")
            return 130
        except Exception as error:  # never a traceback: one line naming what failed
            _error_line(f"error: {type(error).__name__}: {error}")
            return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
