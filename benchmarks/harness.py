"""The driver, worker and table helpers shared by bench_programs.py and bench_hessians.py.

Each (model or case, method) runs in a fresh subprocess of the benchmark script (``--worker``)
under :func:`measure.run_guarded`; the worker prints one ``RESULT <json>`` line, and may print
``PHASE <name>`` lines on stderr to say how far it got (named where it is killed or times out).
A result dict with a ``time`` is a measurement; otherwise ``na``, ``status`` or ``error`` says
why there is none.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

from measure import peak_above, reset_peak, run_guarded

GB = 1e9
MB = 1e6

REPEAT_BUDGET = 60.0  # seconds: fewer than 3 timed repeats where one run is slower than this / 3


# --------------------------------------------------------------------------- workers


def timed(run, budget: float = REPEAT_BUDGET) -> tuple[float, int]:
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


def refill(plan, x, x_new) -> tuple[float, int, int, object]:
    """A plan's CSR refill: a warm-up at ``x``, then the best of :func:`timed` at ``x_new`` and
    the peak of those calls; returns ``(best, runs, peak, the CSR at x_new)``."""
    J = plan.jacobian(x, format="csr")  # warm-up
    del J
    base = reset_peak()
    best, n = timed(lambda: plan.jacobian(x_new, format="csr"))
    peak = peak_above(base)
    return best, n, peak, plan.jacobian(x_new, format="csr")


def jax_eval(compiled, x, x_new) -> tuple[float, int]:
    """A compiled JAX function's evaluation: a warm-up at ``x``, then :func:`timed` at ``x_new``."""
    import jax

    jax.block_until_ready(compiled(x))  # warm-up
    return timed(lambda: jax.block_until_ready(compiled(x_new)))


def error(e: BaseException) -> dict:
    """A worker's result for an exception: its first line, and the traceback's tail."""
    first = (str(e).strip().splitlines() or [""])[0]
    return {"error": f"{type(e).__name__}: {first[:160]}",
            "traceback": traceback.format_exc()[-3000:]}


# --------------------------------------------------------------------------- driver


def rss_limit(floor: float = 0) -> int:
    """The watchdog's limit: 60% of the available memory, at most 8 GB and at least ``floor``."""
    avail = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    return int(max(floor, min(8 * GB, 0.6 * avail))) if avail else int(8 * GB)


