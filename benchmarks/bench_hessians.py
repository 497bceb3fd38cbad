"""Sparse Hessians of scalar torch programs: sparsejac against torch.func.hessian and a JAX peer.

    python benchmarks/bench_hessians.py                  # every case
    python benchmarks/bench_hessians.py --quick          # small sizes, a smoke test
    python benchmarks/bench_hessians.py --cases tanh64   # some cases
    python benchmarks/bench_hessians.py --json out.json  # also the raw numbers

docs/benchmarks.md shows the table, the command and the machine it ran on, and how long it took.

Cases (CPU; inputs from a seeded numpy generator, the same values in torch and JAX):

- ``tanh64``: ``sum(tanh(x @ W) ** 2)``, x (64, 128), W (128, 128), float64, Hessian w.r.t. x
  (block-diagonal: 64 dense 128 x 128 blocks, 1,048,576 entries). float64 is the case the
  torch reference check uses;
- ``tanh32``: the same in float32;
- ``rosen_small``: Rosenbrock written with slices,
  ``(100 * (z[1:] - z[:-1] ** 2) ** 2 + (1 - z[:-1]) ** 2).sum()``, 2,000 variables, float64
  (small enough for ``torch.func.hessian``: a dense 32 MB Hessian);
- ``rosen``: the same Rosenbrock with 1e6 variables, float64 (tridiagonal; the dense Hessian has
  1e12 entries, 8 TB: ``torch.func.hessian`` is skipped).

Columns, each (case, method) in a fresh subprocess so that its peak memory is its own (the rise of
the resident size above the process's size before the call, benchmarks/measure.py), under a
timeout and a watchdog on its resident size:

- ``torch``: ``torch.func.hessian(fn)(x)``: the first call (cold) and the best of 3 after it;
  peak of the first call. Skipped where the dense Hessian alone exceeds 600 MB.
- peer: ``asdex`` (JAX automatic sparse differentiation; ``pip install asdex jax``): set-up =
  ``asdex.hessian_coloring`` (Hessian sparsity detection + star colouring) + jit compilation of
  ``asdex.hessian_from_coloring`` (one HVP per colour, forward-over-reverse); eval = the compiled
  evaluation on new values (best of 3 after a warm-up); peak of the whole. ``n/a`` where asdex or
  jax is not installed. float64 cases enable ``jax_enable_x64``.
- ``first``: ``sparsejac.hessian_of(fn, x, format="csr")``, the first call in a fresh process
  (torch and sparsejac imported before the clock starts, nothing else); ``first*``: the same with
  ``torch._dynamo`` imported before the clock starts (torch's forward-mode AD imports it lazily on
  its first decomposed op; see the notes).
- ``refill``: ``plan.jacobian(x_new, format="csr")`` of ``plan = sparsejac.plan_of(fn, x,
  order=2)`` (best of 3 after a warm-up), checked against torch (Hessian-vector products by
  ``torch.func.jvp`` of ``torch.func.grad`` on 4 random vectors; and the dense
  ``torch.func.hessian`` where it is under 100 MB).
- ``nnz``, ``result``: the CSR's stored entries and bytes (data + indices + indptr).

The project's targets are checked as ratios; notes give the measured terms of the cost where a
target is missed.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
from harness import GB, MB, cell_mb, cell_time, error, human, ok, timed, why  # noqa: E402
from measure import peak_above, reset_peak  # noqa: E402

# name: (description, dtype, full sizes, quick sizes)
CASES = {
    "tanh64": ("sum(tanh(x @ W) ** 2), x (64, 128), W (128, 128), wrt x, float64", "float64",
               dict(b=64, n=128), dict(b=8, n=16)),
    "tanh32": ("sum(tanh(x @ W) ** 2), x (64, 128), W (128, 128), wrt x, float32", "float32",
               dict(b=64, n=128), dict(b=8, n=16)),
    "rosen_small": ("Rosenbrock by slices, 2,000 variables, float64", "float64",
                    dict(n=2000), dict(n=200)),
    "rosen": ("Rosenbrock by slices, 1e6 variables, float64", "float64",
              dict(n=1_000_000), dict(n=20_000)),
}

TORCH_DENSE_LIMIT = 600 * MB  # skip torch.func.hessian past this dense Hessian (its vmapped
# intermediates are several times the dense Hessian: 1e4 Rosenbrock variables passed 8 GB)
DENSE_CHECK_LIMIT = 100 * MB  # compare against the dense torch Hessian below this
PEER_TIMEOUT = 240.0

TARGETS = {  # name: (description, threshold, direction, cases)
    "peer_eval/refill": ("refill no slower than peer's jitted eval", 1.0, ">=", ("tanh64", "tanh32")),
    "peer_setup/first": ("first call >= 20x faster than peer set-up", 20.0, ">=", ("tanh64", "tanh32")),
    "torch/first": ("first call >= 10x faster than torch.func.hessian", 10.0, ">=",
                    ("tanh64", "tanh32")),
    "first_s": ("first call < 1 s", 1.0, "<", ("rosen",)),
    "peak/result": ("peak <= 2x result bytes", 2.0, "<=", ("rosen",)),
}


# --------------------------------------------------------------------------- the cases


def arrays(case: str, s: dict) -> dict:
    """The case's numpy arrays (its dtype): ``arg`` differentiated, ``arg_new`` new values."""
    dtype = np.dtype(CASES[case][1])
    rng = np.random.default_rng(0)
    if case.startswith("tanh"):
        b, n = s["b"], s["n"]
        return dict(W=(rng.standard_normal((n, n)) * n**-0.5).astype(dtype),
                    arg=rng.standard_normal((b, n)).astype(dtype),
                    arg_new=rng.standard_normal((b, n)).astype(dtype))
    n = s["n"]
    return dict(arg=rng.uniform(-2, 2, n).astype(dtype), arg_new=rng.uniform(-2, 2, n).astype(dtype))


