"""Newton-type optimisation with an exact sparse Hessian: Rosenbrock with 1e5 variables.

    python examples/trust_constr_rosenbrock.py                    # trust-constr and Newton-CG
    python examples/trust_constr_rosenbrock.py --n 1000           # smaller
    python examples/trust_constr_rosenbrock.py --methods trust-constr

The objective is written in torch with slices; scipy gets

- the value and gradient from torch autograd (``jac=True``), and
- the Hessian as a ``scipy.sparse.csr_array`` from ``sparsejac.hessian_of(f, z, format="csr")``
  (tridiagonal here: 3n - 2 entries; the dense Hessian would have n**2 = 1e10 entries, 80 GB).

Two starts, towards the minimum at (1, 1, ..., 1):

- ``standard``: (-1.2, 1, -1.2, 1, ...). On this chained Rosenbrock, Newton-type methods need a
  number of iterations that grows with n from here (measured with scipy's own exact Hessian:
  trust-constr does not converge in 3,000 iterations at n = 1,000, Newton-CG needs 1,603), so at
  n = 1e5 it is run for ``--standard-maxiter`` iterations only, to show the cost per iteration;
- ``perturbed``: 1 + U(-0.5, 0.5) (seeded), run to convergence.

Printed per start and method: iterations, function/Hessian evaluations, final f, distance to the
optimum, wall time, and the time spent in ``hessian_of``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import scipy.optimize
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import sparsejac  # noqa: E402


def rosenbrock(z: torch.Tensor) -> torch.Tensor:
    return (100 * (z[1:] - z[:-1] ** 2) ** 2 + (1 - z[:-1]) ** 2).sum()


class Problem:
    """f, gradient and sparse Hessian in float64, with counters and timers."""

    def __init__(self):
        self.nfev = self.nhev = 0
        self.t_hess = 0.0

    def fun_and_grad(self, x: np.ndarray):
        self.nfev += 1
        z = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        f = rosenbrock(z)
        (g,) = torch.autograd.grad(f, z)
        return f.item(), g.numpy()

    def hess(self, x: np.ndarray, *_):
        self.nhev += 1
        t0 = time.perf_counter()
        H = sparsejac.hessian_of(rosenbrock, torch.from_numpy(np.array(x, dtype=np.float64)),
                                 format="csr")
        self.t_hess += time.perf_counter() - t0
        return H


def start(name: str, n: int) -> np.ndarray:
    if name == "standard":
        return np.tile([-1.2, 1.0], (n + 1) // 2)[:n].astype(np.float64)
    return 1 + np.random.default_rng(0).uniform(-0.5, 0.5, n)


def solve(method: str, x0: np.ndarray, maxiter: int) -> dict:
    n = x0.size
    p = Problem()
    options = {"maxiter": maxiter}
    if method == "trust-constr":
        options.update(gtol=1e-8, xtol=1e-12)
    else:
        options.update(xtol=1e-10)
    t0 = time.perf_counter()
    res = scipy.optimize.minimize(p.fun_and_grad, x0, jac=True, hess=p.hess, method=method,
                                  options=options)
    wall = time.perf_counter() - t0
    out = dict(method=method, n=n, success=bool(res.success), message=str(res.message),
               iterations=int(getattr(res, "nit", -1)), nfev=p.nfev, nhev=p.nhev,
               f=float(res.fun), dist=float(np.linalg.norm(res.x - 1.0)),
               gnorm=float(np.linalg.norm(p.fun_and_grad(res.x)[1])), wall=wall,
               t_hess=p.t_hess)
    if method == "trust-constr":
        out["cg_iterations"] = int(res.cg_niter)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="variables (default 1e5)")
    ap.add_argument("--methods", default="trust-constr,Newton-CG")
    ap.add_argument("--starts", default="standard,perturbed")
    ap.add_argument("--maxiter", type=int, default=2000)
    ap.add_argument("--standard-maxiter", type=int, default=30,
                    help="iterations from the standard start (it needs O(n) of them)")
    args = ap.parse_args(argv)
    print(f"Rosenbrock, n = {args.n:,}, float64; torch {torch.__version__}, "
          f"scipy {scipy.__version__}, {torch.get_num_threads()} torch threads")
    H = sparsejac.hessian_of(rosenbrock, torch.full((args.n,), 0.5, dtype=torch.float64),
                             format="csr")  # warm-up (torch's lazy imports), and the pattern
    print(f"Hessian: {type(H).__name__} {H.shape}, {H.nnz:,} stored entries "
          f"({(H.data.nbytes + H.indices.nbytes + H.indptr.nbytes) / 1e6:.1f} MB; "
          f"dense would be {args.n ** 2 * 8 / 1e9:,.0f} GB)")
    t_all = time.perf_counter()
    for name in [m.strip() for m in args.starts.split(",") if m.strip()]:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            x0 = start(name, args.n)
            maxiter = args.standard_maxiter if name == "standard" else args.maxiter
            r = solve(method, x0, maxiter)
            extra = f", {r['cg_iterations']} CG iterations" if "cg_iterations" in r else ""
            print(f"[{name} start, maxiter {maxiter}] {method}: {r['iterations']} iterations{extra}, {r['nfev']} f+grad evaluations, "
                  f"{r['nhev']} Hessians; success={r['success']} ({r['message']})")
            print(f"  final f = {r['f']:.3e}, |grad| = {r['gnorm']:.2e}, "
                  f"||x - 1|| = {r['dist']:.2e}")
            print(f"  wall time {r['wall']:.1f} s, of which hessian_of {r['t_hess']:.1f} s "
                  f"({r['t_hess'] / max(r['nhev'], 1) * 1e3:.0f} ms per Hessian)", flush=True)
    print(f"total {time.perf_counter() - t_all:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
