"""Sparse Hessians of scalar torch programs: sparsejac against torch.func.hessian and a JAX peer.

    python benchmarks/bench_hessians.py                  # every case (about 10 minutes, 2 cores)
    python benchmarks/bench_hessians.py --quick          # small sizes, a smoke test
    python benchmarks/bench_hessians.py --cases tanh64   # some cases
    python benchmarks/bench_hessians.py --json out.json  # also the raw numbers

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
  its first decomposed op, about 4 s on these machines; see the notes).
- ``refill``: ``plan.jacobian(x_new, format="csr")`` of ``plan = sparsejac.plan_of(fn, x,
  order=2)`` (best of 3 after a warm-up), checked against torch (Hessian-vector products by
  ``torch.func.jvp`` of ``torch.func.grad`` on 4 random vectors; and the dense
  ``torch.func.hessian`` where it is under 100 MB).
- ``nnz``, ``result``: the CSR's stored entries and bytes (data + indices + indptr).

The targets of issue 11 are checked as ratios; notes give the measured terms of the cost where a
target is missed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from measure import peak_above, reset_peak  # noqa: E402

GB = 1e9
MB = 1e6

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
REPEAT_BUDGET = 60.0

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


def torch_case(case: str, s: dict):
    import torch

    a = {k: torch.from_numpy(v) for k, v in arrays(case, s).items()}
    if case.startswith("tanh"):
        W = a["W"]

        def fn(x):
            return (torch.tanh(x @ W) ** 2).sum()
    else:
        def fn(z):
            return (100 * (z[1:] - z[:-1] ** 2) ** 2 + (1 - z[:-1]) ** 2).sum()
    return fn, a["arg"], a["arg_new"]


def jax_case(case: str, s: dict):
    import jax

    if CASES[case][1] == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    a = {k: jnp.asarray(v) for k, v in arrays(case, s).items()}
    if case.startswith("tanh"):
        W = a["W"]

        def f(x):
            return (jnp.tanh(x @ W) ** 2).sum()
    else:
        def f(z):
            return (100 * (z[1:] - z[:-1] ** 2) ** 2 + (1 - z[:-1]) ** 2).sum()
    return f, a["arg"], a["arg_new"]


# --------------------------------------------------------------------------- workers


def _timed(run, budget: float = REPEAT_BUDGET) -> tuple[float, int]:
    """Best of up to 3 calls of ``run`` (fewer where they would exceed ``budget`` seconds)."""
    times = []
    while len(times) < 3:
        t0 = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - t0)
        del result
        if sum(times) + min(times) > budget:
            break
    return min(times), len(times)


def _error(e: BaseException) -> dict:
    first = (str(e).strip().splitlines() or [""])[0]
    return {"error": f"{type(e).__name__}: {first[:160]}",
            "traceback": traceback.format_exc()[-3000:]}


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
    best, n = _timed(lambda: hess(x_new))
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
        return _error(e)
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
        H = plan.jacobian(x, format="csr")  # warm-up
        del H
        base = reset_peak()
        refill, n = _timed(lambda: plan.jacobian(x_new, format="csr"))
        refill_peak = peak_above(base)
        H = plan.jacobian(x_new, format="csr")
    except Exception as e:  # noqa: BLE001
        return _error(e)
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
        jax.block_until_ready(compiled(x))  # warm-up
        best, n = _timed(lambda: jax.block_until_ready(compiled(x_new)))
        peak = peak_above(base)
    except Exception as e:  # noqa: BLE001
        return _error(e)
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


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_guarded(argv: list[str], timeout: float, rss_limit: int, env: dict) -> dict:
    """Run ``argv``; kill it past ``timeout`` seconds or ``rss_limit`` resident bytes."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, env=env)
        start, killed = time.monotonic(), None
        while proc.poll() is None:
            if _rss(proc.pid) > rss_limit:
                killed = "memory"
            elif time.monotonic() - start > timeout:
                killed = "timeout"
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        return {"rc": proc.returncode, "stdout": out.read(), "stderr": err.read(), "killed": killed}