def nvars(case: str, s: dict) -> int:
    return s["b"] * s["n"] if case.startswith("tanh") else s["n"]


def case_fn(case: str, a: dict, tanh):
    """The case's function of its argument, for torch or JAX: ``a`` the case's arrays and
    ``tanh`` in that framework (the rest is operators and methods both have)."""
    if case.startswith("tanh"):
        W = a["W"]

        def fn(x):
            return (tanh(x @ W) ** 2).sum()
    else:
        def fn(z):
            return (100 * (z[1:] - z[:-1] ** 2) ** 2 + (1 - z[:-1]) ** 2).sum()
    return fn


def torch_case(case: str, s: dict):
    import torch

    a = {k: torch.from_numpy(v) for k, v in arrays(case, s).items()}
    return case_fn(case, a, torch.tanh), a["arg"], a["arg_new"]


def jax_case(case: str, s: dict):
    import jax

    if CASES[case][1] == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    a = {k: jnp.asarray(v) for k, v in arrays(case, s).items()}
    return case_fn(case, a, jnp.tanh), a["arg"], a["arg_new"]


# --------------------------------------------------------------------------- workers


def _csr_bytes(H) -> int:
    return int(H.data.nbytes + H.indices.nbytes + H.indptr.nbytes)


def work_torch(case: str, s: dict) -> dict:
    import torch

    fn, x, x_new = torch_case(case, s)
    hess = torch.func.hessian(fn)
    base = reset_peak()
    t0 = time.perf_counter()
    H = hess(x)
    cold = time.perf_counter() - t0
    peak = peak_above(base)
    del H
    best, n = timed(lambda: hess(x_new))
    return dict(time=best, runs=n, cold=cold, peak=peak)


def work_first(case: str, s: dict, preimport: bool) -> dict:
    import sparsejac

    fn, x, _ = torch_case(case, s)
    if preimport:
        import torch._dynamo  # noqa: F401
    dynamo_before = "torch._dynamo" in sys.modules
    try:
        base = reset_peak()
        t0 = time.perf_counter()
        H = sparsejac.hessian_of(fn, x, format="csr")
        first = time.perf_counter() - t0
        peak = peak_above(base)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return error(e)
    out = dict(time=first, peak=peak, nnz=int(H.nnz), shape=list(H.shape),
               result_bytes=_csr_bytes(H), index_dtype=str(H.indices.dtype),
               dtype=str(H.dtype), preimport=preimport,
               dynamo_imported_by_call=(not dynamo_before) and "torch._dynamo" in sys.modules)
    del H
    base = reset_peak()
    t0 = time.perf_counter()
    H = sparsejac.hessian_of(fn, x, format="csr")
    out["second"] = time.perf_counter() - t0
    out["second_peak"] = peak_above(base)
    return out


