"""sparsejac.jacobian_of against torch.func.jacrev on whole programs, side by side.

Each (case, method) runs in a fresh subprocess, so that peak memory is its own. Inputs come
from a seeded generator; the time
is of one call after a warm-up call on the same inputs. float32, CPU. Peak memory: the rise of
the resident size above its size before the first call (benchmarks/measure.py).

    python3 benchmarks/bench_programs.py            # both cases
    python3 benchmarks/bench_programs.py --quick    # smaller sizes, a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

# Run from a checkout without installing: the package is next to this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import peak_above, reset_peak  # noqa: E402

CASES = {
    # name: (description, sizes, quick sizes)
    "mlp": ("2-layer tanh MLP, wrt input", dict(b=64, n=256), dict(b=8, n=32)),
    "attention": ("single-head self-attention, wrt input", dict(b=4, t=32, d=64),
                  dict(b=2, t=8, d=16)),
}


def _worker(case: str, method: str, sizes: dict) -> dict:
    import time

    import torch

    import sparsejac

    torch.set_num_threads(max(1, torch.get_num_threads()))
    g = torch.Generator().manual_seed(0)
    f32 = torch.float32

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, dtype=f32, generator=g) * scale

    if case == "mlp":
        b, n = sizes["b"], sizes["n"]
        x = randn(b, n)
        w1, b1 = randn(n, n, scale=n**-0.5), randn(n)
        w2, b2 = randn(n, n, scale=n**-0.5), randn(n)

        def fn(x):
            return torch.tanh(torch.tanh(x @ w1 + b1) @ w2 + b2)

    else:
        b, t, d = sizes["b"], sizes["t"], sizes["d"]
        x = randn(b, t, d)
        wq, wk, wv = (randn(d, d, scale=d**-0.5) for _ in range(3))

        def fn(x):
            q, k, v = x @ wq, x @ wk, x @ wv
            return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1) @ v

    if method == "sparsejac":
        run = lambda: sparsejac.jacobian_of(fn, x, format="csr")  # noqa: E731
    else:
        run = lambda: torch.func.jacrev(fn)(x)  # noqa: E731
    base = reset_peak()
    t0 = time.perf_counter()
    result = run()  # warm-up (and the memory peak)
    cold = time.perf_counter() - t0
    del result
    t0 = time.perf_counter()
    result = run()
    warm = time.perf_counter() - t0
    peak = peak_above(base)
    nnz = int(result.nnz) if method == "sparsejac" else int(result.numel())
    return dict(time=warm, cold=cold, peak=peak, stored=nnz)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        case, method, sizes = options.worker
        print(json.dumps(_worker(case, method, json.loads(sizes))))
        return

    rows = []
    for case in options.cases:
        desc, full, quick = CASES[case]
        sizes = quick if options.quick else full
        res = {}
        for method in ("sparsejac", "jacrev"):
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", case, method, json.dumps(sizes)],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                res[method] = None
                print(f"{case}/{method} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            else:
                res[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((case, desc, sizes, res))

    print(f"{'case':<10} {'sizes':<22} {'method':<10} {'time s':>9} {'1st call s':>10} "
          f"{'peak MiB':>9} {'stored':>12}")
    for case, desc, sizes, res in rows:
        for method in ("sparsejac", "jacrev"):
            r = res[method]
            if r is None:
                print(f"{case:<10} {str(sizes):<22} {method:<10} {'failed':>9}")
                continue
            print(f"{case:<10} {str(sizes):<22} {method:<10} {r['time']:>9.3f} {r['cold']:>10.3f} "
                  f"{r['peak'] / 2**20:>9.1f} {r['stored']:>12,}")
        s, j = res["sparsejac"], res["jacrev"]
        if s and j:
            print(f"{'':<10} {desc:<33} speed-up {j['time'] / s['time']:.1f}x, "
                  f"peak memory ratio {j['peak'] / max(s['peak'], 1):.1f}x")


if __name__ == "__main__":
    main()