def rss_limit() -> int:
    avail = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    # at least 4 GB: a transient dip of the shared machine's free memory must not kill a run
    return int(max(4 * GB, min(8 * GB, 0.6 * avail))) if avail else int(8 * GB)


def spawn(case: str, method: str, sizes: dict, timeout: float, chunk: int | None = None) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", case, method,
            json.dumps(sizes), json.dumps(chunk)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    limit = rss_limit()
    r = run_guarded(argv, timeout, limit, env)
    if r["killed"] == "timeout":
        return {"status": f"timeout (> {timeout:.0f} s)"}
    if r["killed"] == "memory":
        return {"status": f"killed: resident size over {limit / GB:.1f} GB", "oom": True}
    for line in r["stdout"].splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (r["stderr"].strip().splitlines() or ["?"])[-1]
    return {"status": f"failed: {tail[:160]}", "stderr": r["stderr"][-3000:]}


def measure_case(case: str, sizes: dict, timeout: float, log) -> dict:
    res: dict = {"sizes": sizes, "dtype": CASES[case][1]}
    for method in ("first", "first_pre", "plan"):
        res[method] = spawn(case, method, sizes, timeout)
        log(case, method, res[method])
    n = nvars(case, sizes)
    dense = n * n * np.dtype(CASES[case][1]).itemsize
    if dense > TORCH_DENSE_LIMIT:
        res["torch"] = {"status": f"skipped: dense H = {_human(dense)}"}
    else:
        res["torch"] = spawn(case, "torch", sizes, timeout)
    log(case, "torch", res["torch"])
    for chunk in (None, 16):
        res["peer"] = spawn(case, "peer", sizes, PEER_TIMEOUT, chunk)
        if not res["peer"].get("oom"):
            break
    log(case, "peer", res["peer"])
    return res


def _human(nbytes: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes:.0f} B"


# --------------------------------------------------------------------------- the table


def _ok(r) -> bool:
    return isinstance(r, dict) and "time" in r


def _why(r) -> str:
    if not isinstance(r, dict):
        return "n/a"
    for k in ("na", "status", "error"):
        if k in r:
            return ("n/a: " if k == "na" else "") + str(r[k]).replace("|", "/")
    return "n/a"


def _t(r: dict, key: str = "time") -> str:
    if _ok(r) and r.get(key) is not None:
        extra = f" (chunk {r['chunk']})" if r.get("chunk") else ""
        return f"{r[key]:.4g}{extra}"
    return _why(r)


def _mb(r: dict, key: str = "peak") -> str:
    if _ok(r) and r.get(key) is not None:
        return f"{r[key] / MB:.1f}"
    return ""


def ratios(case: str, res: dict) -> dict:
    first, plan, torch_, peer = res["first"], res["plan"], res["torch"], res["peer"]
    out: dict = {}
    if _ok(plan) and _ok(peer):
        out["peer_eval/refill"] = peer["time"] / plan["time"]
    if _ok(first) and _ok(peer):
        out["peer_setup/first"] = peer["setup"] / first["time"]
    if _ok(first) and _ok(torch_):
        out["torch/first"] = torch_["time"] / first["time"]
    if _ok(first):
        out["first_s"] = first["time"]
        out["peak/result"] = first["peak"] / max(first["result_bytes"], 1)
    pre = res.get("first_pre")
    if _ok(pre):  # the same, torch._dynamo imported before the clock
        if _ok(peer):
            out["pre:peer_setup/first"] = peer["setup"] / pre["time"]
        if _ok(torch_):
            out["pre:torch/first"] = torch_["time"] / pre["time"]
        out["pre:first_s"] = pre["time"]
        out["pre:peak/result"] = pre["peak"] / max(pre["result_bytes"], 1)
    return out