def _check(H, fn, x_new) -> dict:
    """Relative max errors of ``H`` (CSR at ``x_new``) against torch: Hessian-vector products
    on 4 random vectors, and the dense ``torch.func.hessian`` where it is small."""
    import torch

    out = {}
    grad = torch.func.grad(fn)
    rng = np.random.default_rng(1)
    err = scale = 0.0
    for _ in range(4):
        v = torch.from_numpy(rng.standard_normal(tuple(x_new.shape)).astype(
            str(x_new.dtype).replace("torch.", "")))
        ref = torch.func.jvp(grad, (x_new,), (v,))[1].reshape(-1).numpy().astype(np.float64)
        mine = (H @ v.reshape(-1).numpy()).astype(np.float64)
        err = max(err, float(np.abs(mine - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    out["hvp_rel_err"] = err / max(scale, 1e-300)
    n = x_new.numel()
    if n * n * x_new.element_size() <= DENSE_CHECK_LIMIT:
        D = torch.func.hessian(fn)(x_new).reshape(n, n).numpy()
        out["dense_rel_err"] = float(np.abs(H.toarray() - D).max() / max(np.abs(D).max(), 1e-300))
        out["dense_nonzeros"] = int(np.count_nonzero(D))
    out["symmetric"] = bool(abs(H - H.T).max() == 0)
    return out


def work_plan(case: str, s: dict) -> dict:
    import sparsejac

    fn, x, x_new = torch_case(case, s)
    try:
        t0 = time.perf_counter()
        plan = sparsejac.plan_of(fn, x, order=2)
        build = time.perf_counter() - t0
        refill, n, refill_peak, H = harness.refill(plan, x, x_new)
    except Exception as e:  # noqa: BLE001
        return error(e)
    out = dict(build=build, time=refill, runs=n, refill_peak=refill_peak, nnz=int(H.nnz),
               result_bytes=_csr_bytes(H), rebuilds=getattr(plan, "rebuilds", None))
    try:
        out.update(_check(H, fn, x_new))
    except Exception as e:  # noqa: BLE001
        out["check_error"] = repr(e)[:200]
    return out


def work_peer(case: str, s: dict, chunk: int | None) -> dict:
    try:
        import asdex
        import jax
    except ImportError as e:
        return {"na": f"not installed ({e.name})"}
    try:
        f, x, x_new = jax_case(case, s)
        jax.block_until_ready((x, x_new))
        base = reset_peak()
        t0 = time.perf_counter()
        coloring = asdex.hessian_coloring(f, x)
        detect = time.perf_counter() - t0
        hf = jax.jit(asdex.hessian_from_coloring(f, coloring, chunk_size=chunk))
        compiled = hf.lower(x).compile()
        setup = time.perf_counter() - t0
        best, n = harness.jax_eval(compiled, x, x_new)
        peak = peak_above(base)
    except Exception as e:  # noqa: BLE001
        return error(e)
    return dict(setup=setup, detect=detect, time=best, runs=n, peak=peak,
                colors=int(coloring.num_colors), nnz=int(coloring.sparsity.nnz), chunk=chunk,
                dtype=str(x.dtype))


WORKERS = {
    "torch": lambda c, s, chunk: work_torch(c, s),
    "first": lambda c, s, chunk: work_first(c, s, False),
    "first_pre": lambda c, s, chunk: work_first(c, s, True),
    "plan": lambda c, s, chunk: work_plan(c, s),
    "peer": work_peer,
}


# --------------------------------------------------------------------------- driver


def spawn(case: str, method: str, sizes: dict, timeout: float, chunk: int | None = None) -> dict:
    # at least 4 GB: a transient dip of the shared machine's free memory must not kill a run
    return harness.spawn(str(Path(__file__).resolve()), case, method, sizes, timeout, chunk,
                         rss_floor=4 * GB, stderr_oom=False)


def measure_case(case: str, sizes: dict, timeout: float, log,
                 peer_timeout: float = PEER_TIMEOUT) -> dict:
    res: dict = {"sizes": sizes, "dtype": CASES[case][1]}
    for method in ("first", "first_pre", "plan"):
        res[method] = spawn(case, method, sizes, timeout)
        log(case, method, res[method])
    n = nvars(case, sizes)
    dense = n * n * np.dtype(CASES[case][1]).itemsize
    if dense > TORCH_DENSE_LIMIT:
        res["torch"] = {"status": f"skipped: dense H = {human(dense)}"}
    else:
        res["torch"] = spawn(case, "torch", sizes, timeout)
    log(case, "torch", res["torch"])
    for chunk in (None, 16):
        res["peer"] = spawn(case, "peer", sizes, peer_timeout, chunk)
        if not res["peer"].get("oom"):
            break
    log(case, "peer", res["peer"])
    return res


# --------------------------------------------------------------------------- the table


def ratios(case: str, res: dict) -> dict:
    first, plan, torch_, peer = res["first"], res["plan"], res["torch"], res["peer"]
    out: dict = {}
    if ok(plan) and ok(peer):
        out["peer_eval/refill"] = peer["time"] / plan["time"]
    if ok(first) and ok(peer):
        out["peer_setup/first"] = peer["setup"] / first["time"]
    if ok(first) and ok(torch_):
        out["torch/first"] = torch_["time"] / first["time"]
    if ok(first):
        out["first_s"] = first["time"]
        out["peak/result"] = first["peak"] / max(first["result_bytes"], 1)
    pre = res.get("first_pre")
    if ok(pre):  # the same, torch._dynamo imported before the clock
        if ok(peer):
            out["pre:peer_setup/first"] = peer["setup"] / pre["time"]
        if ok(torch_):
            out["pre:torch/first"] = torch_["time"] / pre["time"]
        out["pre:first_s"] = pre["time"]
        out["pre:peak/result"] = pre["peak"] / max(pre["result_bytes"], 1)
    return out


def verdict(name: str, value: float | None) -> str:
    _, threshold, direction, _ = TARGETS[name]
    unit = " s" if name == "first_s" else "x"
    return harness.verdict(value, threshold, direction, "{:.3g}" + unit)


def table(results: dict) -> str:
    lines = [
        "| case | dtype | nnz | result MB | torch.func.hessian s (cold) | torch peak MB "
        "| peer set-up s | peer eval s | peer peak MB | first call s | first peak MB "
        "| first* s | first* peak MB | 2nd call s | refill s | refill peak MB |",
        "|---" * 16 + "|",
    ]
    for case, res in results.items():
        first, pre, plan, torch_, peer = (res[k] for k in ("first", "first_pre", "plan", "torch",
                                                            "peer"))
        nnz = first.get("nnz") or plan.get("nnz")
        nbytes = first.get("result_bytes") or plan.get("result_bytes")
        lines.append("| " + " | ".join([
            case, res["dtype"], f"{nnz:,}" if nnz else "", f"{nbytes / MB:.1f}" if nbytes else "",
            (f"{torch_['time']:.4g} ({torch_['cold']:.3g})" if ok(torch_) else why(torch_)),
            cell_mb(torch_),
            cell_time(peer, "setup"), cell_time(peer) if ok(peer) else "", cell_mb(peer),
            cell_time(first), cell_mb(first), cell_time(pre), cell_mb(pre),
            f"{first['second']:.4g}" if ok(first) else "",
            cell_time(plan), cell_mb(plan, "refill_peak"),
        ]) + " |")
    lines += ["", "Targets. `first*`: the same first call with `torch._dynamo` "
              "imported before the clock (see notes).", "",
              "| case | target | value (first call) | value (first*) |", "|---|---|---|---|"]
    for case, res in results.items():
        r = ratios(case, res)
        for name, (desc, _, _, cases) in TARGETS.items():
            if case not in cases:
                continue
            pre = r.get("pre:" + name) if name != "peer_eval/refill" else None
            lines.append(f"| {case} | {desc} | {verdict(name, r.get(name))} | "
                         f"{verdict(name, pre) if pre is not None else ''} |")
    return "\n".join(lines)


def notes(results: dict) -> str:
    out = []
    for case, res in results.items():
        first, pre, plan, peer, torch_ = (res[k] for k in ("first", "first_pre", "plan", "peer",
                                                            "torch"))
        parts = []
        if ok(first):
            parts.append(f"hessian_of first call {first['time']:.3g} s"
                         + (" (imported torch._dynamo during the call)"
                            if first.get("dynamo_imported_by_call") else "")
                         + f", second call in the same process {first['second']:.3g} s "
                         f"(peak {first['second_peak'] / MB:.0f} MB); {first['nnz']:,} entries, "
                         f"{first['dtype']} values, {first['index_dtype']} indices")
        elif "traceback" in first or "status" in first:
            parts.append(f"hessian_of: {why(first)}")
        if ok(pre):
            parts.append(f"with torch._dynamo pre-imported: first call {pre['time']:.3g} s, "
                         f"peak {pre['peak'] / MB:.0f} MB")
        if ok(plan):
            parts.append(f"plan_of(order=2) build {plan['build']:.3g} s, refill {plan['time']:.3g} s"
                         f" (rebuilds {plan.get('rebuilds')})")
            if plan.get("hvp_rel_err") is not None:
                bad = plan["hvp_rel_err"] > (1e-4 if res["dtype"] == "float32" else 1e-10)
                parts.append(f"refill vs torch HVPs: rel. err {plan['hvp_rel_err']:.1e}"
                             + (" **WRONG**" if bad else ""))
            if plan.get("dense_rel_err") is not None:
                parts.append(f"vs dense torch.func.hessian: rel. err {plan['dense_rel_err']:.1e}, "
                             f"{plan['dense_nonzeros']:,} nonzeros in the dense Hessian")
            if "symmetric" in plan:
                parts.append(f"exactly symmetric: {plan['symmetric']}")
        elif "error" in plan or "status" in plan:
            parts.append(f"plan_of: {why(plan)}")
        if ok(torch_):
            parts.append(f"torch.func.hessian cold {torch_['cold']:.3g} s, best of "
                         f"{torch_['runs']} {torch_['time']:.3g} s")
        if ok(peer):
            parts.append(f"peer: detection+colouring {peer['detect']:.3g} s of set-up "
                         f"{peer['setup']:.3g} s; {peer['colors']} colours (star, HVPs), pattern "
                         f"nnz {peer['nnz']:,}, {peer['dtype']}")
            nnz = first.get("nnz") or plan.get("nnz")
            if nnz and nnz != peer["nnz"]:
                parts.append(f"pattern nnz differs: sparsejac {nnz:,}, peer {peer['nnz']:,}")
        else:
            parts.append(f"peer: {why(peer)}")
        out.append(f"- {case}: " + "; ".join(parts))
    return "\n".join(out)


def main(argv=None) -> int:
    parser = harness.parser(__doc__, "cases", CASES, 300.0,
                            "seconds for each torch subprocess", PEER_TIMEOUT)
    args = parser.parse_args(argv)
    if args.worker:
        return harness.run_worker(args.worker, WORKERS)
    cases = harness.names(parser, args.cases, CASES, "case")

    t_start = time.perf_counter()
    results = {}
    for case in cases:
        _, _, full, quick = CASES[case]
        results[case] = measure_case(case, quick if args.quick else full, args.timeout,
                                     harness.log, args.peer_timeout)

    header = (f"{datetime.datetime.now().isoformat(timespec='minutes')}; {os.cpu_count()} cores,"
              f"{harness.load_average()} {platform.machine()}, Python "
              f"{platform.python_version()}, {harness.versions(ROOT)}; CPU"
              f"{'; --quick sizes' if args.quick else ''}; "
              f"{time.perf_counter() - t_start:.0f} s in all")
    items = [f"- {case}: {CASES[case][0]}" if not args.quick
             else f"- {case}: {results[case]['sizes']}, {CASES[case][1]}" for case in cases]
    harness.report(header, items, table(results), notes(results), args.json, results,
                   {c: ratios(c, r) for c, r in results.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