def spawn(script: str, name: str, method: str, sizes: dict, timeout: float,
          chunk: int | None = None, *, rss_floor: float = 0, stderr_oom: bool = True) -> dict:
    """Run ``script --worker name method sizes chunk`` guarded; its ``RESULT``, or a ``status``.

    ``oom`` is set where the watchdog killed it for memory, and (``stderr_oom``) where it failed
    with an out-of-memory error of its own."""
    argv = [sys.executable, script, "--worker", name, method, json.dumps(sizes), json.dumps(chunk)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    limit = rss_limit(rss_floor)
    r = run_guarded(argv, timeout, limit, env)
    phases = [ln[6:] for ln in r["stderr"].splitlines() if ln.startswith("PHASE ")]
    where = f" in {phases[-1]}" if phases else ""
    if r["killed"] == "timeout":
        return {"status": f"timeout (> {timeout:.0f} s){where}"}
    if r["killed"] == "memory":
        return {"status": f"killed: resident size over {limit / GB:.1f} GB{where}", "oom": True}
    for line in r["stdout"].splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    lines = [ln for ln in r["stderr"].strip().splitlines() if not ln.startswith("PHASE ")]
    tail = (lines or ["?"])[-1]
    out = {"status": f"failed{where}: {tail[:160]}", "stderr": r["stderr"][-3000:]}
    if stderr_oom:
        out["oom"] = any(k in r["stderr"] for k in ("can't allocate memory", "MemoryError",
                                                    "OutOfMemoryError", "RESOURCE_EXHAUSTED"))
    return out


def log(name: str, method: str, r) -> None:
    """Progress on stderr: ``name/method: ok`` or why not."""
    state = "ok" if ok(r) else why(r)
    print(f"  {name}/{method}: {state}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the table


def ok(r) -> bool:
    return isinstance(r, dict) and "time" in r


def why(r) -> str:
    if not isinstance(r, dict):
        return "n/a"
    for k in ("na", "status", "error"):
        if k in r:
            return ("n/a: " if k == "na" else "") + str(r[k]).replace("|", "/")
    return "n/a"


def cell_time(r: dict, key: str = "time") -> str:
    if ok(r) and r.get(key) is not None:
        extra = f" (chunk {r['chunk']})" if r.get("chunk") else ""
        return f"{r[key]:.4g}{extra}"
    return why(r)


def cell_mb(r: dict, key: str = "peak", missing: str = "") -> str:
    """``r[key]`` in MB; empty where there is no measurement, ``missing`` where it lacks ``key``."""
    if ok(r) and r.get(key) is not None:
        return f"{r[key] / MB:.1f}"
    return "" if not ok(r) else missing


def human(nbytes: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes:.0f} B"


def verdict(value: float | None, threshold: float, direction: str, fmt: str) -> str:
    """``value`` by ``fmt`` and whether it meets ``threshold`` (``direction``: >=, <=, <)."""
    if value is None:
        return "n/a"
    met = {">=": value >= threshold, "<=": value <= threshold, "<": value < threshold}[direction]
    return f"{fmt.format(value)} {'met' if met else '**missed**'}"


# --------------------------------------------------------------------------- main


def parser(doc: str, what: str, known, timeout: float, timeout_help: str,
           peer_timeout: float) -> argparse.ArgumentParser:
    """The command line of a benchmark: ``--quick``, ``--<what>``, ``--json``, ``--timeout``,
    ``--peer-timeout``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, a smoke test")
    p.add_argument(f"--{what}", default=",".join(known),
                   help=f"comma-separated, of {','.join(known)}")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--timeout", type=float, default=timeout, help=timeout_help)
    p.add_argument("--peer-timeout", type=float, default=peer_timeout,
                   help="seconds for each run of the JAX peer (detection, colouring, compilation "
                        f"and evaluations; default {peer_timeout:.0f})")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    return p


def names(p: argparse.ArgumentParser, text: str, known, what: str) -> list[str]:
    """The comma-separated names of ``text``; an error of ``p`` where one is not ``known``."""
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in known]
    if unknown:
        p.error(f"unknown {what}(s) {unknown}; choose from {list(known)}")
    return chosen


def run_worker(argv: list[str], workers: dict) -> int:
    """The ``--worker name method sizes chunk`` side: ``workers[method](name, sizes, chunk)``,
    printed as ``RESULT <json>``."""
    name, method, sizes, chunk = argv
    out = workers[method](name, json.loads(sizes), json.loads(chunk))
    print("RESULT " + json.dumps(out))
    return 0


def versions(root) -> str:
    """numpy's, scipy's, torch's, jax's and asdex's versions, and the checkout's commit
    (``+ uncommitted changes`` where sparsejac/ differs from it)."""
    import numpy
    import scipy
    import torch

    out = f"numpy {numpy.__version__}, scipy {scipy.__version__}, torch {torch.__version__}"
    try:
        from importlib.metadata import version

        out += f", jax {version('jax')}, asdex {version('asdex')}"
    except Exception:  # noqa: BLE001
        out += ", jax/asdex not installed"
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "sparsejac"],
                               capture_output=True, text=True).stdout.strip()
        out += f"; sparsejac at {commit}" + (" + uncommitted changes" if dirty else "")
    except OSError:
        pass
    return out


def load_average() -> str:
    """`` load average a b c;`` or empty where the system has none."""
    try:
        return " load average %.1f %.1f %.1f;" % os.getloadavg()
    except OSError:
        return ""


def report(header: str, items: list[str], table: str, notes: str, json_path: str | None,
           results: dict, ratios: dict) -> None:
    """Print the header, the list of what ran, the table and the notes; the raw results to
    ``json_path`` where given."""
    print(header)
    print()
    for item in items:
        print(item)
    print()
    print(table)
    print()
    print(notes)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"header": header, "results": results, "ratios": ratios}, f, indent=1)
