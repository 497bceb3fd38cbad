"""The demonstration behind ``python -m sparsejac`` / ``sparsejac demo``.

First the note's four patterns at small sizes, every operand, against torch's autodiff (where
torch is installed); then large instances whose dense Jacobians could not exist on this machine,
with their shape, nnz, bytes against the dense bytes, and time.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .plan import jacobian, plan
from .report import compare_with_torch, human_bytes, size_ratio

PATTERNS = ["ij,jk->ik", "bij,bjk->bik", "bchwkt,fckt->bfhw", "abcd,efd->"]
SMALL = {
    "ij,jk->ik": [(5, 4), (4, 3)],
    "bij,bjk->bik": [(2, 3, 4), (2, 4, 3)],
    "bchwkt,fckt->bfhw": [(2, 3, 4, 4, 2, 2), (3, 3, 2, 2)],
    "abcd,efd->": [(2, 3, 2, 4), (3, 2, 4)],
}
LARGE = [
    ("ij,jk->ik", [(512, 512), (512, 512)], 0, "csr"),
    ("bij,bjk->bik", [(32, 128, 128), (32, 128, 128)], 1, "csr"),
    ("bchwkt,fckt->bfhw", [(8, 16, 32, 32, 3, 3), (32, 16, 3, 3)], 0, "coo"),
    ("abcd,efd->", [(64, 64, 64, 32), (64, 64, 32)], 1, "coo"),
]


def check_against_torch(print_=print) -> bool:
    """Compare every pattern, every operand, with ``torch.autograd.functional.jacobian``."""
    rng = np.random.default_rng(0)
    ok = True
    for subscripts in PATTERNS:
        operands = [rng.standard_normal(s) for s in SMALL[subscripts]]
        for k in range(len(operands)):
            J = jacobian(subscripts, *operands, wrt=k)
            print_(f"  {subscripts:<20} wrt {k}: shape {J.shape}, nnz {J.nnz}")
            ok &= compare_with_torch(print_, subscripts, operands, k, J.todense())
    return ok


def run_large(print_=print) -> None:
    rng = np.random.default_rng(0)
    for subscripts, shapes, wrt, fmt in LARGE:
        operands = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
        start = time.perf_counter()
        J = jacobian(subscripts, *operands, wrt=wrt, format=fmt)
        seconds = time.perf_counter() - start
        nbytes = plan(subscripts, *shapes, wrt=wrt).nbytes(fmt, J.dtype)  # the arrays built
        dense = math.prod(J.shape) * J.dtype.itemsize
        shape = J.shape
        print_(f"  {subscripts:<20} wrt {wrt} {fmt}: shape {shape}, nnz {J.nnz:.3g}, "
               f"{human_bytes(nbytes)} vs dense {human_bytes(dense)} ({size_ratio(dense, nbytes)}), "
               f"{seconds:.2f} s")
        del J


def main() -> int:
    print("sparsejac demo: exact sparse Jacobians of einsums\n")
    print("1. Small cases against torch.autograd.functional.jacobian (float64):")
    ok = check_against_torch()
    print("\n2. Large cases (float32): dense Jacobians of terabytes, built sparse in seconds\n"
          "   (the last one, of a scalar, is a dense gradient: sparse storage costs more there):")
    run_large()
    return 0 if ok else 1