def verdict(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    _, threshold, direction, _ = TARGETS[name]
    met = {">=": value >= threshold, "<=": value <= threshold, "<": value < threshold}[direction]
    unit = " s" if name == "first_s" else "x"
    return f"{value:.3g}{unit} {'met' if met else '**missed**'}"


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
            (f"{torch_['time']:.4g} ({torch_['cold']:.3g})" if _ok(torch_) else _why(torch_)),
            _mb(torch_),
            _t(peer, "setup"), _t(peer) if _ok(peer) else "", _mb(peer),
            _t(first), _mb(first), _t(pre), _mb(pre),
            f"{first['second']:.4g}" if _ok(first) else "",
            _t(plan), _mb(plan, "refill_peak"),
        ]) + " |")
    lines += ["", "Targets (issue 11). `first*`: the same first call with `torch._dynamo` "
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
        if _ok(first):
            parts.append(f"hessian_of first call {first['time']:.3g} s"
                         + (" (imported torch._dynamo during the call)"
                            if first.get("dynamo_imported_by_call") else "")
                         + f", second call in the same process {first['second']:.3g} s "
                         f"(peak {first['second_peak'] / MB:.0f} MB); {first['nnz']:,} entries, "
                         f"{first['dtype']} values, {first['index_dtype']} indices")
        elif "traceback" in first or "status" in first:
            parts.append(f"hessian_of: {_why(first)}")
        if _ok(pre):
            parts.append(f"with torch._dynamo pre-imported: first call {pre['time']:.3g} s, "
                         f"peak {pre['peak'] / MB:.0f} MB")
        if _ok(plan):
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
            parts.append(f"plan_of: {_why(plan)}")
        if _ok(torch_):
            parts.append(f"torch.func.hessian cold {torch_['cold']:.3g} s, best of "
                         f"{torch_['runs']} {torch_['time']:.3g} s")
        if _ok(peer):
            parts.append(f"peer: detection+colouring {peer['detect']:.3g} s of set-up "
                         f"{peer['setup']:.3g} s; {peer['colors']} colours (star, HVPs), pattern "
                         f"nnz {peer['nnz']:,}, {peer['dtype']}")
            nnz = first.get("nnz") or plan.get("nnz")
            if nnz and nnz != peer["nnz"]:
                parts.append(f"pattern nnz differs: sparsejac {nnz:,}, peer {peer['nnz']:,}")
        else:
            parts.append(f"peer: {_why(peer)}")
        out.append(f"- {case}: " + "; ".join(parts))
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke test")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated, of {','.join(CASES)}")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help=f"seconds for each torch subprocess (the peer's: {PEER_TIMEOUT:.0f})")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        case, method, sizes, chunk = args.worker
        out = WORKERS[method](case, json.loads(sizes), json.loads(chunk))
        print("RESULT " + json.dumps(out))
        return 0

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")

    def log(case, method, r):
        state = "ok" if _ok(r) else _why(r)
        print(f"  {case}/{method}: {state}", file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    results = {}
    for case in cases:
        _, _, full, quick = CASES[case]
        results[case] = measure_case(case, quick if args.quick else full, args.timeout, log)

    import torch

    versions = f"torch {torch.__version__}"
    try:
        from importlib.metadata import version

        versions += f", jax {version('jax')}, asdex {version('asdex')}"
    except Exception:  # noqa: BLE001
        versions += ", jax/asdex not installed"
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "sparsejac"],
                               capture_output=True, text=True).stdout.strip()
        versions += f"; sparsejac at {commit}" + (" + uncommitted changes" if dirty else "")
    except OSError:
        pass
    try:
        load = " load average %.1f %.1f %.1f;" % os.getloadavg()
    except OSError:
        load = ""
    header = (f"{datetime.datetime.now().isoformat(timespec='minutes')}; {os.cpu_count()} cores,"
              f"{load} {platform.machine()}, Python {platform.python_version()}, {versions}; CPU"
              f"{'; --quick sizes' if args.quick else ''}; "
              f"{time.perf_counter() - t_start:.0f} s in all")
    print(header)
    print()
    for case in cases:
        print(f"- {case}: {CASES[case][0]}" if not args.quick
              else f"- {case}: {results[case]['sizes']}, {CASES[case][1]}")
    print()
    print(table(results))
    print()
    print(notes(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "results": results,
                       "ratios": {c: ratios(c, r) for c, r in results.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
