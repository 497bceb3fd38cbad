"""Side-by-side benchmark of sparse Jacobian construction from einsums.

    python benchmarks/bench_jacobian.py                  # the full table
    python benchmarks/bench_jacobian.py --quick          # small sizes only
    python benchmarks/bench_jacobian.py --only n=24,n=64 # cases whose id contains any of these

docs/benchmarks.md shows the table, the command and the machine it ran on, and how long it took.

Every measurement runs in a fresh subprocess (so peak memory is that call's alone and every
method pays the same cold-start costs): the time of one call after imports and operand
creation, and the peak resident memory above the process's memory before the call. Results are
reported as ratios to the *write floor* (allocating and filling arrays of the output's sizes and
dtypes, on every core in slabs, as sparsejac writes) and to the output's own bytes, because
absolute times vary between machines and runs. Alternatives predicted to exceed the memory available (or, for the embedding, a time
budget) are skipped by prediction and shown as such.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from measure import peak_above, reset_peak  # noqa: E402

METHODS = ["floor-csr", "floor-coo", "csr", "coo", "embed", "torch-jacobian", "torch-jacrev", "note-dense"]


@dataclass(frozen=True)
class Case:
    id: str
    subscripts: str
    shapes: tuple
    wrt: int = 0


def matmul(n: int) -> Case:
    return Case(f"ij,jk->ik n={n}", "ij,jk->ik", ((n, n), (n, n)))


CASES = [
    *[matmul(n) for n in (24, 64, 128, 256, 512, 1024)],
    Case("bij,bjk->bik b=16 n=128", "bij,bjk->bik", ((16, 128, 128), (16, 128, 128))),
    Case("conv bchwkt,fckt->bfhw", "bchwkt,fckt->bfhw", ((8, 16, 32, 32, 3, 3), (32, 16, 3, 3))),
    Case("attn bhqd,bhkd->bhqk", "bhqd,bhkd->bhqk", ((2, 8, 256, 64), (2, 8, 256, 64))),
    Case("abcd,efd-> (scalar)", "abcd,efd->", ((64, 64, 64, 32), (64, 64, 32))),
    Case("dense layer bi,ij->bj wrt w", "bi,ij->bj", ((64, 256), (256, 256)), wrt=1),
]
QUICK = [matmul(24), matmul(64), matmul(128), Case("abcd,efd-> small", "abcd,efd->", ((16, 16, 16, 8), (16, 16, 8)))]


# --------------------------------------------------------------------------- one measurement


def measure(case: Case, method: str) -> dict:
    """Run inside the subprocess: build once, report time, peak and output bytes."""
    import sparsejac

    rng = np.random.default_rng(0)
    operands = [rng.standard_normal(s, dtype=np.float32) for s in case.shapes]
    plan = sparsejac.plan(case.subscripts, *case.shapes, wrt=case.wrt)
    out_bytes = plan.nbytes("coo" if method in ("coo", "floor-coo", "embed") else "csr", np.float32)

    if method.startswith("floor"):
        # Allocate and fill arrays of the output's sizes and dtypes, nothing else.
        from sparsejac.formats import index_dtype

        fmt = method.split("-")[1]
        nnz = plan.nnz

        from sparsejac.backend import NUMPY

        def filled(shape, dtype):
            # Filled on every core, in slabs, as sparsejac writes (a fair floor for it).
            array = np.empty(shape, dtype)
            NUMPY.copy_into(array, np.ones((), dtype))
            return array

        def run():
            data = filled(nnz, np.float32)
            if fmt == "csr":
                idx = index_dtype(nnz, plan.matrix_shape)
                return data, filled(nnz, idx), filled(plan.matrix_shape[0] + 1, idx)
            return data, filled((len(plan.shape), nnz), index_dtype(nnz, plan.shape))

    elif method in ("csr", "coo", "embed"):
        fmt = "coo" if method == "embed" else method
        how = "embed" if method == "embed" else "direct"

        def run():
            return sparsejac.jacobian(case.subscripts, *operands, wrt=case.wrt, format=fmt, method=how)

    elif method.startswith("torch"):
        import torch

        tensors = [torch.from_numpy(x) for x in operands]

        def f(t):
            return torch.einsum(case.subscripts, *(t if i == case.wrt else x for i, x in enumerate(tensors)))

        if method == "torch-jacrev":

            def run():
                return torch.func.jacrev(f)(tensors[case.wrt])

        else:

            def run():
                return torch.autograd.functional.jacobian(f, tensors[case.wrt], vectorize=True)

    elif method == "note-dense":
        # The seed note's construction: the other operand written on a diagonal of a dense
        # tensor of shape x.shape + w.shape + x.shape (for x @ w wrt x), then one einsum.
        x, w = operands
        I, J = x.shape
        K = w.shape[1]

        def run():
            E = np.zeros((I, J, J, K, I, J), np.float32)
            for i in range(I):
                for j in range(J):
                    E[i, j, j, :, i, j] = w[j, :]
            return np.einsum("ijjkmn->ikmn", E)

    else:
        raise ValueError(method)

    before = reset_peak()
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    peak = peak_above(before)
    del result
    return {"seconds": seconds, "peak": peak, "out_bytes": out_bytes}


# --------------------------------------------------------------------------- prediction


def available() -> int:
    from sparsejac.options import available_memory

    return available_memory() or 0


def skip_reason(case: Case, method: str) -> str | None:
    import sparsejac
    from sparsejac.embed import embedding_nnz

    plan = sparsejac.plan(case.subscripts, *case.shapes, wrt=case.wrt)
    budget = 0.6 * available()
    dense = plan.matrix_shape[0] * plan.matrix_shape[1] * 4
    if method in ("csr", "coo", "floor-csr", "floor-coo"):
        fmt = method.split("-")[-1]
        need = plan.nbytes(fmt, np.float32) * (1 if method.startswith("floor") else 1.05)
        return f"skipped: needs {need / 1e9:.1f} GB" if need > budget else None
    if method == "embed":
        n_all = embedding_nnz(plan.einsum)
        # sparse.einsum sorts every entry of the embedding (docs/how-it-works.md, "The note"); past
        # 2e7 entries it would take over a minute (the measured rate: docs/benchmarks.md, Einsums).
        if n_all > 2e7:
            return f"skipped: embedding of {n_all:.2g} entries, over 60 s predicted"
        return None
    if method.startswith("torch"):
        # Dense Jacobian plus the batched backward's buffers: at least 2x dense.
        if 2 * dense > budget:
            return f"skipped: dense {dense / 1e9:.0f} GB, out of memory"
        if plan.matrix_shape[0] > 70_000:
            return f"skipped: {plan.matrix_shape[0]} backward passes, too slow"
        return None
    if method == "note-dense":
        if case.subscripts != "ij,jk->ik":
            return "n/a"
        (I, J), (_, K) = case.shapes
        need = 4 * I * J * J * K * I * J
        return f"skipped: embedding {need / 1e9:.0f} GB" if need > min(budget, 2e9) else None
    return None


# --------------------------------------------------------------------------- driver


def run_one(case: Case, method: str, timeout: float) -> dict:
    code = (
        "import json, sys; sys.path.insert(0, %r); import bench_jacobian as b; "
        "case = [c for c in b.CASES + b.QUICK if c.id == %r][0]; "
        "print('RESULT', json.dumps(b.measure(case, %r)))"
    ) % (HERE, case.id, method)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {"status": f"failed: {tail[:80]}"}


def startup_overhead() -> dict:
    """Seconds a fresh process spends on importing sparsejac and its first coo and csr calls,
    over importing numpy, scipy.sparse and sparse."""
    code = (
        "import time; t0 = time.perf_counter(); import numpy, scipy.sparse, sparse; "
        "t1 = time.perf_counter(); import sys; sys.path.insert(0, %r); import sparsejac; "
        "x = numpy.ones((30, 40), numpy.float32); w = numpy.ones((40, 50), numpy.float32); "
        "sparsejac.jacobian('ij,jk->ik', x, w, format='coo'); "
        "sparsejac.jacobian('ij,jk->ik', x, w, format='csr'); t2 = time.perf_counter(); "
        "print(t1 - t0, t2 - t1)"
    ) % os.path.dirname(HERE)
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        runs.append([float(v) for v in out.stdout.split()])
    base, extra = min(r[0] for r in runs), min(r[1] for r in runs)
    return {"import_deps": base, "sparsejac_first_calls": extra}


def refill_ratio(n: int) -> dict:
    """A plan's refill against a fresh one-shot build, same process, best of 3."""
    import sparsejac

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    out = {}
    for fmt in ("csr", "coo"):
        fresh, refill = [], []
        p = sparsejac.plan("ij,jk->ik", x.shape, w.shape)
        p.jacobian(x, w, format=fmt)
        for _ in range(3):
            t = time.perf_counter()
            J = sparsejac.jacobian("ij,jk->ik", x, w, format=fmt)
            fresh.append(time.perf_counter() - t)
            del J
            t = time.perf_counter()
            J = p.jacobian(w, x, format=fmt)
            refill.append(time.perf_counter() - t)
            del J
        out[fmt] = (min(fresh), min(refill))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--only", help="run only cases whose id contains one of these "
                        "comma-separated texts")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    cases = QUICK if args.quick else CASES
    if args.only:
        texts = [t for t in args.only.split(",") if t]
        cases = [c for c in cases if any(t in c.id for t in texts)]

    print(f"machine: {os.cpu_count()} cores, {available() / 2**30:.1f} GiB available; float32; "
          "times of one cold call in a fresh process")
    print()
    print("| case | nnz | method | time (s) | time / floor | peak (MB) | peak / output bytes |")
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        import sparsejac

        plan = sparsejac.plan(case.subscripts, *case.shapes, wrt=case.wrt)
        results = {}
        for method in METHODS:
            reason = skip_reason(case, method)
            results[method] = {"status": reason} if reason else run_one(case, method, args.timeout)
        for method in METHODS:
            r = results[method]
            if "status" in r:
                if r["status"] != "n/a":
                    print(f"| {case.id} | {plan.nnz:.3g} | {method} | {r['status']} | | | |")
                continue
            floor = results["floor-coo" if method in ("coo", "floor-coo", "embed") else "floor-csr"]
            ratio = f"{r['seconds'] / floor['seconds']:.2f}" if "seconds" in floor else ""
            print(
                f"| {case.id} | {plan.nnz:.3g} | {method} | {r['seconds']:.3f} | {ratio} | "
                f"{r['peak'] / 1e6:.0f} | {r['peak'] / max(r['out_bytes'], 1):.2f} |"
            )
        sys.stdout.flush()

    print()
    s = startup_overhead()
    print(f"startup: importing numpy+scipy.sparse+sparse {s['import_deps']:.2f} s; then importing "
          f"sparsejac and its first coo and csr calls {s['sparsejac_first_calls']:.3f} s")
    n = 128 if args.quick else 512
    for fmt, (fresh, refill) in refill_ratio(n).items():
        print(f"plan refill, ij,jk->ik n={n} {fmt}: fresh {fresh:.3f} s, refill {refill:.3f} s, "
              f"ratio {refill / fresh:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
